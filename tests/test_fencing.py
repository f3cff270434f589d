"""Rejoin fencing (README "Failures and failover"): a node that comes back never serves a value
older than the last write, stand-in copies are removed and never resurface, past the bound the
node is flushed. The prober's passes run by hand (``Cluster.prober_pass``) over fake servers.
"""

from __future__ import annotations

import threading
import time

import pytest
from fakes import Cluster, FakeExecutor

from shardcache import _batch, recipes
from shardcache._events import Events
from shardcache._prober import Prober, forget_flow
from shardcache._topology import Topology
from shardcache.errors import NodeUnavailableError
from shardcache.health import DOWN, PROBING, UP, Event

NODES = ["a:11211", "b:11211", "c:11211"]
A = "a:11211"


def stand_in_of(cluster: Cluster, key: str) -> str:
    return cluster.topology.ring.preference_list(key, 3)[1]


# -- what is recorded while a node is away --------------------------------------------------------


@pytest.mark.parametrize("failover", ["fail_fast", "remap"])
def test_a_key_written_while_its_node_was_away_is_deleted_there_before_it_is_served(failover: str) -> None:
    cluster = Cluster(NODES, failover=failover, on_error="miss")
    key, other = cluster.key_on(A), cluster.key_on(A, skip=1)
    assert cluster.set(key, "old") and cluster.set(other, "untouched")
    cluster.fail(A)
    cluster.set(key, "new")  # stored on a stand-in (remap) or not at all (fail_fast): fenced on a
    cluster.revive(A)
    assert cluster.servers[A].peek(key.encode()) == b"old"
    cluster.prober_pass()
    assert cluster.node(A).ready
    assert cluster.servers[A].peek(key.encode()) is None  # "old" is gone
    assert cluster.get(key) is None
    assert cluster.get(other) == "untouched"  # keys not changed meanwhile are kept
    assert cluster.servers[A].sent(b"delete") == [b"delete " + key.encode()]


def test_a_delete_that_fails_on_a_live_node_is_never_lost() -> None:
    cluster = Cluster(NODES, on_error="miss", failure_threshold=3)
    key = cluster.key_on(A)
    cluster.set(key, "stale soon")
    cluster.servers[A].hang = True
    assert cluster.delete(key) is False  # the app's invalidation after a database write failed
    cluster.servers[A].hang = False
    node = cluster.node(A)
    assert node.health.state == UP and not node.ready and node.fenced(key.encode())
    assert cluster.get(key, "miss") == "miss"  # the node still holds the value: it must not be read
    cluster.prober_pass()
    assert cluster.servers[A].peek(key.encode()) is None and node.ready


def test_a_write_that_fails_is_fenced_but_a_failed_counter_is_not() -> None:
    cluster = Cluster(NODES, on_error="miss", failure_threshold=5)
    key, counter = cluster.key_on(A), cluster.key_on(A, skip=1)
    cluster.servers[A].put(counter.encode(), b"41", flags=2)
    cluster.servers[A].hang = True
    assert cluster.set(key, "v") is False
    assert cluster.incr(counter, 1) is None
    node = cluster.node(A)
    assert node.fenced(key.encode()) and not node.fenced(counter.encode())  # its count must survive
    cluster.servers[A].hang = False
    cluster.prober_pass()
    assert cluster.incr(counter, 1) == 42


def test_a_fail_fast_write_to_a_down_node_fences_the_key_and_counts_a_failover() -> None:
    cluster = Cluster(NODES)
    key = cluster.key_on(A)
    cluster.fail(A)
    with pytest.raises(NodeUnavailableError):
        cluster.delete(key)
    node = cluster.node(A)
    assert node.fenced(key.encode()) and node.counters()["failovers"] == 1


# -- readmission ----------------------------------------------------------------------------------


