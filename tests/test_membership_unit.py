"""Membership changes (README "Scaling out and in") without servers: one reference swapped, nodes
kept across changes, warm-up/drain windows that end, and the client's checks on add/remove.
"""

from __future__ import annotations

import threading
import time

import pytest
from fakes import Cluster

from shardcache import Client, ConfigurationError
from shardcache._router import CallKind
from shardcache._topology import PINNED_WINDOW_S
from shardcache.health import DOWN, PROBING, UP

NODES = ["a:11211", "b:11211", "c:11211"]
A, D = "a:11211", "d:11211"


def test_a_change_swaps_one_reference_and_a_snapshot_in_flight_keeps_its_ring() -> None:
    cluster = Cluster(NODES)
    in_flight = cluster.topology
    added, removed = cluster.change(in_flight.ring.with_node(D), 0)
    assert (added, removed) == ([D], [])
    current = cluster.topology
    assert current is not in_flight and D in current.nodes and D not in in_flight.nodes
    assert in_flight.ring.nodes == tuple(NODES)  # a request that read it finishes on the old ring
    assert all(current.nodes[n] is in_flight.nodes[n] for n in NODES)  # same connections and health
    # no warm-up window: the previous ring is kept for pinned calls only, for PINNED_WINDOW_S
    assert current.previous is in_flight.ring and not current.window
    assert current.window_until == cluster.clock() + PINNED_WINDOW_S
    assert [(e.kind, e.node_id, e.detail) for e in cluster.seen] == [("node_added", D, "")]


def test_a_window_keeps_the_previous_ring_until_it_ends_and_a_new_change_replaces_it() -> None:
    cluster = Cluster(NODES)
    first = cluster.topology.ring
    cluster.change(first.with_node(D), 60)
    topology = cluster.topology
    assert topology.previous == first and topology.window_until == cluster.clock() + 60
    assert set(topology.previous_nodes) == set(NODES)
    cluster.clock.advance(10)
    second = topology.ring
    added, removed = cluster.change(second.without_node(A), 30)  # the first window is over: replaced
    assert (added, removed) == ([], [A])
    assert cluster.topology.previous == second and cluster.topology.window_until == cluster.clock() + 30
    assert [(e.kind, e.detail) for e in cluster.seen] == [
        ("node_added", "warm-up 60s"),
        ("node_removed", "drain 30s"),
    ]
    cluster.close()


def test_a_window_ends_by_itself_and_leaves_the_ring_and_nodes_as_they_are() -> None:
    cluster = Cluster(NODES)
    cluster.change(cluster.topology.ring.without_node(A), 0.01)  # a real timer: 10 ms
    during = cluster.topology
    assert during.previous is not None and A in during.previous_nodes
    for _ in range(200):  # bounded: at most ~1 s
        if cluster.topology.previous is None:
            break
        time.sleep(0.005)
    after = cluster.topology
    assert after.previous is None and after.ring == during.ring
    assert all(after.nodes[n] is during.nodes[n] for n in during.nodes) and A not in after.nodes


def test_close_cancels_the_window_timer_and_the_client_pieces_stay_usable() -> None:
    cluster = Cluster(NODES)
    before = set(threading.enumerate())
    cluster.change(cluster.topology.ring.with_node(D), 60)
    timers = [t for t in threading.enumerate() if t not in before]
    assert len(timers) == 1 and timers[0].is_alive()
    cluster.close()
    timers[0].join(timeout=1)
    assert not timers[0].is_alive()
    key = cluster.key_on(D)
    assert cluster.set(key, "after close") is True and cluster.get(key) == "after close"


class RecordingPool:
    """Stands in for a node's connection pool: counts ``close`` and ``retire`` calls."""

    def __init__(self) -> None:
        self.closed = 0
        self.retired = 0

    def close(self) -> None:
        self.closed += 1

    def retire(self) -> None:  # closed for good: connections released later are closed too
        self.retired += 1


