"""Fleet-wide rejoin fencing on real memcached, across real processes (docs/consistency.md).

A writer process sees a node freeze, writes its keys on stand-ins, and exits (its fence log dies
with it). A reader process never touched the node during the outage. Once the node answers again
the reader must never get a pre-outage value; without fleet fencing it gets them indefinitely.
A counter on the node keeps its count through the outage (the node is cleaned, not flushed).
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from shardcache import Client
from shardcache.testing import FaultProxy, LocalCluster

SPAWN = multiprocessing.get_context("spawn")
FAST = {
    "connect_timeout": 0.3,
    "timeout": 0.3,
    "failure_threshold": 2,
    "retry_interval_s": 0.2,
    "max_retry_interval_s": 0.5,
    "on_error": "miss",
}
REFRESH_S = 0.2
KEYS = 40


def _writer(
    specs: list[str], failover: str, gutter: list[str], fleet: bool, keys: list[str], out: Any
) -> None:
    """Another web worker: writes while the node is frozen, then goes away."""
    options: dict[str, Any] = {**FAST, "failover": failover, "fleet_refresh_s": REFRESH_S if fleet else None}
    if gutter:
        options["gutter_servers"] = gutter
    client = Client(specs, **options)
    acked = [key for key in keys if client.set(key, "new")]
    time.sleep(3 * REFRESH_S)  # its prober publishes the outage meanwhile
    out.put(acked)


def _keys_on(client: Client, node_id: str, count: int) -> list[str]:
    keys = [f"page/{i}" for i in range(20 * count) if client.node_for(f"page/{i}") == node_id]
    assert len(keys) >= count
    return keys[:count]


@pytest.mark.parametrize("failover", ["remap", "gutter"])
@pytest.mark.parametrize("fleet", [True, False], ids=["fleet", "per-process-only"])
def test_a_reader_that_never_saw_the_outage_gets_no_pre_outage_value_after_the_writer_exited(
    fresh_cluster: Callable[..., LocalCluster],
    fault_proxy: Callable[..., FaultProxy],
    failover: str,
    fleet: bool,
) -> None:
    cluster = fresh_cluster(4)
    proxies = [fault_proxy(node) for node in cluster.nodes[:3]]
    specs = [proxy.spec for proxy in proxies]
    gutter = [cluster.nodes[3].spec] if failover == "gutter" else []
    options: dict[str, Any] = {**FAST, "failover": failover, "fleet_refresh_s": REFRESH_S if fleet else None}
    if gutter:
        options["gutter_servers"] = gutter
    with Client(specs, **options) as reader:
        frozen = specs[0]
        keys = _keys_on(reader, frozen, KEYS)
        counter = keys.pop()
        for key in keys:
            assert reader.set(key, "old")
        assert reader.incr(counter, 1, initial=41) == 41
        reader.get(_keys_on(reader, specs[1], 1)[0])  # connected: its prober reads the marks
        proxies[0].blackhole()
        out = SPAWN.Queue()
        writer = SPAWN.Process(target=_writer, args=(specs, failover, gutter, fleet, keys, out))
        writer.start()
        try:
            acked = out.get(timeout=60)
        finally:
            writer.join(timeout=30)
            if writer.is_alive():
                writer.kill()
        assert writer.exitcode == 0 and len(acked) >= len(keys) - 4  # all but the calls that timed out
        proxies[0].heal()
        healed = time.monotonic()
        stale: list[float] = []
        ready_after = None
        for _ in range(400):  # about 4 s of reads after the node answers again
            values = reader.get_many(acked)
            stale += [time.monotonic() - healed for key in acked if values.get(key) == "old"]
            if ready_after is None and reader.node_states()[frozen] == "up":
                ready_after = time.monotonic() - healed
            time.sleep(0.01)
        if fleet:
            assert stale == [], f"{len(stale)} pre-outage values served, up to {max(stale):.2f} s after"
            assert ready_after is not None
            assert reader.incr(counter, 1) == 42  # cleaned, not flushed: the count survives
            values = reader.get_many(acked)
            assert all(values.get(key) in (None, "new") for key in acked)
        else:  # the defect fleet fencing fixes: the returning node serves its old values
            assert stale and max(stale) > 3.0
        print(
            f"\n{failover} fleet={fleet}: {len(acked)} keys written elsewhere by the exited writer; "
            f"{len(stale)} stale reads after return; node ready {ready_after} s after it answered"
        )


def test_marks_are_published_and_read_across_processes(
    fresh_cluster: Callable[..., LocalCluster], fault_proxy: Callable[..., FaultProxy]
) -> None:
    cluster = fresh_cluster(3)
    proxies = [fault_proxy(node) for node in cluster.nodes]
    specs = [proxy.spec for proxy in proxies]
    with Client(specs, failover="remap", fleet_refresh_s=REFRESH_S, **FAST) as other:
        key = _keys_on(other, specs[0], 1)[0]
        other.get(_keys_on(other, specs[1], 1)[0])
        proxies[0].blackhole()
        out = SPAWN.Queue()
        writer = SPAWN.Process(target=_writer, args=(specs, "remap", [], True, [key, key, key], out))
        writer.start()
        try:
            out.get(timeout=60)
        except queue.Empty:
            pytest.fail("the writer process did not finish")
        finally:
            writer.join(timeout=30)
        deadline = time.monotonic() + 5
        while other.node_states()[specs[0]] == "up" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert other.node_states()[specs[0]] != "up"  # it learnt of the outage without a call to it
        assert other.set(key, "v") and other.get(key) == "v"  # standing in, as the writer did
        proxies[0].heal()


def test_a_dropped_client_does_not_leave_its_prober_thread_running(cluster: LocalCluster) -> None:
    def probers() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name == "shardcache-prober"}

    before = probers()
    client = Client([node.spec for node in cluster.nodes], failover="remap", fleet_refresh_s=REFRESH_S)
    client.get("any")  # connected: the prober reads the outage marks from now on
    (mine,) = probers() - before
    del client
    gc.collect()
    mine.join(timeout=10)
    assert not mine.is_alive()


def test_a_forked_child_reads_the_marks_with_its_own_prober_thread(cluster: LocalCluster) -> None:
    """Prefork servers fork after the client was used: the child's prober must run in the child."""
    with Client([n.spec for n in cluster.nodes], failover="remap", fleet_refresh_s=REFRESH_S) as client:
        client.set("fork/key", "parent")  # connected: the parent's prober thread runs
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report, then leave at once
            try:
                ok = client.get("fork/key") == "parent"
                deadline = time.monotonic() + 5
                running = False
                while not running and time.monotonic() < deadline:
                    running = any(t.name == "shardcache-prober" for t in threading.enumerate())
                    time.sleep(0.02)
                os.write(write_end, b"1" if ok and running else b"0")
            finally:
                os._exit(0)
        os.close(write_end)
        answer = b""
        deadline = time.monotonic() + 15
        while not answer and time.monotonic() < deadline:
            answer = os.read(read_end, 1)
        os.close(read_end)
        os.waitpid(pid, 0)
        assert answer == b"1"


