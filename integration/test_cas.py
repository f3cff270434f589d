"""Distributed CAS and race-free counters against real memcached: the seed's hit counter, for real.

The seed's race ("both server instances read 10, both save 11: the true count is 12") is played
by several processes (spawned, each with its own ``shardcache.Client``, as web workers would be)
times several threads, and the counters are checked exactly: every acknowledged hit is counted
once. "Exactly" is checked twice over: the final value equals the number of acknowledged calls,
and the values the calls returned are all distinct and consecutive, so no two calls ever saw the
same state (a lost update shows up as a repeated value, a double count as a gap).

Then the same under a membership change (a node added mid-run, the counter's key moving to it)
and under a failover of the counter's node (frozen through a FaultProxy blackhole): there
"exact" means the counter ends equal to the number of calls that were acknowledged, the calls made
while its node is frozen are never acknowledged by another node, and the count survives the
node's return. The recipes built on CAS and ``add`` (``lock``, ``get_or_set``, ``cached``) are
checked for what they promise: one owner at a time, one computation per miss.

No timing is asserted. Every wait is bounded; every process and thread started here is joined
(and a process still alive after its bound is terminated by its handle).
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from pymemcache.client.base import Client as PymemcacheClient

from shardcache import (
    CasConflictError,
    CasToken,
    Client,
    Event,
    LockError,
    NodeUnavailableError,
    Ring,
)
from shardcache.testing import FaultProxy, LocalCluster

SPAWN = multiprocessing.get_context("spawn")  # each worker builds its own client, as a web worker does
PROCESSES, THREADS, HITS = 4, 4, 250
TOTAL = PROCESSES * THREADS * HITS
WAIT_S = 60.0  # bound on any wait for workers; a run takes a few seconds
PATIENT = 1000  # cas_update attempts for the exactness tests: the point is exactness, not giving up

FAST = {  # as integration/test_failover.py: a frozen node costs at most a short timeout
    "connect_timeout": 0.3,
    "timeout": 0.3,
    "failure_threshold": 2,
    "retry_interval_s": 0.2,
    "max_retry_interval_s": 0.5,
}


# --------------------------------------------------------------------------------------------------
# helpers: workers in threads and in spawned processes
# --------------------------------------------------------------------------------------------------
def in_threads(count: int, body: Callable[[int], Any], timeout_s: float = WAIT_S) -> list[Any]:
    """Run ``body(i)`` for i in range(count) in threads; their results, or raise with their errors."""
    results: list[Any] = [None] * count
    errors: list[str] = []

    def run(i: int) -> None:
        try:
            results[i] = body(i)
        except BaseException:
            errors.append(f"thread {i}: {traceback.format_exc()}")

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout_s
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    stuck = sum(thread.is_alive() for thread in threads)
    if errors or stuck:
        raise RuntimeError(
            f"{stuck} thread(s) still running after {timeout_s} s; errors:\n" + "\n".join(errors)
        )
    return results


def _report(target: Callable[..., Any], results: Any, *args: Any) -> None:
    """Process entry point: run ``target(*args)`` and put ``("ok", result)`` or ``("error", tb)``."""
    try:
        results.put(("ok", target(*args)))
    except BaseException:
        results.put(("error", f"pid {os.getpid()}: {traceback.format_exc()}"))


class Workers:
    """Spawned processes, each running ``target(*args)``; ``results()`` collects their returns.

    A context manager: on exit every process is joined, and terminated by its handle if it is still
    alive after a bounded wait.
    """

    def __init__(self, target: Callable[..., Any], arglists: Sequence[tuple[Any, ...]]) -> None:
        self._queue: Any = SPAWN.Queue()
        self._processes = [
            SPAWN.Process(target=_report, args=(target, self._queue, *args), daemon=True) for args in arglists
        ]
        for process in self._processes:
            process.start()

    def results(self, timeout_s: float = WAIT_S) -> list[Any]:
        deadline = time.monotonic() + timeout_s
        outcomes = [self._queue.get(timeout=max(0.1, deadline - time.monotonic())) for _ in self._processes]
        errors = [detail for status, detail in outcomes if status != "ok"]
        if errors:
            pytest.fail("worker process failed:\n" + "\n".join(errors), pytrace=False)
        return [detail for _, detail in outcomes]

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        for process in self._processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
        self._queue.close()
        self._queue.join_thread()


def wait_until(condition: Callable[[], bool], timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def key_moving_to(specs: Sequence[str], new: str, prefix: str = "hit_count") -> str:
    """A key that the ring over ``specs`` gives to another node, and that moves to ``new`` when added."""
    ring = Ring(list(specs)).with_node(new)
    return next(k for k in (f"{prefix}:{i}" for i in range(10_000)) if ring.node_for(k) == new)


def hit(client: Client, how: str, key: str, attempts: int = PATIENT) -> Any:
    """One page view, counted the way ``how`` says; what the call acknowledged (None: nothing)."""
    if how == "cas_update":
        return client.cas_update(key, lambda n: n + 1, initial=0, max_attempts=attempts)
    if how == "incr":
        return client.incr(key, 1, initial=0)
    # the seed's hit counter: get 'hit_count', increase by one, save it
    count = client.get(key) or 0
    client.set(key, count + 1)
    return count + 1


def _count_hits(specs: list[str], how: str, threads: int, hits: int, start: Any) -> dict[str, Any]:
    """A web worker process: ``threads`` threads each counting ``hits`` page views of one page."""
    fn_calls = itertools.count()
    with Client(specs) as client:

        def bump(n: int) -> int:
            next(fn_calls)
            return n + 1

        def count(_: int) -> list[Any]:
            start.wait(timeout=WAIT_S)  # every thread of every process starts at once
            acked = []
            for _ in range(hits):
                if how == "cas_update":
                    acked.append(client.cas_update("hit_count", bump, initial=0, max_attempts=PATIENT))
                else:
                    acked.append(hit(client, how, "hit_count"))
            return acked

        per_thread = in_threads(threads, count)
    return {"acked": [v for values in per_thread for v in values], "fn_calls": next(fn_calls)}


def count_hits_everywhere(cluster: LocalCluster, how: str) -> tuple[list[Any], int]:
    """PROCESSES x THREADS x HITS page views; (every acknowledged value, calls of the cas_update fn)."""
    start = SPAWN.Barrier(PROCESSES * THREADS)
    with Workers(_count_hits, [(cluster.specs, how, THREADS, HITS, start)] * PROCESSES) as workers:
        reports = workers.results()
    return [v for r in reports for v in r["acked"]], sum(r["fn_calls"] for r in reports)


# --------------------------------------------------------------------------------------------------
# the seed's hit counter, from many processes and threads
# --------------------------------------------------------------------------------------------------
@pytest.mark.smoke
def test_cas_update_hit_counter_counts_every_hit_once_across_processes(cluster: LocalCluster) -> None:
    acked, fn_calls = count_hits_everywhere(cluster, "cas_update")
    assert sorted(acked) == list(range(1, TOTAL + 1))  # each call saw its own state: 0 lost, 0 twice
    with Client(cluster.specs) as client:
        assert client.get("hit_count") == TOTAL
    assert fn_calls >= TOTAL  # the rest were conflicts, retried


@pytest.mark.smoke
def test_incr_hit_counter_counts_every_hit_once_across_processes(cluster: LocalCluster) -> None:
    acked, _ = count_hits_everywhere(cluster, "incr")
    # The call that creates the counter stores initial=0 and returns it without adding the delta
    # (documented; libmemcached's increment_with_initial does the same), so TOTAL calls acknowledge
    # 0, 1, ..., TOTAL - 1: every value once, none lost, none twice.
    assert sorted(acked) == list(range(TOTAL))
    with Client(cluster.specs) as client:
        assert client.get("hit_count") == TOTAL - 1


def test_the_seeds_naive_get_then_set_counter_loses_hits(cluster: LocalCluster) -> None:
    count_hits_everywhere(cluster, "naive")
    with Client(cluster.specs) as client:
        counted = client.get("hit_count")
    # 16 workers released together by a barrier: reads and writes interleave all the time.
    assert 0 < counted < TOTAL, f"naive get/set counted {counted} of {TOTAL} hits"


# --------------------------------------------------------------------------------------------------
# a node added mid-run; the counter's node failing over
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["cas_update", "incr"])
def test_hit_counter_stays_exact_while_a_node_is_added_mid_run(cluster: LocalCluster, how: str) -> None:
    base, new = cluster.specs[:2], cluster.specs[2]
    key = key_moving_to(base, new)
    threads, hits = 8, 250
    total = threads * hits
    with Client(base) as client:  # one process, one client: a single view of the ring
        assert client.set(key, 0)
        progress = itertools.count(1)
        halfway = threading.Event()

        def count(_: int) -> list[Any]:
            acked = []
            for _ in range(hits):
                acked.append(hit(client, how, key))
                if next(progress) == total // 2:
                    halfway.set()
            return acked

        outcome: list[Any] = []
        runner = threading.Thread(target=lambda: outcome.append(in_threads(threads, count)), daemon=True)
        runner.start()
        try:
            assert halfway.wait(timeout=WAIT_S)
            client.add_node(new, warmup_s=5)
        finally:
            runner.join(timeout=WAIT_S)
        assert not runner.is_alive() and outcome, "the counting threads failed (see the log)"
        assert client.node_for(key) == new
        acked = [v for values in outcome[0] for v in values]
        assert sorted(acked) == list(range(1, total + 1))
        assert client.get(key) == total
    with Client([new]) as direct:
        assert direct.get(key) == total  # it lives on the new node now


@pytest.mark.parametrize(
    ("how", "on_error"),
    [("incr", "raise"), ("incr", "miss"), ("cas_update", "raise"), ("cas_update", "miss")],
)
def test_counter_equals_the_acknowledged_hits_across_a_failover_of_its_node(
    fresh_cluster: Callable[..., LocalCluster],
    fault_proxy: Callable[..., FaultProxy],
    how: str,
    on_error: str,
) -> None:
    """Hits before, during and after the counter's node is frozen (blackholed, failover='remap').

    The freeze and the heal happen between bursts, so no call is in flight at either moment: a
    call that was not acknowledged did not reach memcached (the blackhole swallowed it), and the
    count must equal the acknowledged calls exactly. While the node is frozen no call may be
    acknowledged (a stand-in node would restart the count from zero): ``incr`` and ``cas_update``
    miss (return None) with on_error="miss" and raise NodeUnavailableError with "raise". And the
    count must still be there when the node returns (a counter is never fenced away).
    """
    cluster = fresh_cluster(3)
    proxies = [fault_proxy(node) for node in cluster.nodes]
    specs = [proxy.spec for proxy in proxies]
    with Client(specs, failover="remap", on_error=on_error, **FAST) as client:
        key = "hit_count"
        owner = client.node_for(key)
        proxy = proxies[specs.index(owner)]
        assert client.set(key, 0)

        def burst(hits: int, attempts: int = PATIENT) -> list[Any]:
            def count(_: int) -> list[Any]:
                outcomes: list[Any] = []
                for _ in range(hits):
                    try:
                        outcomes.append(hit(client, how, key, attempts))
                    except (NodeUnavailableError, CasConflictError) as exc:
                        outcomes.append(type(exc))
                return outcomes

            return [o for per_thread in in_threads(4, count) for o in per_thread]

        before = burst(50)
        proxy.blackhole()
        try:
            frozen = burst(10, attempts=3)
            assert client.node_states()[owner] != "up"
        finally:
            proxy.heal()
        assert wait_until(lambda: client.node_states()[owner] == "up")
        after = burst(50)

        during = [o for o in frozen if isinstance(o, int)]
        assert during == [], "acknowledged while the counter's node was frozen"
        if on_error == "miss":
            assert set(frozen) == {None}  # a counter is never moved to a stand-in: the call misses
        else:
            assert all(isinstance(o, type) and issubclass(o, NodeUnavailableError) for o in frozen), frozen
        acked = [o for o in before + after if isinstance(o, int)]
        assert len(acked) == len(before) + len(after)  # the node was healthy for these
        assert sorted(acked) == list(range(1, len(acked) + 1))
        assert client.get(key) == len(acked)
    for spec in specs:
        if spec != owner:
            with Client([spec]) as direct:
                assert direct.get(key) is None  # no stand-in kept a copy of the counter


# --------------------------------------------------------------------------------------------------
# node-bound CAS tokens
# --------------------------------------------------------------------------------------------------
@pytest.mark.smoke
def test_a_token_from_the_previous_owner_is_a_conflict_after_the_key_moves(cluster: LocalCluster) -> None:
    base, new = cluster.specs[:2], cluster.specs[2]
    key = key_moving_to(base, new, prefix="books")
    with Client(base) as client:
        assert client.set(key, "v1")
        old_owner = client.node_for(key)
        value, token = client.gets(key)
        assert value == "v1"
        assert isinstance(token, CasToken) and token.node_id == old_owner
        client.add_node(new)
        assert client.node_for(key) == new
        assert client.cas(key, "lost", token) is False  # not None: the key exists, elsewhere
        assert client.get(key) is None  # nothing was written on the new owner
        with Client([old_owner]) as direct:
            assert direct.get(key) == "v1"  # nor on the old owner
        assert client.set(key, "v2")  # another writer, on the new owner
        assert client.cas(key, "v3", token) is False
        assert client.get(key) == "v2"  # untouched
        value, token = client.gets(key)
        assert token.node_id == new
        assert client.cas(key, "v3", token) is True  # a fresh token works
    with Client([old_owner]) as direct:
        # never written with "lost" or "v3"; the set deleted its old copy (the pinned window after
        # a change without warm-up), so no counter, CAS loop or lock can bring "v1" back
        assert direct.get(key) is None


def test_a_refused_token_during_warm_up_leaves_the_value_to_be_warmed(cluster: LocalCluster) -> None:
    base, new = cluster.specs[:2], cluster.specs[2]
    key = key_moving_to(base, new, prefix="books")
    with Client(base) as client:
        assert client.set(key, "v1")
        _, token = client.gets(key)
        client.add_node(new, warmup_s=5)
        assert client.cas(key, "v2", token) is False  # the token is the old owner's
        value, token = client.gets(key)  # re-read, as a retry loop does: warmed from the old owner
        assert value == "v1" and token.node_id == new
        assert client.cas(key, "v2", token) is True
        assert client.node_states() == dict.fromkeys(client.nodes, "up")


def test_counters_created_during_warm_up_leave_every_node_up(cluster: LocalCluster) -> None:
    base, new = cluster.specs[:2], cluster.specs[2]
    ring = Ring(base).with_node(new)
    fresh = [k for k in (f"hits/{i}" for i in range(10_000)) if ring.node_for(k) == new][:4]
    errors: list[Event] = []
    with Client(base) as client:
        client.add_node(new, warmup_s=5)
        client.add_listener(lambda event: errors.append(event) if event.kind == "error" else None)
        for key in fresh:  # absent on the old owners too: the warm-up read misses
            assert client.cas_update(key, lambda n: n + 1, initial=0) == 1
        assert errors == []
        assert client.node_states() == dict.fromkeys(client.nodes, "up")


def test_incr_of_a_moved_counter_continues_from_its_previous_owner(cluster: LocalCluster) -> None:
    base, new = cluster.specs[:2], cluster.specs[2]
    key = key_moving_to(base, new)
    with Client(base) as client:
        assert client.set(key, 41)
        client.add_node(new, warmup_s=5)
        assert client.incr(key, 1, initial=0) == 42


def test_a_cas_update_that_writes_nothing_leaves_the_previous_owners_copy(cluster: LocalCluster) -> None:
    base, new = cluster.specs[:2], cluster.specs[2]
    key = key_moving_to(base, new)
    with Client(base) as client:
        assert client.set(key, 41)
        old = client.node_for(key)

        def refuse(n: int) -> int:
            raise ValueError(n)

        client.add_node(new, warmup_s=5)
        with pytest.raises(ValueError):
            client.cas_update(key, refuse)  # it read the counter, and wrote nothing
        assert client.get(key) == 41
    with Client([old]) as direct:
        assert direct.get(key) == 41  # a concurrent warm-up can still check its copy against it


@pytest.mark.parametrize("how", ["cas_update", "incr"])
def test_a_moved_counter_never_restarts_when_its_warm_up_copy_is_withdrawn(
    cluster: LocalCluster, fault_proxy: Callable[..., FaultProxy], how: str
) -> None:
    """A write reaches the previous owner while the warm-up copies the counter (a request still in
    flight on the old ring, or a client not yet told of the new node): the copy is stale and is
    withdrawn. The update must then read the counter again, never create it afresh at ``initial``
    on the new owner while the previous owner still holds it."""
    slow = fault_proxy(cluster.nodes[2])  # the new node, answering slowly: the copy takes a while
    base, new = cluster.specs[:2], slow.spec
    key = key_moving_to(base, new)
    with Client(base, timeout=5) as client:
        assert client.set(key, 41)
        old_host, old_port = client.node_for(key).rsplit(":", 1)
        old = PymemcacheClient((old_host, int(old_port)), timeout=2, connect_timeout=2)
        try:
            reads_before = int(old.stats()[b"cmd_get"])
            client.add_node(new, warmup_s=30)
            slow.set_latency(0.2)
            result: list[Any] = []
            updater = threading.Thread(target=lambda: result.append(hit(client, how, key)), daemon=True)
            updater.start()
            try:  # as soon as the warm-up has read 41 from the previous owner, someone increments it there
                assert wait_until(lambda: int(old.stats()[b"cmd_get"]) > reads_before, timeout_s=WAIT_S)
                assert old.incr(key.encode(), 1) == 42
            finally:
                updater.join(timeout=WAIT_S)
                slow.set_latency(0)
        finally:
            old.close()
        assert not updater.is_alive()
        assert result == [43]
        assert client.get(key) == 43


@pytest.mark.smoke
def test_raw_pymemcache_tokens_still_work_with_cas(cluster: LocalCluster) -> None:
    with Client(cluster.specs) as client:
        assert client.set("page", "v1")
        _, token = client.gets("page")
        raw = bytes(token)
        assert type(raw) is bytes
        assert client.cas("page", "v2", raw) is True
        assert client.cas("page", "v3", raw) is False  # stale: the value changed since
        _, token = client.gets("page")
        assert client.cas("page", "v4", int(token)) is True
        assert client.cas("absent", "x", int(token)) is None
        host, port = client.node_for("page").rsplit(":", 1)
        direct = PymemcacheClient((host, int(port)), timeout=2, connect_timeout=2)
        try:
            _, pymemcache_token = direct.gets(b"page")  # a token pymemcache itself got
        finally:
            direct.close()
        assert client.cas("page", "v5", pymemcache_token) is True
        assert client.get("page") == "v5"


# --------------------------------------------------------------------------------------------------
# cas_update
# --------------------------------------------------------------------------------------------------
@pytest.mark.smoke
def test_cas_update_creates_an_absent_key_with_add_never_overwriting_a_creator(cluster: LocalCluster) -> None:
    with Client(cluster.specs) as client, Client(cluster.specs) as other:
        assert client.cas_update("fresh", lambda v: [*v, "a"], initial=[]) == ["a"]
        assert client.get("fresh") == ["a"]

        seen: list[Any] = []

        def append_b(v: list[str]) -> list[str]:
            seen.append(v)
            if len(seen) == 1:
                assert other.add("raced", ["other"])  # another creator gets in first
            return [*v, "b"]

        assert client.cas_update("raced", append_b, initial=[]) == ["other", "b"]
        assert seen == [[], ["other"]]  # our add lost, so fn ran again on the creator's value
        assert client.get("raced") == ["other", "b"]


@pytest.mark.smoke
def test_cas_update_fn_raising_propagates_and_writes_nothing(cluster: LocalCluster) -> None:
    class BoomError(Exception):
        pass

    def boom(value: Any) -> Any:
        raise BoomError(value)

    with Client(cluster.specs) as client:
        assert client.set("present", 5)
        with pytest.raises(BoomError):
            client.cas_update("present", boom, initial=0)
        assert client.get("present") == 5
        with pytest.raises(BoomError):
            client.cas_update("absent", boom, initial=0)
        assert client.get("absent") is None


@pytest.mark.smoke
def test_cas_update_gives_up_with_cas_conflict_error_after_max_attempts(cluster: LocalCluster) -> None:
    with Client(cluster.specs) as client, Client(cluster.specs) as writer:
        assert client.set("contended", 0)
        calls = itertools.count(1)

        def always_raced(n: int) -> int:
            writer.set("contended", 1000 + next(calls))  # a concurrent writer between gets and cas
            return n + 1

        with pytest.raises(CasConflictError) as caught:
            client.cas_update("contended", always_raced, max_attempts=5, backoff_s=0.0)
        assert caught.value.attempts == 5 and caught.value.key == "contended"
        assert next(calls) == 6  # fn ran once per attempt
        assert client.get("contended") == 1005  # only the other writer's values were stored


def test_cas_update_gives_up_under_a_real_concurrent_writer_and_loses_nothing(cluster: LocalCluster) -> None:
    """A writer thread appends to a list non-stop while this thread appends with max_attempts=1:
    some of ours give up, and the final list holds every entry that was acknowledged, once, in
    order, and none of those that gave up."""
    with Client(cluster.specs) as client, Client(cluster.specs) as writer:
        assert client.set("history", [])
        stop = threading.Event()
        written: list[str] = []

        def write() -> None:
            for i in range(5000):
                if stop.is_set():
                    return
                writer.cas_update("history", lambda v, e=f"w{i}": [*v, e], max_attempts=PATIENT)
                written.append(f"w{i}")

        thread = threading.Thread(target=write, daemon=True)
        thread.start()
        mine: list[str] = []
        gave_up: list[str] = []
        try:
            for i in range(200):
                entry = f"m{i}"
                try:
                    client.cas_update("history", lambda v, e=entry: [*v, e], max_attempts=1)
                    mine.append(entry)
                except CasConflictError:
                    gave_up.append(entry)
        finally:
            stop.set()
            thread.join(timeout=WAIT_S)
        assert not thread.is_alive()
        assert gave_up, "200 single-attempt updates never met the concurrent writer"
        history = client.get("history")
        assert [e for e in history if e.startswith("m")] == mine
        assert [e for e in history if e.startswith("w")] == written


# --------------------------------------------------------------------------------------------------
# lock
# --------------------------------------------------------------------------------------------------
def _contend_for_lock(specs: list[str], threads: int, rounds: int, start: Any) -> dict[str, Any]:
    """Threads that each take the lock ``rounds`` times and check nobody else is inside."""
    with Client(specs) as client:

        def take_turns(i: int) -> dict[str, Any]:
            me = f"{os.getpid()}-{i}"
            overlaps, most_inside = [], 0
            start.wait(timeout=WAIT_S)
            for _ in range(rounds):
                with client.lock("L", ttl_s=30, blocking_timeout_s=WAIT_S):
                    inside = client.incr("inside", 1)
                    most_inside = max(most_inside, inside or 0)
                    holder = client.get("holder")
                    if holder is not None:
                        overlaps.append(holder)
                    client.set("holder", me)
                    time.sleep(0.002)  # hold it a moment: an overlap would have time to show
                    if client.get("holder") != me:
                        overlaps.append("replaced")
                    client.delete("holder")
                    client.decr("inside", 1)
                client.incr("entries", 1)
            return {"overlaps": overlaps, "most_inside": most_inside}

        return {"threads": in_threads(threads, take_turns)}


def test_lock_is_never_held_by_two_owners_across_processes(cluster: LocalCluster) -> None:
    processes, threads, rounds = 2, 4, 6
    with Client(cluster.specs) as client:
        assert client.set("inside", 0) and client.set("entries", 0)
        start = SPAWN.Barrier(processes * threads)
        with Workers(_contend_for_lock, [(cluster.specs, threads, rounds, start)] * processes) as workers:
            reports = [t for r in workers.results() for t in r["threads"]]
        assert [t["overlaps"] for t in reports] == [[]] * (processes * threads)
        assert max(t["most_inside"] for t in reports) == 1
        assert client.get("inside") == 0
        assert client.get("entries") == processes * threads * rounds
        assert not client.lock("L").locked()


def _take_expired_lock(specs: list[str], name: str, events: Any, results: Any) -> dict[str, Any]:
    """Another process: wait for the first owner's lock to expire, take it, hold it until told."""
    held, release = events
    with Client(specs) as client:
        lock = client.lock(name, ttl_s=30, blocking_timeout_s=15)
        assert lock.acquire()
        results.put(lock.token)
        held.set()
        assert release.wait(timeout=WAIT_S)
        still_mine = client.get(lock.name) == lock.token
        return {"still_mine": still_mine, "released": lock.release()}


