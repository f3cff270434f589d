"""Multi-key and cluster-wide commands, as flows: one :class:`~shardcache._flows.Fanout` each.

A multi-key call validates every key (and serializes every value) before anything is sent, routes
them with ``Router.plan`` (grouped by target node), and sends every node its share at once: about
one round trip however many nodes it touches. Each node's failure is reported by the executor;
here the failures become a raise (the first one) or misses (``on_error="miss"``), and a write that
may not have reached its node fences its keys there.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from pymemcache.client.base import STAT_TYPES

from shardcache import _protocol as proto
from shardcache._commands import _MISSING, CasToken, Core
from shardcache._events import refusal, report_failure
from shardcache._fleet import USER_FLAGS, journal_plan, read_copies, tagged
from shardcache._flows import Each, Fanout, Flow, Job
from shardcache._protocol import ErrorReply, Expect, Value
from shardcache._router import CallKind, Plan
from shardcache._topology import Node, Topology
from shardcache._warmup import forget_previous, warm
from shardcache.errors import (
    ArgumentError,
    NodeError,
    NodeUnavailableError,
    ProtocolError,
    ShardcacheError,
    ValueTooLargeError,
)
from shardcache.health import UP

__all__ = ["cache_memlimit", "delete_many", "fetch", "flush_all", "set_many", "stats", "version"]

Hashed = list[tuple[Any, bytes, bytes]]  # (key as given, hashed key, wire key)

_KEYS_PER_GET: Final = 100  # keys per get command: short lines, and a value for a key not asked is caught


def hashed_keys(core: Core, keys: Any, what: str) -> Hashed:
    """Validate ``keys`` (an iterable of keys, not a single key) before anything is sent."""
    if isinstance(keys, str | bytes | bytearray | memoryview) or not isinstance(keys, Iterable):
        raise ArgumentError(f"{what} takes an iterable of keys, got {type(keys).__name__}: {keys!r:.80}")
    return core.keys.wire_many(keys)


def _owners(core: Core, hashed: Hashed) -> list[tuple[bytes, bytes, Node]]:
    topology = core.topology
    return [(hash_key, wire, topology.owner(hash_key)) for _, hash_key, wire in hashed]


def _drop_untaggable(plan: Plan, owners: dict[bytes, Node], encoded: dict[bytes, tuple[bytes, int]]) -> None:
    """Keys for stand-ins whose flags leave no room for the stand-in tag: not written there, and
    reported as keys of a node that is down."""
    if not owners:
        return  # nothing goes to a stand-in (the usual case: no loop over the keys)
    for target_id, group in list(plan.groups.items()):
        for wire in [w for w in group if w in owners and encoded[w][1] > USER_FLAGS]:
            del group[wire]
            owner = owners[wire]
            plan.down.setdefault(
                owner.node_id,
                NodeUnavailableError(
                    f"memcached node {owner.node_id} is down and a value's flags above {USER_FLAGS} "
                    "leave no room for the stand-in tag: not written elsewhere (set_many)",
                    owner.node_id,
                ),
            )
        if not group:
            del plan.groups[target_id], plan.targets[target_id]


def _owners_of_moved(
    topology: Topology, plan: Plan, hashed: list[tuple[Any, bytes, bytes]]
) -> dict[bytes, Node]:
    """The owner of each key a multi-key call sends to a stand-in (none: an empty dict)."""
    moved = plan.moved
    return {wire: topology.owner(h) for _, h, wire in hashed if wire in moved} if moved else {}


def _this_outages(reply: list[Any], owners: dict[bytes, Node]) -> list[Any]:
    """A stand-in's items: its own keys as they are, copies only if made in this outage."""
    return [
        kept
        for item in reply
        for kept in ([item] if item[0] not in owners else read_copies(owners[item[0]], [item]))
    ]


def _settle(
    core: Core, results: Mapping[str, Any], down: Mapping[str, NodeUnavailableError], *, reading: bool
) -> None:
    """Raise the first node failure of a multi-key call, unless it becomes a miss."""
    for result in results.values():
        if isinstance(result, NodeError) and not core.swallowed(result, reading=reading):
            raise result
    if down and not core.miss_on_error:
        raise next(iter(down.values()))


# -- reads ----------------------------------------------------------------------------------------


