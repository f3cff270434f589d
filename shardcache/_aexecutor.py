"""The asyncio executor: drives the same flows as the sync one, awaiting their requests.

Nothing here decides where a request goes or what a reply means (the flows do, once for both
executors); this module takes a connection from the node's :class:`~shardcache._aconn.AsyncPool`,
sends, awaits the replies the request expects, gives the connection back or closes it, and
reports the outcome to the node's health, as ``shardcache._executor`` does on blocking sockets.

Deadlines are loop times (``loop.time()``): the client's ``timeout`` bounds each stretch of a
flow's I/O, from its first request on, as in the sync executor; a ``Sleep`` or ``Compute`` starts a
new stretch. A multi-node call (``Fanout``, ``Each``) sends every node's job, then awaits the
replies, which are read as they arrive on every connection at once: one round trip, one deadline,
and a node that hangs holds back no other node's part.

Cancellation: the caller's task may be cancelled at any await. A connection taken from a pool
goes back only once its exchange completed: a cancelled exchange is drained first (its replies
read and dropped), a failed or timed-out one closed (see ``_aconn``), so no reply is ever read by
a caller it was not meant for. The flow is closed (its ``finally``
blocks run, without I/O) and the cancellation propagates.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from shardcache._aconn import AsyncConnection, AsyncPool, PoolTimeoutError, open_connection
from shardcache._conn import ConnectionSettings
from shardcache._events import Events
from shardcache._executor import report_call_failure, report_swallowed
from shardcache._flows import Call, Compute, Each, Fanout, Flow, Job, Probe, Quiet, Sleep
from shardcache._protocol import ErrorReply, Expect, version
from shardcache._topology import Node, Topology
from shardcache.errors import NodeError, NodeTimeoutError
from shardcache.health import Event
from shardcache.nodes import NodeSpec

__all__ = ["AsyncExecutor"]

T = TypeVar("T")


class AsyncExecutor:
    """Runs flows on asyncio; one per client. Not thread-safe: used from one running loop at a
    time (another loop may take over: the pools then drop the old loop's connections)."""

    def __init__(
        self, events: Events, settings: ConnectionSettings, timeout: float | None, *,
        max_size: int | None, idle_timeout: float, topology: Callable[[], Topology],
        on_connect: Callable[[str, AsyncConnection], None] | None = None,
    ) -> None:  # fmt: skip
        self._events = events
        self._settings = settings
        self._timeout = timeout
        self._max_size = max_size
        self._idle_timeout = idle_timeout
        self._topology = topology
        self._on_connect = on_connect
        self._pools: dict[str, AsyncPool] = {}

    def with_timeout(self, timeout: float | None) -> AsyncExecutor:
        """An executor on the same pools and events whose flows have ``timeout`` (long jobs)."""
        other = AsyncExecutor(
            self._events, self._settings, timeout, max_size=self._max_size, idle_timeout=self._idle_timeout,
            topology=self._topology, on_connect=self._on_connect,
        )  # fmt: skip
        other._pools = self._pools
        return other

    # -- flows ------------------------------------------------------------------------------------

    async def run(self, flow: Flow[T]) -> T:
        """Drive ``flow`` to its end and return its value."""
        loop = asyncio.get_running_loop()
        timeout = self._timeout
        try:
            request: Any = next(flow)
            deadline = None if timeout is None else loop.time() + timeout
            while True:
                kind = type(request)
                try:
                    if kind is Call:  # self.call, one coroutine less on the hot path
                        expects = ((request.kind, request.data_block, request.wanted),)
                        replies = await self.exchange(request.node, request.payload, expects, deadline,
                                                      request.what, request.key)  # fmt: skip
                        result: Any = replies[0]
                    elif kind is Fanout:
                        result = await self.fanout(request.jobs, deadline, request.what, request.key)
                    elif kind is Quiet:
                        await self.call_quiet(
                            request.node, request.payload, deadline, request.what, request.key
                        )
                        result = None
                    elif kind is Each:
                        result = await self.each(request.nodes, request.payload, request.kind, deadline,
                                                 request.what)  # fmt: skip
                    elif kind is Probe:
                        result = await self.probe(request.spec)
                    elif kind is Sleep:
                        await asyncio.sleep(max(request.seconds, 0.0))
                        result = None
                        deadline = None if timeout is None else loop.time() + timeout
                    elif kind is Compute:
                        try:
                            result = request.fn(*request.args)
                            if inspect.isawaitable(result):
                                result = await result
                        except BaseException as exc:  # the caller's error: the flow cleans up, re-raises
                            request = flow.throw(exc)
                            continue
                        finally:
                            deadline = None if timeout is None else loop.time() + timeout
                    else:
                        raise TypeError(f"a flow yielded {request!r}")
                except NodeError as err:
                    request = flow.throw(err)
                    continue
                request = flow.send(result)
        except StopIteration as stop:
            value: T = stop.value
            return value
        except BaseException:
            # cancelled (or failed) mid-flow: its finally blocks run now, without I/O
            with contextlib.suppress(Exception):
                flow.close()
            raise

    async def probe(self, spec: NodeSpec) -> bytes | NodeError:
        """``version`` on a new connection, closed afterwards: the version, or the failure."""
        loop = asyncio.get_running_loop()
        deadline = None if self._timeout is None else loop.time() + self._timeout
        conn: AsyncConnection | None = None
        try:
            conn = await open_connection(spec, self._settings, deadline)
            reply = (await conn.wait(conn.start(version(), ((Expect.VERSION, False),)), deadline))[0]
        except NodeError as err:
            return err
        finally:
            if conn is not None:
                conn.close()
        return (
            reply
            if isinstance(reply, bytes)
            else NodeError(f"probe of {spec.node_id}: {reply!r}", spec.node_id)
        )

    # -- pools ------------------------------------------------------------------------------------

    def pool(self, node: Node) -> AsyncPool:
        """The pool of ``node`` (a node that left and came back gets a new one)."""
        pool = self._pools.get(node.node_id)
        if pool is not None and pool.node is node:
            return pool
        if pool is None or pool.node is not node:
            if pool is not None:
                pool.close()
            on_connect = self._on_connect
            pool = AsyncPool(
                node, self._settings, max_size=self._max_size, idle_timeout=self._idle_timeout,
                member=self._member,
                on_connect=None if on_connect is None else lambda conn: on_connect(node.node_id, conn),
            )  # fmt: skip
            self._pools[node.node_id] = pool
        return pool

    def _member(self, node: Node) -> bool:
        topology = self._topology()
        node_id = node.node_id
        return topology.node(node_id) is node or topology.previous_nodes.get(node_id) is node

    def close(self) -> None:
        """Close every idle connection (those in use close when given back, if no longer wanted)."""
        for node_id, pool in list(self._pools.items()):
            pool.close()
            if not self._member(pool.node):
                del self._pools[node_id]

    def open_connections(self) -> int:
        """Connections open now, idle or in use (for tests and leak checks)."""
        return sum(pool.open for pool in self._pools.values())

    def failed(self, node: Node, err: NodeError, what: str, key: Any = None) -> None:
        if isinstance(err, PoolTimeoutError):  # our own contention: not the node's failure
            self._events.emit(Event("error", node.node_id, f"{err} ({what})", err, key))
            return
        report_call_failure(self._events, node, err, what, key)

    # -- one node ---------------------------------------------------------------------------------

    async def call(self, request: Call, deadline: float | None) -> Any:
        """Send one request to its node and return its reply (``NodeError`` on failure)."""
        expects = ((request.kind, request.data_block, request.wanted),)
        replies = await self.exchange(
            request.node, request.payload, expects, deadline, request.what, request.key
        )
        return replies[0]

    async def exchange(
        self, node: Node, payload: bytes, expects: Sequence[tuple[Any, ...]], deadline: float | None,
        what: str, key: Any = None,
    ) -> list[Any]:  # fmt: skip
        """One node: take a connection, send, read every reply, settle; the replies."""
        node.ops += 1
        pool = self.pool(node)
        conn = pool.take()
        if conn is None:
            try:
                conn = await pool.acquire(deadline)
            except NodeError as err:
                self.failed(node, err, what, key)
                raise
        waiter: asyncio.Future[list[Any]] | None = None
        try:
            waiter = conn.start(payload, expects)
            if deadline is None:
                replies = await waiter
            else:
                handle = conn.loop.call_at(deadline, conn.expire, waiter)
                try:
                    replies = await waiter
                finally:
                    handle.cancel()
        except BaseException as exc:
            self._give_up(pool, conn, waiter, exc)
            if isinstance(exc, NodeError):
                blamed = _blamed(conn, exc)
                self.failed(node, blamed, what, key)
                if blamed is not exc:
                    raise blamed from exc
            raise
        self._settle(node, pool, conn, replies)
        return replies

    def _give_up(
        self, pool: AsyncPool, conn: AsyncConnection, waiter: asyncio.Future[list[Any]] | None,
        exc: BaseException,
    ) -> None:  # fmt: skip
        """The caller stopped awaiting ``waiter``'s exchange on ``conn``. Cancelled after sending:
        its replies are read and dropped before the connection goes back (``abandon``). Failed or
        timed out: the stream's state is unknown, so it is closed."""
        if waiter is not None and isinstance(exc, asyncio.CancelledError):
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                pool.release(conn)  # the exchange completed just as its caller was cancelled
                return
            limit = self._timeout if self._timeout is not None else 1.0
            conn.abandon(pool.settle, conn.loop.time() + limit)
            return
        pool.discard(conn)

    def _settle(self, node: Node, pool: AsyncPool, conn: AsyncConnection, replies: list[Any]) -> None:
        if any(type(r) is ErrorReply and r.fatal for r in replies):
            pool.discard(conn)  # its data block may have run as commands: out of step
        else:
            pool.release(conn)
        report_swallowed(self._events, node, conn.parser)
        if replies:  # only a reply proves the node works (a noreply send only filled a buffer)
            node.report_success()

    async def call_quiet(
        self, node: Node, payload: bytes, deadline: float | None, what: str, key: Any = None
    ) -> None:
        """Send noreply requests, an ``mn`` behind them (read by the connection's next user)."""
        node.ops += 1
        pool = self.pool(node)
        try:
            conn = await pool.acquire(deadline)
        except NodeError as err:
            self.failed(node, err, what, key)
            raise
        try:
            conn.send_quiet(payload)
        except NodeError as err:
            pool.discard(conn)
            self.failed(node, err, what, key)
            raise
        pool.release(conn)

    # -- many nodes at once -----------------------------------------------------------------------

    async def fanout(
        self, jobs: Mapping[str, tuple[Node, Job]], deadline: float | None, what: str, key: Any = None
    ) -> dict[str, list[Any] | NodeError]:
        """Every node's job at once; ``{node_id: replies}`` or the node's ``NodeError``."""
        results: dict[str, list[Any] | NodeError] = {}
        started: list[tuple[Node, AsyncPool, AsyncConnection, asyncio.Future[list[Any]]]] = []
        try:
            for node_id, (node, (payload, expects)) in jobs.items():
                node.ops += 1
                pool = self.pool(node)
                try:
                    conn = await pool.acquire(deadline)
                except NodeError as err:
                    self.failed(node, err, what, key)
                    results[node_id] = err
                    continue
                try:
                    if not expects:  # noreply requests
                        conn.send_quiet(payload)
                        pool.release(conn)
                        results[node_id] = []
                        continue
                    started.append((node, pool, conn, conn.start(payload, expects)))
                except NodeError as err:
                    pool.discard(conn)
                    self.failed(node, err, what, key)
                    results[node_id] = err
            while started:
                node, pool, conn, waiter = started[0]
                try:
                    replies = await conn.wait(waiter, deadline)
                except NodeError as exc:
                    started.pop(0)
                    pool.discard(conn)
                    blamed = _blamed(conn, exc)
                    self.failed(node, blamed, what, key)
                    results[node.node_id] = blamed
                    continue
                started.pop(0)
                self._settle(node, pool, conn, replies)
                results[node.node_id] = replies
        except BaseException as exc:  # cancelled: what is under way is drained (or closed)
            for _, pool, conn, waiter in started:
                self._give_up(pool, conn, waiter, exc)
            raise
        return results

    async def each(
        self, nodes: Iterable[Node], payload: bytes, kind: int, deadline: float | None, what: str
    ) -> dict[str, Any]:
        """One request to every node at once: ``{node_id: reply or NodeError}``."""
        job: Job = (payload, ((kind, False),))
        results = await self.fanout({n.node_id: (n, job) for n in nodes}, deadline, what)
        return {node_id: r if isinstance(r, NodeError) else r[0] for node_id, r in results.items()}


def _blamed(conn: AsyncConnection, err: NodeError) -> NodeError:
    """A timeout of an exchange whose connection was waited for in the pool's queue: the wait may
    have taken the time, so it is not counted against the node (``PoolTimeoutError``)."""
    if conn.queued and isinstance(err, NodeTimeoutError) and not isinstance(err, PoolTimeoutError):
        return PoolTimeoutError(f"{err.args[0]} (after waiting for a free connection)", err.node_id)
    return err
