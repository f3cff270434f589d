"""Generate golden ketama vectors by asking libmemcached itself where keys go.

libmemcached is loaded through ctypes (Debian: ``apt-get install libmemcached-dev``). For every
topology a fresh ``memcached_st`` is created, servers are added with
``memcached_server_add_with_weight`` (this never connects), ``MEMCACHED_BEHAVIOR_KETAMA_WEIGHTED``
is switched on (and, for the spymemcached naming variant, ``MEMCACHED_BEHAVIOR_DISTRIBUTION`` is
then set to ``MEMCACHED_DISTRIBUTION_CONSISTENT_KETAMA_SPY``), and ``memcached_generate_hash``
reports the index of the server owning each key. Every answer is cross-checked with
``memcached_server_by_key`` and ``memcached_server_instance_by_position``.

The owners always come from libmemcached. A small amount of Python below *chooses* keys that are
interesting (keys whose hash lands exactly on a continuum point, keys landing on a point value
shared by two servers); it has no say in the recorded owners.

Usage::

    .venv/bin/python tools/gen_ketama_vectors.py [--out tests/golden]

The output is deterministic: re-running produces byte-identical files.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gzip
import hashlib
import json
import math
import os
import random
import struct
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

GENERATOR = "tools/gen_ketama_vectors.py"
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "tests" / "golden"
BASE_KEYS_PER_FILE = 10_000
MAX_KEY_BYTES = 250

# Enum values, from /usr/include/libmemcached-1.0/types/{behavior,server_distribution,hash,return}.h
# (libmemcached-awesome 1.1.4). They are re-checked at run time against libmemcached's own
# libmemcached_string_behavior() / libmemcached_string_distribution() / libmemcached_string_hash().
MEMCACHED_SUCCESS = 0
MEMCACHED_BEHAVIOR_HASH = 2
MEMCACHED_BEHAVIOR_DISTRIBUTION = 9
MEMCACHED_BEHAVIOR_SORT_HOSTS = 12
MEMCACHED_BEHAVIOR_KETAMA_WEIGHTED = 16
MEMCACHED_BEHAVIOR_KETAMA_HASH = 17
MEMCACHED_DISTRIBUTION_CONSISTENT_KETAMA_SPY = 4
MEMCACHED_DISTRIBUTION_CONSISTENT_WEIGHTED = 5
MEMCACHED_HASH_MD5 = 1
MEMCACHED_DEFAULT_PORT = 11211

EXPECTED_NAMES = {
    ("behavior", MEMCACHED_BEHAVIOR_HASH): "MEMCACHED_BEHAVIOR_HASH",
    ("behavior", MEMCACHED_BEHAVIOR_DISTRIBUTION): "MEMCACHED_BEHAVIOR_DISTRIBUTION",
    ("behavior", MEMCACHED_BEHAVIOR_SORT_HOSTS): "MEMCACHED_BEHAVIOR_SORT_HOSTS",
    ("behavior", MEMCACHED_BEHAVIOR_KETAMA_WEIGHTED): "MEMCACHED_BEHAVIOR_KETAMA_WEIGHTED",
    ("behavior", MEMCACHED_BEHAVIOR_KETAMA_HASH): "MEMCACHED_BEHAVIOR_KETAMA_HASH",
    ("distribution", MEMCACHED_DISTRIBUTION_CONSISTENT_KETAMA_SPY): (
        "MEMCACHED_DISTRIBUTION_CONSISTENT_KETAMA_SPY"
    ),
    (
        "distribution",
        MEMCACHED_DISTRIBUTION_CONSISTENT_WEIGHTED,
    ): "MEMCACHED_DISTRIBUTION_CONSISTENT_WEIGHTED",
    ("hash", MEMCACHED_HASH_MD5): "MD5",
}

DISTRIBUTIONS = {
    "ketama_weighted": MEMCACHED_DISTRIBUTION_CONSISTENT_WEIGHTED,
    "ketama_spy_weighted": MEMCACHED_DISTRIBUTION_CONSISTENT_KETAMA_SPY,
}


class LibMemcachedError(RuntimeError):
    pass


class LibMemcached:
    """The handful of libmemcached entry points we need, with signatures from the headers."""

    def __init__(self, path: str | None = None) -> None:
        name = path or os.environ.get("LIBMEMCACHED") or ctypes.util.find_library("memcached")
        if not name:
            raise LibMemcachedError("libmemcached not found; apt-get install -y libmemcached-dev")
        self.lib = lib = ctypes.CDLL(name)
        vp, cp, u32, u64, sz = (
            ctypes.c_void_p,
            ctypes.c_char_p,
            ctypes.c_uint32,
            ctypes.c_uint64,
            ctypes.c_size_t,
        )
        enum = ctypes.c_int
        in_port_t = ctypes.c_uint16  # HAVE_IN_PORT_T: the system's uint16_t in_port_t
        self._sig("memcached_lib_version", cp, [])
        self._sig("memcached_create", vp, [vp])
        self._sig("memcached_free", None, [vp])
        self._sig("memcached_server_add_with_weight", enum, [vp, cp, in_port_t, u32])
        self._sig("memcached_server_count", u32, [vp])
        self._sig("memcached_behavior_set", enum, [vp, enum, u64])
        self._sig("memcached_behavior_get", u64, [vp, enum])
        self._sig("memcached_behavior_get_distribution", enum, [vp])
        self._sig("memcached_generate_hash", u32, [vp, cp, sz])
        self._sig("memcached_server_by_key", vp, [vp, cp, sz, ctypes.POINTER(enum)])
        self._sig("memcached_server_instance_by_position", vp, [vp, u32])
        self._sig("memcached_server_name", cp, [vp])
        self._sig("memcached_server_port", in_port_t, [vp])
        self._sig("memcached_strerror", cp, [vp, enum])
        self._sig("libmemcached_string_behavior", cp, [enum])
        self._sig("libmemcached_string_distribution", cp, [enum])
        self._sig("libmemcached_string_hash", cp, [enum])
        self.version: str = lib.memcached_lib_version().decode()
        self._check_enum_values()

    def _sig(self, name: str, restype: object, argtypes: list[object]) -> None:
        fn = getattr(self.lib, name)
        fn.restype = restype
        fn.argtypes = argtypes

    def _check_enum_values(self) -> None:
        lookups = {
            "behavior": self.lib.libmemcached_string_behavior,
            "distribution": self.lib.libmemcached_string_distribution,
            "hash": self.lib.libmemcached_string_hash,
        }
        for (kind, value), expected in EXPECTED_NAMES.items():
            got = (lookups[kind](value) or b"").decode()
            if got != expected:
                raise LibMemcachedError(
                    f"{kind} enum {value} is {got!r} in this libmemcached, not {expected}"
                )


@dataclass(frozen=True)
class Server:
    host: str
    port: int
    weight: int

    @property
    def spec(self) -> str:
        return f"{self.host}:{self.port}:{self.weight}"


class Continuum:
    """One configured memcached_st; answers 'which server index owns this key'."""

    def __init__(self, lm: LibMemcached, servers: list[Server], distribution: str, *, behaviors_first: bool):
        self.lm = lm
        self.servers = servers
        self.memc = lm.lib.memcached_create(None)
        if not self.memc:
            raise LibMemcachedError("memcached_create failed")
        try:
            if behaviors_first:
                self._set_behaviors(distribution)
                self._add_servers()
            else:
                self._add_servers()
                self._set_behaviors(distribution)
            self._verify_config(distribution)
        except BaseException:
            self.close()
            raise

    def _rc(self, rc: int, what: str) -> None:
        if rc != MEMCACHED_SUCCESS:
            msg = self.lm.lib.memcached_strerror(self.memc, rc).decode()
            raise LibMemcachedError(f"{what}: {msg} ({rc})")

    def _add_servers(self) -> None:
        for s in self.servers:
            rc = self.lm.lib.memcached_server_add_with_weight(self.memc, s.host.encode(), s.port, s.weight)
            self._rc(rc, f"memcached_server_add_with_weight({s.spec})")

    def _set_behaviors(self, distribution: str) -> None:
        lib = self.lm.lib
        # KETAMA_WEIGHTED=1 sets key hash + distribution hash to MD5, the weighted flag, and the
        # MEMCACHED_DISTRIBUTION_CONSISTENT_WEIGHTED distribution.
        self._rc(
            lib.memcached_behavior_set(self.memc, MEMCACHED_BEHAVIOR_KETAMA_WEIGHTED, 1), "KETAMA_WEIGHTED"
        )
        if distribution == "ketama_spy_weighted":
            # Setting the SPY distribution keeps the weighted flag and the MD5 hashes; only the
            # point naming changes ("/host:port-i", i from 0). See hosts.cc update_continuum().
            rc = lib.memcached_behavior_set(
                self.memc, MEMCACHED_BEHAVIOR_DISTRIBUTION, MEMCACHED_DISTRIBUTION_CONSISTENT_KETAMA_SPY
            )
            self._rc(rc, "DISTRIBUTION=CONSISTENT_KETAMA_SPY")

    def _verify_config(self, distribution: str) -> None:
        lib = self.lm.lib
        checks = {
            "server count": (lib.memcached_server_count(self.memc), len(self.servers)),
            "distribution": (lib.memcached_behavior_get_distribution(self.memc), DISTRIBUTIONS[distribution]),
            "weighted": (lib.memcached_behavior_get(self.memc, MEMCACHED_BEHAVIOR_KETAMA_WEIGHTED), 1),
            "key hash": (lib.memcached_behavior_get(self.memc, MEMCACHED_BEHAVIOR_HASH), MEMCACHED_HASH_MD5),
            "point hash": (
                lib.memcached_behavior_get(self.memc, MEMCACHED_BEHAVIOR_KETAMA_HASH),
                MEMCACHED_HASH_MD5,
            ),
            "sort hosts": (lib.memcached_behavior_get(self.memc, MEMCACHED_BEHAVIOR_SORT_HOSTS), 0),
        }
        for what, (got, want) in checks.items():
            if got != want:
                raise LibMemcachedError(f"{what}: libmemcached reports {got}, expected {want}")
        for i, s in enumerate(self.servers):
            inst = lib.memcached_server_instance_by_position(self.memc, i)
            name, port = lib.memcached_server_name(inst).decode(), lib.memcached_server_port(inst)
            if (name, port) != (s.host, s.port):
                raise LibMemcachedError(f"server {i} is {name}:{port}, expected {s.host}:{s.port}")

    def owner(self, key: bytes) -> int:
        lib = self.lm.lib
        index: int = lib.memcached_generate_hash(self.memc, key, len(key))
        if not 0 <= index < len(self.servers):
            raise LibMemcachedError(f"memcached_generate_hash({key!r}) returned {index}")
        rc = ctypes.c_int(MEMCACHED_SUCCESS)  # only written on failure
        by_key = lib.memcached_server_by_key(self.memc, key, len(key), ctypes.byref(rc))
        self._rc(rc.value, f"memcached_server_by_key({key!r})")
        if not by_key or by_key != lib.memcached_server_instance_by_position(self.memc, index):
            raise LibMemcachedError(
                f"memcached_server_by_key disagrees with memcached_generate_hash on {key!r}"
            )
        return index

    def close(self) -> None:
        if self.memc:
            self.lm.lib.memcached_free(self.memc)
            self.memc = None


# --------------------------------------------------------------------------------------------
# Key selection helpers. These only pick *which* keys to ask libmemcached about.


def key_hash(key: bytes) -> int:
    """MD5 of the key, first four digest bytes read little-endian (used to pick edge-case keys)."""
    return int.from_bytes(hashlib.md5(key).digest()[:4], "little")


def _f32(x: float) -> float:
    return float(struct.unpack("<f", struct.pack("<f", x))[0])


def _point_names(server: Server, total_weight: int, n: int, spy: bool) -> Iterator[bytes]:
    pct = _f32(_f32(server.weight) / _f32(total_weight))
    per_server = math.floor(_f32(_f32(_f32(_f32(pct * 160.0) / 4.0) * _f32(n)) + _f32(1e-10))) * 4
    for i in range(per_server // 4):
        if spy:
            yield f"/{server.host}:{server.port}-{i}".encode()
        elif server.port == MEMCACHED_DEFAULT_PORT:
            yield f"{server.host}-{i}".encode()
        else:
            yield f"{server.host}:{server.port}-{i}".encode()


def candidate_points(servers: list[Server], spy: bool) -> list[tuple[int, int]]:
    """(point value, server index) pairs as we believe libmemcached builds them; sorted."""
    total = sum(s.weight for s in servers)
    points = []
    for index, s in enumerate(servers):
        for name in _point_names(s, total, len(servers), spy):
            digest = hashlib.md5(name).digest()
            points.extend((int.from_bytes(digest[j : j + 4], "little"), index) for j in range(0, 16, 4))
    points.sort()
    return points


def exact_hit_keys(servers: list[Server], spy: bool, prefix: str, count: int) -> list[str]:
    """Keys whose hash equals some continuum point value exactly (tests '>=' in the lookup)."""
    values = {v for v, _ in candidate_points(servers, spy)}
    found: list[str] = []
    n = 0
    while len(found) < count:
        key = f"{prefix}{n}"
        if key_hash(key.encode()) in values:
            found.append(key)
        n += 1
    return found


def find_point_collision(prefix: str) -> tuple[Server, Server, int]:
    """Two port-11211 hostnames (equal weights, 2-node ring) sharing one continuum point value."""
    seen: dict[int, int] = {}
    n = 0
    while True:
        server = Server(f"{prefix}{n}.example.internal", MEMCACHED_DEFAULT_PORT, 1)
        for value, _ in candidate_points([server], spy=False):
            other = seen.get(value)
            if other is not None and other != n:
                first = Server(f"{prefix}{other}.example.internal", MEMCACHED_DEFAULT_PORT, 1)
                return first, server, value
        for value, _ in candidate_points([server], spy=False):
            seen.setdefault(value, n)
        n += 1


def keys_landing_on(servers: list[Server], value: int, prefix: str, count: int) -> list[str]:
    """Keys whose hash falls in (previous point, value], i.e. whose lookup stops at point `value`."""
    distinct = sorted({v for v, _ in candidate_points(servers, spy=False)})
    pos = distinct.index(value)
    low = distinct[pos - 1] if pos else -1  # the tie point is not the first on the ring here
    found: list[str] = []
    n = 0
    while len(found) < count:
        key = f"{prefix}{n}"
        if low < key_hash(key.encode()) <= value:
            found.append(key)
        n += 1
    return found


# Non-whitespace, non-control multibyte characters: Latin-1 letters, Greek, Cyrillic, Hebrew,
# CJK, Hiragana, Hangul, emoji and a few symbols.
_MULTIBYTE_POOL = (
    [chr(c) for c in range(0xC0, 0x100) if c not in (0xD7, 0xF7)]
    + [chr(c) for c in range(0x3B1, 0x3CA)]
    + [chr(c) for c in range(0x410, 0x450)]
    + [chr(c) for c in range(0x5D0, 0x5EB)]
    + [chr(c) for c in range(0x4E00, 0x4F00)]
    + [chr(c) for c in range(0x3041, 0x3097)]
    + [chr(c) for c in range(0xAC00, 0xAC80)]
    + [chr(c) for c in range(0x1F600, 0x1F650)]
    + list("€£¥©®°±µ¶§™→⇒∀∂∑√∞≈≠≤≥")
)
_PRINTABLE = [chr(c) for c in range(0x21, 0x7F)]  # printable ASCII without the space


def _random_ascii(rng: random.Random, length: int) -> str:
    return "".join(rng.choices(_PRINTABLE, k=length))


def _random_multibyte(rng: random.Random, max_bytes: int) -> str:
    out: list[str] = []
    size = 0
    target = rng.randint(1, max_bytes)
    while True:
        ch = rng.choice(_MULTIBYTE_POOL) if rng.random() < 0.8 else rng.choice(_PRINTABLE)
        width = len(ch.encode())
        if size + width > target:
            break
        out.append(ch)
        size += width
    return "".join(out) or "é"


def _fit(key: str, max_bytes: int = MAX_KEY_BYTES) -> str:
    while len(key.encode()) > max_bytes:
        key = key[:-1]
    return key


def base_keys(seed: str, count: int = BASE_KEYS_PER_FILE) -> list[str]:
    """The deterministic key mix (distinct; every key 1..250 UTF-8 bytes, no whitespace/controls)."""
    rng = random.Random(f"shardcache-golden:{seed}")
    keys: list[str] = []
    keys += [f"books/{i}" for i in range(1500)]
    keys += [f"books/{rng.randrange(10**9)}" for _ in range(300)]
    keys += [f"user:{i}:profile" for i in range(1500)]
    keys += [f"user:{rng.randrange(10**12)}:profile" for _ in range(300)]
    keys += [f"session:{rng.getrandbits(128):032x}" for _ in range(300)]
    # Short keys: every 1-byte printable key, then random 2- and 3-byte keys.
    keys += list(_PRINTABLE)
    keys += [_random_ascii(rng, rng.choice((2, 3))) for _ in range(700)]
    # Long keys, 100..250 bytes; some exactly 250.
    filler = "abcdefghijklmnopqrstuvwxyz0123456789-_."
    for i in range(800):
        length = MAX_KEY_BYTES if i % 8 == 0 else rng.randint(100, MAX_KEY_BYTES)
        head = f"long/{i}/"
        body = _random_ascii(rng, MAX_KEY_BYTES) if i % 4 == 1 else filler * 8
        keys.append((head + body)[:length])
    # Random printable ASCII, 1..40 bytes (a few up to 250).
    keys += [_random_ascii(rng, rng.randint(1, 40)) for _ in range(2300)]
    keys += [_random_ascii(rng, rng.randint(41, MAX_KEY_BYTES)) for _ in range(40)]
    # UTF-8 multibyte keys.
    keys += [f"ключ:{i}" for i in range(200)]
    keys += [f"用户:{i}:资料" for i in range(200)]
    keys += [f"clé/{i}/données-😀" for i in range(200)]
    keys += [_random_multibyte(rng, 64) for _ in range(700)]
    keys += [_fit("ü" * 70 + "/" + "日本語" * 20 + f"/{i}") for i in range(50)]
    keys += [_random_multibyte(rng, MAX_KEY_BYTES) for _ in range(40)]
    unique = dict.fromkeys(keys)
    while len(unique) < count:
        unique.setdefault(_random_ascii(rng, rng.randint(4, 40)))
    return list(unique)[:count]


# --------------------------------------------------------------------------------------------
# Topologies


@dataclass
class Topology:
    name: str
    description: str
    servers: list[Server]
    distribution: str = "ketama_weighted"
    extra_keys: list[str] = field(default_factory=list)


def _servers(specs: Iterable[str]) -> list[Server]:
    out = []
    for spec in specs:
        host, port, weight = spec.rsplit(":", 2)
        out.append(Server(host, int(port), int(weight)))
    return out


def _fifty_nodes() -> list[Server]:
    rng = random.Random("shardcache-golden:50-nodes")
    ports = [11211, 11211, 11211, 11212, 11213, 22122, 21211]
    weights = [1, 1, 1, 2, 2, 3, 5, 8, 10]
    servers: list[Server] = []
    seen: set[tuple[str, int]] = set()
    i = 0
    while len(servers) < 50:
        i += 1
        host = f"10.20.{i // 7}.{10 + i % 7 * 3}" if i % 3 else f"mc-{i:02d}.cluster.example.internal"
        port = rng.choice(ports)
        if (host, port) in seen:
            continue
        seen.add((host, port))
        servers.append(Server(host, port, rng.choice(weights)))
    return servers


def topologies() -> list[Topology]:
    fifty = _fifty_nodes()
    tie_a, tie_b, tie_value = find_point_collision("tie-")
    # b sorts after a in the search; put b first so "lowest server index wins" and "first
    # inserted name wins" are both distinguishable from "highest index / last inserted wins".
    tie_servers = [tie_b, tie_a]
    spy_weighted = _servers(
        [
            "cache-a.example.internal:11211:1",
            "cache-b.example.internal:11211:2",
            "cache-c.example.internal:11212:3",
            "10.30.0.4:11211:1",
            "10.30.0.5:22122:2",
            "cache-f.example.internal:11213:5",
        ]
    )
    return [
        Topology(
            "ketama_single_node",
            "one server: libmemcached skips hashing and always answers index 0",
            _servers(["10.0.0.1:11211:1"]),
        ),
        Topology(
            "ketama_3_ipv4_default_port",
            "3 IPv4 nodes, all port 11211 (points named host-i), equal weights",
            _servers(["10.0.0.1:11211:1", "10.0.0.2:11211:1", "10.0.0.3:11211:1"]),
        ),
        Topology(
            "ketama_5_mixed_ports",
            "5 IPv4 nodes on 11211 and other ports (host-i vs host:port-i naming), equal weights",
            _servers(
                [
                    "10.0.1.1:11211:1",
                    "10.0.1.2:11212:1",
                    "10.0.1.3:22122:1",
                    "10.0.1.4:11211:1",
                    "192.168.1.5:11213:1",
                ]
            ),
        ),
        Topology(
            "ketama_10_hostnames",
            "10 DNS names on 11211, equal weights",
            _servers([f"cache-{i}.example.internal:11211:1" for i in range(1, 11)]),
        ),
        Topology(
            "ketama_8_weighted_mixed_ports",
            "8 nodes, weights 1/2/3/5/8, ports 11211/11212/22122/11213",
            _servers(
                [
                    "10.0.2.1:11211:1",
                    "10.0.2.2:11212:2",
                    "10.0.2.3:11211:3",
                    "10.0.2.4:22122:5",
                    "cache-w5.example.internal:11211:1",
                    "cache-w6.example.internal:11213:2",
                    "10.0.2.7:11211:8",
                    "10.0.2.8:11212:3",
                ]
            ),
        ),
        Topology(
            "ketama_4_same_host_ports",
            "4 nodes, weights 1 and 2, two hosts each with two ports",
            _servers(["10.0.3.1:11211:1", "10.0.3.1:11212:2", "10.0.3.2:11211:2", "10.0.3.2:11213:1"]),
        ),
        Topology(
            "ketama_50_mixed",
            "50 nodes, IPv4 and hostnames, mixed ports and weights; plus keys whose hash equals a point",
            fifty,
            extra_keys=exact_hit_keys(fifty, spy=False, prefix="exact-hit/", count=8),
        ),
        Topology(
            "ketama_25_equal_weights",
            "25 equal-weight nodes: float32 arithmetic gives floor(39.999996)*4 = 156 points each, not 160",
            _servers([f"10.0.4.{i}:11211:1" for i in range(1, 26)]),
        ),
        Topology(
            "ketama_5_weighted_float_rounding",
            "weights 1/2/4/8/10: 40*n*w/total is a whole number for every node, but float32 lands just "
            "below it for four of them (weight 1: 7.9999995, floor 7), so each of those loses 4 points",
            _servers(
                [
                    "10.0.6.1:11211:1",
                    "10.0.6.2:11212:2",
                    "10.0.6.3:11211:4",
                    "cache-r4.example.internal:22122:8",
                    "cache-r5.example.internal:11211:10",
                ]
            ),
        ),
        Topology(
            "ketama_3_zero_point_weight",
            "weights 1/100/1000: the weight-1 node gets floor(0.109)*4 = 0 points and owns no key",
            _servers(["10.0.5.1:11211:1", "10.0.5.2:11211:100", "10.0.5.3:11212:1000"]),
        ),
        Topology(
            "ketama_2_point_collision",
            f"two hosts share continuum point value {tie_value}; libmemcached gives it to the lower "
            "server index; extra keys land on that point",
            tie_servers,
            extra_keys=keys_landing_on(tie_servers, tie_value, "tie/", 200),
        ),
        Topology(
            "spy_4_ipv4_mixed_ports",
            "spymemcached naming (/host:port-i, port always present), 4 IPv4 nodes, equal weights",
            _servers(["10.1.0.1:11211:1", "10.1.0.2:11211:1", "10.1.0.3:11212:1", "10.1.0.4:22122:1"]),
            distribution="ketama_spy_weighted",
        ),
        Topology(
            "spy_6_hostnames_weighted",
            "spymemcached naming, hostnames and IPv4, mixed ports and weights; plus exact-hit keys",
            spy_weighted,
            distribution="ketama_spy_weighted",
            extra_keys=exact_hit_keys(spy_weighted, spy=True, prefix="exact-hit/", count=2),
        ),
    ]


def generate(lm: LibMemcached, topo: Topology) -> dict[str, object]:
    keys = base_keys(topo.name) + list(topo.extra_keys)
    if len(set(keys)) != len(keys):
        raise AssertionError(f"{topo.name}: duplicate keys")
    for key in keys:
        raw = key.encode()
        if not 0 < len(raw) <= MAX_KEY_BYTES or any(c.isspace() or not c.isprintable() for c in key):
            raise AssertionError(f"{topo.name}: invalid memcached key {key!r}")
    owners_by_order = []
    for behaviors_first in (False, True):
        ring = Continuum(lm, topo.servers, topo.distribution, behaviors_first=behaviors_first)
        try:
            owners_by_order.append([ring.owner(k.encode()) for k in keys])
        finally:
            ring.close()
    if owners_by_order[0] != owners_by_order[1]:
        raise AssertionError(f"{topo.name}: owners depend on the order of configuration calls")
    return {
        "generator": GENERATOR,
        "libmemcached_version": lm.version,
        "distribution": topo.distribution,
        "name": topo.name,
        "description": topo.description,
        "key_encoding": "utf-8 (keys are hashed as their UTF-8 bytes)",
        "servers": [s.spec for s in topo.servers],
        "keys": keys,
        "owners": owners_by_order[0],
    }


def write_gz_json(path: Path, payload: dict[str, object]) -> None:
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":")) + "\n"
    path.write_bytes(gzip.compress(text.encode(), compresslevel=9, mtime=0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="output directory (default: tests/golden)"
    )
    parser.add_argument("--lib", help="path of libmemcached.so (default: found by ctypes.util)")
    args = parser.parse_args(argv)
    lm = LibMemcached(args.lib)
    args.out.mkdir(parents=True, exist_ok=True)
    for topo in topologies():
        payload = generate(lm, topo)
        path = args.out / f"{topo.name}.json.gz"
        write_gz_json(path, payload)
        owners = payload["owners"]
        assert isinstance(owners, list)
        used = len(set(owners))
        print(
            f"{path.name}: {len(owners)} keys, {len(topo.servers)} servers ({used} own keys), "
            f"{path.stat().st_size} bytes",
            file=sys.stderr,
        )
    print(f"libmemcached {lm.version}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
