"""Warm-up and drain windows, as flows: copying moved keys from their previous owners, race-free.

After a membership change, a key that moved has its value on its previous owner. During the window
a miss on the new owner is served by copying:

1. ``mg key v f t c k`` on the previous owner: value, client flags, remaining TTL, CAS value;
2. ``ms key ... ME c`` (meta set in *add* mode) on the new owner, returning the copy's CAS value;
   it stores nothing if the key already exists there (a writer got there first);
3. ``mg key c k`` on the previous owner again: if the key is gone or its CAS changed, a writer
   deleted or replaced it meanwhile, so the copy is withdrawn with ``md key C<copy's cas>``, which
   deletes it only if no one has written over it since.

Writers do the mirror (``forget_previous``): during the window, ``set``/``delete`` of a moved key
first delete it on its previous owner, then write the new one; conditional writes do it after they
take effect. Together these leave no interleaving in which the copy outlives a write that happened
after the value was read. Each step is one :class:`~shardcache._flows.Fanout`: every node involved
at once, one round trip per step.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final

from shardcache import _protocol as proto
from shardcache._flows import Fanout, Flow, Job
from shardcache._protocol import Expect, Meta
from shardcache._topology import Node, Topology
from shardcache.errors import ArgumentError, NodeError
from shardcache.health import UP

if TYPE_CHECKING:
    from shardcache._commands import Core

__all__ = ["Moved", "forget_previous", "warm"]

Moved = tuple[bytes, bytes, Node]  # (hashed key, wire key, its owner now)

_ATTEMPTS: Final = 3
_META: Final = (Expect.META, False)


def warm(core: Core, topology: Topology, misses: Sequence[Moved]) -> Flow[dict[bytes, Any]]:
    """Copy missed keys from their previous owners to their owners; ``{wire: value}`` of those found.

    Only keys that moved in the last membership change, whose previous owner and owner are both
    ready, are looked up. A copy withdrawn because its source was *replaced* meanwhile (not
    deleted) is tried again, a few times: the key exists, and reporting a miss would let a counter
    restart from its initial value.
    """
    found: dict[bytes, Any] = {}
    pending = list(misses)
    for _ in range(_ATTEMPTS):
        copied, changed = yield from _warm_once(core, topology, pending)
        found.update(copied)
        if not changed:
            break
        pending = [miss for miss in pending if miss[1] in changed]
    return found


def _warm_once(
    core: Core, topology: Topology, misses: Sequence[Moved]
) -> Flow[tuple[dict[bytes, Any], set[bytes]]]:
    sources, nodes, owner_of = _sources(topology, misses, core.options.clock())
    if not sources:
        return {}, set()
    read = b"".join
    replies = yield from _fanout(nodes, {
        node_id: read(proto.meta_get(w, cas=True, flags=True, ttl=True, key=True) for w in wires)
        for node_id, wires in sources.items()
    }, {node_id: len(wires) for node_id, wires in sources.items()}, "warm-up read")  # fmt: skip
    values = {_key(r): r for r in replies if r.status == b"VA" and _key(r) in owner_of}
    copies = _copies(values, owner_of)
    stored: dict[bytes, int] = {}
    order = {node_id: [w for w in values if owner_of[w].node_id == node_id] for node_id in copies}
    results = yield from _fanout_by_node(nodes, {n: b"".join(p) for n, p in copies.items()},
                                         {n: len(p) for n, p in copies.items()}, "warm-up copy")  # fmt: skip
    for node_id, node_replies in results.items():
        for wire, reply in zip(order[node_id], node_replies, strict=True):
            if type(reply) is Meta and reply.status == b"HD":
                stored[wire] = _number(reply, b"c")
    # Re-read the previous owners: a writer may have deleted or replaced the value meanwhile.
    recheck = {node_id: [w for w in wires if w in stored] for node_id, wires in sources.items()}
    recheck = {node_id: wires for node_id, wires in recheck.items() if wires}
    current: dict[bytes, Meta] = {}
    if recheck:
        replies = yield from _fanout(nodes, {
            node_id: read(proto.meta_get(w, value=False, cas=True, key=True) for w in wires)
            for node_id, wires in recheck.items()
        }, {node_id: len(wires) for node_id, wires in recheck.items()}, "warm-up recheck")  # fmt: skip
        current = {_key(r): r for r in replies if r.status in (b"HD", b"VA")}
    found, changed, withdraw = _outcome(core, stored, values, current, owner_of)
    if withdraw:
        yield from _fanout_by_node(nodes, {n: b"".join(p) for n, p in withdraw.items()},
                                   {n: len(p) for n, p in withdraw.items()}, "warm-up withdraw")  # fmt: skip
    return found, changed


def _sources(
    topology: Topology, misses: Sequence[Moved], now: float
) -> tuple[dict[str, list[bytes]], dict[str, Node], dict[bytes, Node]]:
    """``({previous owner: wires}, {node_id: node}, {wire: owner})`` for the misses worth copying:
    the key moved in the window's change, and both its previous owner and its owner are ready."""
    sources: dict[str, list[bytes]] = {}
    nodes: dict[str, Node] = {}
    owner_of: dict[bytes, Node] = {}
    for hash_key, wire, owner in misses:
        old = topology.previous_owner(hash_key, owner, now)
        # both up, and neither still has to forget this key (a node fencing *other* keys is fine:
        # skipping it would let a counter restart or a lock be taken twice)
        if old is None or not _usable(old, wire) or not _usable(owner, wire):
            continue
        sources.setdefault(old.node_id, []).append(wire)
        nodes[old.node_id] = old
        nodes[owner.node_id] = owner
        owner_of[wire] = owner
    return sources, nodes, owner_of