def test_a_stale_owner_cannot_release_the_lock_another_process_now_holds(cluster: LocalCluster) -> None:
    held, release = SPAWN.Event(), SPAWN.Event()
    tokens: Any = SPAWN.Queue()
    with Client(cluster.specs) as client:
        stale = client.lock("report:42", ttl_s=1)
        assert stale.acquire()
        with Workers(_take_expired_lock, [(cluster.specs, "report:42", (held, release), tokens)]) as workers:
            try:
                assert held.wait(timeout=WAIT_S)  # only once our 1 s lease has expired
                new_token = tokens.get(timeout=WAIT_S)
                assert new_token != stale.token
                assert stale.release() is False  # the stale owner must not free it
                assert client.get(stale.name) == new_token
                assert client.lock("report:42").locked()
            finally:
                release.set()
            [report] = workers.results()
        assert report == {"still_mine": True, "released": True}
        assert not client.lock("report:42").locked()
    tokens.close()
    tokens.join_thread()


@pytest.mark.smoke
def test_lock_raises_lock_error_when_the_blocking_timeout_elapses(cluster: LocalCluster) -> None:
    with Client(cluster.specs) as client:
        with client.lock("L", ttl_s=30):
            other = client.lock("L", blocking_timeout_s=0.2)
            with pytest.raises(LockError) as caught, other:
                pytest.fail("acquired a lock that is held")
            assert caught.value.name == b"L:lock"
            assert other.acquire(blocking=False) is False
        with client.lock("L", blocking_timeout_s=0.2) as lock:  # free again once released
            assert lock.locked()


