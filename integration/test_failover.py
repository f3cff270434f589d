"""Failover with real faults: killed, frozen, blackholed, slowed, restarted and flapping nodes.

Every client here reaches its nodes through a FaultProxy, so a restarted container (which gets a
new host port) is reached again at the same address. Assertions are about outcomes: no exception
under on_error="miss", healthy keys keep hitting, nothing stale after a node returns. Latency is
bounded generously (a hang would exceed the bound by far); the measured figures live in
benchmarks/failover_bench.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from shardcache import Client, Event, NodeUnavailableError
from shardcache.testing import FaultProxy, LocalCluster, MemcachedNode

pytestmark = pytest.mark.smoke

TIMEOUT = 0.3
FAST = {
    "connect_timeout": TIMEOUT,
    "timeout": TIMEOUT,
    "failure_threshold": 2,
    "retry_interval_s": 0.2,
    "max_retry_interval_s": 0.5,
}
BOUND = TIMEOUT + 1.0  # no call may take longer: a hang would show as many seconds


def wait_until(condition: Callable[[], bool], timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


class Rig:
    """A 3-node cluster behind proxies, and a way to name the node a key lives on."""

    def __init__(self, cluster: LocalCluster, make_proxy: Callable[[MemcachedNode], FaultProxy]) -> None:
        self.cluster = cluster
        self.proxies = [make_proxy(node) for node in cluster.nodes]
        self.specs = [p.spec for p in self.proxies]

    def client(self, **options: Any) -> Client:
        return Client(self.specs, **{**FAST, **options})

    def victim(self, index: int = 0) -> tuple[MemcachedNode, FaultProxy, str]:
        return self.cluster.nodes[index], self.proxies[index], self.specs[index]

    def follow(self, index: int) -> None:
        """After a container restart, point the proxy at the node's new port."""
        self.proxies[index].set_target(*self.cluster.nodes[index].address)


@pytest.fixture
def rig(fresh_cluster: Callable[..., LocalCluster], fault_proxy: Callable[..., FaultProxy]) -> Iterator[Rig]:
    yield Rig(fresh_cluster(3), fault_proxy)


def keys_on(client: Client, spec: str, n: int, prefix: str = "k") -> list[str]:
    found = [k for k in (f"{prefix}{i}" for i in range(20 * n + 200)) if client.node_for(k) == spec]
    assert len(found) >= n
    return found[:n]


def test_kill_under_load_surfaces_no_exception_and_healthy_keys_keep_hitting(rig: Rig) -> None:
    events: list[Event] = []
    with rig.client(on_error="miss") as client:
        client.add_listener(events.append)
        node, _, dead = rig.victim(0)
        keys = [f"load:{i}" for i in range(600)]
        client.set_many({k: k for k in keys})
        healthy = [k for k in keys if client.node_for(k) != dead]
        problems: list[str] = []
        slowest = [0.0]
        stop = threading.Event()

        def worker(n: int) -> None:
            i = 0
            while not stop.is_set() and i < 5000:
                i += 1
                key = healthy[(n * 37 + i) % len(healthy)]
                other = keys[(n * 53 + i) % len(keys)]
                try:
                    started = time.monotonic()
                    if client.get(key) != key:
                        problems.append(f"healthy key {key} missed")
                    client.get(other)
                    client.set(other, other)
                    client.get_many([key, other])
                    slowest[0] = max(slowest[0], time.monotonic() - started)
                except Exception as exc:  # the point of the test: nothing may surface
                    problems.append(repr(exc))

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        node.kill()
        assert wait_until(lambda: client.node_states()[dead] != "up")
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(timeout=30)
        assert not any(t.is_alive() for t in threads)
        assert problems == []
        assert slowest[0] <= 4 * BOUND  # 4 calls per iteration, each bounded
        assert {e.kind for e in events} >= {"error", "node_down"}
        counters = client.node_counters()[dead]
        assert counters["errors"] >= 1 and counters["state_changes"] >= 1


