"""Requests/s of a Django view doing 20 cache lookups per request: ShardCache vs PyMemcacheCache.

    .venv/bin/python -m benchmarks.django_bench                 # 4 nodes, +0.5 ms each way
    .venv/bin/python -m benchmarks.django_bench --delay-ms 0    # plain loopback
    .venv/bin/python -m benchmarks.django_bench --quick --json django.json

The view is the example project's ``/shelf/`` (examples/django_project/views.py): a page of 20 book
fragments, all cached (every request is a full hit after the warm-up), fetched either with one
``cache.get_many`` of 20 keys (``mode=many``) or with 20 ``cache.get`` calls (``mode=each``).
Each request goes through Django's WSGI handler, so ``request_finished`` fires after it as in
production (and PyMemcacheCache closes its connections there; ShardCache keeps them).

Both backends run in the same process on the same 4 local memcached nodes, each behind a delay
relay adding ``--delay-ms`` in each direction (benchmarks/delayrelay.c through client_bench's
``delay_relay``; ``shardcache.testing.FaultProxy.set_latency`` if that relay cannot be built). Rounds
are interleaved across the configurations; each cell is the median over rounds (``±`` is half the
min-max range). Nothing is asserted: see the ratio column.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import django
from django.conf import settings
from django.core.cache import caches
from django.core.handlers.wsgi import WSGIHandler

from benchmarks._util import Stats, environment, measure_interleaved, print_header, print_table, write_json
from shardcache.testing import FaultProxy, LocalCluster

SHELF = 20
STARTS = tuple(range(1, 401, 20))  # 20 shelves of 20 books: 400 fragments per backend
# CACHES alias -> (label, BACKEND)
BACKENDS = {
    "default": ("shardcache", "shardcache.contrib.django.ShardCache"),
    "pymemcache": ("pymemcache", "django.core.cache.backends.memcached.PyMemcacheCache"),
}


@contextlib.contextmanager
def delayed(ports: Sequence[int], delay_s: float) -> Iterator[tuple[list[str], str]]:
    """Node specs that reach ``ports`` with ``delay_s`` added each way, and what adds it."""
    if delay_s <= 0:
        yield [f"127.0.0.1:{port}" for port in ports], "none (loopback)"
        return
    try:
        delay_relay = importlib.import_module("benchmarks.client_bench").delay_relay
        with delay_relay(ports, delay_s) as relay:
            yield [f"{host}:{port}" for host, port in relay.addresses], "delayrelay (benchmarks/delayrelay.c)"
        return
    except (ImportError, AttributeError) as exc:
        reason = f"benchmarks.client_bench unavailable ({exc})"
    except RuntimeError as exc:  # the relay could not be built or started
        reason = str(exc).splitlines()[0]
    print(f"note: {reason}; using shardcache.testing.FaultProxy", file=sys.stderr)
    with contextlib.ExitStack() as stack:
        proxies = [stack.enter_context(FaultProxy("127.0.0.1", port)) for port in ports]
        for proxy in proxies:
            proxy.set_latency(delay_s)
        yield [proxy.spec for proxy in proxies], "shardcache.testing.FaultProxy"


def configure_django(servers: Sequence[str]) -> None:
    options = {"timeout": 5.0, "connect_timeout": 5.0}
    settings.configure(
        SECRET_KEY="benchmark",
        DEBUG=False,
        ALLOWED_HOSTS=["127.0.0.1"],
        ROOT_URLCONF="examples.django_project.urls",
        INSTALLED_APPS=[],
        MIDDLEWARE=[],
        DATABASES={},
        USE_TZ=True,
        CACHES={
            alias: {
                "BACKEND": backend,
                "LOCATION": list(servers),
                "KEY_PREFIX": f"bench-{label}",
                "OPTIONS": options,
            }
            for alias, (label, backend) in BACKENDS.items()
        },
    )
    django.setup()


class Requester:
    """Calls Django's WSGI handler as a WSGI server would, including ``close()`` (request_finished)."""

    def __init__(self) -> None:
        self.handler = WSGIHandler()
        self.status = ""
        self.headers: dict[str, str] = {}

    def _start_response(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        self.status, self.headers = status, dict(headers)
        return lambda data: None

    def get(self, path: str, query: str = "") -> bytes:
        environ = {
            "REQUEST_METHOD": "GET",
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "SERVER_NAME": "127.0.0.1",
            "SERVER_PORT": "8000",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "HTTP_HOST": "127.0.0.1",
            "wsgi.input": io.BytesIO(b""),
            "wsgi.errors": sys.stderr,
            "wsgi.url_scheme": "http",
            "wsgi.version": (1, 0),
            "wsgi.multithread": False,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
        }
        response = self.handler(environ, self._start_response)
        try:
            body = b"".join(response)
        finally:
            response.close()  # fires request_finished, as a WSGI server does
        if not self.status.startswith("200"):
            raise RuntimeError(f"GET {path}?{query}: {self.status}")
        return body


def workloads(requester: Requester, batch: int) -> dict[str, Callable[[], None]]:
    """``{label: one timed batch of requests}`` for every view and backend."""

    def shelf(alias: str, mode: str) -> Callable[[], None]:
        queries = [f"cache={alias}&mode={mode}&start={start}" for start in STARTS]

        def run() -> None:
            for i in range(batch):
                requester.get("/shelf/", queries[i % len(queries)])

        return run

    return {
        f"shelf-{mode}/{label}": shelf(alias, mode)
        for mode in ("many", "each")
        for alias, (label, _) in BACKENDS.items()
    }


def warm_and_check(requester: Requester) -> None:
    """Fill every fragment, then check each configuration serves all 20 from the cache."""
    for alias in BACKENDS:
        for mode in ("many", "each"):
            for start in STARTS:
                requester.get("/shelf/", f"cache={alias}&mode={mode}&start={start}")
                body = requester.get("/shelf/", f"cache={alias}&mode={mode}&start={start}")
                misses = requester.headers.get("X-Cache-Misses")
                if misses != "0" or body.count(b"<li>") != SHELF:
                    raise RuntimeError(f"{alias}/{mode}: {misses} misses, {body.count(b'<li>')} fragments")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--delay-ms", type=float, default=0.5, help="added in each direction per hop")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=40, help="requests per timed round")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 15 requests")
    parser.add_argument("--json", help="write every figure to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.batch = 3, 15

    env = environment(["django", "pymemcache", "shardcache"])
    print_header("Django cache backends: requests/s of a view doing 20 cache lookups", env)
    with LocalCluster(args.nodes, backend="process") as cluster:
        ports = [node.port for node in cluster.nodes]
        with delayed(ports, args.delay_ms / 1000) as (servers, how):
            configure_django(servers)
            requester = Requester()
            warm_and_check(requester)
            stats = measure_interleaved(workloads(requester, args.batch), args.rounds, warmup=1)
            for alias in BACKENDS:
                caches[alias].clear()

    rows = []
    by_view: dict[str, dict[str, Stats]] = {}
    for label, stat in stats.items():
        view, alias = label.split("/")
        by_view.setdefault(view, {})[alias] = stat
    descriptions = {
        "shelf-many": "/shelf/ get_many(20)",
        "shelf-each": "/shelf/ 20 x get",
    }
    for view, cells in by_view.items():
        for alias, stat in cells.items():
            rate = stat.rate(args.batch)
            spread = (stat.max - stat.min) / 2 / stat.median * 100
            ratio = ""
            if alias == "shardcache" and "pymemcache" in cells:
                ratio = f"{cells['pymemcache'].median / stat.median:.2f}x"
            rows.append(
                [
                    descriptions[view],
                    alias,
                    f"{rate:,.0f} (±{spread:.0f}%)",
                    f"{stat.median / args.batch * 1e3:.2f}",
                    ratio,
                ]
            )
    print_table(
        f"{args.nodes} memcached nodes, +{args.delay_ms:g} ms each way per hop ({how}); "
        f"{args.rounds} rounds x {args.batch} requests, single thread",
        ["view", "backend", "requests/s", "ms/request", "shardcache vs pymemcache"],
        rows,
        notes=[
            "PyMemcacheCache = Django's backend on pymemcache's HashClient: get_many asks the nodes one",
            "after the other, and its connections are closed at every request_finished (#11331).",
        ],
    )
    if args.json:
        write_json(
            args.json,
            {
                "environment": env,
                "args": vars(args),
                "delay": how,
                "cells": {k: v.as_dict() for k, v in stats.items()},
            },
        )
    return 0


if __name__ == "__main__":
    os.environ.pop("DJANGO_SETTINGS_MODULE", None)
    sys.exit(main())
