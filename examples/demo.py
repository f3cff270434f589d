"""``make demo``: a local cluster of real memcached nodes and a walk through the seed's scenarios.

Starts memcached containers when a Docker engine answers (and the ``memcached:1.6`` image exists),
otherwise local memcached processes; stops them at the end.
"""

from __future__ import annotations

import importlib
import sys
from collections import Counter

import shardcache
from examples.books import book_page, make_database, timed
from shardcache.testing import LocalCluster, ServerSetupError

SECTIONS = [
    ("scaling out: a node added live, with warm-up", "examples.scaling_demo"),
    ("failover: a node frozen, then killed, under load", "examples.failover_demo"),
    ("the hit counter: naive get/set, incr, cas_update", "examples.hit_counter"),
    ("the seed's Flask app: @cache.cached pages, invalidated on update", "examples.flask_demo"),
]


def section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 74 - len(title)))


def main() -> int:
    try:
        cluster = LocalCluster(4, backend="auto")
    except ServerSetupError as exc:
        print(f"make demo: could not start memcached: {exc}", file=sys.stderr)
        print("Install it with tools/setup-memcached.sh (as root) or `apt-get install memcached`.")
        return 1
    with cluster, shardcache.Client(cluster.specs) as cache:
        section(f"a cluster of {len(cluster.specs)} memcached nodes ({cluster.backend})")
        for spec, version in cache.version().items():
            print(f"  {spec}  memcached {version.decode()}")

        section("GET /books/321: a miss renders the page, the next request is a hit")
        db = make_database()
        for attempt in range(1, 4):
            (page, hit), ms = timed(lambda: book_page(cache, db, 321))
            print(f"  request {attempt}: {'HIT ' if hit else 'MISS'} {ms:7.2f} ms  ({len(page)} bytes)")
        print(f"  'books/321' lives on node {cache.node_for('books/321')}")

        section("which node owns which key (the ring decides; every client agrees)")
        for key in ("books/321", "books/322", "books/1", "nearby/SW1A/5", "hit_count"):
            print(f"  {key:<16} -> {cache.node_for(key)}")

        section("1,000 book pages spread over the nodes")
        pages = {f"books/{i}": f"<h1>Book number {i}</h1>" for i in range(1, 1001)}
        (failed, ms) = timed(lambda: cache.set_many(pages, expire=300))
        print(f"  set_many of 1,000 pages: {ms:.1f} ms, {len(failed)} failed")
        (found, ms) = timed(lambda: cache.get_many(list(pages)))
        print(f"  get_many of 1,000 pages: {ms:.1f} ms, {len(found)} hits (one round trip to all nodes)")
        spread = Counter(cache.node_for(k) for k in pages)
        items = {node: int(s[b"curr_items"]) for node, s in cache.stats().items()}
        for node in cache.nodes:
            bar = "#" * (spread[node] // 10)
            print(f"  {node:<22} {spread[node]:4d} keys (server reports {items[node]:4d} items) {bar}")

        section("bad keys never reach a server")
        try:
            cache.set("books/321\r\nflush_all", "x")
        except shardcache.KeyValidationError as exc:
            print(f"  refused: {exc}")
        print(f"  'books/321' still cached: {cache.get('books/321') is not None}")
        cache.flush_all()

        for title, module in SECTIONS:
            section(title)
            importlib.import_module(module).demo(cluster)
    print("\nmake demo: done; the cluster is stopped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
