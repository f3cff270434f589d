"""Worker process of ``benchmarks.history``: T threads of random calls on one shared ``Client``.

    python -m benchmarks._history_worker --name w0 --dir RUN_DIR --threads 4 --deadline-ns N ...

Every call is logged to ``RUN_DIR/ops-<name>.jsonl`` in the format ``load_history`` reads: an invoke
line before the call and a completion line after it, each written with one ``os.write`` on an
``O_APPEND`` descriptor (nothing is buffered in the process, so a ``kill -9`` loses at most the
completion of the calls in flight, which the checker then treats as ambiguous).

Membership: ``RUN_DIR/ring.json`` (``{"version": n, "servers": [...]}``, replaced atomically by the
runner) is polled every 50 ms; a new version is applied with ``set_nodes`` ``--apply-delay-s``
after this process first saw it, so processes change their view at deliberately different moments.
Times are ``CLOCK_MONOTONIC`` nanoseconds, one clock for every process of the machine.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import shardcache

REGISTERS = [f"r{i}" for i in range(8)]
INCR_COUNTERS = [f"c{i}" for i in range(3)]
CAS_COUNTERS = [f"q{i}" for i in range(3)]
LOCKS = [f"l{i}" for i in range(2)]
LOCK_TTL_S = 3
LOCK_WAIT_S = 0.5
MAX_HOLD_S = 0.02
WEIGHTS = {"get": 35, "set": 22, "delete": 5, "incr": 15, "cas_update": 10, "lock": 13}
POLL_S = 0.05


def now() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def read_control(path: Path) -> tuple[int, list[str]]:
    data = json.loads(path.read_text(encoding="utf-8"))
    return int(data["version"]), list(data["servers"])


class OpLog:
    """Append-only JSONL, one ``os.write`` per line; thread-safe (O_APPEND writes are atomic)."""

    def __init__(self, path: Path, process: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._ids = itertools.count(1)
        self._process = process

    def _write(self, record: dict[str, Any]) -> None:
        os.write(self._fd, (json.dumps(record, separators=(",", ":")) + "\n").encode())

    def call(
        self, thread: int, kind: str, key: str, arg: Any, node: str | None, fn: Callable[[], tuple[str, Any]]
    ) -> tuple[str, Any]:
        """Log the invocation, run ``fn`` (-> (outcome, value)), log the completion; an exception
        is an ambiguous outcome (a refusal would have been returned as ``failed``)."""
        op_id = next(self._ids)
        self._write({"i": op_id, "p": self._process, "th": thread, "k": kind, "key": key, "arg": arg,
                     "s": now(), "n": node})  # fmt: skip
        try:
            outcome, value = fn()
        except shardcache.CasConflictError:
            outcome, value = "failed", None
        except shardcache.ShardcacheError as exc:
            outcome, value = "ambiguous", type(exc).__name__
        self._write({"c": op_id, "e": now(), "o": outcome, "v": value})
        return outcome, value

    def close(self) -> None:
        os.close(self._fd)


def _stored(result: Any) -> tuple[str, Any]:
    return ("ok", None) if result else ("failed", None)


def _counted(result: Any) -> tuple[str, Any]:
    return ("ok", int(result)) if result is not None else ("failed", None)


class Worker:
    """The threads of one process; ``run_thread`` loops until the deadline."""

    def __init__(self, args: argparse.Namespace, client: shardcache.Client) -> None:
        self.name: str = args.name
        self.client = client
        self.deadline_ns: int = args.deadline_ns
        self.think_s: float = args.think_ms / 1000
        self.seed: int = args.seed
        self.log = OpLog(Path(args.dir) / f"ops-{self.name}.jsonl", self.name)

    def run_thread(self, thread: int) -> None:
        rng = random.Random(f"{self.seed}-{self.name}-{thread}")
        kinds, weights = list(WEIGHTS), list(WEIGHTS.values())
        for seq in itertools.count():
            if now() >= self.deadline_ns:
                return
            kind = rng.choices(kinds, weights)[0]
            self.one_call(rng, thread, seq, kind)
            if self.think_s:
                time.sleep(rng.uniform(0, 2 * self.think_s))

    def one_call(self, rng: random.Random, thread: int, seq: int, kind: str) -> None:
        c, log = self.client, self.log
        if kind == "get":
            key = rng.choice(REGISTERS)
            log.call(thread, kind, key, None, c.node_for(key), lambda: _read(c.get(key)))
        elif kind == "set":
            key, value = rng.choice(REGISTERS), f"{self.name}-{thread}-{seq}"
            log.call(thread, kind, key, value, c.node_for(key), lambda: _stored(c.set(key, value)))
        elif kind == "delete":
            key = rng.choice(REGISTERS)
            log.call(thread, kind, key, None, c.node_for(key), lambda: ("ok", bool(c.delete(key))))
        elif kind == "incr":
            key = rng.choice(INCR_COUNTERS)
            log.call(thread, kind, key, 1, c.node_for(key), lambda: _counted(c.incr(key, 1, initial=1)))
        elif kind == "cas_update":
            key = rng.choice(CAS_COUNTERS)
            update = lambda: _counted(c.cas_update(key, lambda n: int(n) + 1, initial=0))  # noqa: E731
            log.call(thread, kind, key, 1, c.node_for(key), update)
        else:
            self.lock_call(rng, thread, seq)

    def lock_call(self, rng: random.Random, thread: int, seq: int) -> None:
        name = rng.choice(LOCKS)
        holder = f"{self.name}-{thread}-{seq}"
        lock = self.client.lock(name, ttl_s=LOCK_TTL_S, blocking_timeout_s=LOCK_WAIT_S)
        node = self.client.node_for(lock.name)
        outcome, _ = self.log.call(thread, "acquire", name, holder, node, lambda: _stored(lock.acquire()))
        if outcome != "ok":
            return
        time.sleep(rng.uniform(0.001, MAX_HOLD_S))
        self.log.call(thread, "release", name, holder, node, lambda: _stored(lock.release()))


def _read(value: Any) -> tuple[str, Any]:
    return ("miss", None) if value is None else ("ok", value)


def follow_membership(client: shardcache.Client, control: Path, delay_s: float, deadline_ns: int) -> None:
    """Apply each new server list ``delay_s`` after first seeing it, until the deadline."""
    applied, _ = read_control(control)
    pending: tuple[int, list[str], float] | None = None
    while now() < deadline_ns:
        time.sleep(POLL_S)
        try:
            version, servers = read_control(control)
        except (OSError, ValueError):
            continue
        if version > applied and (pending is None or version > pending[0]):
            pending = (version, servers, time.monotonic() + delay_s)
        if pending is not None and time.monotonic() >= pending[2]:
            client.set_nodes(pending[1])
            applied, pending = pending[0], None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--deadline-ns", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--think-ms", type=float, default=2.0)
    parser.add_argument("--apply-delay-s", type=float, default=0.0)
    parser.add_argument("--failover", default="fail_fast")
    parser.add_argument("--gutter", action="append", default=[])
    parser.add_argument("--fleet-refresh-s", type=float, default=0.5, help="0: fleet fencing off")
    args = parser.parse_args()
    control = Path(args.dir) / "ring.json"
    _, servers = read_control(control)
    options: dict[str, Any] = {"timeout": 0.5, "connect_timeout": 0.5, "failover": args.failover,
                               "fleet_refresh_s": args.fleet_refresh_s or None}  # fmt: skip
    if args.gutter:
        options["gutter_servers"] = args.gutter
    client = shardcache.Client(servers, **options)

    def trace(event: shardcache.Event) -> None:  # node life, for reading a violation's context
        if event.kind != "error":
            print(f"{time.monotonic_ns()} {event.kind} {event.node_id} {event.detail}", flush=True)

    client.add_listener(trace)
    worker = Worker(args, client)
    threads = [
        threading.Thread(target=worker.run_thread, args=(i,), name=f"{args.name}-{i}", daemon=True)
        for i in range(args.threads)
    ]
    for t in threads:
        t.start()
    follow_membership(client, control, args.apply_delay_s, args.deadline_ns)
    for t in threads:
        t.join(timeout=LOCK_WAIT_S + 5.0)
    worker.log.close()
    client.close()


if __name__ == "__main__":
    main()
