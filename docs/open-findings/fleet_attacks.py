"""OPEN findings of the adversarial review of fleet-wide rejoin fencing (issue 11, item 6).

Not collected by the test suite: each of these FAILS today and documents a gap listed in
docs/consistency.md ("Limits"). To reproduce, copy this file to tests/ (it uses tests/fakes.py)
and run it with pytest. Move a test into tests/test_fleet_attacks.py when its gap is fixed.


Each test plays a hostile user, a dying or stalled process, a slow or flaky server, or processes
with different views, over the shared fake servers of ``tests/fakes.py``. A test that FAILS is a
finding: the property it asserts is what docs/consistency.md ("Fleet-wide") promises.
"""

from __future__ import annotations

from typing import Any

import pytest
from test_fleet_attacks import passes, proc, stand_in_of, until_ready

from shardcache import _batch
from shardcache._fleet import journal_key, mark_key
from shardcache.health import UP

A = "a:11211"


@pytest.mark.parametrize("failover", ["remap", "gutter"])
def test_a_stand_in_unreachable_during_the_clean_serves_its_old_copy_in_the_next_outage(
    failover: str,
) -> None:
    """clean_flow tolerates one unreadable holder (its buddy has the entries), deletes the keys on
    the returning node, but deletes stand-in copies only on the holders it could read. The
    unreachable stand-in keeps the copy (and the journal). In A's next outage (within the copy's
    failover_ttl_s) every process reads that copy: older than what was written on A in between."""
    nodes = ["a:11211", "b:11211", "c:11211"]
    extra: dict[str, Any] = {"failover": failover}
    if failover == "gutter":
        extra["gutter_servers"] = ["g1:11211", "g2:11211"]
    writer = proc(nodes, **extra)
    cleaner = proc(nodes, share=writer, **extra)
    key = writer.key_on(A)
    assert writer.set(key, "v0")
    writer.fail(A)
    writer.prober_pass()
    passes(cleaner)
    assert writer.set(key, "v1")  # on the stand-in, journaled
    decision = writer.router.decide(
        writer.topology,
        writer.node(A),
        key.encode(),
        key.encode(),
        __import__("shardcache._router").__dict__["_router"].CallKind.READ,
    )
    stand_in = decision.target.node_id  # type: ignore[union-attr]
    assert writer.servers[stand_in].peek(key.encode()) == b"v1"
    del writer
    cleaner.servers[stand_in].hang = True  # blackholed for a few seconds (not restarted)
    cleaner.revive(A)
    until_ready(cleaner, A)
    cleaner.servers[stand_in].hang = False
    for _ in range(10):  # the stand-in comes back (if it was marked down) and is cleaned itself
        passes(cleaner)
    assert cleaner.node(stand_in).ready and cleaner.node(A).ready
    assert cleaner.set(key, "v2")  # on A, its owner
    # A fails again, 5 s later; a fresh process (or the cleaner) reads the key on the stand-in
    cleaner.fail(A)
    cleaner.prober_pass()
    fresh = proc(nodes, share=cleaner, **extra)
    passes(fresh)
    assert fresh.node(A).health.state != UP
    assert fresh.get(key) in (None, "v2")
    assert cleaner.get(key) in (None, "v2")


def test_a_stand_in_write_that_lands_after_the_clean_is_never_read_in_a_later_outage() -> None:
    """The writer journals, then its write is slow to reach the stand-in (a busy connection, a
    paused process). Meanwhile the node returns and is cleaned: the copy is deleted, the journal
    too. Then the write lands. Nothing records it (the writer is recycled); in A's next outage
    the stand-in serves it, older than the write made on A in between."""
    nodes = ["a:11211", "b:11211", "c:11211"]
    writer = proc(nodes)
    cleaner = proc(nodes, share=writer)
    key = writer.key_on(A)
    assert writer.set(key, "v0")
    writer.fail(A)
    writer.prober_pass()
    passes(cleaner)
    stand_in = stand_in_of(writer, key)
    server = writer.servers[stand_in]
    fired = []

    def slow(line: bytes) -> None:
        if line.startswith(b"set " + key.encode()) and not fired:
            fired.append(line)
            cleaner.revive(A)
            until_ready(cleaner, A)  # the whole RETURNING -> clean -> CLEAN runs meanwhile

    server.before = slow
    assert writer.set(key, "v1")
    server.before = None
    assert fired
    del writer
    assert cleaner.set(key, "v2")  # on A
    cleaner.fail(A)
    cleaner.prober_pass()
    fresh = proc(nodes, share=cleaner)
    passes(fresh)
    assert fresh.get(key) in (None, "v2")


