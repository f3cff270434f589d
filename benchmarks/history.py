"""History run (issue 11, point 3): K worker processes x T threads of random calls against real
memcached nodes while a nemesis breaks nodes, changes the ring and kills workers; then the checker.

    python -m benchmarks.history --seed 1 --duration-s 60 --nemesis kill,pause --failover fail_fast
    python -m benchmarks.history --summary RUN1.json RUN2.json ...   # one line per --json report

The runner starts ``--nodes`` memcached processes on 127.0.0.1 (``LocalCluster``; behind one
``FaultProxy`` each when ``blackhole`` is among the nemeses), writes the server list to
``RUN_DIR/ring.json`` and spawns the workers (``benchmarks._history_worker``), each logging its calls
to ``RUN_DIR/ops-<name>.jsonl``. Worker ``i`` applies a new server list ``i/(K-1) * --stagger-s``
after seeing it (default 2 s apart at most). The nemesis, one fault at a time, every 0.5-2 s:

- ``kill``: SIGKILL a ring node, restart it (empty, same port) 0.5-2 s later;
- ``pause``: SIGSTOP a ring node, SIGCONT 0.5-2 s later;
- ``blackhole``: its proxy swallows everything for 0.5-2 s, then heals;
- ``add``: a node joins (a fresh one, or half the time one removed earlier: add-then-remove);
- ``remove``: a ring node leaves (it keeps running with its data), never below 2 nodes;
- ``reweight``: a node's weight becomes another of 1, 2, 3;
- ``worker-kill``: SIGKILL a worker process and start a replacement.

The nemesis stops 2 s before the end. After the workers exit, every node is healed, each counter's
final value is read with ``incr(key, 0)`` by the runner's own client (which applied every change
at once, so its 60 s pinned window brings a counter from its previous owner), and
``shardcache.testing.check_history`` judges the history. Exit status 1 if a rule was broken.
Every process started is stopped by its PID; every loop is bounded in time.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import shardcache
from benchmarks._history_worker import CAS_COUNTERS, INCR_COUNTERS, LOCK_TTL_S, now
from shardcache.testing import (
    Fault,
    FaultProxy,
    HistoryReport,
    LocalCluster,
    MemcachedNode,
    check_history,
    load_history,
)

NEMESES = ("kill", "pause", "blackhole", "add", "remove", "reweight", "worker-kill")
ROOT = Path(__file__).resolve().parent.parent
MAX_NODES = 8
MIN_NODES = 2
SETTLE_S = 2.0  # no fault starts this close to the end


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 1
    duration_s: float = 20.0
    processes: int = 3
    threads: int = 4
    nodes: int = 4
    nemesis: tuple[str, ...] = ("kill", "pause")
    failover: str = "fail_fast"
    stagger_s: float = 2.0
    think_ms: float = 2.0
    fleet_refresh_s: float | None = 0.5  # the client's default; None: fleet fencing off
    backend: str = "process"
    out: str | None = None


@dataclasses.dataclass
class Member:
    node: MemcachedNode
    proxy: FaultProxy | None
    weight: int = 1

    @property
    def node_id(self) -> str:
        return self.proxy.spec if self.proxy is not None else self.node.spec

    @property
    def spec(self) -> str:
        return self.node_id if self.weight == 1 else f"{self.node_id}:{self.weight}"


class Run:
    """One run: the cluster, the ring as published, the workers, the fault log."""

    def __init__(self, config: Config, run_dir: Path) -> None:
        self.config = config
        self.dir = run_dir
        self.rng = random.Random(config.seed)
        self.deadline_ns = now() + int(config.duration_s * 1e9)
        self.cluster = LocalCluster(config.nodes, backend=config.backend)  # type: ignore[arg-type]
        self.proxies: list[FaultProxy] = []
        self.members = [self._member(node) for node in self.cluster.nodes]
        self.ring: list[Member] = list(self.members)
        self.gutter: list[str] = []
        if config.failover == "gutter":
            self.gutter = [self._member(n).node_id for n in self.cluster.add_nodes(1)]
        self.version = 0
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.faults: list[Fault] = []
        self._names = iter(range(10_000))
        self.publish()
        self.client = shardcache.Client([m.spec for m in self.ring], timeout=1.0, connect_timeout=1.0)

    def _member(self, node: MemcachedNode) -> Member:
        proxy = None
        if "blackhole" in self.config.nemesis:
            proxy = FaultProxy(*node.address)
            self.proxies.append(proxy)
        return Member(node, proxy)

    def publish(self) -> None:
        """Write the ring for the workers (atomically) and apply it to the runner's client."""
        self.version += 1
        servers = [m.spec for m in self.ring]
        tmp = self.dir / "ring.json.tmp"
        tmp.write_text(json.dumps({"version": self.version, "servers": servers}), encoding="utf-8")
        os.replace(tmp, self.dir / "ring.json")
        if self.version > 1:
            self.client.set_nodes(servers)

    # -- workers ----------------------------------------------------------------------------------

    def start_worker(self, slot: int) -> None:
        name = f"w{next(self._names)}"
        k = self.config.processes
        delay = self.config.stagger_s * slot / (k - 1) if k > 1 else 0.0
        cmd = [
            sys.executable, "-m", "benchmarks._history_worker", "--name", name, "--dir", str(self.dir),
            "--threads", str(self.config.threads), "--deadline-ns", str(self.deadline_ns),
            "--seed", str(self.config.seed), "--think-ms", str(self.config.think_ms),
            "--apply-delay-s", f"{delay:.3f}", "--failover", self.config.failover,
            "--fleet-refresh-s", str(self.config.fleet_refresh_s or 0),
        ]  # fmt: skip
        for spec in self.gutter:
            cmd += ["--gutter", spec]
        with (self.dir / f"worker-{name}.log").open("wb") as log:
            self.workers[name] = subprocess.Popen(
                cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )

    def stop_workers(self) -> None:
        """Wait for the workers to reach their deadline (bounded), then SIGKILL any left, by PID."""
        limit = time.monotonic() + max(0.0, (self.deadline_ns - now()) / 1e9) + 10.0
        for proc in self.workers.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, limit - time.monotonic()))
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=5)

    # -- the nemesis ------------------------------------------------------------------------------

    def nemesis(self) -> None:
        """Faults one at a time until SETTLE_S before the deadline (bounded by it)."""
        actions = {name: getattr(self, "fault_" + name.replace("-", "_")) for name in self.config.nemesis}
        while True:
            time.sleep(self.rng.uniform(0.5, 2.0))
            if now() + int((SETTLE_S + 2.0) * 1e9) >= self.deadline_ns or not actions:
                return
            name = self.rng.choice(sorted(actions))
            start = now()
            target, detail = actions[name]()
            if target:
                self.faults.append(Fault(name, target, start, now(), detail))

    def _outage(self, down: Callable[[], None], up: Callable[[], None]) -> None:
        down()
        try:
            time.sleep(self.rng.uniform(0.5, 2.0))
        finally:
            up()

    def fault_kill(self) -> tuple[str, str]:
        m = self.rng.choice(self.ring)
        self._outage(m.node.kill, m.node.start)
        return m.node_id, ""

    def fault_pause(self) -> tuple[str, str]:
        m = self.rng.choice(self.ring)
        self._outage(m.node.pause, m.node.unpause)
        return m.node_id, ""

    def fault_blackhole(self) -> tuple[str, str]:
        m = self.rng.choice(self.ring)
        assert m.proxy is not None
        self._outage(m.proxy.blackhole, m.proxy.heal)
        return m.node_id, ""

    def fault_add(self) -> tuple[str, str]:
        if len(self.ring) >= MAX_NODES:
            return "", ""
        removed = [m for m in self.members if m not in self.ring]
        if removed and self.rng.random() < 0.5:
            m, detail = self.rng.choice(removed), "re-added (kept its data while out)"
        else:
            m, detail = self._member(self.cluster.add_nodes(1)[0]), "fresh"
            self.members.append(m)
        self.ring.append(m)
        self.publish()
        return m.node_id, detail

    def fault_remove(self) -> tuple[str, str]:
        if len(self.ring) <= MIN_NODES:
            return "", ""
        m = self.rng.choice(self.ring)
        self.ring.remove(m)
        self.publish()
        return m.node_id, ""

    def fault_reweight(self) -> tuple[str, str]:
        m = self.rng.choice(self.ring)
        m.weight = self.rng.choice([w for w in (1, 2, 3) if w != m.weight])
        self.publish()
        return m.node_id, f"weight {m.weight}"

    def fault_worker_kill(self) -> tuple[str, str]:
        name = self.rng.choice(sorted(n for n, p in self.workers.items() if p.poll() is None))
        proc = self.workers[name]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=5)
        slot = self.rng.randrange(self.config.processes)
        self.start_worker(slot)
        return name, f"replaced by w{max(int(n[1:]) for n in self.workers)}"

    # -- the end ----------------------------------------------------------------------------------

    def heal(self) -> None:
        for m in self.members:
            if m.node.is_paused():
                m.node.unpause()
            if not m.node.is_running():
                m.node.start()
            if m.proxy is not None:
                m.proxy.heal()

    def finals(self) -> dict[str, int | None]:
        """Each counter's value, read with ``incr(key, 0)`` (pinned: never from a stand-in)."""
        found: dict[str, int | None] = {}
        for key in INCR_COUNTERS + CAS_COUNTERS:
            try:
                found[key] = self.client.incr(key, 0)
            except shardcache.ShardcacheError:
                found[key] = None
        return found

    def detection_bound_s(self) -> float:
        """docs/consistency.md: with fleet fencing (remap, gutter) the other processes learn of an
        outage within one refresh of its publication (plus a round trip and the prober's step)."""
        refresh = self.config.fleet_refresh_s
        return refresh + 0.25 if refresh and self.config.failover != "fail_fast" else 0.0

    def write_results(self) -> None:
        meta = {
            "config": dataclasses.asdict(self.config),
            "finals": self.finals(),
            "lock_ttl_s": LOCK_TTL_S,
            # docs/consistency.md: others learn of an outage within one refresh of its publication
            "detection_bound_s": self.detection_bound_s(),
            "ring": [m.spec for m in self.ring],
            "members": [m.node_id for m in self.members],
        }
        (self.dir / "run.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        lines = "".join(json.dumps(dataclasses.asdict(f)) + "\n" for f in self.faults)
        (self.dir / "faults.jsonl").write_text(lines, encoding="utf-8")

    def close(self) -> None:
        for proc in self.workers.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=5)
        self.client.close()
        for proxy in self.proxies:
            proxy.close()
        self.cluster.close()


