"""Membership: the client's current topology, swapped atomically, and the life of its nodes.

Every request reads ``Membership.topology`` once and finishes on that snapshot. ``change`` builds
the next topology (reusing the ``Node`` of every server that stays, so its connections and health
survive a reweight) and swaps the reference; with a window, the previous ring stays consulted for
warm-up (added nodes) and drain (removed ones) until it ends. Node health transitions land here
(``_on_change``): they emit events, close connections that may be out of step, and wake the prober.
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Callable
from typing import Any

from shardcache._conn import Connection, ConnectionSettings, NodePool
from shardcache._events import Events, logger
from shardcache._fleet import Fleet
from shardcache._flows import Flow
from shardcache._options import Options
from shardcache._prober import Prober
from shardcache._topology import PINNED_WINDOW_S, Node, Topology
from shardcache.health import DOWN, UP, Event, NodeHealth
from shardcache.nodes import NodeSpec
from shardcache.ring import Ring

__all__ = ["Membership"]


class Membership:
    """The topology of one client and the life of its nodes; thread-safe."""

    def __init__(
        self,
        options: Options,
        ring: Ring,
        gutter_ring: Ring | None,
        *,
        events: Events,
        settings: ConnectionSettings,
        run: Callable[[Flow[Any]], Any],
        prober: Callable[..., Any] | None = None,
    ) -> None:
        """``run`` runs the prober's flows; ``prober`` makes the prober (default: a thread,
        :class:`~shardcache._prober.Prober`; ``AsyncClient`` gives its asyncio task's)."""
        self._options = options
        self._settings = settings
        self._events = events
        self._change_lock = threading.Lock()
        self._barrier_lock = threading.Lock()
        self._window_timer: threading.Timer | None = None
        self._retiring: list[Node] = []  # nodes removed with a window: retired when it ends
        self._peers: dict[Any, str] = {}  # the address each node's first connection reached
        self.topology: Topology = Topology(ring, {})  # replaced below, once the prober exists
        refresh_s = options.fleet_refresh_s
        stand_ins = options.failover != "fail_fast"  # under fail_fast nothing is written elsewhere
        fleet = Fleet(refresh_s, clock=options.clock) if refresh_s is not None and stand_ins else None
        self.prober: Prober = (prober or Prober)(lambda: self.topology, run, events, fleet)
        nodes = {spec.node_id: self._make_node(spec) for spec in ring.specs}
        gutter = {spec.node_id: self._make_node(spec) for spec in gutter_ring.specs} if gutter_ring else {}
        self.topology = Topology(ring, nodes, gutter_ring, gutter)
        if fleet is not None:
            # Until the fleet's marks have been read once, ``topology`` is not an attribute: the
            # first request gets it through __getattr__, which reads them first (a process started
            # during an outage others published must not read the node before it knows).
            self._unread: Topology | None = self.__dict__.pop("topology")

    def __getattr__(self, name: str) -> Any:
        unread = self.__dict__.get("_unread")
        if name != "topology" or unread is None:
            raise AttributeError(name)
        blocking = isinstance(self.prober, Prober)  # an asyncio prober's loop must not be blocked
        if blocking and self.prober.is_current_thread():
            return unread  # the prober reading the marks: no barrier for it
        self.prober.start(wake=False)
        fleet = self.prober.fleet
        if fleet is not None and blocking:
            # one read of the marks: a call's timeout if a holder does not answer, plus margin
            fleet.wait_first_read(min((self._options.timeout or 1.0) + 1.0, 3.0))
        with self._barrier_lock:  # not _change_lock: change() reads ``topology`` holding it
            if "topology" not in self.__dict__:
                self.topology = unread
                self._unread = None
            return self.__dict__["topology"]

    def _make_node(self, spec: NodeSpec) -> Node:
        options = self._options
        pool = NodePool(
            spec,
            self._settings,
            max_idle=options.max_pool_size,
            idle_timeout=float(options.pool_idle_timeout),
            on_connect=lambda conn: self._connected(spec.node_id, conn),
        )
        holder: list[Node] = []

        def on_change(old: str, new: str, reason: str) -> None:
            self._on_change(holder[0], old, new, reason)

        health = NodeHealth(spec.node_id, options.health, clock=options.clock, on_change=on_change)
        node = Node(spec, pool, health, options.fence_max_keys, self.prober.start)
        holder.append(node)
        fleet = self.prober.fleet
        known = None if fleet is None else fleet.known(spec.node_id)
        if fleet is not None and known is not None:
            fleet.apply(node, known)  # added back while its outage is still under way
        return node

    def _connected(self, node_id: str, conn: Connection | Any) -> None:
        """The first connection: start the prober if it reads the fleet's outage marks (not in
        ``__init__``: no thread before the client is used; a forked child restarts it itself, see
        ``_prober``; ``conn`` is anything with a ``sock``: the async executor's connections too).
        Warn when two ring nodes reach the same server (``localhost:p``
        and ``127.0.0.1:p``): each would own its own share of the keys on one server, and failover
        could not tell them apart."""
        if self.prober.fleet is not None:
            self.prober.start(wake=False)
        try:
            peer = conn.sock.getpeername()
        except (OSError, AttributeError):  # AttributeError: no socket behind it (sock is None)
            return
        peer = _same_server_key(peer)
        other = self._peers.setdefault(peer, node_id)
        if other != node_id and other in self.topology.nodes and node_id in self.topology.nodes:
            logger.warning(
                "shardcache: nodes %s and %s are the same server (%s): list it once, or each name "
                "gets its own share of the keys",
                other,
                node_id,
                peer,
            )

    def _on_change(self, node: Node, old: str, new: str, reason: str) -> None:
        node.refresh_ready()
        if new == DOWN:
            node.pool.close()  # its connections are dead or out of step
        if new == DOWN and old == UP:
            self._events.emit(Event("node_down", node.node_id, reason))
            failover = self._options.failover
            if failover != "fail_fast" or node.node_id in self.topology.gutter_nodes:
                self._events.emit(Event("failover", node.node_id, f"{failover}: its keys go elsewhere"))
            # the prober is woken by Node.report_failure (after it has asked for the outage to be
            # published) or is the one that took the node down (another process's outage mark)
        elif new == UP:
            node.pool.close()  # connections from before the outage may be dead or out of step
            self._events.emit(Event("node_up", node.node_id, reason))

    def node_states(self) -> dict[str, str]:
        return {node_id: node.health.state for node_id, node in self.topology.nodes.items()}

    # -- changes ----------------------------------------------------------------------------------

    def change(self, ring: Ring, window_s: float) -> tuple[list[str], list[str]]:
        """Swap to ``ring`` atomically; the node ids added and removed.

        Requests in flight finish on the snapshot they started with. With ``window_s`` > 0 the
        previous ring stays consulted for that long by every call; with 0, for
        ``PINNED_WINDOW_S`` by counters, CAS and locks only. Removed nodes keep their connections
        until the window ends.
        """
        with self._change_lock:
            current = self.topology
            nodes: dict[str, Node] = {}
            for spec in ring.specs:
                node = current.nodes.get(spec.node_id)
                if node is None:
                    node = self._make_node(spec)
                else:
                    node.reweighted(spec)
                nodes[spec.node_id] = node
            added = [n for n in nodes if n not in current.nodes]
            removed = [n for n in current.nodes if n not in nodes]
            window = window_s > 0
            keep_s = window_s if window else PINNED_WINDOW_S  # the previous ring, for pinned calls
            self.topology = Topology(
                ring,
                nodes,
                current.gutter_ring,
                current.gutter_nodes,
                current.ring,
                dict(current.nodes),
                self._options.clock() + keep_s,
                full_window=window,
            )
            retired = [current.nodes[n] for n in removed]
            if self._window_timer is not None:
                # a window cut short: the nodes it drained are in no topology any more
                self._window_timer.cancel()
                for node in self._retiring:
                    if nodes.get(node.node_id) is not node:
                        node.pool.retire()
            self._window_timer = None
            self._retiring = []
            timer = threading.Timer(keep_s, self._end_window, args=(self.topology, retired))
            timer.daemon = True
            self._window_timer = timer
            self._retiring = retired
            timer.start()
        for node_id in added:
            self._events.emit(Event("node_added", node_id, f"warm-up {window_s:g}s" if window else ""))
        for node_id in removed:
            self._events.emit(Event("node_removed", node_id, f"drain {window_s:g}s" if window else ""))
        return added, removed

    def _end_window(self, topology: Topology, retired: list[Node]) -> None:
        with self._change_lock:
            if self.topology is topology:
                self.topology = Topology(
                    topology.ring, topology.nodes, topology.gutter_ring, topology.gutter_nodes
                )
                self._window_timer = None
                self._retiring = []
        for node in retired:
            if self.topology.nodes.get(node.node_id) is not node:
                node.pool.retire()

    def close(self) -> None:
        """Stop the prober and the window timer, close every idle connection. The client stays
        usable: connections reopen on demand and the prober restarts when needed."""
        with self._change_lock:
            if self._window_timer is not None:
                self._window_timer.cancel()
                self._window_timer = None
        self.prober.close()
        topology = self.topology
        for node in [*topology.all_nodes(), *topology.previous_nodes.values()]:
            node.pool.close()


def _same_server_key(peer: Any) -> Any:
    """What identifies the server a socket reached: (address, port), with every loopback address
    (127.0.0.1, ::1, ::ffff:127.0.0.1) as one, since ``localhost`` may resolve to either; a unix
    socket's path as is."""
    if not isinstance(peer, list | tuple):
        return peer
    host, port = peer[0], peer[1]  # IPv6 adds flow info and scope id
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return (host, port)
    mapped = getattr(address, "ipv4_mapped", None)
    if mapped is not None:
        address = mapped
    return ("loopback" if address.is_loopback else str(address), port)
