"""shardcache: many independent memcached servers used as one cache.

The public API is what ``__all__`` lists; everything else is private.
"""

import logging

from shardcache._commands import CasToken
from shardcache._rebalance import RebalanceReport
from shardcache.async_client import AsyncClient
from shardcache.client import Client
from shardcache.discovery import dns_discovery
from shardcache.errors import (
    ArgumentError,
    CasConflictError,
    CommandError,
    ConfigurationError,
    KeyValidationError,
    LockError,
    NodeError,
    NodeTimeoutError,
    NodeUnavailableError,
    ProtocolError,
    SerializationError,
    ServerError,
    ShardcacheError,
    ValueTooLargeError,
)
from shardcache.health import Event
from shardcache.nodes import NodeSpec, parse_nodes
from shardcache.recipes import Lock
from shardcache.ring import Ring, RingDiff
from shardcache.serde import (
    CompressedSerde,
    DefaultSerde,
    PickleSerde,
    Serde,
    SignedPickleSerde,
    default_serde,
)

__version__ = "0.1.0"

logging.getLogger("shardcache").addHandler(logging.NullHandler())

__all__ = [
    "ArgumentError",
    "AsyncClient",
    "CasConflictError",
    "CasToken",
    "Client",
    "CommandError",
    "CompressedSerde",
    "ConfigurationError",
    "DefaultSerde",
    "Event",
    "KeyValidationError",
    "Lock",
    "LockError",
    "NodeError",
    "NodeSpec",
    "NodeTimeoutError",
    "NodeUnavailableError",
    "PickleSerde",
    "ProtocolError",
    "RebalanceReport",
    "Ring",
    "RingDiff",
    "Serde",
    "SerializationError",
    "ServerError",
    "ShardcacheError",
    "SignedPickleSerde",
    "ValueTooLargeError",
    "__version__",
    "default_serde",
    "dns_discovery",
    "parse_nodes",
]
