"""Failover: the goals of the failover issue, measured with real faults on real memcached servers.

    .venv/bin/python -m benchmarks.failover_bench [--rounds N] [--json FILE] [--backend process|docker]

Starts 5 memcached servers on 127.0.0.1 (local processes, or containers with ``--backend docker``):
4 form the ring, 1 is the gutter pool of ``failover="gutter"``. Every ring node is reached through a
``shardcache.testing.FaultProxy``: the victim (ring node 0) can then be blackholed, and a restarted
container (which gets a new host port) is reached at the same address (``set_target``). The other
three are proxied too, so a call costs the same on every node: with only the victim proxied, its
calls cost several times more than the others' before the fault and nothing after, which inflates
the healthy nodes' throughput during the outage (a first version measured +181% that way).
Faults are real: ``kill`` (SIGKILL / docker kill, then start again), ``pause`` (SIGSTOP / docker
pause: connections are accepted, nothing answers) and ``blackhole`` (the proxy swallows everything).

Every round runs these scenarios, each client side by side on the same fault:

1. **kill under load**: 8 threads of mixed get / set / get_many(8) / delete over 800 keys; 1 s of
   no-fault load, the victim is killed, 1.5 s of outage, it is restarted (the load still running).
   Counted: exceptions that reached the caller, call latencies during the outage, and (for
   information) single-key calls/s on the healthy nodes' keys during the outage vs the no-fault
   second. shardcache uses
   ``on_error="miss"``; the peers are pymemcache ``HashClient`` with its defaults and with
   ``ignore_exc=True`` and retry settings matched to shardcache's (see ``Rig.hashclient``). Both
   need ``use_pooling=True`` to be shared by threads (its default, False, shares one socket per
   node between threads).
2. **frozen node** (pause, then blackhole): 4 threads of get/set over 400 keys, paced at 250
   calls/s each (so the healthy nodes get the same load before and during the freeze: with threads
   calling back to back, the victim's instant misses would push more load onto the others and
   raise their latency), 1.5 s no-fault, 1.5 s frozen. Latency p50/p99/max of the calls made while
   frozen, for the victim's keys and for the others (vs the no-fault second), and how many calls
   paid a whole timeout. A HashClient with its defaults (no timeout) issues one ``get`` for a
   victim key just after the freeze starts: how long it blocks.
3. **stale reads after rejoin**, for each policy (fail_fast, remap, gutter) and each freeze: write
   v1 to 200 of the victim's keys, freeze it, wait until the client marks it down, then delete 80
   (``delete`` and ``delete_many``) and overwrite 80 (``set`` and ``set_many``) through the client,
   read them during the outage, unfreeze, wait for readmission, read all 200 back. A stale read is
   a changed key that returns v1. The HashClient peer (ignore_exc, marks the node dead and remaps
   its keys, re-adds it ``dead_timeout`` later without fencing) runs the same steps.
4. **readmission over a network hop**, fail_fast and remap: the victim's proxy adds 1 ms each way
   (a datacenter hop), 4 threads call get/set back to back over 400 keys; the victim is paused
   0.7 s and unpaused with the app still calling.

5. **throughput**: the load of scenario 1; the victim's proxy resets every connection (as a killed
   node behind it does) for 0.6 s, then heals; 3 no-fault / outage window pairs per round, each
   no-fault window once the victim is back. Healthy single-key calls/s, outage over no fault, per
   pair; the round's figure is the median pair. (This machine is shared: a single pair of windows,
   as in scenario 1, swings from 65% to 180% with the other processes' load.)

Readmission is timed from the victim's return (restart answered and proxy retargeted / unfreeze
returned) to ``node_states()`` showing "up" (polled every 5 ms), given up after 5 s: in scenario 1
and 2 with the load still running, in scenario 3 idle, in scenario 4 under load over the hop.

The figures are medians over the rounds of each round's count, ratio or time, except latency
percentiles in scenario 2, which are taken over the calls of all rounds pooled (a single round has
a few hundred calls per cell: its p99 is a handful of calls). "Unchanged" latency for the other
keys is judged on p50 and p90: on a shared machine, stalls of 10-50 ms hit every thread at once,
before and during a fault alike, and move a p99 of a few thousand calls by themselves (p99 and max
are shown). The tables per round come first.
PASS/MISS compare the figures with the goals; nothing asserts. shardcache's settings:
``timeout=connect_timeout=0.25 s``, ``failure_threshold=2``, ``retry_interval_s =
max_retry_interval_s = 0.5`` (a fixed probe interval, jittered +-20%, so "the probe interval" is
one number).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import random
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pymemcache.client.hash import HashClient

import shardcache
from benchmarks._util import environment, goal, print_header, print_table, write_json
from shardcache.testing import FaultProxy, LocalCluster

RING_NODES = 4
TIMEOUT_S = 0.25
PROBE_S = 0.5  # retry_interval_s = max_retry_interval_s
JITTER = 0.2  # shardcache.HealthPolicy's default
THRESHOLD = 2
READMIT_BOUND_S = PROBE_S * (1 + JITTER) + TIMEOUT_S  # one (jittered) interval + one probe
SLOW_S = TIMEOUT_S * 0.8  # a call this slow paid (most of) a timeout

LOAD_THREADS = 8
FREEZE_THREADS = 4
FREEZE_INTERVAL_S = 0.004  # per thread: 4 x 250 = 1,000 calls/s offered, well below capacity
BASE_S = 1.0
FREEZE_BASE_S = 1.5
OUTAGE_S = 1.5
KILL_KEYS = 800
FREEZE_KEYS = 400
STALE_KEYS = 200
MAX_CALLS_PER_THREAD = 200_000
JOIN_S = 30.0
WAIT_S = 15.0
CYCLES = 3  # scenario 5
WINDOW_S = 0.6
HOP_S = 0.001  # scenario 4: one way, to the victim
HOP_POLICIES = ("fail_fast", "remap")
READMIT_WAIT_S = 5.0  # ~6x the goal: "never" past this

V1 = b"v1:" + b"x" * 97
V2 = b"v2:" + b"y" * 97
VALUE = b"v:" + b"z" * 98

PRIVATE = "_samples"  # result entries left out of the JSON

SHARDCACHE = "shardcache"
HC_DEFAULTS = "HashClient (defaults)"
HC_TUNED = "HashClient (ignore_exc, retries)"
POLICIES = ("fail_fast", "remap", "gutter")
FREEZES = ("pause", "blackhole")


# --------------------------------------------------------------------------------------------------
# the rig: a cluster, a proxy in front of the victim, the clients
# --------------------------------------------------------------------------------------------------
class Rig:
    """4 ring nodes, each behind a FaultProxy (node 0 is the victim), and 1 gutter node."""

    def __init__(self, backend: str) -> None:
        self.cluster = LocalCluster(RING_NODES + 1, backend=backend)  # type: ignore[arg-type]
        self.proxies: list[FaultProxy] = []
        try:
            for node in self.cluster.nodes[:RING_NODES]:
                self.proxies.append(FaultProxy(*node.address))
        except BaseException:
            self.close()
            raise
        self.victim = self.cluster.nodes[0]
        self.proxy = self.proxies[0]
        self.specs = [proxy.spec for proxy in self.proxies]
        self.addresses = [proxy.address for proxy in self.proxies]
        self.gutter = [self.cluster.nodes[RING_NODES].spec]
        self.victim_id = self.proxy.spec

    def close(self) -> None:
        try:
            for proxy in self.proxies:
                proxy.close()
        finally:
            self.cluster.close()

    def kill(self) -> None:
        self.victim.kill()

    def restart(self) -> None:
        """Start the killed victim again; the proxy follows it to its (maybe new) port."""
        self.victim.start()
        self.proxy.set_target(*self.victim.address)

    def freeze(self, kind: str) -> None:
        if kind == "pause":
            self.victim.pause()
        else:
            self.proxy.blackhole()

    def unfreeze(self, kind: str) -> None:
        if kind == "pause":
            self.victim.unpause()
        else:
            self.proxy.heal()

    def repair(self) -> None:
        """Whatever a failed scenario left behind: the victim running, unpaused, proxied, healed."""
        with contextlib.suppress(Exception):
            self.proxy.heal()
        with contextlib.suppress(Exception):
            if self.victim.is_paused():
                self.victim.unpause()
        with contextlib.suppress(Exception):
            if not self.victim.is_running():
                self.restart()

    def flush(self) -> None:
        self.cluster.flush_all()

    def shardcache(self, **options: Any) -> shardcache.Client:
        settings: dict[str, Any] = {
            "connect_timeout": TIMEOUT_S,
            "timeout": TIMEOUT_S,
            "on_error": "miss",
            "failure_threshold": THRESHOLD,
            "retry_interval_s": PROBE_S,
            "max_retry_interval_s": PROBE_S,
        }
        if options.get("failover") == "gutter":
            settings["gutter_servers"] = self.gutter
        return shardcache.Client(self.specs, **{**settings, **options})

    def hashclient(self, name: str, **options: Any) -> HashClient:
        """``HC_DEFAULTS``: pymemcache's defaults (no timeouts, noreply writes, 2 retries 1 s apart,
        dead for 60 s), pooled so threads can share it. ``HC_TUNED``: ignore_exc, shardcache's
        timeouts, replies awaited, retries and re-adds at shardcache's probe interval."""
        if name == HC_DEFAULTS:
            return HashClient(self.addresses, use_pooling=True, **options)
        settings: dict[str, Any] = {
            "use_pooling": True,
            "ignore_exc": True,
            "connect_timeout": TIMEOUT_S,
            "timeout": TIMEOUT_S,
            "default_noreply": False,
            "retry_attempts": THRESHOLD,
            "retry_timeout": PROBE_S,
            "dead_timeout": PROBE_S,
        }
        return HashClient(self.addresses, **{**settings, **options})