@pytest.mark.smoke
def test_lock_is_released_when_the_block_raises(cluster: LocalCluster) -> None:
    with Client(cluster.specs) as client:
        with pytest.raises(ZeroDivisionError), client.lock("L"):
            _ = 1 / 0
        assert not client.lock("L").locked()


# --------------------------------------------------------------------------------------------------
# get_or_set and cached: stampede protection
# --------------------------------------------------------------------------------------------------
def _herd(specs: list[str], threads: int, calls: Any, start: Any, go: Any, progress: Any) -> None:
    """One web worker: per round, ``threads`` threads miss on the same key at once."""
    with Client(specs) as client:

        def render() -> str:
            with calls.get_lock():
                calls.value += 1
            time.sleep(0.3)  # a slow page: everybody else arrives while it renders
            return f"page rendered by {os.getpid()} ({uuid.uuid4().hex})"

        for round_go in go:
            assert round_go.wait(timeout=WAIT_S)

            def miss(_: int) -> str:
                start.wait(timeout=WAIT_S)
                return str(client.get_or_set("books/321", render, expire=2))

            progress.put(in_threads(threads, miss))


def test_get_or_set_runs_the_factory_once_per_expiry_under_a_thundering_herd(cluster: LocalCluster) -> None:
    processes, threads = 2, 25  # 50 concurrent misses
    calls = SPAWN.Value("i", 0)
    start = SPAWN.Barrier(processes * threads)
    go = (SPAWN.Event(), SPAWN.Event())
    progress: Any = SPAWN.Queue()
    pages: list[set[str]] = []
    with Client(cluster.specs) as client:
        args = (cluster.specs, threads, calls, start, go, progress)
        with Workers(_herd, [args] * processes) as workers:
            try:
                for round_go in go:
                    round_go.set()
                    seen = [progress.get(timeout=WAIT_S) for _ in range(processes)]
                    pages.append({page for values in seen for page in values})
                    assert len([p for values in seen for p in values]) == processes * threads
                    if len(pages) == 1:
                        assert calls.value == 1
                        assert wait_until(lambda: client.get("books/321") is None, timeout_s=10)
            finally:
                for round_go in go:
                    round_go.set()  # never leave a worker waiting
            workers.results()
    progress.close()
    progress.join_thread()
    assert calls.value == 2  # once per expiry
    assert [len(p) for p in pages] == [1, 1]  # all 50 callers got the one computation
    assert pages[0] != pages[1]


