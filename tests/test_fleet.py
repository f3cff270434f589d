"""Fleet-wide rejoin fencing (docs/consistency.md, "Processes"): a node returning from an outage any
process saw never serves its pre-outage values, even to a process that never noticed the outage,
and even when the process that wrote elsewhere is gone. Several "processes" (``Cluster`` objects)
share fake servers and a fake clock; each one's prober passes run by hand.
"""

from __future__ import annotations

import threading
import time

import pytest
from fakes import Cluster

from shardcache import _commands as cmd
from shardcache._commands import UNAVAILABLE
from shardcache._fleet import (
    CLEAN,
    DOWN,
    RETURNING,
    STAND_IN_BIT,
    USER_FLAGS,
    Mark,
    decode_mark,
    encode_mark,
    journal_key,
    mark_key,
)
from shardcache.errors import NodeUnavailableError
from shardcache.health import DOWN as HEALTH_DOWN
from shardcache.health import UP

NODES = ["a:11211", "b:11211", "c:11211"]
A = "a:11211"
REFRESH = 0.5


def fleet(n: int, **options: object) -> list[Cluster]:
    options.setdefault("failover", "remap")
    options.setdefault("on_error", "miss")
    first = Cluster(NODES, fleet_refresh_s=REFRESH, **options)
    return [first, *(Cluster(NODES, share=first, fleet_refresh_s=REFRESH, **options) for _ in range(n - 1))]


def passes(*processes: Cluster, seconds: float = REFRESH) -> None:
    """Let ``seconds`` go by, then run one prober pass in each process."""
    processes[0].clock.advance(seconds)
    for process in processes:
        process.prober_pass()


def fail(process: Cluster, node_id: str) -> None:
    process.fail(node_id)  # the server refuses; this process saw it and marked it down


def revive_server(process: Cluster, node_id: str) -> None:
    process.servers[node_id].down = False


# -- marks ----------------------------------------------------------------------------------------


def test_a_mark_round_trips_and_anything_else_is_ignored() -> None:
    for mark in (Mark(1, DOWN), Mark(1_733_000_000_000, RETURNING), Mark(2**63 - 1, CLEAN)):
        assert decode_mark(encode_mark(mark)) == mark
    for hostile in (b"", b"1", b"1 3", b"-1 0", b"1 0 ", b" 1 0", b"1\r\n0", b"1" * 20 + b" 0", b"x 0"):
        assert decode_mark(hostile) is None, hostile
    assert Mark(5, CLEAN) > Mark(5, RETURNING) > Mark(5, DOWN) and Mark(6, DOWN) > Mark(5, CLEAN)


def test_the_mark_key_is_a_valid_reserved_memcached_key_for_any_node_id() -> None:
    for node_id in ("a:11211", "/tmp/my socket.sock", "[::1]:11211", "é" * 300):
        key = mark_key(node_id)
        assert key.startswith(b"shardcache.fleet.") and len(key) < 250
        assert all(33 <= byte < 127 for byte in key)
    assert mark_key("a:1") != mark_key("a:2")


# -- the cases that broke before --------------------------------------------------------------------


@pytest.mark.parametrize("fleet_fencing", [True, False])
def test_a_process_that_never_saw_the_outage_gets_no_pre_outage_value_after_the_writer_died(
    fleet_fencing: bool,
) -> None:
    refresh = REFRESH if fleet_fencing else None
    writer = Cluster(NODES, failover="remap", on_error="miss", fleet_refresh_s=refresh)
    reader = Cluster(NODES, share=writer, failover="remap", on_error="miss", fleet_refresh_s=refresh)
    key = writer.key_on(A)
    assert reader.set(key, "old")
    fail(writer, A)
    assert writer.set(key, "new")  # on the stand-in; fenced in the writer's own log only
    writer.prober_pass()  # publishes the outage (fleet fencing)
    del writer  # the worker is recycled: its fence log is gone
    passes(reader)
    revive_server(reader, A)
    seen = []
    for _ in range(12):  # ~6 s after the node returned
        seen.append(reader.get(key))
        passes(reader)
    seen.append(reader.get(key))
    if fleet_fencing:
        assert "old" not in seen
        assert reader.node(A).ready and reader.servers[A].peek(key.encode()) is None  # forgotten
        stand_in = reader.topology.ring.preference_list(key, 3)[1]
        assert reader.servers[stand_in].peek(key.encode()) is None  # the dead writer's copy too
        assert reader.servers[stand_in].peek(journal_key(A)) is None
        assert reader.servers[A].sent(b"flush_all") == []
    else:  # what happened before fleet fencing: the pre-outage value is served
        assert seen[-1] == "old"


