"""Warm-up and drain windows (README "Scaling out and in"): a miss on a moved key is copied from its
previous owner, writers delete it there, and every race between the two leaves no old value behind.
"""

from __future__ import annotations

import types
from collections.abc import Iterator

import pytest
from fakes import Cluster

from shardcache import _batch, recipes
from shardcache import _commands as cmd
from shardcache._commands import Engine
from shardcache._router import CallKind

NODES = ["a:11211", "b:11211", "c:11211"]
D = "d:11211"


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    cluster = Cluster(NODES)
    yield cluster
    cluster.close()


def moved_keys(cluster: Cluster, count: int = 3) -> list[tuple[str, str]]:
    """Add d with a 60 s warm-up window after storing keys: ``(key, previous owner)`` of moved keys."""
    before = {f"w{i}": cluster.owner_id(f"w{i}") for i in range(300)}
    for key in before:
        cluster.servers[before[key]].put(key.encode(), key.encode(), flags=16, ttl=300)
    cluster.change(cluster.topology.ring.with_node(D), 60)
    moved = [(key, old) for key, old in before.items() if cluster.owner_id(key) == D]
    assert len(moved) >= count
    return moved[:count]


# -- copying ------------------------------------------------------------------------------------


def test_a_miss_on_a_moved_key_is_copied_from_its_previous_owner_with_its_ttl_and_flags(
    cluster: Cluster,
) -> None:
    (key, old), *_ = moved_keys(cluster)
    cluster.clock.advance(30)
    assert cluster.get(key) == key  # flags 16: text
    new = cluster.servers[D]
    assert new.peek(key.encode()) == key.encode()
    ttl = new.ttl_of(key.encode())
    assert ttl is not None and 269 <= ttl <= 270  # the remaining TTL, not a fresh one
    assert [line.split(b" ")[0] for line in cluster.servers[old].commands] == [b"mg", b"mg"]  # read, recheck
    assert new.sent(b"ms") == [b"ms %b 2 F16 T270 ME c" % key.encode()]  # add mode: a writer wins
    assert cluster.get(key) == key and len(cluster.servers[old].commands) == 2  # now a plain hit


def test_keys_that_did_not_move_are_never_looked_up_elsewhere(cluster: Cluster) -> None:
    moved_keys(cluster)
    stay = next(f"w{i}" for i in range(300) if cluster.owner_id(f"w{i}") != D)
    cluster.servers[cluster.owner_id(stay)].remove(stay.encode())
    assert cluster.get(stay, "miss") == "miss"
    assert not any(server.sent(b"mg") for server in cluster.servers.values())


def test_after_the_window_a_moved_key_misses_without_a_lookup(cluster: Cluster) -> None:
    (key, old), *_ = moved_keys(cluster)
    cluster.clock.advance(61)
    assert cluster.get(key, "miss") == "miss"
    assert cluster.servers[old].commands == [] and cluster.servers[old].peek(key.encode()) is not None


def test_no_copy_of_a_key_either_node_still_has_to_forget(cluster: Cluster) -> None:
    (key, old), (key2, _), *_ = moved_keys(cluster)
    cluster.node(old).fence(key.encode())  # the previous owner's value of it may be outdated
    assert cluster.get(key, "miss") == "miss"
    assert not cluster.servers[old].sent(b"mg")
    cluster.prober_pass()
    assert cluster.node(old).ready
    cluster.node(D).fence(b"unrelated")  # the new owner fences another key: this one still warms
    assert cluster.get(key2) == key2  # (skipping it would let a counter restart or a lock be retaken)


def test_many_moved_keys_are_copied_in_one_round_trip_per_step(cluster: Cluster) -> None:
    moved = moved_keys(cluster, count=6)
    keys = [key for key, _ in moved]
    assert cluster.run(_batch.fetch(cluster.core, keys, with_cas=False)) == {k: k for k in keys}
    for old in {old for _, old in moved}:
        assert cluster.servers[old].attempts == 2  # read, recheck: each one job for all its keys
    assert cluster.servers[D].attempts == 2  # the get_many, then the copies
    assert cluster.servers[D].stored() == {k.encode() for k in keys}


def test_gets_of_a_moved_key_copies_it_then_returns_the_new_owners_token(cluster: Cluster) -> None:
    (key, _), *_ = moved_keys(cluster)
    value, token = cluster.gets(key)
    assert value == key and token.node_id == D
    assert cluster.cas(key, "next", token) is True
    assert cluster.get(key) == "next"


