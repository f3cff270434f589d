"""Connections to one memcached node (sync I/O): sockets, deadlines, the pool.

A :class:`Connection` is a non-blocking socket plus its :class:`~shardcache._protocol.ReplyParser`.
Every wait is bounded by the *call's* deadline (an absolute ``time.monotonic()`` value), never by a
per-``recv`` timeout, so a server that drips its reply one byte at a time still costs at most the
call's ``timeout``. OS errors are translated once, here, into ``NodeUnavailableError`` /
``NodeTimeoutError`` carrying the node id.

:class:`NodePool` keeps idle connections for one node, most recently used first, at most
``max_idle`` of them; ``acquire``/``release`` are lock-free (deque appends and pops are atomic), so a
pool is shared by threads while a connection is used by one thread at a time. After ``fork()``, a
child drops the connections inherited from its parent without closing them (the parent still uses
them).
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import ssl
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

from shardcache._protocol import NEED_DATA, ReplyParser
from shardcache.errors import NodeTimeoutError, NodeUnavailableError
from shardcache.nodes import NodeSpec

__all__ = ["Connection", "ConnectionSettings", "NodePool"]

_RECV = 256 * 1024
_POLLIN = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP
_POLLOUT = select.POLLOUT | select.POLLERR | select.POLLHUP
_monotonic = time.monotonic

_pools: weakref.WeakSet[NodePool] = weakref.WeakSet()
# An idle connection unused for longer than this is checked (one poll) before reuse: a restarted
# server or memcached's own idle_timeout closes connections while they sit in the pool.
_CHECK_IDLE_AFTER_S = 0.5


class ConnectionSettings:
    """How to open connections (shared by every pool of a client); immutable by convention."""

    __slots__ = ("connect_timeout", "keepalive", "max_value", "no_delay", "socket_module", "tls_context")

    def __init__(
        self,
        *,
        connect_timeout: float | None,
        no_delay: bool,
        socket_module: Any,
        keepalive: Any,
        tls_context: Any,
        max_value: int,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.no_delay = no_delay
        self.socket_module = socket_module
        self.keepalive = keepalive
        self.tls_context = tls_context
        self.max_value = max_value


class Connection:
    """One socket to one node and its reply parser. Used by one thread at a time."""

    __slots__ = ("_poll", "_pollout", "generation", "node_id", "parser", "sock", "tls")

    def __init__(self, sock: Any, node_id: str, max_value: int) -> None:
        self.generation = 0  # the pool's generation when it was made; an older one is not kept
        self.sock = sock
        self.node_id = node_id
        self.parser = ReplyParser(max_value=max_value, node_id=node_id)
        self.tls = isinstance(sock, ssl.SSLSocket)
        self._poll = select.poll()
        self._poll.register(sock.fileno(), _POLLIN)
        self._pollout = False

    def fileno(self) -> int:
        return int(self.sock.fileno())

    # -- sending --------------------------------------------------------------------------------

    def send(self, data: bytes, deadline: float | None) -> None:
        """Send all of ``data`` before ``deadline``."""
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            sent = 0
        except OSError as exc:
            raise self.failure(exc) from exc
        if sent == len(data):
            return
        view = memoryview(data)[sent:]
        writing = True
        while view:
            self.wait(deadline, writing=writing)
            writing = True
            try:
                sent = self.sock.send(view)
            except (BlockingIOError, ssl.SSLWantWriteError):
                continue
            except ssl.SSLWantReadError:  # TLS renegotiation: the peer must speak first
                writing = False
                continue
            except OSError as exc:
                raise self.failure(exc) from exc
            view = view[sent:]

    def send_some(self, view: memoryview) -> int:
        """Send what the socket takes now (for multiplexed calls); 0 if it would block."""
        try:
            return int(self.sock.send(view))
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            return 0
        except OSError as exc:
            raise self.failure(exc) from exc

    # -- receiving ------------------------------------------------------------------------------

    def read_reply(self, deadline: float | None) -> Any:
        """The next reply (see ``ReplyParser.next``), reading as needed until ``deadline``."""
        parser = self.parser
        # nothing buffered (the usual case right after a send): wait before asking the parser
        reply = parser.next() if parser.buffered else NEED_DATA
        while reply is NEED_DATA:
            if not (self.tls and self.sock.pending()):
                self.wait(deadline)
            self.receive()
            reply = parser.next()
        return reply

    def read_one(self, kind: int, data_block: bool, wanted: Any, deadline: float | None) -> Any:
        """The reply to the one request just sent (see ``ReplyParser.expect`` for the arguments):
        when nothing else is pending and it arrives whole (the usual case), parsed in one piece
        (``ReplyParser.whole``); else read and parsed as it comes (:meth:`read_reply`)."""
        parser = self.parser
        if self.tls:  # bytes may wait in the TLS layer, where poll does not see them
            parser.expect(kind, data_block, wanted)
            return self.read_reply(deadline)
        # Something may be pending before this request (the MN behind noreply commands) and even
        # buffered: then ``whole`` declines, and the bytes are fed the usual way; either way
        # this request's reply is still to come, so waiting for the socket is right. (``wait``,
        # written in for the usual case: a frame less on every get and set, ~3% of their
        # instructions; ``wait`` itself when the poll must watch for writing.)
        if self._pollout or deadline is None:
            self.wait(deadline)
        else:
            left = deadline - _monotonic()
            if left <= 0 or not self._poll.poll(left * 1000):
                raise self.timed_out()
        data = self.recv_some()
        if data is not None:
            reply = parser.whole(kind, data, wanted)
            if reply is not None:
                return reply
        parser.expect(kind, data_block, wanted)
        if data is not None:
            parser.feed(data)
        return self.read_reply(deadline)

    def receive(self) -> bool:
        """Read what has arrived into the parser; False if nothing was there after all."""
        data = self.recv_some()
        if data is None:
            return False
        self.parser.feed(data)
        return True

    def recv_some(self) -> bytes | None:
        """What has arrived (not given to the parser); None if nothing was there after all."""
        try:
            data: bytes = self.sock.recv(_RECV)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError, InterruptedError):
            return None
        except OSError as exc:
            raise self.failure(exc) from exc
        if not data:
            raise NodeUnavailableError(f"memcached node {self.node_id}: connection closed", self.node_id)
        return data

    def wait(self, deadline: float | None, *, writing: bool = False) -> None:
        """Block until the socket is readable (or writable) or ``deadline`` passes."""
        if writing != self._pollout:
            self._poll.modify(self.sock.fileno(), _POLLOUT if writing else _POLLIN)
            self._pollout = writing
        if deadline is None:
            timeout_ms = None
        else:
            left = deadline - _monotonic()
            if left <= 0:
                raise self.timed_out()
            timeout_ms = left * 1000  # a float: poll rounds it up, so it never wakes before the deadline
        if not self._poll.poll(timeout_ms):
            raise self.timed_out()

    # -- failures -------------------------------------------------------------------------------

    def timed_out(self) -> NodeTimeoutError:
        return NodeTimeoutError(f"memcached node {self.node_id}: no reply within the timeout", self.node_id)

    def failure(self, exc: OSError) -> NodeUnavailableError:
        if isinstance(exc, TimeoutError | socket.timeout):
            return self.timed_out()
        reason = exc.strerror or type(exc).__name__
        return NodeUnavailableError(f"memcached node {self.node_id}: {reason}", self.node_id)

    def closed_by_peer(self) -> bool:
        """For an idle connection: True if the server has closed it (or sent something nobody
        asked for), so it must not be reused. One non-blocking poll. A connection with replies
        still to come (an ``mn`` behind noreply commands) or TLS (a session ticket may arrive
        unasked) is not judged this way."""
        if self.parser.pending or self.tls:
            return False
        if self._pollout:
            self._poll.modify(self.sock.fileno(), _POLLIN)
            self._pollout = False
        try:
            return bool(self._poll.poll(0))
        except OSError:
            return True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def connect(spec: NodeSpec, settings: ConnectionSettings, deadline: float | None) -> Connection:
    """A new connection to ``spec``, within ``connect_timeout`` and ``deadline``."""
    node_id = spec.node_id
    limit = settings.connect_timeout
    if limit is not None:
        cutoff = _monotonic() + limit
        deadline = cutoff if deadline is None else min(deadline, cutoff)
    module = settings.socket_module
    try:
        if spec.unix:
            targets: list[tuple[Any, ...]] = [(socket.AF_UNIX, socket.SOCK_STREAM, 0, "", spec.host)]
        else:
            targets = module.getaddrinfo(spec.host, spec.port, 0, socket.SOCK_STREAM)
    except OSError as exc:
        raise NodeUnavailableError(
            f"memcached node {node_id}: cannot resolve {spec.host!r}: {exc}", node_id
        ) from exc
    error: Exception | None = None
    for family, kind, proto, _, address in targets:
        sock = module.socket(family, kind, proto)
        try:
            _connect_socket(sock, address, deadline, node_id)
            if family != socket.AF_UNIX:
                if settings.no_delay:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if settings.keepalive is not None:
                    _keepalive(sock, settings.keepalive)
            if settings.tls_context is not None:
                sock = _wrap_tls(sock, settings.tls_context, spec, deadline, node_id)
            return Connection(sock, node_id, settings.max_value)
        except (OSError, NodeUnavailableError) as exc:
            sock.close()
            error = exc
    if isinstance(error, NodeUnavailableError):
        raise error
    reason = (error.strerror if isinstance(error, OSError) else None) or repr(error)
    raise NodeUnavailableError(f"memcached node {node_id}: {reason}", node_id) from error


def _connect_socket(sock: Any, address: Any, deadline: float | None, node_id: str) -> None:
    sock.setblocking(False)
    code = sock.connect_ex(address)
    if code in (0, errno.EISCONN):
        return
    if code not in (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN, errno.EALREADY):
        raise OSError(code, os.strerror(code))
    poller = select.poll()
    poller.register(sock.fileno(), _POLLOUT)
    left = None if deadline is None else deadline - _monotonic()
    if (left is not None and left <= 0) or not poller.poll(None if left is None else left * 1000):
        raise NodeTimeoutError(f"memcached node {node_id}: connect timed out", node_id)
    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if code:
        raise OSError(code, os.strerror(code))


def _wrap_tls(sock: Any, context: Any, spec: NodeSpec, deadline: float | None, node_id: str) -> Any:
    left = None if deadline is None else max(deadline - _monotonic(), 0.001)
    sock.settimeout(left)
    try:
        wrapped = context.wrap_socket(sock, server_hostname=None if spec.unix else spec.host)
    except TimeoutError as exc:
        raise NodeTimeoutError(f"memcached node {node_id}: TLS handshake timed out", node_id) from exc
    wrapped.setblocking(False)
    return wrapped


def _keepalive(sock: Any, options: Any) -> None:
    """pymemcache's ``KeepaliveOpts`` (idle, intvl, cnt) as socket options."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, attr in (("TCP_KEEPIDLE", "idle"), ("TCP_KEEPINTVL", "intvl"), ("TCP_KEEPCNT", "cnt")):
        value = getattr(options, attr, None)
        if value is not None and hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