def test_a_process_learns_of_an_outage_within_one_refresh_and_stands_in_too() -> None:
    saw, other = fleet(2)
    key = saw.key_on(A)
    fail(saw, A)
    saw.prober_pass()  # published
    assert other.node(A).health.state == UP
    passes(other)
    node = other.node(A)
    assert node.health.state == HEALTH_DOWN and node.may_stand_in
    assert other.set(key, "v") and saw.get(key) == "v"  # both on the same stand-in


def test_a_returning_node_is_out_of_use_and_not_stood_in_for_until_it_is_cleaned() -> None:
    first, second = fleet(2)
    key, counter, untouched = first.key_on(A), first.key_on(A, skip=1), first.key_on(A, skip=2)
    assert first.set(key, "old") and first.set(untouched, "kept")
    assert first.incr(counter, 1, initial=41) == 41
    fail(first, A)
    first.prober_pass()
    passes(second)
    revive_server(first, A)
    first.clock.advance(first.node(A).health.seconds_until_probe() or 0.0)
    first.prober_pass()  # the probe answers: RETURNING published, the flush waits
    assert first.node(A).fleet_mark == Mark(first.node(A).fleet_mark.gen, RETURNING)  # type: ignore[union-attr]
    passes(second, seconds=0.0)
    passes(second)
    for process in (first, second):
        node = process.node(A)
        assert node.health.state != UP and not node.may_stand_in
        assert process.set(key, "during") is False  # neither on the owner nor on a stand-in
        assert process.get(key) is None
    assert first.servers[A].peek(key.encode()) == b"old"
    stand_in = first.topology.ring.preference_list(key, 3)[1]
    assert first.servers[stand_in].peek(key.encode()) is None
    for _ in range(4):  # settle_s = 2 refresh periods + 0.2 s
        passes(first, second)
    passes(first, second)
    passes(first, second)
    for process in (first, second):
        assert process.node(A).ready and process.node(A).fleet_mark.stage == CLEAN  # type: ignore[union-attr]
    assert first.servers[A].sent(b"flush_all") == []
    assert first.get(untouched) == "kept" and second.incr(counter, 1) == 42  # nothing else is lost
    assert first.set(key, "after") and second.get(key) == "after"


def test_keys_written_on_stand_ins_are_forgotten_on_return_whoever_wrote_them() -> None:
    first, second, third = fleet(3)
    keys = [first.key_on(A, skip=i) for i in range(6)]
    for key in keys:
        assert first.set(key, "old")
    fail(first, A)
    first.prober_pass()
    passes(second, third)
    assert second.set(keys[0], "new")
    assert third.delete(keys[1]) is False  # nothing on the stand-in to delete, but journaled
    assert third.set_many({keys[2]: "new", keys[3]: "new"}) == []
    assert second.delete_many([keys[4]])
    listed = b" ".join(first.servers[n].peek(journal_key(A)) or b"" for n in NODES).split()
    assert sorted(set(listed)) == sorted(k.encode() for k in keys[:5])
    assert len(listed) == 2 * 5  # each entry on two nodes
    del second, third  # both writers are gone
    revive_server(first, A)
    for _ in range(10):
        passes(first)
    assert first.node(A).ready
    assert [first.get(k) for k in keys] == [None] * 5 + ["old"]


def test_a_write_the_journal_cannot_take_is_not_made() -> None:
    (process,) = fleet(1)
    key = process.key_on(A)
    fail(process, A)
    stand_in = process.topology.ring.preference_list(key, 3)[1]
    process.servers[stand_in].refuse = {b"append"}  # e.g. the journal reached the item size limit
    assert process.set(key, "new") is False
    assert process.set_many({key: "new"}) == [key]
    assert process.servers[stand_in].peek(key.encode()) is None
    assert "error" in process.kinds()
    raising = Cluster(NODES, share=process, failover="remap", fleet_refresh_s=REFRESH)
    fail(raising, A)
    with pytest.raises(NodeUnavailableError, match="could not journal"):
        raising.set(key, "new")


def test_a_clean_mark_makes_the_others_probe_at_once_without_cleaning_again() -> None:
    first, second, third = fleet(3)
    for process in (first, second, third):
        fail(process, A)
    first.prober_pass()
    passes(second, third)
    revive_server(first, A)
    for _ in range(10):
        passes(first)
        if first.node(A).ready:
            break
    assert first.node(A).ready
    passes(second, third)
    passes(second, third, seconds=0.0)
    assert second.node(A).ready and third.node(A).ready
    reads = [c for c in first.servers[NODES[1]].commands if c.startswith(b"gets " + journal_key(A))]
    assert len(reads) == 1  # one process cleaned A


