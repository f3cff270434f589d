"""The shardcache CLI against real memcached: ``stats`` and ``ping``, with every node up or one down.

The CLI runs as an operator runs it, in a subprocess (``python -m shardcache``). The subprocess
timeout is the bound on how long a command may take when a node is dead or hung; nothing here
asserts timing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

import shardcache
from shardcache.testing import LocalCluster

BOUND_S = 60  # far above what the commands need; a hang fails the test instead of stalling it


def run_cli(*argv: str, servers: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m shardcache ARGV``; ``servers`` go through SHARDCACHE_SERVERS."""
    env = {k: v for k, v in os.environ.items() if k != "SHARDCACHE_SERVERS"}
    if servers is not None:
        env["SHARDCACHE_SERVERS"] = ",".join(servers)
    return subprocess.run(
        [sys.executable, "-m", "shardcache", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=BOUND_S,
        check=False,
    )


def run_json(*argv: str, servers: list[str], expect_code: int = 0) -> Any:
    result = run_cli("--servers", ",".join(servers), "--json", *argv)
    assert result.returncode == expect_code, result.stderr
    return json.loads(result.stdout)


@pytest.mark.smoke
def test_stats_json_reports_every_node_up_with_version_and_items(
    fresh_cluster: Callable[..., LocalCluster],
) -> None:
    # New nodes: after flush_all, memcached keeps counting flushed items in curr_items for a while.
    cluster = fresh_cluster(3)
    keys = [f"books/{i}" for i in range(200)]
    with shardcache.Client(cluster.specs) as client:
        assert client.set_many({k: f"page {k}" for k in keys}) == []
        owners = Counter(client.node_for(k) for k in keys)
    doc = run_json("stats", servers=cluster.specs)
    assert list(doc["nodes"]) == cluster.specs
    assert (doc["up"], doc["down"]) == (3, 0)
    for node, spec in zip(cluster.nodes, cluster.specs, strict=True):
        row = doc["nodes"][spec]
        assert row["up"] is True
        assert row["error"] is None and row["error_type"] is None
        assert row["version"] == node.version()
        assert row["curr_items"] == owners[spec]
        assert 0 < row["bytes"] < row["limit_maxbytes"]
        assert row["curr_connections"] >= 1
        assert row["uptime"] >= 0
        assert row["evictions"] == 0
        assert row["hit_ratio"] is None  # no get yet


def test_stats_hit_ratio_follows_the_gets(cluster: LocalCluster) -> None:
    keys = [f"user:{i}" for i in range(60)]
    with shardcache.Client(cluster.specs) as client:
        client.set_many(dict.fromkeys(keys, "x"))
        before = run_json("stats", servers=cluster.specs)["nodes"]
        hits = Counter(client.node_for(k) for k in keys if client.get(k) is not None)
        misses = Counter(
            client.node_for(f"absent:{i}") for i in range(30) if client.get(f"absent:{i}") is None
        )
    after = run_json("stats", servers=cluster.specs)["nodes"]
    assert sum(hits.values()) == 60 and sum(misses.values()) == 30
    for spec in cluster.specs:
        assert after[spec]["get_hits"] - before[spec]["get_hits"] == hits[spec]
        assert after[spec]["get_misses"] - before[spec]["get_misses"] == misses[spec]
        total = after[spec]["get_hits"] + after[spec]["get_misses"]
        assert after[spec]["hit_ratio"] == pytest.approx(after[spec]["get_hits"] / total)


@pytest.mark.smoke
def test_ping_json_reports_every_node_up_with_round_trip_times(cluster: LocalCluster) -> None:
    doc = run_json("ping", "--count", "4", servers=cluster.specs)
    assert list(doc["nodes"]) == cluster.specs
    assert (doc["up"], doc["down"], doc["count"]) == (3, 0, 4)
    for node, spec in zip(cluster.nodes, cluster.specs, strict=True):
        row = doc["nodes"][spec]
        assert row["up"] is True and row["error"] is None
        assert row["version"] == node.version()
        assert len(row["samples_ms"]) == 4
        assert all(ms > 0 for ms in row["samples_ms"])
        assert min(row["samples_ms"]) <= row["rtt_ms"] <= max(row["samples_ms"])


def test_human_tables_list_every_node_up(cluster: LocalCluster) -> None:
    for command in ("stats", "ping"):
        result = run_cli(command, servers=cluster.specs)  # servers from SHARDCACHE_SERVERS
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        for spec in cluster.specs:
            line = next(line for line in result.stdout.splitlines() if spec in line)
            assert " up " in line
        assert "DOWN" not in result.stdout


def test_a_killed_node_is_down_and_the_exit_code_is_1(fresh_cluster: Callable[..., LocalCluster]) -> None:
    cluster = fresh_cluster(3)
    specs = cluster.specs
    dead = specs[1]
    cluster.nodes[1].kill()
    for command in ("stats", "ping"):
        doc = run_json("--timeout", "0.5", command, servers=specs, expect_code=1)
        assert (doc["up"], doc["down"]) == (2, 1)
        row = doc["nodes"][dead]
        assert row["up"] is False
        assert row["version"] is None
        assert dead in row["error"]
        assert row["error_type"] in ("NodeUnavailableError", "NodeTimeoutError")
        for spec in (specs[0], specs[2]):
            assert doc["nodes"][spec]["up"] is True
            assert doc["nodes"][spec]["version"]
    result = run_cli("--timeout", "0.5", "stats", servers=specs)
    assert result.returncode == 1
    line = next(line for line in result.stdout.splitlines() if dead in line and "DOWN" in line)
    assert "memcached node" in line  # the error is shown on the node's row
    for spec in (specs[0], specs[2]):
        assert " up " in next(line for line in result.stdout.splitlines() if spec in line)


def test_a_hung_node_times_out_and_is_shown_down(fresh_cluster: Callable[..., LocalCluster]) -> None:
    cluster = fresh_cluster(3)
    specs = cluster.specs
    hung = cluster.nodes[2]
    hung.pause()  # accepts connections, never answers
    try:
        for command in ("stats", "ping"):
            doc = run_json("--timeout", "0.5", command, servers=specs, expect_code=1)
            assert doc["nodes"][specs[2]]["up"] is False
            assert doc["nodes"][specs[2]]["error_type"] == "NodeTimeoutError"
            assert [doc["nodes"][s]["up"] for s in specs[:2]] == [True, True]
    finally:
        hung.unpause()
    assert run_json("ping", servers=specs)["down"] == 0  # back once it answers again


def test_rebalance_counts_then_deletes_the_copies_of_moved_keys(
    fresh_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = fresh_cluster(4)
    old, new = cluster.specs[:3], cluster.specs
    keys = [f"books/{i}" for i in range(300)]
    with shardcache.Client(old, key_prefix="app:") as client:
        assert client.set_many({k: "page" for k in keys}) == []
    with shardcache.Client(old) as other:  # another application's keys, no prefix: never touched
        assert other.set_many({f"theirs/{i}": "x" for i in range(100)}) == []
    moved = [k for k in keys if shardcache.Ring(new).node_for(k) == new[3]]
    counted = run_json("rebalance", "--key-prefix", "app:", "--dry-run", servers=new)
    assert counted["report"]["strays"] == len(moved) and counted["report"]["deleted"] == 0
    done = run_json("rebalance", "--key-prefix", "app:", servers=new)
    assert done["report"]["deleted"] == len(moved) and done["report"]["failed_nodes"] == []
    assert all(row["done"] for row in done["nodes"].values())
    assert run_json("rebalance", "--key-prefix", "app:", servers=new)["report"]["strays"] == 0
    with shardcache.Client(old) as other:
        assert len(other.get_many([f"theirs/{i}" for i in range(100)])) == 100
