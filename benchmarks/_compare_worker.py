"""Worker process of ``compare_commits``: one ``shardcache`` tree, driven over stdin/stdout.

    <venv>/bin/python -I benchmarks/_compare_worker.py TAG HOST:PORT [HOST:PORT ...]

Run by path with ``-I`` so that ``import shardcache`` resolves to the tree installed in that
interpreter's venv, never to a checkout on the current directory or ``PYTHONPATH``. It imports only
the standard library and ``shardcache``, so it runs against any commit's tree, old or new.

It builds ``shardcache.Client(addresses)`` with client_bench's settings (replies awaited, 1 s
timeouts, ``TCP_NODELAY``), checks every workload once, prints one JSON line describing the tree
(``shardcache`` path, git revision), then answers one JSON request per line until ``quit``:

- ``{"op": "block", "workload": W, "block_s": S}``: call the workload back to back for about ``S``
  seconds (as ``client_bench.timed_block``: ``gc.collect()`` before, none inside); reply
  ``{"elapsed": wall seconds, "cpu": this process's CPU seconds, "calls": n}``;
- ``{"op": "recheck"}``: every ``get_many`` key is still a hit; reply ``{"ok": true}``.

Keys carry the worker's tag and pid, so two workers never touch each other's keys. Values are
200-byte ``bytes`` under ``str`` keys; ``get_many``/``set_many`` are 100 keys, ``get``/``set`` cycle
over 100 keys, as in client_bench.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import shardcache

BATCH = 100
VALUE_SIZE = 200
TIMEOUT_S = 1.0
MAX_OPS_PER_BLOCK = 500_000


def _value(label: str) -> bytes:
    return (label.encode() + b":" + b"v" * VALUE_SIZE)[:VALUE_SIZE]


class Workloads:
    """The client and its keys; ``operation(name)`` is ``(fn, argsets)`` for a timed block."""

    def __init__(self, tag: str, specs: list[str]) -> None:
        self.client = shardcache.Client(
            specs, connect_timeout=TIMEOUT_S, timeout=TIMEOUT_S, no_delay=True, default_noreply=False
        )
        prefix = f"cc{os.getpid()}:{tag}"
        self.get_keys = [f"{prefix}:gm:{i:03d}" for i in range(BATCH)]
        self.get_values = {k: _value(k) for k in self.get_keys}
        self.set_many_values = {k: _value(k) for k in (f"{prefix}:sm:{i:03d}" for i in range(BATCH))}
        self.set_keys = [f"{prefix}:s:{i:03d}" for i in range(BATCH)]
        self.value = _value(f"{prefix}:single")

    def operation(self, name: str) -> tuple[Callable[..., Any], list[tuple[Any, ...]]]:
        client = self.client
        if name == "get_many":
            return client.get_many, [(self.get_keys,)]
        if name == "set_many":
            return client.set_many, [(self.set_many_values,)]
        if name == "get":
            return client.get, [(k,) for k in self.get_keys]
        if name == "set":
            return client.set, [(k, self.value) for k in self.set_keys]
        raise ValueError(name)

    def check(self) -> None:
        """Every workload does what it should (raises ``RuntimeError`` otherwise)."""
        client = self.client
        if client.set_many(self.get_values) or client.get_many(self.get_keys) != self.get_values:
            raise RuntimeError("set_many then get_many did not return all 100 values")
        if client.set_many(self.set_many_values) or client.get_many(list(self.set_many_values)) != (
            self.set_many_values
        ):
            raise RuntimeError("set_many then get_many did not round trip")
        if client.get(self.get_keys[0]) != self.get_values[self.get_keys[0]]:
            raise RuntimeError("get returned a wrong value")
        if client.set(self.set_keys[0], self.value) is not True or client.get(self.set_keys[0]) != self.value:
            raise RuntimeError("set then get did not round trip")

    def recheck(self) -> None:
        if self.client.get_many(self.get_keys) != self.get_values:
            raise RuntimeError("after the timed rounds get_many no longer returns all 100 values")


def timed_block(
    fn: Callable[..., Any], argsets: list[tuple[Any, ...]], budget_s: float
) -> tuple[float, float, int]:
    """Call ``fn`` back to back for about ``budget_s``: ``(wall seconds, CPU seconds, calls)``."""
    gc.collect()
    clock = time.perf_counter
    n = len(argsets)
    cpu_start = time.process_time()
    start = end = clock()
    deadline = start + budget_s
    calls = 0
    for i in range(MAX_OPS_PER_BLOCK):
        fn(*argsets[i % n])
        calls = i + 1
        end = clock()
        if end >= deadline:
            break
    return end - start, time.process_time() - cpu_start, calls


def describe() -> dict[str, Any]:
    """Which ``shardcache`` this process imported, and the git revision of its tree."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(shardcache.__file__)))
    try:
        rev = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = None
    return {"tree": root, "git": rev, "python": sys.executable, "pid": os.getpid()}


def main(argv: list[str]) -> int:
    tag, *specs = argv
    work = Workloads(tag, specs)
    work.check()
    for name in ("get_many", "set_many", "get", "set"):  # warm-up: connections, caches, code paths
        timed_block(*work.operation(name), 0.05)
    print(json.dumps(describe()), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "block":
            elapsed, cpu, calls = timed_block(*work.operation(request["workload"]), request["block_s"])
            reply: dict[str, Any] = {"elapsed": elapsed, "cpu": cpu, "calls": calls}
        elif request["op"] == "recheck":
            work.recheck()
            reply = {"ok": True}
        elif request["op"] == "quit":
            break
        else:
            raise ValueError(f"unknown request {request!r}")
        print(json.dumps(reply), flush=True)
    work.client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