def test_a_stalled_process_writing_after_clean_leaves_the_pre_outage_value_on_the_owner() -> None:
    """settle_s assumes every process reads the marks within 2 refresh periods. A process that
    stalls for 2 s (its prober thread blocked, a stop-the-world pause) still sees DOWN and writes
    on the stand-in after the node was cleaned: the owner keeps its pre-outage value, which the
    other processes serve."""
    nodes = ["a:11211", "b:11211", "c:11211"]
    cleaner = proc(nodes)
    stalled = proc(nodes, share=cleaner)
    key = cleaner.key_on(A)
    assert cleaner.set(key, "old")
    cleaner.fail(A)
    cleaner.prober_pass()
    passes(stalled)
    cleaner.revive(A)
    until_ready(cleaner, A)  # 'stalled' runs no prober pass meanwhile (about 2 s)
    assert stalled.set(key, "new")  # acknowledged, on the stand-in
    del stalled
    for _ in range(6):
        passes(cleaner)
    assert cleaner.get(key) != "old"


def test_the_reserved_namespace_cannot_be_written_by_a_user() -> None:
    """Without key_prefix a user key may be shardcache.fleet.*: whatever an attacker puts there
    the fleet reads as marks and journals."""
    nodes = ["a:11211", "b:11211", "c:11211"]
    user = proc(nodes)
    assert not user.set(mark_key(A).decode(), "9999999999999999999 2")


def test_flush_all_during_an_outage_then_the_flusher_exits() -> None:
    """client.flush_all() while A is down: every other node is flushed (journals and marks too);
    A is fenced only in the flushing process. Once that process is gone, A returns with values
    from before the flush, and a process that never saw the outage reads them."""
    nodes = ["a:11211", "b:11211", "c:11211"]
    flusher = proc(nodes)
    reader = proc(nodes, share=flusher)
    key = flusher.key_on(A)
    assert flusher.set(key, "old")
    flusher.fail(A)
    flusher.prober_pass()
    passes(reader)
    flusher.run(_batch.flush_all(flusher.core, 0))
    del flusher
    reader.revive(A)
    until_ready(reader, A)
    assert reader.get(key) is None


def test_a_journal_cannot_make_the_cleaner_delete_a_held_lock_or_a_counter() -> None:
    """_journal_wires checks only that an entry is a valid key. Anything that can write the
    reserved key (a client without key_prefix, another application on the same servers) can list
    a lock or counter key of the returning node, or of the holder itself: both are deleted."""
    nodes = ["a:11211", "b:11211", "c:11211"]
    process = proc(nodes)
    lock_on_a = process.key_on(A, prefix="lock:")
    counter_on_b = process.key_on("b:11211", prefix="hits:")
    assert process.add(lock_on_a, "owner-1")
    assert process.incr(counter_on_b, 1, initial=41) == 41
    process.fail(A)
    process.prober_pass()
    process.servers["b:11211"].put(journal_key(A), f"{lock_on_a} {counter_on_b} ".encode())
    process.revive(A)
    until_ready(process, A)
    assert process.get(lock_on_a) == "owner-1", "the held lock was deleted: a second acquire succeeds"
    assert process.incr(counter_on_b, 1) == 42, "a counter on a holder was deleted"
