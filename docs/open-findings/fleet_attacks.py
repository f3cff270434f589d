"""OPEN findings of the adversarial review of fleet-wide rejoin fencing (issue 11, item 6).

Not collected by the test suite: each of these FAILS today and documents a gap listed in
docs/consistency.md ("Limits"). To reproduce, copy this file to tests/ (it uses tests/fakes.py)
and run it with pytest. Move a test into tests/test_fleet_attacks.py when its gap is fixed.


Each test plays a hostile user, a dying or stalled process, a slow or flaky server, or processes
with different views, over the shared fake servers of ``tests/fakes.py``. A test that FAILS is a
finding: the property it asserts is what docs/consistency.md ("Fleet-wide") promises.
"""

from __future__ import annotations

from test_fleet_attacks import passes, proc, until_ready

from shardcache import _batch
from shardcache._fleet import journal_key, mark_key

A = "a:11211"


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
