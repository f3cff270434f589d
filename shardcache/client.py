"""The sharded client: pymemcache's method set over a consistent-hash ring of memcached nodes.

Each key is validated once, routed by the ring (the key prefix is not hashed unless
``hash_key_prefix=True``, as in libmemcached) and sent to its node over a pooled pymemcache
connection. Multi-key calls group their keys by node and pipeline all nodes at once, so they cost
about one round trip however many nodes they touch. A node that is down costs no time: its keys
follow the failover policy at once (see ``shardcache.membership`` for fencing).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

from pymemcache.client.base import Client as PymemcacheClient

from shardcache import recipes
from shardcache._config import integer_arg
from shardcache._core import COUNTER, READ, UNAVAILABLE, WRITE, ClientCore, Key
from shardcache._pool import node_failure
from shardcache._wire import (
    Reader,
    connected,
    delete_everywhere,
    exchange,
    fetch_one,
    raise_for_error,
    read_stored,
    read_values,
    store_one,
)
from shardcache.errors import (
    ArgumentError,
    CasConflictError,
    ValueTooLargeError,
)
from shardcache.health import UP, Event
from shardcache.membership import Node
from shardcache.serde import FLAG_INTEGER

__all__ = ["CasToken", "Client"]

T = TypeVar("T")
P = ParamSpec("P")
R = TypeVar("R")


class CasToken(bytes):
    """A CAS token from ``gets`` that remembers the node which issued it.

    It is the server's token (bytes of digits), so it also works wherever pymemcache takes one.
    ``Client.cas`` refuses to use it on another node: a token is only meaningful where it was issued.
    """

    node_id: str

    def __new__(cls, raw: bytes, node_id: str) -> CasToken:
        token = super().__new__(cls, raw)
        token.node_id = node_id
        return token

    def __reduce__(self) -> tuple[Any, ...]:
        return (CasToken, (bytes(self), self.node_id))


class Client(ClientCore):
    """A memcached client over many nodes, with pymemcache's methods; thread-safe.

    ``Client(servers, **options)``: ``servers`` is a list of node specs (``"host:port[:weight]"``,
    ``("host", port)``, ...). No connection is made until the first call. One instance is meant to be
    shared by all the threads of a process: each call borrows a connection from the node's pool.

    Placement: ``hashing`` (``"mmh3"`` | ``"ketama"``), ``ketama_naming``, ``hash_key_prefix`` (hash
    ``key_prefix`` too; default False, as libmemcached).

    Connections (as pymemcache): ``connect_timeout``, ``timeout`` (seconds, default 1.0 each;
    ``None`` waits forever), ``no_delay`` (default True), ``socket_module``, ``socket_keepalive``,
    ``tls_context``, ``key_prefix``, ``allow_unicode_keys`` (UTF-8 keys; default ASCII only),
    ``encoding``; ``default_noreply`` (default False: replies are awaited, so failed writes are
    reported); ``max_pool_size`` (idle connections kept per node; None: no cap, a call never waits
    for a connection) and ``pool_idle_timeout`` (seconds; 0: never closed for idleness).

    Values: ``serde`` (``serialize(key, value) -> (bytes, flags)``, ``deserialize(key, data,
    flags)``), default ``shardcache.default_serde`` (bytes, str, int, JSON; never pickle);
    pymemcache's ``serializer``/``deserializer`` functions are accepted too.

    Failures: ``on_error="raise"`` (default) raises node failures; ``"miss"`` turns them into misses
    (reads return the default, writes return False); either way each one emits an ``"error"`` event
    and a log record on the ``shardcache`` logger. ``failure_threshold`` consecutive transport
    failures mark a node DOWN; it is probed ``retry_interval_s`` later, backing off up to
    ``max_retry_interval_s``. While it is down, ``failover`` decides where its keys go:
    ``"fail_fast"`` (default: nowhere, at once), ``"remap"`` (the next live node on the ring) or
    ``"gutter"`` (the ``gutter_servers``), with TTLs capped at ``failover_ttl_s``. When it answers
    again it is fenced (the keys changed while it was away are deleted on it, and miss until then;
    past ``fence_max_keys`` it is flushed), so it never serves a value older than the last write.

    pymemcache's ``ignore_exc=True`` means ``on_error="miss"``; ``use_pooling`` and
    ``lock_generator`` are accepted and ignored (shardcache always pools, without locks).
    """

    # -- single-key commands ----------------------------------------------------------------------

    def get(self, key: Key, default: Any = None) -> Any:
        """The value of ``key``, or ``default`` if it is not cached."""
        hash_key, wire = self._wire_key(key)
        topology = self._membership.topology
        node = topology.nodes[topology.ring.node_for(hash_key)]
        if not node.ready:
            return self._run(key, "get", lambda c, k, t, s: c.get(k, default), default, READ)
        node.ops += 1
        pool = node.pool
        conn = pool.acquire()
        try:
            found = fetch_one(connected(conn), b"get " + wire + b"\r\n", wire, False)
        except Exception as exc:
            pool.discard(conn)
            self._call_failed(node, exc, "get", key, None)
            return default
        pool.release(conn)
        if node.health.failures:
            node.health.record_success()
        if found is None:
            if topology.previous is not None:
                return self._warm(topology, [(hash_key, wire, node)]).get(wire, default)
            return default
        try:
            return self._serde.deserialize(wire, found[0], found[1])
        except Exception as exc:
            if not self._miss(exc, reading=True):
                raise
            self._membership.emit(Event("error", node.node_id, str(exc), exc, key))
            return default

    def set(
        self, key: Key, value: Any, expire: int = 0, noreply: bool | None = None, flags: int | None = None
    ) -> bool:
        """Store ``value`` under ``key`` for ``expire`` seconds (0: no expiry). True if stored."""
        hash_key, wire = self._wire_key(key)
        topology = self._membership.topology
        node = topology.nodes[topology.ring.node_for(hash_key)]
        if not node.ready:
            return bool(self._store(b"set", key, value, expire, noreply, flags))
        if noreply is None:
            noreply = self._default_noreply
        command = self._store_command(b"set", wire, value, expire, flags, noreply)
        if topology.previous is not None:  # during a window the previous owner's copy goes first
            self._forget_previous(topology, [(hash_key, wire, node)])
        node.ops += 1
        pool = node.pool
        conn = pool.acquire()
        try:
            stored = store_one(connected(conn), command, noreply)
        except Exception as exc:
            pool.discard(conn)
            self._call_failed(node, exc, "set", key, wire)
            return False
        pool.release(conn)
        if node.health.failures:
            node.health.record_success()
        return bool(stored)

    def _store(
        self,
        name: bytes,
        key: Key,
        value: Any,
        expire: int,
        noreply: bool | None,
        flags: int | None,
        cas: bytes = b"",
        kind: int = WRITE,
        missed: Any = False,
    ) -> Any:
        """A storage command through ``_run``; ``kind=COUNTER`` never goes to a stand-in."""
        if noreply is None:
            noreply = self._default_noreply
        capped = self._membership.capped_ttl
        store_command = self._store_command
        quiet = bool(noreply)

        def call(c: PymemcacheClient, k: bytes, t: Node, stand_in: bool) -> bool:
            command = store_command(name, k, value, capped(expire) if stand_in else expire, flags, quiet, cas)
            return store_one(connected(c), command, quiet)

        return self._run(key, name.decode(), call, missed, kind)

    def add(
        self, key: Key, value: Any, expire: int = 0, noreply: bool | None = None, flags: int | None = None
    ) -> bool:
        """Store ``value`` only if ``key`` is absent. True if stored."""
        return bool(self._store(b"add", key, value, expire, noreply, flags))

    def replace(
        self, key: Key, value: Any, expire: int = 0, noreply: bool | None = None, flags: int | None = None
    ) -> bool:
        """Store ``value`` only if ``key`` is present. True if stored."""
        return bool(self._store(b"replace", key, value, expire, noreply, flags))

    def append(
        self, key: Key, value: Any, expire: int = 0, noreply: bool | None = None, flags: int | None = None
    ) -> bool:
        """Append ``value`` (serialized) to the stored bytes of ``key``. True if it was present."""
        return bool(self._store(b"append", key, value, expire, noreply, flags))

    def prepend(
        self, key: Key, value: Any, expire: int = 0, noreply: bool | None = None, flags: int | None = None
    ) -> bool:
        """Prepend ``value`` (serialized) to the stored bytes of ``key``. True if it was present."""
        return bool(self._store(b"prepend", key, value, expire, noreply, flags))

    def gets(self, key: Key, default: Any = None, cas_default: Any = None) -> tuple[Any, Any]:
        """``(value, cas_token)`` of ``key``, or ``(default, cas_default)`` if it is not cached.

        The token is a ``CasToken``: it remembers the node that issued it.
        """
        missing = (default, cas_default)
        found = self._gets(key, default, missing, READ)
        return missing if found is UNAVAILABLE else found

    def _gets(self, key: Key, default: Any, missing: Any, kind: int) -> Any:
        """``gets``; ``missing`` on a miss, ``UNAVAILABLE`` if the call could not reach a node."""

        def call(c: PymemcacheClient, k: bytes, target: Node, stand_in: bool) -> tuple[Any, Any]:
            value, token = c.gets(k, default, None)
            return missing if token is None else (value, CasToken(token, target.node_id))

        found = self._run(key, "gets", call, UNAVAILABLE, kind)
        if found is missing and self._warm_one(key):  # moved in a membership change: copied over
            found = self._run(key, "gets", call, UNAVAILABLE, kind)
        return found

    def cas(
        self, key: Key, value: Any, cas: Any, expire: int = 0, noreply: bool = False, flags: int | None = None
    ) -> bool | None:
        """Store ``value`` if ``key`` is unchanged since ``gets`` returned ``cas``.

        True: stored. False: the key changed, or the token was issued by a node that does not serve
        the key now (the ring changed or a failover happened): re-read and retry. None: absent.
        """
        result = self._cas(key, value, cas, expire, noreply, flags, WRITE)
        return False if result is UNAVAILABLE else bool(result) if result is not None else None

    def _cas(
        self, key: Key, value: Any, cas: Any, expire: int, noreply: bool, flags: int | None, kind: int
    ) -> Any:
        capped = self._membership.capped_ttl
        unique = b" " + _cas_unique(cas)
        store_command = self._store_command

        def call(c: PymemcacheClient, k: bytes, target: Node, stand_in: bool) -> bool | None:
            if isinstance(cas, CasToken) and cas.node_id != target.node_id:
                return False  # a token only means something on the node that issued it
            ttl = capped(expire) if stand_in else expire
            sock = connected(c)
            sock.sendall(store_command(b"cas", k, value, ttl, flags, noreply, unique))
            if noreply:
                return True
            line = Reader(sock).line()
            if line in _CAS_REPLIES:
                return _CAS_REPLIES[line]
            raise_for_error(line)
            return None

        return self._run(key, "cas", call, UNAVAILABLE, kind)

    def delete(self, key: Key, noreply: bool | None = None) -> bool:
        """Delete ``key``. True if it was deleted (always True with noreply).

        If the node is down or the delete fails, the key is fenced: it is deleted on the node
        before that node serves it again, so an invalidation is never lost.
        """
        return self._run(key, "delete", lambda c, k, t, s: bool(c.delete(k, noreply)), False, WRITE)

    def incr(
        self,
        key: Key,
        value: int,
        noreply: bool | None = False,
        *,
        initial: int | None = None,
        expire: int = 0,
    ) -> int | None:
        """Add ``value`` to the counter at ``key``: the new value, or None if ``key`` is absent.

        With ``initial``, an absent counter is created at ``initial`` (with ``expire``) and
        ``initial`` is returned, the delta not added (as libmemcached's increment-with-initial);
        creation uses ``add``, so concurrent creators never overwrite each other's increments.
        memcached counters are unsigned 64-bit integers stored as decimal text: ``incr`` wraps at
        2**64, ``decr`` stops at 0, and a value that is not a number raises ``CommandError``. A
        counter is never moved to a stand-in node while its node is down: the call misses (or
        raises) instead, so no count restarts from zero elsewhere.
        """
        return self._counter("incr", key, value, noreply, initial, expire)

    def decr(
        self,
        key: Key,
        value: int,
        noreply: bool | None = False,
        *,
        initial: int | None = None,
        expire: int = 0,
    ) -> int | None:
        """Subtract ``value`` from the counter at ``key`` (floored at 0): the new value, or None.

        ``initial`` and ``expire`` as for ``incr``.
        """
        return self._counter("decr", key, value, noreply, initial, expire)

    def _counter(
        self, name: str, key: Key, delta: int, noreply: bool | None, initial: int | None, expire: int
    ) -> int | None:
        if initial is not None and (isinstance(initial, bool) or not isinstance(initial, int) or initial < 0):
            raise ArgumentError(f"initial must be an int >= 0, got {initial!r}")

        def call(c: PymemcacheClient, k: bytes, t: Node, s: bool) -> int | None:
            result: int | None = getattr(c, name)(k, delta, noreply)
            return result

        for _ in range(_CREATE_ATTEMPTS):
            result: Any = self._run(key, name, call, UNAVAILABLE, COUNTER)
            if result is UNAVAILABLE:  # its node is down or failed (on_error="miss")
                return None
            if result is not None or noreply:
                return int(result) if result is not None else None
            if self._warm_one(key):  # the counter is still on its previous owner: bring it over
                continue
            if initial is None:
                return None
            created = self._store(
                b"add", key, b"%d" % initial, expire, False, FLAG_INTEGER, kind=COUNTER, missed=UNAVAILABLE
            )
            if created is UNAVAILABLE:
                return None
            if created:
                return initial
        raise CasConflictError(
            f"{name}({key!r}, initial={initial}): the counter kept appearing and disappearing",
            key,
            _CREATE_ATTEMPTS,
        )

    def touch(self, key: Key, expire: int = 0, noreply: bool | None = None) -> bool:
        """Set a new expiry on ``key``. True if it exists."""
        capped = self._membership.capped_ttl
        return self._run(
            key,
            "touch",
            lambda c, k, t, s: bool(c.touch(k, capped(expire) if s else expire, noreply)),
            False,
            WRITE,
        )

    # -- race-free patterns (shardcache.recipes) ---------------------------------------------------

    def cas_update(
        self,
        key: Key,
        fn: Callable[[Any], Any],
        *,
        initial: Any = None,
        expire: int = 0,
        max_attempts: int = 64,
        backoff_s: float = 0.001,
        max_backoff_s: float = 0.05,
    ) -> Any:
        """Apply ``fn`` to the value of ``key`` atomically (the CAS retry loop); the stored value.

        An absent key is created with ``add(key, fn(initial))``. ``fn`` may run more than once; if
        it raises, nothing is written. ``CasConflictError`` after ``max_attempts`` conflicts. It
        never runs on a stand-in node: if the key's node is down it raises (or, with
        ``on_error="miss"``, returns None). See ``shardcache.recipes.cas_update``.
        """
        return recipes.cas_update(
            self, key, fn, initial=initial, expire=expire, max_attempts=max_attempts,
            backoff_s=backoff_s, max_backoff_s=max_backoff_s,
        )  # fmt: skip

    def lock(self, name: Key, *, ttl_s: int = 30, blocking_timeout_s: float | None = 10.0) -> recipes.Lock:
        """A distributed lock (context manager): ``with client.lock("report:42"): ...``.

        Held by a unique owner token in key ``name + ":lock"``, expiring after ``ttl_s``; released
        only by its owner. ``LockError`` if not acquired within ``blocking_timeout_s``.
        """
        return recipes.Lock(self, name, ttl_s=ttl_s, blocking_timeout_s=blocking_timeout_s)

    def get_or_set(
        self,
        key: Key,
        factory: Callable[[], Any],
        *,
        expire: int = 0,
        lock_ttl_s: int = 10,
        wait_s: float | None = None,
    ) -> Any:
        """The cached value of ``key``; on a miss one caller across all processes runs ``factory``
        and stores its result while the others wait for it (stampede protection)."""
        return recipes.get_or_set(self, key, factory, expire=expire, lock_ttl_s=lock_ttl_s, wait_s=wait_s)

    def cached(
        self, *, expire: int = 0, key: Callable[..., Key] | str | None = None, lock_ttl_s: int = 10
    ) -> Callable[[Callable[P, R]], Callable[P, R]]:
        """Decorator caching a function's result (``get_or_set`` per call); see ``recipes.cached``."""
        return recipes.cached(self, expire=expire, key=key, lock_ttl_s=lock_ttl_s)

    # -- multi-key commands -----------------------------------------------------------------------

    def _fetch(self, keys: Iterable[Key], with_cas: bool) -> dict[Key, Any]:
        what = "gets_many" if with_cas else "get_many"
        topology = self._membership.topology
        hashed = self._hashed(keys)
        targets, groups, _, down = self._plan(hashed, READ, what)
        if not groups and not down:
            return {}
        deserialize = self._serde.deserialize
        command = b"gets " if with_cas else b"get "

        def encode(wires: Sequence[bytes]) -> bytes:
            return command + b" ".join(wires) + b"\r\n"

        refused: list[tuple[bytes, Exception]] = []

        def decode(reader: Reader, wires: Sequence[bytes]) -> dict[bytes, Any]:
            return read_values(reader, 1, deserialize, with_cas, refused)

        pools = {node_id: node.pool for node_id, node in targets.items()}
        wire_lists = {node_id: list(group) for node_id, group in groups.items()}
        results, errors = exchange(pools, wire_lists, encode, decode, lambda w: len(w) + 1)
        found: dict[Key, Any] = {}
        for node_id, replies in results.items():
            originals = groups[node_id]
            for reply in replies:
                for wire, value in reply.items():
                    key = originals.get(wire)
                    if key is None:
                        continue  # not asked for: never hand back a value under another key
                    found[key] = (value[0], CasToken(value[1], node_id)) if with_cas else value
        self._settle(targets, errors, down, what, reading=True)
        for _, exc in refused:  # values the serde could not read: misses, or raised
            if not self._miss(exc, reading=True):
                raise exc
            self._membership.emit(Event("error", "", str(exc), exc))
        if topology.previous is not None and not with_cas and len(found) < len(hashed):
            owner_of = topology.ring.node_for
            misses = [
                (hash_key, wire, topology.nodes[owner_of(hash_key)])
                for key, hash_key, wire in hashed
                if key not in found
            ]
            warmed = self._warm(topology, misses)
            for key, _, wire in hashed:
                if wire in warmed:
                    found[key] = warmed[wire]
        return found

    def get_many(self, keys: Iterable[Key]) -> dict[Key, Any]:
        """The cached values of ``keys`` (absent keys are left out), from all nodes at once."""
        return self._fetch(keys, with_cas=False)

    def gets_many(self, keys: Iterable[Key]) -> dict[Key, tuple[Any, CasToken]]:
        """``{key: (value, cas_token)}`` for the cached ``keys``, from all nodes at once."""
        return self._fetch(keys, with_cas=True)

    def set_many(
        self,
        values: Mapping[Any, Any] | Iterable[tuple[Any, Any]],
        expire: int = 0,
        noreply: bool | None = None,
        flags: int | None = None,
    ) -> list[Key]:
        """Store every item, on all nodes at once; returns the keys that were not stored.

        Every key and value is checked and serialized before anything is sent. A value over a node's
        item size limit raises ``ValueTooLargeError`` naming its key, after the others are stored.
        """
        items = list(values.items() if isinstance(values, Mapping) else values)
        if noreply is None:
            noreply = self._default_noreply
        capped = self._membership.capped_ttl(expire) if isinstance(expire, int) else expire
        hashed = self._hashed(key for key, _ in items)
        normal: dict[bytes, bytes] = {}
        value_of: dict[bytes, Any] = {}
        for (_, _, wire), (_, value) in zip(hashed, items, strict=True):
            normal[wire] = self._store_command(b"set", wire, value, expire, flags, noreply)
            value_of[wire] = value
        topology = self._membership.topology
        if topology.previous is not None:  # during a window the previous owners' copies go first
            owner_of = topology.ring.node_for
            self._forget_previous(topology, [(h, w, topology.nodes[owner_of(h)]) for _, h, w in hashed])
        targets, groups, moved, down = self._plan(hashed, WRITE, "set_many")
        commands: dict[str, list[tuple[bytes, bytes]]] = {}
        for node_id, group in groups.items():
            commands[node_id] = [
                (wire, normal[wire] if wire not in moved else
                 self._store_command(b"set", wire, value_of[wire], capped, flags, noreply))
                for wire in group
            ]  # fmt: skip

        def encode(chunk: Sequence[tuple[bytes, bytes]]) -> bytes:
            return b"".join(command for _, command in chunk)

        def decode(reader: Reader, chunk: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, Any]]:
            return list(zip((wire for wire, _ in chunk), read_stored(reader, len(chunk)), strict=True))

        pools = {node_id: node.pool for node_id, node in targets.items()}
        results, errors = exchange(pools, commands, encode, None if noreply else decode, lambda c: len(c[1]))
        originals = {wire: key for group in groups.values() for wire, key in group.items()}
        stored = {
            wire for replies in results.values() for reply in replies for wire, ok in reply if ok is True
        }
        refused = [
            (originals[wire], node_id, outcome)
            for node_id, replies in results.items()
            for reply in replies
            for wire, outcome in reply
            if isinstance(outcome, Exception)
        ]
        if noreply:
            stored = {wire for node_id, group in groups.items() if node_id not in errors for wire in group}
        failed = [key for key, _, wire in hashed if wire not in stored]
        self._settle(
            targets, errors, down, "set_many", reading=False, fenced={n: list(g) for n, g in groups.items()}
        )
        too_large = []
        for key, node_id, exc in refused:
            err = node_failure(exc, node_id, "set_many", key)
            if isinstance(err, ValueTooLargeError):
                too_large.append((key, node_id, exc, err))
            else:  # SERVER_ERROR (e.g. out of memory): a node failure like any other
                self._call_failed(targets[node_id], exc, "set_many", key, None)
        if too_large:  # the caller's data, not a node failure: always raised
            key, node_id, exc, err = too_large[0]
            others = [k for k, _, _, _ in too_large[1:]]
            more = f" (and {len(others)} more: {others!r})" if others else ""
            raise ValueTooLargeError(f"{err}{more}", key, node_id, failed) from exc
        return failed

    def delete_many(self, keys: Iterable[Key], noreply: bool | None = None) -> bool:
        """Delete every key, on all nodes at once. True (as pymemcache) unless a node failed.

        Keys whose node is down or failed are fenced, as with ``delete``.
        """
        if noreply is None:
            noreply = self._default_noreply
        hashed = self._hashed(keys)
        topology = self._membership.topology
        if topology.previous is not None:  # during a window the previous owners' copies go first
            owner_of = topology.ring.node_for
            self._forget_previous(topology, [(h, w, topology.nodes[owner_of(h)]) for _, h, w in hashed])
        targets, groups, _, down = self._plan(hashed, WRITE, "delete_many")
        pools = {node_id: node.pool for node_id, node in targets.items()}
        wire_lists = {node_id: list(group) for node_id, group in groups.items()}
        errors = delete_everywhere(pools, wire_lists, noreply=noreply)
        self._settle(targets, errors, down, "delete_many", reading=False, fenced=wire_lists)
        return not errors and not down

    # -- cluster-wide commands --------------------------------------------------------------------
    def flush_all(self, delay: int = 0, noreply: bool | None = None) -> dict[str, bool]:
        """Invalidate every item on every node (after ``delay`` seconds): ``{node_id: ok}``.

        A node that is down or fails is flushed when it returns (its reads miss until then).
        """
        integer_arg(delay, "delay")
        topology = self._membership.topology
        nodes = {**topology.nodes, **topology.gutter_nodes}  # gutter copies are cached values too
        for node in nodes.values():
            if node.health.state != UP:
                node.fence.overflow()  # flushed on its return; every read misses until then
        results = self._each_node("flush_all", lambda c: bool(c.flush_all(delay, noreply)), False, nodes)
        for node_id, ok in results.items():
            if not ok:
                nodes[node_id].fence.overflow()
        return results

    def stats(self, *args: str) -> dict[str, dict[bytes, Any]]:
        """``stats [args]`` on every node: ``{node_id: {name: value}}``."""
        return self._each_node("stats", lambda c: dict(c.stats(*args)), {})

    def version(self) -> dict[str, bytes]:
        """The memcached version of every node: ``{node_id: b"1.6.18"}``."""
        return self._each_node("version", lambda c: bytes(c.version()), b"")

    def cache_memlimit(self, memlimit: int) -> dict[str, bool]:
        """Set every node's memory limit, in megabytes: ``{node_id: ok}``."""
        integer_arg(memlimit, "memlimit")
        return self._each_node("cache_memlimit", lambda c: bool(c.cache_memlimit(memlimit)), False)

    # -- lifecycle and mapping protocol -----------------------------------------------------------
    def quit(self) -> None:
        """pymemcache's ``quit``: close the connections (the server side closes too)."""
        self.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __getitem__(self, key: Key) -> Any:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            raise KeyError(key)
        return value

    def __setitem__(self, key: Key, value: Any) -> None:
        self.set(key, value)

    def __delitem__(self, key: Key) -> None:
        self.delete(key)

    def __repr__(self) -> str:
        return f"shardcache.Client({list(self.nodes)!r}, hashing={self.ring.hashing!r})"


_MISSING = object()
_CAS_REPLIES: dict[bytes, bool | None] = {b"STORED": True, b"EXISTS": False, b"NOT_FOUND": None}


def _cas_unique(cas: object) -> bytes:
    """A CAS token as protocol text: digits only (bytes, str or int, as pymemcache takes them)."""
    if isinstance(cas, int) and not isinstance(cas, bool) and cas >= 0:
        return b"%d" % cas
    text = cas.encode("ascii", "replace") if isinstance(cas, str) else cas
    if isinstance(text, bytes) and text.isdigit():
        return bytes(text)
    raise ArgumentError(f"cas must be a token from gets (digits), got {cas!r}")


_CREATE_ATTEMPTS = 8
