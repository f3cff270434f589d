"""Routing while nodes fail (README "Failures and failover"): fail_fast, remap, gutter, pinned calls.

Every test runs the real command flows and router over in-memory fake servers (tests/fakes.py).
"""

from __future__ import annotations

import types
from collections.abc import Iterator

import pytest
from fakes import Cluster

from shardcache import _batch, recipes
from shardcache import _commands as cmd
from shardcache._commands import Engine
from shardcache._router import CallKind, Decision, Router
from shardcache.errors import NodeUnavailableError

NODES = ["a:11211", "b:11211", "c:11211"]


@pytest.fixture
def remap() -> Iterator[Cluster]:
    cluster = Cluster(NODES, failover="remap", failover_ttl_s=60)
    yield cluster
    cluster.close()


def stand_in_of(cluster: Cluster, key: str) -> str:
    return cluster.topology.ring.preference_list(key, 3)[1]


# -- a healthy node -------------------------------------------------------------------------------


def test_ready_owner_serves_its_keys_and_no_other_node_is_touched() -> None:
    cluster = Cluster(NODES)
    key = cluster.key_on("b:11211")
    assert cluster.set(key, "v") is True
    assert cluster.get(key) == "v"
    assert cluster.servers["b:11211"].peek(key.encode()) is not None
    assert cluster.servers["a:11211"].attempts == cluster.servers["c:11211"].attempts == 0


# -- fail_fast ------------------------------------------------------------------------------------


def test_fail_fast_misses_and_refuses_writes_at_once_without_a_connection_attempt() -> None:
    cluster = Cluster(NODES, on_error="miss")
    key = cluster.key_on("a:11211")
    cluster.fail("a:11211")
    attempts = {node_id: server.attempts for node_id, server in cluster.servers.items()}
    assert cluster.get(key, "default") == "default"
    assert cluster.set(key, "v") is False
    assert cluster.delete(key) is False
    assert {node_id: server.attempts for node_id, server in cluster.servers.items()} == attempts
    assert all(not server.stored() for server in cluster.servers.values())  # no stand-in data anywhere
    assert cluster.node("a:11211").counters()["failovers"] == 3


def test_fail_fast_with_on_error_raise_raises_node_unavailable_naming_the_node() -> None:
    cluster = Cluster(NODES)
    key = cluster.key_on("a:11211")
    cluster.fail("a:11211")
    with pytest.raises(NodeUnavailableError, match=r"a:11211 is down \(get; failover=fail_fast\)") as info:
        cluster.get(key)
    assert info.value.node_id == "a:11211"
    with pytest.raises(NodeUnavailableError):
        cluster.set(key, "v")
    assert "failover" not in cluster.kinds()  # fail_fast: nothing goes elsewhere


def test_transport_failures_mark_a_node_down_but_refusals_do_not() -> None:
    cluster = Cluster(NODES, on_error="miss")
    key = cluster.key_on("a:11211")
    server = cluster.servers["a:11211"]
    server.refuse.add(b"get")
    for _ in range(5):
        assert cluster.get(key) is None  # SERVER_ERROR: an error event, not a transport failure
    assert cluster.node("a:11211").health.state == "up"
    server.refuse.clear()
    server.hang = True
    assert cluster.get(key) is None
    assert cluster.membership.node_states()["a:11211"] == "up"  # one failure is below the threshold
    assert cluster.get(key) is None
    assert cluster.membership.node_states()["a:11211"] == "down"
    counters = cluster.node("a:11211").counters()
    assert counters["timeouts"] == 2 and counters["errors"] == 7 and counters["state_changes"] == 1
    assert cluster.kinds().count("error") == 7 and "node_down" in cluster.kinds()


# -- remap ----------------------------------------------------------------------------------------


def test_remap_serves_a_down_nodes_keys_on_the_next_live_node_with_capped_ttls(remap: Cluster) -> None:
    key = remap.key_on("a:11211")
    stand_in = remap.servers[stand_in_of(remap, key)]
    remap.fail("a:11211")
    assert remap.set(key, "v") is True  # expire=0 (never) is capped too
    assert remap.get(key) == "v"
    assert stand_in.ttl_of(key.encode()) == 60
    assert remap.set(key, "short", expire=5) is True
    assert stand_in.ttl_of(key.encode()) == 5
    assert remap.set(key, "long", expire=3600) is True
    assert stand_in.ttl_of(key.encode()) == 60
    assert remap.kinds()[:2] == ["node_down", "failover"]