def fetch(core: Core, keys: Any, *, with_cas: bool) -> Flow[dict[Any, Any]]:
    """get_many / gets_many: ``{key: value}`` or ``{key: (value, CasToken)}`` of the keys found."""
    what = "gets_many" if with_cas else "get_many"
    hashed = hashed_keys(core, keys, what)
    if not hashed:
        return {}
    topology = core.topology
    plan = core.router.plan(topology, hashed, CallKind.READ, what)
    jobs: dict[str, tuple[Node, Job]] = {}
    expect = Expect.CAS_VALUES if with_cas else Expect.VALUES
    for node_id, group in plan.groups.items():
        wires = list(group)
        expects: list[tuple[int, bool, Any]]
        if len(wires) <= _KEYS_PER_GET:  # one command whose keys are the group's: no set to build
            payload, expects = proto.retrieve(wires, cas=with_cas), [(expect, False, group)]
        else:
            chunks = [wires[i : i + _KEYS_PER_GET] for i in range(0, len(wires), _KEYS_PER_GET)]
            payload = b"".join(proto.retrieve(chunk, cas=with_cas) for chunk in chunks)
            expects = [(expect, False, frozenset(c)) for c in chunks]
        jobs[node_id] = (plan.targets[node_id], (payload, expects))
    results = (yield Fanout(jobs, what)) if jobs else {}
    found: dict[Any, Any] = {}
    copies_of = _owners_of_moved(topology, plan, hashed)
    deserialize = core.serde.deserialize
    plain = -1 if with_cas else core.plain_flags  # flags whose data is the value: no serde call
    for node_id, result in results.items():
        if isinstance(result, NodeError):
            continue
        node, group = plan.targets[node_id], plan.groups[node_id]
        for reply in result:
            if type(reply) is ErrorReply:
                core.refused(node, reply, what, None, CallKind.READ)
                continue
            items = _this_outages(reply, copies_of) if copies_of else reply
            for item in items:
                if type(item) is Value and item[1] == plain:
                    found[group[item[0]]] = item[2]
                    continue
                key = group[item[0]]
                try:  # Core.decode, written in for the common case
                    if type(item) is Value:
                        wire, flags, data, _ = item
                        value = deserialize(wire, data, flags)
                    else:
                        value = _MISSING
                except Exception:
                    value = _MISSING
                if value is _MISSING:
                    value = core.decode(node, key, item)  # raises, or reports and misses
                    if value is _MISSING:
                        continue
                found[key] = (value, CasToken(b"%d" % item.cas, node_id)) if with_cas else value
    _settle(core, results, plan.down, reading=True)
    if topology.window and not with_cas and len(found) < len(hashed):
        missed = [(key, h, w) for key, h, w in hashed if key not in found]
        warmed = yield from warm(core, topology, _owners(core, missed))
        for key, _, wire in missed:
            if wire in warmed:
                found[key] = warmed[wire]
    return found


# -- writes ---------------------------------------------------------------------------------------


def _items(values: Any) -> list[tuple[Any, Any]]:
    if isinstance(values, Mapping):
        return list(values.items())
    if isinstance(values, str | bytes) or not isinstance(values, Iterable):
        raise ArgumentError(f"set_many takes a mapping or (key, value) pairs, got {type(values).__name__}")
    items = []
    for pair in values:
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            raise ArgumentError(f"set_many: expected a (key, value) pair, got {pair!r:.80}")
        items.append((pair[0], pair[1]))
    return items


