"""The consistent-hash ring: an immutable value mapping keys to node ids.

Two hashing modes:

``"mmh3"`` (default)
    Keys are hashed with MurmurHash3 (x86, 32-bit, seed 0) over their UTF-8 bytes. Each node owns
    ``POINTS_PER_WEIGHT * weight`` points, the little-endian 32-bit words of
    ``SHAKE-128("shardcache:" + name)``; ``name`` is the node's alias if it has one, else its node id.
    A node's points depend only on its own name and weight, so adding, removing or reweighting one
    node moves keys only to or from that node. A key belongs to the first point at or after the
    start of its slot (the top ``SLOT_BITS`` bits of its hash), wrapping around; equal points go to
    the node whose name sorts first. The ring is compiled into a table of ``2**SLOT_BITS`` slots, so
    a lookup is one hash and two indexing operations whatever the number of nodes. The table is built
    and counted in ``shardcache._ring_math`` (with numpy when it is installed).

``"ketama"``
    libmemcached's ``MEMCACHED_BEHAVIOR_KETAMA_WEIGHTED``, byte for byte: MD5; each server gets
    ``floor(weight / total_weight * 160 / 4 * live_servers) * 4`` points computed in float32 (160 at
    equal weights), four per MD5 digest of its point name, read as little-endian 32-bit words; a key
    (MD5, first four bytes little-endian) belongs to the first point >= its hash, wrapping around;
    equal points go to the server listed first. Point names follow ``ketama_naming``:

    - ``"libmemcached"``: ``host-i`` when the port is 11211, ``host:port-i`` otherwise;
    - ``"libketama"``: always ``host:port-i``;
    - ``"spymemcached"``: ``/host:port-i``;
    - a node with an alias (twemproxy's ``host:port:weight name``) is named ``name-i`` in every variant.

A ring holds at most ``MAX_RING_POINTS`` points (6,291,456: an mmh3 ring whose weights sum to 4096,
or a ketama ring of about 39,000 servers), so no server list can make building it allocate unbounded
memory; more raises ``ConfigurationError`` naming the total. At the limit a build peaks at about
250 MB (mmh3 with numpy) to 800 MB (mmh3 without numpy, or ketama).

Rings are immutable and safe to share between threads; ``with_node``/``without_node``/``with_weight``
return new rings.
"""

from __future__ import annotations

import hashlib
import itertools
import operator
import struct
from array import array
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from math import floor

import mmh3

from shardcache._ring_math import (
    POINTS_PER_WEIGHT,
    SLOT_BITS,
    SLOT_SHIFT,
    SLOTS,
    point_stream,
    slot_counts,
    slot_flows,
    slot_runs,
)
from shardcache.errors import ConfigurationError, KeyValidationError
from shardcache.nodes import DEFAULT_PORT, NodeSpec, NodeSpecLike, parse_node, parse_nodes

__all__ = [
    "HASHING_MODES",
    "KETAMA_NAMINGS",
    "MAX_RING_POINTS",
    "POINTS_PER_WEIGHT",
    "SLOT_BITS",
    "Ring",
    "RingDiff",
]

Key = str | bytes

HASHING_MODES = ("mmh3", "ketama")
KETAMA_NAMINGS = ("libmemcached", "libketama", "spymemcached")

MAX_RING_POINTS = POINTS_PER_WEIGHT * 4096
_SPACE = 1 << 32
_KETAMA_POINTS_PER_SERVER = 160

_mmh3_hash = mmh3.hash
try:  # CPython's built-in MD5 costs a third of OpenSSL's per short key (no EVP context per call)
    from _md5 import md5 as _md5  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - interpreters built without it
    _md5 = hashlib.md5
_f32 = struct.Struct("f")


def _float32(x: float) -> float:
    return float(_f32.unpack(_f32.pack(x))[0])