@pytest.mark.parametrize("fault", ["pause", "blackhole", "slow"])
def test_a_hung_node_costs_at_most_a_timeout_then_nothing(rig: Rig, fault: str) -> None:
    with rig.client(on_error="miss", retry_interval_s=30) as client:
        node, proxy, hung = rig.victim(1)
        mine = keys_on(client, hung, 20)
        others = [k for k in (f"o{i}" for i in range(200)) if client.node_for(k) != hung][:50]
        client.set_many({k: 1 for k in mine + others})
        if fault == "pause":
            node.pause()
        elif fault == "blackhole":
            proxy.blackhole()
        else:
            proxy.set_latency(TIMEOUT * 3)
        try:
            durations = []
            for key in mine:
                started = time.monotonic()
                assert client.get(key) is None
                durations.append(time.monotonic() - started)
            assert max(durations) <= BOUND
            assert client.node_states()[hung] == "down"
            after_down = durations[FAST["failure_threshold"] :]
            assert max(after_down) < TIMEOUT  # a DOWN node is not contacted at all
            assert client.get_many(others) == {k: 1 for k in others}  # healthy keys still hit
        finally:
            if fault == "pause":
                node.unpause()
            else:
                proxy.heal()
                proxy.set_latency(0)


@pytest.mark.parametrize("policy", ["fail_fast", "remap", "gutter"])
@pytest.mark.parametrize("change", ["delete", "overwrite"])
def test_no_stale_read_after_a_frozen_node_returns(
    rig: Rig, fresh_cluster: Callable[..., LocalCluster], policy: str, change: str
) -> None:
    gutter = fresh_cluster(1).specs if policy == "gutter" else None
    with rig.client(on_error="miss", failover=policy, gutter_servers=gutter) as client:
        node, _, frozen = rig.victim(2)
        keys = keys_on(client, frozen, 30, prefix="page:")
        client.set_many({k: "v1" for k in keys})
        node.pause()
        try:
            assert wait_until(lambda: (client.get(keys[0]), client.node_states()[frozen])[1] != "up")
            if change == "delete":
                client.delete_many(keys[:10])
                for k in keys[10:20]:
                    client.delete(k)
            else:
                client.set_many({k: "v2" for k in keys[:10]})
                for k in keys[10:20]:
                    client.set(k, "v2")
            if policy != "fail_fast":  # stand-ins serve meanwhile, and never the old value
                assert all(client.get(k) in (None, "v2") for k in keys[:20])
        finally:
            node.unpause()
        assert wait_until(lambda: client.node_states()[frozen] == "up")
        for k in keys[:20]:
            assert client.get(k) in ((None,) if change == "delete" or policy == "fail_fast" else (None, "v2"))
        assert client.get_many(keys[20:]) == {k: "v1" for k in keys[20:]}  # untouched keys survive
        if policy == "gutter":
            with Client(gutter) as direct:
                assert direct.get_many(keys) == {}  # the gutter copies were removed on rejoin


def test_restart_is_readmitted_within_the_probe_interval_and_fenced(rig: Rig) -> None:
    events: list[Event] = []
    with rig.client(on_error="raise") as client:
        client.add_listener(events.append)
        node, _, victim = rig.victim(0)
        keys = keys_on(client, victim, 10)
        client.set_many(dict.fromkeys(keys, "old"))
        node.kill()
        with pytest.raises(NodeUnavailableError):
            client.get(keys[0])
        with pytest.raises(NodeUnavailableError):
            client.get(keys[0])
        assert client.node_states()[victim] == "down"
        with pytest.raises(NodeUnavailableError, match="down"):
            client.delete(keys[1])  # fail fast, but the delete is kept for the node's return
        node.start()
        rig.follow(0)
        assert wait_until(lambda: client.node_states()[victim] == "up")
        kinds = [e.kind for e in events if e.node_id == victim]
        assert wait_until(lambda: "fenced" in [e.kind for e in events if e.node_id == victim])
        kinds = [e.kind for e in events if e.node_id == victim]
        # readmitted as soon as it answers, then fenced; reads of the fenced keys missed meanwhile
        assert kinds.index("node_down") < kinds.index("node_up") < kinds.index("fenced")
        assert client.get(keys[1]) is None
        assert client.set(keys[1], "new") and client.get(keys[1]) == "new"


