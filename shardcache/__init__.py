"""shardcache: many independent memcached servers used as one cache.

The public API is what ``__all__`` lists; everything else is private.
"""

from shardcache.errors import (
    CasConflictError,
    ConfigurationError,
    KeyValidationError,
    NodeError,
    NodeTimeoutError,
    NodeUnavailableError,
    SerializationError,
    ServerError,
    ShardcacheError,
    ValueTooLargeError,
)
from shardcache.nodes import NodeSpec, parse_nodes
from shardcache.ring import Ring, RingDiff

__version__ = "0.1.0"

__all__ = [
    "CasConflictError",
    "ConfigurationError",
    "KeyValidationError",
    "NodeError",
    "NodeSpec",
    "NodeTimeoutError",
    "NodeUnavailableError",
    "Ring",
    "RingDiff",
    "SerializationError",
    "ServerError",
    "ShardcacheError",
    "ValueTooLargeError",
    "__version__",
    "parse_nodes",
]
