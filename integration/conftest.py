"""Fixtures for integration tests: real memcached servers on 127.0.0.1.

Everything under integration/ is marked ``integration`` automatically (and gets a 120 s timeout
unless it sets its own). The backend comes from ``SHARDCACHE_TEST_BACKEND``:

- ``docker``: containers of ``memcached:1.6`` through testcontainers; if Docker or the image is
  missing the tests fail loudly (run tools/setup-docker.sh), they are never skipped;
- ``process``: local ``memcached`` processes (tools/setup-memcached.sh installs the binary);
- ``auto`` (default): docker when an engine answers and the image exists, else process.

CI sets ``SHARDCACHE_EXPECT_BACKEND`` (``docker`` or ``process``) to the backend a phase must end up
on; a smoke test in test_infrastructure.py checks it, so a silent fallback fails the phase.

Fixtures:

- ``requested_backend`` (session): ``SHARDCACHE_TEST_BACKEND``: ``"auto"``, ``"docker"`` or ``"process"``.
- ``cluster_backend`` (session): the backend actually used, ``"docker"`` or ``"process"``.
- ``cluster`` (session): a :class:`~shardcache.testing.LocalCluster` of 3 nodes shared by all tests.
  Every test that uses it starts with all nodes flushed; a test that leaves a node stopped or
  paused fails and the node is repaired (use ``fresh_cluster`` for fault tests).
- ``fresh_cluster`` (function): a factory ``make_cluster(n=3, memcached_args=())`` returning a new
  LocalCluster of the same backend, closed at teardown: kill and pause its nodes freely.
- ``fault_proxy`` (function): a factory ``make_proxy(node_or_address)`` returning a
  :class:`~shardcache.testing.FaultProxy` in front of a node, closed at teardown.
- ``django_settings`` (session): the example Django project configured on the session cluster.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from shardcache.testing import (
    FaultProxy,
    LocalCluster,
    MemcachedNode,
    ServerSetupError,
    docker_unavailable_reason,
    probe_version,
)

_HERE = Path(__file__).resolve().parent
_BACKENDS = ("auto", "docker", "process")
_DEFAULT_TIMEOUT_S = 120


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    with_timeout = config.pluginmanager.hasplugin("timeout")
    for item in items:
        if _HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.integration)
            if with_timeout and item.get_closest_marker("timeout") is None:
                item.add_marker(pytest.mark.timeout(_DEFAULT_TIMEOUT_S))


def _requested_backend() -> str:
    value = os.environ.get("SHARDCACHE_TEST_BACKEND", "auto").strip().lower() or "auto"
    if value not in _BACKENDS:
        raise pytest.UsageError(
            f"SHARDCACHE_TEST_BACKEND must be one of {', '.join(_BACKENDS)}, got {value!r}"
        )
    return value


@pytest.fixture(scope="session")
def requested_backend() -> str:
    """SHARDCACHE_TEST_BACKEND, validated: ``"auto"`` (default), ``"docker"`` or ``"process"``."""
    return _requested_backend()


@pytest.fixture(scope="session")
def cluster_backend(requested_backend: str) -> str:
    """``"docker"`` or ``"process"``: what SHARDCACHE_TEST_BACKEND resolves to on this machine."""
    requested = requested_backend
    if requested == "process":
        return "process"
    reason = docker_unavailable_reason()
    if reason is None:
        return "docker"
    if requested == "docker":
        pytest.fail(
            f"SHARDCACHE_TEST_BACKEND=docker but {reason}. Run tools/setup-docker.sh "
            "(as root: installs docker.io, starts dockerd, builds memcached:1.6).",
            pytrace=False,
        )
    return "process"


def _start_cluster(n: int, backend: str, memcached_args: Sequence[str] = ()) -> LocalCluster:
    try:
        return LocalCluster(
            n, backend="docker" if backend == "docker" else "process", memcached_args=memcached_args
        )
    except ServerSetupError as exc:
        pytest.fail(f"could not start {n} memcached ({backend}): {exc}", pytrace=False)


@pytest.fixture(scope="session")
def cluster(cluster_backend: str) -> Iterator[LocalCluster]:
    """Three memcached nodes shared by the whole session (flushed before each test using it)."""
    with _start_cluster(3, cluster_backend) as shared:
        yield shared


def _repair(node: MemcachedNode) -> str | None:
    """Bring a node the previous test broke back; return what was wrong, or None."""
    if probe_version(node.host, node.port, timeout_s=0.5, ssl_context=node.ssl_context) is not None:
        return None
    if node.is_paused():
        node.unpause()
        return f"{node.spec} was left paused"
    if not node.is_running():
        node.start()
        return f"{node.spec} was left stopped (restarted, now {node.spec})"
    node.restart()
    return f"{node.spec} did not answer (restarted, now {node.spec})"


@pytest.fixture(autouse=True)
def _clean_session_cluster(request: pytest.FixtureRequest) -> Iterator[None]:
    """For tests using ``cluster``: flush every node before, check none is left broken after."""
    if "cluster" not in request.fixturenames:
        yield
        return
    shared: LocalCluster = request.getfixturevalue("cluster")
    for node in shared.nodes:
        _repair(node)
        node.flush_all()
    yield
    problems = [p for p in (_repair(node) for node in shared.nodes) if p]
    if problems:
        pytest.fail(
            "this test left the shared session cluster broken: " + "; ".join(problems)
            + ". Use the fresh_cluster fixture for tests that kill, stop or pause nodes.",
            pytrace=False,
        )  # fmt: skip


@pytest.fixture
def fresh_cluster(cluster_backend: str) -> Iterator[Callable[..., LocalCluster]]:
    """Factory ``make_cluster(n=3, memcached_args=())``: private clusters, closed at teardown."""
    made: list[LocalCluster] = []

    def make_cluster(n: int = 3, memcached_args: Sequence[str] = ()) -> LocalCluster:
        new = _start_cluster(n, cluster_backend, memcached_args)
        made.append(new)
        return new

    yield make_cluster
    for each in made:
        each.close()


@pytest.fixture
def fault_proxy() -> Iterator[Callable[..., FaultProxy]]:
    """Factory ``make_proxy(node or (host, port))``: a FaultProxy in front of it, closed at teardown."""
    made: list[FaultProxy] = []

    def make_proxy(target: MemcachedNode | tuple[str, int]) -> FaultProxy:
        host, port = target.address if isinstance(target, MemcachedNode) else target
        proxy = FaultProxy(host, port)
        made.append(proxy)
        return proxy

    yield make_proxy
    for proxy in made:
        proxy.close()


@pytest.fixture(scope="session")
def django_settings(cluster: LocalCluster) -> Iterator[Any]:
    """The example Django project's settings, on the session cluster (Django configures once per
    process, so every test module shares them)."""
    servers = ",".join(cluster.specs)
    import django
    from django.conf import settings

    # settings.py reads these when django.setup() loads it; put the environment back afterwards
    saved = {name: os.environ.get(name) for name in ("SHARDCACHE_SERVERS", "DJANGO_SETTINGS_MODULE")}
    os.environ["SHARDCACHE_SERVERS"] = servers
    os.environ["DJANGO_SETTINGS_MODULE"] = "examples.django_project.settings"
    try:
        django.setup()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    if servers != settings.SHARDCACHE_SERVERS:
        pytest.fail(f"Django settings were configured for {settings.SHARDCACHE_SERVERS}, not {servers}")
    yield settings