def test_a_node_removed_without_a_window_is_retired_when_the_pinned_window_ends() -> None:
    cluster = Cluster(NODES)
    pool = RecordingPool()
    cluster.node(A).pool = pool  # type: ignore[assignment]
    cluster.change(cluster.topology.ring.without_node(A), 0)
    assert pool.retired == 0  # counters, CAS and locks may still find their key on it
    timer = cluster.membership._window_timer
    assert timer is not None and timer.interval == PINNED_WINDOW_S
    timer.cancel()
    timer.function(*timer.args)  # the window ends
    assert pool.retired == 1
    assert cluster.topology.previous is None


def test_a_drain_window_cut_short_by_another_change_still_closes_the_removed_nodes_connections() -> None:
    cluster = Cluster(NODES)
    pool = RecordingPool()
    cluster.node(A).pool = pool  # type: ignore[assignment]
    cluster.change(cluster.topology.ring.without_node(A), 60)
    assert pool.retired == 0  # draining: still in use for 60 s
    cluster.change(cluster.topology.ring.without_node("b:11211"), 60)
    assert pool.retired == 1  # the window was cut short: the node it drained is gone now


def test_reweighting_keeps_the_node_its_health_and_its_counters() -> None:
    cluster = Cluster(NODES, on_error="miss")
    node = cluster.node(A)
    cluster.get(cluster.key_on(A))
    cluster.fail(A)
    cluster.change(cluster.topology.ring.with_weight(A, 3), 0)
    assert cluster.node(A) is node and node.spec.weight == 3
    assert node.health.state == DOWN and node.counters()["ops"] == 1
    assert cluster.membership.node_states() == {A: DOWN, "b:11211": UP, "c:11211": UP}


def test_node_states_show_probing_while_a_probe_is_in_flight() -> None:
    cluster = Cluster(NODES)
    cluster.fail(A)
    cluster.revive(A)
    states: list[str] = []
    cluster.servers[A].before = lambda line: states.append(cluster.membership.node_states()[A])
    cluster.prober_pass()
    assert states[0] == PROBING and cluster.membership.node_states()[A] == UP


def test_a_down_node_wakes_the_prober_and_only_policies_that_fail_over_emit_failover() -> None:
    for failover, expected in (("fail_fast", ["node_down"]), ("remap", ["node_down", "failover"])):
        cluster = Cluster(NODES, failover=failover)
        wakes = cluster.membership.prober.wakes  # type: ignore[attr-defined]
        cluster.fail(A)
        assert cluster.kinds() == expected
        assert cluster.membership.prober.wakes == wakes + 1  # type: ignore[attr-defined]


def test_keys_moved_by_a_change_follow_the_new_ring_at_once() -> None:
    cluster = Cluster(NODES)
    keys = [f"k{i}" for i in range(200)]
    owners = {k: cluster.owner_id(k) for k in keys}
    cluster.change(cluster.topology.ring.with_node(D), 0)
    moved = [k for k in keys if cluster.owner_id(k) != owners[k]]
    assert moved and all(cluster.owner_id(k) == D for k in moved)  # only keys to the new node move
    for key in moved[:5]:
        assert cluster.set(key, key) is True
        assert cluster.servers[D].peek(key.encode()) == key.encode()
    hashed = [(k, k.encode(), k.encode()) for k in moved]
    plan = cluster.router.plan(cluster.topology, hashed, CallKind.READ, "get_many")
    assert list(plan.groups) == [D]


# -- the client's checks ------------------------------------------------------------------------------


def test_adding_a_present_node_or_removing_an_absent_or_last_one_raises() -> None:
    client = Client(["192.0.2.1:11211", "192.0.2.2:11211"])  # TEST-NET: nothing is contacted
    with pytest.raises(ConfigurationError, match="already on the ring"):
        client.add_node("192.0.2.1:11211")
    with pytest.raises(ConfigurationError, match="not on the ring"):
        client.remove_node("192.0.2.9:11211")
    client.remove_node("192.0.2.2:11211")
    with pytest.raises(ConfigurationError, match="last node"):
        client.remove_node("192.0.2.1:11211")
    with pytest.raises(ConfigurationError, match="warmup_s"):
        client.add_node("192.0.2.3:11211", warmup_s=-1)
    assert client.nodes == ("192.0.2.1:11211",)
    client.close()


