"""Scale-out 4 -> 5 and scale-in 5 -> 4 under load, with ``Client.rebalance`` (issue 11 goals).

    .venv/bin/python -m benchmarks.rebalance_bench [--keys 100000] [--read-s 3] [--keys-per-s N]
        [--backend process|auto|docker] [--json FILE]

Real memcached (``LocalCluster``). ``--keys`` keys (200-byte values) are stored on 4 nodes; reader
threads (``--readers``, default 2) run ``get`` on random keys all along and record each call's
latency and whether it hit. Phases, each ``--read-s`` seconds of reading unless noted:

1. ``before``: the 4-node ring;
2. ``scale-out``: a 5th node joins with ``warmup_s`` (misses on moved keys are copied);
3. ``rebalance-out``: ``client.rebalance()`` runs while the readers read (as long as it takes):
   its rate (strays deleted per second) and the readers' p99 while it runs; then once more (a
   metadump can miss items that move between LRU segments while it crawls);
4. the moved keys are updated (``v2``) through the client; then ``scale-in``: the 5th node leaves
   with ``drain_s``; then ``rebalance-in``;
5. a final read of every moved key: a ``v1`` value would be a stale read (pre-scale-out value).

Also counted after each rebalance, straight from the servers (pymemcache): copies of keys held
by a node that does not own them (0 expected). Goals (issue 11): hit ratio after each change
>= 99% of before; 0 stale reads; the rebalance rate and its effect on p99 are reported. Nothing
asserts.
"""

from __future__ import annotations

import argparse
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from pymemcache.client.base import Client as PymemcacheClient

from benchmarks._util import environment, goal, print_header, print_table, write_json
from shardcache import Client, Ring
from shardcache.testing import LocalCluster

WINDOW_S = 600.0  # warm-up and drain windows outlast the run


@dataclass
class Reader:
    client: Client
    keys: list[str]
    stop: threading.Event
    samples: list[tuple[float, float, bool]] = field(default_factory=list)  # (start, seconds, hit)

    def run(self) -> None:
        rng = random.Random(id(self))
        for _ in range(10_000_000):  # bounded; stop() ends it long before
            if self.stop.is_set():
                return
            key = rng.choice(self.keys)
            started = time.perf_counter()
            hit = self.client.get(key) is not None
            self.samples.append((started, time.perf_counter() - started, hit))


def window(readers: list[Reader], start: float, end: float) -> dict[str, Any]:
    rows = [s for r in readers for s in r.samples if start <= s[0] < end]
    if not rows:
        return {"gets": 0, "hit_ratio": None, "p50_ms": None, "p99_ms": None}
    latencies = sorted(s[1] for s in rows)
    return {
        "gets": len(rows),
        "hit_ratio": sum(s[2] for s in rows) / len(rows),
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
    }


def stray_copies(specs: list[str], keys: list[str]) -> int:
    """Keys held by a node that the ring ``specs`` does not map them to (read from the servers)."""
    ring = Ring(specs)
    count = 0
    for spec in specs:
        host, port = spec.rsplit(":", 1)
        direct = PymemcacheClient((host, int(port)), timeout=10, connect_timeout=10)
        try:
            for start in range(0, len(keys), 1000):
                held = direct.get_many([k.encode() for k in keys[start : start + 1000]])
                count += sum(1 for k in held if ring.node_for(k.decode()) != spec)
        finally:
            direct.close()
    return count


def run(args: argparse.Namespace) -> dict[str, Any]:
    phases: dict[str, dict[str, Any]] = {}
    with LocalCluster(5, backend=args.backend) as cluster:
        old, full = cluster.specs[:4], cluster.specs
        keys = [f"rb/{i}" for i in range(args.keys)]
        opts: dict[str, Any] = {"timeout": 5.0, "connect_timeout": 5.0}
        with Client(old, **opts) as client:
            for start in range(0, len(keys), 1000):
                assert client.set_many({k: "v1" + "x" * 198 for k in keys[start : start + 1000]}) == []
            stop = threading.Event()
            readers = [Reader(Client(old, **opts), keys, stop) for _ in range(args.readers)]
            threads = [threading.Thread(target=r.run, daemon=True) for r in readers]
            for t in threads:
                t.start()

            def read_for(name: str, seconds: float) -> None:
                start = time.perf_counter()
                time.sleep(seconds)
                phases[name] = window(readers, start, time.perf_counter())

            def rebalance(name: str, specs: list[str]) -> None:
                start = time.perf_counter()
                report = client.rebalance(keys_per_s=args.keys_per_s)
                end = time.perf_counter()
                phases[name] = window(readers, start, end)
                phases[name].update(
                    strays=report.strays, deleted=report.deleted, copied=report.copied,
                    seconds=round(report.seconds, 3), keys_per_s=round(report.deleted / report.seconds)
                    if report.seconds else None, stray_copies_after=stray_copies(specs, keys),
                )  # fmt: skip

            try:
                read_for("before", args.read_s)
                for c in [client, *(r.client for r in readers)]:
                    c.add_node(full[4], warmup_s=WINDOW_S)
                read_for("scale-out", args.read_s)
                rebalance("rebalance-out", full)
                rebalance("rebalance-out again", full)  # what the first listing missed
                moved = [k for k in keys if client.node_for(k) == full[4]]
                for start in range(0, len(moved), 1000):
                    assert client.set_many({k: "v2" + "x" * 198 for k in moved[start : start + 1000]}) == []
                for c in [client, *(r.client for r in readers)]:
                    c.remove_node(full[4], drain_s=WINDOW_S)
                read_for("scale-in", args.read_s)
                rebalance("rebalance-in", old)
            finally:
                stop.set()
                for t in threads:
                    t.join(timeout=30)
                for r in readers:
                    r.client.close()
            values = client.get_many(moved)
            phases["final"] = {
                "moved": len(moved),
                "stale_reads": sum(1 for v in values.values() if v.startswith("v1")),
                "hits": len(values),
            }
    return phases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--readers", type=int, default=2)
    parser.add_argument("--read-s", type=float, default=3.0)
    parser.add_argument("--keys-per-s", type=float, default=None)
    parser.add_argument("--backend", default="process", choices=("auto", "process", "docker"))
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    env = environment(["pymemcache"])
    print_header("rebalance_bench: scale-out and scale-in under load, with rebalance", env)
    phases = run(args)

    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    rows = [
        [name, p["gets"], fmt(p["hit_ratio"], ".4f"), fmt(p["p50_ms"], ".3f"), fmt(p["p99_ms"], ".3f"),
         fmt(p.get("strays"), "d"), fmt(p.get("keys_per_s"), ","), fmt(p.get("stray_copies_after"), "d")]
        for name, p in phases.items() if name != "final"
    ]  # fmt: skip
    headers = ["phase", "gets", "hit ratio", "p50 ms", "p99 ms", "strays", "deleted/s", "stray copies after"]
    print_table(f"{args.keys} keys, {args.readers} reader threads", headers, rows)
    final = phases["final"]
    before = phases["before"]["hit_ratio"] or 0.0
    for name in ("scale-out", "scale-in"):
        ratio = phases[name]["hit_ratio"] or 0.0
        verdict = goal(ratio >= 0.99 * before)
        print(f"hit ratio {name}: {ratio:.4f} vs before {before:.4f}: {verdict} (>= 99% of before)")
    stale, moved = final["stale_reads"], final["moved"]
    print(f"stale reads of moved keys after scale-in: {stale} of {moved}: {goal(stale == 0)}")
    if args.json:
        write_json(args.json, {"environment": env, "args": vars(args), "phases": phases})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