def test_a_counter_still_on_its_previous_owner_is_brought_over_before_it_counts(cluster: Cluster) -> None:
    (key, old), *_ = moved_keys(cluster)
    cluster.servers[old].put(key.encode(), b"41", flags=2)
    assert cluster.incr(key, 1, initial=0) == 42  # not restarted from initial on the new owner
    assert cluster.get(key) == 42


def test_an_unreadable_value_is_a_miss_as_it_would_be_on_its_own_node() -> None:
    cluster = Cluster(NODES, on_error="miss")
    (key, old), *_ = moved_keys(cluster)
    cluster.servers[old].put(key.encode(), b"not a number", flags=2)
    assert cluster.get(key, "miss") == "miss"
    cluster.close()


@pytest.mark.parametrize("fault", ["down", "refuses"])
def test_warm_up_is_best_effort_when_the_previous_owner_fails(cluster: Cluster, fault: str) -> None:
    (key, old), *_ = moved_keys(cluster)
    if fault == "down":
        cluster.servers[old].down = True
    else:
        cluster.servers[old].refuse.add(b"mg")
    assert cluster.get(key, "miss") == "miss"
    assert not cluster.servers[D].stored()


# -- races between the copy and writers ------------------------------------------------------------


def test_a_source_deleted_during_the_copy_withdraws_the_copy(cluster: Cluster) -> None:
    (key, old), *_ = moved_keys(cluster)
    source = cluster.servers[old]
    cluster.servers[D].before = lambda line: source.remove(key.encode()) if line.startswith(b"ms ") else None
    assert cluster.get(key, "miss") == "miss"
    assert cluster.servers[D].peek(key.encode()) is None  # withdrawn: the deleted value does not come back
    assert len(cluster.servers[D].sent(b"md")) == 1


def test_a_source_replaced_during_the_copy_is_copied_again(cluster: Cluster) -> None:
    (key, old), *_ = moved_keys(cluster)
    source = cluster.servers[old]
    replaced: list[bytes] = []

    def writer(line: bytes) -> None:
        if line.startswith(b"ms ") and not replaced:
            replaced.append(line)
            source.put(key.encode(), b"replaced", flags=16)

    cluster.servers[D].before = writer
    assert cluster.get(key) == "replaced"
    assert cluster.servers[D].peek(key.encode()) == b"replaced"
    assert len(cluster.servers[D].sent(b"ms")) == 2


def test_a_source_that_keeps_changing_is_given_up_after_a_few_attempts(cluster: Cluster) -> None:
    (key, old), *_ = moved_keys(cluster)
    source = cluster.servers[old]
    cluster.servers[D].before = lambda line: (
        source.put(key.encode(), line[:2]) if line.startswith(b"ms") else None
    )
    assert cluster.get(key, "miss") == "miss"
    assert len(cluster.servers[D].sent(b"ms")) == 3 and cluster.servers[D].peek(key.encode()) is None


def test_a_writer_on_the_new_owner_before_the_copy_wins(cluster: Cluster) -> None:
    (key, old), *_ = moved_keys(cluster)
    new = cluster.servers[D]
    cluster.servers[old].before = lambda line: (
        new.put(key.encode(), b"writer", flags=16) if not new.stored() else None
    )
    assert cluster.get(key, "miss") == "miss"  # the copy was not stored: a miss, never the old value
    assert new.peek(key.encode()) == b"writer"


def test_a_writer_after_the_copy_keeps_its_value_when_the_copy_is_withdrawn(cluster: Cluster) -> None:
    (key, old), *_ = moved_keys(cluster)
    new, source = cluster.servers[D], cluster.servers[old]

    def writer(line: bytes) -> None:
        if line == b"mg %b c k" % key.encode():  # the recheck: a writer has set and deleted meanwhile
            new.put(key.encode(), b"writer", flags=16)
            source.remove(key.encode())

    source.before = writer
    assert cluster.get(key, "miss") == "miss"
    assert new.sent(b"md") and new.peek(key.encode()) == b"writer"  # md C<copy's cas> left it alone


# -- writers during a window -------------------------------------------------------------------------