def test_set_nodes_reconciles_to_a_list_and_reports_the_difference() -> None:
    client = Client(["192.0.2.1:11211", "192.0.2.2:11211"])
    events: list[tuple[str, str]] = []
    client.add_listener(lambda e: events.append((e.kind, e.node_id)))
    assert client.set_nodes(["192.0.2.2:11211", "192.0.2.3:11211"]) == (
        ["192.0.2.3:11211"],
        ["192.0.2.1:11211"],
    )
    assert client.set_nodes(["192.0.2.2:11211", "192.0.2.3:11211"]) == ([], [])  # no change, no events
    assert client.nodes == ("192.0.2.2:11211", "192.0.2.3:11211")
    assert events == [("node_added", "192.0.2.3:11211"), ("node_removed", "192.0.2.1:11211")]
    client.close()


def test_a_gutter_server_cannot_join_the_ring() -> None:
    client = Client(["192.0.2.1:11211"], failover="gutter", gutter_servers=["192.0.2.8:11211"])
    with pytest.raises(ConfigurationError, match="gutter server"):
        client.add_node("192.0.2.8:11211")
    with pytest.raises(ConfigurationError, match="gutter server"):
        client.set_nodes(["192.0.2.1:11211", "192.0.2.8:11211"])
    client.close()


@pytest.mark.parametrize(
    ("peer", "same_as"),
    [
        (("127.0.0.1", 11211), ("::1", 11211, 0, 0)),
        (("127.0.0.2", 11211), ("::ffff:127.0.0.1", 11211, 0, 0)),
        (("10.0.0.1", 11211), ("::ffff:10.0.0.1", 11211, 0, 0)),
        ("/run/memcached.sock", "/run/memcached.sock"),
    ],
)
def test_two_addresses_of_one_server_are_recognised(peer: object, same_as: object) -> None:
    from shardcache._membership import _same_server_key

    assert _same_server_key(peer) == _same_server_key(same_as)
    assert _same_server_key(("10.0.0.1", 11211)) != _same_server_key(("10.0.0.1", 11212))
    assert _same_server_key(("10.0.0.1", 11211)) != _same_server_key(("127.0.0.1", 11211))


class _Socket:
    def __init__(self, peer: object) -> None:
        self.peer = peer

    def getpeername(self) -> object:
        if self.peer is None:
            raise OSError("not connected")
        return self.peer


class _Conn:
    def __init__(self, peer: object) -> None:
        self.sock = _Socket(peer)


def test_two_ring_nodes_reaching_one_server_are_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    cluster = Cluster(NODES)
    membership = cluster.membership
    with caplog.at_level("WARNING", logger="shardcache"):
        membership._connected(A, _Conn(("127.0.0.1", 11211)))  # type: ignore[arg-type]
        membership._connected("c:11211", _Conn(None))  # type: ignore[arg-type]  # gone: ignored
        assert not caplog.records
        membership._connected("b:11211", _Conn(("::1", 11211, 0, 0)))  # type: ignore[arg-type]
    assert len(caplog.records) == 1
    assert A in caplog.records[0].getMessage() and "b:11211" in caplog.records[0].getMessage()
    cluster.close()


def test_a_read_of_a_down_nodes_key_wakes_the_prober_even_under_fail_fast() -> None:
    """After close() the prober thread is stopped; a read alone must bring it back, or a node that
    returned would stay down for read-only traffic."""
    cluster = Cluster(NODES, on_error="miss")
    key = cluster.key_on(A)
    cluster.fail(A)
    prober = cluster.membership.prober
    wakes, woken = prober.wakes, prober.woken  # type: ignore[attr-defined]
    assert cluster.get(key, "miss") == "miss"
    assert prober.wakes > wakes  # type: ignore[attr-defined]
    assert prober.woken == woken  # type: ignore[attr-defined]  # kept running, not woken: no spinning
    cluster.close()
