"""The nodes a client talks to, as values and small state machines: ``Node``, ``FenceLog``, ``Topology``.

A ``Topology`` (the ring and its ``Node`` objects, the gutter pool, and during a warm-up or drain
window the previous ring) is an immutable snapshot: every request reads the client's current one
once and finishes on it; a membership change swaps the whole reference.

A ``Node`` is one server as this client sees it: its connection pool, its health state machine, its
fence log (keys it must forget before it serves them again) and the copies other nodes hold in its
place during an outage. Its state changes only through its methods, each of which keeps the
invariant requests rely on: ``ready`` is True exactly when the node is UP with nothing to forget.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Final

from shardcache._conn import NodePool
from shardcache.errors import NodeTimeoutError, NodeUnavailableError, ProtocolError
from shardcache.health import UP, NodeHealth
from shardcache.nodes import NodeSpec
from shardcache.ring import Ring

if TYPE_CHECKING:
    from shardcache._fleet import Mark

__all__ = ["FenceLog", "ForgetWork", "Node", "Topology"]


class FenceLog:
    """Keys a node must forget before it serves them again; bounded; guarded by its node's lock.

    Past ``limit`` keys the log stops recording and marks itself overflowed: the node is then
    flushed as a whole. Keys being forgotten right now (taken but not yet settled) still count as
    recorded, so a read never slips through while the deletes are on their way.
    """

    __slots__ = ("_inflight", "_inflight_overflowed", "keys", "limit", "overflowed")

    def __init__(self, limit: int) -> None:
        self.keys: set[bytes] = set()
        self.limit = limit
        self.overflowed = False
        self._inflight: set[bytes] = set()
        self._inflight_overflowed = False

    def __contains__(self, wire: object) -> bool:
        return self.overflowed or self._inflight_overflowed or wire in self.keys or wire in self._inflight

    def __bool__(self) -> bool:
        return self.overflowed or self._inflight_overflowed or bool(self.keys) or bool(self._inflight)

    def __len__(self) -> int:
        return len(self.keys) + len(self._inflight)

    def _add(self, wire: bytes) -> None:
        if len(self.keys) < self.limit:
            self.keys.add(wire)
        else:
            self.overflowed = True

    def _take(self) -> tuple[set[bytes], bool]:
        self._inflight, self._inflight_overflowed = self.keys, self.overflowed
        self.keys, self.overflowed = set(), False
        return set(self._inflight), self._inflight_overflowed

    def _settle(self, done: bool) -> None:
        if not done:
            room = max(self.limit - len(self.keys), 0)
            if len(self._inflight) > room:
                self.overflowed = True
            self.keys.update(list(self._inflight)[:room])
            self.overflowed = self.overflowed or self._inflight_overflowed
        self._inflight, self._inflight_overflowed = set(), False


class ForgetWork:
    """What the prober must do for a node: delete ``keys`` on it (or flush it if ``flush``) and
    delete the stand-in copies in ``stale`` (``{holder id: keys}``)."""

    __slots__ = ("flush", "keys", "stale")

    def __init__(self, keys: set[bytes], flush: bool, stale: dict[str, set[bytes]]) -> None:
        self.keys = keys
        self.flush = flush
        self.stale = stale

    def __bool__(self) -> bool:
        return bool(self.keys) or self.flush or bool(self.stale)


class Node:
    """One memcached node as a client sees it; thread-safe.

    ``ready`` is read without a lock on the request path: True when the node is UP and has nothing
    to forget. ``copies`` records, per stand-in (remap or gutter node), the keys written there in
    this node's place during the current outage; ``stale`` those of a finished outage, which are
    being removed and must not be read.
    """

    __slots__ = ("_copies", "_fence", "_journaled", "_lock", "_removing", "_stale", "_wake", "errors",
                 "failovers", "fleet_mark", "fleet_publish", "fleet_returning_at", "health",
                 "may_stand_in", "node_id", "ops", "pool", "ready", "spec", "timeouts")  # fmt: skip

    def __init__(
        self, spec: NodeSpec, pool: NodePool, health: NodeHealth, fence_limit: int, wake: Callable[..., None]
    ) -> None:
        self.spec = spec
        self.node_id = spec.node_id
        self.pool = pool
        self.health = health
        self.ready = True
        self.ops = 0
        self.errors = 0
        self.timeouts = 0
        self.failovers = 0
        self._lock = threading.Lock()
        self._wake = wake  # starts the prober: whatever is fenced gets forgotten
        self._fence = FenceLog(fence_limit)
        self._copies: dict[str, set[bytes]] = {}
        self._stale: dict[str, set[bytes]] = {}
        self._removing: dict[str, set[bytes]] = {}  # stale copies the prober is deleting now
        # Fleet-wide fencing (``shardcache._fleet``): the newest outage mark this process knows for
        # the node, whether it must publish one (it marked the node down itself), when it learnt
        # the node was returning, and whether stand-ins may serve its keys while it is away (not
        # once another process may be using it again, or is about to flush it).
        self.fleet_mark: Mark | None = None
        self.fleet_publish = False
        self.fleet_returning_at: float | None = None
        self.may_stand_in = True
        self._journaled: dict[str, set[bytes]] = {}  # keys in its journal, per stand-in, this outage

    # -- reports from the request path ------------------------------------------------------------

    def count_failover(self) -> None:
        self.failovers += 1

    def keep_probed(self) -> None:
        """The node is DOWN: make sure the prober's thread runs (``close()`` stops it), without
        waking it: it probes on its own backoff schedule, however many requests find the node
        down."""
        self._wake(False)

    def report_success(self) -> None:
        """A call to the node worked: consecutive failures start again from zero."""
        if self.health.failures:
            self.health.record_success()

    def report_failure(self, err: BaseException) -> bool:
        """A call failed with ``err`` (ours); True if it is a transport failure, which counts
        towards marking the node DOWN."""
        transport = isinstance(err, NodeUnavailableError | ProtocolError)
        with self._lock:
            self.errors += 1
            if isinstance(err, NodeTimeoutError):
                self.timeouts += 1
        if transport and self.health.record_failure(str(err)):
            self.may_stand_in = True  # this process saw it fail: its outage is to be published
            self.fleet_publish = True
            self.forget_journaled()
            self._wake()
        return transport

    def counters(self) -> dict[str, int]:
        """Operations, errors, timeouts, failovers and state changes so far (``ops`` is counted
        without a lock and may undercount slightly under heavy contention)."""
        return {
            "ops": self.ops,
            "errors": self.errors,
            "timeouts": self.timeouts,
            "failovers": self.failovers,
            "state_changes": self.health.state_changes,
        }

    # -- fencing ----------------------------------------------------------------------------------

    def fenced(self, wire: bytes) -> bool:
        """True if the node's value for ``wire`` may be older than the last write (it must miss)."""
        return wire in self._fence

    def fence(self, wire: bytes) -> None:
        """The node may hold an outdated value for ``wire``: forget it before serving it again."""
        with self._lock:
            self._fence._add(wire)
            self.ready = False
        self._wake()

    def fence_all(self) -> None:
        """The node must be flushed as a whole before it serves again (e.g. a missed flush_all)."""
        with self._lock:
            self._fence.overflowed = True
            self.ready = False
        self._wake()

    def stood_in(self, stand_in: Node | None, wire: bytes, *, writing: bool) -> None:
        """``stand_in`` (None: no one) served ``wire`` in this node's place: fence it here. A write
        leaves a copy on ``stand_in`` and makes copies on other stand-ins stale (never read)."""
        with self._lock:
            self._fence._add(wire)
            self.ready = False
            if writing:
                self._record_copy(stand_in, wire)
        self._wake()

    def _record_copy(self, stand_in: Node | None, wire: bytes) -> None:
        holder_id = None if stand_in is None else stand_in.node_id
        for holder, copies in self._copies.items():
            if wire in copies and holder != holder_id:
                copies.discard(wire)
                self._stale.setdefault(holder, set()).add(wire)
        if holder_id is None:
            return
        for stale in (self._stale.get(holder_id), self._removing.get(holder_id)):
            if stale is not None:
                stale.discard(wire)  # the stand-in is about to hold a fresh value
        copies = self._copies.setdefault(holder_id, set())
        if len(copies) < self._fence.limit:
            copies.add(wire)
        else:
            self._fence.overflowed = True

    def stale_on(self, stand_in: Node, wire: bytes) -> bool:
        """True if ``stand_in`` may still hold an outdated copy of ``wire`` from an earlier outage."""
        holder = stand_in.node_id
        stale = self._stale.get(holder)
        if stale is not None and wire in stale:
            return True
        removing = self._removing.get(holder)  # being deleted: still outdated until that is done
        return removing is not None and wire in removing

    def landed_elsewhere(self, stand_in: Node, wire: bytes) -> None:
        """A write routed to ``stand_in`` while this node was away has completed. If this node
        was readmitted meanwhile, its copies may already have been removed before this one
        landed: record it as stale, so it is removed too and never read."""
        if self.health.state != UP:
            return  # still away: the copy is recorded (stood_in) and removed on readmission
        with self._lock:
            copies = self._copies.get(stand_in.node_id)
            if copies is not None and wire in copies:
                return
            self._stale.setdefault(stand_in.node_id, set()).add(wire)
        self._wake()

    def forget_journaled(self) -> None:
        """A new outage: what was journaled in an earlier one must be journaled again."""
        with self._lock:
            self._journaled = {}

    def journaled(self, holder_id: str, wire: bytes) -> bool:
        """True if ``wire`` is in this node's journal on ``holder_id`` already (this outage)."""
        listed = self._journaled.get(holder_id)
        return listed is not None and wire in listed

    def record_journaled(self, holder_id: str, wires: list[bytes]) -> None:
        with self._lock:
            listed = self._journaled.setdefault(holder_id, set())
            if len(listed) < self._fence.limit:
                listed.update(wires)

    def retire_copies(self) -> None:
        """The node is back: no request stands in for it any more, so its stand-ins' copies are
        stale (removed next, never read meanwhile), and its journals are being cleaned."""
        with self._lock:
            self._journaled = {}
            for holder, wires in self._copies.items():
                self._stale.setdefault(holder, set()).update(wires)
            self._copies = {}

    def forget_flushed(self) -> None:
        """The node was flushed: nothing recorded in its fence log is on it any more."""
        with self._lock:
            self._fence = FenceLog(self._fence.limit)
            self._refresh_ready()

    def has_work(self) -> bool:
        return bool(self._fence) or any(self._stale.values())  # a holder's set may be emptied

    def take_work(self) -> ForgetWork:
        """What to forget now; it stays recorded (reads miss) until :meth:`settle_work`."""
        with self._lock:
            keys, flush = self._fence._take()
            stale = {holder: wires for holder, wires in self._stale.items() if wires}
            self._stale = {}
            self._removing = {holder: set(wires) for holder, wires in stale.items()}  # read as stale
        return ForgetWork(keys, flush, stale)

    def settle_work(self, work: ForgetWork, *, done: bool, kept_stale: Mapping[str, set[bytes]]) -> None:
        """``work`` was done (``done``) or must be tried again; ``kept_stale`` holds the copies on
        stand-ins that could not be reached (kept recorded)."""
        with self._lock:
            self._fence._settle(done)
            for holder, wires in (work.stale if not done else kept_stale).items():
                self._stale.setdefault(holder, set()).update(wires)
            self._removing = {}
            self._refresh_ready()

    def refresh_ready(self) -> None:
        with self._lock:
            self._refresh_ready()

    def _refresh_ready(self) -> None:
        self.ready = self.health.state == UP and not self._fence

    def reweighted(self, spec: NodeSpec) -> None:
        """Same server, new weight: same connections and health."""
        self.spec = spec

    def down_error(self, what: str, failover: str) -> NodeUnavailableError:
        state = self.health.state
        if state == UP and not self.ready:
            state = "up but still removing outdated keys (fencing)"
        return NodeUnavailableError(
            f"memcached node {self.node_id} is {state} ({what}; failover={failover})", self.node_id
        )

    def __repr__(self) -> str:
        return f"<Node {self.node_id} {self.health.state}{'' if self.ready else ' (fencing)'}>"