def test_set_and_delete_of_a_moved_key_delete_it_on_its_previous_owner_first(cluster: Cluster) -> None:
    (key, old), (key2, old2), *_ = moved_keys(cluster)
    assert cluster.set(key, "new") is True
    assert cluster.servers[old].peek(key.encode()) is None
    assert cluster.servers[old].commands == [b"delete " + key.encode()]
    assert cluster.delete(key2) is False  # not on the new owner yet
    assert cluster.servers[old2].peek(key2.encode()) is None
    assert cluster.get(key) == "new" and cluster.get(key2, "miss") == "miss"


def test_conditional_writes_delete_the_previous_owners_copy_after_they_take_effect(cluster: Cluster) -> None:
    (key, old), (key2, old2), (key3, _) = moved_keys(cluster)
    cluster.servers[old].remove(key.encode())  # absent everywhere: add takes effect
    assert cluster.add(key, "added") is True
    assert cluster.servers[D].commands[-1].startswith(b"add ")
    assert cluster.get(key) == "added"
    # present on its previous owner: add must refuse (the value is brought over, not replaced)
    assert cluster.add(key3, "added") is False
    assert cluster.get(key3) == key3
    cluster.servers[D].put(key2.encode(), b"on new", flags=16)
    assert cluster.run(cmd.touch(cluster.core, key2, 30, None)) is True
    assert cluster.servers[old2].peek(key2.encode()) is None


def test_a_failed_conditional_write_leaves_the_previous_owner_alone(cluster: Cluster) -> None:
    (key, old), *_ = moved_keys(cluster)
    cluster.servers[old].remove(key.encode())  # absent everywhere
    cluster.servers[old].commands.clear()
    assert cluster.run(cmd.store(cluster.core, b"replace", key, "x", 0, None, None)) is False
    assert cluster.run(cmd.touch(cluster.core, key, 30, None)) is False
    assert not any(c.startswith((b"delete", b"md")) for c in cluster.servers[old].commands)


def test_conditional_writes_apply_to_the_value_still_on_the_previous_owner(cluster: Cluster) -> None:
    """replace/append/touch of a moved key act on what exists, even if it is still on its previous
    owner (they used to return False there, and a later get still served the old value)."""
    (key, old), (key2, old2), (key3, _) = moved_keys(cluster)
    assert cluster.run(cmd.store(cluster.core, b"replace", key, "x", 0, None, None)) is True
    assert cluster.get(key) == "x" and cluster.servers[old].peek(key.encode()) is None
    assert cluster.run(cmd.store(cluster.core, b"append", key2, b"+", 0, None, None)) is True
    assert cluster.get(key2) == key2 + "+" and cluster.servers[old2].peek(key2.encode()) is None
    assert cluster.run(cmd.touch(cluster.core, key3, 30, None)) is True
    assert cluster.get(key3) == key3


def test_an_unreachable_previous_owner_is_fenced_for_the_keys_written_elsewhere() -> None:
    cluster = Cluster(NODES, on_error="miss", failure_threshold=5)
    (key, old), *_ = moved_keys(cluster)
    cluster.servers[old].hang = True
    assert cluster.set(key, "new") is True
    cluster.servers[old].hang = False
    assert cluster.node(old).fenced(key.encode())
    cluster.servers[D].remove(key.encode())  # evicted: the next read would warm up from old...
    assert cluster.get(key, "miss") == "miss"  # ...which is not ready: the old value never comes back
    cluster.prober_pass()
    assert cluster.servers[old].peek(key.encode()) is None
    cluster.close()


def test_set_many_and_delete_many_of_moved_keys_clear_the_previous_owners(cluster: Cluster) -> None:
    moved = moved_keys(cluster, count=4)
    keys = [key for key, _ in moved]
    assert cluster.run(_batch.set_many(cluster.core, {k: "new" for k in keys[:2]}, 0, None, None)) == []
    assert cluster.run(_batch.delete_many(cluster.core, keys[2:], None)) is True
    assert all(cluster.servers[old].peek(key.encode()) is None for key, old in moved)
    assert cluster.run(_batch.fetch(cluster.core, keys, with_cas=False)) == {k: "new" for k in keys[:2]}


def test_a_previous_owner_that_is_down_costs_writers_no_time() -> None:
    cluster = Cluster(NODES, on_error="miss")
    (key, old), *_ = moved_keys(cluster)
    cluster.fail(old)
    attempts = cluster.servers[old].attempts
    assert cluster.set(key, "new") is True
    assert cluster.servers[old].attempts == attempts
    assert cluster.get(key) == "new"
    cluster.close()


