"""Client throughput and latency: shardcache against pymemcache, on real memcached servers.

    .venv/bin/python -m benchmarks.client_bench [--rounds N] [--quick] [--delay-ms 0.5] [--json FILE]

Starts ``--nodes`` (4) local memcached processes on 127.0.0.1 and runs every client side by side in
this one process, in interleaved rounds (each round times every client once, in an order rotated
every round), and reports medians over the rounds:

- ``shardcache``: ``shardcache.Client(specs)``;
- ``HashClient (rendezvous)``: pymemcache ``HashClient(servers)`` with its default hasher;
- ``HashClient (uhashring)``: the same with a hasher wrapping ``uhashring.HashRing`` (its default
  md5 ring, 160 points per node);
- ``pymemcache.Client (1 node)``: pymemcache's plain client against ONE of the nodes: the baseline
  of "everything on one server", with no routing at all;
- ``pymemcache.Client per node (pre-routed)``, single-key workloads only: a control, one pymemcache
  client per node with each key's client looked up in a dict. It shows what spreading calls over
  all the servers costs by itself on this machine, apart from any client's code;
- ``raw sockets (floor)``, multi-key workloads only: a control with no client code, requests
  built once and written to every node at once, replies read to their end without parsing. It is
  the ceiling of any client that fans out over these nodes, on this machine.

All use the same settings: replies awaited (``default_noreply=False``), 1 s connect and read
timeouts, ``TCP_NODELAY``; values are 200-byte ``bytes`` (no serialization) under ``str`` keys.
Each client has its own keys, so writes never interfere, and each is checked once per phase
(``get_many`` returns exactly its 100 values, ``set_many`` stores all, ``get``/``set`` round trip),
and again after the timed rounds (every ``get_many`` key still a hit).

Workloads: ``get_many`` of 100 keys (all hits), ``set_many`` of 100 keys, single ``get`` and ``set``
(cycling over 100 keys). Phases: ``loopback`` (direct connections) runs all four; ``delayed`` runs
the two batch workloads with every connection of every client through a delay relay that holds
each chunk ``--delay-ms`` in each direction (so a round trip gains twice that). The relay is
``delayrelay.c`` next to this file, built with gcc on first use into a cache directory outside the
repository (``$SHARDCACHE_BENCH_CACHE``, default ``/tmp/shardcache-bench-<uid>``): one process (so
it shares no interpreter lock with the clients) running one epoll loop with one absolute timerfd
for all the nodes, so it wakes on time; a Python relay's epoll timeout has millisecond granularity
(shardcache.testing.FaultProxy in a subprocess adds about 2.4 ms per round trip instead of 1 ms).

The header prints the ``version`` round trip to one node and to all nodes at once (requests sent to
every node, then every reply read), direct and through the relay: the second is the floor of any
call that fans out, on this machine (all the servers wake at the same time on its few cores).

A timed block calls one client's operation back to back for ``--block-s`` seconds (a
``gc.collect()`` runs before each block, none is forced inside); its calls/s is one sample, and the
table shows the median over the rounds and the middle half of them (25th-75th percentile), plus
p50/p99 of the per-call latencies of all rounds pooled. Ratios are paired: the median over the
rounds of shardcache's calls/s divided by the peer's in the same round (short blocks and many
rounds, so a burst of load from other processes spoils a few pairs, not the median). The goals
are printed as PASS/MISS; nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import os
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pymemcache.client.base import Client as PymemcacheClient
from pymemcache.client.hash import HashClient
from uhashring import HashRing

import shardcache
from benchmarks._util import Stats, environment, goal, print_header, print_table, write_json
from shardcache.testing import LocalCluster

BATCH = 100
VALUE_SIZE = 200
TIMEOUT_S = 1.0
MAX_OPS_PER_BLOCK = 500_000

SHARDCACHE = "shardcache"
HASH_RENDEZVOUS = "HashClient (rendezvous)"
HASH_UHASHRING = "HashClient (uhashring)"
SINGLE = "pymemcache.Client (1 node)"
PREROUTED = "pymemcache.Client per node (pre-routed)"
RAW = "raw sockets (floor)"
PEERS = (SHARDCACHE, HASH_RENDEZVOUS, HASH_UHASHRING, SINGLE)
BATCH_CLIENTS = (*PEERS, RAW)  # plus a control for each kind of workload
SINGLE_OP_CLIENTS = (*PEERS, PREROUTED)
_TAGS = {
    SHARDCACHE: "sc",
    HASH_RENDEZVOUS: "hr",
    HASH_UHASHRING: "hu",
    SINGLE: "sn",
    PREROUTED: "pr",
    RAW: "rw",
}

LOOPBACK_WORKLOADS = ("get_many", "set_many", "get", "set")
DELAYED_WORKLOADS = ("get_many", "set_many")

Address = tuple[str, int]


# --------------------------------------------------------------------------------------------------
# clients
# --------------------------------------------------------------------------------------------------
class UHashRingHasher:
    """A pymemcache ``HashClient`` hasher backed by ``uhashring.HashRing`` (default md5 ring)."""

    def __init__(self) -> None:
        self._ring = HashRing(nodes=[])

    def add_node(self, node: str) -> None:
        self._ring.add_node(node)

    def remove_node(self, node: str) -> None:
        self._ring.remove_node(node)

    def get_node(self, key: str | bytes) -> str | None:
        node: str | None = self._ring.get_node(key)
        return node


class PreRouted:
    """Control for single-key calls: one pymemcache ``Client`` per node, keys routed by a dict.

    The dict (key -> client, filled from a shardcache ``Ring`` on first use of a key) makes routing
    cost next to nothing, so this measures what spreading calls over all the nodes costs by itself
    on this machine (another server process to wake for each call), apart from any client's code.
    """

    def __init__(self, addresses: Sequence[Address], **options: Any) -> None:
        self._clients = {
            f"{host}:{port}": PymemcacheClient((host, port), **options) for host, port in addresses
        }
        self._ring = shardcache.Ring(list(self._clients))
        self._route: dict[str, PymemcacheClient] = {}

    def _client(self, key: str) -> PymemcacheClient:
        client = self._route.get(key)
        if client is None:
            client = self._route[key] = self._clients[self._ring.node_for(key)]
        return client

    def get(self, key: str, default: Any = None) -> Any:
        return self._client(key).get(key, default)

    def set(self, key: str, value: Any) -> bool:
        stored: bool = self._client(key).set(key, value)
        return stored

    def get_many(self, keys: Sequence[str]) -> dict[str, Any]:  # for the checks only: one by one
        found = {key: self.get(key) for key in keys}
        return {key: value for key, value in found.items() if value is not None}

    def set_many(self, values: dict[str, Any]) -> list[str]:  # for the checks only: one by one
        return [key for key, value in values.items() if not self.set(key, value)]

    def node_of(self, key: str) -> str:
        node: str = self._ring.node_for(key)
        return node

    def close(self) -> None:
        for client in self._clients.values():
            client.close()


class RawPipelined:
    """Control for multi-key calls: what the network and the servers cost, with no client code.

    The requests are built once per batch (keys placed by a shardcache ``Ring``, as shardcache places
    them), written to every node at once, and the replies read until complete, without parsing
    (``END`` for gets, one line per item for sets: the values here never end with ``END``). Its
    calls/s is the ceiling of any client that fans out to these nodes on this machine.
    """

    def __init__(self, addresses: Sequence[Address]) -> None:
        self._addresses = {f"{host}:{port}": (host, port) for host, port in addresses}
        self._ring = shardcache.Ring(list(self._addresses))
        self._socks: dict[str, socket.socket] = {}
        self._plans: dict[int, tuple[Any, list[tuple[socket.socket, bytes, int]]]] = {}

    def _sock(self, node: str) -> socket.socket:
        sock = self._socks.get(node)
        if sock is None:
            sock = socket.create_connection(self._addresses[node], timeout=TIMEOUT_S)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._socks[node] = sock
        return sock

    def _plan(self, batch: Any, requests: Callable[[str, list[Any]], tuple[bytes, int]]) -> Any:
        """Per-node ``(socket, request, replies expected)`` for ``batch``, built on first use."""
        cached = self._plans.get(id(batch))
        if cached is not None and cached[0] is batch:
            return cached[1]
        by_node: dict[str, list[Any]] = {}
        for item in batch.items() if isinstance(batch, dict) else batch:
            key = item[0] if isinstance(item, tuple) else item
            by_node.setdefault(self._ring.node_for(key), []).append(item)
        plan = [(self._sock(node), *requests(node, items)) for node, items in by_node.items()]
        self._plans[id(batch)] = (batch, plan)
        return plan

    @staticmethod
    def _read(sock: socket.socket, complete: Callable[[bytes], bool]) -> bytes:
        reply = b""
        while not complete(reply):
            chunk = sock.recv(262144)
            if not chunk:
                raise ConnectionError("memcached closed the connection")
            reply += chunk
        return reply

    def fetch(self, keys: list[str]) -> list[bytes]:
        """Pipelined ``get`` of ``keys`` on all their nodes at once; the raw replies."""
        plan = self._plan(keys, lambda _, ks: (b"get " + " ".join(ks).encode() + b"\r\n", 1))
        for sock, request, _ in plan:
            sock.sendall(request)
        return [self._read(sock, lambda r: r.endswith(b"END\r\n")) for sock, _, _ in plan]

    def store(self, values: dict[str, bytes]) -> list[bytes]:
        """Pipelined ``set`` of every item on all the nodes at once; the raw replies."""

        def requests(_: str, items: list[tuple[str, bytes]]) -> tuple[bytes, int]:
            commands = (b"set %b 0 0 %d\r\n%b\r\n" % (k.encode(), len(v), v) for k, v in items)
            return b"".join(commands), len(items)

        plan = self._plan(values, requests)
        for sock, request, _ in plan:
            sock.sendall(request)
        return [self._read(sock, lambda r, n=n: r.count(b"\r\n") >= n) for sock, _, n in plan]

    # the checks only: parse what fetch/store return
    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        found: dict[str, bytes] = {}
        for reply in self.fetch(keys):
            lines = reply.split(b"\r\n")
            for i in range(0, len(lines) - 2, 2):
                _, key, _, _ = lines[i].split()
                found[key.decode()] = lines[i + 1]
        return found

    def set_many(self, values: dict[str, bytes]) -> list[str]:
        replies = b"".join(self.store(values)).split()
        return [] if replies == [b"STORED"] * len(values) else list(values)

    def node_of(self, key: str) -> str:
        node: str = self._ring.node_for(key)
        return node

    def close(self) -> None:
        for sock in self._socks.values():
            sock.close()
        self._socks.clear()


def make_client(name: str, addresses: Sequence[Address]) -> Any:
    common: dict[str, Any] = {
        "connect_timeout": TIMEOUT_S,
        "timeout": TIMEOUT_S,
        "no_delay": True,
        "default_noreply": False,
    }
    if name == SHARDCACHE:
        return shardcache.Client([f"{host}:{port}" for host, port in addresses], **common)
    if name == HASH_RENDEZVOUS:
        return HashClient(list(addresses), **common)
    if name == HASH_UHASHRING:
        return HashClient(list(addresses), hasher=UHashRingHasher, **common)
    if name == SINGLE:
        return PymemcacheClient(addresses[0], **common)
    if name == PREROUTED:
        return PreRouted(addresses, **common)
    if name == RAW:
        return RawPipelined(addresses)
    raise ValueError(name)


def node_of(name: str, client: Any, key: str) -> str:
    """The ``host:port`` a client sends ``key`` to (for the key-spread line of the header)."""
    if name == SHARDCACHE:
        node: str = client.node_for(key)
        return node
    if name in (HASH_RENDEZVOUS, HASH_UHASHRING):
        node = client.hasher.get_node(key)
        return node
    if name in (PREROUTED, RAW):
        node = client.node_of(key)
        return node
    host, port = client.server
    return f"{host}:{port}"


@dataclass
class Dataset:
    """One client's keys and values (distinct per client: writes never interfere)."""

    get_keys: list[str]
    get_values: dict[str, bytes]
    set_many_values: dict[str, bytes]
    set_keys: list[str]
    value: bytes

    @classmethod
    def for_client(cls, name: str) -> Dataset:
        tag = f"cb{os.getpid()}:{_TAGS[name]}"

        def value(label: str) -> bytes:
            return (label.encode() + b":" + b"v" * VALUE_SIZE)[:VALUE_SIZE]

        get_keys = [f"{tag}:gm:{i:03d}" for i in range(BATCH)]
        set_many_keys = [f"{tag}:sm:{i:03d}" for i in range(BATCH)]
        return cls(
            get_keys=get_keys,
            get_values={k: value(k) for k in get_keys},
            set_many_values={k: value(k) for k in set_many_keys},
            set_keys=[f"{tag}:s:{i:03d}" for i in range(BATCH)],
            value=value(f"{tag}:single"),
        )

    def operation(self, client: Any, workload: str) -> tuple[Callable[..., Any], list[tuple[Any, ...]]]:
        """``(fn, argsets)``: a timed block calls ``fn(*argsets[i % len(argsets)])``."""
        raw = isinstance(client, RawPipelined)
        if workload == "get_many":
            return client.fetch if raw else client.get_many, [(self.get_keys,)]
        if workload == "set_many":
            return client.store if raw else client.set_many, [(self.set_many_values,)]
        if workload == "get":
            return client.get, [(k,) for k in self.get_keys]
        if workload == "set":
            return client.set, [(k, self.value) for k in self.set_keys]
        raise ValueError(workload)


