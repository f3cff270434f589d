"""The router: where a call for a key goes, decided without I/O.

``Router.decide(topology, owner, wire, hash_key, kind)`` is pure: from a topology snapshot, the key's
owner and the kind of call it returns a :class:`Decision`: send to the owner, send to a stand-in,
miss, or fail because the node is down with no stand-in, together with the bookkeeping that goes
with it (fence the key on the owner, record the stand-in's copy). ``Router.commit`` applies that
bookkeeping through the node's methods; ``Router.route`` does both. Multi-key calls use
``Router.plan``, which routes every key and groups them by target.

The rules (README "Failures and failover"):

- A node that is UP and has nothing to forget (``ready``) serves its keys.
- A node that is UP but still fencing serves writes; reads of a fenced key miss (its value there
  may be older than the last write); pinned calls of a fenced key are unavailable.
- A node that is DOWN or PROBING: its keys go to the failover policy's stand-in (``remap``: the
  next node clockwise, if it is ready; ``gutter``: the key's gutter node, if it is ready; the
  same node in every process), never for pinned calls (a counter,
  CAS loop or lock on a stand-in would restart from nothing). A key written on a stand-in is
  fenced on its owner, and leaves a copy the owner's prober removes when it returns; a read on a
  stand-in records nothing (it changed nothing, and fencing it would delete the owner's live
  counter or lock on return). A read of a copy left from an earlier outage misses. With no
  stand-in, a write fences the key (the owner's old value must go) and the call misses or raises
  ``NodeUnavailableError``.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Any, NamedTuple

from shardcache._topology import Node, Topology
from shardcache.errors import NodeUnavailableError
from shardcache.health import DOWN, UP

__all__ = ["CallKind", "Decision", "Plan", "Router"]


class CallKind(enum.Enum):
    """How a call treats its key; each member answers the router's questions about it."""

    #: get, gets, get_many, gets_many: a stand-in may serve it.
    READ = ("read", True, False, False, False)
    #: add, replace, append, prepend, cas, touch: a stand-in may take it; fenced if it fails;
    #: during a window the previous owner's copy is deleted after it takes effect.
    WRITE = ("write", True, True, False, True)
    #: set, delete (and their multi-key forms): as WRITE, but the previous owner's copy is deleted
    #: first, since the write replaces whatever is there.
    REPLACING_WRITE = ("replacing write", True, True, True, False)
    #: the read of a CAS loop (cas_update, compare-and-delete): only the owner may answer.
    PINNED_READ = ("pinned read", False, False, False, False)
    #: incr/decr, the writes of cas_update and locks: only the owner; never fenced on failure
    #: (deleting a counter because an increment failed would lose its count).
    PINNED = ("pinned write", False, False, False, True)

    def __init__(
        self, label: str, stand_in_ok: bool, fence_failed: bool, forget_before: bool, forget_after: bool
    ):
        self.label = label
        self.stand_in_ok = stand_in_ok
        self.fence_failed = fence_failed
        self.forget_before = forget_before
        self.forget_after = forget_after

    @property
    def writes(self) -> bool:
        return self.fence_failed

    @property
    def reads(self) -> bool:
        return self is CallKind.READ or self is CallKind.PINNED_READ


class Decision(NamedTuple):
    """Where one call goes. ``target`` None: no call (``down``: because the owner is away with no
    stand-in; else a miss). ``fence``/``copy``: bookkeeping for :meth:`Router.commit`."""

    target: Node | None
    owner: Node
    stand_in: bool = False
    down: bool = False
    fence: bool = False
    copy: bool = False
    count_failover: bool = False


class Plan(NamedTuple):
    """A multi-key call routed: ``targets`` by node id, ``groups`` of ``{wire: key}`` per target,
    the wires going to stand-ins (``moved``), and the nodes that are down with no stand-in."""

    targets: dict[str, Node]
    groups: dict[str, dict[bytes, Any]]
    moved: set[bytes]
    down: dict[str, NodeUnavailableError]