def test_a_readmitted_node_serves_at_once_but_its_recorded_keys_miss_until_forgotten() -> None:
    cluster = Cluster(NODES, failover="remap")
    fenced_key, clean_key = cluster.key_on(A), cluster.key_on(A, skip=1)
    cluster.set(fenced_key, "old")
    cluster.set(clean_key, "kept")
    cluster.fail(A)
    cluster.set(fenced_key, "new")
    stand_in = cluster.servers[stand_in_of(cluster, fenced_key)]
    seen: dict[str, object] = {}

    def while_fencing(line: bytes) -> None:
        if line.startswith(b"delete ") and not seen:  # the prober is forgetting: requests race it
            node = cluster.node(A)
            seen["state"], seen["ready"] = node.health.state, node.ready
            seen["fenced"] = cluster.get(fenced_key, "miss")
            seen["clean"] = cluster.get(clean_key)
            seen["written"] = cluster.set(clean_key, "fresh")

    cluster.servers[A].before = while_fencing
    cluster.revive(A)
    stand_in_ops = stand_in.attempts
    cluster.prober_pass()
    assert seen == {"state": UP, "ready": False, "fenced": "miss", "clean": "kept", "written": True}
    assert cluster.servers[A].peek(clean_key.encode()) == b"fresh"  # requests no longer go elsewhere
    assert stand_in.attempts == stand_in_ops + 1  # only the prober's removal of its copy
    assert cluster.node(A).ready and cluster.get(fenced_key) is None
    assert cluster.kinds()[-2:] == ["node_up", "fenced"]
    assert "forgot 1 keys; removed 1 copies" in cluster.seen[-1].detail


def test_a_probe_that_fails_keeps_the_node_down_with_a_longer_backoff() -> None:
    cluster = Cluster(NODES, retry_interval_s=1.0, max_retry_interval_s=8.0)
    cluster.fail(A)
    node = cluster.node(A)
    cluster.prober_pass()
    assert node.health.state == DOWN and cluster.servers[A].attempts == 0  # backoff not elapsed
    cluster.clock.advance(2)
    cluster.prober_pass()
    assert node.health.state == DOWN and cluster.servers[A].attempts == 1
    first_wait = node.health.seconds_until_probe()
    assert first_wait is not None and first_wait > 1.2  # doubled, jittered by at most 20%
    cluster.revive(A)
    cluster.prober_pass()
    assert node.health.state == UP and node.ready
    assert cluster.kinds().count("node_up") == 1


def test_a_forget_pass_that_fails_keeps_the_keys_recorded_and_tries_again() -> None:
    cluster = Cluster(NODES, on_error="miss", failure_threshold=5)
    key = cluster.key_on(A)
    cluster.set(key, "old")
    cluster.fail(A)
    cluster.set(key, "new")
    cluster.revive(A)
    cluster.servers[A].refuse.add(b"delete")
    cluster.prober_pass()
    node = cluster.node(A)
    assert node.health.state == UP and not node.ready and node.fenced(key.encode())
    assert cluster.get(key, "miss") == "miss"
    cluster.servers[A].refuse.clear()
    cluster.prober_pass()
    assert node.ready and cluster.servers[A].peek(key.encode()) is None


# -- stand-in copies ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "holder"),
    [({"failover": "remap"}, None), ({"failover": "gutter", "gutter_servers": ["g:11211"]}, "g:11211")],
)
def test_the_prober_removes_the_copies_stand_ins_took(options: dict[str, object], holder: str | None) -> None:
    cluster = Cluster(NODES, **options)
    keys = [cluster.key_on(A, skip=i) for i in range(5)]
    cluster.fail(A)
    for key in keys:
        cluster.set(key, "during outage")
    holders = {holder} if holder else {stand_in_of(cluster, key) for key in keys}
    assert {w for h in holders for w in cluster.servers[h].stored()} == {k.encode() for k in keys}
    cluster.revive(A)
    cluster.prober_pass()
    assert not any(cluster.servers[h].stored() for h in holders)
    assert all(cluster.get(key) is None for key in keys)