class CheckFailedError(RuntimeError):
    pass


def check_client(name: str, client: Any, data: Dataset) -> None:
    """Once per client and phase: every operation does what it should, with all keys hit."""
    failed = client.set_many(data.get_values)
    if failed:
        raise CheckFailedError(f"{name}: set_many did not store {len(failed)} keys: {failed[:3]}")
    got = client.get_many(data.get_keys)
    if got != data.get_values:
        raise CheckFailedError(f"{name}: get_many returned {len(got)} of {BATCH} values, or wrong ones")
    failed = client.set_many(data.set_many_values)
    if failed or client.get_many(list(data.set_many_values)) != data.set_many_values:
        raise CheckFailedError(f"{name}: set_many then get_many did not round trip")
    if not hasattr(client, "get"):
        return  # the batch-only control
    if client.get(data.get_keys[0]) != data.get_values[data.get_keys[0]]:
        raise CheckFailedError(f"{name}: get returned a wrong value")
    if client.set(data.set_keys[0], data.value) is not True or client.get(data.set_keys[0]) != data.value:
        raise CheckFailedError(f"{name}: set then get did not round trip")


def recheck_hits(name: str, client: Any, data: Dataset) -> None:
    if client.get_many(data.get_keys) != data.get_values:
        raise CheckFailedError(
            f"{name}: after the timed rounds get_many no longer returns all {BATCH} values"
        )


