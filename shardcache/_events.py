"""Event delivery: the ``shardcache`` logger and ``Client.add_listener`` callbacks.

Every event is logged (errors caused by a node at WARNING, the caller's own mistakes at DEBUG,
node comings and goings at INFO) and handed to each listener on the thread that saw it. A
listener that raises is logged and never breaks the call that emitted the event.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from shardcache._reply_items import ErrorReply
from shardcache.errors import (
    CommandError,
    NodeUnavailableError,
    ProtocolError,
    ServerError,
    ShardcacheError,
    ValueTooLargeError,
)
from shardcache.health import Event

if TYPE_CHECKING:
    from shardcache._topology import Node

__all__ = ["EVENT_KINDS", "Events", "refusal", "report_failure"]

logger = logging.getLogger("shardcache")

EVENT_KINDS = (
    "node_down",
    "node_up",
    "failover",
    "error",
    "fenced",
    "node_added",
    "node_removed",
    "discovery_failed",
    "rebalanced",
)
_LEVELS = {
    "node_up": logging.INFO,
    "fenced": logging.INFO,
    "node_added": logging.INFO,
    "node_removed": logging.INFO,
    "rebalanced": logging.INFO,
}


class Events:
    """The listeners of one client; thread-safe (the list is replaced, never mutated in place)."""

    __slots__ = ("_listeners", "_lock")

    def __init__(self) -> None:
        self._listeners: tuple[Callable[[Event], None], ...] = ()
        self._lock = threading.Lock()

    def add_listener(self, callback: Callable[[Event], None]) -> None:
        with self._lock:
            self._listeners = (*self._listeners, callback)

    def remove_listener(self, callback: Callable[[Event], None]) -> None:
        with self._lock:
            self._listeners = tuple(c for c in self._listeners if c is not callback)

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


def report_failure(events: Events, node: Any, err: BaseException, what: str, key: Any = None) -> None:
    """A call to ``node`` failed with ``err`` (ours): count it on the node (transport failures count
    towards marking it DOWN) and emit an ``error`` event."""
    node.report_failure(err)
    events.emit(Event("error", node.node_id, f"{err} ({what})" if what else str(err), err, key))


def refusal(node: Node, reply: ErrorReply, what: str, key: Any) -> ShardcacheError:
    """Our exception for an error reply from ``node``."""
    node_id = node.node_id
    if reply.kind == "SERVER_ERROR":
        if "too large" in reply.message:
            return ValueTooLargeError(
                f"memcached node {node_id} refused the value for {key!r}: {reply.message}", key, node_id
            )
        return ServerError(f"memcached node {node_id}: SERVER_ERROR {reply.message} ({what})", node_id)
    if reply.kind == "CLIENT_ERROR":
        return CommandError(f"memcached node {node_id} refused {what}: {reply.message}", node_id)
    return CommandError(
        f"memcached node {node_id} refused {what}: {reply.kind} {reply.message}".rstrip(), node_id
    )