def test_a_process_started_during_an_outage_knows_of_it_before_its_first_read(
    fresh_cluster: Callable[..., LocalCluster], fault_proxy: Callable[..., FaultProxy]
) -> None:
    """The node is reachable again but nobody has cleaned it yet (the writer exited at once): a new
    worker's very first read must not be the node's pre-outage value."""
    cluster = fresh_cluster(3)
    proxies = [fault_proxy(node) for node in cluster.nodes]
    specs = [proxy.spec for proxy in proxies]
    options: dict[str, Any] = {**FAST, "failover": "remap", "fleet_refresh_s": REFRESH_S}
    with Client(specs, **options) as setup:
        keys = _keys_on(setup, specs[0], 10)
        for key in keys:
            assert setup.set(key, "old")
    proxies[0].blackhole()
    out = SPAWN.Queue()
    writer = SPAWN.Process(target=_writer, args=(specs, "remap", [], True, keys, out))
    writer.start()
    try:
        acked = out.get(timeout=60)
    finally:
        writer.join(timeout=30)
    proxies[0].heal()
    with Client(specs, **options) as newcomer:
        first = [newcomer.get(key) for key in acked]
    assert "old" not in first, first


@pytest.mark.parametrize("fleet", [True, False], ids=["fleet", "per-process-only"])
def test_scale_out_then_the_new_node_fails_serves_no_pre_move_value(
    fresh_cluster: Callable[..., LocalCluster], fault_proxy: Callable[..., FaultProxy], fleet: bool
) -> None:
    """Issue 11, item 2: the fleet grows from two nodes to three; a worker started after the change
    updates keys that moved to the new node (nothing deletes the previous owner's copy: this worker
    never had the old ring), then the new node fails. The stand-in, the next node clockwise, is
    often the keys' previous owner, still holding its pre-move value: a stand-in serves only
    copies tagged with the current outage, never that one."""
    cluster = fresh_cluster(3)
    proxies = [fault_proxy(node) for node in cluster.nodes]
    specs = [proxy.spec for proxy in proxies]
    options: dict[str, Any] = {**FAST, "failover": "remap", "fleet_refresh_s": REFRESH_S if fleet else None}
    keys = [f"book/{i}" for i in range(400)]
    with Client(specs[:2], **options) as before_change:
        assert before_change.set_many({k: "pre-move" for k in keys}) == []
        old_owner = {k: before_change.node_for(k) for k in keys}
    with Client(specs, **options) as worker:
        moved = [k for k in keys if worker.node_for(k) == specs[2]]
        exposed = [k for k in moved if worker.ring.preference_list(k, 2)[1] == old_owner[k]]
        assert len(exposed) >= 10
        assert worker.set_many({k: "post-move" for k in exposed}) == []
        proxies[2].blackhole()
        deadline = time.monotonic() + 10
        while worker.node_states()[specs[2]] == "up" and time.monotonic() < deadline:
            worker.get_many(exposed[:5])  # calls time out until the node is marked down
        assert worker.node_states()[specs[2]] != "up"
        values = worker.get_many(exposed) | {k: worker.get(k) for k in exposed[:5]}
        proxies[2].heal()
    assert "pre-move" not in values.values(), sum(v == "pre-move" for v in values.values())