# After a membership change without a window, how long counters, CAS loops and locks still look for
# their key on its previous owner (bringing it over, then deleting it there). One process's view:
# processes that apply the change at other moments are not covered (docs/consistency.md).
PINNED_WINDOW_S: Final = 60.0


class Topology:
    """An immutable snapshot: the ring and its nodes, the gutter ring and nodes (if any), and
    during a window (until ``window_until``) the previous ring and its nodes: a warm-up or drain
    window for every call (``window``), or the pinned window for counters, CAS and locks only."""

    __slots__ = (
        "gutter_nodes", "gutter_ring", "nodes", "previous", "previous_nodes", "ring",
        "window",  "window_until",
    )  # fmt: skip

    def __init__(
        self,
        ring: Ring,
        nodes: Mapping[str, Node],
        gutter_ring: Ring | None = None,
        gutter_nodes: Mapping[str, Node] | None = None,
        previous: Ring | None = None,
        previous_nodes: Mapping[str, Node] | None = None,
        window_until: float = 0.0,
        *,
        full_window: bool = True,
    ) -> None:
        self.ring = ring
        self.nodes = nodes
        self.gutter_ring = gutter_ring
        self.gutter_nodes: Mapping[str, Node] = gutter_nodes or {}
        self.previous = previous
        self.previous_nodes: Mapping[str, Node] = previous_nodes or {}
        self.window_until = window_until
        # A warm-up/drain window (``warmup_s``/``drain_s`` > 0): reads and writes consult the
        # previous ring. Without one, the previous ring is still kept for PINNED_WINDOW_S, for
        # counters, CAS and locks only: a counter is brought over instead of restarting, and a held
        # lock stays held. ``window`` is what read and write paths test.
        self.window = previous is not None and full_window

    def owner(self, hash_key: bytes) -> Node:
        return self.nodes[self.ring.node_for(hash_key)]

    def all_nodes(self) -> Iterator[Node]:
        yield from self.nodes.values()
        yield from self.gutter_nodes.values()

    def node(self, node_id: str) -> Node | None:
        return self.nodes.get(node_id) or self.gutter_nodes.get(node_id)

    def previous_owner(self, hash_key: bytes, owner: Node, now: float) -> Node | None:
        """During a window: the node that owned ``hash_key`` before the change, if it differs."""
        if self.previous is None or now >= self.window_until:
            return None
        old = self.previous_nodes[self.previous.node_for(hash_key)]
        return None if old is owner else old
