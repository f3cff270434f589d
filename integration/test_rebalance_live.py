"""Rebalance on real memcached (issue 11, items 2 and 3): ``lru_crawler metadump`` lists every
node's keys (several slab classes, URL-encoded keys), the copies of moved keys are deleted on their
previous owners, and neither a failover to that previous owner (remap) nor undoing the change
brings a pre-scale-out value back."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from pymemcache.client.base import Client as PymemcacheClient

from shardcache import Client
from shardcache.testing import FaultProxy, LocalCluster


def direct_get(spec: str, keys: Iterable[str]) -> dict[str, bytes]:
    """What the server ``spec`` itself holds for ``keys`` (pymemcache, straight to the server)."""
    host, port = spec.rsplit(":", 1)
    direct = PymemcacheClient((host, int(port)), timeout=5, connect_timeout=5)
    try:
        return {k.decode(): v for k, v in direct.get_many([k.encode() for k in keys]).items()}
    finally:
        direct.close()


def test_rebalance_deletes_moved_copies_so_scale_in_and_remap_serve_no_old_value(
    fresh_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = fresh_cluster(4)
    specs, added = cluster.specs[:3], cluster.specs[3]
    # keys that memcached's metadump URL-encodes, and values in several slab classes
    keys = [f"re/b%al/{i}:x" for i in range(600)]
    sizes = {key: 10 + (i % 6) * 700 for i, key in enumerate(keys)}
    with Client(specs, timeout=5.0, connect_timeout=5.0, failover="remap") as client:
        assert client.set_many({key: "old-" + "x" * sizes[key] for key in keys}) == []
        before = {key: client.node_for(key) for key in keys}
        client.add_node(added, warmup_s=0.2)
        time.sleep(0.3)  # the warm-up window is over: moved keys miss on their new owner
        moved = [key for key in keys if client.node_for(key) == added]
        assert len(moved) > 60
        for key in moved:
            assert client.set(key, "new")  # on the new owner only: the window is closed

        report = client.rebalance(batch=50)
        assert report.failed_nodes == ()
        assert report.nodes == 4 and report.scanned == len(keys) + len(moved)  # the old copies too
        assert report.strays == report.deleted == len(moved)
        assert report.copied == 0 and report.changed == 0 and report.skipped == 0
        for spec in specs:  # the previous owners hold none of the moved keys any more
            theirs = [key for key in moved if before[key] == spec]
            assert direct_get(spec, theirs) == {}
        assert client.rebalance().strays == 0  # nothing left to do

    # item 2: the new owner freezes; remap's stand-in for its keys is often their previous owner
    with Client(cluster.specs, timeout=0.5, connect_timeout=0.5, failover="remap", on_error="miss") as client:
        cluster.nodes[3].pause()
        try:
            for key in moved[:10]:  # time out until the node is marked down
                client.get(key)
            assert client.node_states()[added] == "down"
            served = {key: client.get(key) for key in moved}  # now from the stand-ins
        finally:
            cluster.nodes[3].unpause()
        assert all(value is None for value in served.values()), served

    with Client(cluster.specs, timeout=5.0, connect_timeout=5.0) as client:
        # item 3: the change is undone; the keys go back to their previous owners
        client.remove_node(added)
        served = {key: client.get(key) for key in moved}
        assert all(value is None for value in served.values()), served


def test_rebalance_has_a_timeout_of_its_own_for_slow_listings(
    fresh_cluster: Callable[..., LocalCluster], fault_proxy: Callable[..., FaultProxy]
) -> None:
    # A listing (one metadump per slab class) can take far longer than a get: the client's
    # timeout would fail it (and count against the node's health); rebalance uses timeout_s.
    cluster = fresh_cluster(2)
    proxy = fault_proxy(cluster.nodes[0])
    specs = [proxy.spec, cluster.specs[1]]
    with Client(specs, timeout=0.2, connect_timeout=5.0, failure_threshold=100) as client:
        assert client.set_many({f"t/{i}": "v" for i in range(200)}) == []
        proxy.set_latency(0.3)  # every chunk each way: a round trip takes 0.6 s, over the timeout
        report = client.rebalance(timeout_s=30.0)
        assert report.failed_nodes == () and report.nodes == 2
        assert client.node_states()[proxy.spec] == "up"
