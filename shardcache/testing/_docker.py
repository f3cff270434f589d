"""Test servers in containers: memcached through testcontainers, published on 127.0.0.1 only.

testcontainers (and the docker SDK that comes with it) is imported lazily, so the rest of
``shardcache.testing`` works without it.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

from shardcache.testing._nodes import LOCALHOST, STOP_TIMEOUT_S, MemcachedNode, ServerSetupError

DEFAULT_IMAGE = "memcached:1.6"
_MEMCACHED_PORT = 11211


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


_DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"
_MAX_STATUS_LINE = 8192


def _unix_socket_path(docker_host: str) -> str | None:
    """The socket path of a ``unix://`` Docker host (empty means the default), None for other schemes."""
    docker_host = docker_host.strip() or _DEFAULT_DOCKER_HOST
    if not docker_host.startswith("unix://"):
        return None
    return "/" + docker_host[len("unix://") :].lstrip("/")


def _http_status(socket_path: str, target: str, deadline: float) -> int:
    """``GET target`` from the Docker API on a unix socket; return the HTTP status code.

    One connection per request, closed on every path. (docker-py's ``UnixHTTPConnection.connect``
    leaves its socket open when ``connect`` fails -- docker/docker-py#3356 -- and the unclosed
    socket surfaces later, in whichever test triggers the garbage collection.)
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        sock.connect(socket_path)
        sock.sendall(f"GET {target} HTTP/1.0\r\nHost: docker\r\n\r\n".encode("ascii"))
        head = b""
        while b"\r\n" not in head:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no reply to GET {target}")
            sock.settimeout(left)
            chunk = sock.recv(1024)
            if not chunk:
                raise ConnectionError(f"connection closed without a reply to GET {target}")
            head += chunk
            if len(head) > _MAX_STATUS_LINE:
                raise ConnectionError(f"no HTTP status line in the reply to GET {target}")
    status_line = head.split(b"\r\n", 1)[0]
    parts = status_line.split()
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise ConnectionError(f"not an HTTP reply to GET {target}: {status_line[:80]!r}")
    return int(parts[1])


def _unix_unavailable_reason(socket_path: str, image: str, timeout_s: float) -> str | None:
    where = f"unix://{socket_path}"
    deadline = time.monotonic() + timeout_s
    try:
        status = _http_status(socket_path, "/_ping", deadline)
        if status != 200:
            return f"the Docker engine at {where} answered /_ping with HTTP {status}"
        status = _http_status(socket_path, f"/images/{quote(image, safe='/:@')}/json", deadline)
    except OSError as exc:  # refused, no such socket, permission, timeout, closed, not HTTP
        return f"no Docker engine answers at {where} ({type(exc).__name__}: {exc})"
    if status == 404:
        return f"image {image} is not present locally (run tools/setup-docker.sh)"
    if status != 200:
        return f"the Docker engine at {where} answered HTTP {status} for image {image}"
    return None


def docker_unavailable_reason(image: str = DEFAULT_IMAGE, timeout_s: float = 10.0) -> str | None:
    """None if a Docker engine answers and ``image`` exists locally, else why not (bounded in time).

    A ``unix://`` engine (``DOCKER_HOST``, default ``unix:///var/run/docker.sock``) is asked
    directly over its socket, with the standard library only; any other ``DOCKER_HOST`` through
    the docker SDK when installed (it comes with testcontainers), else the ``docker`` CLI.
    Every connection is closed before returning. Thread-safe.
    """
    socket_path = _unix_socket_path(os.environ.get("DOCKER_HOST", ""))
    if socket_path is not None:
        return _unix_unavailable_reason(socket_path, image, timeout_s)
    try:
        docker_sdk: Any = importlib.import_module("docker")
    except ImportError:
        docker_sdk = None
    if docker_sdk is not None:
        try:
            client = docker_sdk.from_env(timeout=max(1, round(timeout_s)))
        except Exception as exc:  # DockerException: bad DOCKER_HOST, no engine answers, ...
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
            self._wrapped().wait(timeout=STOP_TIMEOUT_S)
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