def test_remap_stands_in_only_on_the_next_node_so_every_process_picks_the_same(remap: Cluster) -> None:
    key = remap.key_on("a:11211")
    first, second = remap.topology.ring.preference_list(key, 3)[1:]
    remap.fail("a:11211")
    remap.fail(first)  # another process may still see it up, and would stand in there
    with pytest.raises(NodeUnavailableError, match="a:11211"):
        remap.set(key, "v")  # so no process uses a second stand-in: as fail_fast
    with pytest.raises(NodeUnavailableError, match="a:11211"):
        remap.get(key)
    assert remap.servers[second].peek(key.encode()) is None


def test_remap_never_moves_counters_cas_loops_or_locks(remap: Cluster) -> None:
    key = remap.key_on("a:11211")
    stand_in = remap.servers[stand_in_of(remap, key)]
    remap.fail("a:11211")
    with pytest.raises(NodeUnavailableError):
        remap.incr(key, 1, initial=0)
    with pytest.raises(NodeUnavailableError):
        remap.run(
            recipes.cas_update_flow(
                remap.core,
                key,
                lambda n: n + 1,
                initial=0,
                expire=0,
                max_attempts=3,
                backoff_s=0,
                max_backoff_s=0,
            )
        )
    assert stand_in.attempts == 0 and not stand_in.stored()  # a count never restarts from zero elsewhere


def test_remap_pinned_calls_return_none_with_on_error_miss() -> None:
    cluster = Cluster(NODES, failover="remap", on_error="miss")
    key = cluster.key_on("a:11211")
    cluster.fail("a:11211")
    assert cluster.incr(key, 1, initial=0) is None
    flow = recipes.cas_update_flow(
        cluster.core, key, lambda n: n + 1, initial=0, expire=0, max_attempts=3, backoff_s=0, max_backoff_s=0
    )
    assert cluster.run(flow) is None
    assert all(not server.stored() for server in cluster.servers.values())


def test_a_read_that_fails_on_the_stand_in_misses_and_counts_against_the_stand_in() -> None:
    remap = Cluster(NODES, failover="remap", on_error="miss")
    key = remap.key_on("a:11211")
    stand_in = remap.servers[stand_in_of(remap, key)]
    remap.fail("a:11211")
    stand_in.hang = True
    assert remap.get(key, "d") == "d"
    assert remap.node(stand_in.node_id).counters()["timeouts"] == 1


# -- gutter ---------------------------------------------------------------------------------------


def test_gutter_serves_a_down_nodes_keys_and_ring_nodes_never_hold_stand_in_data() -> None:
    cluster = Cluster(NODES, failover="gutter", gutter_servers=["g1:11211", "g2:11211"], failover_ttl_s=30)
    keys = [cluster.key_on("a:11211", skip=i) for i in range(10)]
    cluster.fail("a:11211")
    for key in keys:
        assert cluster.set(key, key) is True
    assert {key: cluster.get(key) for key in keys} == {key: key for key in keys}
    gutter = cluster.servers["g1:11211"].stored() | cluster.servers["g2:11211"].stored()
    assert gutter == {key.encode() for key in keys}
    assert not cluster.servers["b:11211"].stored() and not cluster.servers["c:11211"].stored()
    ttls = {
        cluster.servers[gid].ttl_of(w)
        for gid in ("g1:11211", "g2:11211")
        for w in cluster.servers[gid].stored()
    }
    assert ttls == {30}


def test_gutter_node_that_is_down_leaves_no_stand_in() -> None:
    cluster = Cluster(NODES, failover="gutter", gutter_servers=["g1:11211"], on_error="miss")
    key = cluster.key_on("a:11211")
    cluster.fail("a:11211")
    cluster.fail("g1:11211")
    assert "failover" in cluster.kinds()[cluster.kinds().index("node_down", 2) :]  # a gutter node failing
    assert cluster.set(key, "v") is False
    assert cluster.get(key, "d") == "d"
    assert not any(server.stored() for server in cluster.servers.values())