def set_many(
    core: Core, values: Any, expire: int, noreply: bool | None, flags: int | None
) -> Flow[list[Any]]:
    """Store every item; the keys that were not stored. Everything is checked and serialized first."""
    items = _items(values)
    if noreply is None:
        noreply = core.noreply
    expire = proto.check_expire(expire)
    capped = core.router.capped_ttl(expire)
    hashed = hashed_keys(core, [key for key, _ in items], "set_many")
    encode = core.encode
    plain = flags is None and core.plain_flags == 0  # bytes are stored as they are (Core.encode)
    encoded = {
        wire: (value, 0) if plain and type(value) is bytes else encode(wire, value, flags)
        for (_, _, wire), (_, value) in zip(hashed, items, strict=True)
    }
    # with the key's own expire (a stand-in's is capped below)
    lines = proto.store_many(b"set", [(w, d, f) for w, (d, f) in encoded.items()], expire, noreply=noreply)
    commands = dict(zip(encoded, lines, strict=True))
    topology = core.topology
    if topology.previous is not None:  # in a window the previous owners' copies go first
        yield from forget_previous(core, topology, _owners(core, hashed))
    kind = CallKind.REPLACING_WRITE
    plan = core.router.plan(topology, hashed, kind, "set_many")
    owners = _owners_of_moved(topology, plan, hashed)
    _drop_untaggable(plan, owners, encoded)
    if core.journal and plan.moved:
        yield from journal_plan(topology, plan, hashed)
    jobs: dict[str, tuple[Node, Job]] = {}
    for node_id, group in plan.groups.items():
        payload = b"".join(
            [
                commands[w]
                if w not in owners
                else proto.store(
                    b"set", w, encoded[w][0], tagged(owners[w], encoded[w][1]) or 0, capped, noreply=noreply
                )
                for w in group
            ]
        )
        jobs[node_id] = (
            plan.targets[node_id],
            (payload, [] if noreply else [(Expect.STATUS, True)] * len(group)),
        )
    results = (yield Fanout(jobs, "set_many")) if jobs else {}
    stored, too_large = _stored(core, plan, results, noreply)
    failed = [key for key, _, wire in hashed if wire not in stored]
    _settle(core, results, plan.down, reading=False)
    if too_large:  # raised after the others are stored, naming the first key and every failure
        key, err = too_large[0]
        others = [k for k, _ in too_large[1:]]
        more = f" (and {len(others)} more: {others!r:.200})" if others else ""
        raise ValueTooLargeError(f"{err}{more}", key, err.node_id, failed)
    return failed


def _stored(
    core: Core, plan: Plan, results: Mapping[str, list[Any] | NodeError], noreply: bool
) -> tuple[set[bytes], list[tuple[Any, ValueTooLargeError]]]:
    """set_many's replies: the wire keys stored, and the items refused as too large (the
    caller's data, raised last); other refusals are reported (and raised unless they are misses);
    a node that failed has all its keys fenced (they may or may not have been written)."""
    stored: set[bytes] = set()
    too_large: list[tuple[Any, ValueTooLargeError]] = []
    for node_id, result in results.items():
        node, group = plan.targets[node_id], plan.groups[node_id]
        if isinstance(result, NodeError):
            if isinstance(result, NodeUnavailableError | ProtocolError):
                for wire in group:
                    node.fence(wire)  # it may or may not have been written
            continue
        if noreply:
            stored.update(group)
            continue
        for (wire, key), reply in zip(group.items(), result, strict=True):
            if reply == b"STORED":
                stored.add(wire)
            elif type(reply) is ErrorReply:
                err = refusal(node, reply, "set_many", key)
                if isinstance(err, ValueTooLargeError):
                    too_large.append((key, err))  # the caller's data, not a node failure
                    continue
                report_failure(core.events, node, err, "", key)
                if not core.swallowed(err, reading=False):
                    raise err
    return stored, too_large


def delete_many(core: Core, keys: Any, noreply: bool | None) -> Flow[bool]:
    """Delete every key; True (as pymemcache) unless a node failed or was down. Keys whose node is
    down or failed are fenced, as with ``delete``."""
    if noreply is None:
        noreply = core.noreply
    hashed = hashed_keys(core, keys, "delete_many")
    topology = core.topology
    if topology.previous is not None:
        yield from forget_previous(core, topology, _owners(core, hashed))
    kind = CallKind.REPLACING_WRITE
    plan = core.router.plan(topology, hashed, kind, "delete_many")
    if core.journal and plan.moved:
        yield from journal_plan(topology, plan, hashed)
    jobs: dict[str, tuple[Node, Job]] = {}
    for node_id, group in plan.groups.items():
        payload = b"".join(proto.delete(w, noreply=noreply) for w in group)
        jobs[node_id] = (
            plan.targets[node_id],
            (payload, [] if noreply else [(Expect.STATUS, False)] * len(group)),
        )
    results = (yield Fanout(jobs, "delete_many")) if jobs else {}
    ok = not plan.down
    for node_id, result in results.items():
        node, group = plan.targets[node_id], plan.groups[node_id]
        if isinstance(result, NodeError):
            ok = False
            if isinstance(result, NodeUnavailableError | ProtocolError):
                for wire in group:
                    node.fence(wire)
            continue
        for (wire, key), reply in zip(group.items(), result, strict=False):
            if type(reply) is ErrorReply:
                ok = False
                core.refused(node, reply, "delete_many", key, kind)
                node.fence(wire)
    _settle(core, results, plan.down, reading=False)
    return ok


