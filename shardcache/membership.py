"""The nodes a client talks to, as they live: the current ring, health, fencing, probing.

A ``Topology`` (the ring and its ``Node`` objects, plus the gutter pool) is an immutable snapshot:
every request reads ``Membership.topology`` once and finishes on that snapshot, and a change of
membership swaps the whole reference.

Stale reads are prevented by fencing. While a node is away (DOWN or PROBING), every key written,
deleted or served elsewhere on its behalf is recorded in the node's ``FenceLog``, and so is every
key whose write or delete failed on it. When the node answers a probe it is readmitted at once, and
the prober deletes those keys on it (or flushes it, if the log overflowed) and removes the copies that
fallback or gutter nodes took in its place. Until then it is not ``ready``: reads of fenced keys miss
instead of returning a value that may be older than the last write.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from pymemcache.client.base import Client as PymemcacheClient

from shardcache._pool import NodePool, node_failure
from shardcache._wire import delete_everywhere
from shardcache.errors import NodeTimeoutError, NodeUnavailableError, ProtocolError, ServerError
from shardcache.health import DOWN, UP, Clock, Event, HealthPolicy, NodeHealth
from shardcache.nodes import NodeSpec
from shardcache.ring import Ring

__all__ = ["FAILOVER_POLICIES", "FenceLog", "Membership", "Node", "Topology", "dns_discovery"]

logger = logging.getLogger("shardcache")

FAILOVER_POLICIES = ("fail_fast", "remap", "gutter")
_LEVELS = {
    "node_up": logging.INFO,
    "fenced": logging.INFO,
    "node_added": logging.INFO,
    "node_removed": logging.INFO,
}
_PROBE_IDLE_S = 0.5


class FenceLog:
    """Keys a node must forget before it serves them again; bounded; thread-safe.

    Past ``limit`` keys the log stops recording and marks itself overflowed: the node is then
    flushed as a whole before it serves again. Keys being forgotten right now (``take``n but not
    yet ``settle``d) still count as recorded, so a read never slips through while the deletes are
    on their way.
    """

    __slots__ = ("_inflight", "_inflight_overflowed", "_node", "keys", "limit", "overflowed")

    def __init__(self, node: Node, limit: int) -> None:
        self._node = node
        self.keys: set[bytes] = set()
        self.limit = limit
        self.overflowed = False
        self._inflight: set[bytes] = set()
        self._inflight_overflowed = False

    def add(self, wire: bytes) -> None:
        with self._node.lock:
            if len(self.keys) < self.limit:
                self.keys.add(wire)
            else:
                self.overflowed = True
            self._node.ready = False
        self._node.wake()

    def overflow(self) -> None:
        """Record that the node must be flushed as a whole before it serves again."""
        with self._node.lock:
            self.overflowed = True
            self._node.ready = False
        self._node.wake()

    def __contains__(self, wire: object) -> bool:
        return self.overflowed or self._inflight_overflowed or wire in self.keys or wire in self._inflight

    def __bool__(self) -> bool:
        return self.overflowed or self._inflight_overflowed or bool(self.keys) or bool(self._inflight)

    def take(self) -> tuple[set[bytes], bool]:
        """What to forget now, and whether to flush instead; it stays recorded until ``settle``."""
        with self._node.lock:
            self._inflight, self._inflight_overflowed = self.keys, self.overflowed
            self.keys, self.overflowed = set(), False
            return set(self._inflight), self._inflight_overflowed

    def settle(self, done: bool) -> None:
        """The keys from ``take`` were forgotten (``done``), or must be tried again."""
        with self._node.lock:
            if not done:
                room = max(self.limit - len(self.keys), 0)
                if len(self._inflight) > room:
                    self.overflowed = True
                self.keys.update(list(self._inflight)[:room])
                self.overflowed = self.overflowed or self._inflight_overflowed
                self._node.ready = False
            self._inflight, self._inflight_overflowed = set(), False


class Node:
    """One memcached node as a client sees it: connections, health, fence log, copies, counters.

    Thread-safe. ``ready`` is True when the node is UP and has nothing left to forget: requests
    check only that attribute on their fast path. ``copies`` records, per fallback or gutter node,
    the keys written there in this node's place during the current outage; ``stale`` those of a
    finished outage, which are being removed and must not be read.
    """

    __slots__ = (
        "copies",
        "errors",
        "failovers",
        "fence",
        "health",
        "lock",
        "node_id",
        "ops",
        "pool",
        "ready",
        "spec",
        "stale",
        "timeouts",
        "wake",
    )

    def __init__(
        self,
        spec: NodeSpec,
        pool: NodePool,
        health: NodeHealth,
        fence_limit: int,
        wake: Callable[[], None] = lambda: None,
    ) -> None:
        self.spec = spec
        self.node_id = spec.node_id
        self.pool = pool
        self.health = health
        self.lock = threading.Lock()
        self.ready = True
        self.wake = wake  # starts the prober: whatever is fenced gets forgotten
        self.fence = FenceLog(self, fence_limit)
        self.copies: dict[str, set[bytes]] = {}
        self.stale: dict[str, set[bytes]] = {}
        self.ops = 0
        self.errors = 0
        self.timeouts = 0
        self.failovers = 0

    def counters(self) -> dict[str, int]:
        """Operations, errors, timeouts, failovers and state changes so far.

        ``ops`` is counted without a lock on the request path; under heavy thread contention it
        may undercount slightly. The other counters are exact.
        """
        return {
            "ops": self.ops,
            "errors": self.errors,
            "timeouts": self.timeouts,
            "failovers": self.failovers,
            "state_changes": self.health.state_changes,
        }

    def refresh_ready(self) -> None:
        with self.lock:
            self.ready = self.health.state == UP and not self.fence


class Topology:
    """An immutable snapshot: the ring and its nodes, the gutter ring and nodes (if any), and
    during a warm-up or drain window the previous ring and its nodes.

    ``previous`` is set for ``window_until`` (a monotonic deadline) after a membership change:
    a miss on a key that moved is then read from its previous owner and copied to the new one.
    """

    __slots__ = ("gutter_nodes", "gutter_ring", "nodes", "previous", "previous_nodes", "ring", "window_until")

    def __init__(
        self,
        ring: Ring,
        nodes: Mapping[str, Node],
        gutter_ring: Ring | None = None,
        gutter_nodes: Mapping[str, Node] | None = None,
        previous: Ring | None = None,
        previous_nodes: Mapping[str, Node] | None = None,
        window_until: float = 0.0,
    ) -> None:
        self.ring = ring
        self.nodes = nodes
        self.gutter_ring = gutter_ring
        self.gutter_nodes: Mapping[str, Node] = gutter_nodes or {}
        self.previous = previous
        self.previous_nodes: Mapping[str, Node] = previous_nodes or {}
        self.window_until = window_until

    def all_nodes(self) -> Iterator[Node]:
        yield from self.nodes.values()
        yield from self.gutter_nodes.values()

    def previous_owner(self, hash_key: bytes, owner: Node, now: float) -> Node | None:
        """During a window: the node that owned ``hash_key`` before the change, if it differs."""
        if self.previous is None or now >= self.window_until:
            return None
        old = self.previous_nodes[self.previous.node_for(hash_key)]
        return None if old is owner else old


class Membership:
    """The current topology of a client and the life of its nodes; thread-safe.

    Owns the prober: one daemon thread, started when a node goes down or has keys to forget, that
    probes DOWN nodes when their backoff elapses, fences them and readmits them. It stops by itself
    when there is nothing left to do, and for good on ``close()``.
    """

    def __init__(
        self,
        ring: Ring,
        *,
        make_pool: Callable[[NodeSpec], NodePool],
        probe_connection: Callable[[NodeSpec], PymemcacheClient],
        policy: HealthPolicy,
        failover: str,
        failover_ttl_s: int,
        gutter_ring: Ring | None,
        fence_max_keys: int,
        clock: Clock = time.monotonic,
    ) -> None:
        self._make_pool = make_pool
        self._probe_connection = probe_connection
        self._policy = policy
        self._clock = clock
        self.failover = failover
        self.failover_ttl_s = failover_ttl_s
        self._fence_max_keys = fence_max_keys
        self._listeners: list[Callable[[Event], None]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._prober: threading.Thread | None = None
        self._change_lock = threading.Lock()
        self._window_timer: threading.Timer | None = None
        nodes = {spec.node_id: self._make_node(spec) for spec in ring.specs}
        gutter = {spec.node_id: self._make_node(spec) for spec in gutter_ring.specs} if gutter_ring else {}
        self.topology = Topology(ring, nodes, gutter_ring, gutter)

    def _make_node(self, spec: NodeSpec) -> Node:
        holder: list[Node] = []

        def on_change(old: str, new: str, reason: str) -> None:
            node = holder[0]
            node.refresh_ready()
            if new == DOWN:
                node.pool.close()  # its connections are dead or out of step
            if new == DOWN and old == UP:
                self.emit(Event("node_down", node.node_id, reason))
                if self.failover != "fail_fast" or node.node_id in self.topology.gutter_nodes:
                    self.emit(Event("failover", node.node_id, f"{self.failover}: its keys go elsewhere"))
                self._start_prober()
            elif new == UP:
                node.pool.close()  # connections from before the outage may be dead or out of step
                self.emit(Event("node_up", node.node_id, reason))

        health = NodeHealth(spec.node_id, self._policy, clock=self._clock, on_change=on_change)
        node = Node(spec, self._make_pool(spec), health, self._fence_max_keys, self._start_prober)
        holder.append(node)
        return node

    # -- events -----------------------------------------------------------------------------------

    def add_listener(self, callback: Callable[[Event], None]) -> None:
        with self._lock:
            self._listeners = [*self._listeners, callback]

    def remove_listener(self, callback: Callable[[Event], None]) -> None:
        with self._lock:
            self._listeners = [c for c in self._listeners if c is not callback]

    def emit(self, event: Event) -> None:
        """Log ``event`` on the ``shardcache`` logger and deliver it to every listener."""
        level = _LEVELS.get(event.kind, logging.WARNING)
        if event.kind == "error" and not isinstance(
            event.error, NodeUnavailableError | ProtocolError | ServerError
        ):
            level = logging.DEBUG  # the caller's own mistake (bad value, incr of text), raised to it
        logger.log(level, "shardcache %s %s: %s", event.kind, event.node_id, event.detail)
        for callback in self._listeners:
            try:
                callback(event)
            except Exception:
                logger.exception("shardcache: event listener %r failed on %s", callback, event.kind)

    # -- request-path reports ---------------------------------------------------------------------

    def failed(
        self, node: Node, exc: BaseException, what: str, key: Any, wire: bytes | None
    ) -> BaseException:
        """A call to ``node`` raised ``exc``: count it, record it, and return our exception for it.

        Transport failures (errors and timeouts) count towards marking the node DOWN. A failed write
        or delete (``wire`` given) is fenced: the node may still hold the value it was meant to
        replace, so that key is forgotten on the node before it is read there again.
        """
        err = node_failure(exc, node.node_id, what, key)
        transport = isinstance(err, NodeUnavailableError | ProtocolError)
        with node.lock:
            node.errors += 1
            if isinstance(err, NodeTimeoutError):
                node.timeouts += 1
        if wire is not None and transport:
            node.fence.add(wire)
        self.emit(Event("error", node.node_id, str(err), err, key))
        if transport:
            node.health.record_failure(str(err))
        return err

    def stand_in(
        self, topology: Topology, node: Node, hash_key: bytes, *, counter: bool = False
    ) -> Node | None:
        """The node that serves ``node``'s keys while it is away, or None (fail fast).

        ``remap``: the next ready node clockwise; ``gutter``: the gutter node for the key. Counters
        (``incr``/``decr``) are never moved: another node's count would silently restart from zero.
        """
        node.failovers += 1
        if counter or self.failover == "fail_fast":
            return None
        if self.failover == "gutter":
            assert topology.gutter_ring is not None
            gutter = topology.gutter_nodes[topology.gutter_ring.node_for(hash_key)]
            return gutter if gutter.ready else None
        for node_id in topology.ring.preference_list(hash_key, len(topology.nodes))[1:]:
            candidate = topology.nodes[node_id]
            if candidate.ready:
                return candidate
        return None

    def stood_in(self, node: Node, stand_in: Node | None, wire: bytes, *, writing: bool) -> None:
        """``stand_in`` (None: no one) serves ``wire`` for ``node``: fence it on ``node``; a write
        leaves a copy there and makes any copy on another stand-in stale (never read, removed)."""
        node.fence.add(wire)
        if not writing:
            return
        with node.lock:
            for holder, copies in node.copies.items():
                if wire in copies and (stand_in is None or holder != stand_in.node_id):
                    copies.discard(wire)
                    node.stale.setdefault(holder, set()).add(wire)
            if stand_in is None:
                return
            stale = node.stale.get(stand_in.node_id)
            if stale is not None:
                stale.discard(wire)  # the stand-in is about to hold a fresh value
            copies = node.copies.setdefault(stand_in.node_id, set())
            if len(copies) < self._fence_max_keys:
                copies.add(wire)
            else:
                node.fence.overflowed = True

    def stale_on(self, node: Node, stand_in: Node, wire: bytes) -> bool:
        """True if ``stand_in`` may still hold an outdated copy of ``wire`` from an earlier outage."""
        stale = node.stale.get(stand_in.node_id)
        return stale is not None and wire in stale

    def capped_ttl(self, expire: int) -> int:
        """The expiry for a copy stored on a stand-in: at most ``failover_ttl_s``."""
        return self.failover_ttl_s if expire <= 0 or expire > self.failover_ttl_s else expire

    # -- prober -----------------------------------------------------------------------------------

    def _start_prober(self) -> None:
        self._wake.set()
        with self._lock:
            if self._closed.is_set() or (self._prober is not None and self._prober.is_alive()):
                return
            self._prober = threading.Thread(target=self._probe_loop, name="shardcache-prober", daemon=True)
            self._prober.start()

    def _probe_loop(self) -> None:
        while not self._closed.is_set():
            self._wake.clear()
            waits: list[float] = []
            busy = False
            for node in list(self.topology.all_nodes()):
                if self._closed.is_set():
                    return
                state = node.health.state
                if state == DOWN:
                    busy = True
                    if node.health.begin_probe():
                        self._probe(node)
                    due = node.health.seconds_until_probe()
                    if due is not None:
                        waits.append(due)
                elif state == UP and (node.fence or node.stale):
                    busy = True
                    if not self._forget(node):
                        node.health.record_failure("fencing failed")
            if not busy:
                with self._lock:
                    if not self._wake.is_set():
                        self._prober = None
                        return
                continue
            self._wake.wait(min([*waits, _PROBE_IDLE_S]))

    def _probe(self, node: Node) -> None:
        """PROBING: ask for ``version``; if it answers, readmit the node, then fence it.

        Readmission comes first so that requests stop standing in for the node at once (otherwise
        steady traffic would keep adding keys to forget faster than they are forgotten). Until its
        fence log is empty the node is not ``ready``: reads of the keys still to forget miss, every
        other call is served by the node itself. The stand-ins' copies from the outage become
        ``stale``: removed next, and never read meanwhile should the node go down again.
        """
        conn = self._probe_connection(node.spec)
        try:
            conn.version()
        except Exception as exc:
            node.health.probe_failed(f"probe failed: {node_failure(exc, node.node_id, 'version')}")
            return
        finally:
            conn.close()
        node.health.readmit()
        with node.lock:  # no request stands in for the node any more: its copies are now stale
            for holder, wires in node.copies.items():
                node.stale.setdefault(holder, set()).update(wires)
            node.copies = {}
        if not self._forget(node):
            node.health.record_failure("fencing failed")

    def _forget(self, node: Node) -> bool:
        """Delete on ``node`` the keys in its fence log, and its stale copies on stand-ins.

        A few passes, while requests may still be adding keys; False only if a pass failed.
        """
        for _ in range(5):
            keys, overflowed = node.fence.take()
            with node.lock:
                stale, node.stale = node.stale, {}
            if not keys and not overflowed and not stale:
                node.fence.settle(True)
                node.refresh_ready()
                return True
            done = self._apply_fence(node, keys, overflowed, stale)
            node.fence.settle(done)
            if not done:
                with node.lock:
                    for holder, wires in stale.items():
                        node.stale.setdefault(holder, set()).update(wires)
                return False
        node.refresh_ready()
        return True

    def _apply_fence(
        self, node: Node, keys: set[bytes], overflowed: bool, copies: dict[str, set[bytes]]
    ) -> bool:
        topology = self.topology
        if overflowed:
            conn = self._probe_connection(node.spec)
            try:
                conn.flush_all(0, False)
            except Exception as exc:
                logger.warning("shardcache: flushing %s before readmission failed: %s", node.node_id, exc)
                return False
            finally:
                conn.close()
        elif keys and not _delete_all({node.node_id: node.pool}, {node.node_id: sorted(keys)}):
            return False
        holders = {h: topology.nodes.get(h) or topology.gutter_nodes.get(h) for h in copies}
        live = {h: n.pool for h, n in holders.items() if n is not None and n.health.state == UP}
        if live and not _delete_all(live, {h: sorted(copies[h]) for h in live}):
            logger.warning(
                "shardcache: removing stand-in copies for %s failed; they expire by TTL", node.node_id
            )
        with node.lock:  # holders that are down (but still configured) keep their records
            for holder, node_of in holders.items():
                if holder not in live and node_of is not None:
                    node.stale.setdefault(holder, set()).update(copies[holder])
        detail = "flushed (fence log overflowed)" if overflowed else f"forgot {len(keys)} keys"
        self.emit(Event("fenced", node.node_id, f"{detail}; removed {sum(map(len, copies.values()))} copies"))
        return True

    def close(self) -> None:
        """Stop the prober (bounded wait) and close every idle connection.

        The client stays usable: connections reopen on demand and the prober restarts when needed.
        """
        self._closed.set()
        self._wake.set()
        with self._change_lock:
            if self._window_timer is not None:
                self._window_timer.cancel()
                self._window_timer = None
        prober = self._prober
        if prober is not None and prober is not threading.current_thread():
            prober.join(timeout=5)
        topology = self.topology
        for node in [*topology.all_nodes(), *topology.previous_nodes.values()]:
            node.pool.close()
        with self._lock:
            self._prober = None
            self._closed.clear()

    # -- membership changes -----------------------------------------------------------------------

    def change(self, ring: Ring, window_s: float) -> tuple[list[str], list[str]]:
        """Swap to ``ring`` atomically; returns the node ids added and removed.

        Requests in flight finish on the snapshot they started with. With ``window_s`` > 0 the
        previous ring stays consulted for that long (warm-up of added nodes, drain of removed ones);
        removed nodes keep their connections until the window ends.
        """
        with self._change_lock:
            current = self.topology
            nodes: dict[str, Node] = {}
            for spec in ring.specs:
                node = current.nodes.get(spec.node_id)
                if node is None:
                    node = self._make_node(spec)
                else:
                    node.spec = spec  # a new weight: same server, same connections and health
                nodes[spec.node_id] = node
            added = [n for n in nodes if n not in current.nodes]
            removed = [n for n in current.nodes if n not in nodes]
            previous_nodes = {**current.nodes}
            window = window_s > 0
            self.topology = Topology(
                ring,
                nodes,
                current.gutter_ring,
                current.gutter_nodes,
                current.ring if window else None,
                previous_nodes if window else None,
                self._clock() + window_s if window else 0.0,
            )
            if self._window_timer is not None:
                self._window_timer.cancel()
            self._window_timer = None
            retired = [current.nodes[n] for n in removed]
            if window:
                timer = threading.Timer(window_s, self._end_window, args=(self.topology, retired))
                timer.daemon = True
                self._window_timer = timer
                timer.start()
            else:
                for node in retired:
                    node.pool.close()
        for node_id in added:
            self.emit(Event("node_added", node_id, f"warm-up {window_s:g}s" if window else ""))
        for node_id in removed:
            self.emit(Event("node_removed", node_id, f"drain {window_s:g}s" if window else ""))
        return added, removed

    def _end_window(self, topology: Topology, retired: list[Node]) -> None:
        with self._change_lock:
            if self.topology is topology:
                self.topology = Topology(
                    topology.ring, topology.nodes, topology.gutter_ring, topology.gutter_nodes
                )
                self._window_timer = None
        for node in retired:
            if node.node_id not in self.topology.nodes:
                node.pool.close()

    def node_states(self) -> dict[str, str]:
        return {node_id: node.health.state for node_id, node in self.topology.nodes.items()}


def _delete_all(pools: Mapping[str, NodePool], groups: Mapping[str, list[bytes]]) -> bool:
    with contextlib.suppress(Exception):
        return not delete_everywhere(pools, groups)
    return False


Resolver = Callable[[str, int], list[tuple[Any, ...]]]


def dns_discovery(
    name: str, port: int = 11211, *, resolver: Resolver | None = None
) -> Callable[[], list[str]]:
    """A ``discovery=`` callable: the A/AAAA records of ``name``, as sorted ``addr:port`` specs.

    ``resolver(name, port)`` returns ``socket.getaddrinfo``-style tuples (the default is
    ``socket.getaddrinfo`` over TCP); inject one in tests. A name that resolves to nothing raises,
    so the client keeps its last good list.
    """

    def default_resolver(host: str, service: int) -> list[tuple[Any, ...]]:
        return socket.getaddrinfo(host, service, type=socket.SOCK_STREAM)

    resolve = resolver or default_resolver

    def discover() -> list[str]:
        specs: set[str] = set()
        for info in resolve(name, port):
            address = info[4][0]
            specs.add(f"[{address}]:{port}" if ":" in address else f"{address}:{port}")
        if not specs:
            raise LookupError(f"{name!r} resolved to no address")
        return sorted(specs)

    return discover
