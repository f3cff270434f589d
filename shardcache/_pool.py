"""Connections to one memcached node, and the translation of its failures into our exceptions.

``NodePool`` keeps idle pymemcache ``Client`` connections for one node, most recently used first.
``acquire``/``release`` are lock-free (``collections.deque`` appends and pops are atomic), so a
pool is safe to share between threads; a connection is used by one thread at a time. In a child
process after ``fork()``, connections inherited from the parent are dropped, never reused.
"""

from __future__ import annotations

import os
import socket
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

from pymemcache.client.base import Client as PymemcacheClient
from pymemcache.exceptions import (
    MemcacheClientError,
    MemcacheIllegalInputError,
    MemcacheServerError,
    MemcacheUnexpectedCloseError,
    MemcacheUnknownError,
)

from shardcache.errors import (
    ArgumentError,
    CommandError,
    NodeTimeoutError,
    NodeUnavailableError,
    ProtocolError,
    ServerError,
    ShardcacheError,
    ValueTooLargeError,
)

__all__ = ["NodePool", "node_failure"]

_pools: weakref.WeakSet[NodePool] = weakref.WeakSet()


class NodePool:
    """Idle connections to one node; thread-safe. Connections are made lazily, on first use."""

    __slots__ = ("__weakref__", "_factory", "_idle", "_idle_timeout", "_max_idle", "node_id")

    def __init__(
        self,
        node_id: str,
        factory: Callable[[], PymemcacheClient],
        *,
        max_idle: int | None,
        idle_timeout: float,
    ) -> None:
        self.node_id = node_id
        self._factory = factory
        self._idle: deque[tuple[PymemcacheClient, float]] = deque()
        self._max_idle = max_idle
        self._idle_timeout = idle_timeout
        _pools.add(self)

    def acquire(self) -> PymemcacheClient:
        """An idle connection, or a new (not yet connected) one."""
        idle = self._idle
        while True:
            try:
                conn, since = idle.pop()
            except IndexError:
                return self._factory()
            if self._idle_timeout and time.monotonic() - since > self._idle_timeout:
                conn.close()
                continue
            return conn

    def release(self, conn: PymemcacheClient) -> None:
        """Give back a connection that is in a clean state (no unread reply)."""
        if self._max_idle is not None and len(self._idle) >= self._max_idle:
            conn.close()
        else:
            self._idle.append((conn, time.monotonic() if self._idle_timeout else 0.0))

    @staticmethod
    def discard(conn: PymemcacheClient) -> None:
        """Close a connection whose state is unknown (an error happened while it was in use)."""
        conn.close()

    def close(self) -> None:
        """Close every idle connection. Connections in use are closed when released past the cap."""
        while True:
            try:
                conn, _ = self._idle.pop()
            except IndexError:
                return
            conn.close()

    def __del__(self) -> None:
        self.close()

    def _forget_after_fork(self) -> None:
        # The parent still uses these sockets: drop our references without closing them.
        self._idle.clear()


def _after_fork_in_child() -> None:
    for pool in list(_pools):
        pool._forget_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def node_failure(exc: BaseException, node_id: str, what: str, key: Any = None) -> BaseException:
    """Our exception for ``exc``, raised by a call to ``node_id`` (``what`` names the call).

    Our own exceptions and anything that is not a node failure are returned unchanged.
    """
    if isinstance(exc, ShardcacheError):
        return exc
    if isinstance(exc, socket.timeout | TimeoutError):
        return NodeTimeoutError(f"memcached node {node_id}: no reply within the timeout ({what})", node_id)
    if isinstance(exc, MemcacheUnexpectedCloseError):
        return NodeUnavailableError(f"memcached node {node_id}: connection closed ({what})", node_id)
    if isinstance(exc, OSError):
        reason = exc.strerror or exc.__class__.__name__
        return NodeUnavailableError(f"memcached node {node_id}: {reason} ({what})", node_id)
    if isinstance(exc, MemcacheServerError):
        message = _text(exc)
        if "too large" in message:
            return ValueTooLargeError(
                f"memcached node {node_id} refused the value for {key!r}: {message}", key, node_id
            )
        return ServerError(f"memcached node {node_id}: SERVER_ERROR {message} ({what})", node_id)
    if isinstance(exc, MemcacheIllegalInputError):
        return ArgumentError(str(exc))
    if isinstance(exc, MemcacheClientError):
        return CommandError(f"memcached node {node_id} refused {what}: {_text(exc)}", node_id)
    if isinstance(exc, MemcacheUnknownError):
        return ProtocolError(f"memcached node {node_id}: unexpected reply {_text(exc)!r} ({what})", node_id)
    return exc


def _text(exc: BaseException) -> str:
    arg = exc.args[0] if exc.args else ""
    return arg.decode("utf-8", "replace") if isinstance(arg, bytes) else str(arg)
