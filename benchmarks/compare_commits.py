"""Two commits of shardcache against each other: client_bench's workloads, one run, same servers.

    .venv/bin/python -m benchmarks.compare_commits --old OLD_PYTHON [--new NEW_PYTHON]
        [--rounds N] [--block-s S] [--phase both|loopback|delayed] [--delay-ms 0.5] [--json FILE]
    .venv/bin/python -m benchmarks.compare_commits --summarize run1.json run2.json ...

``OLD_PYTHON``/``NEW_PYTHON`` are the interpreters of two venvs, each with one checkout installed
(``pip install -e``); ``--new`` defaults to the interpreter running this script. Both trees have the
package name ``shardcache``, so each runs in its own worker process (``_compare_worker.py``, started
with ``-I`` so the venv's tree is the one imported; the header prints each worker's tree and git
revision). This process starts ``--nodes`` (4) memcached servers on 127.0.0.1
(``shardcache.testing.LocalCluster``, process backend) and drives both workers against them in
interleaved rounds: each round times one block of ``--block-s`` (0.1 s) per tree and workload, the
tree that goes first alternating every round; only one worker runs at a time (the other waits on
its stdin).

Workloads, as in client_bench: ``loopback`` phase ``get_many`` of 100 keys (all hits),
``set_many`` of 100 keys, single ``get`` and ``set``; ``delayed`` phase the two batch workloads
through client_bench's delay relay (``--delay-ms`` each way). Values are 200-byte ``bytes`` under
``str`` keys; ``default_noreply=False``, 1 s timeouts, ``TCP_NODELAY``; each worker has its own keys.

The table gives each tree's calls/s (median over the rounds, middle half beside it) and the paired
ratio new/old (median over the rounds of new's calls/s over old's in the same round, with the
25th-75th percentile). Goal (issue 10, "no speed regression"): every ratio >= 0.97, and a single
``get`` faster (> 1.0). ``--json FILE`` keeps every round; ``--summarize`` prints the ratio of each
saved run and the median over the runs (quote that: a 2-core shared machine moves loopback cells
by 10-30% between runs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from benchmarks._util import environment, goal, print_header, print_table, write_json
from benchmarks.client_bench import (
    Address,
    RelayUnavailableError,
    delay_relay,
    quartiles,
    relay_binary,
    round_trips,
)
from shardcache.testing import LocalCluster

WORKER = Path(__file__).with_name("_compare_worker.py")
TREES = ("old", "new")
CLOCKS = ("wall", "cpu")  # calls per wall second; calls per CPU second of the worker process
LOOPBACK_WORKLOADS = ("get_many", "set_many", "get", "set")
DELAYED_WORKLOADS = ("get_many", "set_many")
CLOCK_TITLES = {
    "wall": "throughput (wall clock)",
    "cpu": "client CPU cost (CPU time of the worker process: its own code and syscalls, no waiting)",
}
MIN_RATIO = 0.97
FASTER = ("get",)  # workloads where new must beat old, not only keep up with it

Rates = dict[str, dict[str, list[float]]]  # {workload: {tree: one rate per round}}


class Worker:
    """One tree's worker process, driven one request at a time (not thread-safe)."""

    def __init__(self, python: str, tag: str, addresses: Sequence[Address]) -> None:
        self.tag = tag
        self.proc = subprocess.Popen(
            [python, "-I", str(WORKER), tag, *(f"{host}:{port}" for host, port in addresses)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.info: dict[str, Any] = self._read()

    def _streams(self) -> tuple[IO[str], IO[str]]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        return self.proc.stdin, self.proc.stdout

    def _read(self) -> dict[str, Any]:
        line = self._streams()[1].readline()
        if not line:
            raise RuntimeError(f"{self.tag} worker (pid {self.proc.pid}) exited: rc {self.proc.wait()}")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def request(self, **request: Any) -> dict[str, Any]:
        stdin = self._streams()[0]
        stdin.write(json.dumps(request) + "\n")
        stdin.flush()
        return self._read()

    def block(self, workload: str, block_s: float) -> dict[str, float]:
        """One timed block: ``{"wall": calls per second, "cpu": calls per CPU second}``."""
        reply = self.request(op="block", workload=workload, block_s=block_s)
        return {"wall": reply["calls"] / reply["elapsed"], "cpu": reply["calls"] / reply["cpu"]}

    def close(self) -> None:
        """Ask the worker to quit, SIGKILL it (by its pid) after 5 s, and reap it."""
        with contextlib.suppress(OSError, ValueError):
            self._streams()[0].write(json.dumps({"op": "quit"}) + "\n")
            self._streams()[0].close()
        try:
            self.proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5.0)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@contextlib.contextmanager
def workers(pythons: dict[str, str], addresses: Sequence[Address]) -> Iterator[dict[str, Worker]]:
    started: dict[str, Worker] = {}
    try:
        for tag in TREES:
            started[tag] = Worker(pythons[tag], tag, addresses)
        yield started
    finally:
        for worker in started.values():
            worker.close()


def run_phase(
    phase: str,
    pythons: dict[str, str],
    addresses: Sequence[Address],
    workloads: Sequence[str],
    rounds: int,
    block_s: float,
    log: Callable[[str], None],
) -> tuple[dict[str, Rates], dict[str, dict[str, Any]]]:
    """``({clock: {workload: {tree: rate per round}}}, {tree: worker info})``, trees interleaved."""
    rates: dict[str, Rates] = {c: {w: {t: [] for t in TREES} for w in workloads} for c in CLOCKS}
    with workers(pythons, addresses) as pool:
        for r in range(rounds):
            order = TREES if r % 2 == 0 else TREES[::-1]
            for workload in workloads:
                for tag in order:
                    for clock, rate in pool[tag].block(workload, block_s).items():
                        rates[clock][workload][tag].append(rate)
            if (r + 1) % 10 == 0 or r + 1 == rounds:
                log(f"  {phase}: round {r + 1}/{rounds} done")
        for worker in pool.values():
            worker.request(op="recheck")
        return rates, {tag: w.info for tag, w in pool.items()}


def ratios(per_tree: dict[str, list[float]]) -> list[float]:
    return [new / old for old, new in zip(per_tree["old"], per_tree["new"], strict=True)]


def target(workload: str) -> str:
    return "> 1.0x" if workload in FASTER else f">= {MIN_RATIO:g}x"


def verdict(workload: str, ratio: float) -> str:
    return goal(ratio > 1.0 if workload in FASTER else ratio >= MIN_RATIO)


def print_results(clock: str, results: dict[str, Rates]) -> None:
    """One table: each phase's workloads, old and new side by side, for one clock."""
    unit = "calls/s" if clock == "wall" else "calls/cpu-s"
    rows = []
    for phase, per_workload in results.items():
        for workload, per_tree in per_workload.items():
            cells = []
            for tag in TREES:
                low, median, high = quartiles(per_tree[tag])
                cells += [f"{median:,.0f}", f"{low:,.0f}-{high:,.0f}", f"{1e6 / median:,.1f}"]
            low, median, high = quartiles(ratios(per_tree))
            rows.append(
                [
                    f"{phase} {workload}",
                    *cells,
                    f"{median:.3f}x",
                    f"{low:.3f}-{high:.3f}",
                    target(workload),
                    verdict(workload, median),
                ]
            )
    print_table(
        f"new / old, paired per round: {CLOCK_TITLES[clock]}",
        [
            "workload",
            f"old {unit}",
            "middle half",
            "old us/call",
            f"new {unit}",
            "middle half",
            "new us/call",
            "new/old",
            "middle half",
            "goal",
            "verdict",
        ],
        rows,
        notes=[
            f"{unit}: median over the rounds (a *_many call is 100 keys); us/call from that median.",
            f"new/old: median over the rounds of new's {unit} over old's in the same round.",
        ],
    )


def summarize(paths: Sequence[str]) -> int:
    """Per-run paired ratios of saved ``--json`` runs and their medians over the runs, per clock."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    for clock in CLOCKS:
        unit = "calls/s" if clock == "wall" else "calls/cpu-s"
        rows = []
        for phase, per_workload in runs[0]["results"][clock].items():
            for workload in per_workload:
                per_run = [run["results"][clock][phase][workload] for run in runs]
                run_ratios = [statistics.median(ratios(r)) for r in per_run]
                old = statistics.median(statistics.median(r["old"]) for r in per_run)
                new = statistics.median(statistics.median(r["new"]) for r in per_run)
                ratio = statistics.median(run_ratios)
                rows.append(
                    [
                        f"{phase} {workload}",
                        f"{old:,.0f}",
                        f"{new:,.0f}",
                        *(f"{x:.3f}" for x in run_ratios),
                        f"{ratio:.3f}x",
                        f"{min(run_ratios):.3f}-{max(run_ratios):.3f}",
                        target(workload),
                        verdict(workload, ratio),
                    ]
                )
        print_table(
            f"new / old over {len(runs)} runs: {CLOCK_TITLES[clock]}",
            [
                "workload",
                f"old {unit}",
                f"new {unit}",
                *(f"run {i + 1}" for i in range(len(runs))),
                "median",
                "range",
                "goal",
                "verdict",
            ],
            rows,
            notes=[
                f"{unit}: median over the runs of each run's median round; run i: that run's paired new/old.",
            ],
        )
    print(
        "runs: "
        + ", ".join(f"{p} ({run['environment']['date']})" for p, run in zip(paths, runs, strict=True))
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.compare_commits", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--old", metavar="PYTHON", help="interpreter of the venv with the old tree")
    parser.add_argument(
        "--new", metavar="PYTHON", default=sys.executable, help="the new tree's (default: this one)"
    )
    parser.add_argument("--rounds", type=int, default=30, help="interleaved rounds (default 30)")
    parser.add_argument("--block-s", type=float, default=0.1, help="seconds per timed block (default 0.1)")
    parser.add_argument("--delay-ms", type=float, default=0.5, help="delayed phase: delay each way")
    parser.add_argument("--phase", choices=("both", "loopback", "delayed"), default="both")
    parser.add_argument("--nodes", type=int, default=4, help="memcached servers (default 4)")
    parser.add_argument(
        "--memcached-threads",
        type=int,
        default=0,
        help="memcached -t (default: memcached's own, 4); 1 puts every connection on one server "
        "thread, so which thread a worker's connections land on cannot favour one tree on a 2-core machine",
    )
    parser.add_argument("--json", metavar="FILE", help="also write every round as JSON")
    parser.add_argument("--summarize", nargs="+", metavar="JSON", help="summarize saved runs and exit")
    args = parser.parse_args(argv)
    if args.summarize:
        return summarize(args.summarize)
    if args.old is None:
        parser.error("--old is required (or --summarize)")
    if args.rounds < 1 or args.block_s <= 0 or args.nodes < 1 or args.delay_ms < 0:
        parser.error("--rounds, --block-s and --nodes must be positive, --delay-ms >= 0")
    phases = ("loopback", "delayed") if args.phase == "both" else (args.phase,)
    pythons = {"old": args.old, "new": args.new}

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    env = environment(["pymemcache", "mmh3"])
    if "delayed" in phases:
        try:
            relay_binary()
        except RelayUnavailableError as exc:
            print(f"compare_commits: {exc}", file=sys.stderr)
            return 2
    started = time.perf_counter()
    results: dict[str, dict[str, Rates]] = {c: {} for c in CLOCKS}  # {clock: {phase: Rates}}
    trees: dict[str, dict[str, Any]] = {}
    rtt: dict[str, tuple[float, float]] = {}
    threads = ("-t", str(args.memcached_threads)) if args.memcached_threads else ()
    with LocalCluster(args.nodes, backend="process", memcached_args=threads) as cluster:
        nodes = [node.address for node in cluster.nodes]
        memcached_version = cluster.nodes[0].version()
        if "loopback" in phases:
            log(f"loopback phase: {args.nodes} nodes, {args.rounds} rounds x {args.block_s} s blocks")
            rtt["direct"] = round_trips(nodes)
            rates, trees = run_phase(
                "loopback", pythons, nodes, LOOPBACK_WORKLOADS, args.rounds, args.block_s, log
            )
            for clock in CLOCKS:
                results[clock]["loopback"] = rates[clock]
        if "delayed" in phases:
            with delay_relay([port for _, port in nodes], args.delay_ms / 1e3) as relay:
                log(f"delayed phase: +{args.delay_ms:g} ms each way, delayrelay pid {relay.proc.pid}")
                rtt["relayed"] = round_trips(relay.addresses)
                rates, trees = run_phase(
                    "delayed", pythons, relay.addresses, DELAYED_WORKLOADS, args.rounds, args.block_s, log
                )
            for clock in CLOCKS:
                results[clock]["delayed"] = rates[clock]
    elapsed = time.perf_counter() - started

    print_header("shardcache: old commit vs new commit on the same memcached servers", env)
    for tag in TREES:
        info = trees[tag]
        print(f"{tag:9s} git {info['git']}  {info['tree']}  ({info['python']})")
    print(f"servers   {args.nodes} x memcached {memcached_version} (local processes on 127.0.0.1)")
    print(f"timing    {args.rounds} interleaved rounds x {args.block_s:g} s per block; total {elapsed:.0f} s")
    for path, (one, fan_out) in rtt.items():
        print(f"round trip {path:8s} version, median: one node {one:.3f} ms, all nodes {fan_out:.3f} ms")
    if "delayed" in phases:
        print(f"delayed   +{args.delay_ms:g} ms each way through benchmarks/delayrelay.c")
    print()
    for clock in CLOCKS:
        print_results(clock, results[clock])
    if args.json:
        settings = {"nodes": args.nodes, "memcached": memcached_version, "rounds": args.rounds}
        settings |= {"block_s": args.block_s, "delay_ms_each_way": args.delay_ms, "round_trip_ms": rtt}
        write_json(
            args.json,
            {"environment": env, "trees": trees, "settings": settings, "results": results},
        )
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