def test_an_older_mark_read_late_never_undoes_a_newer_one() -> None:
    (process,) = fleet(1)
    node = process.node(A)
    fleet_ = process.membership.prober.fleet
    assert fleet_ is not None
    assert fleet_.apply(node, Mark(10, CLEAN))
    assert not fleet_.apply(node, Mark(10, DOWN))
    assert not fleet_.apply(node, Mark(9, RETURNING))
    assert node.health.state == UP and node.fleet_mark == Mark(10, CLEAN)
    assert fleet_.apply(node, Mark(11, DOWN)) and node.health.state == HEALTH_DOWN


def test_a_new_outage_gets_a_generation_above_every_one_seen() -> None:
    first, second = fleet(2)
    fleet_ = first.membership.prober.fleet
    assert fleet_ is not None
    ahead = int((time.time() + 3600) * 1000)
    fleet_.apply(first.node(A), Mark(ahead, CLEAN))  # a clock an hour ahead published this one
    fail(first, A)
    first.prober_pass()
    mark = first.node(A).fleet_mark
    assert mark == Mark(ahead + 1, DOWN)
    forged = Mark(int((time.time() + 2 * 86400) * 1000), CLEAN)
    assert not fleet_.apply(first.node(A), forged)  # more than a day ahead: ignored
    passes(second)
    assert second.node(A).fleet_mark == mark


def test_marks_survive_one_holder_restarting_empty_and_a_node_never_holds_its_own() -> None:
    first, second = fleet(2)
    fail(first, A)
    first.prober_pass()
    holders = [n for n in NODES if n != A]
    key = mark_key(A)
    assert all(first.servers[h].peek(key) is not None for h in holders)
    assert first.servers[A].peek(key) is None
    first.servers[holders[0]].remove(key)  # restarted empty
    first.servers[A].put(key, b"1 2")  # a foreign or stale value on the node itself: ignored
    passes(second)
    assert second.node(A).fleet_mark is not None and second.node(A).fleet_mark.stage == DOWN


def test_a_second_failure_while_returning_starts_a_new_outage() -> None:
    first, second = fleet(2)
    fail(first, A)
    first.prober_pass()
    passes(second)
    gen = first.node(A).fleet_mark.gen  # type: ignore[union-attr]
    revive_server(first, A)
    first.clock.advance(first.node(A).health.seconds_until_probe() or 0.0)
    first.prober_pass()  # RETURNING
    first.servers[A].down = True  # fails again before the flush
    first.clock.advance(first.node(A).health.seconds_until_probe() or 0.0)
    first.prober_pass()  # the probe fails: still down, still returning
    assert first.node(A).health.state == HEALTH_DOWN
    revive_server(first, A)
    for _ in range(12):
        passes(first, second)
    for process in (first, second):
        assert process.node(A).ready
        assert process.node(A).fleet_mark == Mark(gen, CLEAN)


@pytest.mark.parametrize(
    "options", [{"fleet_refresh_s": None}, {"failover": "fail_fast", "fleet_refresh_s": 0.5}]
)
def test_fleet_fencing_off_or_under_fail_fast_publishes_and_journals_nothing(
    options: dict[str, object],
) -> None:
    process = Cluster(NODES, **{"failover": "remap", "on_error": "miss", **options})
    key = process.key_on(A)
    fail(process, A)
    process.set(key, "v")
    process.prober_pass()
    assert all(process.servers[n].peek(mark_key(A)) is None for n in NODES)
    assert all(process.servers[n].peek(journal_key(A)) is None for n in NODES)
    assert process.membership.prober.fleet is None


def test_a_journal_with_hostile_content_sends_nothing_but_valid_deletes() -> None:
    (first,) = fleet(1)
    fail(first, A)
    first.prober_pass()
    holder = NODES[1]
    first.servers[holder].put(journal_key(A), b"good1 \r\nflush_all bad\x00key " + b"x" * 300 + b" good2 ")
    revive_server(first, A)
    for _ in range(10):
        passes(first)
    assert first.node(A).ready
    deletes = first.servers[A].sent(b"delete")
    assert sorted(deletes) == [b"delete good1", b"delete good2"]
    assert first.servers[A].sent(b"flush_all") == []


def test_a_stand_in_restarting_empty_loses_no_journal_entry() -> None:
    first, second = fleet(2)
    key = first.key_on(A)
    assert first.set(key, "old")
    fail(first, A)
    first.prober_pass()
    assert first.set(key, "new")
    stand_in = first.topology.ring.preference_list(key, 3)[1]
    holders = [n for n in NODES if first.servers[n].peek(journal_key(A)) is not None]
    assert sorted(holders) == sorted(n for n in NODES if n != A)  # the stand-in and its buddy
    first.servers[stand_in].remove(journal_key(A))  # restarted empty
    first.servers[stand_in].remove(key.encode())
    revive_server(first, A)
    for _ in range(10):
        passes(first, second)
    assert first.node(A).ready and first.servers[A].peek(key.encode()) is None