def test_a_delete_while_the_previous_owner_is_down_is_not_undone_when_it_returns() -> None:
    cluster = Cluster(NODES, on_error="miss")
    (key, old), *_ = moved_keys(cluster)
    cluster.fail(old)
    cluster.delete(key)  # the app invalidates the key: it is on old only, which is down
    cluster.revive(old)
    cluster.prober_pass()
    assert cluster.node(old).ready and cluster.topology.previous is not None  # back, window still open
    assert cluster.get(key, "miss") == "miss"  # was: the deleted value, copied back from old (before the fix)
    cluster.close()


# -- drain ------------------------------------------------------------------------------------------


def test_a_removed_node_is_read_from_while_it_drains(cluster: Cluster) -> None:
    keys = [cluster.key_on("a:11211", skip=i) for i in range(3)]
    for key in keys:
        cluster.servers["a:11211"].put(key.encode(), b"from a", flags=16)
    cluster.change(cluster.topology.ring.without_node("a:11211"), 60)
    assert all(cluster.get(key) == "from a" for key in keys)
    assert {w for s in ("b:11211", "c:11211") for w in cluster.servers[s].stored()} == {
        k.encode() for k in keys
    }
    assert cluster.set(keys[0], "new") and cluster.servers["a:11211"].peek(keys[0].encode()) is None
    cluster.clock.advance(61)
    cluster.servers["a:11211"].put(keys[1].encode(), b"late", flags=16)
    cluster.servers[cluster.owner_id(keys[1])].remove(keys[1].encode())
    assert cluster.get(keys[1], "miss") == "miss"  # the window is over: a is no longer consulted


def test_a_flush_all_during_a_drain_window_is_not_undone_by_warm_up(cluster: Cluster) -> None:
    key = cluster.key_on("a:11211")
    cluster.servers["a:11211"].put(key.encode(), b"before flush", flags=16)
    cluster.change(cluster.topology.ring.without_node("a:11211"), 60)
    assert cluster.run(_batch.flush_all(cluster.core, 0)) == {"b:11211": True, "c:11211": True}
    assert cluster.get(key, "miss") == "miss"  # was: "before flush" (copied from the draining a)


# -- add and locks during a window -------------------------------------------------------------------


def test_add_of_a_moved_key_that_exists_on_its_previous_owner_is_not_stored(cluster: Cluster) -> None:
    (key, _old), *_ = moved_keys(cluster)
    assert cluster.add(key, "second writer") is False  # was: True (before the fix)
    assert cluster.get(key) == key  # was: "second writer"; the value on old was deleted (before the fix)


def test_a_lock_held_before_a_node_is_added_is_not_taken_again_during_the_window(cluster: Cluster) -> None:
    client = types.SimpleNamespace(_engine=Engine(cluster.core, cluster.run))
    ring_after = cluster.topology.ring.with_node(D)
    name = next(f"job{i}" for i in range(1000) if ring_after.node_for(f"job{i}:lock") == D)
    first = recipes.Lock(client, name, ttl_s=30, blocking_timeout_s=0)
    assert first.acquire(blocking=False) is True
    cluster.change(ring_after, 60)
    second = recipes.Lock(client, name, ttl_s=30, blocking_timeout_s=0)
    assert second.acquire(blocking=False) is False  # was: True (before the fix)
    assert first.release() is True
    # released means released: the token left on the previous owner must not be warmed back
    assert second.acquire(blocking=False) is True  # was: LockError until the TTL (before the fix)
    assert second.release() is True


# -- CAS when the owner changes ------------------------------------------------------------------------


def test_cas_with_a_token_from_the_previous_owner_is_a_conflict_and_writes_nothing(cluster: Cluster) -> None:
    key = next(f"w{i}" for i in range(300) if cluster.topology.ring.with_node(D).node_for(f"w{i}") == D)
    old = cluster.owner_id(key)
    cluster.set(key, "v1")
    _, token = cluster.gets(key)
    assert token.node_id == old
    cluster.change(cluster.topology.ring.with_node(D), 0)
    cluster.servers[D].put(key.encode(), b"v1", flags=16)
    commands = {node_id: list(server.commands) for node_id, server in cluster.servers.items()}
    assert cluster.cas(key, "v2", token) is False
    assert {node_id: server.commands for node_id, server in cluster.servers.items()} == commands
    assert cluster.get(key) == "v1"