def test_copies_of_an_earlier_outage_are_never_read_if_the_node_fails_again_first() -> None:
    cluster = Cluster(NODES, failover="remap", failure_threshold=5)
    key = cluster.key_on(A)
    holder = cluster.servers[stand_in_of(cluster, key)]
    cluster.fail(A)
    cluster.set(key, "outage 1")
    cluster.revive(A)
    cluster.servers[A].refuse.add(b"delete")  # readmitted, but the forget pass fails
    cluster.prober_pass()
    cluster.servers[A].refuse.clear()
    assert cluster.node(A).health.state == UP
    assert cluster.set(key, "after return") is True  # written on a itself
    cluster.fail(A)
    assert holder.peek(key.encode()) == b"outage 1"  # the copy is still there
    assert cluster.get(key, "miss") == "miss"  # and never read: it is older than the last write


def test_copies_being_removed_are_never_read_if_the_node_fails_again_meanwhile() -> None:
    cluster = Cluster(NODES, failover="remap")
    key = cluster.key_on(A)
    cluster.fail(A)
    cluster.set(key, "outage 1")
    seen: dict[str, object] = {}

    def fails_again(line: bytes) -> None:
        if line.startswith(b"delete ") and not seen:  # the prober's pass is under way
            seen["written"] = cluster.set(key, "after return")
            cluster.fail(A)
            seen["read"] = cluster.get(key, "miss")

    cluster.servers[A].before = fails_again
    cluster.revive(A)
    cluster.prober_pass()
    assert seen == {"written": True, "read": "miss"}  # was: "read": "outage 1" (before the fix)


def test_a_stand_in_write_in_flight_during_readmission_never_resurfaces() -> None:
    cluster = Cluster(NODES, failover="remap")
    key = cluster.key_on(A)
    holder = cluster.servers[stand_in_of(cluster, key)]
    cluster.fail(A)
    stalled: list[bool] = []

    def stalls(line: bytes) -> None:
        if line.startswith(b"set ") and not stalled:  # the write is on its way to the stand-in...
            stalled.append(True)
            cluster.revive(A)
            cluster.prober_pass()  # ...while a is readmitted and its copies are removed
            stalled.append(cluster.node(A).ready)

    holder.before = stalls
    assert cluster.set(key, "during") is True
    assert stalled == [True, True] and holder.peek(key.encode()) == b"during"  # landed after removal
    assert cluster.set(key, "after") is True  # on a itself
    cluster.fail(A)
    assert cluster.get(key, "miss") in ("miss", "after")  # never "during"


def test_a_fresh_write_during_a_second_outage_replaces_the_stale_copy() -> None:
    cluster = Cluster(NODES, failover="remap", failover_ttl_s=3600)
    key = cluster.key_on(A)
    holder = cluster.servers[stand_in_of(cluster, key)]
    cluster.fail(A)
    cluster.set(key, "outage 1")
    cluster.fail(holder.node_id)  # the copy cannot be removed: it stays recorded as stale
    cluster.revive(A)
    cluster.prober_pass()
    node = cluster.node(A)
    assert node.ready and node.has_work()  # serving; the copy is still to be removed
    cluster.revive(holder.node_id)
    cluster.fail(A)
    cluster.prober_pass()  # the holder is back (a stays down: its server refuses)
    assert holder.peek(key.encode()) == b"outage 1"
    assert cluster.get(key, "miss") == "miss"  # stale: never read
    cluster.set(key, "outage 2")
    assert cluster.get(key) == "outage 2"


def test_a_copy_left_on_a_stand_in_that_failed_meanwhile_is_never_read() -> None:
    cluster = Cluster(NODES, failover="remap")
    key = cluster.key_on(A)
    first, second = cluster.topology.ring.preference_list(key, 3)[1:]
    cluster.fail(A)
    cluster.set(key, "on first")
    cluster.fail(first)
    with pytest.raises(NodeUnavailableError):  # the stand-in is down too: no second stand-in,
        cluster.set(key, "on second")  # which another process, seeing `first` up, would not use
    assert cluster.servers[second].peek(key.encode()) is None
    cluster.revive(first)
    cluster.prober_pass()  # first is back (A is probed too, and stays down)
    cluster.servers[A].down = True
    assert cluster.node(first).health.state == UP
    assert cluster.get(key, "miss") == "miss"  # the copy of "on first" is outdated
    cluster.revive(A)
    cluster.prober_pass()
    assert not cluster.servers[first].stored() and not cluster.servers[second].stored()


