"""FaultProxy: a userspace TCP proxy that injects latency, blackholes and resets.

This kernel has no ``tc netem``; a proxy in front of a real node gives the same faults to the
client under test, per node and switchable at run time.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import heapq
import itertools
import logging
import queue
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Literal, TypeVar

from shardcache.testing._nodes import LOCALHOST, STOP_TIMEOUT_S

logger = logging.getLogger("shardcache.testing")

_T = TypeVar("_T")

_RECV_SIZE = 256 * 1024
_HIGH_WATER = 4 * 1024 * 1024  # stop reading a side while this much is queued towards the other
_LINGER_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


class _Pipe:
    """One direction of a proxied connection: chunks stamped with the time they are due."""

    __slots__ = ("blocked", "chunks", "eof_read", "eof_sent", "offset", "pending", "timer")

    def __init__(self) -> None:
        self.chunks: collections.deque[tuple[float, bytes]] = collections.deque()  # b"" = EOF
        self.offset = 0  # bytes of chunks[0] already sent
        self.pending = 0  # bytes queued, not yet sent
        self.eof_read = False
        self.eof_sent = False
        self.blocked = False  # waiting for the destination to become writable
        self.timer: float | None = None  # due time of the scheduled flush, if any

    def clear(self) -> None:
        self.chunks.clear()
        self.offset = self.pending = 0
        self.blocked = False


class _Conn:
    __slots__ = ("c2u", "client", "closed", "cmask", "connecting", "silent", "u2c", "umask", "upstream")

    def __init__(self, client: socket.socket) -> None:
        self.client = client
        self.upstream: socket.socket | None = None
        self.connecting = False
        self.silent = False  # blackholed: swallow everything, forward nothing
        self.closed = False
        self.c2u = _Pipe()
        self.u2c = _Pipe()
        self.cmask = 0  # selector masks currently registered
        self.umask = 0


class FaultProxy:
    """A userspace TCP proxy from ``127.0.0.1:<port>`` to a target, with injectable faults.

    Modes (each call takes effect for existing connections before it returns):

    - normal pass-through, optionally with ``set_latency(s)``: every chunk is held ``s`` seconds in
      each direction (so a round trip gains ``2*s``); order is preserved, pipelined data is not
      serialised;
    - ``blackhole()``: connections are accepted and data swallowed, nothing is ever answered;
      existing connections go silent too (their upstream side is closed);
    - ``reset()``: all client connections are closed with RST (SO_LINGER 0); new ones are accepted
      and reset at once, until ``heal()``;
    - ``heal()``: back to pass-through. Connections that were silenced by a blackhole lost data, so
      heal resets them; clients reconnect.

    One selector thread serves all connections; ``close()`` (or the context manager) stops it
    within a bounded time and closes every socket. Thread-safe: all methods may be called from any
    thread; control calls are executed by the proxy thread and wait for it (bounded).
    """

    def __init__(self, target_host: str, target_port: int, *, listen_host: str = LOCALHOST) -> None:
        self._target = (target_host, int(target_port))
        self._latency = 0.0
        self._mode: Literal["normal", "blackhole", "reset"] = "normal"
        self._conns: set[_Conn] = set()
        self._timers: list[tuple[float, int, _Conn, _Pipe]] = []
        self._seq = itertools.count()
        self._commands: queue.SimpleQueue[tuple[Callable[[], Any], threading.Event, list[Any]]] = (
            queue.SimpleQueue()
        )
        self._stopping = False
        self._closed = False
        self._close_lock = threading.Lock()
        self._sel = selectors.DefaultSelector()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._wake_r, self._wake_w = socket.socketpair()
        try:
            self._listener.bind((listen_host, 0))
            self._listener.listen(128)
            self._listener.setblocking(False)
            self._wake_r.setblocking(False)
            self._wake_w.setblocking(False)
            self._sel.register(self._listener, selectors.EVENT_READ, "listener")
            self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        except BaseException:
            self._close_sockets()
            raise
        self.host: str = listen_host
        self.port: int = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._run, name=f"FaultProxy-{self.port}", daemon=True)
        self._thread.start()

    # ---- public control surface ---------------------------------------------------------------
    @property
    def spec(self) -> str:
        """``"127.0.0.1:PORT"``: point clients here instead of at the target."""
        return f"{self.host}:{self.port}"

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def target(self) -> tuple[str, int]:
        return self._target

    def set_target(self, host: str, port: int) -> None:
        """Send new connections to another target (e.g. a restarted container's new port)."""
        self._call(lambda: setattr(self, "_target", (host, int(port))))

    def set_latency(self, seconds: float) -> None:
        """Hold each chunk ``seconds`` in each direction from now on (0 = no added delay)."""
        if seconds < 0:
            raise ValueError(f"latency must be >= 0, got {seconds!r}")
        self._call(lambda: setattr(self, "_latency", float(seconds)))

    def blackhole(self) -> None:
        """Accept connections, swallow all data, never answer; existing connections go silent."""
        self._call(self._do_blackhole)

    def reset(self) -> None:
        """RST every client connection now, and every new one until :meth:`heal`."""
        self._call(self._do_reset)

    def heal(self) -> None:
        """Back to pass-through (latency unchanged); connections silenced by a blackhole are reset."""
        self._call(self._do_heal)

    def connection_count(self) -> int:
        """Client connections currently open through the proxy."""
        result: int = self._call(lambda: len(self._conns))
        return result

    def close(self) -> None:
        """Stop the proxy thread (bounded) and close every socket. Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        if self._thread.is_alive():
            self._stopping = True
            self._wake()
            self._thread.join(timeout=STOP_TIMEOUT_S)
            if self._thread.is_alive():
                logger.warning("FaultProxy %s: thread did not stop within %s s", self.spec, STOP_TIMEOUT_S)
                return  # it still owns the sockets; it closes them when it ends
        self._close_sockets()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<FaultProxy {self.spec} -> {self._target[0]}:{self._target[1]} {self._mode}>"

    # ---- plumbing between threads -------------------------------------------------------------
    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full buffer: a wake-up is already pending
            self._wake_w.send(b"x")

    def _call(self, fn: Callable[[], _T], timeout_s: float = STOP_TIMEOUT_S) -> _T:
        if threading.current_thread() is self._thread:
            return fn()
        if self._closed or not self._thread.is_alive():
            raise RuntimeError(f"{self!r} is closed")
        done = threading.Event()
        box: list[Any] = []
        self._commands.put((fn, done, box))
        self._wake()
        if not done.wait(timeout_s):
            raise TimeoutError(f"{self!r}: proxy thread did not respond within {timeout_s} s")
        if box and isinstance(box[0], BaseException):
            raise box[0]
        result: _T = box[1]
        return result

    def _run_commands(self) -> None:
        while True:
            try:
                fn, done, box = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                box[:] = [None, fn()]
            except Exception as exc:
                box[:] = [exc]
            done.set()

    # ---- the event loop (proxy thread only) ---------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping:
                timeout = None
                if self._timers:
                    timeout = max(0.0, self._timers[0][0] - time.monotonic())
                for key, mask in self._sel.select(timeout):
                    if key.data == "listener":
                        self._accept()
                    elif key.data == "wake":
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(4096)
                        self._run_commands()
                    else:
                        conn, is_client = key.data
                        if conn.closed or key.fileobj is not (conn.client if is_client else conn.upstream):
                            continue  # stale event for a socket closed earlier in this batch
                        if mask & selectors.EVENT_WRITE:
                            self._on_writable(conn, is_client)
                        if mask & selectors.EVENT_READ and not conn.closed:
                            self._on_readable(conn, is_client)
                        if not conn.closed:
                            self._refresh(conn)
                self._run_timers()
        except Exception:
            logger.exception("FaultProxy %s: event loop crashed", self.spec)
        finally:
            for conn in list(self._conns):
                self._abort(conn, rst=True)
            self._close_sockets()
            while True:  # release callers still waiting
                try:
                    _fn, done, box = self._commands.get_nowait()
                except queue.Empty:
                    break
                box[:] = [RuntimeError(f"{self!r} is closed")]
                done.set()

    def _close_sockets(self) -> None:
        with contextlib.suppress(Exception):
            self._sel.close()
        for s in (self._listener, self._wake_r, self._wake_w):
            s.close()

    def _accept(self) -> None:
        for _ in range(64):
            try:
                client, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: keep serving the others
                logger.warning("FaultProxy %s: accept failed: %s", self.spec, exc)
                return
            if self._mode == "reset":
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
                client.close()
                continue
            client.setblocking(False)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(client)
            self._conns.add(conn)
            if self._mode == "blackhole":
                conn.silent = True
            else:
                self._connect_upstream(conn)
            if not conn.closed:
                self._refresh(conn)

    def _connect_upstream(self, conn: _Conn) -> None:
        up = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        up.setblocking(False)
        up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.upstream = up
        err = up.connect_ex(self._target)
        if err == 0:
            return
        if err in (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
            conn.connecting = True
            return
        self._abort(conn, rst=True)  # target down: the client sees a reset, like a refusal

    def _refresh(self, conn: _Conn) -> None:
        """Register each socket for what it needs now: reads unless backed up, writes when blocked."""
        read, write = selectors.EVENT_READ, selectors.EVENT_WRITE
        if conn.silent:
            cmask = read
        else:
            cmask = read if not conn.c2u.eof_read and conn.c2u.pending < _HIGH_WATER else 0
            cmask |= write if conn.u2c.blocked else 0
        conn.cmask = self._set_mask(conn.client, conn.cmask, cmask, (conn, True))
        if conn.upstream is not None:
            if conn.connecting:
                umask = write
            else:
                umask = read if not conn.u2c.eof_read and conn.u2c.pending < _HIGH_WATER else 0
                umask |= write if conn.c2u.blocked else 0
            conn.umask = self._set_mask(conn.upstream, conn.umask, umask, (conn, False))

    def _set_mask(self, sock: socket.socket, old: int, new: int, data: tuple[_Conn, bool]) -> int:
        if old == new:
            return new
        if old == 0:
            self._sel.register(sock, new, data)
        elif new == 0:
            self._sel.unregister(sock)
        else:
            self._sel.modify(sock, new, data)
        return new

    def _on_readable(self, conn: _Conn, is_client: bool) -> None:
        sock = conn.client if is_client else conn.upstream
        assert sock is not None
        try:
            data = sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._abort(conn, rst=True)
            return
        if conn.silent:
            if not data:
                if is_client:
                    self._abort(conn, rst=False)
                else:
                    self._drop_upstream(conn)
            return
        pipe = conn.c2u if is_client else conn.u2c
        if not data:
            pipe.eof_read = True
        pipe.chunks.append((time.monotonic() + self._latency, data))
        pipe.pending += len(data)
        self._flush(conn, pipe)

    def _on_writable(self, conn: _Conn, is_client: bool) -> None:
        if not is_client and conn.connecting:
            assert conn.upstream is not None
            err = conn.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._abort(conn, rst=True)
                return
            conn.connecting = False
            self._flush(conn, conn.c2u)
            return
        pipe = conn.u2c if is_client else conn.c2u
        pipe.blocked = False
        self._flush(conn, pipe)

    def _flush(self, conn: _Conn, pipe: _Pipe) -> None:
        """Send every due chunk of ``pipe``; schedule a timer for the next one."""
        to_upstream = pipe is conn.c2u
        dst = conn.upstream if to_upstream else conn.client
        if dst is None or conn.silent or pipe.blocked or (to_upstream and conn.connecting):
            return
        now = time.monotonic()
        while pipe.chunks:
            due, data = pipe.chunks[0]
            if due > now:
                if pipe.timer is None or due < pipe.timer:
                    pipe.timer = due
                    heapq.heappush(self._timers, (due, next(self._seq), conn, pipe))
                return
            if not data:  # EOF: pass the half-close on
                pipe.chunks.popleft()
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)
                pipe.eof_sent = True
                if conn.c2u.eof_sent and conn.u2c.eof_sent:
                    self._abort(conn, rst=False)
                return
            try:
                sent = dst.send(memoryview(data)[pipe.offset :])
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._abort(conn, rst=True)
                return
            pipe.offset += sent
            pipe.pending -= sent
            if pipe.offset < len(data):
                pipe.blocked = True
                return
            pipe.chunks.popleft()
            pipe.offset = 0

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            due, _seq, conn, pipe = heapq.heappop(self._timers)
            if conn.closed:
                continue
            if pipe.timer == due:
                pipe.timer = None
            self._flush(conn, pipe)
            if not conn.closed:
                self._refresh(conn)

    def _drop_upstream(self, conn: _Conn) -> None:
        if conn.upstream is not None:
            if conn.umask:
                self._sel.unregister(conn.upstream)
            conn.upstream.close()
            conn.upstream = None
            conn.umask = 0
            conn.connecting = False

    def _abort(self, conn: _Conn, *, rst: bool) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._conns.discard(conn)
        self._drop_upstream(conn)
        if conn.cmask:
            self._sel.unregister(conn.client)
        if rst:
            with contextlib.suppress(OSError):
                conn.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        conn.client.close()
        conn.c2u.clear()
        conn.u2c.clear()

    def _do_blackhole(self) -> None:
        self._mode = "blackhole"
        for conn in list(self._conns):
            conn.silent = True
            conn.c2u.clear()
            conn.u2c.clear()
            self._drop_upstream(conn)
            self._refresh(conn)

    def _do_reset(self) -> None:
        self._mode = "reset"
        for conn in list(self._conns):
            self._abort(conn, rst=True)

    def _do_heal(self) -> None:
        self._mode = "normal"
        for conn in list(self._conns):
            if conn.silent:
                self._abort(conn, rst=True)
