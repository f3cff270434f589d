"""The shardcache exception tree.

Every exception raised by shardcache derives from :class:`ShardcacheError`. Where pymemcache has a
matching exception, ours subclasses it too, so code written against pymemcache keeps catching them::

    ShardcacheError
    ├── ConfigurationError            bad node spec, option or server list   (ValueError)
    ├── KeyValidationError            key with whitespace/control chars, too long, wrong type
    │                                 (pymemcache MemcacheIllegalInputError, ValueError)
    ├── ArgumentError                 bad argument: expire, delay, CAS token, incr delta
    │                                 (pymemcache MemcacheIllegalInputError, ValueError)
    ├── SerializationError            value the serde cannot encode or decode
    │                                 (pymemcache MemcacheIllegalInputError)
    ├── ValueTooLargeError            server refused an item over its size limit
    │                                 (pymemcache MemcacheServerError)
    ├── CasConflictError              cas_update gave up after max attempts
    ├── LockError                     a lock could not be acquired in time
    └── NodeError                     a call to one node failed; carries ``.node_id``
        ├── NodeUnavailableError      connect/read failed, timed out, or node is down
        │                             (pymemcache MemcacheUnexpectedCloseError, OSError)
        ├── NodeTimeoutError          the node did not answer within the timeout
        │                             (NodeUnavailableError, TimeoutError)
        ├── ServerError               the node answered SERVER_ERROR (pymemcache MemcacheServerError)
        ├── CommandError              the node refused the command: CLIENT_ERROR or ERROR, e.g.
        │                             incr on a non-numeric value (pymemcache MemcacheClientError)
        └── ProtocolError             the node's reply could not be parsed; the connection is
                                      dropped (pymemcache MemcacheUnknownError)

Node errors survive pickling and chain their cause (``raise ... from exc``).
"""

from __future__ import annotations

from typing import Any

from pymemcache.exceptions import (
    MemcacheClientError,
    MemcacheError,
    MemcacheIllegalInputError,
    MemcacheServerError,
    MemcacheUnexpectedCloseError,
    MemcacheUnknownError,
)

__all__ = [
    "ArgumentError",
    "CasConflictError",
    "CommandError",
    "ConfigurationError",
    "KeyValidationError",
    "LockError",
    "NodeError",
    "NodeTimeoutError",
    "NodeUnavailableError",
    "ProtocolError",
    "SerializationError",
    "ServerError",
    "ShardcacheError",
    "ValueTooLargeError",
]


class ShardcacheError(MemcacheError):
    """Root of every exception shardcache raises (and a pymemcache ``MemcacheError``)."""


class ConfigurationError(ShardcacheError, ValueError):
    """A node spec, a server list or a client option is invalid; the message names it."""


class KeyValidationError(ShardcacheError, MemcacheIllegalInputError, ValueError):
    """A key cannot be sent safely: wrong type, whitespace/control characters, or too long."""


class ArgumentError(ShardcacheError, MemcacheIllegalInputError, ValueError):
    """An argument other than the key is invalid (expire, delay, CAS token, incr/decr delta)."""


class SerializationError(ShardcacheError, MemcacheIllegalInputError):
    """A value could not be serialized, or stored bytes could not be deserialized."""


class CasConflictError(ShardcacheError):
    """A compare-and-set retry loop gave up after its maximum number of attempts."""

    def __init__(self, message: str, key: Any = None, attempts: int = 0) -> None:
        super().__init__(message)
        self.key = key
        self.attempts = attempts

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.key, self.attempts))


class LockError(ShardcacheError):
    """A ``Client.lock`` could not be acquired within its blocking timeout; ``name`` is its key."""

    def __init__(self, message: str, name: Any = None) -> None:
        super().__init__(message)
        self.name = name

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.name))


class NodeError(ShardcacheError):
    """A call to one memcached node failed. ``node_id`` names the node (``host:port``)."""

    def __init__(self, message: str, node_id: str = "") -> None:
        super().__init__(message)
        self.node_id = node_id

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.node_id))


class NodeUnavailableError(NodeError, MemcacheUnexpectedCloseError, OSError):
    """The node could not be reached, closed the connection, or is marked down."""

    def __init__(self, message: str, node_id: str = "") -> None:
        NodeError.__init__(self, message, node_id)

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class NodeTimeoutError(NodeUnavailableError, TimeoutError):
    """The node did not answer within the configured timeout."""


class ServerError(NodeError, MemcacheServerError):
    """The node answered ``SERVER_ERROR`` (``CLIENT_ERROR`` is a ``CommandError``)."""


class ValueTooLargeError(ShardcacheError, MemcacheServerError):
    """The node refused a value larger than its item size limit (``-I``, 1 MiB by default).

    ``key`` names the (first) refused key; from ``set_many``, ``failed`` lists every key of the
    batch that was not stored, as ``set_many`` would have returned them.
    """

    def __init__(
        self, message: str, key: Any = None, node_id: str = "", failed: list[Any] | None = None
    ) -> None:
        super().__init__(message)
        self.key = key
        self.node_id = node_id
        self.failed = failed if failed is not None else [key]

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.key, self.node_id, self.failed))


class CommandError(NodeError, MemcacheClientError):
    """The node refused the command (``CLIENT_ERROR``/``ERROR``), e.g. ``incr`` of a non-number."""


class ProtocolError(NodeError, MemcacheUnknownError):
    """The node's reply could not be parsed; the connection it came on is dropped."""