def test_copies_on_a_holder_no_longer_configured_are_left_to_expire() -> None:
    cluster = Cluster(["a:11211", "b:11211"], failover="remap")
    key = cluster.key_on(A)
    cluster.fail(A)
    cluster.set(key, "copy")
    cluster.membership.change(cluster.topology.ring.with_node("c:11211").without_node("b:11211"), 0)
    cluster.servers["c:11211"] = type(cluster.servers[A])("c:11211", cluster.clock)
    cluster.revive(A)
    cluster.prober_pass()
    assert cluster.node(A).ready
    assert cluster.servers["b:11211"].sent(b"delete") == []
    ttl = cluster.servers["b:11211"].ttl_of(key.encode())
    assert ttl is not None and 0 < ttl <= 60  # capped: it expires soon


def test_a_forget_pass_whose_flush_fails_keeps_the_node_fencing() -> None:
    cluster = Cluster(NODES, fence_max_keys=0, on_error="miss", failure_threshold=5)
    key = cluster.key_on(A)
    cluster.set(key, "old")
    cluster.fail(A)
    cluster.set(key, "new")  # fail_fast: fenced, and past a bound of 0 keys the node must be flushed
    cluster.revive(A)
    server = cluster.servers[A]
    server.before = lambda line: setattr(server, "down", True) if line == b"version" else None  # dies again
    cluster.prober_pass()
    node = cluster.node(A)
    assert node.health.state == UP and not node.ready and server.peek(key.encode()) == b"old"
    assert cluster.get(key, "miss") == "miss"
    server.before = None
    server.down = False
    cluster.prober_pass()
    assert node.ready and server.peek(key.encode()) is None