class NodePool:
    """Idle connections to one node; thread-safe. Connections are made on demand."""

    __slots__ = (
        "__weakref__",
        "_connect_hook",
        "_generation",
        "_idle",
        "_idle_timeout",
        "_max_idle",
        "_on_connect",
        "_retired",
        "_settings",
        "node_id",
        "spec",
    )

    def __init__(
        self, spec: NodeSpec, settings: ConnectionSettings, *, max_idle: int | None, idle_timeout: float,
        on_connect: Callable[[Connection], None] | None = None,
    ) -> None:  # fmt: skip
        self._on_connect = on_connect  # called with the first connection made after each close()
        self._connect_hook = on_connect
        self.spec = spec
        self.node_id = spec.node_id
        self._settings = settings
        self._idle: deque[tuple[Connection, float]] = deque()
        self._generation = 0  # bumped by close(): connections made before it are not kept
        self._retired = False  # its node left the ring: nothing is kept any more
        self._max_idle = max_idle
        self._idle_timeout = idle_timeout
        _pools.add(self)

    def acquire(self, deadline: float | None) -> Connection:
        """An idle connection, or a new one (connected now, within the deadline)."""
        idle = self._idle
        while idle:
            try:
                conn, since = idle.pop()
            except IndexError:  # another thread took the last one
                break
            idle_for = _monotonic() - since
            if (self._idle_timeout and idle_for > self._idle_timeout) or (
                idle_for > _CHECK_IDLE_AFTER_S and conn.closed_by_peer()
            ):
                conn.close()  # expired, or the server closed it (restart, its idle_timeout)
                continue
            return conn
        conn = connect(self.spec, self._settings, deadline)
        conn.generation = self._generation
        if self._on_connect is not None:
            on_connect, self._on_connect = self._on_connect, None
            on_connect(conn)
        return conn

    def release(self, conn: Connection) -> None:
        """Give back a connection that is in step (every reply it was sent has been read, or an
        ``mn`` is queued behind its noreply commands)."""
        if (
            conn.generation != self._generation  # in use when the pool was closed: out of date
            or self._retired
            or (self._max_idle is not None and len(self._idle) >= self._max_idle)
        ):
            conn.close()
        else:
            self._idle.append((conn, _monotonic()))

    @staticmethod
    def discard(conn: Connection) -> None:
        """Close a connection whose state is unknown (a failure happened while it was in use)."""
        conn.close()

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    def close(self) -> None:
        """Close every idle connection; connections in use are closed when they are released (so
        none outlives a close in an unreachable pool). New ones are made on demand, and the
        first of them is announced again (``on_connect``: the client's prober starts again)."""
        self._generation += 1
        self._on_connect = self._connect_hook
        while True:
            try:
                conn, _ = self._idle.pop()
            except IndexError:
                return
            conn.close()

    def retire(self) -> None:
        """Close for good (the node left the ring): a request still in flight on an old topology
        snapshot may use it, but closes its connection when done, so no socket is left in a pool
        nobody will close again."""
        self._retired = True
        self.close()

    def __del__(self) -> None:
        self.close()

    def _forget_after_fork(self) -> None:
        # The parent keeps using these connections: the child closes only its own copies of the
        # file descriptors (no shutdown, so nothing is sent and the parent's sockets stay open).
        self.close()


def _after_fork_in_child() -> None:
    for pool in list(_pools):
        pool._forget_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
