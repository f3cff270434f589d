"""The mmh3 ring's slot table: building it from each node's points, and counting its slots.

Each node contributes one point per stratum (of 2**32 / POINTS_PER_WEIGHT) per unit of weight; a
point is packed with its node's rank (position by name) so that sorting orders by point, then by
name. The smallest packed value in each occupied slot decides the owner of that slot and of the
empty slots just before it. The pure-Python and numpy builds compute the same table; numpy, when
installed (``pip install 'shardcache[fast]'``), makes building a 1000-node ring ~10x faster (rings
of up to 8 nodes of weight 1 are built without it), and
``share``/``diff`` of mmh3 rings (which count all 2**20 slots) ~10x faster too.

Pure functions over arrays and bytes; ``shardcache.ring`` owns the meaning (which node is which
rank, the limits on a ring's size) and re-exports ``POINTS_PER_WEIGHT`` and ``SLOT_BITS``.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import operator
import struct
import sys
from array import array
from collections import Counter
from typing import TypeAlias

POINTS_PER_WEIGHT = 1536
SLOT_BITS = 20
SLOTS = 1 << SLOT_BITS
SLOT_SHIFT = 32 - SLOT_BITS
_STRATUM = (1 << 32) // POINTS_PER_WEIGHT

_use_numpy = True  # tests switch it off to compare both paths
# A small ring builds in pure Python (~15 ms for 4 nodes): importing numpy costs more (~90 ms, and
# OpenBLAS starts its threads, which spin for a while on a 2-core machine's CPU).
_NUMPY_FROM_POINTS = 8 * POINTS_PER_WEIGHT
_MAX_FLOW_BINS = 1 << 20  # above this many (owner_a, owner_b) pairs, sort instead of counting in bins

# A slot table of ranks, and the node id of each rank (a string: array is not subscriptable before 3.12).
Table: TypeAlias = "tuple[array[int], tuple[str, ...]]"


def numpy_available() -> bool:
    """Whether the numpy paths are used: numpy is installed and tests have not switched it off."""
    if not _use_numpy:
        return False
    try:
        import numpy  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def point_stream(name: str, count: int) -> bytes:
    """``count`` little-endian 32-bit points for the node hashed as ``name``, as native-order bytes
    for ``array('I')``."""
    data = hashlib.shake_128(b"shardcache:" + name.encode()).digest(4 * count)
    if sys.byteorder != "little" or array("I").itemsize != 4:
        return array(_native_u32(), struct.unpack(f"<{count}I", data)).tobytes()
    return data


def slot_runs(
    streams: list[bytes], rank_bits: int, typecode: str
) -> tuple[array[int], array[int], array[int]]:
    """``(occupied, owners, table)`` for the nodes whose points are ``streams`` (in rank order).

    Slot ``occupied[i - 1] + 1`` (0 for the first) starts a run owned by rank ``owners[i]``;
    ``table[slot]`` is the rank that owns ``slot``.
    """
    points = sum(len(stream) for stream in streams) // 4
    build = _slot_runs_numpy if points > _NUMPY_FROM_POINTS and numpy_available() else _slot_runs_python
    return build(streams, rank_bits, typecode)


def slot_counts(table: array[int], ranks: int) -> list[int]:
    """How many slots of ``table`` each of ``ranks`` ranks owns."""
    if numpy_available():
        return _slot_counts_numpy(table, ranks)
    counts = Counter(table)
    return [counts[rank] for rank in range(ranks)]


def slot_flows(a: Table, b: Table) -> dict[tuple[str, str], int]:
    """How many slots change owner from table ``a`` to table ``b``, per ``(owner_a, owner_b)``."""
    if numpy_available():
        return _slot_flows_numpy(a, b)
    (a_table, a_ids), (b_table, b_ids) = a, b
    flows: Counter[tuple[str, str]] = Counter()
    for (ra, rb), count in Counter(zip(a_table, b_table, strict=True)).items():
        if a_ids[ra] != b_ids[rb]:
            flows[(a_ids[ra], b_ids[rb])] += count
    return dict(flows)


def _slot_runs_python(
    streams: list[bytes], rank_bits: int, typecode: str
) -> tuple[array[int], array[int], array[int]]:
    rank_mask = (1 << rank_bits) - 1
    repeat, chain = itertools.repeat, itertools.chain
    bases = _stratum_bases(rank_bits)
    columns: list[list[int]] = []
    for rank, data in enumerate(streams):
        words = array("I")
        words.frombytes(data)
        for start in range(0, len(words), POINTS_PER_WEIGHT):
            offsets = words[start : start + POINTS_PER_WEIGHT]
            # offset within a stratum = word * stratum_width >> 32, then shifted past the rank
            scaled = map(operator.rshift, map(operator.mul, offsets, repeat(_STRATUM)), repeat(32))
            packed = map(operator.lshift, scaled, repeat(rank_bits))
            if rank:
                packed = map(operator.or_, packed, repeat(rank))
            columns.append(list(map(operator.add, bases, packed)))
    values = list(chain.from_iterable(map(sorted, zip(*columns, strict=True))))
    del columns
    shift = SLOT_SHIFT + rank_bits
    slots = list(map(operator.rshift, values, repeat(shift)))
    firsts = list(itertools.compress(values, map(operator.ne, slots, chain((-1,), slots))))
    del values, slots
    occupied = array("I", map(operator.rshift, firsts, repeat(shift)))
    owners = array(typecode, map(rank_mask.__and__, firsts))
    lengths = map(operator.sub, occupied, chain((-1,), occupied))
    cells = [array(typecode, (rank,)).tobytes() for rank in range(len(streams))]
    data = b"".join(map(operator.mul, map(cells.__getitem__, owners), lengths))
    data += cells[owners[0]] * (SLOTS - 1 - occupied[-1])
    table = array(typecode)
    table.frombytes(data)
    return occupied, owners, table


def _slot_runs_numpy(
    streams: list[bytes], rank_bits: int, typecode: str
) -> tuple[array[int], array[int], array[int]]:
    import numpy as np  # noqa: PLC0415

    u64 = np.uint64
    bases = np.arange(POINTS_PER_WEIGHT, dtype=u64) * u64(_STRATUM)
    parts = []
    for rank, data in enumerate(streams):
        words = np.frombuffer(data, dtype="<u4").astype(u64)
        points = np.tile(bases, len(words) // POINTS_PER_WEIGHT) + ((words * u64(_STRATUM)) >> u64(32))
        parts.append((points << u64(rank_bits)) | u64(rank))
    values = np.concatenate(parts)
    values.sort()
    slots = values >> u64(SLOT_SHIFT + rank_bits)
    first = np.empty(len(slots), dtype=bool)
    first[0] = True
    np.not_equal(slots[1:], slots[:-1], out=first[1:])
    occupied = slots[first].astype(np.int64)
    ranks = (values[first] & u64((1 << rank_bits) - 1)).astype(np.int64)
    lengths = np.diff(occupied, prepend=-1)
    tail = np.full(SLOTS - 1 - int(occupied[-1]), ranks[0], dtype=np.int64)
    dtype = np.uint16 if typecode == "H" else np.uint32
    table = np.concatenate((np.repeat(ranks, lengths), tail)).astype(dtype)
    return (
        _array_from("I", occupied.astype(np.uint32).tobytes()),
        _array_from(typecode, ranks.astype(dtype).tobytes()),
        _array_from(typecode, table.tobytes()),
    )


def _slot_counts_numpy(table: array[int], ranks: int) -> list[int]:
    import numpy as np  # noqa: PLC0415

    counts: list[int] = np.bincount(np.frombuffer(table, dtype=table.typecode), minlength=ranks).tolist()
    return counts


def _slot_flows_numpy(a: Table, b: Table) -> dict[tuple[str, str], int]:
    import numpy as np  # noqa: PLC0415

    (a_table, a_ids), (b_table, b_ids) = a, b
    width = len(b_ids)
    # One code per slot for its pair of ranks, counted; the two tables number their nodes
    # differently, so whether a pair is a move is decided by name, once per distinct pair.
    codes = np.frombuffer(a_table, dtype=a_table.typecode).astype(np.intp)
    codes *= width
    codes += np.frombuffer(b_table, dtype=b_table.typecode)
    if len(a_ids) * width <= _MAX_FLOW_BINS:
        counts = np.bincount(codes, minlength=len(a_ids) * width)
        pairs = np.flatnonzero(counts)
        counts = counts[pairs]
    else:
        pairs, counts = np.unique(codes, return_counts=True)
    flows = {}
    for pair, count in zip(pairs.tolist(), counts.tolist(), strict=True):
        src, dst = a_ids[pair // width], b_ids[pair % width]
        if src != dst:
            flows[(src, dst)] = count
    return flows


def _array_from(typecode: str, data: bytes) -> array[int]:
    result = array(typecode)
    result.frombytes(data)
    return result


@functools.lru_cache(maxsize=64)
def _stratum_bases(rank_bits: int) -> list[int]:
    """Start of each stratum, shifted past the rank bits."""
    return [(j * _STRATUM) << rank_bits for j in range(POINTS_PER_WEIGHT)]


def _native_u32() -> str:
    return "I" if array("I").itemsize == 4 else "L"