class CountingClient(Client):
    """A client that counts its ``get`` calls (to see whether ``get_or_set`` polls)."""

    gets_made = 0

    def get(self, key: Any, default: Any = None) -> Any:
        self.gets_made += 1
        return super().get(key, default)


def test_get_or_set_does_not_wait_for_a_lock_on_a_node_that_is_down(
    fresh_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = fresh_cluster(3)
    dead = cluster.specs[0]
    with CountingClient(cluster.specs, on_error="miss", **FAST) as client:
        key = next(
            k
            for k in (f"books/{i}" for i in range(10_000))
            if client.node_for(k) == dead and client.node_for(f"{k}:lock") == dead
        )
        cluster.nodes[0].kill()
        calls = itertools.count(1)
        assert client.get_or_set(key, lambda: f"page {next(calls)}", lock_ttl_s=2) == "page 1"
        # Nobody holds the lock: it could not be taken because its node is down. Polling for a
        # value that nobody is computing only delays the page by lock_ttl_s.
        assert client.gets_made <= 3


@pytest.fixture
def client(cluster: LocalCluster) -> Iterator[Client]:
    with Client(cluster.specs) as shared:
        yield shared


@pytest.mark.smoke
def test_cached_computes_once_per_miss_and_invalidate_forces_a_new_computation(client: Client) -> None:
    computed: list[int] = []
    start = threading.Barrier(10)

    @client.cached(expire=60)
    def book_page(book_id: int) -> str:
        computed.append(book_id)
        time.sleep(0.2)
        return f"<h1>Book {book_id}</h1>"

    def visit(_: int) -> str:
        start.wait(timeout=WAIT_S)
        return book_page(321)

    assert in_threads(10, visit) == ["<h1>Book 321</h1>"] * 10
    assert computed == [321]
    assert book_page(321) == "<h1>Book 321</h1>" and computed == [321]
    assert book_page(322) == "<h1>Book 322</h1>" and computed == [321, 322]  # other args, own entry
    assert book_page.invalidate(321) is True
    assert book_page(321) == "<h1>Book 321</h1>" and computed == [321, 322, 321]
    assert book_page.uncached(321) == "<h1>Book 321</h1>" and computed == [321, 322, 321, 321]


@pytest.mark.smoke
def test_cached_key_templates_and_callables_name_the_entry(client: Client) -> None:
    @client.cached(key="books/{0}")
    def by_position(book_id: int) -> str:
        return f"position {book_id}"

    @client.cached(key="nearby/{postcode}/{radius}")
    def by_name(postcode: str, radius: int) -> str:
        return f"name {postcode} {radius}"

    @client.cached(key=lambda postcode, radius=5: f"stores/{postcode}/{radius}")
    def by_callable(postcode: str, radius: int = 5) -> str:
        return f"callable {postcode} {radius}"

    assert by_position(321) == "position 321"
    assert client.get("books/321") == "position 321"
    assert by_name(postcode="SW1A", radius=5) == "name SW1A 5"
    assert client.get("nearby/SW1A/5") == "name SW1A 5"
    assert by_callable("SW1A") == "callable SW1A 5"
    assert client.get("stores/SW1A/5") == "callable SW1A 5"
    assert by_name.invalidate(postcode="SW1A", radius=5) is True
    assert client.get("nearby/SW1A/5") is None


def test_cached_named_key_template_works_for_positional_calls(client: Client) -> None:
    @client.cached(key="books/{book_id}")
    def book_page(book_id: int) -> str:
        return f"page {book_id}"

    assert book_page(321) == "page 321"
    assert client.get("books/321") == "page 321"
