"""The Docker probe of ``shardcache.testing`` closes every socket it opens, whatever the engine does.

A socket left open shows up later as ``ResourceWarning: unclosed <socket.socket ... family=1>`` in
whichever test happens to trigger the garbage collection (with warnings as errors, that test fails).
These tests use only AF_UNIX sockets in a temporary directory, never the network or a real engine.
"""

from __future__ import annotations

import contextlib
import gc
import os
import socket
import socketserver
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shardcache.testing import docker_unavailable_reason
from shardcache.testing._docker import _unix_socket_path

Reply = Callable[[bytes], bytes | None]  # request line -> raw reply (None: close without replying)


def _open_socket_fds() -> set[str]:
    fd_dir = Path("/proc/self/fd")
    found = set()
    for entry in fd_dir.iterdir() if fd_dir.is_dir() else ():
        with contextlib.suppress(OSError):
            if os.readlink(entry).startswith("socket:"):
                found.add(entry.name)
    return found


@contextlib.contextmanager
def no_socket_left_open(engine: FakeEngine | None = None) -> Iterator[None]:
    """Fail if the block leaves a socket open: checked before any garbage collection (an fd still
    open; ``engine`` must have seen every client hang up), then after one (a ResourceWarning from a
    socket that was never closed)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()  # earlier tests' garbage is not ours
    before = _open_socket_fds()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        yield
        if engine is not None:
            assert engine.wait_idle(), "the engine still has a connection open: the probe kept its end"
        still_open = _open_socket_fds() - before
        gc.collect()
    unclosed = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert not still_open, f"socket fds left open: {sorted(still_open)}"
    assert not unclosed, unclosed


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    # Short path: AF_UNIX paths are limited to ~107 bytes, pytest's tmp_path can exceed that.
    with tempfile.TemporaryDirectory(prefix="sc-") as name:
        yield Path(name)


class FakeEngine(socketserver.ThreadingUnixStreamServer):
    """A unix socket server answering each request line with ``reply(line)``: raw bytes, None to
    close at once, or ``HANG`` to say nothing until the client hangs up."""

    daemon_threads = True

    def __init__(self, path: Path, reply: Reply) -> None:
        self.reply = reply
        self.seen: list[bytes] = []
        self._open = 0
        self._idle = threading.Condition()
        super().__init__(str(path), _EngineHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._idle:
            self._open += 1
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        super().shutdown_request(request)
        with self._idle:
            self._open -= 1
            self._idle.notify_all()

    def wait_idle(self, timeout_s: float = 5.0) -> bool:
        """True once every connection accepted so far is closed on the server side too."""
        with self._idle:
            return self._idle.wait_for(lambda: self._open == 0, timeout_s)


class _EngineHandler(socketserver.StreamRequestHandler):
    server: FakeEngine

    def handle(self) -> None:
        line = self.rfile.readline().rstrip(b"\r\n")
        self.server.seen.append(line)
        answer = self.server.reply(line)
        if answer is HANG:
            self.request.settimeout(10)
            with contextlib.suppress(OSError):
                while self.request.recv(1024):  # until the client closes its end
                    pass
        elif answer is not None:
            self.wfile.write(answer)


HANG = b"<hang>"


@pytest.fixture
def fake_engine(socket_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Reply], FakeEngine]]:
    """Factory ``serve(reply)``: a :class:`FakeEngine`, set as DOCKER_HOST, stopped at teardown."""
    engines: list[FakeEngine] = []

    def serve(reply: Reply) -> FakeEngine:
        path = socket_dir / "docker.sock"
        engine = FakeEngine(path, reply)
        engines.append(engine)
        threading.Thread(target=engine.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        monkeypatch.setenv("DOCKER_HOST", f"unix://{path}")
        return engine

    yield serve
    for engine in engines:
        engine.shutdown()
        engine.server_close()


def _http(status: str) -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Length: 2\r\nConnection: close\r\n\r\nOK".encode()


def test_unix_socket_path_of_docker_host_defaults_to_var_run() -> None:
    assert _unix_socket_path("") == "/var/run/docker.sock"
    assert _unix_socket_path("unix:///nonexistent/docker.sock") == "/nonexistent/docker.sock"
    assert _unix_socket_path("tcp://127.0.0.1:2375") is None
    assert _unix_socket_path("ssh://user@host") is None


def test_probe_of_a_missing_socket_names_it_and_leaves_no_socket_open(
    socket_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = socket_dir / "nonexistent" / "docker.sock"
    monkeypatch.setenv("DOCKER_HOST", f"unix://{missing}")
    with no_socket_left_open():
        for _ in range(3):
            reason = docker_unavailable_reason()
            assert reason is not None
            assert f"unix://{missing}" in reason
            assert "FileNotFoundError" in reason


def test_probe_of_a_path_nobody_listens_on_leaves_no_socket_open(
    socket_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stale = socket_dir / "docker.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as gone:
        gone.bind(str(stale))  # the file stays, nobody listens: connection refused
    monkeypatch.setenv("DOCKER_HOST", f"unix://{stale}")
    with no_socket_left_open():
        reason = docker_unavailable_reason()
    assert reason is not None
    assert "ConnectionRefusedError" in reason


def test_probe_of_an_engine_that_accepts_then_closes_leaves_no_socket_open(
    fake_engine: Callable[[Reply], FakeEngine],
) -> None:
    engine = fake_engine(lambda line: None)
    with no_socket_left_open(engine):
        reason = docker_unavailable_reason()
    assert reason is not None
    assert "no Docker engine answers" in reason


def test_probe_of_an_engine_that_never_answers_gives_up_in_time(
    fake_engine: Callable[[Reply], FakeEngine],
) -> None:
    engine = fake_engine(lambda line: HANG)
    started = time.monotonic()
    with no_socket_left_open(engine):
        reason = docker_unavailable_reason(timeout_s=0.3)
    assert time.monotonic() - started < 5
    assert reason is not None
    assert "TimeoutError" in reason or "timed out" in reason


def test_probe_of_something_that_is_not_http_leaves_no_socket_open(
    fake_engine: Callable[[Reply], FakeEngine],
) -> None:
    engine = fake_engine(lambda line: b"ERROR\r\n")
    with no_socket_left_open(engine):
        reason = docker_unavailable_reason()
    assert reason is not None
    assert "not an HTTP reply" in reason


def test_probe_asks_for_ping_then_the_image_and_accepts_an_engine_that_has_it(
    fake_engine: Callable[[Reply], FakeEngine],
) -> None:
    engine = fake_engine(lambda line: _http("200 OK"))
    with no_socket_left_open(engine):
        assert docker_unavailable_reason("memcached:1.6") is None
    assert engine.seen == [b"GET /_ping HTTP/1.0", b"GET /images/memcached:1.6/json HTTP/1.0"]


def test_probe_reports_a_missing_image(fake_engine: Callable[[Reply], FakeEngine]) -> None:
    engine = fake_engine(lambda line: _http("200 OK") if b"/_ping" in line else _http("404 Not Found"))
    with no_socket_left_open(engine):
        reason = docker_unavailable_reason("memcached:1.6")
    assert reason == "image memcached:1.6 is not present locally (run tools/setup-docker.sh)"


def test_probe_reports_an_engine_that_fails_ping(fake_engine: Callable[[Reply], FakeEngine]) -> None:
    engine = fake_engine(lambda line: _http("500 Internal Server Error"))
    with no_socket_left_open(engine):
        reason = docker_unavailable_reason()
    assert reason is not None
    assert "HTTP 500" in reason
