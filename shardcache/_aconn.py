"""Connections to one memcached node for asyncio: a protocol per connection, and the node's pool.

An :class:`AsyncConnection` is an ``asyncio.Protocol`` that feeds what arrives straight into its
:class:`~shardcache._protocol.ReplyParser` and completes a future once every reply of the current
exchange is parsed: a multi-node call sends to every node and then awaits their futures, which
complete as the replies arrive, so no task is created per node.

**Cancellation safety.** A connection goes back to its pool only after an exchange completed (all
of its replies read; or, for noreply commands, an ``mn`` queued behind them, whose reply its next
user reads first). A caller cancelled after its requests were written leaves the connection
*draining*: the rest of the replies is read and dropped, then it goes back (closed if that fails or
takes longer than the timeout), so cancellations cost no reconnects. An error or a timeout closes
it. (Requests are written whole by ``transport.write``: there is no half-sent state to handle;
cancelled before that, the caller never had the connection or gives it back untouched.) Either
way a reply still on its way can never be read by another caller.

:class:`AsyncPool` bounds the connections open to one node (``max_pool_size``; None: no bound);
a caller that finds none free waits, within its deadline, for one to be given back. Connections
are dropped when the node changes health state (they may be dead or out of step, as the sync
pools are closed then), when the node leaves the topology, and when the pool is used from another
event loop than the one they were made on. Not thread-safe: one event loop at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from shardcache._conn import ConnectionSettings, _keepalive
from shardcache._protocol import NOOP, Expect, ReplyParser
from shardcache._topology import Node
from shardcache.errors import NodeError, NodeTimeoutError, NodeUnavailableError, ProtocolError
from shardcache.nodes import NodeSpec

__all__ = ["AsyncConnection", "AsyncPool", "PoolTimeoutError", "open_connection", "timed_out"]


class AsyncConnection(asyncio.Protocol):
    """One connection and its reply parser; one exchange at a time."""

    def __init__(self, node_id: str, max_value: int, loop: asyncio.AbstractEventLoop) -> None:
        self.node_id = node_id
        self.parser = ReplyParser(max_value=max_value, node_id=node_id)
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.sock: Any = None  # for Membership's same-server check (getpeername)
        self.lost = False
        self.generation = 0  # the node's health.state_changes when it was made
        # Its user waited for it in the pool's queue: a timeout of this exchange may be the wait's
        # doing, not the node's (it is then not counted against the node's health).
        self.queued = False
        self._waiter: asyncio.Future[list[Any]] | None = None
        self._count = 0
        self._replies: list[Any] = []
        self._drained: Callable[[AsyncConnection, bool], None] | None = None  # see abandon

    # -- asyncio.Protocol ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport (uvloop's too)
        self.sock = transport.get_extra_info("socket")

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed(data)  # never empty here: EOF comes as eof_received
        except ProtocolError as exc:  # a value not terminated as announced: out of step
            self._fail(exc)
            self.close()
            return
        if self._waiter is not None:
            self._drain()
        # else: idle (the reply of an mn behind noreply commands, kept for the next user; anything
        # else makes the next user's parser raise, and the connection is then closed)

    def eof_received(self) -> bool:
        return False  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._fail(NodeUnavailableError(f"memcached node {self.node_id}: connection closed", self.node_id))

    # -- exchanges --------------------------------------------------------------------------------

    def start(self, payload: bytes, expects: Sequence[tuple[Any, ...]]) -> asyncio.Future[list[Any]]:
        """Send ``payload`` and expect its replies (``ReplyParser.expect`` arguments, one per
        request): a future of the replies, in order."""
        if self.lost or self.transport is None:
            raise NodeUnavailableError(f"memcached node {self.node_id}: connection closed", self.node_id)
        parser = self.parser
        parser.expect_many(expects)
        waiter: asyncio.Future[list[Any]] = self.loop.create_future()
        self._waiter, self._count, self._replies = waiter, len(expects), []
        self.transport.write(payload)
        if parser.buffered:  # bytes that came while idle (an mn's reply): may hold replies already
            self._drain()
        return waiter

    def send_quiet(self, payload: bytes) -> None:
        """Send noreply commands with an ``mn`` behind them (its reply is read by the next user)."""
        if self.lost or self.transport is None:
            raise NodeUnavailableError(f"memcached node {self.node_id}: connection closed", self.node_id)
        self.parser.expect(Expect.NOOP)
        self.transport.write(payload + NOOP)

    async def wait(self, waiter: asyncio.Future[list[Any]], deadline: float | None) -> list[Any]:
        """The replies of the exchange ``waiter`` stands for, by ``deadline`` (loop time)."""
        if waiter.done() or deadline is None:
            return await waiter
        handle = self.loop.call_at(deadline, self.expire, waiter)
        try:
            return await waiter
        finally:
            handle.cancel()

    def expire(self, waiter: asyncio.Future[list[Any]]) -> None:
        """The deadline of ``waiter``'s exchange has passed."""
        if not waiter.done():
            waiter.set_exception(timed_out(self.node_id))

    def _drain(self) -> None:
        waiter = self._waiter
        if waiter is None:
            return
        try:
            self._replies.extend(self.parser.next_many(self._count - len(self._replies)))
        except ProtocolError as exc:
            self._fail(exc)
            return
        if len(self._replies) >= self._count:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(self._replies)
            elif self._drained is not None:  # abandoned by its caller: every reply is read now
                settle, self._drained = self._drained, None
                settle(self, True)

    def _fail(self, exc: NodeError) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        if self._drained is not None:
            settle, self._drained = self._drained, None
            settle(self, False)

    def abandon(self, settle: Callable[[AsyncConnection, bool], None], deadline: float) -> None:
        """The caller of the exchange under way was cancelled after its requests were written:
        read (and drop) the rest of their replies, then ``settle(self, True)`` (back to the pool,
        in step); ``settle(self, False)`` (closed) if that fails or is not done by ``deadline``.
        A cancelled caller thus costs no new connection, and no reply reaches another caller."""
        if self._waiter is None:  # nothing under way any more
            settle(self, not self.lost)
            return
        self._drained = settle
        self._waiter.cancel()  # nobody awaits it (a fanout's other nodes): _drain then settles
        self.loop.call_at(deadline, self._drain_expired, self._waiter)

    def _drain_expired(self, waiter: asyncio.Future[list[Any]]) -> None:
        if self._waiter is waiter and self._drained is not None:
            self._fail(timed_out(self.node_id))

    def close(self) -> None:
        """Close at once (unsent bytes are dropped): its state is unknown, or it is not needed."""
        self.lost = True
        self._waiter = None
        self._drained = None
        if self.transport is not None:
            with contextlib.suppress(RuntimeError):  # its loop is closed: nothing to do any more
                self.transport.abort()