def _usable(node: Node, wire: bytes) -> bool:
    return node.ready or (node.health.state == UP and not node.fenced(wire))


def _copies(values: dict[bytes, Meta], owner_of: dict[bytes, Node]) -> dict[str, list[bytes]]:
    """``{owner: [ms add requests]}``: each value with its flags and remaining TTL. A value whose
    flags or TTL are out of range (not something memcached sends) is dropped from ``values``."""
    copies: dict[str, list[bytes]] = {}
    for wire, reply in list(values.items()):
        ttl = _number(reply, b"t")
        try:
            payload = proto.meta_set(
                wire, reply.data or b"", flags=_number(reply, b"f"), ttl=0 if ttl < 0 else max(ttl, 1),
                mode="add", return_cas=True,
            )  # fmt: skip
        except ArgumentError:
            del values[wire]
            continue
        copies.setdefault(owner_of[wire].node_id, []).append(payload)
    return copies


def _outcome(
    core: Core, stored: dict[bytes, int], values: dict[bytes, Meta], current: dict[bytes, Meta],
    owner_of: dict[bytes, Node],
) -> tuple[dict[bytes, Any], set[bytes], dict[str, list[bytes]]]:  # fmt: skip
    """For each stored copy: kept (its source is unchanged: ``found``), or withdrawn (``withdraw``
    requests per owner), and copied again if its source was replaced rather than deleted
    (``changed``)."""
    withdraw: dict[str, list[bytes]] = {}
    found: dict[bytes, Any] = {}
    changed: set[bytes] = set()
    for wire, cas in stored.items():
        now_there = current.get(wire)
        if now_there is None or now_there.flags.get(b"c") != values[wire].flags.get(b"c"):
            withdraw.setdefault(owner_of[wire].node_id, []).append(proto.meta_delete(wire, cas=cas))
            if now_there is not None:
                changed.add(wire)  # replaced, not deleted: copy the new value
            continue
        try:
            found[wire] = core.serde.deserialize(wire, values[wire].data or b"", _number(values[wire], b"f"))
        except Exception:  # unreadable: a miss, as it would be on its own node
            continue
    return found, changed, withdraw


def forget_previous(core: Core, topology: Topology, moved: Iterable[Moved]) -> Flow[None]:
    """Delete moved keys on their previous owners (writers call it during a window), so that a later
    warm-up cannot bring back a value the write replaced. A previous owner that cannot be reached
    is fenced for those keys, as is one that is down now: it deletes them before it serves them
    again (so a node readmitted inside the window cannot warm a deleted value back)."""
    now = core.options.clock()
    groups: dict[str, list[bytes]] = {}
    nodes: dict[str, Node] = {}
    for hash_key, wire, owner in moved:
        old = topology.previous_owner(hash_key, owner, now)
        if old is None:
            continue
        if old.health.state == UP:
            groups.setdefault(old.node_id, []).append(wire)
            nodes[old.node_id] = old
        else:
            old.fence(wire)
    if not groups:
        return
    jobs: dict[str, tuple[Node, Job]] = {
        node_id: (
            nodes[node_id],
            (b"".join(proto.delete(w) for w in wires), [(Expect.STATUS, False)] * len(wires)),
        )
        for node_id, wires in groups.items()
    }
    results = yield Fanout(jobs, "delete on previous owner")
    for node_id, result in results.items():
        if isinstance(result, NodeError) or any(type(r) is proto.ErrorReply for r in result):
            for wire in groups[node_id]:
                nodes[node_id].fence(wire)


def _fanout(
    nodes: dict[str, Node], payloads: dict[str, bytes], counts: dict[str, int], what: str
) -> Flow[list[Meta]]:
    """Meta requests to several nodes at once: every node's well-formed replies, in one list."""
    results = yield from _fanout_by_node(nodes, payloads, counts, what)
    return [reply for replies in results.values() for reply in replies if type(reply) is Meta]


def _fanout_by_node(
    nodes: dict[str, Node], payloads: dict[str, bytes], counts: dict[str, int], what: str
) -> Flow[dict[str, list[Any]]]:
    """``{node_id: replies}`` for the nodes that answered; a node that failed (the executor has
    reported it) gives nothing. A reply that is not a ``Meta`` (an error, an oversized value) spoils
    only its own key: warm-up is best-effort."""
    jobs: dict[str, tuple[Node, Job]] = {
        node_id: (nodes[node_id], (payload, [_META] * counts[node_id]))
        for node_id, payload in payloads.items()
    }
    results = yield Fanout(jobs, what)
    answered: dict[str, list[Any]] = {}
    for node_id, result in results.items():
        if not isinstance(result, NodeError):
            answered[node_id] = result
    return answered


def _key(reply: Meta) -> bytes:
    return reply.flags.get(b"k", b"")


def _number(reply: Meta, flag: bytes) -> int:
    """A numeric meta flag of ``reply`` (missing: -1 for TTL, 0 otherwise)."""
    raw = reply.flags.get(flag)
    if raw is None:
        return -1 if flag == b"t" else 0
    try:
        return int(raw)
    except ValueError:
        return -1 if flag == b"t" else 0