# -- multi-key plans ------------------------------------------------------------------------------


def test_multi_key_calls_group_keys_by_target_and_send_one_job_per_node(remap: Cluster) -> None:
    keys = [f"m{i}" for i in range(30)]
    assert remap.run(_batch.set_many(remap.core, {k: k for k in keys}, 0, None, None)) == []
    assert all(len(server.sent(b"set")) == len(server.stored()) for server in remap.servers.values())
    remap.fail("a:11211")
    hashed = [(k, k.encode(), k.encode()) for k in keys]
    plan = remap.router.plan(remap.topology, hashed, CallKind.READ, "get_many")
    assert set(plan.groups) == {"b:11211", "c:11211"} and not plan.down
    moved = {k.encode() for k in keys if remap.owner_id(k) == "a:11211"}
    assert plan.moved == moved  # the stand-ins' share: their copies were not written, they miss
    assert remap.run(_batch.fetch(remap.core, keys, with_cas=False)) == {
        k: k for k in keys if k.encode() not in moved
    }


def test_a_plan_reports_each_down_node_once_and_multi_key_calls_raise_it() -> None:
    cluster = Cluster(NODES)
    keys = [f"m{i}" for i in range(30)]
    cluster.fail("a:11211")
    hashed = [(k, k.encode(), k.encode()) for k in keys]
    plan = cluster.router.plan(cluster.topology, hashed, CallKind.REPLACING_WRITE, "set_many")
    assert list(plan.down) == ["a:11211"] and "a:11211" not in plan.groups
    with pytest.raises(NodeUnavailableError, match="a:11211"):
        cluster.run(_batch.fetch(cluster.core, keys, with_cas=False))
    stored_before = cluster.servers["b:11211"].stored()
    with pytest.raises(NodeUnavailableError, match="a:11211"):
        cluster.run(_batch.set_many(cluster.core, {k: 1 for k in keys}, 0, None, None))
    assert cluster.servers["b:11211"].stored() > stored_before  # the live nodes' share was stored


# -- pure pieces ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("expire", "capped"), [(0, 60), (5, 5), (60, 60), (61, 60), (3600, 60), (-1, -1)])
def test_stand_in_ttls_are_capped_but_negative_expiries_stay_expired(expire: int, capped: int) -> None:
    assert Router("remap", failover_ttl_s=60, miss_on_error=False).capped_ttl(expire) == capped


def test_call_kinds_answer_the_routers_questions() -> None:
    assert [k.stand_in_ok for k in CallKind] == [True, True, True, False, False]
    assert [k.writes for k in CallKind] == [False, True, True, False, False]
    assert [k.reads for k in CallKind] == [True, False, False, True, False]
    assert CallKind.REPLACING_WRITE.forget_before and not CallKind.WRITE.forget_before
    assert CallKind.WRITE.forget_after and CallKind.PINNED.forget_after


def test_unavailable_is_none_unless_the_decision_is_down_and_errors_raise() -> None:
    cluster = Cluster(NODES)
    owner = cluster.node("a:11211")
    raising = Router("fail_fast", failover_ttl_s=60, miss_on_error=False)
    missing = Router("fail_fast", failover_ttl_s=60, miss_on_error=True)
    assert raising.unavailable(Decision(None, owner), "get") is None
    err = raising.unavailable(Decision(None, owner, down=True), "get")
    assert isinstance(err, NodeUnavailableError) and err.node_id == "a:11211"
    assert missing.unavailable(Decision(None, owner, down=True), "get") is None