# -- every node -----------------------------------------------------------------------------------


def _each(
    core: Core, nodes: Sequence[Node], payload: bytes, kind: int, what: str, fallback: Any
) -> Flow[tuple[dict[str, Any], ShardcacheError | None]]:
    """``payload`` to every UP node in ``nodes`` at once: ``({node_id: reply or fallback}, the
    first failure to raise)``; a node that is down counts as a failure. Failures become None
    with ``on_error="miss"`` (still reported)."""
    up = [node for node in nodes if node.health.state == UP]
    results: dict[str, Any] = {node.node_id: fallback for node in nodes}
    replies = (yield Each(up, payload, kind, what)) if up else {}
    first: ShardcacheError | None = None
    for node in up:
        reply = replies[node.node_id]
        if isinstance(reply, NodeError):
            if not core.swallowed(reply, reading=False) and first is None:
                first = reply
        elif type(reply) is ErrorReply:
            err = refusal(node, reply, what, None)
            report_failure(core.events, node, err, "", None)
            if not core.swallowed(err, reading=False) and first is None:
                first = err
        else:
            results[node.node_id] = reply
    if first is None and not core.miss_on_error:
        for node in nodes:
            if node.health.state != UP:
                first = node.down_error(what, core.router.failover)
                break
    return results, first


def _raised(outcome: tuple[dict[str, Any], ShardcacheError | None]) -> dict[str, Any]:
    results, first = outcome
    if first is not None:
        raise first
    return results


def flush_all(core: Core, delay: int) -> Flow[dict[str, bool]]:
    """Invalidate every item on every node (gutter nodes included): ``{node_id: ok}``. A node that
    is down or fails is flushed when it returns (its reads miss until then). The reply is always
    awaited: whether each node was flushed decides whether it must be fenced. Nodes a drain window
    still reads from are flushed too (not in the result), so no warm-up copies a flushed value."""
    payload = proto.flush_all(delay)
    topology = core.topology
    nodes = list(topology.all_nodes())
    listed = {node.node_id for node in nodes}
    nodes += [node for node_id, node in topology.previous_nodes.items() if node_id not in listed]
    for node in nodes:
        if node.health.state != UP:
            node.fence_all()
    replies, first = yield from _each(core, nodes, payload, Expect.OK, "flush_all", False)
    results = {node_id: reply == b"OK" for node_id, reply in replies.items()}
    for node in nodes:
        if not results[node.node_id]:
            node.fence_all()
    if first is not None:
        raise first
    return {node_id: ok for node_id, ok in results.items() if node_id in listed}


def stats(core: Core, args: Sequence[Any]) -> Flow[dict[str, dict[bytes, Any]]]:
    """``stats [args]`` on every ring node, values converted as pymemcache converts them."""
    payload = proto.stats(args)
    outcome = yield from _each(core, list(core.topology.nodes.values()), payload, Expect.STATS, "stats", {})
    return {node_id: _convert_stats(reply) for node_id, reply in _raised(outcome).items()}


def _convert_stats(raw: dict[bytes, bytes]) -> dict[bytes, Any]:
    out: dict[bytes, Any] = {}
    for name, value in raw.items():
        try:
            out[name] = STAT_TYPES.get(name, int)(value)
        except Exception:
            out[name] = value
    return out


def version(core: Core) -> Flow[dict[str, bytes]]:
    nodes = list(core.topology.nodes.values())
    return _raised((yield from _each(core, nodes, proto.version(), Expect.VERSION, "version", b"")))


def cache_memlimit(core: Core, memlimit: int) -> Flow[dict[str, bool]]:
    payload = proto.cache_memlimit(memlimit)
    nodes = list(core.topology.nodes.values())
    replies = _raised((yield from _each(core, nodes, payload, Expect.OK, "cache_memlimit", False)))
    return {node_id: reply == b"OK" for node_id, reply in replies.items()}
