"""The test infrastructure itself, against real memcached: nodes, faults, the proxy, TLS.

Uses pymemcache's plain Client on purpose: these tests must hold before shardcache's own client is
trusted. Timing is asserted only as lower bounds.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pymemcache.client.base import Client

from shardcache.testing import (
    FaultProxy,
    LocalCluster,
    MemcachedNode,
    ProcessNode,
    docker_unavailable_reason,
    make_self_signed_cert,
    probe_version,
)

MakeClient = Callable[..., Client]


@pytest.fixture
def client() -> Iterator[MakeClient]:
    """Factory ``client(address, timeout=1.0)``: pymemcache Clients that wait for replies, closed after."""
    made: list[Client] = []

    def make(address: tuple[str, int], timeout: float = 1.0, **kwargs: object) -> Client:
        c = Client(address, connect_timeout=timeout, timeout=timeout, default_noreply=False, **kwargs)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def _wait_until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


# --- the cluster -----------------------------------------------------------------------------------
@pytest.mark.smoke
def test_cluster_has_three_independent_loopback_nodes(cluster: LocalCluster, cluster_backend: str) -> None:
    assert cluster.backend == cluster_backend
    assert len(cluster.nodes) == 3
    assert all(spec.startswith("127.0.0.1:") for spec in cluster.specs)
    assert len(set(cluster.specs)) == 3


@pytest.mark.smoke
def test_each_node_answers_set_and_get_and_keeps_its_own_data(
    cluster: LocalCluster, client: MakeClient
) -> None:
    clients = [client(node.address) for node in cluster.nodes]
    for i, c in enumerate(clients):
        assert c.set("books/321", f"page from node {i}".encode()) is True
    for i, c in enumerate(clients):
        assert c.get("books/321") == f"page from node {i}".encode()


@pytest.mark.smoke
def test_cluster_runs_on_the_backend_this_run_expects(
    cluster: LocalCluster, cluster_backend: str, requested_backend: str
) -> None:
    """SHARDCACHE_EXPECT_BACKEND (set by .ci/run) names the backend this run must use; without it,
    ``auto`` must pick docker exactly when the probe finds an engine with the image."""
    expected = os.environ.get("SHARDCACHE_EXPECT_BACKEND", "").strip().lower()
    if expected:
        assert expected in ("docker", "process"), f"SHARDCACHE_EXPECT_BACKEND={expected!r}"
    elif requested_backend == "auto":
        expected = "docker" if docker_unavailable_reason() is None else "process"
    else:
        expected = requested_backend
    assert (cluster_backend, cluster.backend) == (expected, expected), (
        f"SHARDCACHE_TEST_BACKEND={requested_backend} ran on {cluster.backend}, expected {expected} "
        f"(Docker probe: {docker_unavailable_reason() or 'engine and image available'})"
    )


def test_session_cluster_is_flushed_between_tests_part1(cluster: LocalCluster, client: MakeClient) -> None:
    assert client(cluster.nodes[0].address).set("left-over", b"1") is True


def test_session_cluster_is_flushed_between_tests_part2(cluster: LocalCluster, client: MakeClient) -> None:
    assert client(cluster.nodes[0].address).get("left-over") is None


# --- node faults -----------------------------------------------------------------------------------
def test_killed_node_refuses_connections_and_answers_again_after_start(
    fresh_cluster: Callable[..., LocalCluster], client: MakeClient
) -> None:
    node = fresh_cluster(1).nodes[0]
    assert client(node.address).set("k", b"v") is True
    node.kill()
    assert not node.is_running()
    with pytest.raises(ConnectionRefusedError):
        client(node.address).get("k")

    node.start()  # a container may come back on another port: node.address is current
    c = client(node.address)
    assert c.get("k") is None  # a restarted memcached is empty
    assert c.set("k", b"again") is True
    assert c.get("k") == b"again"


def test_restart_brings_node_back_empty(
    fresh_cluster: Callable[..., LocalCluster], client: MakeClient
) -> None:
    node = fresh_cluster(1).nodes[0]
    assert client(node.address).set("k", b"v") is True
    node.restart()
    assert node.is_running()
    assert client(node.address).get("k") is None


def test_paused_node_times_out_and_answers_after_unpause(
    fresh_cluster: Callable[..., LocalCluster], client: MakeClient
) -> None:
    node = fresh_cluster(1).nodes[0]
    assert client(node.address).set("k", b"v") is True
    node.pause()
    assert node.is_paused()
    with pytest.raises(TimeoutError):  # TCP connect succeeds, the read times out
        client(node.address, timeout=0.5).get("k")

    node.unpause()
    assert not node.is_paused()
    assert client(node.address).get("k") == b"v"  # pausing loses nothing


def test_add_nodes_grows_the_cluster(fresh_cluster: Callable[..., LocalCluster], client: MakeClient) -> None:
    cluster = fresh_cluster(1, memcached_args=("-m", "16"))
    (added,) = cluster.add_nodes(1)
    assert cluster.nodes[-1] is added
    assert len(set(cluster.specs)) == 2
    assert client(added.address).set("k", b"v") is True


# --- the fault proxy -------------------------------------------------------------------------------
@pytest.mark.smoke
def test_proxy_passes_set_and_get_through_including_a_200kb_value(
    cluster: LocalCluster, fault_proxy: Callable[..., FaultProxy], client: MakeClient
) -> None:
    node = cluster.nodes[0]
    proxy = fault_proxy(node)
    assert proxy.spec == f"127.0.0.1:{proxy.port}" and proxy.port != node.port
    via_proxy = client(proxy.address)
    big = bytes(range(256)) * 800  # 204,800 bytes
    assert via_proxy.set("big", big) is True
    assert via_proxy.set("small", b"s") is True
    assert via_proxy.get("big") == big
    assert via_proxy.get_many(["big", "small", "missing"]) == {"big": big, "small": b"s"}
    assert client(node.address).get("big") == big  # it really went to the node


def test_proxy_latency_adds_at_least_the_delay_each_way(
    cluster: LocalCluster, fault_proxy: Callable[..., FaultProxy], client: MakeClient
) -> None:
    proxy = fault_proxy(cluster.nodes[0])
    c = client(proxy.address)
    assert c.set("k", b"v") is True
    proxy.set_latency(0.05)
    started = time.monotonic()
    assert c.get("k") == b"v"
    assert time.monotonic() - started >= 0.1  # request and reply each held 50 ms
    proxy.set_latency(0)
    assert c.get("k") == b"v"


def test_proxy_blackhole_makes_get_time_out_and_heal_restores(
    cluster: LocalCluster, fault_proxy: Callable[..., FaultProxy], client: MakeClient
) -> None:
    proxy = fault_proxy(cluster.nodes[0])
    existing = client(proxy.address, timeout=0.5)
    assert existing.set("k", b"v") is True
    proxy.blackhole()
    with pytest.raises(TimeoutError):
        existing.get("k")  # an open connection goes silent
    with pytest.raises(TimeoutError):
        client(proxy.address, timeout=0.5).get("k")  # a new one is accepted, then silent

    proxy.heal()
    assert client(proxy.address).get("k") == b"v"
    assert existing.get("k") == b"v"  # pymemcache reconnected after its timeout


def test_proxy_reset_makes_get_fail_with_a_connection_error_and_heal_restores(
    cluster: LocalCluster, fault_proxy: Callable[..., FaultProxy], client: MakeClient
) -> None:
    proxy = fault_proxy(cluster.nodes[0])
    existing = client(proxy.address)
    assert existing.set("k", b"v") is True
    proxy.reset()
    assert _wait_until(lambda: proxy.connection_count() == 0)
    with pytest.raises(ConnectionError):
        existing.get("k")  # its connection was reset
    with pytest.raises(ConnectionError):
        client(proxy.address).get("k")  # new connections are reset too

    proxy.heal()
    assert client(proxy.address).get("k") == b"v"


def test_proxy_resets_clients_when_its_target_dies(
    fresh_cluster: Callable[..., LocalCluster], fault_proxy: Callable[..., FaultProxy], client: MakeClient
) -> None:
    node = fresh_cluster(1).nodes[0]
    proxy = fault_proxy(node)
    assert client(proxy.address).set("k", b"v") is True
    node.kill()
    with pytest.raises(ConnectionError):
        client(proxy.address).get("k")
    node.start()
    proxy.set_target(*node.address)  # a restarted container may have a new port
    assert client(proxy.address).get("k") is None


def test_proxy_close_releases_its_thread_and_connections(cluster: LocalCluster, client: MakeClient) -> None:
    with FaultProxy(*cluster.nodes[0].address) as proxy:
        c = client(proxy.address)
        assert c.set("k", b"v") is True
        assert proxy.connection_count() == 1
        c.close()
        assert _wait_until(lambda: proxy.connection_count() == 0)
        thread_name = f"FaultProxy-{proxy.port}"
    assert thread_name not in {t.name for t in threading.enumerate()}
    assert probe_version(proxy.host, proxy.port, timeout_s=0.5) is None  # nothing listens any more


# --- TLS ---------------------------------------------------------------------------------------------
@pytest.mark.smoke
def test_tls_process_node_serves_clients_with_its_context(tmp_path: Path, client: MakeClient) -> None:
    certfile, keyfile = make_self_signed_cert(tmp_path)
    with ProcessNode(tls=(certfile, keyfile)) as node:
        assert node.ssl_context is not None
        assert probe_version(*node.address, timeout_s=0.5) is None  # plain TCP is not served
        c = client(node.address, tls_context=node.ssl_context)
        assert c.set("secret", b"v") is True
        assert c.get("secret") == b"v"
    assert not node.is_running()


def test_nodes_report_their_state(fresh_cluster: Callable[..., LocalCluster]) -> None:
    node: MemcachedNode = fresh_cluster(1).nodes[0]
    assert node.is_running() and not node.is_paused()
    assert node.version().startswith("1.")
    node.stop()
    assert not node.is_running()
    node.start()
    assert node.spec == f"127.0.0.1:{node.port}"