def run(config: Config) -> tuple[HistoryReport, Path]:
    """Run the workload and the nemesis; return the checker's report and the run's directory."""
    run_dir = Path(config.out or tempfile.mkdtemp(prefix="shardcache-history-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    the_run = Run(config, run_dir)
    try:
        for slot in range(config.processes):
            the_run.start_worker(slot)
        the_run.nemesis()
        the_run.stop_workers()
        the_run.heal()
        time.sleep(0.2)
        the_run.write_results()
    finally:
        the_run.close()
    return check_history(load_history(run_dir)), run_dir


def parse_args(argv: Sequence[str] | None) -> tuple[Config, str | None]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--duration-s", type=float, default=20.0)
    p.add_argument("--processes", type=int, default=3)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--nemesis", default="kill,pause", help=f"comma-separated subset of {','.join(NEMESES)}")
    p.add_argument("--failover", choices=("fail_fast", "remap", "gutter"), default="fail_fast")
    p.add_argument("--stagger-s", type=float, default=2.0, help="spread of the workers' ring changes")
    p.add_argument("--think-ms", type=float, default=2.0, help="mean pause between a thread's calls")
    p.add_argument("--fleet-refresh-s", type=float, default=0.5, help="the clients' fleet_refresh_s (0: off)")
    p.add_argument("--out", help="run directory (default: a new temporary one, kept)")
    p.add_argument("--json", help="write the report as JSON to this file")
    a = p.parse_args(argv)
    chosen = tuple(n for n in a.nemesis.split(",") if n)
    unknown = [n for n in chosen if n not in NEMESES]
    if unknown or not 1 <= a.processes <= 16 or not 1 <= a.threads <= 32 or not 2 <= a.nodes <= MAX_NODES:
        p.error(f"bad arguments (unknown nemesis {unknown}?)")
    config = Config(
        seed=a.seed, duration_s=a.duration_s, processes=a.processes, threads=a.threads, nodes=a.nodes,
        nemesis=chosen, failover=a.failover, stagger_s=a.stagger_s, think_ms=a.think_ms, out=a.out,
        fleet_refresh_s=a.fleet_refresh_s or None,
    )  # fmt: skip
    return config, a.json


def summarize(paths: Sequence[str]) -> int:
    """Print one line per ``--json`` report: nemesis, policy, calls, faults, violations by rule."""
    print(
        f"{'nemesis':<58} {'failover':<9} {'ops':>7} {'faults':>6} {'miss%':>6}  "
        "violations (explained, bounded)"
    )
    for path in paths:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        cfg = data["config"]
        rate = data["read_misses"] / data["reads"] if data["reads"] else 0.0
        found = ", ".join(f"{k} {n}" for k, n in sorted(data["violation_counts"].items())) or "none"
        explained = sum(data["explained_counts"].values())
        bounded = data.get("bounded", 0)
        print(
            f"{','.join(cfg['nemesis']) or '-':<58} "
            f"{cfg['failover'] + ('' if cfg.get('fleet_refresh_s', 0.5) else '/nofleet'):<9} "
            f"{data['ops']:>7} "
            f"{len(data['faults']):>6} {rate:>6.1%}  {found} ({explained}, bounded {bounded})"
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--summary"]:
        return summarize(args[1:])
    config, json_path = parse_args(args)
    started = time.monotonic()
    report, run_dir = run(config)
    print(f"history run: {config}")
    print(f"run directory: {run_dir} ({time.monotonic() - started:.1f} s)")
    print(report.to_text())
    if json_path:
        data: dict[str, Any] = {"config": dataclasses.asdict(config), "run_dir": str(run_dir)}
        data.update(report.to_json())
        Path(json_path).write_text(json.dumps(data, indent=1), encoding="utf-8")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