def owner_function(client: Any) -> Callable[[str], str]:
    """``key -> node id`` as the client routes it while every node is up."""
    if isinstance(client, shardcache.Client):
        return client.node_for
    hasher = client.hasher
    return lambda key: str(hasher.get_node(key))


def close_quietly(client: Any) -> None:
    with contextlib.suppress(Exception):
        client.close()


def wait_until(condition: Callable[[], bool], timeout_s: float = WAIT_S, step_s: float = 0.005) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step_s)
    return condition()


def time_to_up(client: shardcache.Client, node_id: str, since: float) -> float | None:
    """Seconds from ``since`` (perf_counter) until ``node_id`` shows "up"; None if not within
    ``READMIT_WAIT_S``."""
    if not wait_until(lambda: client.node_states()[node_id] == "up", READMIT_WAIT_S):
        return None
    return time.perf_counter() - since


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..1); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def med(values: Sequence[float | None]) -> float:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else float("nan")


# --------------------------------------------------------------------------------------------------
# load
# --------------------------------------------------------------------------------------------------
@dataclass
class Call:
    start: float
    seconds: float
    op: str
    victim: bool  # the call touched a key of the victim
    error: str | None  # the exception's type name, if one reached the caller
    message: str = ""  # and its message


@dataclass
class Load:
    """Threads calling ``client`` until stopped; every call is recorded.

    ``interval_s`` None: back to back (closed loop: the most calls the client can make). Otherwise
    each thread starts a call every ``interval_s`` (paced: the same offered load whatever the calls
    cost, so a latency figure is not moved by a change of load; a thread that falls behind, e.g.
    after a timeout, skips the missed slots rather than bursting).
    """

    client: Any
    keys: Sequence[str]
    victim_keys: frozenset[str]
    ops: Sequence[str]
    threads: int
    interval_s: float | None = None
    calls: list[list[Call]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        self.calls = [[] for _ in range(self.threads)]
        for n in range(self.threads):
            worker = threading.Thread(target=self._work, args=(n,), name=f"load-{n}", daemon=True)
            self._workers.append(worker)
            worker.start()

    def stop(self) -> None:
        self._stop.set()
        deadline = time.monotonic() + JOIN_S
        for worker in self._workers:
            worker.join(timeout=max(0.0, deadline - time.monotonic()))
        stuck = [w.name for w in self._workers if w.is_alive()]
        if stuck:
            raise RuntimeError(f"load threads still running after {JOIN_S} s: {stuck}")

    def _work(self, n: int) -> None:
        rng = random.Random(n)
        client, keys, victim_keys, ops = self.client, self.keys, self.victim_keys, self.ops
        record = self.calls[n].append
        clock = time.perf_counter
        interval = self.interval_s
        next_at = clock() + (interval or 0.0) * n / self.threads
        for i in range(MAX_CALLS_PER_THREAD):
            if self._stop.is_set():
                return
            if interval is not None:
                now = clock()
                if next_at > now:
                    time.sleep(next_at - now)
                elif now - next_at > interval:
                    next_at = now
                next_at += interval
            op = ops[(i + n) % len(ops)]
            if op == "get_many":
                batch = rng.sample(keys, 8)
                victim = any(k in victim_keys for k in batch)
            else:
                key = keys[rng.randrange(len(keys))]
                victim = key in victim_keys
            error, message = None, ""
            started = clock()
            try:
                if op == "get":
                    client.get(key)
                elif op == "set":
                    client.set(key, VALUE)
                elif op == "get_many":
                    client.get_many(batch)
                else:
                    client.delete(key)
            except Exception as exc:  # counted: the point is how many reach the caller
                error, message = type(exc).__name__, str(exc)[:200]
            record(Call(started, clock() - started, op, victim, error, message))

    def between(self, start: float, end: float) -> list[Call]:
        return [c for calls in self.calls for c in calls if start <= c.start < end]


def slow_calls(calls: Sequence[Call], t_fault: float) -> list[dict[str, Any]]:
    """The calls that took at least ``SLOW_S``: when (from the fault), how long, what."""
    return [
        {"at_s": round(c.start - t_fault, 4), "seconds": round(c.seconds, 4), "op": c.op,
         "victim": c.victim, "error": c.error}
        for c in calls
        if c.seconds >= SLOW_S
    ]  # fmt: skip


def healthy_rate(calls: Sequence[Call], seconds: float) -> float:
    """Single-key calls per second on the healthy nodes' keys, completed without an exception."""
    done = sum(1 for c in calls if not c.victim and c.op != "get_many" and c.error is None)
    return done / seconds


def latency_ms(calls: Sequence[Call]) -> dict[str, float]:
    return latency_ms_of([c.seconds for c in calls])


def latency_ms_of(seconds: Sequence[float]) -> dict[str, float]:
    return {
        "calls": len(seconds),
        "p50_ms": percentile(seconds, 0.50) * 1e3,
        "p90_ms": percentile(seconds, 0.90) * 1e3,
        "p99_ms": percentile(seconds, 0.99) * 1e3,
        "max_ms": (max(seconds) if seconds else float("nan")) * 1e3,
        "slow_calls": sum(1 for s in seconds if s >= SLOW_S),
    }


# --------------------------------------------------------------------------------------------------
# scenario 1: a node killed under mixed load
# --------------------------------------------------------------------------------------------------
def kill_under_load(rig: Rig, name: str, tag: str) -> dict[str, Any]:
    rig.flush()
    client: Any = rig.shardcache() if name == SHARDCACHE else rig.hashclient(name)
    events: list[shardcache.Event] = []
    if name == SHARDCACHE:
        client.add_listener(events.append)
    try:
        keys = [f"{tag}:{i}" for i in range(KILL_KEYS)]
        owner = owner_function(client)
        victim_keys = frozenset(k for k in keys if owner(k) == rig.victim_id)
        client.set_many(dict.fromkeys(keys, VALUE))
        load = Load(client, keys, victim_keys, ("get", "set", "get_many", "delete"), LOAD_THREADS)
        t_start = time.perf_counter()
        load.start()
        try:
            time.sleep(BASE_S)
            t_fault = time.perf_counter()
            rig.kill()
            time.sleep(OUTAGE_S)
            t_end = time.perf_counter()
            rig.restart()  # under load: readmission is timed with the app still calling
            t_back = time.perf_counter()
            readmit = time_to_up(client, rig.victim_id, t_back) if name == SHARDCACHE else None
        finally:
            load.stop()
        warm = t_start + 0.2  # connections are made in the first moments
        outage = load.between(t_fault, t_end)
        everything = load.between(0.0, float("inf"))
        errors = Counter(c.error for c in everything if c.error is not None)
        examples = {c.error: c.message for c in everything if c.error is not None}
        return {
            "calls": len(everything),
            "exceptions": sum(errors.values()),
            "exception_types": dict(errors),
            "exception_examples": examples,
            "slow_calls": slow_calls(everything, t_fault),
            "outage_latency": latency_ms(outage),
            "healthy_rate_base": healthy_rate(load.between(warm, t_fault), t_fault - warm),
            "healthy_rate_outage": healthy_rate(outage, t_end - t_fault),
            "readmit_after_restart_s": readmit,
            "events": dict(Counter(e.kind for e in events)),
        }
    finally:
        close_quietly(client)
        rig.repair()


# --------------------------------------------------------------------------------------------------
# scenario 2: a frozen node
# --------------------------------------------------------------------------------------------------
class BlockedCall:
    """One ``get`` on a HashClient with pymemcache's defaults (timeout=None), issued on a frozen
    node: how long it blocks. Connect before the freeze, ``start`` after it (else the reply may
    come before the freeze), ``result`` after the node is back."""

    def __init__(self, rig: Rig, key: str) -> None:
        self.key = key
        self.client = HashClient(rig.addresses)
        self.client.get(key)  # the connection exists before the freeze
        self.box: list[Any] = []
        self.thread = threading.Thread(target=self._run, name="hashclient-defaults-get", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        started = time.perf_counter()
        try:
            self.client.get(self.key)
            outcome = "returned"
        except Exception as exc:
            outcome = f"raised {type(exc).__name__}"
        self.box.extend([time.perf_counter() - started, outcome])

    def result(self, freeze_s: float) -> dict[str, Any]:
        self.thread.join(timeout=10.0)
        if not self.box:
            return {"seconds": None, "outcome": "still blocked 10 s after the unfreeze", "freeze_s": freeze_s}
        close_quietly(self.client)
        return {"seconds": self.box[0], "outcome": self.box[1], "freeze_s": freeze_s}


def frozen_node(rig: Rig, name: str, kind: str, tag: str, *, with_blocker: bool) -> dict[str, Any]:
    rig.flush()
    client: Any = rig.shardcache() if name == SHARDCACHE else rig.hashclient(name)
    try:
        keys = [f"{tag}:{i}" for i in range(FREEZE_KEYS)]
        owner = owner_function(client)
        victim_keys = frozenset(k for k in keys if owner(k) == rig.victim_id)
        client.set_many(dict.fromkeys(keys, VALUE))
        load = Load(client, keys, victim_keys, ("get", "set"), FREEZE_THREADS, FREEZE_INTERVAL_S)
        t_start = time.perf_counter()
        load.start()
        blocker = BlockedCall(rig, min(victim_keys)) if with_blocker else None
        try:
            time.sleep(FREEZE_BASE_S)
            t_fault = time.perf_counter()
            rig.freeze(kind)
            if blocker is not None:
                blocker.start()
            time.sleep(OUTAGE_S)
            t_end = time.perf_counter()
            rig.unfreeze(kind)  # under load: readmission is timed with the app still calling
            t_back = time.perf_counter()
            readmit = time_to_up(client, rig.victim_id, t_back) if name == SHARDCACHE else None
        finally:
            rig.unfreeze(kind)
            load.stop()
        blocked = blocker.result(t_end - t_fault) if blocker is not None else None
        warm = t_start + 0.2
        base = load.between(warm, t_fault)
        frozen = load.between(t_fault, t_end)
        return {
            "victim_frozen": latency_ms([c for c in frozen if c.victim]),
            "others_base": latency_ms([c for c in base if not c.victim]),
            "others_frozen": latency_ms([c for c in frozen if not c.victim]),
            PRIVATE: {  # per-call seconds, pooled over the rounds for the goals; not in the JSON
                "victim_frozen": [c.seconds for c in frozen if c.victim],
                "others_base": [c.seconds for c in base if not c.victim],
                "others_frozen": [c.seconds for c in frozen if not c.victim],
            },
            "exceptions": sum(1 for c in frozen if c.error is not None),
            "slow_calls": slow_calls(load.between(0.0, float("inf")), t_fault),
            "readmit_after_unfreeze_s": readmit,
            "hashclient_defaults_blocked": blocked,
        }
    finally:
        close_quietly(client)
        rig.repair()


# --------------------------------------------------------------------------------------------------
# scenario 3: freeze, update, unfreeze, read back
# --------------------------------------------------------------------------------------------------
def victim_keys_for(owner: Callable[[str], str], victim: str, prefix: str, n: int) -> list[str]:
    found: list[str] = []
    for i in range(200 * n):
        key = f"{prefix}:{i}"
        if owner(key) == victim:
            found.append(key)
            if len(found) == n:
                return found
    raise RuntimeError(f"fewer than {n} keys on {victim} among {200 * n}")


def stale_reads(rig: Rig, name: str, policy: str | None, kind: str, tag: str) -> dict[str, Any]:
    """The freeze/update/unfreeze scenario; ``policy`` None for the HashClient peer."""
    rig.flush()
    is_shardcache = name == SHARDCACHE
    client: Any = rig.shardcache(failover=policy) if is_shardcache else rig.hashclient(name)
    try:
        owner = owner_function(client)
        keys = victim_keys_for(owner, rig.victim_id, tag, STALE_KEYS)
        deleted, overwritten, untouched = keys[:80], keys[80:160], keys[160:]
        client.set_many(dict.fromkeys(keys, V1))
        rig.freeze(kind)
        try:
            if is_shardcache:  # a couple of timeouts mark it down
                down = wait_until(
                    lambda: (client.get(keys[0]), client.node_states()[rig.victim_id] != "up")[1]
                )
            else:  # its retries, then it is removed from the hasher: its keys go elsewhere
                down = wait_until(lambda: (client.get(keys[0]), owner(keys[0]) != rig.victim_id)[1])
            if not down:
                raise RuntimeError(f"{name}: the frozen node was never marked down")
            for key in deleted[:40]:
                client.delete(key)
            client.delete_many(deleted[40:])
            for key in overwritten[:40]:
                client.set(key, V2)
            client.set_many(dict.fromkeys(overwritten[40:], V2))
            during = client.get_many(deleted + overwritten)
            stale_during = sum(1 for v in during.values() if v == V1)
        finally:
            rig.unfreeze(kind)
        t_back = time.perf_counter()
        if is_shardcache:
            readmit = time_to_up(client, rig.victim_id, t_back)
        else:  # it re-adds the node on a call, dead_timeout after it removed it
            back = wait_until(lambda: (client.get(keys[0]), owner(keys[0]) == rig.victim_id)[1], step_s=0.02)
            readmit = time.perf_counter() - t_back if back else None
        after = client.get_many(keys)
        gutter_left = None
        if policy == "gutter":
            with shardcache.Client(rig.gutter) as direct:
                gutter_left = len(direct.get_many(keys))
        return {
            "stale_after_rejoin": sum(1 for k in deleted + overwritten if after.get(k) == V1),
            "stale_during_outage": stale_during,
            "changed": len(deleted) + len(overwritten),
            "deleted_missing": sum(1 for k in deleted if k not in after),
            "overwritten_v2": sum(1 for k in overwritten if after.get(k) == V2),
            "untouched_kept": sum(1 for k in untouched if after.get(k) == V1),
            "untouched": len(untouched),
            "readmit_s": readmit,
            "gutter_copies_left": gutter_left,
        }
    finally:
        close_quietly(client)
        rig.repair()


# --------------------------------------------------------------------------------------------------
# scenario 4: readmission under load, the victim one network hop away
# --------------------------------------------------------------------------------------------------
def readmission_over_hop(rig: Rig, policy: str, tag: str) -> dict[str, Any]:
    """Freeze the victim (1 ms each way behind the proxy) under a busy app, unfreeze it with the
    app still calling: how long until it is readmitted, and how many fence passes that took."""
    rig.flush()
    client = rig.shardcache(failover=policy)
    fenced: list[float] = []
    client.add_listener(lambda e: fenced.append(time.perf_counter()) if e.kind == "fenced" else None)
    rig.proxy.set_latency(HOP_S)
    try:
        keys = [f"{tag}:{i}" for i in range(FREEZE_KEYS)]
        victim_keys = frozenset(k for k in keys if client.node_for(k) == rig.victim_id)
        client.set_many(dict.fromkeys(keys, VALUE))
        load = Load(client, keys, victim_keys, ("get", "set"), FREEZE_THREADS)
        load.start()
        try:
            time.sleep(0.5)
            rig.freeze("pause")
            wait_until(lambda: client.node_states()[rig.victim_id] != "up", 5.0)
            time.sleep(0.7)
            rig.unfreeze("pause")
            t_back = time.perf_counter()
            readmit = time_to_up(client, rig.victim_id, t_back)
            t_done = time.perf_counter()
        finally:
            rig.unfreeze("pause")
            load.stop()
        after = load.between(t_back, t_done)
        return {
            "readmit_s": readmit,
            "fence_passes": sum(1 for t in fenced if t >= t_back),
            "victim_calls_per_s": sum(1 for c in after if c.victim) / max(t_done - t_back, 1e-9),
        }
    finally:
        rig.proxy.set_latency(0)
        close_quietly(client)
        rig.repair()


# --------------------------------------------------------------------------------------------------
# scenario 5: healthy-node throughput, outage and no-fault windows alternated
# --------------------------------------------------------------------------------------------------
def throughput_cycles(rig: Rig, name: str, tag: str) -> dict[str, Any]:
    """The kill scenario's load; the victim's proxy resets every connection (as a killed node behind
    it does) for ``WINDOW_S``, then heals; no-fault and outage windows alternate ``CYCLES`` times, so
    that a burst of load from other processes on the machine hits both kinds of window alike. Each
    cycle's ratio: healthy single-key calls/s in the outage window over the no-fault window just
    before it."""
    rig.flush()
    client: Any = rig.shardcache() if name == SHARDCACHE else rig.hashclient(name)
    try:
        keys = [f"{tag}:{i}" for i in range(KILL_KEYS)]
        owner = owner_function(client)
        victim_keys = frozenset(k for k in keys if owner(k) == rig.victim_id)
        client.set_many(dict.fromkeys(keys, VALUE))
        load = Load(client, keys, victim_keys, ("get", "set", "get_many", "delete"), LOAD_THREADS)
        windows: list[tuple[float, float, float]] = []
        load.start()
        try:
            time.sleep(0.3)  # connections are made in the first moments
            for _ in range(CYCLES):
                if name == SHARDCACHE:  # back to normal: readmitted
                    wait_until(lambda: client.node_states()[rig.victim_id] == "up", 3.0)
                else:  # back to normal: re-added (dead_timeout) and reconnected
                    time.sleep(3 * PROBE_S)
                t0 = time.perf_counter()
                time.sleep(WINDOW_S)
                t1 = time.perf_counter()
                rig.proxy.reset()
                time.sleep(WINDOW_S)
                t2 = time.perf_counter()
                rig.proxy.heal()
                windows.append((t0, t1, t2))
        finally:
            rig.proxy.heal()
            load.stop()
        base = [healthy_rate(load.between(t0, t1), t1 - t0) for t0, t1, _ in windows]
        outage = [healthy_rate(load.between(t1, t2), t2 - t1) for _, t1, t2 in windows]
        ratios = [o / b for o, b in zip(outage, base, strict=True)]
        return {"ratio": statistics.median(ratios), "ratios": ratios, "base": base, "outage": outage}
    finally:
        close_quietly(client)
        rig.repair()


# --------------------------------------------------------------------------------------------------
# a round, and the report
# --------------------------------------------------------------------------------------------------
def run_round(rig: Rig, r: int, log: Callable[[str], None]) -> dict[str, Any]:
    result: dict[str, Any] = {"kill": {}, "freeze": {}, "stale": {}, "hop": {}, "throughput": {}}
    for name in (SHARDCACHE, HC_TUNED, HC_DEFAULTS):
        result["kill"][name] = kill_under_load(rig, name, f"fb{r}:kill:{len(result['kill'])}")
    log(f"  round {r + 1}: kill under load done")
    for kind in FREEZES:
        result["freeze"][kind] = {
            name: frozen_node(rig, name, kind, f"fb{r}:{kind}:{i}", with_blocker=name == HC_TUNED)
            for i, name in enumerate((SHARDCACHE, HC_TUNED))
        }
    log(f"  round {r + 1}: frozen node done")
    for kind in FREEZES:
        cells = {p: stale_reads(rig, SHARDCACHE, p, kind, f"fb{r}:st:{kind}:{p}") for p in POLICIES}
        cells[HC_TUNED] = stale_reads(rig, HC_TUNED, None, kind, f"fb{r}:st:{kind}:hc")
        result["stale"][kind] = cells
    log(f"  round {r + 1}: stale reads done")
    for policy in HOP_POLICIES:
        result["hop"][policy] = readmission_over_hop(rig, policy, f"fb{r}:hop:{policy}")
    log(f"  round {r + 1}: readmission over a hop done")
    for name in (SHARDCACHE, HC_TUNED):
        result["throughput"][name] = throughput_cycles(rig, name, f"fb{r}:tp:{len(result['throughput'])}")
    log(f"  round {r + 1}: throughput cycles done")
    return result


@dataclass
class Goal:
    what: str
    client: str
    figure: str
    target: str
    verdict: str  # PASS, MISS or info

    def as_row(self) -> list[str]:
        return [self.what, self.client, self.figure, self.target, self.verdict]


def fmt_ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.1f}"


def fmt_s(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def evaluate(rounds: Sequence[dict[str, Any]]) -> list[Goal]:
    goals: list[Goal] = []

    def each(*path: str) -> list[Any]:
        out = []
        for rnd in rounds:
            cell: Any = rnd
            for part in path:
                cell = cell[part]
            out.append(cell)
        return out

    # 1. exceptions during a kill under load
    for name in (SHARDCACHE, HC_TUNED, HC_DEFAULTS):
        counts = [c["exceptions"] for c in each("kill", name)]
        lat = [c["outage_latency"] for c in each("kill", name)]
        types = Counter[str]()
        for c in each("kill", name):
            types.update(c["exception_types"])
        figure = f"{med(counts):g} (max {max(counts)})" + (f" {dict(types)}" if types else "")
        figure += (
            f"; calls during outage p50/p99/max {fmt_ms(med([x['p50_ms'] for x in lat]))}/"
            f"{fmt_ms(med([x['p99_ms'] for x in lat]))}/{fmt_ms(med([x['max_ms'] for x in lat]))} ms"
        )
        verdict = goal(max(counts) == 0) if name == SHARDCACHE else "info"
        goals.append(Goal("exceptions surfaced, node killed, 8 threads", name, figure, "0", verdict))

    # 2. latency while frozen: percentiles of the calls of all rounds pooled
    bound_ms = (TIMEOUT_S + 0.020) * 1e3

    def pooled(kind: str, name: str, part: str) -> list[float]:
        return [x for c in each("freeze", kind, name) for x in c[PRIVATE][part]]

    for kind in FREEZES:
        for name in (SHARDCACHE, HC_TUNED):
            v = latency_ms_of(pooled(kind, name, "victim_frozen"))
            figure = (
                f"p50/p99/max {v['p50_ms']:.2f}/{v['p99_ms']:.1f}/{v['max_ms']:.1f} ms; "
                f"{v['slow_calls']} of {v['calls']} calls paid a timeout"
            )
            verdict = goal(v["p99_ms"] <= bound_ms) if name == SHARDCACHE else "info"
            goals.append(
                Goal(f"frozen node's keys ({kind})", name, figure, f"p99 <= {bound_ms:.0f} ms", verdict)
            )
        for name in (SHARDCACHE, HC_TUNED):
            b = latency_ms_of(pooled(kind, name, "others_base"))
            f = latency_ms_of(pooled(kind, name, "others_frozen"))
            figure = (
                f"p50 {b['p50_ms']:.2f} -> {f['p50_ms']:.2f} ms, p90 {b['p90_ms']:.2f} -> "
                f"{f['p90_ms']:.2f} ms, p99 {b['p99_ms']:.2f} -> {f['p99_ms']:.2f} ms, max "
                f"{b['max_ms']:.1f} -> {f['max_ms']:.1f} ms"
            )
            ok = f["p50_ms"] <= max(1.25 * b["p50_ms"], b["p50_ms"] + 0.2) and f["p90_ms"] <= max(
                1.5 * b["p90_ms"], b["p90_ms"] + 1.0
            )
            verdict = goal(ok) if name == SHARDCACHE else "info"
            goals.append(
                Goal(
                    f"other keys while frozen ({kind}), vs no fault",
                    name,
                    figure,
                    "p50 <= max(1.25x, +0.2 ms), p90 <= max(1.5x, +1 ms)",
                    verdict,
                )
            )
    blocked = [c["hashclient_defaults_blocked"] for kind in FREEZES for c in each("freeze", kind, HC_TUNED)]
    blocked_s = [b["seconds"] for b in blocked if b and b["seconds"] is not None]
    outcomes = Counter(b["outcome"] for b in blocked if b)
    goals.append(
        Goal(
            "one get() on the frozen node, timeout=None",
            HC_DEFAULTS,
            f"blocked {med(blocked_s):.2f} s (freeze lasted {OUTAGE_S:g} s): {dict(outcomes)}",
            "-",
            "info",
        )
    )

    # 3. stale reads after rejoin
    for kind in FREEZES:
        for policy in (*POLICIES, HC_TUNED):
            cells = each("stale", kind, policy)
            stale = [c["stale_after_rejoin"] for c in cells]
            during = [c["stale_during_outage"] for c in cells]
            kept = med([c["untouched_kept"] for c in cells])
            figure = (
                f"{med(stale):g} of {cells[0]['changed']} (max {max(stale)}); during outage "
                f"{med(during):g}; untouched keys kept {kept:g}/{cells[0]['untouched']}"
            )
            if policy == "gutter":
                figure += f"; gutter copies left {med([c['gutter_copies_left'] for c in cells]):g}"
            client = f"shardcache {policy}" if policy in POLICIES else policy
            verdict = goal(max(stale) == 0) if policy in POLICIES else "info"
            goals.append(Goal(f"stale reads after rejoin ({kind})", client, figure, "0", verdict))

    # 4. readmission
    samples: dict[str, list[float | None]] = {
        "after restart, under load (sc. 1)": each("kill", SHARDCACHE, "readmit_after_restart_s"),
        "after unfreeze, under load (sc. 2)": [
            c["readmit_after_unfreeze_s"] for kind in FREEZES for c in each("freeze", kind, SHARDCACHE)
        ],
        "after unfreeze, idle (sc. 3)": [
            c["readmit_s"] for kind in FREEZES for p in POLICIES for c in each("stale", kind, p)
        ],
    }
    for policy in HOP_POLICIES:
        samples[f"under load, 1 ms hop, {policy} (sc. 4)"] = each("hop", policy, "readmit_s")

    def seconds(value: float) -> str:
        return f"never in {READMIT_WAIT_S:g} s" if math.isinf(value) else f"{value:.3f} s"

    for label, values in samples.items():
        times = [math.inf if v is None else v for v in values]
        middle = statistics.median(times)
        over = sum(1 for t in times if t > READMIT_BOUND_S)
        figure = f"{seconds(middle)} (max {seconds(max(times))}; {over} of {len(times)} over the bound)"
        ok = middle <= READMIT_BOUND_S
        goals.append(
            Goal(
                f"readmission {label}",
                SHARDCACHE,
                figure,
                f"<= {READMIT_BOUND_S:.2f} s (probe {PROBE_S:g} s +{JITTER:.0%} jitter + 1 probe)",
                goal(ok),
            )
        )
    hc_back = [c["readmit_s"] for kind in FREEZES for c in each("stale", kind, HC_TUNED)]
    goals.append(
        Goal(
            "node used again after unfreeze",
            HC_TUNED,
            f"{med(hc_back):.3f} s (dead_timeout {PROBE_S:g} s; no probe, no fence)",
            "-",
            "info",
        )
    )

    # 5. throughput on the healthy nodes during the outage: alternated windows (scenario 5); the
    # kill scenario's single pair of windows, for the peer with its defaults and for comparison
    for name in (SHARDCACHE, HC_TUNED):
        cells = each("throughput", name)
        ratios = [c["ratio"] for c in cells]
        base = med([statistics.median(c["base"]) for c in cells])
        out = med([statistics.median(c["outage"]) for c in cells])
        figure = (
            f"{med(ratios):.0%} ({base:,.0f} -> {out:,.0f} calls/s; rounds "
            f"{', '.join(f'{r:.0%}' for r in ratios)}; {CYCLES} cycles each)"
        )
        verdict = goal(med(ratios) >= 0.9) if name == SHARDCACHE else "info"
        goals.append(Goal("healthy-node throughput, outage vs no fault", name, figure, ">= 90%", verdict))
    for name in (SHARDCACHE, HC_TUNED, HC_DEFAULTS):
        cells = each("kill", name)
        ratios = [c["healthy_rate_outage"] / c["healthy_rate_base"] for c in cells]
        figure = f"{med(ratios):.0%} (rounds {', '.join(f'{r:.0%}' for r in ratios)}; 1 s vs 1.5 s windows)"
        goals.append(Goal("the same, in the kill scenario (sc. 1)", name, figure, "-", "info"))
    return goals


def print_details(rounds: Sequence[dict[str, Any]]) -> None:
    rows = []
    for r, rnd in enumerate(rounds, 1):
        for name, c in rnd["kill"].items():
            lat = c["outage_latency"]
            rows.append(
                [
                    r,
                    name,
                    c["calls"],
                    c["exceptions"],
                    f"{lat['p50_ms']:.2f}/{lat['p99_ms']:.1f}/{lat['max_ms']:.1f}",
                    f"{c['healthy_rate_base']:,.0f}",
                    f"{c['healthy_rate_outage']:,.0f}",
                    fmt_s(c["readmit_after_restart_s"]),
                ]
            )
    print_table(
        "kill under load, per round",
        [
            "round",
            "client",
            "calls",
            "exceptions",
            "outage p50/p99/max ms",
            "healthy/s base",
            "outage",
            "readmit s",
        ],
        rows,
    )
    rows = []
    for r, rnd in enumerate(rounds, 1):
        for kind, per in rnd["freeze"].items():
            for name, c in per.items():
                v, b, f = c["victim_frozen"], c["others_base"], c["others_frozen"]
                rows.append(
                    [
                        r,
                        kind,
                        name,
                        f"{v['p50_ms']:.2f}/{v['p99_ms']:.1f}/{v['max_ms']:.1f}",
                        f"{v['slow_calls']}/{v['calls']}",
                        f"{b['p50_ms']:.2f}/{b['p99_ms']:.2f}",
                        f"{f['p50_ms']:.2f}/{f['p99_ms']:.2f}/{f['max_ms']:.1f}",
                        "-"
                        if c["readmit_after_unfreeze_s"] is None
                        else f"{c['readmit_after_unfreeze_s']:.3f}",
                    ]
                )
    print_table(
        "frozen node, per round (latencies in ms)",
        ["round", "freeze", "client", "victim p50/p99/max", "timeouts/calls", "others base p50/p99",
         "others frozen p50/p99/max", "readmit s"],
        rows,
    )  # fmt: skip
    rows = []
    for r, rnd in enumerate(rounds, 1):
        for kind, per in rnd["stale"].items():
            for policy, c in per.items():
                rows.append(
                    [
                        r,
                        kind,
                        policy,
                        f"{c['stale_after_rejoin']}/{c['changed']}",
                        c["stale_during_outage"],
                        f"{c['deleted_missing']}/80",
                        f"{c['overwritten_v2']}/80",
                        f"{c['untouched_kept']}/{c['untouched']}",
                        fmt_s(c["readmit_s"]),
                    ]
                )
    print_table(
        "freeze / update / unfreeze, per round",
        ["round", "freeze", "policy", "stale after", "stale during", "deleted absent", "overwritten = v2",
         "untouched kept", "back s"],
        rows,
        notes=["'back s': shardcache: readmission; HashClient: until its hasher maps the keys there again"],
    )  # fmt: skip
    rows = [
        [r, policy, fmt_s(c["readmit_s"]), c["fence_passes"], f"{c['victim_calls_per_s']:,.0f}"]
        for r, rnd in enumerate(rounds, 1)
        for policy, c in rnd["hop"].items()
    ]
    print_table(
        f"readmission under load, victim {HOP_S * 1e3:g} ms away each way, per round",
        ["round", "policy", "readmit s", "fence passes", "victim-key calls/s meanwhile"],
        rows,
        notes=[f"'-': not readmitted within {READMIT_WAIT_S:g} s"],
    )
    rows = [
        [
            r,
            name,
            ", ".join(f"{x:,.0f}" for x in c["base"]),
            ", ".join(f"{x:,.0f}" for x in c["outage"]),
            ", ".join(f"{x:.0%}" for x in c["ratios"]),
        ]
        for r, rnd in enumerate(rounds, 1)
        for name, c in rnd["throughput"].items()
    ]
    print_table(
        "healthy single-key calls/s, no-fault and outage windows alternated, per round",
        ["round", "client", "no fault", "outage", "ratios"],
        rows,
    )


def without_private(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: without_private(v) for k, v in data.items() if k != PRIVATE}
    if isinstance(data, list):
        return [without_private(v) for v in data]
    return data


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.failover_bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3); figures are medians")
    parser.add_argument("--json", metavar="FILE", help="also write every figure as JSON")
    parser.add_argument("--backend", choices=("process", "docker"), default="process")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    env = environment(["shardcache", "pymemcache"])
    started = time.perf_counter()
    rounds: list[dict[str, Any]] = []
    rig = Rig(args.backend)
    try:
        version = rig.cluster.nodes[1].version()
        log(f"{args.backend}: ring {rig.specs} (victim {rig.victim_id} via FaultProxy), gutter {rig.gutter}")
        for r in range(args.rounds):
            rounds.append(run_round(rig, r, log))
    finally:
        rig.close()
    elapsed = time.perf_counter() - started

    print_header("shardcache failover benchmark: real faults on real memcached", env)
    print(
        f"servers   {RING_NODES} ring + 1 gutter x memcached {version} ({args.backend}); "
        "each behind a FaultProxy, node 0 the victim"
    )
    print(
        f"settings  shardcache timeout=connect_timeout={TIMEOUT_S:g} s, failure_threshold={THRESHOLD}, "
        f"retry_interval_s=max_retry_interval_s={PROBE_S:g}, on_error='miss'"
    )
    print(
        f"peers     {HC_DEFAULTS}: use_pooling=True (threads), else pymemcache defaults (timeout None, "
        "noreply writes, retry_attempts=2, retry_timeout=1, dead_timeout=60)"
    )
    print(
        f"          {HC_TUNED}: use_pooling, ignore_exc, timeouts {TIMEOUT_S:g} s, replies awaited, "
        f"retry_attempts={THRESHOLD}, retry_timeout=dead_timeout={PROBE_S:g}"
    )
    print(f"timing    {args.rounds} rounds; total {elapsed:.0f} s")
    print()
    print_details(rounds)
    goals = evaluate(rounds)
    print_table(
        f"goals (medians over {args.rounds} rounds)",
        ["goal", "client", "measured", "target", "verdict"],
        [g.as_row() for g in goals],
        notes=["'info' rows are peers, measured on the same fault; they have no goal."],
    )
    if args.json:
        write_json(
            args.json,
            {
                "environment": env,
                "settings": {
                    "backend": args.backend,
                    "memcached": version,
                    "rounds": args.rounds,
                    "timeout_s": TIMEOUT_S,
                    "probe_interval_s": PROBE_S,
                    "failure_threshold": THRESHOLD,
                    "readmit_bound_s": READMIT_BOUND_S,
                },
                "rounds": without_private(rounds),
                "goals": [g.__dict__ for g in goals],
            },
        )
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
