"""The asyncio client: ``Client``'s methods as coroutines, over the same flows.

``AsyncClient`` is a command table like ``Client``: each method picks the flow that implements the
command (``shardcache._commands``, ``_batch``, ``recipes``) and awaits it on the
:class:`~shardcache._aexecutor.AsyncExecutor`. Options, routing, failover, fencing, warm-up, CAS
ownership, counters and locks are the sync client's own code (``shardcache._wiring`` builds the
same pieces); only the executor and the drivers of the prober and discovery (asyncio tasks,
``shardcache._aprober``) differ. The sync client's flow-less fast paths are not used here.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Iterable, Mapping
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

from shardcache import _batch, _rebalance, recipes
from shardcache import _commands as cmd
from shardcache._aconn import AsyncConnection
from shardcache._aexecutor import AsyncExecutor
from shardcache._aprober import AsyncDiscovery, AsyncProber
from shardcache._arecipes import AsyncLock, acached
from shardcache._commands import UNAVAILABLE, CasToken, Engine
from shardcache._conn import ConnectionSettings
from shardcache._events import Events
from shardcache._rebalance import RebalanceReport
from shardcache._router import CallKind
from shardcache._wiring import Reconfigure, assemble
from shardcache.errors import ArgumentError
from shardcache.health import Event
from shardcache.nodes import NodeSpecLike, parse_nodes
from shardcache.ring import Ring

__all__ = ["AsyncClient"]

P = ParamSpec("P")
R = TypeVar("R")
Key = str | bytes

_REPLACE = CallKind.REPLACING_WRITE
_WRITE = CallKind.WRITE


class AsyncClient:
    """A memcached client over many nodes for asyncio, with ``Client``'s options and methods.

    ``AsyncClient(servers, **options)`` takes exactly ``Client``'s options (see its docstring)
    and makes no connection and starts no task until the first call, so it may be built outside
    any event loop and used from any running loop (one loop at a time: on another loop the
    connections of the previous one are dropped). ``timeout`` is a deadline for the whole call
    (connect, waiting for a free connection, every round trip). ``max_pool_size`` bounds the
    connections open to each node (default 16; a caller waits for a free one within its
    timeout). Every method of ``Client`` that does I/O is a coroutine here with the same
    arguments, return values and exceptions; ``lock()`` is an ``async with``, ``cached`` wraps
    coroutine functions, ``aclose()`` (or ``async with``) closes it. A call cancelled at any
    point closes the connection it was using unless its exchange had completed, so no reply is
    ever read by another caller.
    """

    def __init__(self, servers: Iterable[NodeSpecLike] | str, **options: Any) -> None:
        def executor(events: Events, settings: ConnectionSettings, timeout: float | None) -> AsyncExecutor:
            opts = options
            return AsyncExecutor(
                events, settings, timeout, max_size=opts.get("max_pool_size", 16),
                idle_timeout=float(opts.get("pool_idle_timeout", 0.0) or 0.0),
                topology=lambda: self._membership.topology, on_connect=self._connected,
            )  # fmt: skip

        parts = assemble(servers, options, executor, lambda made: made.run, AsyncProber)
        self._events = parts.events
        self._membership = parts.membership
        self._core = parts.core
        self._executor = parts.executor
        self._run = parts.executor.run
        self._engine = Engine(self._core, self._run)
        self._reconfigure = Reconfigure(self._membership)
        self._discovery: AsyncDiscovery | None = None
        opts = parts.options
        if opts.discovery is not None:
            warmup_s = float(opts.discovery_warmup_s)
            self._discovery = AsyncDiscovery(
                opts.discovery,
                lambda servers: self._reconfigure.set_nodes(list(parse_nodes(servers)), warmup_s),
                float(opts.discovery_interval_s),
                self._events.emit,
            )

    def _connected(self, node_id: str, conn: AsyncConnection) -> None:
        self._membership._connected(node_id, conn)  # the prober (fleet marks), same-server warning
        if self._discovery is not None:
            self._discovery.start()

    # -- single-key commands ----------------------------------------------------------------------

    async def get(self, key: Key, default: Any = None) -> Any:
        """The value of ``key``, or ``default`` if it is not cached."""
        return await self._run(cmd.get(self._core, key, default))

    async def set(
        self, key: Key, value: Any, expire: int = 0, noreply: bool | None = None, flags: int | None = None
    ) -> bool:
        """Store ``value`` under ``key`` for ``expire`` seconds. True if stored."""
        return await self._store(b"set", key, value, expire, noreply, flags, _REPLACE)

    async def add(
        self, key: Key, value: Any, expire: int = 0, noreply: bool | None = None, flags: int | None = None
    ) -> bool:
        """Store ``value`` only if ``key`` is absent. True if stored."""
        return await self._store(b"add", key, value, expire, noreply, flags)

    async def replace(
        self, key: Key, value: Any, expire: int = 0, noreply: bool | None = None, flags: int | None = None
    ) -> bool:
        """Store ``value`` only if ``key`` is present. True if stored."""
        return await self._store(b"replace", key, value, expire, noreply, flags)

    async def append(
        self, key: Key, value: Any, expire: int = 0, noreply: bool | None = None, flags: int | None = None
    ) -> bool:
        """Append ``value`` (serialized) to the stored bytes of ``key``. True if it was present."""
        return await self._store(b"append", key, value, expire, noreply, flags)

    async def prepend(
        self, key: Key, value: Any, expire: int = 0, noreply: bool | None = None, flags: int | None = None
    ) -> bool:
        """Prepend ``value`` (serialized) to the stored bytes of ``key``. True if it was present."""
        return await self._store(b"prepend", key, value, expire, noreply, flags)

    async def _store(
        self, command: bytes, key: Key, value: Any, expire: int, noreply: bool | None, flags: int | None,
        kind: CallKind = _WRITE,
    ) -> bool:  # fmt: skip
        return (
            await self._run(cmd.store(self._core, command, key, value, expire, noreply, flags, kind)) is True
        )

    async def gets(self, key: Key, default: Any = None, cas_default: Any = None) -> tuple[Any, Any]:
        """``(value, CasToken)`` of ``key``, or ``(default, cas_default)`` if it is not cached."""
        found = await self._run(cmd.gets(self._core, key, CallKind.READ))
        if found is None or found is UNAVAILABLE:
            return default, cas_default
        return found  # type: ignore[no-any-return]

    async def cas(
        self, key: Key, value: Any, cas: Any, expire: int = 0, noreply: bool = False, flags: int | None = None
    ) -> bool | None:
        """Store ``value`` if ``key`` is unchanged since ``gets``: True, False (conflict, or the
        token's node no longer serves the key), None (absent); as ``Client.cas``."""
        if cas is None or isinstance(cas, bool):
            raise ArgumentError(f"cas must be a token from gets, got {cas!r}")
        result = await self._run(
            cmd.store(self._core, b"cas", key, value, expire, noreply, flags, _WRITE, cas)
        )
        if result is UNAVAILABLE:
            return False
        return result  # type: ignore[no-any-return]

    async def delete(self, key: Key, noreply: bool | None = None) -> bool:
        """Delete ``key``. True if it was deleted; a failed delete is fenced (``Client.delete``)."""
        return await self._run(cmd.delete(self._core, key, noreply))

    async def incr(
        self,
        key: Key,
        value: int,
        noreply: bool | None = False,
        *,
        initial: int | None = None,
        expire: int = 0,
    ) -> int | None:
        """Add ``value`` to the counter: the new value, or None; with ``initial`` an absent
        counter is created at ``initial``, which is returned (``Client.incr``)."""
        flow = cmd.counter(
            self._core, key, value, decr=False, noreply=noreply, initial=initial, expire=expire
        )
        return await self._run(flow)

    async def decr(
        self,
        key: Key,
        value: int,
        noreply: bool | None = False,
        *,
        initial: int | None = None,
        expire: int = 0,
    ) -> int | None:
        """Subtract ``value`` from the counter (floored at 0): the new value, or None."""
        flow = cmd.counter(self._core, key, value, decr=True, noreply=noreply, initial=initial,
                           expire=expire)  # fmt: skip
        return await self._run(flow)

    async def touch(self, key: Key, expire: int = 0, noreply: bool | None = None) -> bool:
        """Set a new expiry on ``key``. True if it exists."""
        return await self._run(cmd.touch(self._core, key, expire, noreply))

    # -- race-free patterns -----------------------------------------------------------------------

    async def cas_update(
        self, key: Key, fn: Callable[[Any], Any], *, initial: Any = None, expire: int = 0,
        max_attempts: int = 64, backoff_s: float = 0.001, max_backoff_s: float = 0.05,
    ) -> Any:  # fmt: skip
        """The CAS retry loop (``Client.cas_update``); ``fn`` may be a coroutine function."""
        return await recipes.cas_update(
            self, key, fn, initial=initial, expire=expire, max_attempts=max_attempts,
            backoff_s=backoff_s, max_backoff_s=max_backoff_s,
        )  # fmt: skip

    def lock(self, name: Key, *, ttl_s: int = 30, blocking_timeout_s: float | None = 10.0) -> AsyncLock:
        """A distributed lock: ``async with client.lock("report:42"): ...`` (``Client.lock``)."""
        return AsyncLock(
            recipes.Lock(self, name, ttl_s=ttl_s, blocking_timeout_s=blocking_timeout_s), self._run
        )

    async def get_or_set(
        self, key: Key, factory: Callable[[], Any], *, expire: int = 0, lock_ttl_s: int = 10,
        wait_s: float | None = None,
    ) -> Any:  # fmt: skip
        """The cached value of ``key``; on a miss one caller runs ``factory`` (which may be a
        coroutine function) while the others wait for its result (``Client.get_or_set``)."""
        return await recipes.get_or_set(
            self, key, factory, expire=expire, lock_ttl_s=lock_ttl_s, wait_s=wait_s
        )

    def cached(
        self, *, expire: int = 0, key: Callable[..., Key] | str | None = None, lock_ttl_s: int = 10
    ) -> Callable[[Callable[P, Coroutine[Any, Any, R]]], Callable[P, Coroutine[Any, Any, R]]]:
        """Decorator caching a coroutine function's result (``get_or_set`` per call)."""
        return acached(self, expire=expire, key=key, lock_ttl_s=lock_ttl_s)

    # -- multi-key and cluster-wide commands ------------------------------------------------------

    async def get_many(self, keys: Iterable[Key]) -> dict[Key, Any]:
        """The cached values of ``keys`` (absent keys are left out), from all nodes at once."""
        return await self._run(_batch.fetch(self._core, keys, with_cas=False))

    async def gets_many(self, keys: Iterable[Key]) -> dict[Key, tuple[Any, CasToken]]:
        """``{key: (value, cas_token)}`` for the cached ``keys``, from all nodes at once."""
        return await self._run(_batch.fetch(self._core, keys, with_cas=True))

    async def set_many(
        self, values: Mapping[Any, Any] | Iterable[tuple[Any, Any]], expire: int = 0,
        noreply: bool | None = None, flags: int | None = None,
    ) -> list[Key]:  # fmt: skip
        """Store every item, on all nodes at once; the keys that were not stored."""
        return await self._run(_batch.set_many(self._core, values, expire, noreply, flags))

    async def delete_many(self, keys: Iterable[Key], noreply: bool | None = None) -> bool:
        """Delete every key, on all nodes at once. True unless a node failed."""
        return await self._run(_batch.delete_many(self._core, keys, noreply))

    get_multi = get_many  # pymemcache's older names, as on Client
    set_multi = set_many
    delete_multi = delete_many

    async def flush_all(self, delay: int = 0, noreply: bool | None = None) -> dict[str, bool]:
        """Invalidate every item on every node: ``{node_id: ok}`` (``Client.flush_all``)."""
        return await self._run(_batch.flush_all(self._core, delay))

    async def stats(self, *args: str) -> dict[str, dict[bytes, Any]]:
        """``stats [args]`` on every node: ``{node_id: {name: value}}``."""
        return await self._run(_batch.stats(self._core, args))

    async def version(self) -> dict[str, bytes]:
        """The memcached version of every node."""
        return await self._run(_batch.version(self._core))

    async def cache_memlimit(self, memlimit: int) -> dict[str, bool]:
        """Set every node's memory limit, in megabytes: ``{node_id: ok}``."""
        return await self._run(_batch.cache_memlimit(self._core, memlimit))

    async def rebalance(
        self, *, batch: int = 500, keys_per_s: float | None = None, dry_run: bool = False,
        timeout_s: float = 60.0,
    ) -> RebalanceReport:  # fmt: skip
        """Delete the copies nodes hold of keys they no longer own (``Client.rebalance``)."""
        run = self._executor.with_timeout(_rebalance.checked_timeout(timeout_s)).run
        return await run(_rebalance.rebalance(self._core, batch, keys_per_s, dry_run))

    # -- the ring, its nodes, membership (no I/O) -------------------------------------------------

    def node_for(self, key: Key) -> str:
        """The id of the node that owns ``key`` on the ring (whatever its health)."""
        return self._core.locate(self._membership.topology, key)[2].node_id

    @property
    def nodes(self) -> tuple[str, ...]:
        return self._membership.topology.ring.nodes

    @property
    def ring(self) -> Ring:
        return self._membership.topology.ring

    def node_states(self) -> dict[str, str]:
        """``{node_id: "up" | "down" | "probing"}`` for every ring node."""
        return self._membership.node_states()

    def node_counters(self) -> dict[str, dict[str, int]]:
        """Per node: ``ops``, ``errors``, ``timeouts``, ``failovers``, ``state_changes``."""
        return {node_id: node.counters() for node_id, node in self._membership.topology.nodes.items()}

    def add_listener(self, callback: Callable[[Event], None]) -> None:
        """Call ``callback(event)`` on every ``shardcache.Event`` (on the loop, or discovery's
        worker thread for nothing but ``discovery_failed``)."""
        self._events.add_listener(callback)

    def remove_listener(self, callback: Callable[[Event], None]) -> None:
        self._events.remove_listener(callback)

    async def add_node(self, spec: NodeSpecLike, *, warmup_s: float = 0.0) -> None:
        """Add a node, with a warm-up window (``Client.add_node``)."""
        self._reconfigure.add_node(spec, warmup_s)

    async def remove_node(self, node_id: str, *, drain_s: float = 0.0) -> None:
        """Remove a node, with a drain window (``Client.remove_node``)."""
        self._reconfigure.remove_node(node_id, drain_s)

    async def set_nodes(
        self, servers: Iterable[NodeSpecLike] | str, *, warmup_s: float = 0.0
    ) -> tuple[list[str], list[str]]:
        """Reconcile to ``servers``: the node ids added and removed (``Client.set_nodes``)."""
        return self._reconfigure.set_nodes(servers, warmup_s)

    def open_connections(self) -> int:
        """Connections open now, idle or in use, over every node."""
        return self._executor.open_connections()

    # -- lifecycle --------------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close idle connections, stop the prober and discovery tasks. Requests still work
        afterwards (connections reopen, the prober restarts when needed); discovery does not."""
        if self._discovery is not None:
            await self._discovery.aclose()
        prober = self._membership.prober
        task = prober.task if isinstance(prober, AsyncProber) else None
        self._membership.close()
        if isinstance(prober, AsyncProber):
            await prober.wait_closed(task)
        self._executor.close()

    async def close(self) -> None:
        """``Client``'s name for :meth:`aclose`."""
        await self.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"shardcache.AsyncClient({list(self.nodes)!r}, hashing={self.ring.hashing!r})"
