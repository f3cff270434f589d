"""Scaling out live: a 5th memcached joins 4 while the cache is in use, with warm-up, then leaves.

    python -m examples.scaling_demo        # starts its own 4-node LocalCluster, stops it at the end

``demo(cluster)`` is what ``make demo`` calls with its running 4-node cluster. It starts one extra
server through the same backend (container or process), adds it to a client's ring with
``warmup_s``, counts how many keys moved against 1/(N+1), shows the hit ratio holding on the next
read passes, removes the node again with ``drain_s``, and stops the server it started. Every figure
printed is measured on the servers at that moment.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

import shardcache
from shardcache.testing import ContainerNode, LocalCluster, MemcachedNode, ProcessNode, ServerSetupError

KEYS = 2_000
WINDOW_S = 60.0  # longer than the demo: the warm-up and drain windows stay open throughout


def page(key: str) -> str:
    return f"<h1>{key}</h1>"


def read_pass(client: shardcache.Client, keys: list[str]) -> int:
    """Read every key with ``get``; the number of hits (a page for another key would stop the demo)."""
    hits = 0
    for key in keys:
        value = client.get(key)
        if value is not None:
            if value != page(key):
                raise AssertionError(f"{key!r} returned {value!r}")
            hits += 1
    return hits


def held_on(node_id: str, keys: Iterable[str]) -> int:
    """How many of ``keys`` the server ``node_id`` holds, asked of that server alone."""
    with shardcache.Client([node_id], timeout=5.0) as probe:
        return len(probe.get_many(list(keys)))


def ratio(hits: int, total: int) -> str:
    return f"{hits:,}/{total:,} hits ({hits / total:.1%})"


def extra_node(cluster: LocalCluster) -> MemcachedNode:
    """A new server through the cluster's backend; the caller stops it."""
    if cluster.backend == "docker":
        return ContainerNode(image=cluster.image, memcached_args=cluster.memcached_args)
    return ProcessNode(memcached_args=cluster.memcached_args)


def demo(cluster: LocalCluster) -> None:
    specs = list(cluster.specs)
    n = len(specs)
    keys = [f"scaling/books/{i}" for i in range(KEYS)]
    cold_keys = [f"scaling/cold/{i}" for i in range(KEYS)]
    print(f"  a client over {n} nodes: {', '.join(specs)}")
    with shardcache.Client(specs, timeout=5.0) as client, extra_node(cluster) as newcomer:
        new = newcomer.spec
        client.set_many({key: page(key) for key in keys})
        print(f"  cached {KEYS:,} pages; read pass: {ratio(read_pass(client, keys), KEYS)}")
        print(f"  started one more memcached ({cluster.backend}) at {new}")

        client.add_node(new, warmup_s=WINDOW_S)
        moved = [key for key in keys if client.node_for(key) == new]
        print(
            f"  add_node({new!r}, warmup_s={WINDOW_S:g}): {len(moved):,} of {KEYS:,} keys "
            f"({len(moved) / KEYS:.1%}) move to it; 1/(N+1) = {1 / (n + 1):.1%}"
        )
        held = held_on(new, moved)
        hits = read_pass(client, keys)
        print(
            f"  read pass 1: {ratio(hits, KEYS)}; the new node held {held:,} of the moved keys, "
            f"now {held_on(new, moved):,}"
        )
        print("    (each was read from its previous owner on its first miss and copied over)")
        before = int(client.stats()[new][b"get_hits"])
        hits = read_pass(client, keys)
        served = int(client.stats()[new][b"get_hits"]) - before
        print(f"  read pass 2: {ratio(hits, KEYS)}; {served:,} served by the new node itself")

        with shardcache.Client(specs, timeout=5.0) as cold:  # the same change, without warm-up
            cold.set_many({key: page(key) for key in cold_keys})
            cold.add_node(new)
            hits = read_pass(cold, cold_keys)
        print(f"  the same change without warm-up, on another client: read pass 1: {ratio(hits, KEYS)}")

        rewritten = moved[:100]
        for key in rewritten:
            client.set(key, page(key))
        ring = shardcache.Ring(specs)
        owners = {key: ring.node_for(key) for key in rewritten}
        left = sum(held_on(owner, [key]) for key, owner in owners.items())
        print(f"  rewrote {len(rewritten)} moved pages: on the new node; {left} old copies left elsewhere")
        client.remove_node(new, drain_s=WINDOW_S)
        hits = read_pass(client, keys)
        back = sum(held_on(owner, [key]) for key, owner in owners.items())
        print(f"  remove_node({new!r}, drain_s={WINDOW_S:g}): read pass 3: {ratio(hits, KEYS)}")
        print(f"    ({back} rewritten pages were read from the leaving node and copied to their owners)")
        client.delete_many(keys + cold_keys)  # the client is back on the cluster's nodes: tidy up
    print(f"  stopped the extra node; the cluster has its {len(cluster.specs)} nodes")


def main() -> int:
    try:
        cluster = LocalCluster(4, backend="auto")
    except ServerSetupError as exc:
        print(f"scaling demo: could not start memcached: {exc}", file=sys.stderr)
        return 1
    with cluster:
        print(f"== scaling out and in at runtime ({cluster.backend}) " + "=" * 30)
        try:
            demo(cluster)
        except ServerSetupError as exc:
            print(f"scaling demo: could not start the extra memcached: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