def test_copies_a_stand_in_refuses_to_delete_are_left_to_their_capped_ttl(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cluster = Cluster(NODES, failover="remap")
    key = cluster.key_on(A)
    holder = cluster.servers[stand_in_of(cluster, key)]
    cluster.fail(A)
    cluster.set(key, "copy")
    holder.refuse.add(b"delete")
    cluster.revive(A)
    cluster.prober_pass()
    assert cluster.node(A).ready and not cluster.node(A).has_work()
    assert holder.peek(key.encode()) == b"copy"
    assert "removing copies for a:11211" in caplog.text


# -- past the bound ----------------------------------------------------------------------------------


def test_past_fence_max_keys_the_node_is_flushed_and_every_key_misses_until_then() -> None:
    cluster = Cluster(NODES, fence_max_keys=2, on_error="miss")
    keys = [cluster.key_on(A, skip=i) for i in range(4)]
    for key in keys:
        cluster.set(key, "old")
    cluster.fail(A)
    for key in keys[:3]:
        cluster.delete(key)
    node = cluster.node(A)
    assert node.fenced(keys[3].encode())  # overflowed: every key counts as recorded
    cluster.revive(A)
    cluster.servers[A].refuse.add(b"flush_all")
    cluster.prober_pass()
    assert node.health.state == UP and not node.ready
    assert cluster.get(keys[3], "miss") == "miss"
    cluster.servers[A].refuse.clear()
    cluster.prober_pass()
    assert node.ready and not cluster.servers[A].stored()
    assert cluster.servers[A].sent(b"delete") == [] and len(cluster.servers[A].sent(b"flush_all")) == 2
    assert cluster.seen[-1].detail.startswith("flushed (fence log overflowed)")


def test_past_fence_max_keys_of_stand_in_copies_the_node_is_flushed() -> None:
    cluster = Cluster(NODES, failover="gutter", gutter_servers=["g:11211"], fence_max_keys=1)
    keys = [cluster.key_on(A, skip=i) for i in range(3)]
    cluster.fail(A)
    for key in keys:
        cluster.set(key, "x")
    cluster.revive(A)
    cluster.prober_pass()
    assert cluster.servers[A].sent(b"flush_all") and cluster.node(A).ready


def test_a_flush_all_that_misses_a_down_node_flushes_it_on_return() -> None:
    cluster = Cluster(NODES)
    key = cluster.key_on(A)
    cluster.set(key, "before flush")
    cluster.fail(A)
    with pytest.raises(NodeUnavailableError, match="a:11211"):
        cluster.run(_batch.flush_all(cluster.core, 0))
    cluster.revive(A)
    seen = []
    cluster.servers[A].before = lambda line: (
        seen.append(cluster.get(key, "miss")) if line == b"flush_all 0" else None
    )
    cluster.prober_pass()
    assert seen == ["miss"]  # readmitted, not yet flushed: nothing on it is read
    assert cluster.servers[A].sent(b"flush_all") == [b"flush_all 0"] and not cluster.servers[A].stored()


def test_a_flush_all_that_fails_on_a_live_node_flushes_it_later() -> None:
    cluster = Cluster(NODES, on_error="miss", failure_threshold=5)
    cluster.servers[A].refuse.add(b"flush_all")
    assert cluster.run(_batch.flush_all(cluster.core, 0)) == {A: False, "b:11211": True, "c:11211": True}
    assert not cluster.node(A).ready
    cluster.servers[A].refuse.clear()
    cluster.prober_pass()
    assert cluster.node(A).ready


# -- pinned calls on a fencing node -----------------------------------------------------------------


def test_cas_update_on_a_key_still_being_fenced_raises_rather_than_silently_doing_nothing() -> None:
    cluster = Cluster(NODES, failure_threshold=5)
    key = cluster.key_on(A)
    cluster.set(key, 1)
    cluster.servers[A].hang = True
    with pytest.raises(NodeUnavailableError):
        cluster.delete(key)  # fenced on a, which stays UP
    cluster.servers[A].hang = False
    flow = recipes.cas_update_flow(
        cluster.core, key, lambda n: n + 1, initial=0, expire=0, max_attempts=3, backoff_s=0, max_backoff_s=0
    )
    with pytest.raises(NodeUnavailableError):
        cluster.run(flow)


def test_a_counter_on_a_key_still_being_fenced_is_not_incremented() -> None:
    cluster = Cluster(NODES, failure_threshold=5, on_error="miss")
    key = cluster.key_on(A)
    cluster.servers[A].put(key.encode(), b"10", flags=2)
    cluster.servers[A].hang = True
    cluster.delete(key)
    cluster.servers[A].hang = False
    assert cluster.incr(key, 1) is None
    assert cluster.servers[A].peek(key.encode()) == b"10"  # the old count was not built upon


# -- events -----------------------------------------------------------------------------------------


def test_an_outage_and_return_emit_down_failover_up_and_fenced_in_order() -> None:
    cluster = Cluster(NODES, failover="remap")
    key = cluster.key_on(A)
    cluster.fail(A)
    cluster.set(key, "v")
    cluster.revive(A)
    cluster.prober_pass()
    assert [(e.kind, e.node_id) for e in cluster.seen] == [
        ("node_down", A),
        ("failover", A),
        ("node_up", A),
        ("fenced", A),
    ]
    assert cluster.membership.node_states() == dict.fromkeys(NODES, "up")


# -- the fence log and node bookkeeping --------------------------------------------------------------


def test_a_fence_log_past_its_limit_overflows_and_keeps_keys_in_flight_recorded() -> None:
    cluster = Cluster(NODES, fence_max_keys=2)
    node = cluster.node(A)
    node.fence(b"a")
    node.fence(b"b")
    assert node.fenced(b"a") and not node.fenced(b"other") and not node.ready
    node.fence(b"c")  # past the limit: every key counts as recorded, the node will be flushed
    assert node.fenced(b"other")
    work = node.take_work()
    assert work.keys == {b"a", b"b"} and work.flush
    assert node.fenced(b"a") and node.fenced(b"other")  # in flight: still recorded
    node.fence(b"d")  # a request fences a key while the pass is under way
    node.settle_work(work, done=False, kept_stale={})  # the pass failed: recorded again, within the limit
    again = node.take_work()
    assert again.flush and len(again.keys) == 2 and b"d" in again.keys
    node.settle_work(again, done=True, kept_stale={})
    assert not node.fenced(b"a") and not node.has_work() and node.ready


def test_node_counters_repr_and_reweighting() -> None:
    cluster = Cluster(NODES, on_error="miss")
    node = cluster.node(A)
    cluster.get(cluster.key_on(A))
    assert node.counters() == {"ops": 1, "errors": 0, "timeouts": 0, "failovers": 0, "state_changes": 0}
    assert repr(node) == "<Node a:11211 up>"
    node.fence(b"k")
    assert repr(node) == "<Node a:11211 up (fencing)>"
    spec = node.spec.with_weight(3)
    node.reweighted(spec)
    assert node.spec is spec and node.node_id == A


# -- the prober thread --------------------------------------------------------------------------------


def test_the_prober_thread_readmits_a_node_then_stops_by_itself() -> None:
    cluster = Cluster(NODES, failover="remap")
    key = cluster.key_on(A)
    cluster.set(key, "old")
    cluster.fail(A)
    cluster.set(key, "new")
    cluster.revive(A)
    prober = Prober(lambda: cluster.topology, cluster.run, cluster.events)
    # A request fencing a key as the pass ends wakes the prober: it makes one more pass, finds
    # nothing to do and stops (no idle wait).
    cluster.events.add_listener(lambda e: prober.start() if e.kind == "fenced" else None)
    before = set(threading.enumerate())
    prober.start()
    (thread,) = [t for t in threading.enumerate() if t not in before and t.name == "shardcache-prober"] or [
        None
    ]
    assert thread is not None
    thread.join(timeout=2)
    assert not thread.is_alive()  # stopped by itself, not by close()
    assert cluster.node(A).ready and cluster.servers[A].peek(key.encode()) is None
    prober.close()  # nothing to stop: returns at once


def test_the_prober_thread_forgets_keys_of_a_live_node_and_a_closed_prober_does_not_start() -> None:
    cluster = Cluster(NODES, failure_threshold=5, on_error="miss")
    key = cluster.key_on(A)
    cluster.set(key, "old")
    cluster.servers[A].hang = True
    cluster.delete(key)
    cluster.servers[A].hang = False
    done = threading.Event()
    cluster.events.add_listener(lambda e: done.set() if e.kind == "fenced" else None)
    prober = Prober(lambda: cluster.topology, cluster.run, cluster.events)
    prober.start()
    prober.start()  # already running: only a wake
    assert done.wait(2)
    prober.close()
    assert cluster.node(A).ready and cluster.servers[A].peek(key.encode()) is None


def test_the_prober_thread_waits_for_a_down_node_without_probing_early() -> None:
    cluster = Cluster(NODES, retry_interval_s=30.0)
    cluster.fail(A)
    probed = []
    executor = FakeExecutor(cluster.servers, Events(), cluster.clock)
    prober = Prober(lambda: cluster.topology, lambda flow: probed.append(executor.run(flow)), Events())
    prober.start()
    prober.close()  # bounded: the thread is waiting on its backoff and wakes at once
    assert probed == [] and cluster.node(A).health.state == DOWN
    assert cluster.node(A).health.state != PROBING


def test_keeping_a_down_node_probed_restarts_a_stopped_prober_without_waking_a_running_one() -> None:
    """Every request that finds a node down asks for this: it must not make the prober loop spin."""
    cluster = Cluster(NODES, retry_interval_s=30.0)
    cluster.fail(A)
    passes: list[float] = []

    def topology() -> Topology:  # read once per pass of the prober's loop
        passes.append(time.monotonic())
        return cluster.topology

    prober = Prober(topology, lambda flow: None, Events())
    prober.start(wake=False)  # stopped (as after close()): started
    assert prober._thread is not None and prober._thread.is_alive()
    deadline = time.monotonic() + 2
    while not passes and time.monotonic() < deadline:  # its first pass
        time.sleep(0.001)
    time.sleep(0.05)
    first = len(passes)
    for _ in range(100):
        prober.start(wake=False)  # running: nothing, the loop is not woken
        time.sleep(0.0005)
    assert len(passes) == first  # waking it each time would have run up to 100 more passes
    prober.start()  # new work: woken
    deadline = time.monotonic() + 2
    while len(passes) == first and time.monotonic() < deadline:
        time.sleep(0.001)
    assert len(passes) > first
    prober.close()


def test_forget_flow_with_nothing_to_do_settles_and_reports_success() -> None:
    cluster = Cluster(NODES)
    node = cluster.node(A)
    assert cluster.run(forget_flow(node, lambda: cluster.topology, cluster.events)) is True
    assert node.ready and cluster.servers[A].attempts == 0
    assert not [e for e in cluster.seen if isinstance(e, Event) and e.kind == "fenced"]


def test_multi_key_invalidations_and_writes_that_fail_are_fenced_too() -> None:
    cluster = Cluster(NODES, on_error="miss", failure_threshold=5)
    keys = [cluster.key_on(A, skip=i) for i in range(3)]
    for key in keys:
        cluster.servers[A].put(key.encode(), b"old", flags=16)
    cluster.servers[A].hang = True
    assert cluster.run(_batch.delete_many(cluster.core, keys[:2], None)) is False
    assert cluster.run(_batch.set_many(cluster.core, {keys[2]: "new"}, 0, None, None)) == [keys[2]]
    cluster.servers[A].hang = False
    node = cluster.node(A)
    assert all(node.fenced(key.encode()) for key in keys)
    assert cluster.run(_batch.fetch(cluster.core, keys, with_cas=False)) == {}  # none of the old values
    cluster.prober_pass()
    assert not cluster.servers[A].stored()


def test_errors_that_become_misses_still_emit_an_event_and_a_log_record(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cluster = Cluster(NODES, on_error="miss")
    key = cluster.key_on(A)
    cluster.servers[A].hang = True
    assert cluster.get(key, "miss") == "miss"
    (event,) = [e for e in cluster.seen if e.kind == "error"]
    assert event.node_id == A and event.key == key and "timed out" in event.detail
    assert any(r.name == "shardcache" and "timed out" in r.getMessage() for r in caplog.records)


def test_copies_kept_for_a_stand_in_that_is_down_make_no_busy_loop_nor_event_spam() -> None:
    """A history run's event trace showed "fenced ... forgot 0 keys; removed 0 copies" five times
    every half second while a stand-in holding copies was down: the prober must wait quietly."""
    cluster = Cluster(NODES, failover="remap", on_error="miss")
    key = cluster.key_on(A)
    stand_in = stand_in_of(cluster, key)
    cluster.fail(A)
    assert cluster.set(key, "copy")
    cluster.fail(stand_in)
    cluster.revive(A)
    cluster.prober_pass()  # A is readmitted; the copy on the down stand-in is kept for later
    assert cluster.node(A).ready
    fenced = [e for e in cluster.seen if e.kind == "fenced"]
    for _ in range(3):
        cluster.prober_pass()
    assert [e for e in cluster.seen if e.kind == "fenced"] == fenced
    cluster.revive(stand_in)
    cluster.prober_pass()
    cluster.prober_pass()
    assert cluster.servers[stand_in].peek(key.encode()) is None  # removed once it is back
    assert not cluster.node(A).has_work()