def _check_points(points: int, ring: str) -> None:
    if points > MAX_RING_POINTS:
        raise ConfigurationError(
            f"{ring} needs {points:,} points; a ring holds at most MAX_RING_POINTS = {MAX_RING_POINTS:,}"
        )


def _key_error(key: object) -> KeyValidationError:
    return KeyValidationError(f"ring keys must be str or bytes (str must be valid UTF-8), got {key!r}")


@dataclass(frozen=True)
class RingDiff:
    """What changes between two rings.

    ``moved`` is the fraction of keys (of the hash space, or of the keys given to ``Ring.diff``) whose
    owner differs; ``flows[(src, dst)]`` the fraction that moves from ``src`` to ``dst``.
    """

    moved: float
    flows: Mapping[tuple[str, str], float] = field(default_factory=dict)
    keys_counted: int | None = None

    def moved_from(self, node_id: str) -> float:
        """Fraction of keys that leave ``node_id``."""
        return sum(v for (src, _), v in self.flows.items() if src == node_id)

    def moved_to(self, node_id: str) -> float:
        """Fraction of keys that arrive on ``node_id``."""
        return sum(v for (_, dst), v in self.flows.items() if dst == node_id)


class Ring:
    """An immutable consistent-hash ring over memcached nodes; safe to share between threads.

    ``Ring(nodes, hashing="mmh3" | "ketama", ketama_naming="libmemcached")``. ``nodes`` is any server
    list ``shardcache.NodeSpec`` parsing accepts. ``node_for(key)`` returns a node id.
    """

    __slots__ = (
        "_bucket_owner",
        "_bucket_shift",
        "_bucket_start",
        "_hashing",
        "_ids",
        "_naming",
        "_owners",
        "_points",
        "_runs",
        "_specs",
        "_table",
    )

    def __new__(
        cls,
        nodes: Iterable[NodeSpecLike] | str,
        *,
        hashing: str = "mmh3",
        ketama_naming: str = "libmemcached",
    ) -> Ring:
        # Each mode has its own node_for, so a lookup never tests the mode.
        return super().__new__(_KetamaRing if cls is Ring and hashing == "ketama" else cls)

    def __init__(
        self,
        nodes: Iterable[NodeSpecLike] | str,
        *,
        hashing: str = "mmh3",
        ketama_naming: str = "libmemcached",
    ) -> None:
        if hashing not in HASHING_MODES:
            raise ConfigurationError(f"hashing={hashing!r}: expected one of {', '.join(HASHING_MODES)}")
        if ketama_naming not in KETAMA_NAMINGS:
            raise ConfigurationError(
                f"ketama_naming={ketama_naming!r}: expected one of {', '.join(KETAMA_NAMINGS)}"
            )
        self._specs: tuple[NodeSpec, ...] = parse_nodes(nodes)
        self._hashing = hashing
        self._naming = ketama_naming
        self._table: array[int] = array("H")  # the slot table (mmh3 mode only)
        self._points: list[int] = []
        self._owners: list[str] = []
        self._runs: tuple[array[int], array[int]] = (array("I"), array("H"))
        if hashing == "mmh3":
            self._build_mmh3()
        else:
            self._build_ketama()

    # -- construction -----------------------------------------------------------------------------

    def _build_mmh3(self) -> None:
        total_weight = sum(s.weight for s in self._specs)
        _check_points(
            POINTS_PER_WEIGHT * total_weight,
            f"an mmh3 ring of {len(self._specs)} nodes with total weight {total_weight}"
            f" (at most {MAX_RING_POINTS // POINTS_PER_WEIGHT})",
        )
        specs = sorted(self._specs, key=_hash_name)
        self._ids: tuple[str, ...] = tuple(s.node_id for s in specs)
        rank_bits = max(1, (len(specs) - 1).bit_length())
        typecode = "H" if len(specs) <= 0xFFFF else "I"
        streams = [point_stream(_hash_name(spec), POINTS_PER_WEIGHT * spec.weight) for spec in specs]
        occupied, owners, table = slot_runs(streams, rank_bits, typecode)
        self._table = table
        # Runs: slot ``occupied[i - 1] + 1`` (0 for the first) starts a run owned by ``owners[i]``.
        self._runs = (occupied, owners)

    def _build_ketama(self) -> None:
        specs = self._specs
        self._ids = tuple(s.node_id for s in specs)
        total = _float32(float(sum(s.weight for s in specs)))
        live = _float32(float(len(specs)))
        counts = []
        for spec in specs:
            pct = _float32(_float32(float(spec.weight)) / total)
            scaled = _float32(_float32(_float32(pct * _KETAMA_POINTS_PER_SERVER) / 4) * live)
            counts.append(floor(_float32(scaled + 0.0000000001)) * 4)
        _check_points(sum(counts), f"a ketama ring of {len(specs)} nodes")
        items: list[tuple[int, int]] = []
        for index, (spec, per_server) in enumerate(zip(specs, counts, strict=True)):
            for i in range(per_server // 4):
                digest = _md5(self._ketama_name(spec, i).encode()).digest()
                items.extend((value, index) for value in struct.unpack("<4I", digest))
        items.sort(key=operator.itemgetter(0))  # stable: equal points keep server order
        self._points = [value for value, _ in items]
        self._owners = [self._ids[index] for _, index in items]
        self._owners.append(self._owners[0])
        # Lookup accelerator: buckets of the hash space. ``_bucket_start[b]`` is the index of the
        # first point at or after bucket b; a bucket holding no point resolves to that point's owner
        # directly (``_bucket_owner[b]``), the others bisect within their few points.
        bits = min(max((4 * len(self._points)).bit_length(), 8), 20)
        shift = 32 - bits
        counts = [0] * ((1 << bits) + 1)
        for point in self._points:
            counts[(point >> shift) + 1] += 1
        starts = list(itertools.accumulate(counts))
        owners = self._owners
        self._bucket_shift = shift
        self._bucket_start = array("I", starts)
        self._bucket_owner = [owners[lo] if lo == hi else None for lo, hi in itertools.pairwise(starts)]

    def _ketama_name(self, spec: NodeSpec, i: int) -> str:
        if spec.alias is not None:
            return f"{spec.alias}-{i}"
        if self._naming == "spymemcached":
            return f"/{spec.host}:{spec.port}-{i}"
        if self._naming == "libmemcached" and spec.port == DEFAULT_PORT:
            return f"{spec.host}-{i}"
        return f"{spec.host}:{spec.port}-{i}"

    # -- lookups ----------------------------------------------------------------------------------

    def node_for(self, key: Key) -> str:
        """The node id that owns ``key`` (``str`` is hashed as UTF-8; the key prefix is not hashed)."""
        try:
            if type(key) is str and not key.isascii():
                key = key.encode()  # strict UTF-8 first: mmh3 must never see a lone surrogate
            return self._ids[self._table[_mmh3_hash(key, 0, False) >> SLOT_SHIFT]]
        except (TypeError, ValueError):
            raise _key_error(key) from None

    def nodes_for(self, keys: Iterable[bytes]) -> list[str]:
        """``node_for`` of each of ``keys`` (bytes, as hashed), in one call: the loop of a batch."""
        if type(self) is not Ring:  # ketama: its own node_for
            return [self.node_for(key) for key in keys]
        ids, table = self._ids, self._table
        try:
            return [ids[table[_mmh3_hash(key, 0, False) >> SLOT_SHIFT]] for key in keys]
        except (TypeError, ValueError):
            return [self.node_for(key) for key in keys]  # raises, naming the key

    def preference_list(self, key: Key, n: int) -> tuple[str, ...]:
        """The owner of ``key`` then the next distinct nodes clockwise: at most ``n`` node ids."""
        if n <= 0:
            return ()
        want = min(n, len(self._ids))
        found: dict[str, None] = {}
        for owner in self._walk(key):
            found.setdefault(owner)
            if len(found) == want:
                break
        return tuple(found)

    def _walk(self, key: Key) -> Iterator[str]:
        """Owners of the ring positions from ``key`` clockwise, once around (lazily: callers stop
        as soon as they have the nodes they need)."""
        try:
            if self._hashing == "mmh3":
                if isinstance(key, str):
                    key = key.encode()
                occupied, ranks = self._runs
                start = bisect_left(occupied, _mmh3_hash(key, 0, False) >> SLOT_SHIFT)
                ids = self._ids
                count = len(ranks)
                for i in range(start, start + count):
                    yield ids[ranks[i % count]]
                return
            data = key.encode() if isinstance(key, str) else bytes(key)
            start = bisect_left(self._points, int.from_bytes(_md5(data).digest()[:4], "little"))
        except (TypeError, ValueError):
            raise _key_error(key) from None
        owners = self._owners
        count = len(owners) - 1
        for i in range(start, start + count):
            yield owners[i % count]

    # -- shape ------------------------------------------------------------------------------------

    @property
    def nodes(self) -> tuple[str, ...]:
        """The node ids, in the order they were given."""
        return tuple(s.node_id for s in self._specs)

    @property
    def specs(self) -> tuple[NodeSpec, ...]:
        """The parsed node specs, in the order they were given."""
        return self._specs

    @property
    def hashing(self) -> str:
        """``"mmh3"`` or ``"ketama"``."""
        return self._hashing

    @property
    def ketama_naming(self) -> str:
        """The point-naming variant used in ketama mode."""
        return self._naming

    def spec(self, node_id: str) -> NodeSpec:
        """The spec of ``node_id`` (or of any spec naming it, e.g. ``"cache-1"`` for port 11211);
        ``ConfigurationError`` if it is not on the ring."""
        wanted = node_id if node_id in self else parse_node(node_id).node_id
        for s in self._specs:
            if s.node_id == wanted:
                return s
        raise ConfigurationError(f"node {node_id!r} is not on the ring")

    def __len__(self) -> int:
        return len(self._specs)

    def __contains__(self, node_id: object) -> bool:
        return any(s.node_id == node_id for s in self._specs)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Ring):
            return NotImplemented
        return (self._hashing, self._naming, self._specs) == (other._hashing, other._naming, other._specs)

    def __hash__(self) -> int:
        return hash((self._hashing, self._naming, self._specs))

    def __repr__(self) -> str:
        return f"Ring({list(self.nodes)!r}, hashing={self._hashing!r})"

    # -- new rings --------------------------------------------------------------------------------

    def _replace(self, specs: Iterable[NodeSpec]) -> Ring:
        return Ring(list(specs), hashing=self._hashing, ketama_naming=self._naming)

    def with_node(self, spec: NodeSpecLike) -> Ring:
        """A new ring with ``spec`` added; ``ConfigurationError`` if that node is already present."""
        node = parse_node(spec)
        if node.node_id in self:
            raise ConfigurationError(f"node {node.node_id!r} is already on the ring")
        return self._replace((*self._specs, node))

    def without_node(self, node_id: str) -> Ring:
        """A new ring without ``node_id``; ``ConfigurationError`` if absent or the last node."""
        target = self.spec(node_id)
        if len(self._specs) == 1:
            raise ConfigurationError(f"cannot remove {node_id!r}: it is the last node on the ring")
        return self._replace(s for s in self._specs if s is not target)

    def with_weight(self, node_id: str, weight: int) -> Ring:
        """A new ring where ``node_id`` has ``weight``."""
        target = self.spec(node_id)
        return self._replace(s.with_weight(weight) if s is target else s for s in self._specs)

    # -- analysis ---------------------------------------------------------------------------------

    def _arcs(self) -> tuple[list[int], list[str]]:
        """Hash-space boundaries and owners: hashes in ``[b[i], b[i+1])`` belong to ``owners[i]``."""
        if self._hashing == "mmh3":
            occupied, ranks = self._runs
            bounds = [0]
            bounds.extend((slot + 1) << SLOT_SHIFT for slot in occupied)
            owners = [self._ids[r] for r in ranks]
            if bounds[-1] < _SPACE:
                bounds.append(_SPACE)
                owners.append(owners[0])
            return bounds, owners
        bounds = [0]
        bounds.extend(p + 1 for p in self._points)
        bounds.append(_SPACE)
        return bounds, self._owners

    def share(self) -> dict[str, float]:
        """Fraction of the hash space owned by each node id (sums to 1)."""
        totals: Counter[str] = Counter({node: 0 for node in self._ids})
        if self._hashing == "mmh3":
            counts = slot_counts(self._table, len(self._ids))
            totals.update(dict(zip(self._ids, counts, strict=True)))
            return {node: totals[node] / SLOTS for node in self.nodes}
        bounds, owners = self._arcs()
        for i, owner in enumerate(owners):
            totals[owner] += bounds[i + 1] - bounds[i]
        return {node: totals[node] / _SPACE for node in self.nodes}

    def diff(self, other: Ring, keys: Iterable[Key] | None = None) -> RingDiff:
        """Which fraction of keys moves from this ring to ``other``, and from which node to which.

        With ``keys``, counts those keys; otherwise measures the hash space exactly. The two rings must
        use the same hashing mode unless ``keys`` is given.
        """
        flows: Counter[tuple[str, str]] = Counter()
        if keys is not None:
            total = 0
            for key in keys:
                total += 1
                a, b = self.node_for(key), other.node_for(key)
                if a != b:
                    flows[(a, b)] += 1
            if total == 0:
                return RingDiff(0.0, {}, 0)
            return RingDiff(sum(flows.values()) / total, {k: v / total for k, v in flows.items()}, total)
        if self._hashing != other._hashing:
            raise ConfigurationError("diff of rings with different hashing modes needs keys=")
        if self._hashing == "mmh3":
            flows.update(slot_flows((self._table, self._ids), (other._table, other._ids)))
            space = SLOTS
        else:
            space = _SPACE
            for lo, hi, src, dst in _overlay(self._arcs(), other._arcs()):
                if src != dst:
                    flows[(src, dst)] += hi - lo
        return RingDiff(sum(flows.values()) / space, {k: v / space for k, v in flows.items()})