def timed_out(node_id: str) -> NodeTimeoutError:
    return NodeTimeoutError(f"memcached node {node_id}: no reply within the timeout", node_id)


async def open_connection(
    spec: NodeSpec, settings: ConnectionSettings, deadline: float | None
) -> AsyncConnection:
    """A new connection to ``spec`` within ``connect_timeout`` and ``deadline`` (loop time)."""
    loop = asyncio.get_running_loop()
    node_id = spec.node_id
    if settings.connect_timeout is not None:
        cutoff = loop.time() + settings.connect_timeout
        deadline = cutoff if deadline is None else min(deadline, cutoff)
    context = settings.tls_context
    tls: dict[str, Any] = {}
    if context is not None:
        tls = {"ssl": context, "server_hostname": None if spec.unix else spec.host}

    def made() -> AsyncConnection:
        return AsyncConnection(node_id, settings.max_value, loop)

    try:
        async with asyncio.timeout_at(deadline):
            if spec.unix:
                _, conn = await loop.create_unix_connection(made, spec.host, **tls)
            else:
                _, conn = await loop.create_connection(made, spec.host, spec.port, **tls)
    except TimeoutError as exc:
        raise NodeTimeoutError(f"memcached node {node_id}: connect timed out", node_id) from exc
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise NodeUnavailableError(f"memcached node {node_id}: {reason}", node_id) from exc
    sock = conn.sock
    if sock is not None and not spec.unix:
        with contextlib.suppress(OSError):
            if not settings.no_delay:  # asyncio sets TCP_NODELAY itself
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
            if settings.keepalive is not None:
                _keepalive(sock, settings.keepalive)
    return conn


