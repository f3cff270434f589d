"""One hot counter, many workers: ``cas_update`` against ``incr``, and the naive get/set loop.

    .venv/bin/python -m benchmarks.cas_bench [--rounds N] [--ops N] [--workers N] [--quick]
                                             [--mode both|threads|processes] [--json FILE]

Starts ``--nodes`` (3) local memcached processes on 127.0.0.1 (``LocalCluster``, process backend)
and counts hits on ONE key from ``--workers`` (8) workers at once, three ways:

- ``incr``: ``client.incr(key, 1)``: one round trip, the server adds;
- ``cas_update``: ``client.cas_update(key, lambda n: n + 1)`` with its defaults (64 attempts,
  jittered backoff from 1 ms up to 50 ms): ``gets``, then ``cas``, again on a conflict;
- ``naive get/set``: the seed's ``get``, add one, ``set``: not atomic, shown for its lost updates.

Workers are threads sharing one ``shardcache.Client`` (``threads`` mode), and separate processes
with a client each (``processes`` mode: spawned once, before the timed rounds, and reused). Each
round resets the key to 0, releases every worker at once, and times from the first worker's start
to the last one's end; each worker makes ``--ops`` calls. Rounds are interleaved (every mode and
way once per round, in an order rotated every round) and the table shows medians over the rounds
and the middle half of them (25th-75th percentile).

Counted per round: ``conflicts/success`` is (calls of the update function - successful updates) /
successful updates, the extra ``gets``/``cas`` round trips CAS paid; ``gave up`` counts the
``CasConflictError``s; ``lost`` is the share of acknowledged calls missing from the final count (the
final value is read after the workers end). The exactness goals (PASS/MISS): ``incr`` and
``cas_update`` count every acknowledged call exactly, in every round. Throughput has no goal; the
ratio ``cas_update / incr`` is paired per round.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import multiprocessing
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import shardcache
from benchmarks._util import environment, goal, print_header, print_table, write_json
from shardcache.testing import LocalCluster

KEY = "hit_count"
STRATEGIES = ("incr", "cas_update", "naive get/set")
MODES = ("threads", "processes")
CLIENTS_PER_MODE = {"threads": "one shared client", "processes": "a client each"}
WAIT_S = 120.0  # bound on any wait for workers


# --------------------------------------------------------------------------------------------------
# the work: one worker's calls
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WorkerReport:
    started: float  # time.time(), comparable across processes on one machine
    ended: float
    fn_calls: int  # cas_update only: how often the update function ran
    gave_up: int  # cas_update only: CasConflictError raised


def count_hits(client: shardcache.Client, strategy: str, ops: int) -> WorkerReport:
    """``ops`` hits on KEY, counted the way ``strategy`` says."""
    fn_calls = itertools.count()
    gave_up = 0

    def bump(n: int) -> int:
        next(fn_calls)
        return n + 1

    started = time.time()
    for _ in range(ops):
        if strategy == "incr":
            client.incr(KEY, 1)
        elif strategy == "cas_update":
            try:
                client.cas_update(KEY, bump)
            except shardcache.CasConflictError:
                gave_up += 1
        else:
            client.set(KEY, (client.get(KEY) or 0) + 1)
    return WorkerReport(started, time.time(), next(fn_calls), gave_up)


def _process_worker(specs: list[str], inbox: Any, outbox: Any) -> None:
    """A benchmark process: one client; runs each ``(strategy, ops, start_at)`` it is sent."""
    with shardcache.Client(specs) as client:
        while True:
            command = inbox.get(timeout=WAIT_S * 5)
            if command is None:
                return
            strategy, ops, start_at = command
            time.sleep(max(0.0, start_at - time.time()))
            outbox.put(count_hits(client, strategy, ops))


class ProcessWorkers:
    """``n`` spawned processes, each with its own client, reused across rounds; joined on close."""

    def __init__(self, specs: list[str], n: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._outbox: Any = ctx.Queue()
        self._inboxes: list[Any] = [ctx.Queue() for _ in range(n)]
        self._processes = [
            ctx.Process(target=_process_worker, args=(specs, inbox, self._outbox), daemon=True)
            for inbox in self._inboxes
        ]
        for process in self._processes:
            process.start()

    def run(self, strategy: str, ops: int) -> list[WorkerReport]:
        start_at = time.time() + 0.1
        for inbox in self._inboxes:
            inbox.put((strategy, ops, start_at))
        return [self._outbox.get(timeout=WAIT_S) for _ in self._inboxes]

    def close(self) -> None:
        for inbox in self._inboxes:
            with contextlib.suppress(Exception):
                inbox.put(None)
        for process in self._processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)


def run_threads(client: shardcache.Client, strategy: str, workers: int, ops: int) -> list[WorkerReport]:
    """``workers`` threads sharing ``client``, released together by a barrier."""
    start = threading.Barrier(workers)
    reports: list[WorkerReport] = []
    lock = threading.Lock()

    def work() -> None:
        start.wait(timeout=WAIT_S)
        report = count_hits(client, strategy, ops)
        with lock:
            reports.append(report)

    threads = [threading.Thread(target=work, daemon=True) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=WAIT_S)
    if any(thread.is_alive() for thread in threads) or len(reports) != workers:
        raise RuntimeError(f"{strategy}: {len(reports)} of {workers} threads finished within {WAIT_S} s")
    return reports


# --------------------------------------------------------------------------------------------------
# rounds
# --------------------------------------------------------------------------------------------------
@dataclass
class Cell:
    """One (mode, strategy): a sample per round."""

    rates: list[float] = field(default_factory=list)  # acknowledged calls per second
    conflicts: list[float] = field(default_factory=list)  # per successful update (cas_update)
    gave_up: list[int] = field(default_factory=list)
    lost: list[float] = field(default_factory=list)  # share of acknowledged calls not counted
    exact: list[bool] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ops_per_s_median": statistics.median(self.rates),
            "conflicts_per_success_median": statistics.median(self.conflicts) if self.conflicts else None,
            "gave_up_total": sum(self.gave_up),
            "lost_share_median": statistics.median(self.lost),
            "exact_every_round": all(self.exact),
            "ops_per_s_samples": self.rates,
            "conflicts_per_success_samples": self.conflicts,
            "gave_up_samples": self.gave_up,
            "lost_share_samples": self.lost,
        }


def one_round(
    client: shardcache.Client,
    runner: Callable[[str], list[WorkerReport]],
    strategy: str,
    ops: int,
    cell: Cell,
) -> None:
    if not client.set(KEY, 0):
        raise RuntimeError("could not reset the counter")
    reports = runner(strategy)
    counted = client.get(KEY)
    if not isinstance(counted, int):
        raise RuntimeError(f"{strategy}: the counter holds {counted!r}")
    gave_up = sum(r.gave_up for r in reports)
    acknowledged = len(reports) * ops - gave_up
    seconds = max(r.ended for r in reports) - min(r.started for r in reports)
    cell.rates.append(acknowledged / seconds)
    cell.lost.append((acknowledged - counted) / acknowledged if acknowledged else 0.0)
    cell.exact.append(counted == acknowledged)
    if strategy == "cas_update":
        fn_calls = sum(r.fn_calls for r in reports)
        cell.conflicts.append((fn_calls - acknowledged) / acknowledged if acknowledged else float("inf"))
        cell.gave_up.append(gave_up)


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[1], q[2]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 7, quick 3)")
    parser.add_argument("--ops", type=int, default=None, help="calls per worker per round (default 500)")
    parser.add_argument("--workers", type=int, default=8, help="concurrent workers (default 8)")
    parser.add_argument("--mode", choices=("both", *MODES), default="both")
    parser.add_argument("--nodes", type=int, default=3, help="memcached servers (default 3)")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 150 calls per worker")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 7)
    ops = args.ops or (150 if args.quick else 500)
    modes = MODES if args.mode == "both" else (args.mode,)

    env = environment(["shardcache", "pymemcache"])
    print_header("cas_bench: one hot counter, cas_update vs incr vs naive get/set", env)
    cells = {(m, s): Cell() for m in modes for s in STRATEGIES}
    with LocalCluster(args.nodes, backend="process") as cluster, shardcache.Client(cluster.specs) as client:
        print(
            f"{args.nodes} memcached processes {cluster.specs}; key {KEY!r} lives on {client.node_for(KEY)}"
        )
        print(f"{args.workers} workers x {ops} calls per round, {rounds} rounds\n")
        processes = ProcessWorkers(cluster.specs, args.workers) if "processes" in modes else None
        try:
            runners: dict[str, Callable[[str], list[WorkerReport]]] = {}
            if "threads" in modes:
                runners["threads"] = lambda s: run_threads(client, s, args.workers, ops)
            if processes is not None:
                runners["processes"] = lambda s: processes.run(s, ops)
            for runner in runners.values():  # warm-up: connections, imports, spawned processes
                for strategy in STRATEGIES:
                    one_round(client, runner, strategy, max(1, ops // 10), Cell())
            for r in range(rounds):
                order = STRATEGIES[r % 3 :] + STRATEGIES[: r % 3]
                for mode, runner in runners.items():
                    for strategy in order:
                        one_round(client, runner, strategy, ops, cells[(mode, strategy)])
                log(f"  round {r + 1}/{rounds} done")
        finally:
            if processes is not None:
                processes.close()

    for mode in modes:
        rows = []
        for strategy in STRATEGIES:
            cell = cells[(mode, strategy)]
            low, median, high = quartiles(cell.rates)
            rows.append(
                [
                    strategy,
                    f"{median:,.0f}",
                    f"{low:,.0f}-{high:,.0f}",
                    f"{statistics.median(cell.conflicts):.2f}" if cell.conflicts else "-",
                    sum(cell.gave_up) if cell.gave_up else "-",
                    f"{100 * statistics.median(cell.lost):.1f}%",
                ]
            )
        print_table(
            f"{args.workers} {mode} on one key ({CLIENTS_PER_MODE[mode]})",
            ["way", "acked calls/s", "middle half", "conflicts/success", "gave up", "lost (median)"],
            rows,
            notes=[
                f"medians over {rounds} rounds of {args.workers} x {ops} calls",
                "conflicts/success: extra update-function runs per successful cas_update",
            ],
        )

    goal_rows = []
    for mode in modes:
        incr, cas = cells[(mode, "incr")], cells[(mode, "cas_update")]
        ratios = [c / i for c, i in zip(cas.rates, incr.rates, strict=True)]
        low, median, high = quartiles(ratios)
        goal_rows.append(
            [f"cas_update / incr throughput ({mode})", f"{median:.2f}x ({low:.2f}-{high:.2f})", "info"]
        )
        goal_rows.append(
            [
                f"incr counts every call exactly ({mode})",
                f"{sum(incr.exact)}/{rounds} rounds",
                goal(all(incr.exact)),
            ]
        )
        goal_rows.append(
            [
                f"cas_update counts every success exactly ({mode})",
                f"{sum(cas.exact)}/{rounds} rounds",
                goal(all(cas.exact)),
            ]
        )
        naive = cells[(mode, "naive get/set")]
        goal_rows.append(
            [
                f"naive get/set lost updates ({mode})",
                f"{100 * statistics.median(naive.lost):.1f}% (median)",
                "info",
            ]
        )
    print_table("summary", ["what", "figure", "verdict"], goal_rows)

    if args.json:
        write_json(
            args.json,
            {
                "environment": env,
                "settings": {"rounds": rounds, "ops": ops, "workers": args.workers, "nodes": args.nodes},
                "results": {f"{m}/{s}": cell.as_dict() for (m, s), cell in cells.items()},
            },
        )
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
