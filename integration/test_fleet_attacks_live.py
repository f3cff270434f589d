"""Adversarial review of fleet-wide rejoin fencing on real memcached and real processes.

Run: SHARDCACHE_TEST_BACKEND=process .venv/bin/python -m pytest integration/test_fleet_attacks_live.py -q
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from test_fleet_live import FAST, REFRESH_S

from shardcache import Client
from shardcache.testing import FaultProxy, LocalCluster

SPAWN = multiprocessing.get_context("spawn")


def _writer(specs: list[str], keys: list[str], out: Any) -> None:
    client = Client(specs, failover="remap", fleet_refresh_s=REFRESH_S, **FAST)
    acked = [key for key in keys if client.set(key, "new")]
    time.sleep(3 * REFRESH_S)
    out.put(acked)


def _keys_on(client: Client, node_id: str, count: int) -> list[str]:
    keys = [f"page/{i}" for i in range(40 * count) if client.node_for(f"page/{i}") == node_id]
    assert len(keys) >= count
    return keys[:count]


def test_rebalance_during_an_outage_brings_pre_outage_values_back(
    fresh_cluster: Callable[..., LocalCluster], fault_proxy: Callable[..., FaultProxy]
) -> None:
    """An operator runs client.rebalance() (as docs/consistency.md asks after every ring change)
    while a node is frozen. Without a key_prefix it deletes the fleet's journals (and marks) as
    strays; the node returns and serves the values it held before the outage."""
    cluster = fresh_cluster(4)
    proxies = [fault_proxy(node) for node in cluster.nodes]
    specs = [proxy.spec for proxy in proxies]
    with Client(specs, failover="remap", fleet_refresh_s=REFRESH_S, **FAST) as reader:
        frozen = specs[0]
        keys = _keys_on(reader, frozen, 60)
        for key in keys:
            assert reader.set(key, "old")
        reader.get(_keys_on(reader, specs[1], 1)[0])
        proxies[0].blackhole()
        out = SPAWN.Queue()
        writer = SPAWN.Process(target=_writer, args=(specs, keys, out))
        writer.start()
        try:
            acked = out.get(timeout=60)
        finally:
            writer.join(timeout=30)
        assert len(acked) >= len(keys) - 4
        deadline = time.monotonic() + 5
        while reader.node_states()[frozen] == "up" and time.monotonic() < deadline:
            time.sleep(0.05)
        report = reader.rebalance()
        print(f"\nrebalance: {report}")
        proxies[0].heal()
        healed = time.monotonic()
        stale, keys_stale, last = 0, set(), 0.0
        for _ in range(300):
            values = reader.get_many(acked)
            for key in acked:
                if values.get(key) == "old":
                    stale += 1
                    keys_stale.add(key)
                    last = time.monotonic() - healed
            time.sleep(0.01)
        assert stale == 0, (
            f"{stale} pre-outage values served ({len(keys_stale)} of {len(acked)} keys), still "
            f"{last:.1f} s after the node returned; rebalance: {report}"
        )


def test_the_hot_path_sends_nothing_extra_while_every_node_is_up(cluster: LocalCluster) -> None:
    """get/set with all nodes up: exactly one request each; the mark reads are the prober's."""
    specs = [node.spec for node in cluster.nodes]

    def totals() -> dict[str, int]:
        with Client(specs) as admin:
            stats = admin.stats()
        return {
            name: sum(int(s[name.encode()]) for s in stats.values())
            for name in ("cmd_set", "get_hits", "cmd_get", "cmd_touch", "delete_misses", "delete_hits")
        }

    n = 2000
    with Client(specs, failover="remap", fleet_refresh_s=REFRESH_S) as client:
        for i in range(50):
            client.set(f"warm{i}", i)
        before = totals()
        started = time.monotonic()
        for i in range(n):
            assert client.set(f"hot{i % 50}", i)
            assert client.get(f"hot{i % 50}") == i
        elapsed = time.monotonic() - started
        after = totals()
    delta = {k: after[k] - before[k] for k in after}
    budget = len(specs) * 3 * (elapsed / REFRESH_S + 3)  # the prober's mark reads, one key per node
    assert delta["cmd_set"] == n, delta
    assert delta["get_hits"] == n, delta
    assert delta["cmd_get"] - n <= budget, (delta, budget)
    assert delta["delete_hits"] + delta["delete_misses"] == 0, delta


FORK = multiprocessing.get_context("fork")


def _late_reader(client: Client, go: Any, out: Any) -> None:
    """Reads the node's keys only after it answers again (never touched it during the outage);
    only the keys whose stand-in write was acknowledged count."""
    keys, healed = go.get(timeout=120)
    old, last = 0, 0.0
    for _ in range(300):
        values = client.get_many(keys)
        for key in keys:
            if values.get(key) == "old":
                old += 1
                last = time.monotonic() - healed
        time.sleep(0.01)
    probers = sum(t.name == "shardcache-prober" and t.is_alive() for t in threading.enumerate())
    out.put((old, last, probers))


@pytest.mark.parametrize("how", ["forked-child", "closed-then-reused"])
def test_a_client_used_after_fork_or_close_still_reads_the_fleets_marks(
    fresh_cluster: Callable[..., LocalCluster], fault_proxy: Callable[..., FaultProxy], how: str
) -> None:
    """The prober (and so the mark refresh) is started from NodePool's on_connect, which fires once
    per pool, ever. A client used before fork() (gunicorn --preload warming its cache) or after
    close() never reads the marks again: it reads a returning node's pre-outage values while the
    fleet holds it out of use (RETURNING), and a node only another process saw fail, directly."""
    cluster = fresh_cluster(3)
    proxies = [fault_proxy(node) for node in cluster.nodes]
    specs = [proxy.spec for proxy in proxies]
    client = Client(specs, failover="remap", fleet_refresh_s=REFRESH_S, **FAST)
    frozen = specs[0]
    keys = _keys_on(client, frozen, 30)
    for key in keys:
        assert client.set(key, "old")  # the client is used: its pools' on_connect has fired
    go = FORK.Queue()
    out = FORK.Queue()
    child = None
    if how == "forked-child":
        child = FORK.Process(target=_late_reader, args=(client, go, out))
        child.start()
        client.close()  # the parent is the master: it no longer serves requests
    else:
        client.close()
        client.get(_keys_on(client, specs[1], 1)[0])  # reused: reconnects
        thread = threading.Thread(target=_late_reader, args=(client, go, out), daemon=True)
        thread.start()
    proxies[0].blackhole()
    q = SPAWN.Queue()
    writer = SPAWN.Process(target=_writer, args=(specs, keys, q))
    writer.start()
    acked = q.get(timeout=60)
    writer.join(timeout=30)
    assert len(acked) >= len(keys) - 4
    proxies[0].heal()
    go.put((acked, time.monotonic()))
    old, last, probers = out.get(timeout=60)
    if child is not None:
        child.join(timeout=30)
    client.close()
    assert old == 0, (
        f"{old} pre-outage values read, until {last:.2f} s after the node answered; probers: {probers}"
    )
