"""Failover, live: a node of a running cluster freezes, then dies, under load, and comes back.

    .venv/bin/python -m examples.failover_demo [--backend auto|process|docker]

``demo(cluster)`` takes a running ``LocalCluster`` of 4 nodes (``make demo`` passes its own); run as
a module it starts one. The last node is the victim, reached through a ``FaultProxy`` so that after
a restart (a container comes back on a new host port) the client finds it at the same address.
Four threads play a web app: read a page, and on a miss render it from the "database" and cache it
(cache-aside). The demo prints the events the client emits and what the app saw:

1. the victim freezes (SIGSTOP / docker pause: it accepts connections and never answers): it costs
   one timeout, then nothing; meanwhile the app deletes one page and rewrites another, both on
   the frozen node; it comes back still holding the old versions, is readmitted and fenced (those
   keys deleted on it, and missing until then), and neither old version is ever served;
2. the victim is killed and restarted: the same, with connections refused instead of hanging.

Everything the demo starts (proxy, threads, client) is stopped at the end; the cluster's nodes are
left running, unpaused.
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import shardcache
from shardcache.testing import FaultProxy, LocalCluster, ServerSetupError

TIMEOUT_S = 0.25
PROBE_S = 0.5
THREADS = 4
PAGES = 1000
OUTAGE_S = 2.0
SHOWN_EVENTS = ("node_down", "failover", "node_up", "fenced")  # "error" is counted


@dataclass
class Tally:
    """What the app saw in one phase (threads add without a lock: the counts are indicative)."""

    calls: int = 0
    exceptions: int = 0
    slowest_s: float = 0.0
    other_gets: int = 0
    other_hits: int = 0
    victim_gets: int = 0
    victim_hits: int = 0

    def line(self, seconds: float) -> str:
        other = f"{self.other_hits:,}/{self.other_gets:,}"
        victim = f"{self.victim_hits:,}/{self.victim_gets:,}"
        return (
            f"{self.calls / seconds:,.0f} calls/s, {self.exceptions} exceptions, slowest call "
            f"{self.slowest_s * 1e3:.0f} ms; hits: other nodes' pages {other}, victim's pages {victim}"
        )


class App:
    """Threads serving random pages cache-aside, counting into ``self.tally``."""

    def __init__(self, cache: shardcache.Client, pages: list[str], victim: set[str]) -> None:
        self.cache = cache
        self.pages = pages
        self.victim = victim
        self.tally = Tally()
        self.totals = Tally()
        self._since = 0.0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._serve, args=(n,), daemon=True) for n in range(THREADS)]

    def start(self) -> None:
        self._since = time.perf_counter()
        for thread in self._threads:
            thread.start()

    def phase(self) -> str:
        """What the app saw since the last call (``totals`` keeps the sum), as a line of text."""
        now = time.perf_counter()
        tally, self.tally = self.tally, Tally()
        seconds, self._since = now - self._since, now
        self.totals.calls += tally.calls
        self.totals.exceptions += tally.exceptions
        return tally.line(seconds)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)

    def _call(self, method: Callable[..., Any], *args: Any) -> Any:
        started = time.perf_counter()
        try:
            return method(*args)
        except Exception:  # the point of the demo: none reaches the app
            self.tally.exceptions += 1
            return None
        finally:
            tally = self.tally
            tally.calls += 1
            tally.slowest_s = max(tally.slowest_s, time.perf_counter() - started)

    def _serve(self, n: int) -> None:
        rng = random.Random(n)
        for _ in range(1_000_000):
            if self._stop.is_set():
                return
            key = self.pages[rng.randrange(len(self.pages))]
            page = self._call(self.cache.get, key)
            if page is None:
                self._call(self.cache.set, key, render(key, 1))
            tally = self.tally
            if key in self.victim:
                tally.victim_gets += 1
                tally.victim_hits += page is not None
            else:
                tally.other_gets += 1
                tally.other_hits += page is not None
            time.sleep(0.001)  # a little think time: an app, not a benchmark


def render(key: str, version: int) -> str:
    return f"<h1>{key}</h1> version {version}"


def on_victim(cache: shardcache.Client, victim: str, prefix: str, n: int) -> list[str]:
    keys = [f"{prefix}{i}" for i in range(100 * n)]
    found = [k for k in keys if cache.node_for(k) == victim][:n]
    if len(found) < n:
        raise RuntimeError(f"fewer than {n} keys on {victim}")
    return found


def readmitted(cache: shardcache.Client, node_id: str, since: float) -> str:
    """Wait (bounded) for ``node_id`` to be "up" again; say how long it took."""
    if wait_for(lambda: cache.node_states()[node_id] == "up"):
        return (
            f"readmitted {time.perf_counter() - since:.2f} s after it came back (probe every {PROBE_S:g} s)"
        )
    return f"NOT readmitted {time.perf_counter() - since:.0f} s after it came back: {cache.node_states()}"


def wait_for(condition: Callable[[], bool], timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return condition()


def demo(cluster: LocalCluster) -> None:
    """Freeze, then kill, one node of ``cluster`` (4 running nodes) under load; print what happens."""
    node = cluster.nodes[-1]
    proxy = FaultProxy(*node.address)
    specs = [n.spec for n in cluster.nodes[:-1]] + [proxy.spec]
    victim = proxy.spec
    t0 = time.perf_counter()
    lock = threading.Lock()

    def say(text: str) -> None:
        with lock:
            print(f"[{time.perf_counter() - t0:5.2f}s] {text}", flush=True)

    errors = [0]

    def on_event(event: shardcache.Event) -> None:
        if event.kind == "error":
            errors[0] += 1
        if event.kind in SHOWN_EVENTS:
            say(f"  event {event.kind:<9} {event.node_id}  {event.detail}")

    options: dict[str, Any] = {
        "on_error": "miss",
        "failover": "remap",
        "timeout": TIMEOUT_S,
        "connect_timeout": TIMEOUT_S,
        "failure_threshold": 2,
        "retry_interval_s": PROBE_S,
        "max_retry_interval_s": PROBE_S,
    }
    cache = shardcache.Client(specs, **options)
    app: App | None = None
    try:
        print(f"failover demo: {len(specs)} memcached nodes ({cluster.backend})")
        print(f"  victim: {node.spec}, reached through a FaultProxy at {victim}")
        print(f"  client: {', '.join(f'{k}={v!r}' for k, v in options.items())}")
        pages = [f"page/{i}" for i in range(PAGES)]
        cache.set_many({k: render(k, 1) for k in pages})
        on_node = {k for k in pages if cache.node_for(k) == victim}
        deleted, rewritten = on_victim(cache, victim, "books/", 2)
        cache.set_many({deleted: render(deleted, 1), rewritten: render(rewritten, 1)})
        print(f"  {PAGES:,} pages cached, {len(on_node)} of them on the victim; {THREADS} app threads")
        print(f"  {deleted!r} and {rewritten!r} live on the victim too, at version 1")
        print()
        cache.add_listener(on_event)
        app = App(cache, pages, on_node)
        app.start()
        time.sleep(1.0)
        say(f"no fault: {app.phase()}")

        freeze = "SIGSTOP" if cluster.backend == "process" else "docker pause"
        say(f"FREEZE {node.spec} ({freeze}: it accepts connections, never answers)")
        started = time.perf_counter()
        node.pause()
        try:
            wait_for(lambda: cache.node_states()[victim] != "up", timeout_s=5)
            say(f"the app deletes {deleted!r} and rewrites {rewritten!r} to version 2")
            cache.delete(deleted)
            cache.set(rewritten, render(rewritten, 2))
            now = {k: cache.get(k) for k in (deleted, rewritten)}
            say(f"  read back now: {deleted!r} -> {now[deleted]!r}, {rewritten!r} -> {now[rewritten]!r}")
            time.sleep(max(0.0, OUTAGE_S - (time.perf_counter() - started)))
        finally:
            node.unpause()
        say(f"frozen {OUTAGE_S:g} s: {app.phase()}")
        back = time.perf_counter()
        say(f"UNFREEZE {node.spec}: it still holds version 1 of both pages (the changes never reached it)")
        say(readmitted(cache, victim, back))
        got = {k: cache.get(k) for k in (deleted, rewritten)}
        say(f"  read back now: {deleted!r} -> {got[deleted]!r}, {rewritten!r} -> {got[rewritten]!r}")
        with shardcache.Client([node.spec]) as direct:
            held = direct.get_many([deleted, rewritten])
        stale = [k for k, v in got.items() if v == render(k, 1)]
        say(f"  on the node itself: {held or 'neither key'}; stale reads: {len(stale)}")
        time.sleep(1.0)
        say(f"since it came back: {app.phase()}")
        print()

        kill = "SIGKILL" if cluster.backend == "process" else "docker kill"
        say(f"KILL {node.spec} ({kill})")
        node.kill()
        time.sleep(OUTAGE_S)
        say(f"dead {OUTAGE_S:g} s: {app.phase()}")
        node.start()
        proxy.set_target(*node.address)
        back = time.perf_counter()
        say(f"RESTARTED {node.spec} (empty; the proxy now forwards there)")
        say(readmitted(cache, victim, back))
        time.sleep(1.0)
        say(f"since it came back: {app.phase()}")
        app.stop()
        totals = app.totals
        app = None
        print()
        print(
            f"the app made {totals.calls:,} calls: {totals.exceptions} exceptions reached it; "
            f"{errors[0]} failed calls became misses, each reported as an 'error' event"
        )
        print(f"victim's counters: {cache.node_counters()[victim]}")
    finally:
        if app is not None:
            app.stop()
        cache.close()
        proxy.close()
        if node.is_paused():
            node.unpause()
        if not node.is_running():
            node.start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m examples.failover_demo", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--backend", choices=("auto", "process", "docker"), default="auto")
    args = parser.parse_args(argv)
    try:
        cluster = LocalCluster(4, backend=args.backend)
    except ServerSetupError as exc:
        print(f"failover demo: could not start memcached: {exc}", file=sys.stderr)
        return 1
    with cluster:
        demo(cluster)
    return 0


if __name__ == "__main__":
    sys.exit(main())
