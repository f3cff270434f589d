"""Rebalance: no node keeps a copy of a key it does not own, so none can resurface.

After a ring change the previous owners of the moved keys still hold their copies. Those copies
resurface as stale values later: when the key's new owner fails under ``remap`` (the stand-in is
often the previous owner), or when the change is undone (``add_node`` then ``remove_node``: the
keys go back, and the old copies are hits). Writes during a change's window delete them (see
``_warmup.forget_previous``), but a key not written then keeps its old copy for ever.

``rebalance`` enumerates every ready node's keys (``lru_crawler metadump``, slab class by slab
class, so no reply holds more than one class), and for each key the node does not own on the
current ring:

1. inside a change's window, if the node is the key's previous owner, the key is brought to its
   owner first (``_warmup.warm``: copied only where the owner has nothing, withdrawn if the source
   changes meanwhile), so counters and locks keep their state and the new owner starts warm;
2. it is deleted with ``md <key> C<cas>``: only if it is unchanged since the dump (a write that
   reached it meanwhile, from a process on an older view of the ring, is left alone and counted).

A node whose listing found strays is listed again (up to three passes): memcached's crawler can
miss items that move between LRU segments while it crawls (measured: 0.1-1.3% of the strays on a
node under load; benchmarks/rebalance_bench.py), and a later pass also deletes a stray written
during the previous one.

Keys whose owner is not ready are left alone: the node may be serving them as a stand-in, and its
copy may be the only one. Only keys under this client's ``key_prefix`` are considered (without a
prefix, every key on the nodes is: do not share the servers with other applications then).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from shardcache import _protocol as proto
from shardcache._flows import Call, Fanout, Flow, Sleep
from shardcache._protocol import RESERVED_PREFIX, DumpEntry, ErrorReply, Expect, Meta
from shardcache._topology import Node, Topology
from shardcache._warmup import warm
from shardcache.errors import ArgumentError, NodeError
from shardcache.health import Event

if TYPE_CHECKING:
    from shardcache._commands import Core

__all__ = ["RebalanceReport", "checked_timeout", "rebalance"]

_BUSY_RETRIES: Final = 20  # another crawl holds the crawler: wait for it, up to ~10 s
_BUSY_WAIT_S: Final = 0.5
_PASSES: Final = 3  # listings of a node at most: a pass that found strays is followed by another


@dataclass(frozen=True)
class RebalanceReport:
    """What :meth:`Client.rebalance` did. ``strays``: keys held by a node that does not own them;
    each was ``deleted``, ``changed`` (written since it was listed: left alone), already ``gone``,
    or ``skipped`` (its owner is not ready). ``copied``: strays brought to their owner first
    (inside a change's window). ``failed_nodes``: nodes that could not be listed or cleaned."""

    nodes: int
    scanned: int
    strays: int
    copied: int
    deleted: int
    changed: int
    gone: int
    skipped: int
    failed_nodes: tuple[str, ...]
    seconds: float


@dataclass
class _Tally:
    nodes: int = 0
    scanned: int = 0
    strays: int = 0
    copied: int = 0
    deleted: int = 0
    changed: int = 0
    gone: int = 0
    skipped: int = 0


def checked_timeout(timeout_s: object) -> float:
    """``Client.rebalance``'s ``timeout_s``: finite seconds > 0 (``ArgumentError`` otherwise)."""
    if (
        isinstance(timeout_s, bool)
        or not isinstance(timeout_s, int | float)
        or not 0 < timeout_s < float("inf")
    ):
        raise ArgumentError(f"timeout_s={timeout_s!r}: finite seconds > 0")
    return float(timeout_s)


def rebalance(
    core: Core, batch: int, keys_per_s: float | None, dry_run: bool = False
) -> Flow[RebalanceReport]:
    """Delete (inside a window: move) the keys each ready node holds but does not own. With
    ``dry_run`` only list and count them."""
    if type(batch) is not int or not 1 <= batch <= 10_000:
        raise ArgumentError(f"batch={batch!r}: an int, 1..10000")
    if keys_per_s is not None and (
        isinstance(keys_per_s, bool) or not isinstance(keys_per_s, int | float) or not keys_per_s > 0
    ):
        raise ArgumentError(f"keys_per_s={keys_per_s!r}: a positive number, or None for no limit")
    started = time.monotonic()
    topology = core.topology
    tally = _Tally()
    failed: list[str] = []
    for node in list(topology.nodes.values()):
        before = dataclasses.replace(tally)
        if not node.ready or not (yield from _node(core, topology, node, batch, keys_per_s, dry_run, tally)):
            failed.append(node.node_id)
            continue
        tally.nodes += 1
        core.events.emit(Event("rebalanced", node.node_id, _progress(before, tally)))
    return RebalanceReport(
        tally.nodes, tally.scanned, tally.strays, tally.copied, tally.deleted, tally.changed,
        tally.gone, tally.skipped, tuple(failed), time.monotonic() - started,
    )  # fmt: skip


def _node(
    core: Core, topology: Topology, node: Node, batch: int, keys_per_s: float | None, dry_run: bool,
    tally: _Tally,
) -> Flow[bool]:  # fmt: skip
    """List and clean one node, in passes: a metadump can miss items that move between LRU
    segments while it crawls, so a pass that found strays is followed by another (at most
    ``_PASSES``), which counts only strays the earlier ones had not seen. False if it failed."""
    seen: set[bytes] = set()
    for attempt in range(_PASSES if not dry_run else 1):
        try:
            entries = yield from _listing(node)
        except NodeError:
            return False
        strays = _strays(core, topology, node, entries, tally, seen, first=attempt == 0)
        if not strays:
            return True
        seen.update(wire for _, wire, _, _ in strays)
        for start in range(0, 0 if dry_run else len(strays), batch):
            chunk = strays[start : start + batch]
            if not (yield from _clean(core, topology, node, chunk, tally)):
                return False
            # a pause between batches (it also starts the next batch's deadline afresh)
            yield Sleep(len(chunk) / keys_per_s if keys_per_s else 0.0)
    return True


def _progress(before: _Tally, after: _Tally) -> str:
    counts = {name: getattr(after, name) - getattr(before, name) for name in ("scanned", "strays", "copied",
              "deleted", "changed", "gone", "skipped")}  # fmt: skip
    return ", ".join(f"{name} {count}" for name, count in counts.items())


def _listing(node: Node) -> Flow[list[DumpEntry]]:
    """Every item on ``node``, slab class by slab class (``NodeError`` if it cannot be listed)."""
    reply = yield Call(node, proto.stats(["items"]), Expect.STATS, "rebalance (stats items)")
    if type(reply) is ErrorReply:
        raise NodeError(f"memcached node {node.node_id}: stats items refused: {reply.message}", node.node_id)
    # "items:<class>:number" for each slab class holding items (1..63); anything else is ignored
    ids = [name.split(b":")[1] for name in reply if name.startswith(b"items:") and name.endswith(b":number")]
    classes = sorted({int(i) for i in ids if i.isdigit() and len(i) <= 2 and 1 <= int(i) <= 63})
    entries: list[DumpEntry] = []
    for slab_class in classes:
        for _ in range(_BUSY_RETRIES):
            dump = yield Call(node, proto.metadump([slab_class]), Expect.DUMP, "rebalance (metadump)")
            if type(dump) is not ErrorReply or dump.kind != "BUSY":
                break
            yield Sleep(_BUSY_WAIT_S)
        if type(dump) is ErrorReply:
            raise NodeError(f"memcached node {node.node_id}: metadump refused: {dump.message}", node.node_id)
        entries.extend(dump)
        yield Sleep(0.0)  # the next class's dump gets a deadline of its own
    return entries


def _strays(
    core: Core, topology: Topology, node: Node, entries: Sequence[DumpEntry], tally: _Tally,
    seen: set[bytes], *, first: bool,
) -> list[tuple[bytes, bytes, Node, int]]:  # fmt: skip
    """``(hashed key, wire key, owner, cas)`` of the entries ``node`` holds but does not own and
    whose owner is ready. Counted once: the first pass counts what it scans, a later one only
    the strays not ``seen`` before."""
    prefix, unprefixed = core.keys.prefix, core.keys.unprefixed
    strays = []
    for wire, cas, _ in entries:
        if (prefix and not wire.startswith(prefix)) or wire.startswith(RESERVED_PREFIX):
            continue  # another application's key, or fleet fencing's outage marks and journals
        tally.scanned += first
        hash_key = unprefixed(wire)
        owner = topology.owner(hash_key)
        if owner is node:
            continue
        if not owner.ready:
            tally.strays += first
            tally.skipped += first
            continue
        tally.strays += wire not in seen
        strays.append((hash_key, wire, owner, cas))
    return strays


def _clean(
    core: Core,
    topology: Topology,
    node: Node,
    strays: Sequence[tuple[bytes, bytes, Node, int]],
    tally: _Tally,
) -> Flow[bool]:
    """Move (inside a window, from a previous owner) then delete one batch; False if ``node``
    failed (the executor has reported it)."""
    if topology.previous is not None:
        now = core.options.clock()
        moved = [(h, w, owner) for h, w, owner, _ in strays if topology.previous_owner(h, owner, now) is node]
        if moved:
            tally.copied += len((yield from warm(core, topology, moved)))
    payload = b"".join(proto.meta_delete(wire, cas=cas) for _, wire, _, cas in strays)
    results = yield Fanout(
        {node.node_id: (node, (payload, [(Expect.META, False)] * len(strays)))}, "rebalance"
    )
    result = results[node.node_id]
    if isinstance(result, NodeError):
        return False
    for reply in result:
        status = reply.status if type(reply) is Meta else b""
        if status == b"HD":
            tally.deleted += 1
        elif status == b"EX":
            tally.changed += 1
        elif status == b"NF":
            tally.gone += 1
    return True
