"""Test servers: the node interface every backend implements, and local ``memcached`` processes.

:class:`MemcachedNode` is what tests drive (start, kill, stop, pause, unpause, restart);
:class:`ProcessNode` runs the local binary. Containers are in ``_docker``, clusters of either in
``_cluster``. Readiness is a ``version`` round trip from the client side (:func:`probe_version`).
The constants at the top are shared by the other modules of this package.
"""

from __future__ import annotations

import abc
import atexit
import contextlib
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import IO, TypeVar

logger = logging.getLogger("shardcache.testing")

LOCALHOST = "127.0.0.1"
STOP_TIMEOUT_S = 5.0  # bound on every wait for a server, container or thread to stop

_Self = TypeVar("_Self", bound="MemcachedNode")


class ServerSetupError(RuntimeError):
    """A test server could not be started: binary or image missing, Docker down, not ready in time."""


# --------------------------------------------------------------------------------------------------
# raw protocol helpers
# --------------------------------------------------------------------------------------------------
def _roundtrip(
    host: str, port: int, request: bytes, *, timeout_s: float, ssl_context: ssl.SSLContext | None = None
) -> bytes:
    """Send one single-line-reply command; return the reply line (without CRLF)."""
    deadline = time.monotonic() + timeout_s
    with socket.create_connection((host, port), timeout=timeout_s) as raw:
        sock: socket.socket = raw
        if ssl_context is not None:
            sock = ssl_context.wrap_socket(raw, server_hostname=host)
        try:
            sock.sendall(request)
            data = b""
            while not data.endswith(b"\r\n"):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{host}:{port} did not answer {request!r} in {timeout_s} s")
                sock.settimeout(left)
                chunk = sock.recv(4096)
                if not chunk:
                    raise ConnectionError(f"{host}:{port} closed the connection")
                data += chunk
                if len(data) > 65536:
                    raise ConnectionError(f"{host}:{port}: reply too long")
            return data[:-2]
        finally:
            if sock is not raw:
                sock.close()


def probe_version(
    host: str, port: int, *, timeout_s: float = 0.5, ssl_context: ssl.SSLContext | None = None
) -> str | None:
    """Return the version string if a memcached answers ``version`` at host:port in time, else None.

    Thread-safe (one short-lived connection per call).
    """
    try:
        reply = _roundtrip(host, port, b"version\r\n", timeout_s=timeout_s, ssl_context=ssl_context)
    except (OSError, ssl.SSLError):
        return None
    if not reply.startswith(b"VERSION "):
        return None
    return reply[len(b"VERSION ") :].decode("ascii", "replace")