class AsyncPool:
    """The connections to one node: at most ``max_size`` open, idle ones reused most recent first."""

    def __init__(
        self, node: Node, settings: ConnectionSettings, *, max_size: int | None, idle_timeout: float,
        member: Callable[[Node], bool], on_connect: Callable[[AsyncConnection], None] | None = None,
    ) -> None:  # fmt: skip
        self.node = node
        self._settings = settings
        self._max_size = max_size
        self._idle_timeout = idle_timeout
        self._member = member  # False once the node left the topology: nothing is kept
        self._on_connect = on_connect  # called with every new connection
        self._idle: deque[tuple[AsyncConnection, float]] = deque()
        self._waiters: deque[asyncio.Future[AsyncConnection | None]] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.open = 0  # connections made and not yet closed (idle or in use)

    def take(self) -> AsyncConnection | None:
        """An idle connection at once (the usual case, without a coroutine), or None."""
        if self._idle and self._loop is not None:
            loop = asyncio.get_running_loop()
            if loop is self._loop:
                return self._take_idle(loop)
        return None

    async def acquire(self, deadline: float | None) -> AsyncConnection:
        """An idle connection, a new one, or the next one given back (by ``deadline``)."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._rebind(loop)
        queued = False
        while True:
            conn = self._take_idle(loop)
            if conn is None and (self._max_size is None or self.open < self._max_size):
                try:
                    conn = await self._connect(deadline)
                except NodeTimeoutError as exc:
                    if not queued:
                        raise
                    raise PoolTimeoutError(str(exc), self.node.node_id) from exc
            if conn is None:
                conn = await self._wait_for_one(loop, deadline)
                queued = True
            if conn is not None:
                conn.queued = queued
                return conn
            # None: a connection was closed, so there is room to make one: try again

    def _take_idle(self, loop: asyncio.AbstractEventLoop) -> AsyncConnection | None:
        idle = self._idle
        stamp = self.node.health.state_changes
        while idle:
            conn, since = idle.pop()
            if (
                conn.lost
                or conn.generation != stamp
                or (self._idle_timeout and loop.time() - since > self._idle_timeout)
            ):
                self._drop(conn)
                continue
            return conn
        return None

    async def _connect(self, deadline: float | None) -> AsyncConnection:
        self.open += 1
        stamp = self.node.health.state_changes
        try:
            conn = await open_connection(self.node.spec, self._settings, deadline)
        except BaseException:
            self.open -= 1
            self._wake_one(None)
            raise
        conn.generation = stamp
        if self._on_connect is not None:
            self._on_connect(conn)
        return conn

    async def _wait_for_one(
        self, loop: asyncio.AbstractEventLoop, deadline: float | None
    ) -> AsyncConnection | None:
        waiter: asyncio.Future[AsyncConnection | None] = loop.create_future()
        self._waiters.append(waiter)
        handle = None if deadline is None else loop.call_at(deadline, _expire_wait, waiter, self.node)
        try:
            return await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                given = waiter.result()  # handed over just as this caller gave up: unused, in step
                if given is not None:
                    self.release(given)
                else:
                    self._wake_one(None)
            raise
        finally:
            if handle is not None:
                handle.cancel()
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    def release(self, conn: AsyncConnection) -> None:
        """Give back a connection whose exchange completed (it is in step)."""
        if (
            conn.lost
            or conn.loop is not self._loop
            or conn.generation != self.node.health.state_changes
            or not self._member(self.node)
        ):
            self.discard(conn)
            return
        if self._wake_one(conn):
            return
        self._idle.append((conn, conn.loop.time()))

    def settle(self, conn: AsyncConnection, in_step: bool) -> None:
        """:meth:`release` if ``in_step``, else :meth:`discard` (for ``AsyncConnection.abandon``)."""
        if in_step:
            self.release(conn)
        else:
            self.discard(conn)

    def discard(self, conn: AsyncConnection) -> None:
        """Close a connection whose state is unknown (an error or a cancellation while in use)."""
        self._drop(conn)
        self._wake_one(None)  # room for a waiter to connect

    def _drop(self, conn: AsyncConnection) -> None:
        conn.close()
        self.open = max(self.open - 1, 0)

    def _wake_one(self, conn: AsyncConnection | None) -> bool:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return True
        return False

    def _rebind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Used from a new event loop: the old loop's connections cannot be used from it."""
        self.close()
        self._waiters.clear()
        self.open = 0
        self._loop = loop

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    def close(self) -> None:
        """Close the idle connections (those in use are closed when given back, if the node
        changed state or left; else they are kept)."""
        while self._idle:
            conn, _ = self._idle.pop()
            self._drop(conn)


class PoolTimeoutError(NodeTimeoutError):
    """No connection to the node was free within the timeout (all ``max_pool_size`` in use), or
    what was left of it after waiting for one was too short: the caller's contention, not (for
    all we know) the node's failure, so it does not count against its health. A node that hangs
    is still found out: the exchanges that did not wait time out and count."""


def _expire_wait(waiter: asyncio.Future[Any], node: Node) -> None:
    if not waiter.done():
        message = f"memcached node {node.node_id}: no free connection within the timeout (max_pool_size)"
        waiter.set_exception(PoolTimeoutError(message, node.node_id))