def test_a_delete_that_fails_is_applied_when_the_node_answers_again(rig: Rig) -> None:
    with rig.client(on_error="miss", failure_threshold=5) as client:
        _, proxy, victim = rig.victim(1)
        key = keys_on(client, victim, 1)[0]
        client.set(key, "stale-after-db-write")
        proxy.blackhole()
        assert client.delete(key) is False  # the app's invalidation fails (node still UP)
        assert client.node_states()[victim] == "up"
        proxy.heal()
        assert client.get(key) is None  # fenced: never the old value, even before the retry lands
        assert wait_until(lambda: client.node_counters()[victim]["ops"] > 0 and _absent(victim, key))


def _absent(spec: str, key: str) -> bool:
    with Client([spec]) as direct:
        return direct.get(key) is None


def test_flapping_node_never_serves_stale_values(rig: Rig) -> None:
    with rig.client(on_error="miss", failover="remap") as client:
        _, proxy, flappy = rig.victim(2)
        keys = keys_on(client, flappy, 15)
        truth = {k: 0 for k in keys}
        client.set_many(truth)
        for round_ in range(1, 7):
            if round_ % 2:
                proxy.blackhole()
            else:
                proxy.heal()
            for k in keys:
                truth[k] = round_
                client.set(k, round_)
            for k in keys:
                assert client.get(k) in (None, truth[k])
        proxy.heal()
        assert wait_until(lambda: client.node_states()[flappy] == "up")
        for k in keys:
            assert client.get(k) in (None, truth[k])