def test_the_router_decides_without_io_and_commit_records_the_stand_in(remap: Cluster) -> None:
    key = remap.key_on("a:11211")
    wire = key.encode()
    owner = remap.node("a:11211")
    remap.fail("a:11211")
    wakes = remap.membership.prober.wakes  # type: ignore[attr-defined]
    decision = remap.router.decide(remap.topology, owner, wire, wire, CallKind.REPLACING_WRITE)
    assert decision.stand_in and decision.fence and decision.copy
    assert decision.target is remap.node(stand_in_of(remap, key))
    assert not owner.fenced(wire) and remap.membership.prober.wakes == wakes  # type: ignore[attr-defined]
    remap.router.commit(decision, wire)
    # woken for the fenced key (and because the owner is DOWN: the prober must be running)
    assert owner.fenced(wire) and remap.membership.prober.wakes > wakes  # type: ignore[attr-defined]
    assert owner.counters()["failovers"] == 1
    assert all(server.attempts == 0 for server in remap.servers.values())


def test_a_ready_owner_is_its_own_target_and_gutter_without_a_gutter_ring_has_no_stand_in() -> None:
    cluster = Cluster(NODES)
    key = cluster.key_on("a:11211").encode()
    owner = cluster.node("a:11211")
    for kind in CallKind:
        assert cluster.router.decide(cluster.topology, owner, key, key, kind) == Decision(owner, owner)
    gutter = Router("gutter", failover_ttl_s=60, miss_on_error=False)
    assert gutter.stand_in(cluster.topology, owner, key) is None  # this topology has no gutter pool


def test_stand_in_ttls_are_capped_for_set_many_and_touch_too(remap: Cluster) -> None:
    key = remap.key_on("a:11211")
    stand_in = remap.servers[stand_in_of(remap, key)]
    remap.fail("a:11211")
    assert remap.run(_batch.set_many(remap.core, {key: "v"}, 3600, None, None)) == []
    assert stand_in.ttl_of(key.encode()) == 60
    assert remap.run(cmd.touch(remap.core, key, 0, None)) is True
    assert stand_in.ttl_of(key.encode()) == 60  # "never expire" on a stand-in is capped as well


def test_a_read_served_by_a_stand_in_records_nothing_so_a_counter_survives_the_outage(remap: Cluster) -> None:
    """Issue 11, defect 1: reading a counter (or anything) during a failover used to record it for
    fencing, and the owner's live counter was deleted when the owner returned."""
    key = remap.key_on("a:11211")
    remap.servers["a:11211"].put(key.encode(), b"41", flags=2)
    remap.fail("a:11211")
    assert remap.get(key, "miss") == "miss"  # served (as a miss) by the stand-in
    assert not remap.node("a:11211").fenced(key.encode())
    remap.revive("a:11211")
    remap.prober_pass()
    assert remap.servers["a:11211"].peek(key.encode()) == b"41"
    assert remap.run(cmd.counter(remap.core, key, 1, decr=False, noreply=None, initial=None, expire=0)) == 42


def test_a_request_in_flight_finishes_on_the_ring_it_started_with() -> None:
    cluster = Cluster(NODES)
    ring_after = cluster.topology.ring.with_node("d:11211")
    key = next(f"k{i}" for i in range(500) if ring_after.node_for(f"k{i}") == "d:11211")
    owner = cluster.servers[cluster.owner_id(key)]
    owner.put(key.encode(), b"on the old owner", flags=16)
    owner.before = lambda line: cluster.change(ring_after, 0) if line.startswith(b"get ") else None
    assert cluster.get(key) == "on the old owner"  # the ring changed while the get was on the wire
    assert cluster.owner_id(key) == "d:11211" and cluster.servers["d:11211"].attempts == 0


def test_a_lock_never_moves_to_a_stand_in() -> None:
    for on_error in ("raise", "miss"):
        cluster = Cluster(NODES, failover="remap", on_error=on_error)
        client = types.SimpleNamespace(_engine=Engine(cluster.core, cluster.run))
        name = next(f"job{i}" for i in range(500) if cluster.owner_id(f"job{i}:lock") == "a:11211")
        cluster.fail("a:11211")
        lock = recipes.Lock(client, name, ttl_s=30, blocking_timeout_s=0)
        if on_error == "raise":
            with pytest.raises(NodeUnavailableError):
                lock.acquire(blocking=False)
        else:
            assert lock.acquire(blocking=False) is False and lock.unavailable
        assert not any(server.stored() for server in cluster.servers.values())
