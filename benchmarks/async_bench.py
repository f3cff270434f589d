"""Async clients side by side: shardcache.AsyncClient against emcache and aiomcache.

    .venv/bin/python -m benchmarks.async_bench [--rounds 5] [--tasks 100] [--ops 100]

Starts 4 local memcached processes on 127.0.0.1 and, in one process and one event loop per
round, times every client in interleaved rounds (the order rotated each round): ``--tasks``
concurrent tasks each doing ``--ops`` calls; values are 200-byte ``bytes``. Reports the median
operations per second over the rounds, and each client's ratio to emcache.

- ``shardcache`` / ``shardcache (uvloop)``: ``AsyncClient(specs)`` (default pool: 16 per node);
- ``emcache``: ``emcache.create_client`` over the 4 nodes (rendezvous hashing; its default pool
  of 2 connections per node, and with ``max_connections=16``);
- ``aiomcache (1 node)``: aiomcache's only mode, one server (pool of 16).

Workloads: ``get`` (cycling over 100 keys, all hits) and ``get_many`` of 100 keys (emcache's and
shardcache's; aiomcache's ``multi_get`` on its one node). No goal is asserted here: the issue's
goals are in the closing note with these figures.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiomcache
import emcache
import uvloop

from benchmarks._util import environment, print_header, print_table
from shardcache import AsyncClient
from shardcache.testing import LocalCluster

VALUE = b"v" * 200
KEYS = [f"bench:{i}" for i in range(100)]
BKEYS = [k.encode() for k in KEYS]

Op = Callable[[int], Awaitable[Any]]


async def _shardcache(specs: list[str]) -> tuple[dict[str, Op], Callable[[], Awaitable[None]]]:
    client = AsyncClient(specs)
    await client.set_many(dict.fromkeys(KEYS, VALUE))
    assert await client.get(KEYS[0]) == VALUE
    ops: dict[str, Op] = {
        "get": lambda i: client.get(KEYS[i % 100]),
        "get_many": lambda i: client.get_many(KEYS),
    }
    return ops, client.aclose


async def _emcache(
    specs: list[str], max_connections: int
) -> tuple[dict[str, Op], Callable[[], Awaitable[None]]]:
    nodes = [emcache.MemcachedHostAddress(s.split(":")[0], int(s.split(":")[1])) for s in specs]
    client = await emcache.create_client(nodes, max_connections=max_connections)
    for key in BKEYS:
        await client.set(key, VALUE)
    assert (await client.get(BKEYS[0])).value == VALUE
    ops: dict[str, Op] = {
        "get": lambda i: client.get(BKEYS[i % 100]),
        "get_many": lambda i: client.get_many(BKEYS),
    }
    return ops, client.close


async def _aiomcache(specs: list[str]) -> tuple[dict[str, Op], Callable[[], Awaitable[None]]]:
    host, port = specs[0].split(":")
    client = aiomcache.Client(host, int(port), pool_size=16)
    for key in BKEYS:
        await client.set(key, VALUE)
    ops: dict[str, Op] = {
        "get": lambda i: client.get(BKEYS[i % 100]),
        "get_many": lambda i: client.multi_get(*BKEYS),
    }
    return ops, client.close


async def _time(op: Op, tasks: int, ops: int) -> float:
    async def worker(w: int) -> None:
        for i in range(ops):
            await op(w + i)

    gc.collect()
    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(tasks)))
    return tasks * ops / (time.perf_counter() - started)


async def _round(name: str, specs: list[str], workload: str, tasks: int, ops: int) -> float:
    if name.startswith("shardcache"):
        made = await _shardcache(specs)
    elif name == "emcache":
        made = await _emcache(specs, 2)
    elif name == "emcache (16 conns)":
        made = await _emcache(specs, 16)
    else:
        made = await _aiomcache(specs)
    table, close = made
    try:
        await _time(table[workload], tasks, max(ops // 10, 1))  # warm-up: connections made
        return await _time(table[workload], tasks, ops)
    finally:
        await close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--ops", type=int, default=100)
    args = parser.parse_args()
    names = ["shardcache", "shardcache (uvloop)", "emcache", "emcache (16 conns)", "aiomcache (1 node)"]
    print_header("async clients, 4 memcached nodes", environment(["emcache", "aiomcache", "uvloop"]))
    rows = []
    with LocalCluster(4, backend="process") as cluster:
        specs = cluster.specs
        for workload in ("get", "get_many"):
            rates: dict[str, list[float]] = {n: [] for n in names}
            ops = args.ops if workload == "get" else max(args.ops // 10, 1)
            for r in range(args.rounds):
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    run = uvloop.run if "uvloop" in name else asyncio.run
                    rates[name].append(run(_round(name, specs, workload, args.tasks, ops)))
            base = statistics.median(rates["emcache"])
            for name in names:
                median = statistics.median(rates[name])
                rows.append([workload, name, f"{median:,.0f}", f"{median / base:.2f}x"])
    print_table(
        f"median calls/s over {args.rounds} rounds, {args.tasks} concurrent tasks",
        ["workload", "client", "calls/s", "vs emcache"],
        rows,
    )


if __name__ == "__main__":
    main()
