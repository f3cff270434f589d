"""Adversarial tests of fleet-wide rejoin fencing (issue 11, item 6), from a review of it.

Each test plays a hostile user, a dying or stalled process, a slow or flaky server, or processes
with different views, over the shared fake servers of ``tests/fakes.py``; each failed before the
fix its comment names. The findings that are not fixed yet are listed in docs/consistency.md
("Limits"), with the branch holding their failing tests.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from fakes import Cluster

from shardcache._fleet import CLEAN, journal_key, mark_key
from shardcache._rebalance import rebalance
from shardcache.health import UP

REFRESH = 0.5
A = "a:11211"


def proc(nodes: list[str], share: Cluster | None = None, **options: Any) -> Cluster:
    options.setdefault("failover", "remap")
    options.setdefault("on_error", "miss")
    return Cluster(nodes, share=share, fleet_refresh_s=REFRESH, **options)


def passes(*processes: Cluster, seconds: float = REFRESH) -> None:
    processes[0].clock.advance(seconds)
    for process in processes:
        process.prober_pass()


def until_ready(cleaner: Cluster, node_id: str, *others: Cluster, rounds: int = 20) -> None:
    for _ in range(rounds):
        passes(cleaner, *others)
        if cleaner.node(node_id).ready:
            return
    raise AssertionError(f"{node_id} never readmitted by the cleaner")


def stand_in_of(process: Cluster, key: str) -> str:
    return process.topology.ring.preference_list(key, 2)[1]


# -- 1. rebalance() deletes the fleet's journals (and marks) -----------------------------------------


def test_rebalance_during_an_outage_must_not_delete_the_journals() -> None:
    """Without a key_prefix (the default) rebalance() treats shardcache.fleet.* keys as strays of
    whatever node the ring maps them to, and deletes them on every other node: the journal of a
    down node is gone, the node returns and serves its pre-outage value."""
    nodes = ["a:11211", "b:11211", "c:11211", "d:11211"]
    writer = proc(nodes)
    reader = proc(nodes, share=writer)
    # a key of A whose stand-in and buddy (the two journal holders) are not the node the ring
    # gives journal_key(A) to
    jowner = writer.owner_id(journal_key(A).decode())
    key = next(
        k for k in (writer.key_on(A, skip=i) for i in range(200))
        if jowner not in {stand_in_of(writer, k), {"b:11211": "c:11211", "c:11211": "d:11211",
                                                    "d:11211": "b:11211"}[stand_in_of(writer, k)]}
    )  # fmt: skip
    assert writer.set(key, "old")
    writer.fail(A)
    writer.prober_pass()
    passes(reader)
    assert writer.set(key, "new")  # journaled on the stand-in and its buddy
    del writer  # recycled worker
    reader.run(rebalance(reader.core, batch=100, keys_per_s=None))  # an operator's routine rebalance
    journals_left = [n for n in nodes if reader.servers[n].peek(journal_key(A))]
    reader.revive(A)
    until_ready(reader, A)
    assert reader.get(key) != "old", f"A's journal left on {journals_left} after rebalance()"


def test_rebalance_does_not_delete_outage_marks() -> None:
    nodes = ["a:11211", "b:11211", "c:11211", "d:11211"]
    first = proc(nodes)
    for node_id in ("c:11211", "d:11211"):  # their marks are owned (by hash) by another node
        first.fail(node_id)
        first.prober_pass()
        first.revive(node_id)
        until_ready(first, node_id)
    holders_before = {n: [h for h in nodes if first.servers[h].peek(mark_key(n))] for n in nodes}
    first.run(rebalance(first.core, batch=100, keys_per_s=None))
    holders_after = {n: [h for h in nodes if first.servers[h].peek(mark_key(n))] for n in nodes}
    assert holders_after == holders_before


# -- 3. the per-process "already journaled" cache outlives the outage it was made in --------------


def test_a_process_that_never_saw_clean_skips_the_journal_in_the_next_outage() -> None:
    """Node._journaled is reset only by retire_copies (on readmission by this process's probe). A
    process that went DOWN(g1) -> RETURNING(g1) -> DOWN(g2) without readmitting A (A flapped: up
    for less than a refresh after CLEAN) believes its g2 writes are journaled: they are not (the
    cleaner deleted the g1 journal). A returns from g2 with the value written on it in between."""
    nodes = ["a:11211", "b:11211", "c:11211"]
    cleaner = proc(nodes)
    writer = proc(nodes, share=cleaner)
    key = cleaner.key_on(A)
    assert cleaner.set(key, "old")
    cleaner.fail(A)
    cleaner.prober_pass()
    passes(writer)
    assert writer.set(key, "x")  # journaled (g1), remembered as such in the writer
    cleaner.revive(A)
    cleaner.clock.advance(0.0)
    # both keep running their prober passes; the writer's probes of A answer too
    for _ in range(20):
        passes(cleaner)
        if cleaner.node(A).ready:
            break
        writer.prober_pass()
    assert cleaner.node(A).ready and cleaner.node(A).fleet_mark.stage == CLEAN  # type: ignore[union-attr]
    assert writer.node(A).health.state != UP  # had not read CLEAN yet (< one refresh)
    assert cleaner.set(key, "between")  # on A
    cleaner.fail(A)  # A fails again within the refresh period
    cleaner.prober_pass()  # DOWN(g2) published
    passes(writer)  # the writer goes from RETURNING(g1) straight to DOWN(g2)
    assert writer.node(A).health.state != UP and writer.node(A).may_stand_in
    assert writer.set(key, "y")  # acknowledged on the stand-in...
    listed = b" ".join(cleaner.servers[n].peek(journal_key(A)) or b"" for n in nodes)
    assert key.encode() in listed.split(), "a write acknowledged on a stand-in is in no journal"


def test_a_flapping_node_does_not_serve_a_value_older_than_an_acknowledged_stand_in_write() -> None:
    """The same sequence as above, carried to the read: the writer is recycled, A returns from
    g2, the cleaner reads A's value from between the outages."""
    nodes = ["a:11211", "b:11211", "c:11211"]
    cleaner = proc(nodes)
    writer = proc(nodes, share=cleaner)
    key = cleaner.key_on(A)
    assert cleaner.set(key, "old")
    cleaner.fail(A)
    cleaner.prober_pass()
    passes(writer)
    assert writer.set(key, "x")
    cleaner.revive(A)
    for _ in range(20):
        passes(cleaner)
        if cleaner.node(A).ready:
            break
        writer.prober_pass()
    assert cleaner.set(key, "between")
    cleaner.fail(A)
    cleaner.prober_pass()
    passes(writer)
    assert writer.set(key, "y")
    del writer
    cleaner.revive(A)
    until_ready(cleaner, A)
    assert cleaner.get(key) in (None, "y")


# -- 6. hostile values in the reserved keys --------------------------------------------------------


def test_a_forged_maximal_mark_does_not_disable_fleet_fencing_for_good() -> None:
    """A forged CLEAN mark with the largest generation the decoder accepts (19 digits): every later
    outage gets generation 10**19, which decode_mark rejects, so no other process ever learns of
    an outage of A again (for the mark's 7 days): item 6 is back."""
    nodes = ["a:11211", "b:11211", "c:11211"]
    writer = proc(nodes)
    reader = proc(nodes, share=writer)
    for holder in nodes[1:]:  # e.g. client.set(<that key>, ...) from untrusted key names
        writer.servers[holder].put(mark_key(A), b"9999999999999999999 2")
    passes(writer, reader)
    key = writer.key_on(A)
    assert writer.set(key, "old")
    writer.fail(A)
    writer.prober_pass()  # publishes DOWN(10**19)
    passes(reader)
    assert reader.node(A).health.state != UP, "the reader never learns of the outage"


def test_a_mark_written_with_a_skewed_future_clock_does_not_block_later_outages() -> None:
    """A process whose wall clock is ahead (an hour: a bad NTP setup) publishes a generation the
    others cannot exceed with theirs; they must still publish above it (they do: seen.gen + 1).
    A mark more than a day ahead is ignored (see the forged-mark test above)."""
    nodes = ["a:11211", "b:11211", "c:11211"]
    skewed = proc(nodes)
    other = proc(nodes, share=skewed)
    fleet = skewed.membership.prober.fleet
    assert fleet is not None
    fleet._wall = lambda: time.time() + 3600.0
    skewed.fail(A)
    skewed.prober_pass()
    passes(other)
    skewed.revive(A)
    until_ready(skewed, A, other)
    passes(other, seconds=0.0)
    assert other.node(A).ready
    other.fail(A)
    other.prober_pass()
    passes(skewed)
    assert skewed.node(A).health.state != UP


# -- 8. the journal is deleted wholesale at the end of a clean, whatever was appended meanwhile ------


def test_a_new_outage_during_the_tail_of_a_clean_keeps_its_journal_entries() -> None:
    """clean_flow reads the journals, deletes the keys on the node, then deletes the journals with
    a plain delete. If the node fails again meanwhile (it was answering, then froze again), a
    process that has A up (a worker forked just now) publishes DOWN(g2) and journals its new
    stand-in writes under the same journal key; the end of the g1 clean deletes them. A returns
    from g2 with its pre-g2 value."""
    nodes = ["a:11211", "b:11211", "c:11211"]
    cleaner = proc(nodes)
    writer = proc(nodes, share=cleaner)
    k1, k2 = cleaner.key_on(A), cleaner.key_on(A, skip=1)
    assert cleaner.set(k1, "old1") and cleaner.set(k2, "old2")
    cleaner.fail(A)
    cleaner.prober_pass()
    passes(writer)
    assert writer.set(k1, "new1")  # g1, journaled
    holder = nodes[1]
    jdelete = b"md " + journal_key(A)  # the journal is deleted only if unchanged (md ... C<cas>)
    fired = []

    def again(line: bytes) -> None:
        if line.startswith(jdelete) and not fired:
            fired.append(line)
            # a process still standing in (a stalled one, or one about to see RETURNING) journals
            # k2 on every holder and writes it on the stand-in, between the cleaner's read of
            # the journals and its delete of them
            for n in nodes[1:]:
                listed = cleaner.servers[n].peek(journal_key(A)) or b""
                cleaner.servers[n].put(journal_key(A), listed + k2.encode() + b" ")
            cleaner.servers[stand_in_of(cleaner, k2)].put(k2.encode(), b'"new2"', flags=0)

    cleaner.servers[holder].before = again
    cleaner.revive(A)
    for _ in range(20):
        passes(cleaner)
        writer.prober_pass()
        if fired:
            break
    cleaner.servers[holder].before = None
    assert fired
    del writer  # recycled
    listed = b" ".join(cleaner.servers[n].peek(journal_key(A)) or b"" for n in nodes).split()
    cleaner.revive(A)
    cleaner.servers[A].down = False
    for _ in range(20):
        passes(cleaner)
    assert cleaner.node(A).ready
    assert cleaner.get(k2) in (None, "new2"), f"journals after the g1 clean: {listed}"


# -- 9. RETURNING that reached no holder: the settle protects nobody ---------------------------------


def refresh_only(process: Cluster) -> None:
    """One prober pass of a process whose probe of A is not due (its backoff grew during a long
    outage, up to max_retry_interval_s): it only reads the marks."""
    fleet = process.membership.prober.fleet
    assert fleet is not None
    process.run(fleet.refresh_flow(process.topology))


def test_a_returning_mark_no_holder_took_still_starts_the_settle_and_the_clean() -> None:
    """publish_flow's count is ignored: on_answered settles and cleans even if RETURNING was stored
    nowhere (holders refusing sets for a moment: SERVER_ERROR out of memory). A process that
    keeps DOWN writes on the stand-in until it reads CLEAN; a write made after the clean leaves
    A's pre-outage value, which the other processes read."""
    nodes = ["a:11211", "b:11211", "c:11211"]
    cleaner = proc(nodes)
    writer = proc(nodes, share=cleaner)
    key = cleaner.key_on(A)
    assert cleaner.set(key, "old")
    cleaner.fail(A)
    cleaner.prober_pass()
    refresh_only(writer)
    assert writer.node(A).may_stand_in
    for holder in nodes[1:]:
        cleaner.servers[holder].refuse = {b"set"}
    cleaner.revive(A)
    cleaner.prober_pass()  # probe answers: RETURNING published... nowhere
    for holder in nodes[1:]:
        cleaner.servers[holder].refuse = set()
    assert cleaner.node(A).health.state != UP and cleaner.node(A).fleet_returning_at is None
    saw_returning = False
    for _ in range(20):
        cleaner.clock.advance(REFRESH)
        cleaner.prober_pass()  # publishes RETURNING again; settles only once it was stored
        refresh_only(writer)
        saw_returning = saw_returning or not writer.node(A).may_stand_in
        if cleaner.node(A).ready:
            break
    assert cleaner.node(A).ready and saw_returning  # the writer learnt it before the clean
    acked = writer.set(key, "new")  # refused (the writer does not stand in any more) or on A
    del writer
    assert cleaner.get(key) == ("new" if acked else "old")  # never written elsewhere: "old" stays


# -- 10. a process's first requests come before its first mark read ---------------------------------


def test_a_worker_started_while_a_node_is_returning_does_not_read_its_pre_outage_values() -> None:
    """A new process (a recycled prefork worker) starts with no marks: every node is UP and ready
    until its prober's first refresh, which runs on another thread after its first connection.
    A node the fleet holds out of use (RETURNING: answering, not yet cleaned; up to a minute when
    journals are unreadable) is read directly by its first requests."""
    nodes = ["a:11211", "b:11211", "c:11211"]
    cleaner = proc(nodes)
    writer = proc(nodes, share=cleaner)
    key = cleaner.key_on(A)
    assert cleaner.set(key, "old")
    cleaner.fail(A)
    cleaner.prober_pass()
    passes(writer)
    assert writer.set(key, "new")
    del writer
    cleaner.revive(A)
    cleaner.prober_pass()  # RETURNING published; the clean comes after settle_s
    assert cleaner.node(A).fleet_mark.stage == 1  # type: ignore[union-attr]
    worker = proc(nodes, share=cleaner)  # forked just now; its first request:
    assert worker.get(key) != "old"


# -- 11. "every entry is on two nodes" is false when the buddy was down at write time ---------------


def test_an_entry_journaled_on_the_stand_in_alone_is_not_lost_when_that_stand_in_is_unreadable() -> None:
    """journal_flow writes the entry on the stand-in only when its buddy is not UP; clean_flow
    still accepts one unreadable holder on the grounds that every entry is on two nodes. The
    stand-in unreadable at clean time (one timeout) and the entry is on no node read: the
    returning node keeps its pre-outage value."""
    nodes = ["a:11211", "b:11211", "c:11211"]
    writer = proc(nodes)
    cleaner = proc(nodes, share=writer)
    key = next(
        writer.key_on(A, skip=i)
        for i in range(100)
        if stand_in_of(writer, writer.key_on(A, skip=i)) == "b:11211"
    )
    assert writer.set(key, "old")
    writer.fail(A)
    writer.fail("c:11211")  # the buddy of b is down at that moment
    writer.prober_pass()
    passes(cleaner)
    assert writer.set(key, "new") is False  # refused: journaled on b alone it could be lost
    assert writer.servers["b:11211"].peek(key.encode()) is None
    del writer
    cleaner.servers["c:11211"].down = False  # c comes back (and is cleaned of its own outage)
    for _ in range(10):
        passes(cleaner)
    assert cleaner.node("c:11211").ready
    cleaner.servers["b:11211"].hang = True  # b slow for a moment while A is cleaned
    cleaner.revive(A)
    until_ready(cleaner, A)
    cleaner.servers["b:11211"].hang = False
    for _ in range(10):
        passes(cleaner)
    assert cleaner.get(key) == "old"  # the write was refused: "old" is the latest acknowledged


def test_two_nodes_a_returning_node_is_not_cleaned_from_no_journal_at_all() -> None:
    """With two nodes the only holder is the stand-in (no buddy); clean_flow's 'more than one
    unreadable' test never trips, so a clean with the stand-in unreadable reads no journal,
    deletes nothing and readmits the node with every pre-outage value."""
    nodes = ["a:11211", "b:11211"]
    writer = proc(nodes)
    cleaner = proc(nodes, share=writer)
    key = writer.key_on(A)
    assert writer.set(key, "old")
    writer.fail(A)
    writer.prober_pass()
    passes(cleaner)
    assert writer.set(key, "new")
    del writer
    cleaner.servers["b:11211"].hang = True
    cleaner.revive(A)
    for _ in range(10):  # b is the only journal holder: A waits for it, out of use
        passes(cleaner)
        assert not cleaner.node(A).ready
    cleaner.servers["b:11211"].hang = False  # b was marked down meanwhile: each waits for the
    until_ready(cleaner, A, rounds=160)  # other's journals, until one gives up (60 s) and is
    assert cleaner.get(key) != "old"  # flushed, keeping the journals it holds for the other


# -- 13. a node removed and added back forgets what the process knew of its outage ------------------


def test_a_node_removed_while_down_and_added_back_is_not_read_before_it_is_cleaned() -> None:
    """fleet_mark lives on the Node object; remove_node(A) (discovery dropped it while it was
    down) then add_node(A) (it answers again) makes a new Node: no mark, UP, ready. Until the next
    refresh the process reads A directly, although it knew A's outage was never cleaned."""
    from shardcache.ring import Ring

    nodes = ["a:11211", "b:11211", "c:11211"]
    process = proc(nodes)
    key = process.key_on(A)
    assert process.set(key, "old")
    process.fail(A)
    process.prober_pass()
    assert process.set(key, "new")  # on the stand-in
    process.change(Ring(nodes[1:]), 0.0)  # discovery: A is gone
    process.servers[A].down = False
    process.change(Ring(nodes), 0.0)  # discovery: A is back
    assert process.get(key) != "old"


# -- copies a clean could not remove (stand-in unreachable, or a write landing after it): the
# -- stand-in tag (the outage's generation in the copy's flags) keeps a later outage from serving them


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
