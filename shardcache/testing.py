"""Real-server helpers for tests: local memcached clusters and a TCP fault proxy.

Users can import this module in their own test suites; it needs only the standard library (the
Docker backend imports ``testcontainers`` lazily, the TLS helper prefers ``cryptography``)::

    from shardcache.testing import FaultProxy, LocalCluster

    with LocalCluster(3) as cluster:              # backend="auto": containers if Docker works
        client = shardcache.Client(cluster.specs)  # ["127.0.0.1:41234", ...]
        cluster.nodes[1].kill()                    # a dead node: connections are refused
        cluster.nodes[1].start()                   # back, empty (a container may get a new port)
        cluster.nodes[2].pause()                   # a hung node: accepts TCP, never answers
        with FaultProxy(*cluster.nodes[0].address) as proxy:
            proxy.set_latency(0.005)               # +5 ms each way
            proxy.blackhole(); proxy.reset(); proxy.heal()

Nodes:

- :class:`ProcessNode` runs the local ``memcached`` binary on a free 127.0.0.1 port
  (``-l 127.0.0.1 -p PORT -U 0``), optionally with TLS (``tls=(certfile, keyfile)``).
- :class:`ContainerNode` runs the ``memcached:1.6`` image through testcontainers, published on
  127.0.0.1 only (build the image with ``tools/setup-docker.sh`` where no registry is reachable).
  A container started again after ``kill``/``stop`` gets a new host port: read ``node.port`` again.

Readiness is always a ``version`` round trip from the client side (the image has no shell). Every
wait is bounded, and everything started is stopped by its PID or container id, also at interpreter
exit if the caller forgot ``close()``.

This module holds two ideas (servers and the proxy); if either grows, split it into a package.
"""

from __future__ import annotations

import abc
import atexit
import collections
import contextlib
import datetime
import errno
import heapq
import importlib
import ipaddress
import itertools
import logging
import os
import queue
import selectors
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal, TypeVar

__all__ = [
    "DEFAULT_IMAGE",
    "ContainerNode",
    "FaultProxy",
    "LocalCluster",
    "MemcachedNode",
    "ProcessNode",
    "ServerSetupError",
    "docker_unavailable_reason",
    "make_self_signed_cert",
    "probe_version",
]

logger = logging.getLogger("shardcache.testing")

DEFAULT_IMAGE = "memcached:1.6"
LOCALHOST = "127.0.0.1"
_MEMCACHED_PORT = 11211
_STOP_TIMEOUT_S = 5.0

