"""Rebalance (issue 11, items 2 and 3): nodes forget the keys they no longer own, so no old copy
resurfaces when the owner fails under remap or when a change is undone; inside a change's window a
key is moved to its owner first; a copy written since it was listed, or whose owner is away, is
left alone."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fakes import Cluster

from shardcache import Client
from shardcache._rebalance import RebalanceReport, rebalance
from shardcache._topology import PINNED_WINDOW_S
from shardcache.errors import ArgumentError

NODES = ["a:11211", "b:11211", "c:11211"]
D = "d:11211"


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    cluster = Cluster(NODES, failover="remap")
    yield cluster
    cluster.close()


def run(cluster: Cluster, batch: int = 500) -> RebalanceReport:
    report: RebalanceReport = cluster.run(rebalance(cluster.core, batch=batch, keys_per_s=None))
    return report


def scale_out(cluster: Cluster, window_s: float, count: int = 200) -> list[tuple[str, str]]:
    """Store ``count`` keys, add d: ``(key, previous owner)`` of the keys that moved to d."""
    before = {f"k{i}": cluster.owner_id(f"k{i}") for i in range(count)}
    for key, owner in before.items():
        cluster.servers[owner].put(cluster.core.keys.wire(key)[1], b"old-" + key.encode(), flags=16)
    cluster.change(cluster.topology.ring.with_node(D), window_s)
    moved = [(key, old) for key, old in before.items() if cluster.owner_id(key) == D]
    assert len(moved) >= 20
    return moved


def test_after_the_windows_a_stray_is_deleted_and_owned_keys_stay(cluster: Cluster) -> None:
    moved = scale_out(cluster, 0.0)
    cluster.clock.advance(PINNED_WINDOW_S + 1)
    report = run(cluster)
    for key, old in moved:
        assert cluster.servers[old].peek(key.encode()) is None  # the old copy is gone
        assert cluster.servers[D].peek(key.encode()) is None  # and not copied: no window is open
    assert (report.strays, report.deleted, report.copied, report.skipped) == (len(moved), len(moved), 0, 0)
    assert report.nodes == 4 and report.scanned == 200 and report.failed_nodes == ()
    progress = [event for event in cluster.seen if event.kind == "rebalanced"]
    assert sorted(event.node_id for event in progress) == sorted([*NODES, D])
    assert sum(int(event.detail.split("deleted ")[1].split(",")[0]) for event in progress) == len(moved)
    stayed = [f"k{i}" for i in range(200) if cluster.owner_id(f"k{i}") != D]
    assert all(cluster.server_for(key).peek(key.encode()) == b"old-" + key.encode() for key in stayed)


def test_inside_a_window_a_stray_is_moved_to_its_owner_first(cluster: Cluster) -> None:
    moved = scale_out(cluster, 60.0)
    cluster.servers[D].put(moved[0][0].encode(), b"newer")  # written on d since: kept, not overwritten
    report = run(cluster, batch=7)  # several batches
    assert cluster.servers[D].peek(moved[0][0].encode()) == b"newer"
    for key, old in moved[1:]:
        assert cluster.servers[D].peek(key.encode()) == b"old-" + key.encode()
        assert cluster.servers[old].peek(key.encode()) is None
    assert report.copied == len(moved) - 1 and report.deleted == len(moved)


def test_a_counter_keeps_its_count_when_rebalanced_in_the_pinned_window(cluster: Cluster) -> None:
    key = "hits"
    assert cluster.incr(key, 1, initial=40) == 40
    assert cluster.incr(key, 1) == 41
    old = cluster.owner_id(key)
    ring = cluster.topology.ring
    for i in range(50):  # a node that takes this key
        candidate = ring.with_node(f"n{i}:11211")
        if candidate.node_for(key) != old:
            cluster.change(candidate, 0.0)
            break
    report = run(cluster)
    assert report.copied >= 1
    assert cluster.incr(key, 1) == 42  # counted on, on its new owner
    assert cluster.servers[old].peek(key.encode()) is None


def test_a_stray_written_since_it_was_listed_is_left_alone(cluster: Cluster) -> None:
    moved = scale_out(cluster, 0.0)
    cluster.clock.advance(PINNED_WINDOW_S + 1)
    key, old = moved[0]
    server = cluster.servers[old]

    def write_first(line: bytes) -> None:  # a process on the old ring writes just before each delete
        if line.startswith(b"md " + key.encode() + b" "):
            server.put(key.encode(), b"late write")

    server.before = write_first
    report = run(cluster)
    assert server.peek(key.encode()) == b"late write"  # written after each listing: never deleted
    assert report.changed == 3 and report.deleted == len(moved) - 1  # tried once per pass
    server.before = None
    report = run(cluster)  # listed with its new CAS: now it goes
    assert server.peek(key.encode()) is None and (report.strays, report.deleted) == (1, 1)


def test_strays_whose_owner_is_down_are_left_for_the_stand_in(cluster: Cluster) -> None:
    moved = scale_out(cluster, 0.0)
    cluster.clock.advance(PINNED_WINDOW_S + 1)
    cluster.fail(D)
    report = run(cluster)
    assert report.skipped == len(moved) and report.deleted == 0
    assert report.failed_nodes == (D,)
    assert all(cluster.servers[old].peek(key.encode()) is not None for key, old in moved)


def test_only_keys_under_the_client_prefix_are_touched() -> None:
    cluster = Cluster(NODES, key_prefix="app:")
    try:
        for i in range(100):  # another application's keys, on whatever node
            cluster.servers[NODES[i % 3]].put(b"other:%d" % i, b"theirs")
        moved = scale_out(cluster, 0.0)
        cluster.clock.advance(PINNED_WINDOW_S + 1)
        report = run(cluster)
        assert report.scanned == 200 and report.deleted == len(moved)
        assert all(cluster.servers[NODES[i % 3]].peek(b"other:%d" % i) == b"theirs" for i in range(100))
        assert all(cluster.servers[old].peek(b"app:" + key.encode()) is None for key, old in moved)
    finally:
        cluster.close()


def test_a_busy_crawler_is_waited_for(cluster: Cluster) -> None:
    moved = scale_out(cluster, 0.0)
    cluster.clock.advance(PINNED_WINDOW_S + 1)
    cluster.servers["a:11211"].crawler_busy = 2
    report = run(cluster)
    assert report.deleted == len(moved) and report.failed_nodes == ()
    assert len(cluster.servers["a:11211"].sent(b"lru_crawler")) == 4  # 2 busy, then 2 passes


def test_scale_out_then_in_does_not_bring_old_values_back(cluster: Cluster) -> None:
    # Issue 11, item 3: add d, update the moved keys after the windows, remove d: without the
    # rebalance between, their previous owners served the pre-scale-out values (hits).
    moved = scale_out(cluster, 0.0)
    cluster.clock.advance(PINNED_WINDOW_S + 1)
    for key, _ in moved:
        assert cluster.set(key, "new")
    run(cluster)
    cluster.change(cluster.topology.ring.without_node(D), 0.0)
    assert [cluster.get(key) for key, _ in moved] == [None] * len(moved)  # a miss, never "old-..."


def test_remap_after_scale_out_serves_no_pre_move_value(cluster: Cluster) -> None:
    # Issue 11, item 2: the stand-in of a failed new owner is often the key's previous owner.
    moved = scale_out(cluster, 0.0)
    cluster.clock.advance(PINNED_WINDOW_S + 1)
    for key, _ in moved:
        assert cluster.set(key, "new")
    run(cluster)
    cluster.fail(D)
    served = [cluster.get(key) for key, _ in moved]
    assert all(value is None for value in served), served


@pytest.mark.parametrize(
    ("batch", "keys_per_s"),
    [(0, None), (10_001, None), (1.5, None), (10, 0), (10, -1), (10, True), (10, "5")],
)
def test_bad_arguments_raise_before_anything_is_sent(
    cluster: Cluster, batch: object, keys_per_s: object
) -> None:
    with pytest.raises(ArgumentError):
        cluster.run(rebalance(cluster.core, batch=batch, keys_per_s=keys_per_s))  # type: ignore[arg-type]
    assert not any(server.commands for server in cluster.servers.values())


def test_a_dry_run_counts_the_strays_and_touches_nothing(cluster: Cluster) -> None:
    moved = scale_out(cluster, 60.0)
    report = cluster.run(rebalance(cluster.core, 500, None, dry_run=True))
    assert report.strays == len(moved) and report.deleted == report.copied == 0
    assert all(cluster.servers[old].peek(key.encode()) is not None for key, old in moved)
    assert all(cluster.servers[D].peek(key.encode()) is None for key, _ in moved)
    assert not any(server.sent(b"md") or server.sent(b"ms") for server in cluster.servers.values())


def test_what_a_listing_missed_is_caught_by_the_next_pass(cluster: Cluster) -> None:
    # memcached's crawler can miss items that move between LRU segments while it crawls.
    moved = scale_out(cluster, 0.0)
    cluster.clock.advance(PINNED_WINDOW_S + 1)
    key, old = moved[0]
    server = cluster.servers[old]
    hidden = server._items.pop(key.encode())  # not listed by the first metadump...

    def back_after_first_listing(line: bytes) -> None:
        if line.startswith(b"md ") and key.encode() not in server._items:
            server._items[key.encode()] = hidden  # ...but there all along

    server.before = back_after_first_listing
    report = run(cluster)
    assert server.peek(key.encode()) is None
    assert (report.strays, report.deleted) == (len(moved), len(moved))  # counted once


@pytest.mark.parametrize("timeout_s", [0, -1, float("inf"), float("nan"), True, "5"])
def test_a_bad_rebalance_timeout_raises_before_anything_is_sent(timeout_s: object) -> None:
    client = Client(["192.0.2.1:11211"], connect_timeout=0.01, timeout=0.01)
    with pytest.raises(ArgumentError, match="timeout_s"):
        client.rebalance(timeout_s=timeout_s)  # type: ignore[arg-type]  # a network attempt would fail otherwise


def test_slab_classes_a_server_should_not_name_are_not_listed(cluster: Cluster) -> None:
    moved = scale_out(cluster, 0.0)
    cluster.clock.advance(PINNED_WINDOW_S + 1)
    server = cluster.servers["a:11211"]
    server.extra_item_stats = (
        b"STAT items:99:number 5\r\nSTAT items:0:number 1\r\nSTAT items:x:number 2\r\n"
        b"STAT items:1:age 3\r\nSTAT other:2:number 4\r\n"
    )
    report = run(cluster)
    assert report.failed_nodes == () and report.deleted == len(moved)
    assert [line for line in server.sent(b"lru_crawler") if line != b"lru_crawler metadump 1"] == []
