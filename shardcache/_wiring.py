"""What ``Client`` and ``AsyncClient`` build alike: parsed options, rings, events, connection
settings, router, membership and core, around an executor each client brings; and the membership
changes (``add_node``, ``remove_node``, ``set_nodes``), which do no I/O.

Written once so that the two clients differ only in their executor (and prober driver): no option,
gutter check or window rule exists twice.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from shardcache._commands import Core
from shardcache._conn import ConnectionSettings
from shardcache._events import Events
from shardcache._membership import Membership
from shardcache._options import Options
from shardcache._router import Router
from shardcache.errors import ConfigurationError
from shardcache.nodes import NodeSpecLike
from shardcache.ring import Ring

__all__ = ["Parts", "Reconfigure", "assemble"]

E = TypeVar("E")


@dataclass(frozen=True)
class Parts(Generic[E]):
    """A client's pieces, wired."""

    options: Options
    events: Events
    settings: ConnectionSettings
    executor: E
    membership: Membership
    core: Core


def assemble(
    servers: Iterable[NodeSpecLike] | str,
    options: dict[str, Any],
    executor: Callable[[Events, ConnectionSettings, float | None], E],
    run: Callable[[E], Callable[..., Any]],
    prober: Callable[..., Any] | None = None,
) -> Parts[E]:
    """Parse ``options``, build the rings and ``executor(events, settings, timeout)``, then the
    membership (its prober runs flows with ``run(executor)``; made by ``prober``) and the core."""
    opts = Options.parse(**options)
    ring = Ring(servers, hashing=opts.hashing, ketama_naming=opts.ketama_naming)
    gutter_ring = None
    if opts.gutter_servers:
        shared = [spec.node_id for spec in opts.gutter_servers if spec.node_id in ring]
        if shared:
            raise ConfigurationError(f"gutter_servers: {shared[0]!r} is also a ring member")
        gutter_ring = Ring(list(opts.gutter_servers), hashing=opts.hashing)
    events = Events()
    settings = ConnectionSettings(
        connect_timeout=opts.connect_timeout,
        no_delay=opts.no_delay,
        socket_module=opts.socket_module,
        keepalive=opts.socket_keepalive,
        tls_context=opts.tls_context,
        max_value=opts.max_item_size,
    )
    made = executor(events, settings, opts.timeout)
    router = Router(opts.failover, failover_ttl_s=opts.failover_ttl_s, miss_on_error=opts.miss_on_error)
    membership = Membership(
        opts, ring, gutter_ring, events=events, settings=settings, run=run(made), prober=prober
    )
    return Parts(opts, events, settings, made, membership, Core(opts, membership, router, events))


class Reconfigure:
    """``add_node``/``remove_node``/``set_nodes`` of one client, one change at a time; thread-safe
    (no I/O: an asyncio client calls them on its loop)."""

    def __init__(self, membership: Membership) -> None:
        self._membership = membership
        self._lock = threading.Lock()

    def add_node(self, spec: NodeSpecLike, warmup_s: float) -> None:
        window = _window("warmup_s", warmup_s)
        with self._lock:
            ring = self._membership.topology.ring.with_node(spec)
            self._check_not_gutter(ring)
            self._membership.change(ring, window)

    def remove_node(self, node_id: str, drain_s: float) -> None:
        window = _window("drain_s", drain_s)
        with self._lock:
            self._membership.change(self._membership.topology.ring.without_node(node_id), window)

    def set_nodes(
        self, servers: Iterable[NodeSpecLike] | str, warmup_s: float
    ) -> tuple[list[str], list[str]]:
        window = _window("warmup_s", warmup_s)
        with self._lock:
            current = self._membership.topology.ring
            ring = Ring(servers, hashing=current.hashing, ketama_naming=current.ketama_naming)
            if ring.specs == current.specs:
                return [], []
            self._check_not_gutter(ring)
            return self._membership.change(ring, window)

    def _check_not_gutter(self, ring: Ring) -> None:
        gutter = self._membership.topology.gutter_ring
        if gutter is not None:
            shared = [node_id for node_id in ring.nodes if node_id in gutter]
            if shared:
                raise ConfigurationError(f"node {shared[0]!r} is a gutter server; it cannot join the ring")


def _window(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < float("inf"):
        raise ConfigurationError(f"{name}={value!r}: expected finite seconds >= 0")
    return float(value)
