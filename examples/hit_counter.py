"""The seed's hit counter, three ways, from many workers at once.

    get 'hit_count' from cache / increase by one / save new 'hit_count' to cache

"Both server instances increase the hit count they receive back from the cache ... The true hit
count is 12 and some data has been lost!" This demo plays that race for real: threads sharing one
client (a threaded web server), then spawned processes with a client each (several web workers),
every worker counting page views of one page, and it prints how many hits were made and how many
the counter holds:

- ``naive``: the seed's get / add one / set: not atomic, so concurrent workers overwrite each
  other's counts;
- ``incr``: memcached adds on the server; ``initial=1`` creates the counter with the first hit
  (the creating call stores ``initial`` and returns it; the delta is not added on top), and
  concurrent creators never overwrite each other because creation uses ``add``;
- ``cas_update``: the compare-and-set retry loop (``gets``, apply the function, ``cas``; re-read on
  a conflict): right for any update, not only additions.

``python -m examples.hit_counter`` starts its own local cluster of 3 memcached nodes;
``demo(cluster)`` runs against one that is already running (``make demo``).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import shardcache
from shardcache.testing import LocalCluster, ServerSetupError

KEY = "hit_count"
WAIT_S = 60.0  # bound on every wait for workers


def naive_hit(cache: shardcache.Client) -> None:
    """The seed's version: read, add one, write back. Loses hits under concurrency."""
    count = cache.get(KEY) or 0
    cache.set(KEY, count + 1)


def incr_hit(cache: shardcache.Client) -> None:
    """The server adds one; the first hit creates the counter at 1."""
    cache.incr(KEY, 1, initial=1)


def cas_hit(cache: shardcache.Client) -> None:
    """The CAS retry loop; an absent counter is created as ``fn(initial)`` = 1."""
    cache.cas_update(KEY, lambda count: count + 1, initial=0, max_attempts=1000)


WAYS: dict[str, Callable[[shardcache.Client], None]] = {
    "naive get/set": naive_hit,
    "incr": incr_hit,
    "cas_update": cas_hit,
}


def run_threads(
    cache: shardcache.Client, hit: Callable[[shardcache.Client], None], threads: int, hits: int
) -> None:
    """``threads`` threads sharing ``cache``, released together, each making ``hits`` hits."""
    start = threading.Barrier(threads)
    failures: list[BaseException] = []

    def visit() -> None:
        try:
            start.wait(timeout=WAIT_S)
            for _ in range(hits):
                hit(cache)
        except BaseException as exc:
            failures.append(exc)

    workers = [threading.Thread(target=visit, daemon=True) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=WAIT_S)
    if failures or any(worker.is_alive() for worker in workers):
        raise RuntimeError(f"a worker thread failed or hung: {failures[:1]!r}")


def _web_worker(specs: list[str], way: str, threads: int, hits: int, start: Any) -> None:
    """One web worker process: its own client, ``threads`` threads of ``hits`` hits."""
    with shardcache.Client(specs) as cache:
        start.wait(timeout=WAIT_S)  # every process starts counting at once
        run_threads(cache, WAYS[way], threads, hits)


def run_processes(specs: list[str], way: str, processes: int, threads: int, hits: int) -> float:
    """``processes`` spawned web workers; the seconds from their common start until the last ends."""
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(processes + 1)  # and this process, so the clock starts when they do
    workers = [
        ctx.Process(target=_web_worker, args=(specs, way, threads, hits, start), daemon=True)
        for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    with contextlib.suppress(threading.BrokenBarrierError):  # a worker failed: reported below
        start.wait(timeout=WAIT_S)
    started = time.perf_counter()
    for worker in workers:
        worker.join(timeout=WAIT_S)
    seconds = time.perf_counter() - started
    stuck = [worker for worker in workers if worker.is_alive()]
    for worker in stuck:
        worker.terminate()
        worker.join(timeout=5)
    failed = [worker.exitcode for worker in workers if worker.exitcode != 0]
    if failed:
        raise RuntimeError(f"{len(failed)} web worker process(es) failed or hung (exit codes {failed})")
    return seconds


def demo(cluster: LocalCluster) -> None:
    """The hit counter three ways, from threads and then from processes, against ``cluster``."""
    with shardcache.Client(cluster.specs) as cache:
        print(f"  key {KEY!r} lives on node {cache.node_for(KEY)}; every worker counts views of one page")
        setups = [
            ("8 threads x 250 hits, one shared client", 1, 8, 250),
            ("4 processes x 4 threads x 125 hits, a client each", 4, 4, 125),
        ]
        for title, processes, threads, hits in setups:
            expected = processes * threads * hits
            print(f"\n  {title}: {expected:,} hits")
            print(f"    {'way':<15} {'counted':>8} {'lost':>8} {'seconds':>8}")
            for way, hit in WAYS.items():
                cache.delete(KEY)
                if processes == 1:
                    started = time.perf_counter()
                    run_threads(cache, hit, threads, hits)
                    seconds = time.perf_counter() - started
                else:
                    seconds = run_processes(cluster.specs, way, processes, threads, hits)
                counted = cache.get(KEY) or 0
                print(f"    {way:<15} {counted:>8,} {expected - counted:>8,} {seconds:>8.2f}")
        print("\n  naive get/set loses the hits that raced; incr and cas_update count every one.")


def main() -> int:
    try:
        cluster = LocalCluster(3, backend="auto")
    except ServerSetupError as exc:
        print(f"could not start memcached: {exc}", file=sys.stderr)
        return 1
    with cluster:
        print(f"hit counter demo on {len(cluster.specs)} memcached nodes ({cluster.backend})")
        demo(cluster)
    return 0


if __name__ == "__main__":
    sys.exit(main())
