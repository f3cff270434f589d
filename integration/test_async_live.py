"""AsyncClient against real memcached: the same answers as Client, failover under remap with a
killed and a blackholed node, exact counters under 100 tasks, and a cancellation storm (10,000
gets cancelled at random points under load: no cross-talk, no connection or fd leak), under
asyncio and uvloop."""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop
from test_failover import FAST  # the same short timeouts as the sync failover tests

from shardcache import AsyncClient, Client, NodeUnavailableError
from shardcache.testing import FaultProxy, LocalCluster


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    """Run a coroutine to its end on a new loop of the given kind."""
    if request.param == "uvloop":
        return uvloop.run
    return asyncio.run


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_the_async_client_answers_as_the_sync_one(cluster: LocalCluster, run: Any) -> None:
    sync = Client(cluster.specs)

    async def scenario() -> list[Any]:
        out: list[Any] = []
        async with AsyncClient(cluster.specs) as client:
            out.append(await client.set("a", {"x": 1}, expire=60))
            out.append(await client.get("a"))
            out.append(await client.add("a", 2))
            out.append(await client.replace("a", "r"))
            out.append(await client.append("a", "+"))
            out.append(await client.prepend("a", "-"))
            out.append(await client.get("a"))
            out.append(await client.touch("a", 30))
            out.append(sorted((await client.set_many({f"m{i}": i for i in range(50)})) or []))
            out.append(await client.get_many([f"m{i}" for i in range(55)]))
            value, token = await client.gets("m1")
            out.append((value, token.node_id))
            out.append(await client.cas("m1", 11, token))
            out.append(await client.cas("m1", 12, token))
            out.append(await client.incr("n", 5, initial=3))
            out.append(await client.incr("n", 5))
            out.append(await client.decr("n", 100))
            out.append(await client.cas_update("cu", lambda v: v + 1, initial=0))
            out.append(await client.delete("m2"))
            out.append(await client.delete_many(["m3", "m4"]))
            out.append(await client.get_many(["m2", "m3", "m4", "m5"]))
            out.append(sorted(await client.version()))
            out.append(await client.get_or_set("gos", lambda: "made", expire=60))
            out.append(client.node_for("books/321"))
        return out

    def same_with_sync() -> list[Any]:
        client = sync
        out: list[Any] = [client.set("a", {"x": 1}, expire=60), client.get("a"), client.add("a", 2)]
        out += [client.replace("a", "r"), client.append("a", "+"), client.prepend("a", "-")]
        out += [client.get("a"), client.touch("a", 30)]
        out.append(sorted(client.set_many({f"m{i}": i for i in range(50)}) or []))
        out.append(client.get_many([f"m{i}" for i in range(55)]))
        value, token = client.gets("m1")
        out += [(value, token.node_id), client.cas("m1", 11, token), client.cas("m1", 12, token)]
        out += [client.incr("n", 5, initial=3), client.incr("n", 5), client.decr("n", 100)]
        out += [client.cas_update("cu", lambda v: v + 1, initial=0), client.delete("m2")]
        out += [client.delete_many(["m3", "m4"]), client.get_many(["m2", "m3", "m4", "m5"])]
        out += [sorted(client.version()), client.get_or_set("gos", lambda: "made", expire=60)]
        out.append(client.node_for("books/321"))
        return out

    got = run(scenario())
    cluster.flush_all()
    assert got == same_with_sync()
    sync.close()


async def gets(client: AsyncClient, keys: list[str]) -> list[Any]:
    """``get`` of every key, 40 tasks at a time (a 2-core CI box keeps within the 0.3 s timeout)."""
    out: list[Any] = []
    for start in range(0, len(keys), 40):
        out += await asyncio.gather(*(client.get(k) for k in keys[start : start + 40]))
    return out