_T = TypeVar("_T")
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
                proc.wait(timeout=_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                logger.warning("memcached pid %s ignored signal %s; killing it", proc.pid, sig)
                proc.kill()
                proc.wait(timeout=_STOP_TIMEOUT_S)

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


def _import_docker_container() -> Any:
    """Import testcontainers' DockerContainer after pointing it at 127.0.0.1 without Ryuk."""
    os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")  # its reaper image can't be pulled here
    os.environ.setdefault("TESTCONTAINERS_HOST_OVERRIDE", LOCALHOST)  # else /.dockerenv -> bridge gateway
    try:
        config = importlib.import_module("testcontainers.core.config")
        module = importlib.import_module("testcontainers.core.container")
    except ImportError as exc:
        raise ServerSetupError(
            "the docker backend needs testcontainers: pip install 'testcontainers>=4.8'"
        ) from exc
    tc_config = config.testcontainers_config
    if not tc_config.tc_host_override:  # read at import time; testcontainers may be imported already
        tc_config.tc_host_override = os.environ["TESTCONTAINERS_HOST_OVERRIDE"]
    return module.DockerContainer


def docker_unavailable_reason(image: str = DEFAULT_IMAGE, timeout_s: float = 10.0) -> str | None:
    """None if a Docker engine answers and ``image`` exists locally, else why not (bounded in time).

    Uses the docker SDK when installed (it comes with testcontainers), else the ``docker`` CLI.
    Thread-safe.
    """
    try:
        docker_sdk: Any = importlib.import_module("docker")
    except ImportError:
        docker_sdk = None
    if docker_sdk is not None:
        try:
            client = docker_sdk.from_env(timeout=max(1, round(timeout_s)))
        except Exception as exc:  # DockerException: no socket, bad DOCKER_HOST, ...
            return f"no Docker engine answers ({exc})"
        try:
            client.ping()
            client.images.get(image)
        except docker_sdk.errors.ImageNotFound:
            return f"image {image} is not present locally (run tools/setup-docker.sh)"
        except Exception as exc:
            return f"no Docker engine answers ({exc})"
        finally:
            client.close()
        return None
    if shutil.which("docker") is None:
        return "neither the docker SDK nor the docker CLI is installed"
    try:
        info = subprocess.run(
            ["docker", "image", "inspect", image], capture_output=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        return f"'docker image inspect' did not answer within {timeout_s} s"
    if info.returncode != 0:
        return f"'docker image inspect {image}' failed: {info.stderr.decode(errors='replace').strip()}"
    return None


class ContainerNode(MemcachedNode):
    """memcached in a container (testcontainers ``DockerContainer(image)``), published on 127.0.0.1.

    Runs ``memcached -U 0 [memcached_args]``. The image must exist locally (no pull is attempted):
    ``tools/setup-docker.sh`` builds ``memcached:1.6`` from the host's binary. After ``kill``/``stop``
    and ``start``, Docker assigns a new host port: read ``port``/``spec`` again. Containers carry the
    label ``org.shardcache.testing=1``. Not thread-safe (see :class:`MemcachedNode`).
    """

    def __init__(
        self,
        *,
        image: str = DEFAULT_IMAGE,
        memcached_args: Sequence[str] = (),
        ready_timeout_s: float = 30.0,
    ) -> None:
        super().__init__(ready_timeout_s=ready_timeout_s)
        if isinstance(memcached_args, str):
            raise TypeError("memcached_args must be a sequence of arguments, not a string")
        self.image = image
        self.memcached_args = tuple(memcached_args)
        self._tc: Any = None  # testcontainers DockerContainer
        self._port = 0

    @property
    def port(self) -> int:
        return self._port

    @property
    def container_id(self) -> str | None:
        return str(self._tc.get_container_id()) if self._tc is not None else None

    def _wrapped(self) -> Any:
        if self._tc is None:
            raise ServerSetupError(f"{type(self).__name__} was never started")
        return self._tc.get_wrapped_container()

    def _status(self) -> str:
        if self._tc is None:
            return "absent"
        try:
            container = self._wrapped()
            container.reload()
            return str(container.status)
        except Exception:  # removed behind our back
            return "absent"

    def _lookup_port(self) -> int:
        container = self._wrapped()
        container.reload()
        bindings = (container.attrs.get("NetworkSettings", {}).get("Ports") or {}).get(
            f"{_MEMCACHED_PORT}/tcp"
        )
        for binding in bindings or []:
            if binding.get("HostIp") in (LOCALHOST, "") and binding.get("HostPort"):
                return int(binding["HostPort"])
        raise ServerSetupError(
            f"container {self.container_id} has no 127.0.0.1 binding for {_MEMCACHED_PORT}"
        )

    def start(self) -> None:
        if self._closed:
            raise ServerSetupError(f"{self!r} is closed")
        status = self._status()
        if status == "paused":
            self.unpause()
            return
        if status == "running":
            return
        if self._tc is None:
            reason = docker_unavailable_reason(self.image)
            if reason is not None:
                raise ServerSetupError(f"cannot start a {self.image} container: {reason}")
            docker_container = _import_docker_container()
            tc = docker_container(self.image, labels={"org.shardcache.testing": "1"})
            tc.with_command(["memcached", "-U", "0", *self.memcached_args])
            ports: dict[str, Any] = tc.ports
            ports[f"{_MEMCACHED_PORT}/tcp"] = (LOCALHOST, None)  # 127.0.0.1 only, random host port
            self._register_atexit()
            try:
                tc.start()
            except BaseException:
                with contextlib.suppress(Exception):
                    tc.stop()
                raise
            self._tc = tc
        else:
            self._wrapped().start()
        self._paused = False
        self._port = self._lookup_port()
        self._wait_ready(self._exit_reason)

    def _exit_reason(self) -> str | None:
        status = self._status()
        if status in ("running", "paused", "created", "restarting"):
            return None
        logs = ""
        with contextlib.suppress(Exception):
            logs = self._wrapped().logs(tail=20).decode(errors="replace").strip()
        return f"container status {status}: {logs}"

    def stop(self) -> None:
        if self._status() in ("running", "paused"):
            self.unpause()
            self._wrapped().stop(timeout=3)
        self._paused = False

    def kill(self) -> None:
        if self._status() in ("running", "paused"):
            self.unpause()  # Docker 20.10 refuses to kill a paused container
            self._wrapped().kill()
            self._wrapped().wait(timeout=_STOP_TIMEOUT_S)
        self._paused = False

    def pause(self) -> None:
        self._wrapped().pause()
        self._paused = True

    def unpause(self) -> None:
        if self._status() == "paused":
            self._wrapped().unpause()
        self._paused = False

    def is_running(self) -> bool:
        return self._status() in ("running", "paused")

    def close(self) -> None:
        tc, self._tc = self._tc, None
        if tc is not None:
            with contextlib.suppress(Exception):
                if tc.get_wrapped_container().status == "paused":
                    tc.get_wrapped_container().unpause()
            tc.stop()  # docker rm -f, and closes its docker client
        self._paused = False
        self._closed = True
        self._unregister_atexit()

    def __repr__(self) -> str:
        return f"<ContainerNode {self.spec} {self._status()}>"


# --------------------------------------------------------------------------------------------------
# cluster
# --------------------------------------------------------------------------------------------------
Backend = Literal["auto", "docker", "process"]


class LocalCluster:
    """``n`` independent memcached servers on 127.0.0.1, started in parallel when constructed.

    ``backend``: ``"docker"`` (containers, see :class:`ContainerNode`), ``"process"`` (local binary,
    :class:`ProcessNode`) or ``"auto"`` (docker when an engine answers and the image exists locally,
    else process); ``.backend`` tells which one runs. ``memcached_args`` go to every server.
    ``close()`` stops everything the cluster started; it is also a context manager.
    Not thread-safe: start, stop and change nodes from one thread; reading ``specs`` is fine.
    """

    def __init__(
        self,
        n: int = 3,
        backend: Backend = "auto",
        memcached_args: Sequence[str] = (),
        *,
        image: str = DEFAULT_IMAGE,
    ) -> None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n!r}")
        if backend not in ("auto", "docker", "process"):
            raise ValueError(f"backend must be 'auto', 'docker' or 'process', got {backend!r}")
        if isinstance(memcached_args, str):
            raise TypeError("memcached_args must be a sequence of arguments, not a string")
        self.image = image
        self.memcached_args = tuple(memcached_args)
        self.backend: Literal["docker", "process"] = "process"
        if backend != "process":
            reason = docker_unavailable_reason(image)
            if reason is None:
                self.backend = "docker"
            elif backend == "docker":
                raise ServerSetupError(f"backend 'docker' requested but {reason}")
            else:
                logger.info("LocalCluster: using processes, docker is not usable: %s", reason)
        self.nodes: list[MemcachedNode] = []
        atexit.register(self.close)
        try:
            self.add_nodes(n)
        except BaseException:
            self.close()
            raise

    def _new_node(self) -> MemcachedNode:
        if self.backend == "docker":
            return ContainerNode(image=self.image, memcached_args=self.memcached_args)
        return ProcessNode(memcached_args=self.memcached_args)

    def add_nodes(self, count: int = 1) -> list[MemcachedNode]:
        """Start ``count`` more servers (in parallel) and return them; they join ``nodes``."""
        new = [self._new_node() for _ in range(count)]
        self.nodes.extend(new)  # before starting, so close() cleans up after a partial failure
        with ThreadPoolExecutor(max_workers=min(count, 8), thread_name_prefix="LocalCluster") as pool:
            futures = [pool.submit(node.start) for node in new]
        for future in futures:
            exc = future.exception()
            if exc is not None:
                raise exc
        return new

    @property
    def specs(self) -> list[str]:
        """``["127.0.0.1:PORT", ...]`` in node order (current ports)."""
        return [node.spec for node in self.nodes]

    def flush_all(self) -> None:
        """``flush_all`` on every running, unpaused node."""
        for node in self.nodes:
            if node.is_running() and not node.is_paused():
                node.flush_all()

    def close(self) -> None:
        """Stop and remove every server this cluster started (in parallel). Idempotent."""
        nodes, self.nodes = list(self.nodes), []
        if nodes:
            with ThreadPoolExecutor(max_workers=min(len(nodes), 8)) as pool:
                results = list(pool.map(_close_quietly, nodes))
            failed = [r for r in results if r]
            if failed:
                logger.warning("LocalCluster.close: %s", "; ".join(failed))
        atexit.unregister(self.close)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<LocalCluster {self.backend} {self.specs}>"


def _close_quietly(node: MemcachedNode) -> str:
    try:
        node.close()
    except Exception as exc:
        return f"{node.spec}: {exc!r}"
    return ""


# --------------------------------------------------------------------------------------------------
# TLS
# --------------------------------------------------------------------------------------------------
def make_self_signed_cert(
    directory: str | os.PathLike[str], common_name: str = LOCALHOST
) -> tuple[Path, Path]:
    """Write a self-signed certificate and its key (PEM) into ``directory``; return their paths.

    The certificate is valid for two days for ``common_name`` plus 127.0.0.1 and localhost. Uses
    the ``cryptography`` package if installed, else the ``openssl`` CLI. Thread-safe per directory.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = out / "memcached-cert.pem", out / "memcached-key.pem"
    try:
        importlib.import_module("cryptography.x509")
    except ImportError:
        _make_cert_openssl(cert_path, key_path, common_name)
    else:
        _make_cert_cryptography(cert_path, key_path, common_name)
    return cert_path, key_path


def _make_cert_cryptography(cert_path: Path, key_path: Path, common_name: str) -> None:
    from cryptography import x509  # noqa: PLC0415 - optional dependency
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from cryptography.x509.oid import NameOID  # noqa: PLC0415

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    sans: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address(LOCALHOST)),
    ]
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(common_name) != ipaddress.ip_address(LOCALHOST):
            sans.append(x509.IPAddress(ipaddress.ip_address(common_name)))
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_bytes)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _make_cert_openssl(cert_path: Path, key_path: Path, common_name: str) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise ServerSetupError("need the 'cryptography' package or the openssl CLI to make a TLS certificate")
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "2", "-subj", f"/CN={common_name}",
            "-addext", f"subjectAltName=IP:{LOCALHOST},DNS:localhost",
            "-keyout", str(key_path), "-out", str(cert_path),
        ],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    os.chmod(key_path, 0o600)


# --------------------------------------------------------------------------------------------------
# fault proxy
# --------------------------------------------------------------------------------------------------
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
            self._thread.join(timeout=_STOP_TIMEOUT_S)
            if self._thread.is_alive():
                logger.warning("FaultProxy %s: thread did not stop within %s s", self.spec, _STOP_TIMEOUT_S)
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

    def _call(self, fn: Callable[[], _T], timeout_s: float = _STOP_TIMEOUT_S) -> _T:
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
