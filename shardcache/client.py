"""The sync client: pymemcache's method set over a consistent-hash ring of memcached nodes.

``Client`` is a thin shell, built by composition: each method validates nothing itself, it picks the
flow that implements the command (``shardcache._commands`` for one key, ``shardcache._batch`` for
many keys and every node, ``shardcache.recipes`` for the race-free patterns) and runs it on the
sync :class:`~shardcache._executor.Executor`. The pieces, wired once in ``__init__``:

- :class:`~shardcache._options.Options`: every option, parsed and checked once (frozen);
- :class:`~shardcache._membership.Membership`: the current topology (ring + nodes + health),
  swapped atomically on ``add_node``/``remove_node``/``set_nodes``, and the prober;
- :class:`~shardcache._router.Router`: pure decisions (owner, stand-in, miss, error; fencing);
- :class:`~shardcache._executor.Executor`: pools, sockets, deadlines, failure reporting;
- :class:`~shardcache.discovery.Poller`: the optional ``discovery=`` thread.

A key's path reads one way: client -> flow (validate, route) -> executor -> protocol -> back.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, Final, ParamSpec, TypeVar

from shardcache import _batch, _rebalance, recipes
from shardcache import _commands as cmd
from shardcache._commands import UNAVAILABLE, CasToken, Engine
from shardcache._executor import Executor
from shardcache._rebalance import RebalanceReport
from shardcache._router import CallKind
from shardcache._wiring import Reconfigure, assemble
from shardcache.discovery import Poller
from shardcache.errors import ArgumentError
from shardcache.health import Event
from shardcache.nodes import NodeSpecLike, parse_nodes
from shardcache.ring import Ring

__all__ = ["CasToken", "Client"]

P = ParamSpec("P")
R = TypeVar("R")
Key = str | bytes

_MISSING: Final = object()
_REPLACE: Final = CallKind.REPLACING_WRITE


class Client:
    """A memcached client over many nodes, with pymemcache's methods; thread-safe.

    ``Client(servers, **options)``: ``servers`` is a list of node specs (``"host:port[:weight]"``,
    ``("host", port)``, ...). No connection is made until the first call. One instance is meant to be
    shared by all the threads of a process: each call borrows a connection from the node's pool.

    Placement: ``hashing`` (``"mmh3"`` | ``"ketama"``), ``ketama_naming``, ``hash_key_prefix`` (hash
    ``key_prefix`` too; default False, as libmemcached).

    Connections (as pymemcache): ``connect_timeout``, ``timeout`` (seconds, default 1.0 each;
    ``None`` waits forever; ``timeout`` is a deadline for the whole call, not for each read),
    ``no_delay`` (default True), ``socket_module``, ``socket_keepalive``, ``tls_context``,
    ``key_prefix``, ``allow_unicode_keys`` (UTF-8 keys; default ASCII only), ``encoding``;
    ``default_noreply`` (default False: replies are awaited, so failed writes are reported);
    ``max_pool_size`` (idle connections kept per node, default 16; None: no cap) and
    ``pool_idle_timeout`` (seconds; 0: never closed for idleness); ``max_item_size`` (bytes,
    default 1 MiB as memcached's ``-I``: a larger value in a reply is never buffered).

    Values: ``serde`` (``serialize(key, value) -> (bytes, flags)``, ``deserialize(key, data,
    flags)``), default ``shardcache.default_serde`` (bytes, str, int, JSON; never pickle);
    pymemcache's ``serializer``/``deserializer`` functions are accepted too.

    Failures: ``on_error="raise"`` (default) raises node failures; ``"miss"`` turns them into misses
    (reads return the default, writes return False); either way each one emits an ``"error"`` event
    and a log record on the ``shardcache`` logger. ``failure_threshold`` consecutive transport
    failures mark a node DOWN; it is probed ``retry_interval_s`` later, backing off up to
    ``max_retry_interval_s``. While it is down, ``failover`` decides where its keys go:
    ``"fail_fast"`` (default: nowhere, at once), ``"remap"`` (the next node on the ring, if it is up) or
    ``"gutter"`` (the ``gutter_servers``), with TTLs capped at ``failover_ttl_s``. When it answers
    again it is fenced (the keys changed while it was away are deleted on it, and miss until then;
    past ``fence_max_keys`` it is flushed), so it never serves a value older than the last write.
    Under ``remap``/``gutter`` this holds fleet-wide (outages published, read every
    ``fleet_refresh_s``, default 0.5, None: off; README, "Fleet-wide fencing").

    Membership: ``discovery`` (a callable returning a server list, e.g. ``dns_discovery(name)``),
    polled every ``discovery_interval_s`` in every process (restarted after ``fork``), applied with
    a warm-up of ``discovery_warmup_s``.

    pymemcache's ``ignore_exc=True`` means ``on_error="miss"``; ``use_pooling`` and
    ``lock_generator`` are accepted and ignored (shardcache always pools, without locks). Unknown
    options raise ``ConfigurationError`` with a "did you mean" hint.
    """

    def __init__(self, servers: Iterable[NodeSpecLike] | str, **options: Any) -> None:
        parts = assemble(servers, options, Executor, lambda executor: executor.run)
        executor = parts.executor
        self._events = parts.events
        self._membership = parts.membership
        self._core = parts.core
        weakref.finalize(self, self._membership.close)  # a dropped client's prober thread stops
        self._executor, self._run, self._request = executor, executor.run, executor.request  # fast paths
        self._engine = Engine(self._core, executor.run)
        self._reconfigure = Reconfigure(self._membership)
        self._poller: Poller | None = None
        opts = parts.options
        if opts.discovery is not None:
            warmup_s = float(opts.discovery_warmup_s)
            self._poller = Poller(
                opts.discovery,
                lambda servers: self.set_nodes(list(parse_nodes(servers)), warmup_s=warmup_s),
                float(opts.discovery_interval_s),
                self._events.emit,
            )

    # -- single-key commands ----------------------------------------------------------------------

    def get(self, key: Key, default: Any = None) -> Any:
        """The value of ``key``, or ``default`` if it is not cached."""
        value = cmd.get_now(self._core, self._request, key, default)
        return self._run(cmd.get(self._core, key, default)) if value is cmd.FLOW else value

    def set(
        self, key: Key, value: Any, expire: int = 0, noreply: bool | None = None, flags: int | None = None
    ) -> bool:
        """Store ``value`` under ``key`` for ``expire`` seconds (0: no expiry; negative: expired at
        once). True if stored."""
        done = cmd.store_now(self._core, self._request, b"set", key, value, expire, noreply, flags, _REPLACE)
        if done is cmd.FLOW:  # the key's node is away, or a ring change is in its windows
            done = self._run(cmd.store(self._core, b"set", key, value, expire, noreply, flags, _REPLACE))
        return done is True

    def add(
        self, key: Key, value: Any, expire: int = 0, noreply: bool | None = None, flags: int | None = None
    ) -> bool:
        """Store ``value`` only if ``key`` is absent. True if stored."""
        return self._store(b"add", key, value, expire, noreply, flags)

    def replace(
        self, key: Key, value: Any, expire: int = 0, noreply: bool | None = None, flags: int | None = None
    ) -> bool:
        """Store ``value`` only if ``key`` is present. True if stored."""
        return self._store(b"replace", key, value, expire, noreply, flags)

    def append(
        self, key: Key, value: Any, expire: int = 0, noreply: bool | None = None, flags: int | None = None
    ) -> bool:
        """Append ``value`` (serialized) to the stored bytes of ``key``. True if it was present."""
        return self._store(b"append", key, value, expire, noreply, flags)

    def prepend(
        self, key: Key, value: Any, expire: int = 0, noreply: bool | None = None, flags: int | None = None
    ) -> bool:
        """Prepend ``value`` (serialized) to the stored bytes of ``key``. True if it was present."""
        return self._store(b"prepend", key, value, expire, noreply, flags)

    def _store(
        self, command: bytes, key: Key, value: Any, expire: int, noreply: bool | None, flags: int | None,
        kind: CallKind = CallKind.WRITE,
    ) -> bool:  # fmt: skip
        result = cmd.store_now(self._core, self._request, command, key, value, expire, noreply, flags, kind)
        if result is cmd.FLOW:
            result = self._run(cmd.store(self._core, command, key, value, expire, noreply, flags, kind))
        return result is True

    def gets(self, key: Key, default: Any = None, cas_default: Any = None) -> tuple[Any, Any]:
        """``(value, cas_token)`` of ``key``, or ``(default, cas_default)`` if it is not cached.

        The token is a ``CasToken``: it remembers the node that issued it.
        """
        found = self._run(cmd.gets(self._core, key, CallKind.READ))
        if found is None or found is UNAVAILABLE:
            return default, cas_default
        return found  # type: ignore[no-any-return]

    def cas(
        self, key: Key, value: Any, cas: Any, expire: int = 0, noreply: bool = False, flags: int | None = None
    ) -> bool | None:
        """Store ``value`` if ``key`` is unchanged since ``gets`` returned ``cas``.

        True: stored. False: the key changed, or the token was issued by a node that does not serve
        the key now (the ring changed or a failover happened): re-read and retry. None: absent.
        ``cas`` is the token (a ``CasToken``, digits as bytes or str, or an int below 2**64).
        """
        if cas is None or isinstance(cas, bool):
            raise ArgumentError(f"cas must be a token from gets, got {cas!r}")
        result = self._run(
            cmd.store(self._core, b"cas", key, value, expire, noreply, flags, CallKind.WRITE, cas)
        )
        if result is UNAVAILABLE:
            return False
        return result  # type: ignore[no-any-return]

    def delete(self, key: Key, noreply: bool | None = None) -> bool:
        """Delete ``key``. True if it was deleted (always True with noreply).

        If the node is down or the delete fails, the key is fenced: it is deleted on the node
        before that node serves it again, so an invalidation is never lost.
        """
        return self._run(cmd.delete(self._core, key, noreply))

    def incr(
        self, key: Key, value: int, noreply: bool | None = False, *,
        initial: int | None = None, expire: int = 0,
    ) -> int | None:  # fmt: skip
        """Add ``value`` to the counter at ``key``: the new value, or None if ``key`` is absent.

        With ``initial``, an absent counter is **created at** ``initial`` **and** ``initial`` **is
        returned; the delta is not added** (memcached's and libmemcached's convention). So a hit
        counter that counts every hit is ``incr(key, 1, initial=1)``: the first call returns 1,
        the next 2. Creation is atomic (one meta-arithmetic round trip, or ``add`` during a
        warm-up window), so concurrent creators never overwrite each other's increments.

        memcached counters are unsigned 64-bit integers stored as decimal text: ``incr`` wraps at
        2**64, ``decr`` stops at 0, and a value that is not a number raises ``CommandError``. A
        counter is never moved to a stand-in node while its node is down: the call misses (or
        raises) instead, so no count restarts from zero elsewhere.
        """
        return self._run(
            cmd.counter(self._core, key, value, decr=False, noreply=noreply, initial=initial, expire=expire)
        )

    def decr(
        self, key: Key, value: int, noreply: bool | None = False, *,
        initial: int | None = None, expire: int = 0,
    ) -> int | None:  # fmt: skip
        """Subtract ``value`` from the counter at ``key`` (floored at 0): the new value, or None.

        ``initial`` and ``expire`` as for ``incr``: an absent counter is created at ``initial``,
        which is returned, the delta not subtracted.
        """
        return self._run(
            cmd.counter(self._core, key, value, decr=True, noreply=noreply, initial=initial, expire=expire)
        )

    def touch(self, key: Key, expire: int = 0, noreply: bool | None = None) -> bool:
        """Set a new expiry on ``key``. True if it exists."""
        return self._run(cmd.touch(self._core, key, expire, noreply))

    # -- race-free patterns (shardcache.recipes) ---------------------------------------------------

    def cas_update(
        self, key: Key, fn: Callable[[Any], Any], *, initial: Any = None, expire: int = 0,
        max_attempts: int = 64, backoff_s: float = 0.001, max_backoff_s: float = 0.05,
    ) -> Any:  # fmt: skip
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
        self, key: Key, factory: Callable[[], Any], *, expire: int = 0, lock_ttl_s: int = 10,
        wait_s: float | None = None,
    ) -> Any:  # fmt: skip
        """The cached value of ``key``; on a miss one caller across all processes runs ``factory``
        and stores its result while the others wait for it (stampede protection)."""
        return recipes.get_or_set(self, key, factory, expire=expire, lock_ttl_s=lock_ttl_s, wait_s=wait_s)

    def cached(
        self, *, expire: int = 0, key: Callable[..., Key] | str | None = None, lock_ttl_s: int = 10
    ) -> Callable[[Callable[P, R]], Callable[P, R]]:
        """Decorator caching a function's result (``get_or_set`` per call); see ``recipes.cached``."""
        return recipes.cached(self, expire=expire, key=key, lock_ttl_s=lock_ttl_s)

    # -- multi-key commands -----------------------------------------------------------------------

    def get_many(self, keys: Iterable[Key]) -> dict[Key, Any]:
        """The cached values of ``keys`` (absent keys are left out), from all nodes at once."""
        return self._run(_batch.fetch(self._core, keys, with_cas=False))

    def gets_many(self, keys: Iterable[Key]) -> dict[Key, tuple[Any, CasToken]]:
        """``{key: (value, cas_token)}`` for the cached ``keys``, from all nodes at once."""
        return self._run(_batch.fetch(self._core, keys, with_cas=True))

    def set_many(
        self, values: Mapping[Any, Any] | Iterable[tuple[Any, Any]], expire: int = 0,
        noreply: bool | None = None, flags: int | None = None,
    ) -> list[Key]:  # fmt: skip
        """Store every item, on all nodes at once; returns the keys that were not stored.

        Every key and value is checked and serialized before anything is sent. A value over a node's
        item size limit raises ``ValueTooLargeError`` naming its key, after the others are stored.
        """
        return self._run(_batch.set_many(self._core, values, expire, noreply, flags))

    def delete_many(self, keys: Iterable[Key], noreply: bool | None = None) -> bool:
        """Delete every key, on all nodes at once. True (as pymemcache) unless a node failed.

        Keys whose node is down or failed are fenced, as with ``delete``.
        """
        return self._run(_batch.delete_many(self._core, keys, noreply))

    # pymemcache's older names for the multi-key calls (its Client and HashClient have both)
    get_multi = get_many
    set_multi = set_many
    delete_multi = delete_many

    # -- cluster-wide commands --------------------------------------------------------------------

    def flush_all(self, delay: int = 0, noreply: bool | None = None) -> dict[str, bool]:
        """Invalidate every item on every node (after ``delay`` seconds): ``{node_id: ok}``.

        A node that is down or fails is flushed when it returns (its reads miss until then). The
        reply is always awaited (``noreply`` is accepted for pymemcache compatibility): whether a
        node was flushed decides whether it must be fenced.
        """
        return self._run(_batch.flush_all(self._core, delay))

    def stats(self, *args: str) -> dict[str, dict[bytes, Any]]:
        """``stats [args]`` on every node: ``{node_id: {name: value}}``."""
        return self._run(_batch.stats(self._core, args))

    def version(self) -> dict[str, bytes]:
        """The memcached version of every node: ``{node_id: b"1.6.18"}``."""
        return self._run(_batch.version(self._core))

    def cache_memlimit(self, memlimit: int) -> dict[str, bool]:
        """Set every node's memory limit, in megabytes: ``{node_id: ok}``."""
        return self._run(_batch.cache_memlimit(self._core, memlimit))

    # -- the ring and its nodes -------------------------------------------------------------------

    def node_for(self, key: Key) -> str:
        """The id of the node that owns ``key`` on the ring (whatever its health)."""
        return self._core.locate(self._membership.topology, key)[2].node_id

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
        """Call ``callback(event)`` on every ``shardcache.Event`` (its kinds: ``Event``'s docstring),
        on the thread that saw it (a request's, the prober's, discovery's, rebalance's); an
        exception in a callback is logged, never raised."""
        self._events.add_listener(callback)

    def remove_listener(self, callback: Callable[[Event], None]) -> None:
        """Stop calling ``callback``."""
        self._events.remove_listener(callback)

    def rebalance(
        self, *, batch: int = 500, keys_per_s: float | None = None, dry_run: bool = False,
        timeout_s: float = 60.0,
    ) -> RebalanceReport:  # fmt: skip
        """Delete the copies nodes hold of keys they no longer own (``timeout_s``: for each listing
        and batch); docs/consistency.md "Rebalance"."""
        run = self._executor.with_timeout(_rebalance.checked_timeout(timeout_s)).run
        return run(_rebalance.rebalance(self._core, batch, keys_per_s, dry_run))

    def add_node(self, spec: NodeSpecLike, *, warmup_s: float = 0.0) -> None:
        """Add a node. For ``warmup_s`` seconds a miss on a key that moved to it is read from the
        key's previous owner and copied over. With ``warmup_s=0`` moved keys miss, but for 60 s
        counters, ``cas_update`` and locks still bring their key over from its previous owner (so
        a count goes on and a held lock stays held; README "Scaling out and in").
        ``ConfigurationError`` if it is already present."""
        self._reconfigure.add_node(spec, warmup_s)

    def remove_node(self, node_id: str, *, drain_s: float = 0.0) -> None:
        """Remove a node. For ``drain_s`` seconds a miss on one of its keys is read from it while it
        still answers; with ``drain_s=0``, for 60 s counters, ``cas_update`` and locks still do
        (as for :meth:`add_node`). ``ConfigurationError`` if it is absent or the last node."""
        self._reconfigure.remove_node(node_id, drain_s)

    def set_nodes(
        self, servers: Iterable[NodeSpecLike] | str, *, warmup_s: float = 0.0
    ) -> tuple[list[str], list[str]]:
        """Reconcile to ``servers`` (added nodes warm up and removed ones drain for ``warmup_s``).

        Returns the node ids added and removed.
        """
        return self._reconfigure.set_nodes(servers, warmup_s)

    # -- lifecycle and mapping protocol -----------------------------------------------------------

    def close(self) -> None:
        """Close idle connections, stop the prober and discovery. Requests still work afterwards
        (connections reopen on demand, the prober restarts when needed); discovery does not."""
        if self._poller is not None:
            self._poller.close()
        self._membership.close()

    def quit(self) -> None:  # pymemcache's name for close
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