# --------------------------------------------------------------------------------------------------
# the delay relay (benchmarks/delayrelay.c): one process for all the nodes
# --------------------------------------------------------------------------------------------------
RELAY_SOURCE = Path(__file__).with_name("delayrelay.c")


class RelayUnavailableError(RuntimeError):
    pass


def relay_binary() -> Path:
    """The compiled relay, built with gcc on first use (cached by a hash of its source)."""
    source = RELAY_SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:16]
    cache = Path(
        os.environ.get("SHARDCACHE_BENCH_CACHE")
        or Path(tempfile.gettempdir()) / f"shardcache-bench-{os.getuid()}"
    )
    binary = cache / f"delayrelay-{digest}"
    if binary.exists():
        return binary
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise RelayUnavailableError(
            "the delayed phase needs a C compiler to build benchmarks/delayrelay.c (no gcc/cc on PATH): "
            "install gcc (Debian: apt-get install gcc), or run with --phase loopback"
        )
    cache.mkdir(parents=True, exist_ok=True)
    partial = cache / f".delayrelay-{digest}.{os.getpid()}"
    result = subprocess.run(
        [compiler, "-O2", "-Wall", "-o", str(partial), str(RELAY_SOURCE)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise RelayUnavailableError(
            f"building {RELAY_SOURCE} with {compiler} failed:\n{result.stderr.strip()}\n"
            "(run with --phase loopback to skip the delayed phase)"
        )
    os.replace(partial, binary)
    return binary


class DelayRelay:
    """One ``delayrelay`` process for all the nodes: ``addresses[i]`` -> ``target_ports[i]``.

    Every connection through it gains ``delay_s`` in each direction. One process (one epoll loop)
    serves every node: on two cores, fewer processes to wake means less scheduling noise, and the
    delay of one connection never waits for another's (nothing blocks in the loop).
    """

    def __init__(self, binary: Path, target_ports: Sequence[int], delay_s: float) -> None:
        self.proc = subprocess.Popen(
            [str(binary), str(round(delay_s * 1e6)), *(str(port) for port in target_ports)],
            stdin=subprocess.PIPE,  # the relay exits when this closes (or when we die)
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            ports = self._read_ports(len(target_ports), timeout_s=5.0)
        except BaseException:
            self.close()
            raise
        self.addresses: list[Address] = [("127.0.0.1", port) for port in ports]

    def _read_ports(self, count: int, timeout_s: float) -> list[int]:
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout_s):
                raise RelayUnavailableError(
                    f"delayrelay pid {self.proc.pid} did not start within {timeout_s} s"
                )
        words = self.proc.stdout.readline().decode(errors="replace").split()
        if len(words) != count + 1 or words[0] != "PORT":
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.poll() is not None else ""
            raise RelayUnavailableError(f"delayrelay failed to start: {words!r} {err.strip()}")
        return [int(word) for word in words[1:]]

    def close(self) -> None:
        """Stop the relay (stdin closed, then SIGKILL after 2 s) and reap it."""
        proc = self.proc
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.stdin.close()  # type: ignore[union-attr]
            try:
                proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5.0)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


@contextlib.contextmanager
def delay_relay(target_ports: Sequence[int], delay_s: float) -> Iterator[DelayRelay]:
    relay = DelayRelay(relay_binary(), target_ports, delay_s)
    try:
        yield relay
    finally:
        relay.close()


def round_trip_ms(addresses: Sequence[Address], count: int = 500) -> float:
    """Median time (ms) of ``version`` sent to every address at once and all the replies read.

    With one address it is the plain round trip; with all the nodes it is the floor of a call that
    fans out to every node, on this machine (all the servers and relays wake at the same time).
    """
    samples = []
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.create_connection(a, timeout=TIMEOUT_S)) for a in addresses]
        for sock in socks:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(count):
            start = time.perf_counter()
            for sock in socks:
                sock.sendall(b"version\r\n")
            for sock in socks:
                reply = b""
                while not reply.endswith(b"\r\n"):
                    chunk = sock.recv(256)
                    if not chunk:
                        raise ConnectionError(f"{sock.getpeername()} closed the connection")
                    reply += chunk
            samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def round_trips(addresses: Sequence[Address]) -> tuple[float, float]:
    """``(one node, all nodes at once)``: medians over the nodes / of the fan-out, in ms."""
    one = statistics.median(round_trip_ms([a]) for a in addresses)
    return one, round_trip_ms(addresses)