def test_cas_with_a_token_from_a_node_now_down_is_a_conflict_on_its_stand_in() -> None:
    cluster = Cluster(NODES, failover="remap")
    key = cluster.key_on("a:11211")
    cluster.set(key, "v1")
    _, token = cluster.gets(key)
    cluster.fail("a:11211")
    assert cluster.cas(key, "v2", token) is False
    assert not any(server.stored() for node_id, server in cluster.servers.items() if node_id != "a:11211")


def test_cas_update_rereads_when_the_owner_changes_between_gets_and_cas(cluster: Cluster) -> None:
    key = next(f"w{i}" for i in range(300) if cluster.topology.ring.with_node(D).node_for(f"w{i}") == D)
    old = cluster.owner_id(key)
    cluster.set(key, 10)
    calls: list[int] = []

    def bump(n: int) -> int:
        calls.append(n)
        if len(calls) == 1:
            cluster.change(cluster.topology.ring.with_node(D), 0)  # the ring changes mid-loop
        return n + 1

    flow = recipes.cas_update_flow(
        cluster.core, key, bump, initial=0, expire=0, max_attempts=5, backoff_s=0.001, max_backoff_s=0.01
    )
    # re-read on the new owner: the value is brought over from its previous owner (the pinned
    # window), so the count goes on instead of restarting from initial
    assert cluster.run(flow) == 11
    assert calls == [10, 10]
    assert cluster.servers[old].peek(key.encode()) is None  # counted in one place only
    assert cluster.servers[D].peek(key.encode()) == b"11"
    assert cluster.executor.slept and max(cluster.executor.slept) <= 0.01  # backoff on the fake clock


def test_a_cas_loops_read_of_a_moved_key_is_warmed_then_answered_by_the_new_owner(cluster: Cluster) -> None:
    (key, _old), *_ = moved_keys(cluster)
    value, token = cluster.run(cmd.gets(cluster.core, key, CallKind.PINNED_READ))
    assert value == key and token.node_id == D
    assert cluster.servers[D].peek(key.encode()) == key.encode()


def test_a_value_with_flags_out_of_range_on_the_previous_owner_is_a_miss_not_an_error(
    cluster: Cluster,
) -> None:
    """A lying (or foreign) previous owner: flags no memcached client could have set are not copied
    (and not sent on: the encoder refuses them), the read is a miss, nothing raises."""
    (key, old), (key2, _), *_ = moved_keys(cluster)
    cluster.servers[old].put(key.encode(), b"x", flags=2**40, ttl=300)
    assert cluster.get(key, "miss") == "miss"
    assert cluster.servers[D].peek(key.encode()) is None
    assert cluster.get(key2) == key2  # the other moved keys still warm up


def test_without_a_window_reads_miss_but_a_counter_is_brought_over_and_a_delete_stays() -> None:
    """The pinned window: after a change without warm-up, a plain read of a moved key misses (no
    copy), but a counter goes on counting, and a counter deleted meanwhile is not warmed back."""
    cluster = Cluster(NODES)
    before = {f"w{i}": cluster.owner_id(f"w{i}") for i in range(300)}
    for key, owner in before.items():
        cluster.servers[owner].put(key.encode(), b"41", flags=2, ttl=300)
    cluster.change(cluster.topology.ring.with_node(D), 0)
    moved = [(key, old) for key, old in before.items() if cluster.owner_id(key) == D]
    (read, _), (counted, old), (deleted, old_deleted) = moved[:3]
    assert cluster.get(read, "miss") == "miss" and cluster.servers[D].peek(read.encode()) is None
    incr = cmd.counter(cluster.core, counted, 1, decr=False, noreply=None, initial=None, expire=0)
    assert cluster.run(incr) == 42
    assert cluster.servers[old].peek(counted.encode()) is None  # counted in one place only
    assert cluster.run(cmd.delete(cluster.core, deleted, None)) is False  # absent on its new owner
    assert cluster.servers[old_deleted].peek(deleted.encode()) is None  # ...and gone from the old one
    again = cmd.counter(cluster.core, deleted, 1, decr=False, noreply=None, initial=1, expire=0)
    assert cluster.run(again) == 1  # starts afresh: the deleted count does not come back
    cluster.close()