def _free_port(host: str = LOCALHOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


# --------------------------------------------------------------------------------------------------
# nodes
# --------------------------------------------------------------------------------------------------
class MemcachedNode(abc.ABC):
    """One memcached server on 127.0.0.1 that a test can start, kill, stop, pause and restart.

    Not thread-safe: drive a node's lifecycle from one thread at a time. Reading ``port``/``spec``
    from other threads is fine. Nodes are context managers (enter starts, exit closes).
    """

    host: str = LOCALHOST

    def __init__(self, *, ready_timeout_s: float) -> None:
        self.ready_timeout_s = ready_timeout_s
        self._paused = False
        self._closed = False
        self._atexit_registered = False

    @property
    @abc.abstractmethod
    def port(self) -> int:
        """The current TCP port (a container's port can change after it is started again)."""

    @property
    def spec(self) -> str:
        """``"127.0.0.1:PORT"``, the form shardcache and pymemcache accept."""
        return f"{self.host}:{self.port}"

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)``, e.g. for ``pymemcache.Client(node.address)`` or ``FaultProxy(*node.address)``."""
        return (self.host, self.port)

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        """A client TLS context for this node, or None when it speaks plain TCP."""
        return None

    @abc.abstractmethod
    def start(self) -> None:
        """Start the server (again, after ``kill``/``stop``) and wait until it answers ``version``."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop gracefully (SIGTERM, bounded wait, then SIGKILL). ``start`` brings it back empty."""

    @abc.abstractmethod
    def kill(self) -> None:
        """Crash the server (SIGKILL): new connections are refused, open ones are reset."""

    @abc.abstractmethod
    def pause(self) -> None:
        """Freeze the server (SIGSTOP / docker pause): TCP connects still succeed, nothing answers."""

    @abc.abstractmethod
    def unpause(self) -> None:
        """Let a paused server run again; queued requests are then answered."""

    @abc.abstractmethod
    def is_running(self) -> bool:
        """True while the server process exists (paused counts as running)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop the server and release everything (container removed). Idempotent."""

    def is_paused(self) -> bool:
        """True between ``pause()`` and ``unpause()``/``kill()``/``stop()``."""
        return self._paused and self.is_running()

    def restart(self) -> None:
        """``stop()`` then ``start()``: the server comes back with an empty cache."""
        self.stop()
        self.start()

    def version(self, timeout_s: float = 2.0) -> str:
        """The server's version string; raises ``TimeoutError``/``OSError`` if it does not answer."""
        reply = _roundtrip(
            self.host, self.port, b"version\r\n", timeout_s=timeout_s, ssl_context=self.ssl_context
        )
        if not reply.startswith(b"VERSION "):
            raise ConnectionError(f"{self.spec}: unexpected reply {reply!r}")
        return reply[len(b"VERSION ") :].decode("ascii", "replace")

    def flush_all(self, timeout_s: float = 2.0) -> None:
        """Empty the cache with ``flush_all`` over a fresh connection."""
        reply = _roundtrip(
            self.host, self.port, b"flush_all\r\n", timeout_s=timeout_s, ssl_context=self.ssl_context
        )
        if reply != b"OK":
            raise ConnectionError(f"{self.spec}: flush_all answered {reply!r}")

    def _wait_ready(self, died: Callable[[], str | None]) -> None:
        """Poll ``version`` until it answers; ``died()`` returns a reason when the server is gone."""
        deadline = time.monotonic() + self.ready_timeout_s
        delay = 0.005
        while True:
            reason = died()
            if reason is not None:
                raise ServerSetupError(f"memcached {self.spec} exited during start-up: {reason}")
            if probe_version(self.host, self.port, timeout_s=0.5, ssl_context=self.ssl_context) is not None:
                return
            if time.monotonic() >= deadline:
                raise ServerSetupError(
                    f"memcached {self.spec} did not answer 'version' within {self.ready_timeout_s} s"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def _register_atexit(self) -> None:
        if not self._atexit_registered:
            atexit.register(self.close)
            self._atexit_registered = True

    def _unregister_atexit(self) -> None:
        if self._atexit_registered:
            atexit.unregister(self.close)
            self._atexit_registered = False

    def __enter__(self: _Self) -> _Self:
        if not self.is_running():
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "paused" if self.is_paused() else "running" if self.is_running() else "stopped"
        return f"<{type(self).__name__} {self.spec} {state}>"


class ProcessNode(MemcachedNode):
    """A local ``memcached`` process on 127.0.0.1 (``-l 127.0.0.1 -p PORT -U 0 [memcached_args]``).

    ``port=None`` picks a free port; the node keeps that port across ``kill``/``start``. Extra
    arguments are appended, e.g. ``("-m", "64", "-I", "2m")``. ``tls=(certfile, keyfile)`` adds
    ``-Z -o ssl_chain_cert=CERT,ssl_key=KEY`` (see :func:`make_self_signed_cert`); clients then need
    ``node.ssl_context``. Not thread-safe (see :class:`MemcachedNode`).
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        memcached_args: Sequence[str] = (),
        tls: tuple[str | os.PathLike[str], str | os.PathLike[str]] | None = None,
        memcached: str | None = None,
        ready_timeout_s: float = 10.0,
    ) -> None:
        super().__init__(ready_timeout_s=ready_timeout_s)
        if isinstance(memcached_args, str):
            raise TypeError("memcached_args must be a sequence of arguments, not a string")
        binary = memcached or shutil.which("memcached")
        if binary is None:
            raise ServerSetupError(
                "the memcached binary is not on PATH: install it (Debian: apt-get install memcached, "
                "or run tools/setup-memcached.sh)"
            )
        self.binary = binary
        self.memcached_args = tuple(memcached_args)
        self.tls = (str(tls[0]), str(tls[1])) if tls is not None else None
        self._port_fixed = port is not None
        self._port = port if port is not None else _free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self._ssl_context: ssl.SSLContext | None = None
        if self.tls is not None:
            ctx = ssl.create_default_context(cafile=self.tls[0])
            ctx.check_hostname = False  # the cert names 127.0.0.1; tests connect by address
            self._ssl_context = ctx

    @property
    def port(self) -> int:
        return self._port

    @property
    def pid(self) -> int | None:
        """PID of the running memcached process, or None."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        return self._ssl_context

    def command(self) -> list[str]:
        """The memcached command line this node runs."""
        cmd = [self.binary, "-l", self.host, "-p", str(self._port), "-U", "0"]
        if os.geteuid() == 0:
            cmd += ["-u", "root"]  # memcached refuses to run as root without -u
        if self.tls is not None:
            cmd += ["-Z", "-o", f"ssl_chain_cert={self.tls[0]},ssl_key={self.tls[1]}"]
        return cmd + list(self.memcached_args)

    def start(self) -> None:
        if self._closed:
            raise ServerSetupError(f"{self!r} is closed")
        if self.is_running():
            if self._paused:
                self.unpause()
            return
        attempts = 1 if self._port_fixed else 5
        for attempt in range(attempts):
            self._spawn()
            try:
                self._wait_ready(self._exit_reason)
                self._register_atexit()
                return
            except ServerSetupError as exc:
                self._reap(signal.SIGKILL)
                # a free port picked by us may have been taken in between: pick another
                if "Address already in use" in str(exc) and attempt + 1 < attempts:
                    self._port = _free_port()
                    continue
                raise

    def _spawn(self) -> None:
        if self._stderr is not None:
            self._stderr.close()
        self._stderr = tempfile.TemporaryFile(prefix="shardcache-memcached-")  # noqa: SIM115 - lives with the process
        self._proc = subprocess.Popen(
            self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._stderr
        )
        self._paused = False

    def _exit_reason(self) -> str | None:
        if self._proc is None or self._proc.poll() is None:
            return None
        err = b""
        if self._stderr is not None:
            self._stderr.seek(0)
            err = self._stderr.read(4096)
        return f"exit code {self._proc.returncode}: {err.decode(errors='replace').strip()}"

    def _reap(self, sig: int) -> None:
        proc, self._proc = self._proc, None
        self._paused = False
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
                if sig != signal.SIGKILL:
                    proc.send_signal(signal.SIGCONT)  # a stopped process only sees SIGTERM when resumed
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                logger.warning("memcached pid %s ignored signal %s; killing it", proc.pid, sig)
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT_S)

    def stop(self) -> None:
        # memcached notices SIGTERM on its next 1 s clock tick, so this takes up to a second
        self._reap(signal.SIGTERM)

    def kill(self) -> None:
        self._reap(signal.SIGKILL)

    def pause(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            raise ServerSetupError(f"{self.spec} is not running")
        self._proc.send_signal(signal.SIGSTOP)
        self._paused = True
        # SIGSTOP is delivered asynchronously: a request sent right after kill() could still be
        # answered. Return only once every thread of the process is stopped (bounded: 5 s).
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and not _all_threads_stopped(self._proc.pid):
            time.sleep(0.001)

    def unpause(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGCONT)
        self._paused = False

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def close(self) -> None:
        """SIGKILL the process (fast: a test server has nothing to save) and release its files."""
        self._reap(signal.SIGKILL)
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        self._closed = True
        self._unregister_atexit()


def _all_threads_stopped(pid: int) -> bool:
    """True when every thread of ``pid`` is in the stopped state (``T``), read from /proc; True
    where /proc is unavailable (nothing better to wait for)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return True
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", encoding="ascii", errors="replace") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue  # the thread is gone
        if state not in ("T", "t"):
            return False
    return True