@pytest.mark.parametrize("policy", ["fail_fast", "remap"])
def test_a_returning_node_is_readmitted_under_steady_traffic_for_its_keys(rig: Rig, policy: str) -> None:
    """Requests keep touching the returning node's keys; fencing must not livelock its readmission."""
    with rig.client(on_error="miss", failover=policy, max_retry_interval_s=0.2) as client:
        node, proxy, victim = rig.victim(0)
        proxy.set_latency(0.001)
        keys = keys_on(client, victim, 300)
        client.set_many(dict.fromkeys(keys, "v"))
        node.pause()
        assert wait_until(lambda: (client.get(keys[0]), client.node_states()[victim])[1] != "up")
        stop = threading.Event()

        def cache_aside(n: int) -> None:
            for i in range(n, 200_000, 4):
                if stop.is_set():
                    return
                key = keys[i % len(keys)]
                if client.get(key) is None:
                    client.set(key, "v")
                time.sleep(0.001)

        threads = [threading.Thread(target=cache_aside, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        try:
            time.sleep(1.0)
            node.unpause()
            assert wait_until(lambda: client.node_states()[victim] == "up", timeout_s=10)
            assert wait_until(lambda: client.node_counters()[victim]["ops"] > 0, timeout_s=10)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=30)
            proxy.set_latency(0)


def test_a_failed_delete_many_is_forgotten_by_the_prober_even_if_the_node_stays_up(rig: Rig) -> None:
    with rig.client(on_error="miss", failure_threshold=5) as client:
        _, proxy, victim = rig.victim(0)
        key = keys_on(client, victim, 1)[0]
        client.set(key, "v1")
        proxy.blackhole()
        assert client.delete_many([key]) is False  # one timeout; the node stays up
        proxy.heal()
        assert client.node_states()[victim] == "up"
        assert client.get(key) is None  # fenced: the failed delete is not lost
        assert wait_until(lambda: client.set(key, "v2") and client.get(key) == "v2")


def test_a_write_through_a_second_stand_in_makes_the_first_ones_copy_unreadable(rig: Rig) -> None:
    """A is down: a write of k lands on B; then B is down too: the delete of k lands on C. When B
    returns, its old copy of k must not be served."""
    with rig.client(
        on_error="miss", failover="remap", failure_threshold=1, max_retry_interval_s=0.3
    ) as client:
        (_, proxy_a, a), (_, proxy_b, b) = rig.victim(0), rig.victim(1)
        key = next(k for k in (f"k{i}" for i in range(20000)) if client.ring.preference_list(k, 2) == (a, b))
        b_key = keys_on(client, b, 1, prefix="b")[0]
        proxy_a.reset()
        client.get(key)  # A is marked down
        assert client.node_states()[a] == "down"
        assert client.set(key, "V1")  # stored on B, standing in for A
        proxy_b.blackhole()
        client.get(b_key)  # B is marked down by a read of its own key
        assert client.node_states()[b] == "down"
        client.delete(key)  # goes to the next stand-in
        proxy_b.heal()
        assert wait_until(lambda: client.node_states()[b] == "up")
        assert client.get(key) is None
        proxy_a.heal()
        assert wait_until(lambda: client.node_states()[a] == "up")
        assert client.get(key) is None


def test_noreply_writes_do_not_hide_a_frozen_node_from_its_reads(rig: Rig) -> None:
    """A noreply write only fills a socket buffer: counting it as a success reset the failures the
    reads built up, so a frozen node was never marked down and every read waited the timeout."""
    with rig.client(on_error="miss", default_noreply=True, retry_interval_s=30) as client:
        node, _, frozen = rig.victim(1)
        mine = keys_on(client, frozen, 8)
        client.set_many(dict.fromkeys(mine, 1))
        node.pause()
        try:
            for key in mine:
                client.set(key, 2)  # noreply: "succeeds" into the buffer
                client.get(key)
            assert client.node_states()[frozen] == "down"
            started = time.monotonic()
            assert client.get(mine[0]) is None
            assert time.monotonic() - started < TIMEOUT  # down: not contacted at all
        finally:
            node.unpause()


def test_stats_reset_and_stats_detail_are_not_protocol_errors(rig: Rig) -> None:
    with rig.client() as client:
        client.set("k", "v")
        assert client.stats("reset") == {spec: {} for spec in rig.specs}
        assert client.stats("detail", "on") == {spec: {} for spec in rig.specs}
        assert client.stats("detail", "off") == {spec: {} for spec in rig.specs}
        assert set(client.node_states().values()) == {"up"}
        assert client.get("k") == "v"


def test_a_server_restarted_while_connections_sit_idle_costs_no_error(rig: Rig) -> None:
    """The pooled connections die with the old process: they are checked before reuse, so the
    first calls after a restart neither fail nor mark a healthy node down."""
    errors: list[str] = []
    with rig.client() as client:
        node, _, victim = rig.victim(0)
        keys = keys_on(client, victim, 3)
        client.add_listener(lambda event: errors.append(f"{event.kind} {event.detail}"))
        client.set_many(dict.fromkeys(keys, 1))
        node.restart()
        rig.follow(0)  # a container may come back on another host port: the proxy follows it
        time.sleep(0.6)  # idle for longer than the pool's check threshold
        assert client.get(keys[0]) is None  # an empty server now, and no error
        assert client.delete(keys[1], noreply=True) is True
        assert client.set(keys[2], 2) is True and client.get(keys[2]) == 2
        assert client.node_states()[victim] == "up"
    assert errors == []


def test_a_frozen_node_does_not_hold_back_the_other_nodes_part_of_a_get_many(
    fresh_cluster: Callable[..., LocalCluster],
) -> None:
    # The node is frozen but not yet marked down: its part of the call waits until the deadline.
    # The other nodes' replies, large ones included (bigger than a socket's buffer), must still be
    # read meanwhile and returned.
    cluster = fresh_cluster(3)
    with Client(cluster.specs, **{**FAST, "on_error": "miss", "failure_threshold": 100}) as client:
        frozen = cluster.specs[0]
        keys = [f"big/{i}" for i in range(300)]
        value = "v" * 20_000
        assert client.set_many({k: value for k in keys}) == []
        healthy = [k for k in keys if client.node_for(k) != frozen]
        assert len(healthy) > 100
        cluster.nodes[0].pause()
        try:
            started = time.monotonic()
            found = client.get_many(keys)
            assert time.monotonic() - started <= BOUND
        finally:
            cluster.nodes[0].unpause()
        assert sorted(found) == sorted(healthy)
        assert all(v == value for v in found.values())
