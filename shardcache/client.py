"""The sharded client: pymemcache's method set over a consistent-hash ring of memcached nodes.

Each key is validated once, routed by the ring (the key prefix is not hashed unless
``hash_key_prefix=True``, as in libmemcached) and sent to its node over a pooled pymemcache
connection. Multi-key calls group their keys by node and pipeline all nodes at once, so they cost
about one round trip however many nodes they touch. A node that is down costs no time: its keys
follow the failover policy at once (see ``shardcache.membership`` for fencing).
"""

from __future__ import annotations

import builtins
import inspect
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import ModuleType, TracebackType
from typing import Any, TypeVar

from pymemcache.client.base import Client as PymemcacheClient
from pymemcache.serde import LegacyWrappingSerde

from shardcache._config import (
    BAD_KEY_BYTE,
    MAX_KEY_LENGTH,
    check_choice,
    check_int,
    check_prefix,
    check_seconds,
    integer_arg,
    key_problem,
    unknown_option,
)
from shardcache._pool import NodePool, node_failure
from shardcache._wire import Reader, exchange, read_deleted, read_stored, read_values
from shardcache.errors import (
    ConfigurationError,
    KeyValidationError,
    NodeUnavailableError,
    ProtocolError,
    SerializationError,
    ServerError,
    ValueTooLargeError,
)
from shardcache.health import UP, Clock, Event, HealthPolicy
from shardcache.membership import FAILOVER_POLICIES, Membership, Node, Topology
from shardcache.nodes import NodeSpec, NodeSpecLike, parse_nodes
from shardcache.ring import Ring
from shardcache.serde import Serde, default_serde

__all__ = ["CasToken", "Client"]

Key = str | bytes
T = TypeVar("T")

_READ, _WRITE, _COUNTER = 0, 1, 2


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