# --------------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------------
def timed_block(
    fn: Callable[..., Any], argsets: Sequence[tuple[Any, ...]], budget_s: float
) -> tuple[float, list[float]]:
    """Call ``fn`` back to back for about ``budget_s``: ``(elapsed seconds, per-call latencies)``."""
    gc.collect()
    clock = time.perf_counter
    latencies: list[float] = []
    record = latencies.append
    n = len(argsets)
    start = end = clock()
    deadline = start + budget_s
    for i in range(MAX_OPS_PER_BLOCK):
        args = argsets[i % n]
        t0 = clock()
        fn(*args)
        end = clock()
        record(end - t0)
        if end >= deadline:
            break
    return end - start, latencies


@dataclass
class Cell:
    """One client on one workload in one phase: per-round rates and all per-call latencies."""

    rates: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)

    def add(self, elapsed: float, latencies: list[float]) -> None:
        self.rates.append(len(latencies) / elapsed)
        self.latencies.extend(latencies)

    @property
    def stats(self) -> Stats:
        """Seconds per call, one sample per round (``stats.rate(1)`` = calls/s of the median round)."""
        return Stats(tuple(1.0 / r for r in self.rates))

    def percentile_us(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6

    def as_dict(self) -> dict[str, Any]:
        return {
            "calls_per_s": self.stats.rate(1),
            "calls_per_s_rounds": self.rates,
            "p50_us": self.percentile_us(0.50),
            "p99_us": self.percentile_us(0.99),
            "calls": len(self.latencies),
        }


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """``(25th percentile, median, 75th percentile)``; the middle half of the rounds lies between."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def paired_ratio(a: Cell, b: Cell) -> tuple[float, float, float]:
    """Quartiles over the rounds of ``a``'s calls/s divided by ``b``'s in the same round."""
    return quartiles([x / y for x, y in zip(a.rates, b.rates, strict=True)])


def run_phase(
    phase: str,
    addresses: Sequence[Address],
    workloads: Sequence[str],
    rounds: int,
    block_s: float,
    log: Callable[[str], None],
) -> tuple[dict[str, dict[str, Cell]], dict[str, str]]:
    """All clients on all ``workloads``, interleaved: ``({workload: {client: Cell}}, spread)``."""
    line_up = {w: SINGLE_OP_CLIENTS if w in ("get", "set") else BATCH_CLIENTS for w in workloads}
    names = [n for n in (*PEERS, PREROUTED, RAW) if any(n in group for group in line_up.values())]
    clients = {name: make_client(name, addresses) for name in names}
    data = {name: Dataset.for_client(name) for name in names}
    ports = [f"{host}:{port}" for host, port in addresses]
    try:
        spread = {}
        for name, client in clients.items():
            check_client(name, client, data[name])
            counts = Counter(node_of(name, client, k) for k in data[name].get_keys)
            spread[name] = "/".join(str(counts.get(p, 0)) for p in ports)
        ops = {w: {n: data[n].operation(clients[n], w) for n in line_up[w]} for w in workloads}
        for per_client in ops.values():  # warm-up: connections, caches, code paths
            for fn, argsets in per_client.values():
                timed_block(fn, argsets, min(0.1, block_s))
        cells = {w: {n: Cell() for n in line_up[w]} for w in workloads}
        for r in range(rounds):
            for workload in workloads:
                group = line_up[workload]
                for name in group[r % len(group) :] + group[: r % len(group)]:
                    fn, argsets = ops[workload][name]
                    cells[workload][name].add(*timed_block(fn, argsets, block_s))
            if (r + 1) % 5 == 0 or r + 1 == rounds:
                log(f"  {phase}: round {r + 1}/{rounds} done")
        for name, client in clients.items():
            recheck_hits(name, client, data[name])
        return cells, spread
    finally:
        for client in clients.values():
            with contextlib.suppress(Exception):
                client.close()


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------
@dataclass
class Goal:
    what: str
    peer: str
    target: float | None  # None: shown for information, no goal
    ratio: tuple[float, float, float]  # quartiles of the per-round ratios

    @property
    def verdict(self) -> str:
        return "info" if self.target is None else goal(self.ratio[1] >= self.target)

    def as_dict(self) -> dict[str, Any]:
        low, median, high = self.ratio
        return {
            "what": self.what,
            "peer": self.peer,
            "target": self.target,
            "ratio": median,
            "ratio_q1": low,
            "ratio_q3": high,
            "verdict": self.verdict,
        }


def goals_for(phase: str, cells: dict[str, dict[str, Cell]]) -> list[Goal]:
    out: list[Goal] = []
    for workload, per_client in cells.items():
        sc = per_client[SHARDCACHE]
        what = f"{workload} {phase}"
        if workload in ("get_many", "set_many"):
            hash_target = 4.0 if phase == "delayed" else 2.0
            single_target = 1.0 if phase == "delayed" else None
            for peer in (HASH_RENDEZVOUS, HASH_UHASHRING):
                out.append(Goal(what, peer, hash_target, paired_ratio(sc, per_client[peer])))
            out.append(Goal(what, SINGLE, single_target, paired_ratio(sc, per_client[SINGLE])))
            out.append(Goal(what, RAW, None, paired_ratio(sc, per_client[RAW])))
        else:
            out.append(Goal(what, SINGLE, 0.95, paired_ratio(sc, per_client[SINGLE])))
            for peer in (HASH_RENDEZVOUS, HASH_UHASHRING, PREROUTED):
                out.append(Goal(what, peer, None, paired_ratio(sc, per_client[peer])))
    return out


def print_phase(phase: str, cells: dict[str, dict[str, Cell]], note: str) -> None:
    for workload, per_client in cells.items():
        single = per_client[SINGLE].stats.rate(1)
        rows = []
        for name, cell in per_client.items():
            rate = cell.stats.rate(1)
            rows.append(
                [
                    name,
                    f"{rate:,.0f}",
                    "{:,.0f}-{:,.0f}".format(*quartiles(cell.rates)[::2]),
                    f"{cell.percentile_us(0.50):,.0f}",
                    f"{cell.percentile_us(0.99):,.0f}",
                    f"{rate / single:.2f}x",
                ]
            )
        unit = f"calls/s (1 call = {BATCH} keys)" if workload.endswith("_many") else "calls/s"
        print_table(
            f"{phase}: {workload}"
            + (f" of {BATCH} keys" if workload.endswith("_many") else f" ({VALUE_SIZE} B)"),
            ["client", unit, "middle half of rounds", "p50 us", "p99 us", "vs 1 node"],
            rows,
            notes=[note],
        )


def print_goals(goals: Sequence[Goal]) -> None:
    rows = []
    for g in goals:
        low, median, high = g.ratio
        target = "-" if g.target is None else f">= {g.target:g}x"
        rows.append(
            [g.what, f"shardcache / {g.peer}", f"{median:.2f}x", f"{low:.2f}-{high:.2f}", target, g.verdict]
        )
    print_table(
        "ratios (paired per round) and goals",
        ["workload", "ratio", "median", "middle half", "goal", "verdict"],
        rows,
        notes=[
            "ratio of calls/s in the same round; median and 25th-75th percentile over the rounds.",
            "PASS/MISS compare the median with the goal; 'info' rows have no goal.",
        ],
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.client_bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 25, quick 5)")
    parser.add_argument("--quick", action="store_true", help="5 rounds of 0.05 s blocks (a smoke run)")
    parser.add_argument("--block-s", type=float, default=None, help="seconds per timed block (default 0.1)")
    parser.add_argument(
        "--delay-ms", type=float, default=0.5, help="delayed phase: added delay each way (default 0.5)"
    )
    parser.add_argument("--phase", choices=("both", "loopback", "delayed"), default="both")
    parser.add_argument("--nodes", type=int, default=4, help="memcached servers (default 4)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    rounds = args.rounds if args.rounds is not None else (5 if args.quick else 25)
    block_s = args.block_s if args.block_s is not None else (0.05 if args.quick else 0.1)
    if rounds < 1 or block_s <= 0 or args.nodes < 1 or args.delay_ms < 0:
        parser.error("--rounds, --block-s and --nodes must be positive, --delay-ms >= 0")
    phases = ("loopback", "delayed") if args.phase == "both" else (args.phase,)
    delay_s = args.delay_ms / 1e3

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    env = environment(["shardcache", "pymemcache", "uhashring", "mmh3"])
    if "delayed" in phases:
        try:
            relay_binary()  # fail before starting anything if it cannot be built
        except RelayUnavailableError as exc:
            print(f"client_bench: {exc}", file=sys.stderr)
            return 2
    started = time.perf_counter()
    results: dict[str, Any] = {}
    all_goals: list[Goal] = []
    with LocalCluster(args.nodes, backend="process") as cluster:
        nodes = [node.address for node in cluster.nodes]
        memcached_version = cluster.nodes[0].version()
        rtt: dict[str, dict[str, float]] = {}
        tables: list[tuple[str, dict[str, dict[str, Cell]], str]] = []
        spreads: dict[str, dict[str, str]] = {}

        def note(path: str, addresses: Sequence[Address]) -> str:
            one, fan_out = round_trips(addresses)
            rtt[path] = {"one_node": one, "all_nodes": fan_out}
            return (
                f"version round trip {path}: {one:.3f} ms to one node, {fan_out:.3f} ms to all "
                f"{len(addresses)} at once (the floor of a fanned-out call)"
            )

        if "loopback" in phases:
            log(f"loopback phase: {args.nodes} nodes, {rounds} rounds x {block_s} s blocks")
            text = note("direct", nodes)
            cells, spreads["loopback"] = run_phase(
                "loopback", nodes, LOOPBACK_WORKLOADS, rounds, block_s, log
            )
            tables.append(("loopback", cells, text))
        if "delayed" in phases:
            with delay_relay([port for _, port in nodes], delay_s) as relay:
                text = note("relayed", relay.addresses)
                log(f"delayed phase: +{args.delay_ms:g} ms each way, delayrelay pid {relay.proc.pid}")
                cells, spreads["delayed"] = run_phase(
                    "delayed", relay.addresses, DELAYED_WORKLOADS, rounds, block_s, log
                )
            tables.append(("delayed", cells, f"+{args.delay_ms:g} ms each way through delayrelay; " + text))
    elapsed = time.perf_counter() - started

    print_header("shardcache client benchmark: shardcache vs pymemcache on real memcached", env)
    print(f"servers   {args.nodes} x memcached {memcached_version} (local processes on 127.0.0.1)")
    print(
        f"workload  {BATCH}-key get_many (all hits) / set_many, single get / set; "
        f"{VALUE_SIZE}-byte bytes values, str keys"
    )
    print(
        f"settings  default_noreply=False, connect_timeout=timeout={TIMEOUT_S:g} s, no_delay=True for all; "
        "HashClient use_pooling=False (its default)"
    )
    print(f"timing    {rounds} interleaved rounds x {block_s:g} s per block; total {elapsed:.0f} s")
    for path, times in rtt.items():
        print(
            f"round trip {path:8s} version, median: one node {times['one_node']:.3f} ms, "
            f"all {args.nodes} nodes at once {times['all_nodes']:.3f} ms"
        )
    for phase, spread in spreads.items():
        print(
            f"key spread over the nodes ({phase}, {BATCH} get_many keys): "
            + ", ".join(f"{name} {counts}" for name, counts in spread.items())
        )
    print()
    for phase, cells, note in tables:
        print_phase(phase, cells, note)
        all_goals.extend(goals_for(phase, cells))
        results[phase] = {w: {n: c.as_dict() for n, c in per.items()} for w, per in cells.items()}
    print_goals(all_goals)
    if args.json:
        write_json(
            args.json,
            {
                "environment": env,
                "settings": {
                    "nodes": args.nodes,
                    "memcached": memcached_version,
                    "rounds": rounds,
                    "block_s": block_s,
                    "delay_ms_each_way": args.delay_ms if "delayed" in phases else None,
                    "batch": BATCH,
                    "value_size": VALUE_SIZE,
                    "round_trip_ms": rtt,
                    "key_spread": spreads,
                },
                "results": results,
                "goals": [g.as_dict() for g in all_goals],
            },
        )
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
