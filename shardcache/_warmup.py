"""Warm-up and drain windows: copying moved keys from their previous owners, race-free.

After a membership change, a key that moved has its value on its previous owner. During the window
a miss on the new owner is served by copying:

1. ``mg key v f t c`` on the previous owner: value, client flags, remaining TTL, CAS value;
2. ``ms key ... ME c`` (meta set in *add* mode) on the new owner, returning the copy's CAS value;
   it stores nothing if the key already exists there (a writer got there first);
3. ``mg key c`` on the previous owner again: if the key is gone or its CAS changed, a writer
   deleted or replaced it meanwhile, so the copy is withdrawn with ``md key C<copy's cas>``, which
   deletes it only if no one has written over it since.

Writers do the mirror: during the window, ``set``/``delete`` of a moved key first delete it on its
previous owner, then write the new one. Together these leave no interleaving in which the copy
outlives a write that happened after the value was read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from pymemcache.exceptions import MemcacheUnknownError

from shardcache._pool import NodePool
from shardcache._wire import Reader, delete_commands, exchange, raise_for_error, read_delete_replies
from shardcache.membership import Membership, Node, Topology

__all__ = ["forget_previous", "warm"]

Deserialize = Callable[[bytes, bytes, int], Any]


_ATTEMPTS = 3


def warm(
    membership: Membership,
    deserialize: Deserialize,
    topology: Topology,
    misses: Sequence[tuple[bytes, bytes, Node]],
    now: float,
) -> dict[bytes, Any]:
    """Copy missed keys from their previous owners to their owners; ``{wire: value}`` of those found.

    ``misses`` holds ``(hash_key, wire, owner)``. Only keys that moved in the last membership
    change, whose previous owner and owner are both ready, are looked up. A copy withdrawn because
    its source was *replaced* meanwhile (not deleted) is tried again, a few times: the key exists,
    and reporting a miss would let a counter restart from its initial value.
    """
    found: dict[bytes, Any] = {}
    pending = list(misses)
    for _ in range(_ATTEMPTS):
        copied, changed = _warm_once(membership, deserialize, topology, pending, now)
        found.update(copied)
        if not changed:
            break
        pending = [miss for miss in pending if miss[1] in changed]
    return found


def _warm_once(
    membership: Membership,
    deserialize: Deserialize,
    topology: Topology,
    misses: Sequence[tuple[bytes, bytes, Node]],
    now: float,
) -> tuple[dict[bytes, Any], set[bytes]]:
    """One pass of ``warm``: the values copied, and the keys whose source changed under the copy."""
    sources: dict[str, list[bytes]] = {}
    olds: dict[str, Node] = {}
    owner_of: dict[bytes, Node] = {}
    old_of: dict[bytes, Node] = {}
    for hash_key, wire, owner in misses:
        old = topology.previous_owner(hash_key, owner, now)
        if old is None or not old.ready or not owner.ready:
            continue
        sources.setdefault(old.node_id, []).append(wire)
        olds[old.node_id] = old
        owner_of[wire] = owner
        old_of[wire] = old
    if not sources:
        return {}, set()
    read = _run(membership, olds, sources, _read_request(b" v f t c k"), _read_meta, "warm-up read")
    values: dict[bytes, tuple[bytes, int, int, bytes]] = {}
    for reply in read:
        values.update(reply)
    copies: dict[str, list[tuple[bytes, bytes]]] = {}
    for wire, (data, flags, ttl, _) in values.items():
        command = b"ms %b %d ME F%d T%d c\r\n%b\r\n" % (wire, len(data), flags, ttl, data)
        copies.setdefault(owner_of[wire].node_id, []).append((wire, command))
    owners = {owner.node_id: owner for owner in owner_of.values()}
    stored: dict[bytes, bytes] = {}
    for reply in _run(membership, owners, copies, _commands, _read_meta_stored, "warm-up copy"):
        stored.update(reply)
    # Re-read the previous owners: a writer may have deleted or replaced the value meanwhile.
    recheck = {node_id: [w for w in wires if w in stored] for node_id, wires in sources.items()}
    current: dict[bytes, tuple[bytes, int, int, bytes]] = {}
    for reply in _run(membership, olds, recheck, _read_request(b" c k"), _read_meta, "warm-up recheck"):
        current.update(reply)
    withdraw: dict[str, list[tuple[bytes, bytes]]] = {}
    found: dict[bytes, Any] = {}
    changed: set[bytes] = set()
    for wire, cas in stored.items():
        now_there = current.get(wire)
        if now_there is None or now_there[3] != values[wire][3]:
            withdraw.setdefault(owner_of[wire].node_id, []).append((wire, b"md %b C%b\r\n" % (wire, cas)))
            if now_there is not None:
                changed.add(wire)  # replaced, not deleted: copy the new value
            continue
        data, flags, _, _ = values[wire]
        try:
            found[wire] = deserialize(wire, data, flags)
        except Exception:
            continue  # unreadable: a miss, as it would be on its own node
    if withdraw:
        _run(membership, owners, withdraw, _commands, _read_meta_deleted, "warm-up withdraw")
    return found, changed


def forget_previous(
    membership: Membership, topology: Topology, moved: Iterable[tuple[bytes, bytes, Node]], now: float
) -> None:
    """Delete moved keys on their previous owners (writers call it during a window), so that a later
    warm-up cannot bring back a value the write replaced."""
    groups: dict[str, list[bytes]] = {}
    olds: dict[str, Node] = {}
    for hash_key, wire, owner in moved:
        old = topology.previous_owner(hash_key, owner, now)
        if old is not None and old.health.state == "up":
            groups.setdefault(old.node_id, []).append(wire)
            olds[old.node_id] = old
    if groups:
        _run(
            membership, olds, groups, delete_commands, read_delete_replies, "delete on previous owner",
            fence=True,
        )  # fmt: skip


def _run(
    membership: Membership,
    nodes: Mapping[str, Node],
    groups: Mapping[str, Sequence[Any]],
    encode: Callable[[Sequence[Any]], bytes],
    decode: Callable[[Reader, Sequence[Any]], Any],
    what: str,
    *,
    fence: bool = False,
) -> list[Any]:
    """Pipeline ``groups`` to ``nodes``; report failures (with ``fence``, the keys a failed node
    was meant to forget are fenced on it, so no warm-up reads them there)."""
    pools: dict[str, NodePool] = {node_id: nodes[node_id].pool for node_id in groups}
    results, errors = exchange(pools, groups, encode, decode, _size)
    for node_id, exc in errors.items():
        membership.failed(nodes[node_id], exc, what, None, None)
        if fence:
            for wire in groups[node_id]:
                nodes[node_id].fence.add(wire)
    return [reply for replies in results.values() for reply in replies]


def _size(item: Any) -> int:
    return len(item[1]) if isinstance(item, tuple) else len(item) + 16


def _read_request(flags: bytes) -> Callable[[Sequence[bytes]], bytes]:
    def encode(wires: Sequence[bytes]) -> bytes:
        return b"".join(b"mg " + wire + flags + b"\r\n" for wire in wires)

    return encode


def _commands(chunk: Sequence[tuple[bytes, bytes]]) -> bytes:
    return b"".join(command for _, command in chunk)


def _is_miss(line: bytes) -> bool:
    return line[:2] == b"EN" and (len(line) == 2 or line[2:3] == b" ")  # flags may follow EN


def _fields(parts: Sequence[bytes]) -> dict[bytes, bytes]:
    return {part[:1]: part[1:] for part in parts}


def _read_meta(reader: Reader, wires: Sequence[bytes]) -> dict[bytes, tuple[bytes, int, int, bytes]]:
    """Replies to ``mg``: ``{wire: (data, client flags, ttl for a copy, cas)}``; misses left out."""
    found: dict[bytes, tuple[bytes, int, int, bytes]] = {}
    for _ in wires:
        line = reader.line()
        if _is_miss(line):
            continue
        parts = line.split()
        if parts and parts[0] == b"VA" and len(parts) > 1 and parts[1].isdigit():
            fields = _fields(parts[2:])
            data = reader.value(int(parts[1]))
        elif parts and parts[0] == b"HD":
            fields = _fields(parts[1:])
            data = b""
        else:
            raise_for_error(line)
        try:
            ttl = int(fields.get(b"t", b"-1"))
            found[fields[b"k"]] = (
                data,
                int(fields.get(b"f", b"0")),
                0 if ttl < 0 else max(ttl, 1),
                fields[b"c"],
            )
        except (KeyError, ValueError):
            raise MemcacheUnknownError(line[:32]) from None
    return found


def _read_meta_stored(reader: Reader, chunk: Sequence[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    """Replies to ``ms ... ME c``: ``{wire: cas}`` of the copies stored (NS: already there)."""
    stored: dict[bytes, bytes] = {}
    for wire, _ in chunk:
        line = reader.line()
        if line.startswith(b"HD"):
            cas = _fields(line.split()[1:]).get(b"c")
            if cas is None:
                raise MemcacheUnknownError(line[:32])
            stored[wire] = cas
        elif not line.startswith(b"NS"):
            raise_for_error(line)
    return stored


def _read_meta_deleted(reader: Reader, chunk: Sequence[tuple[bytes, bytes]]) -> int:
    """Replies to ``md ... C<cas>``: how many copies were withdrawn (EX: overwritten, kept)."""
    withdrawn = 0
    for _ in chunk:
        line = reader.line()
        if line.startswith(b"HD"):
            withdrawn += 1
        elif not line.startswith((b"EX", b"NF")):
            raise_for_error(line)
    return withdrawn