class Client:
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
    ``"gutter"`` (the ``gutter_servers``), with TTLs capped at ``failover_ttl_s``. Before it serves
    again it is fenced (the keys changed while it was away are deleted on it; past
    ``fence_max_keys`` it is flushed), so it never serves a value older than the last write.

    pymemcache's ``ignore_exc=True`` means ``on_error="miss"``; ``use_pooling`` and
    ``lock_generator`` are accepted and ignored (shardcache always pools, without locks).
    """

    def __init__(
        self,
        servers: Iterable[NodeSpecLike] | str,
        *,
        hashing: str = "mmh3",
        ketama_naming: str = "libmemcached",
        hash_key_prefix: bool = False,
        serde: Serde | None = None,
        serializer: Callable[[Any, Any], tuple[Any, int]] | None = None,
        deserializer: Callable[[Any, bytes, int], Any] | None = None,
        connect_timeout: float | None = 1.0,
        timeout: float | None = 1.0,
        no_delay: bool = True,
        socket_module: ModuleType = socket,
        socket_keepalive: Any = None,
        key_prefix: str | bytes = b"",
        default_noreply: bool = False,
        allow_unicode_keys: bool = False,
        encoding: str = "ascii",
        tls_context: Any = None,
        max_pool_size: int | None = None,
        pool_idle_timeout: float = 0,
        on_error: str = "raise",
        failover: str = "fail_fast",
        failure_threshold: int = 2,
        retry_interval_s: float = 1.0,
        max_retry_interval_s: float = 30.0,
        failover_ttl_s: int = 60,
        gutter_servers: Iterable[NodeSpecLike] | str | None = None,
        fence_max_keys: int = 10_000,
        clock: Clock = time.monotonic,
        ignore_exc: bool = False,
        use_pooling: bool = True,
        lock_generator: Any = None,
        **unknown: Any,
    ) -> None:
        if unknown:
            raise unknown_option(unknown, _OPTION_NAMES)
        check_seconds("connect_timeout", connect_timeout, allow_none=True)
        check_seconds("timeout", timeout, allow_none=True)
        check_seconds("pool_idle_timeout", pool_idle_timeout)
        check_int("max_pool_size", max_pool_size, minimum=1, allow_none=True)
        check_choice("on_error", on_error, ("raise", "miss"))
        check_choice("failover", failover, FAILOVER_POLICIES)
        check_int("failover_ttl_s", failover_ttl_s, minimum=1)
        check_int("fence_max_keys", fence_max_keys, minimum=0)
        policy = HealthPolicy(
            failure_threshold=failure_threshold,
            retry_interval_s=retry_interval_s,
            max_retry_interval_s=max(max_retry_interval_s, retry_interval_s)
            if isinstance(retry_interval_s, int | float) and isinstance(max_retry_interval_s, int | float)
            else max_retry_interval_s,
        )
        if serde is None:
            serde = (
                LegacyWrappingSerde(serializer, deserializer)
                if serializer is not None or deserializer is not None
                else default_serde
            )
        elif not (
            callable(getattr(serde, "serialize", None)) and callable(getattr(serde, "deserialize", None))
        ):
            raise ConfigurationError(f"serde={serde!r}: needs serialize() and deserialize() methods")
        self._prefix = check_prefix(key_prefix)
        self._hash_prefix = bool(hash_key_prefix)
        self._key_encoding = "utf-8" if allow_unicode_keys else "ascii"
        self._serde: Serde = serde
        self._encoding = encoding
        self._default_noreply = bool(default_noreply)
        self._miss_on_error = on_error == "miss" or bool(ignore_exc)
        self._connection_options: dict[str, Any] = {
            "serde": serde,
            "connect_timeout": connect_timeout,
            "timeout": timeout,
            "no_delay": no_delay,
            "socket_module": socket_module,
            "socket_keepalive": socket_keepalive,
            "key_prefix": b"",
            "default_noreply": self._default_noreply,
            "allow_unicode_keys": True,  # keys are validated and encoded here, before pymemcache
            "encoding": encoding,
            "tls_context": tls_context,
        }
        self._max_idle = max_pool_size
        self._idle_timeout = float(pool_idle_timeout)
        ring = Ring(servers, hashing=hashing, ketama_naming=ketama_naming)
        gutter_ring = self._gutter_ring(failover, gutter_servers, ring, hashing)
        self._membership = Membership(
            ring,
            make_pool=self._make_pool,
            probe_connection=self._connection,
            policy=policy,
            failover=failover,
            failover_ttl_s=failover_ttl_s,
            gutter_ring=gutter_ring,
            fence_max_keys=fence_max_keys,
            clock=clock,
        )

    @staticmethod
    def _gutter_ring(
        failover: str, gutter_servers: Iterable[NodeSpecLike] | str | None, ring: Ring, hashing: str
    ) -> Ring | None:
        if gutter_servers is None or (not isinstance(gutter_servers, str) and not list(gutter_servers)):
            if failover == "gutter":
                raise ConfigurationError("failover='gutter' needs gutter_servers: a list of memcached nodes")
            return None
        gutter = parse_nodes(gutter_servers)
        shared = [spec.node_id for spec in gutter if spec.node_id in ring]
        if shared:
            raise ConfigurationError(f"gutter_servers: {shared[0]!r} is also a ring member")
        return Ring(list(gutter), hashing=hashing)

    def _connection(self, spec: NodeSpec) -> PymemcacheClient:
        return PymemcacheClient(spec.address, **self._connection_options)

    def _make_pool(self, spec: NodeSpec) -> NodePool:
        return NodePool(
            spec.node_id,
            lambda: self._connection(spec),
            max_idle=self._max_idle,
            idle_timeout=self._idle_timeout,
        )

    # -- keys and routing -------------------------------------------------------------------------

    def _wire_key(self, key: Key) -> tuple[bytes, bytes]:
        """``(hashed key, key as sent)``; ``KeyValidationError`` naming the key if it is unsafe."""
        if type(key) is str:
            try:
                raw = key.encode(self._key_encoding)
            except UnicodeEncodeError:
                hint = (
                    ": pass allow_unicode_keys=True for UTF-8 keys" if self._key_encoding == "ascii" else ""
                )
                raise KeyValidationError(f"key {key!r} is not {self._key_encoding}{hint}") from None
        elif isinstance(key, bytes | bytearray | memoryview):
            raw = bytes(key)
        else:
            raise KeyValidationError(f"key must be str or bytes, got {type(key).__name__}: {key!r}")
        wire = self._prefix + raw if self._prefix else raw
        if not raw or len(wire) > MAX_KEY_LENGTH or BAD_KEY_BYTE(wire):
            raise KeyValidationError(key_problem(key, raw, wire))
        return (wire if self._hash_prefix else raw), wire

    def node_for(self, key: Key) -> str:
        """The id of the node that owns ``key`` on the ring (whatever its health)."""
        return self._membership.topology.ring.node_for(self._wire_key(key)[0])

    @property
    def nodes(self) -> tuple[str, ...]:
        """The node ids, in the order they were configured."""
        return self._membership.topology.ring.nodes

    @property
    def ring(self) -> Ring:
        """The current ring (an immutable value)."""
        return self._membership.topology.ring

    def node_states(self) -> dict[str, str]:
        """``{node_id: "up" | "down" | "probing"}`` for every ring node."""
        return self._membership.node_states()

    def node_counters(self) -> dict[str, dict[str, int]]:
        """Per node: ``ops``, ``errors``, ``timeouts``, ``failovers``, ``state_changes``."""
        return {node_id: node.counters() for node_id, node in self._membership.topology.nodes.items()}

    def add_listener(self, callback: Callable[[Event], None]) -> None:
        """Call ``callback(event)`` on every ``shardcache.Event``: node_down, node_up, failover,
        error, fenced. Callbacks run on the thread that saw the event; exceptions are logged."""
        self._membership.add_listener(callback)

    def remove_listener(self, callback: Callable[[Event], None]) -> None:
        """Stop calling ``callback``."""
        self._membership.remove_listener(callback)

    # -- failures ---------------------------------------------------------------------------------

    def _miss(self, err: BaseException, *, reading: bool) -> bool:
        """True if ``err`` is to become a miss (on_error='miss'); False if it must be raised."""
        if not self._miss_on_error:
            return False
        return isinstance(err, NodeUnavailableError | ServerError | ProtocolError) or (
            reading and isinstance(err, SerializationError)
        )

    def _down(self, node: Node, what: str) -> NodeUnavailableError:
        return NodeUnavailableError(
            f"memcached node {node.node_id} is {node.health.state} "
            f"({what}; failover={self._membership.failover})",
            node.node_id,
        )

    def _route(
        self, topology: Topology, node: Node, hash_key: bytes, wire: bytes, kind: int, what: str
    ) -> Node | None:
        """Where a call for ``node``'s key goes when ``node`` is not ready; None: nowhere (a miss).

        Raises (``on_error="raise"``) when the node is down and the policy has no stand-in.
        """
        membership = self._membership
        if node.health.state == UP:  # up, with keys still to forget
            if kind == _READ and wire in node.fence:
                return None
            return node
        target = membership.stand_in(topology, node, hash_key, counter=kind == _COUNTER)
        if target is None:
            if kind != _READ:
                node.fence.add(wire)  # the write did not happen: the node's old value must go
            if self._miss_on_error:
                return None
            raise self._down(node, what)
        membership.stood_in(node, target, wire)
        return target

    def _run(
        self,
        key: Key,
        what: str,
        call: Callable[[PymemcacheClient, bytes, Node, bool], T],
        missed: T,
        kind: int,
    ) -> T:
        """Run ``call(connection, wire_key, target, stand_in)`` on the node serving ``key``."""
        hash_key, wire = self._wire_key(key)
        topology = self._membership.topology
        node = topology.nodes[topology.ring.node_for(hash_key)]
        target = node
        if not node.ready:
            routed = self._route(topology, node, hash_key, wire, kind, what)
            if routed is None:
                return missed
            target = routed
        target.ops += 1
        pool = target.pool
        conn = pool.acquire()
        try:
            result = call(conn, wire, target, target is not node)
        except Exception as exc:
            pool.discard(conn)
            err = self._membership.failed(target, exc, what, key, None if kind == _READ else wire)
            if self._miss(err, reading=kind == _READ):
                return missed
            if err is exc:
                raise
            raise err from exc
        pool.release(conn)
        if target.health.failures:
            target.health.record_success()
        return result

    # -- single-key commands ----------------------------------------------------------------------

    def get(self, key: Key, default: Any = None) -> Any:
        """The value of ``key``, or ``default`` if it is not cached."""
        hash_key, wire = self._wire_key(key)
        topology = self._membership.topology
        node = topology.nodes[topology.ring.node_for(hash_key)]
        if not node.ready:
            return self._run(key, "get", lambda c, k, t, s: c.get(k, default), default, _READ)
        node.ops += 1
        pool = node.pool
        conn = pool.acquire()
        try:
            value = conn.get(wire, default)
        except Exception as exc:
            pool.discard(conn)
            err = self._membership.failed(node, exc, "get", key, None)
            if self._miss(err, reading=True):
                return default
            if err is exc:
                raise
            raise err from exc
        pool.release(conn)
        if node.health.failures:
            node.health.record_success()
        return value

    def set(
        self, key: Key, value: Any, expire: int = 0, noreply: bool | None = None, flags: int | None = None
    ) -> bool:
        """Store ``value`` under ``key`` for ``expire`` seconds (0: no expiry). True if stored."""
        hash_key, wire = self._wire_key(key)
        topology = self._membership.topology
        node = topology.nodes[topology.ring.node_for(hash_key)]
        if not node.ready:
            capped = self._membership.capped_ttl

            def call(c: PymemcacheClient, k: bytes, t: Node, stand_in: bool) -> bool:
                return bool(c.set(k, value, capped(expire) if stand_in else expire, noreply, flags))

            return self._run(key, "set", call, False, _WRITE)
        node.ops += 1
        pool = node.pool
        conn = pool.acquire()
        try:
            stored = conn.set(wire, value, expire, noreply, flags)
        except Exception as exc:
            pool.discard(conn)
            err = self._membership.failed(node, exc, "set", key, wire)
            if self._miss(err, reading=False):
                return False
            if err is exc:
                raise
            raise err from exc
        pool.release(conn)
        if node.health.failures:
            node.health.record_success()
        return bool(stored)

    def _store(
        self, name: str, key: Key, value: Any, expire: int, noreply: bool | None, flags: int | None
    ) -> bool:
        capped = self._membership.capped_ttl

        def call(c: PymemcacheClient, k: bytes, t: Node, stand_in: bool) -> bool:
            return bool(getattr(c, name)(k, value, capped(expire) if stand_in else expire, noreply, flags))

        return self._run(key, name, call, False, _WRITE)

    def add(
        self, key: Key, value: Any, expire: int = 0, noreply: bool | None = None, flags: int | None = None
    ) -> bool:
        """Store ``value`` only if ``key`` is absent. True if stored."""
        return self._store("add", key, value, expire, noreply, flags)

    def replace(
        self, key: Key, value: Any, expire: int = 0, noreply: bool | None = None, flags: int | None = None
    ) -> bool:
        """Store ``value`` only if ``key`` is present. True if stored."""
        return self._store("replace", key, value, expire, noreply, flags)

    def append(
        self, key: Key, value: Any, expire: int = 0, noreply: bool | None = None, flags: int | None = None
    ) -> bool:
        """Append ``value`` (serialized) to the stored bytes of ``key``. True if it was present."""
        return self._store("append", key, value, expire, noreply, flags)

    def prepend(
        self, key: Key, value: Any, expire: int = 0, noreply: bool | None = None, flags: int | None = None
    ) -> bool:
        """Prepend ``value`` (serialized) to the stored bytes of ``key``. True if it was present."""
        return self._store("prepend", key, value, expire, noreply, flags)

    def gets(self, key: Key, default: Any = None, cas_default: Any = None) -> tuple[Any, Any]:
        """``(value, cas_token)`` of ``key``, or ``(default, cas_default)`` if it is not cached.

        The token is a ``CasToken``: it remembers the node that issued it.
        """
        missing = (default, cas_default)

        def call(c: PymemcacheClient, k: bytes, target: Node, stand_in: bool) -> tuple[Any, Any]:
            value, token = c.gets(k, default, None)
            return missing if token is None else (value, CasToken(token, target.node_id))

        return self._run(key, "gets", call, missing, _READ)

    def cas(
        self, key: Key, value: Any, cas: Any, expire: int = 0, noreply: bool = False, flags: int | None = None
    ) -> bool | None:
        """Store ``value`` if ``key`` is unchanged since ``gets`` returned ``cas``.

        True: stored. False: the key changed, or the token was issued by a node that does not serve
        the key now (the ring changed or a failover happened): re-read and retry. None: absent.
        """
        capped = self._membership.capped_ttl

        def call(c: PymemcacheClient, k: bytes, target: Node, stand_in: bool) -> bool | None:
            if isinstance(cas, CasToken) and cas.node_id != target.node_id:
                return False  # a token only means something on the node that issued it
            result: bool | None = c.cas(k, value, cas, capped(expire) if stand_in else expire, noreply, flags)
            return result

        conflict: bool | None = False
        return self._run(key, "cas", call, conflict, _WRITE)

    def delete(self, key: Key, noreply: bool | None = None) -> bool:
        """Delete ``key``. True if it was deleted (always True with noreply).

        If the node is down or the delete fails, the key is fenced: it is deleted on the node
        before that node serves it again, so an invalidation is never lost.
        """
        return self._run(key, "delete", lambda c, k, t, s: bool(c.delete(k, noreply)), False, _WRITE)

    def incr(self, key: Key, value: int, noreply: bool | None = False) -> int | None:
        """Add ``value`` to the counter at ``key``: the new value, or None if ``key`` is absent.

        memcached counters are unsigned 64-bit integers stored as decimal text: ``incr`` wraps around
        at 2**64, and a value that is not a number raises ``CommandError``. Counters are never moved
        to a stand-in node while theirs is down: the call misses (or raises) instead.
        """
        result: int | None = self._run(
            key, "incr", lambda c, k, t, s: c.incr(k, value, noreply), None, _COUNTER
        )
        return result

    def decr(self, key: Key, value: int, noreply: bool | None = False) -> int | None:
        """Subtract ``value`` from the counter at ``key`` (floored at 0): the new value, or None."""
        result: int | None = self._run(
            key, "decr", lambda c, k, t, s: c.decr(k, value, noreply), None, _COUNTER
        )
        return result

    def touch(self, key: Key, expire: int = 0, noreply: bool | None = None) -> bool:
        """Set a new expiry on ``key``. True if it exists."""
        capped = self._membership.capped_ttl
        return self._run(
            key,
            "touch",
            lambda c, k, t, s: bool(c.touch(k, capped(expire) if s else expire, noreply)),
            False,
            _WRITE,
        )

    # -- multi-key commands -----------------------------------------------------------------------

    def _plan(
        self, keys: Iterable[Key], kind: int, what: str
    ) -> tuple[dict[str, Node], dict[str, dict[bytes, Key]], builtins.set[bytes], dict[str, BaseException]]:
        """Validate every key, then route it: targets, ``{target: {wire: key}}``, the wires going to
        stand-ins, and the failures of nodes that are down with no stand-in."""
        hashed = [(key, *self._wire_key(key)) for key in keys]
        topology = self._membership.topology
        node_for = topology.ring.node_for
        targets: dict[str, Node] = {}
        groups: dict[str, dict[bytes, Key]] = {}
        moved: builtins.set[bytes] = builtins.set()
        down: dict[str, BaseException] = {}
        for key, hash_key, wire in hashed:
            node = topology.nodes[node_for(hash_key)]
            target = node
            if not node.ready:
                try:
                    routed = self._route(topology, node, hash_key, wire, kind, what)
                except NodeUnavailableError as exc:
                    down.setdefault(node.node_id, exc)
                    continue
                if routed is None:
                    continue
                if routed is not node:
                    moved.add(wire)
                target = routed
            group = groups.get(target.node_id)
            if group is None:
                targets[target.node_id] = target
                groups[target.node_id] = {wire: key}
            else:
                group[wire] = key
        for target in targets.values():
            target.ops += 1
        return targets, groups, moved, down

    def _settle(
        self, targets: Mapping[str, Node], errors: Mapping[str, Exception], down: Mapping[str, BaseException],
        what: str, *, reading: bool, fenced: Mapping[str, Iterable[bytes]] | None = None,
    ) -> None:  # fmt: skip
        """Report the failures of a multi-key call; raise the first unless on_error='miss'."""
        first: tuple[BaseException, BaseException] | None = None
        for node_id, exc in errors.items():
            node = targets[node_id]
            err = self._membership.failed(node, exc, what, None, None)
            if fenced is not None and isinstance(err, NodeUnavailableError | ProtocolError):
                for wire in fenced[node_id]:
                    node.fence.add(wire)
            if not self._miss(err, reading=reading) and first is None:
                first = (err, exc)
        if first is None and down and not self._miss_on_error:
            raise next(iter(down.values()))
        if first is not None:
            translated, original = first
            if translated is original:
                raise translated
            raise translated from original
        for target in targets.values():
            if target.health.failures and target.node_id not in errors:
                target.health.record_success()

    def _fetch(self, keys: Iterable[Key], with_cas: bool) -> dict[Key, Any]:
        what = "gets_many" if with_cas else "get_many"
        targets, groups, _, down = self._plan(keys, _READ, what)
        if not groups and not down:
            return {}
        deserialize = self._serde.deserialize
        command = b"gets " if with_cas else b"get "

        def encode(wires: Sequence[bytes]) -> bytes:
            return command + b" ".join(wires) + b"\r\n"

        def decode(reader: Reader, wires: Sequence[bytes]) -> dict[bytes, Any]:
            return read_values(reader, 1, deserialize, with_cas)

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
        integer_arg(expire, "expire")
        capped = b"%d" % self._membership.capped_ttl(expire)
        suffix = b" noreply\r\n" if noreply else b"\r\n"
        serialize = self._serde.serialize
        encoding = self._encoding
        payloads: dict[bytes, tuple[int, bytes]] = {}
        for key, value in items:
            wire = self._wire_key(key)[1]
            data, data_flags = serialize(wire, value)
            if not isinstance(data, bytes):
                data = str(data).encode(encoding)
            payloads[wire] = (data_flags if flags is None else flags, data)
        targets, groups, moved, down = self._plan((key for key, _ in items), _WRITE, "set_many")
        expire_text = b"%d" % expire
        commands: dict[str, list[tuple[bytes, bytes]]] = {}
        for node_id, group in groups.items():
            batch = commands[node_id] = []
            for wire in group:
                data_flags, data = payloads[wire]
                ttl = capped if wire in moved else expire_text
                header = b"set %b %d %b %d%b" % (wire, data_flags, ttl, len(data), suffix)
                batch.append((wire, header + data + b"\r\n"))

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
        failed = [key for key, _ in items if self._wire_key(key)[1] not in stored]
        self._settle(
            targets, errors, down, "set_many", reading=False, fenced={n: list(g) for n, g in groups.items()}
        )
        if refused:
            key, node_id, exc = refused[0]
            err = node_failure(exc, node_id, "set_many", key)
            if isinstance(err, ValueTooLargeError) and len(refused) > 1:
                others = [k for k, _, _ in refused[1:]]
                err = ValueTooLargeError(f"{err} (and {len(others)} more: {others!r})", key, node_id)
            raise err from exc
        return failed

    def delete_many(self, keys: Iterable[Key], noreply: bool | None = None) -> bool:
        """Delete every key, on all nodes at once. True (as pymemcache) unless a node failed.

        Keys whose node is down or failed are fenced, as with ``delete``.
        """
        if noreply is None:
            noreply = self._default_noreply
        targets, groups, _, down = self._plan(keys, _WRITE, "delete_many")
        suffix = b" noreply\r\n" if noreply else b"\r\n"

        def encode(wires: Sequence[bytes]) -> bytes:
            return b"".join(b"delete " + wire + suffix for wire in wires)

        def decode(reader: Reader, wires: Sequence[bytes]) -> list[bool]:
            return read_deleted(reader, len(wires))

        pools = {node_id: node.pool for node_id, node in targets.items()}
        wire_lists = {node_id: list(group) for node_id, group in groups.items()}
        _, errors = exchange(pools, wire_lists, encode, None if noreply else decode, lambda w: len(w) + 9)
        self._settle(targets, errors, down, "delete_many", reading=False, fenced=wire_lists)
        return not errors and not down

    # -- cluster-wide commands --------------------------------------------------------------------

    def _each_node(self, what: str, call: Callable[[PymemcacheClient], T], fallback: T) -> dict[str, T]:
        nodes = self._membership.topology.nodes
        results: dict[str, T] = {}
        errors: dict[str, Exception] = {}
        down: dict[str, BaseException] = {}
        for node_id, node in nodes.items():
            results[node_id] = fallback
            if node.health.state != UP:
                down[node_id] = self._down(node, what)
                continue
            conn = node.pool.acquire()
            try:
                results[node_id] = call(conn)
            except Exception as exc:
                node.pool.discard(conn)
                errors[node_id] = exc
            else:
                node.pool.release(conn)
        self._settle(nodes, errors, down, what, reading=False)
        return results

    def flush_all(self, delay: int = 0, noreply: bool | None = None) -> dict[str, bool]:
        """Invalidate every item on every node (after ``delay`` seconds): ``{node_id: ok}``.

        A node that is down or fails is flushed before it serves again.
        """
        integer_arg(delay, "delay")
        nodes = self._membership.topology.nodes
        for node in nodes.values():
            if node.health.state != UP:
                node.fence.overflow()  # flushed before it serves again
        results = self._each_node("flush_all", lambda c: bool(c.flush_all(delay, noreply)), False)
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

    def close(self) -> None:
        """Close idle connections and stop the prober. The client stays usable: it reconnects."""
        self._membership.close()

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
_OPTION_NAMES = [p for p in inspect.signature(Client.__init__).parameters if p not in ("self", "unknown")]