class _KetamaRing(Ring):
    """A ``Ring`` in ketama mode: the same value, with libmemcached's lookup."""

    __slots__ = ()

    def node_for(self, key: Key) -> str:
        """The node id that owns ``key`` (``str`` is hashed as UTF-8; the key prefix is not hashed)."""
        try:
            h = int.from_bytes(_md5(key.encode() if type(key) is str else key).digest()[:4], "little")
        except (TypeError, ValueError):
            raise _key_error(key) from None
        bucket = h >> self._bucket_shift
        owner = self._bucket_owner[bucket]
        if owner is not None:
            return owner
        starts = self._bucket_start
        return self._owners[bisect_left(self._points, h, starts[bucket], starts[bucket + 1])]


def _hash_name(spec: NodeSpec) -> str:
    return spec.alias if spec.alias is not None else spec.node_id


def _overlay(
    a: tuple[list[int], list[str]], b: tuple[list[int], list[str]]
) -> Iterator[tuple[int, int, str, str]]:
    """Walk two arc lists together, yielding ``(lo, hi, owner_a, owner_b)`` pieces."""
    (ab, ao), (bb, bo) = a, b
    i = j = 0
    lo = 0
    while lo < _SPACE:
        hi = min(ab[i + 1], bb[j + 1])
        if hi > lo:
            yield lo, hi, ao[i], bo[j]
        lo = hi
        if ab[i + 1] == hi:
            i += 1
        if bb[j + 1] == hi:
            j += 1