def test_failover_under_remap_with_a_killed_and_a_blackholed_node(
    fresh_cluster: Callable[..., LocalCluster], fault_proxy: Callable[..., FaultProxy], run: Any
) -> None:
    cluster = fresh_cluster(4)
    proxies = [fault_proxy(node) for node in cluster.nodes]
    specs = [p.spec for p in proxies]

    async def scenario() -> None:
        async with AsyncClient(specs, failover="remap", on_error="miss", **FAST) as client:
            keys = [f"k{i}" for i in range(400)]
            assert await client.set_many({k: k for k in keys}) == []
            cluster.nodes[0].kill()
            proxies[1].blackhole()
            dead = {specs[0], specs[1]}
            for _ in range(3):  # the failures mark both nodes down; then their keys are remapped
                await gets(client, keys)
            states = client.node_states()
            assert states[specs[0]] != "up" and states[specs[1]] != "up"  # down, or being probed
            started = time.monotonic()
            got = await gets(client, keys)
            assert time.monotonic() - started < 2.0  # down nodes cost no time
            for key, value in zip(keys, got, strict=True):
                if client.node_for(key) not in dead:
                    assert value == key  # healthy keys keep hitting
                else:
                    assert value is None  # moved keys miss on their stand-in: never stale
            moved = [k for k in keys if client.node_for(k) in dead][:50]
            # with two of four nodes down, a key whose stand-in (the next node) is down too, or whose
            # journal buddy is, is not written elsewhere (as fail_fast): never two stand-ins
            failed = await client.set_many({k: f"new-{k}" for k in moved})
            written = [k for k in moved if k not in failed]
            assert written and len(written) + len(failed) == len(moved)
            assert await client.get_many(moved) == {k: f"new-{k}" for k in written}

    run(scenario())


def test_counters_are_exact_with_100_tasks(cluster: LocalCluster, run: Any) -> None:
    async def scenario() -> tuple[int | None, Any, Any]:
        async with AsyncClient(cluster.specs) as client:

            async def worker() -> None:
                for i in range(50):
                    await client.incr("hits", 1, initial=1)
                    if i % 10 == 0:  # 100-way contention on one CAS key: many conflicts each
                        await client.cas_update("cas-hits", lambda v: v + 1, initial=0, max_attempts=10_000)

            await asyncio.gather(*(worker() for _ in range(100)))
            return await client.incr("hits", 0), await client.get("cas-hits"), await client.get("hits")

    hits, cas_hits, raw = run(scenario())
    assert hits == 5000 and cas_hits == 500 and raw == 5000


def test_a_cancellation_storm_never_crosses_replies_nor_leaks(cluster: LocalCluster, run: Any) -> None:
    values = {f"storm:{i}": f"value-{i}-" + "x" * random.Random(i).randrange(10, 3000) for i in range(500)}
    fds_before = _fds()

    async def scenario() -> tuple[int, int, list[Any]]:
        rng = random.Random(12)
        wrong: list[Any] = []
        completed = 0
        # generous timeouts: the storm is about cancellation, and a loaded CI machine (two cores,
        # containers) must not time calls out and mark a healthy node down meanwhile
        async with AsyncClient(cluster.specs, max_pool_size=8, timeout=5.0, connect_timeout=5.0) as client:
            await client.set_many(values)
            keys = list(values)

            async def one(key: str) -> None:
                nonlocal completed
                got = await (client.get(key) if rng.random() < 0.8 else client.get_many([key, keys[0]]))
                if isinstance(got, dict):
                    got = got.get(key)
                completed += 1
                if got != values[key]:
                    wrong.append((key, str(got)[:40]))

            tasks: list[asyncio.Task[None]] = []
            for _ in range(100):  # 100 waves of 100 requests; a random third cancelled at random points
                wave = [asyncio.ensure_future(one(rng.choice(keys))) for _ in range(100)]
                tasks += wave
                await asyncio.sleep(rng.uniform(0, 0.002))
                for task in rng.sample(wave, 33):
                    task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            assert client.open_connections() <= 8 * len(cluster.specs)
            for _ in range(100):  # should a node have been marked down under load, it comes back
                if all(state == "up" for state in client.node_states().values()):
                    break
                await asyncio.sleep(0.1)
            for key in rng.sample(keys, 100):  # every connection still in step
                assert await client.get(key) == values[key]
            cancelled = sum(t.cancelled() for t in tasks)
        return completed, cancelled, wrong

    completed, cancelled, wrong = run(scenario())
    assert wrong == []
    assert completed > 1000 and cancelled > 1000
    assert _fds() <= fds_before + 2  # every connection closed by aclose (no fd leak)


def test_a_client_outlives_its_loop_and_a_dead_node_raises(cluster: LocalCluster) -> None:
    client = AsyncClient([*cluster.specs, "127.0.0.1:1"], failover="fail_fast", **FAST)

    alive = next(f"k{i}" for i in range(1000) if client.node_for(f"k{i}") != "127.0.0.1:1")

    async def use() -> Any:
        await client.set(alive, 1)
        value = await client.get(alive)
        await client.aclose()  # before its loop ends; the client stays usable on the next loop
        return value

    assert asyncio.run(use()) == 1
    assert uvloop.run(use()) == 1
    key = next(f"d{i}" for i in range(1000) if client.node_for(f"d{i}") == "127.0.0.1:1")

    async def dead() -> None:
        with pytest.raises(NodeUnavailableError):
            await client.get(key)
        await client.aclose()

    asyncio.run(dead())