def test_with_two_other_nodes_down_a_returning_node_waits_then_is_flushed() -> None:
    (process,) = fleet(1)
    b, c = (n for n in NODES if n != A)
    keys = {A: process.key_on(A), b: process.key_on(b)}
    for key in keys.values():
        assert process.set(key, "old")
    for node_id in (A, b, c):
        fail(process, node_id)
    process.prober_pass()
    revive_server(process, A)
    revive_server(process, b)  # c stays down
    for _ in range(20):
        passes(process)
    # each one's journals may be on the other and on c, both unreadable: both wait, out of use
    assert process.node(b).health.state != UP and process.node(A).health.state != UP
    assert all(process.servers[n].peek(k.encode()) == b"old" for n, k in keys.items())
    passes(process, seconds=61.0)
    for _ in range(10):
        passes(process)
    assert process.node(A).ready and process.node(b).ready
    flushed = [n for n in (A, b) if process.servers[n].sent(b"flush_all")]
    assert len(flushed) == 1  # the first to give up is flushed (all is gone, the price of it)...
    (kept,) = {A, b} - set(flushed)
    assert process.servers[flushed[0]].peek(keys[flushed[0]].encode()) is None
    assert process.get(keys[kept]) == "old"  # ...then the other's journals are readable: cleaned


def test_a_new_process_reads_the_marks_before_its_first_request_uses_the_ring() -> None:
    (first,) = fleet(1)
    fail(first, A)
    first.prober_pass()  # the outage is published; the node is reachable again, nobody cleaned it
    revive_server(first, A)
    newcomer = Cluster(NODES, share=first, read_marks=False, failover="remap", fleet_refresh_s=REFRESH)
    got: list[object] = []
    reader = threading.Thread(target=lambda: got.append(newcomer.membership.topology))
    reader.start()
    reader.join(0.2)
    assert reader.is_alive() and got == []  # the first request waits for the marks...
    fleet_ = newcomer.membership.prober.fleet
    assert fleet_ is not None
    newcomer.run(fleet_.refresh_flow(newcomer.membership.__dict__["_unread"]))
    reader.join(5)
    assert got and newcomer.node(A).health.state == HEALTH_DOWN  # ...and then knows of the outage


def test_a_holder_restarted_empty_gets_an_outage_still_under_way_back_from_a_reader() -> None:
    first, second = fleet(2)
    fail(first, A)
    first.prober_pass()
    holders = [n for n in NODES if n != A]
    for holder in holders:
        first.servers[holder].remove(mark_key(A))  # all restarted empty, but `second` knew
    second.node(A).fleet_mark = None
    second.membership.prober.fleet._known.clear()  # type: ignore[union-attr]
    first.servers[holders[1]].put(mark_key(A), encode_mark(first.node(A).fleet_mark))  # type: ignore[arg-type]
    passes(second)  # reads the one holder that has it, and writes it back on the others
    assert all(first.servers[h].peek(mark_key(A)) == encode_mark(first.node(A).fleet_mark) for h in holders)  # type: ignore[arg-type]


@pytest.mark.parametrize("fleet_refresh_s", [REFRESH, None])
def test_a_stand_in_never_serves_a_value_it_held_before_as_its_own(fleet_refresh_s: float | None) -> None:
    """Issue 11, item 2: a stand-in may hold the key from before a ring change (it owned it then):
    only copies written there in this outage carry the stand-in tag, so only those are served."""
    process = Cluster(NODES, failover="remap", on_error="miss", fleet_refresh_s=fleet_refresh_s)
    key, other = process.key_on(A), process.key_on(A, skip=1)
    stand_in = process.topology.ring.preference_list(key, 2)[1]
    process.servers[stand_in].put(key.encode(), b"pre-scale-out")  # its own, long ago
    process.servers[stand_in].put(other.encode(), b"pre-scale-out")
    fail(process, A)
    process.prober_pass()
    assert process.get(key) is None and process.get_many([key, other]) == {}
    assert process.set(key, "during") and process.get(key) == "during"
    assert process.get_many([key, other]) == {key: "during"}
    stored = process.servers[stand_in]._items[key.encode()].flags
    assert stored & STAND_IN_BIT and stored & USER_FLAGS == 16  # the str flag, kept under the tag


def test_a_value_whose_flags_leave_no_room_for_the_tag_is_not_written_on_a_stand_in() -> None:
    (process,) = fleet(1)
    key = process.key_on(A)
    fail(process, A)
    process.prober_pass()
    stand_in = process.topology.ring.preference_list(key, 2)[1]
    assert process.run(cmd.store(process.core, b"set", key, b"v", 0, None, 1 << 20)) is UNAVAILABLE
    assert process.set_many({key: "v"}) == []  # default serde flags fit
    assert process.servers[stand_in].peek(key.encode()) is not None