class Router:
    """Routing decisions for one client; immutable, thread-safe."""

    __slots__ = ("failover", "failover_ttl_s", "miss_on_error")

    def __init__(self, failover: str, *, failover_ttl_s: int, miss_on_error: bool) -> None:
        self.failover = failover
        self.failover_ttl_s = failover_ttl_s
        self.miss_on_error = miss_on_error

    # -- decisions (pure) -------------------------------------------------------------------------

    def decide(
        self, topology: Topology, owner: Node, hash_key: bytes, wire: bytes, kind: CallKind
    ) -> Decision:
        if owner.ready:
            return Decision(owner, owner)
        if owner.health.state == UP:  # up, with keys still to forget
            if kind is not CallKind.WRITE and kind is not CallKind.REPLACING_WRITE and owner.fenced(wire):
                # a read misses; a pinned call cannot happen (raised, or a miss with on_error="miss"),
                # never silently dropped
                return Decision(None, owner, down=not kind.stand_in_ok)
            return Decision(owner, owner)
        stand_in_ok = kind.stand_in_ok and owner.may_stand_in
        target = self.stand_in(topology, owner, hash_key) if stand_in_ok else None
        if target is None:
            # A write that could not happen: the owner's old value must go, and so must older copies.
            return Decision(None, owner, down=True, fence=kind.writes, copy=kind.writes, count_failover=True)
        if kind is CallKind.READ and owner.stale_on(target, wire):
            return Decision(None, owner, count_failover=True)  # an outdated copy, not yet removed
        # A read changes nothing on any node, so it records nothing: fencing it would delete the
        # owner's live value (a counter, a lock) when the owner returns.
        reading = kind is CallKind.READ
        return Decision(
            target, owner, stand_in=True, fence=not reading, copy=not reading, count_failover=True
        )

    def stand_in(self, topology: Topology, owner: Node, hash_key: bytes) -> Node | None:
        """The node serving ``owner``'s key while it is away, or None (fail fast, or none ready)."""
        if self.failover == "fail_fast":
            return None
        if self.failover == "gutter":
            gutter_ring = topology.gutter_ring
            if gutter_ring is None:
                return None
            gutter = topology.gutter_nodes[gutter_ring.node_for(hash_key)]
            return gutter if gutter.ready else None
        # The next node clockwise, whatever its health: every process picks the same one, so a write
        # made there in the owner's place is where every other process reads it. (Skipping to the
        # next *ready* node would make the choice depend on each process's view of a second node's
        # health, and two processes could stand in on different nodes.) If it is not ready too,
        # there is no stand-in.
        following = topology.ring.preference_list(hash_key, 2)
        if len(following) < 2:
            return None
        candidate = topology.nodes[following[1]]
        return candidate if candidate.ready else None

    def capped_ttl(self, expire: int) -> int:
        """The expiry of a copy on a stand-in: at most ``failover_ttl_s`` (negative stays negative:
        the item expires at once, as it would on its owner)."""
        if expire < 0:
            return expire
        return self.failover_ttl_s if expire == 0 or expire > self.failover_ttl_s else expire

    # -- bookkeeping ------------------------------------------------------------------------------

    def commit(self, decision: Decision, wire: bytes) -> None:
        """Apply a decision's bookkeeping to its owner node."""
        owner = decision.owner
        if owner.health.state == DOWN:
            owner.keep_probed()  # the prober may have been stopped (close()): a read must restart it
        if decision.count_failover:
            owner.count_failover()
        if decision.fence:
            owner.stood_in(decision.target, wire, writing=decision.copy)

    def route(
        self, topology: Topology, owner: Node, hash_key: bytes, wire: bytes, kind: CallKind
    ) -> Decision:
        decision = self.decide(topology, owner, hash_key, wire, kind)
        if decision.fence or decision.count_failover:
            self.commit(decision, wire)
        return decision

    def unavailable(self, decision: Decision, what: str) -> NodeUnavailableError | None:
        """The error a ``down`` decision raises (None with ``on_error="miss"``)."""
        if not decision.down or self.miss_on_error:
            return None
        return decision.owner.down_error(what, self.failover)

    def plan(
        self, topology: Topology, hashed: Iterable[tuple[Any, bytes, bytes]], kind: CallKind, what: str
    ) -> Plan:
        """Route validated keys ``(key, hashed key, wire)`` and group them by target."""
        nodes = topology.nodes
        hashed = list(hashed)
        owner_ids = topology.ring.nodes_for([hash_key for _, hash_key, _ in hashed])
        targets: dict[str, Node] = {}
        groups: dict[str, dict[bytes, Any]] = {}
        moved: set[bytes] = set()
        down: dict[str, NodeUnavailableError] = {}
        for (key, hash_key, wire), owner_id in zip(hashed, owner_ids, strict=True):
            owner = nodes[owner_id]
            target = owner
            if not owner.ready:
                decision = self.route(topology, owner, hash_key, wire, kind)
                if decision.target is None:
                    if decision.down and owner.node_id not in down:
                        down[owner.node_id] = owner.down_error(what, self.failover)
                    continue
                target = decision.target
                if decision.stand_in:
                    moved.add(wire)
            group = groups.get(target.node_id)
            if group is None:
                targets[target.node_id] = target
                groups[target.node_id] = {wire: key}
            else:
                group[wire] = key
        return Plan(targets, groups, moved, down)
