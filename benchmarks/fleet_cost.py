"""What fleet-wide fencing costs while every node is up: the same client with and without it.

    .venv/bin/python -m benchmarks.fleet_cost [--rounds 30] [--calls 2000] [--json FILE]

Starts 4 local memcached processes on 127.0.0.1 and times, in interleaved rounds in this one
process, three clients on the same nodes (each with its own keys):

- ``remap+fleet``: ``Client(specs, failover="remap")``, fleet fencing on (the default): its prober
  thread reads the outage marks every ``fleet_refresh_s`` (0.5 s) meanwhile;
- ``remap``: the same with ``fleet_refresh_s=None`` (per-process fencing only);
- ``fail_fast``: ``Client(specs)``, the default policy (no fleet fencing: nothing is written
  elsewhere).

Workloads: ``get`` and ``set`` of one key (cycling over 100), ``--calls`` per timed block, and
``get_many`` of 100 keys, ``--calls // 20`` per block. Each block's time is one sample; the table
shows median calls/s and the paired ratio (median over rounds of remap+fleet / other in the same
round). Issue 11's goal: within 5% (ratio >= 0.95). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import shardcache
from benchmarks._util import environment, measure_interleaved, write_json
from shardcache.testing import LocalCluster

VALUE = b"v" * 200
KEYS = 100


def _clients(specs: list[str]) -> dict[str, shardcache.Client]:
    return {
        "remap+fleet": shardcache.Client(specs, failover="remap"),
        "remap": shardcache.Client(specs, failover="remap", fleet_refresh_s=None),
        "fail_fast": shardcache.Client(specs),
    }


def _workloads(client: shardcache.Client, name: str, calls: int) -> dict[str, Any]:
    keys = [f"{name}/k{i}" for i in range(KEYS)]
    for key in keys:
        client.set(key, VALUE)

    def get() -> None:
        for i in range(calls):
            client.get(keys[i % KEYS])

    def set_() -> None:
        for i in range(calls):
            client.set(keys[i % KEYS], VALUE)

    def get_many() -> None:
        for _ in range(max(1, calls // 20)):
            client.get_many(keys)

    assert len(client.get_many(keys)) == KEYS
    return {"get": (get, calls), "set": (set_, calls), "get_many": (get_many, max(1, calls // 20))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--json")
    args = parser.parse_args()
    with LocalCluster(4, backend="process") as cluster:
        specs = [node.spec for node in cluster.nodes]
        clients = _clients(specs)
        try:
            loads = {name: _workloads(client, name, args.calls) for name, client in clients.items()}
            results: dict[str, Any] = {}
            print(f"{'workload':<10} {'client':<12} {'calls/s':>10}  ratio remap+fleet / this")
            for workload in ("get", "set", "get_many"):
                fns = {name: loads[name][workload][0] for name in clients}
                n = loads["remap+fleet"][workload][1]
                stats = measure_interleaved(fns, args.rounds)
                base = stats["remap+fleet"].samples
                results[workload] = {}
                for name, st in stats.items():
                    ratio = statistics.median(b2 / b1 for b1, b2 in zip(base, st.samples, strict=True))
                    results[workload][name] = {"calls_per_s": st.rate(n), "ratio": ratio}
                    shown = "" if name == "remap+fleet" else f"{ratio:.3f}"
                    print(f"{workload:<10} {name:<12} {st.rate(n):>10.0f}  {shown}")
        finally:
            for client in clients.values():
                client.close()
    if args.json:
        write_json(args.json, {"environment": environment(["shardcache"]), "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
