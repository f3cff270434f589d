"""Client options: one frozen value, validated once, each option defined in one place.

``Options.parse(**kwargs)`` checks every option and raises ``ConfigurationError`` naming the option and
the bad value; unknown options raise with a "did you mean" hint, and pymemcache options shardcache
does not support raise with the option to use instead. ``Client`` and the future ``AsyncClient``
take the same options through this one parser.
"""

from __future__ import annotations

import difflib
import math
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from types import ModuleType
from typing import Any

from pymemcache.serde import LegacyWrappingSerde

from shardcache._protocol import DEFAULT_MAX_VALUE, KeyCodec
from shardcache.errors import ArgumentError, ConfigurationError
from shardcache.health import Clock, HealthPolicy
from shardcache.nodes import NodeSpec, NodeSpecLike, parse_nodes
from shardcache.serde import Serde, default_serde

__all__ = ["FAILOVER_POLICIES", "Options"]

FAILOVER_POLICIES = ("fail_fast", "remap", "gutter")
DEFAULT_MAX_IDLE = 16

_NOT_SUPPORTED = {
    "retry_attempts": "shardcache marks a node down after failure_threshold consecutive failures",
    "retry_timeout": "use retry_interval_s (first wait before a DOWN node is probed)",
    "dead_timeout": "use retry_interval_s and max_retry_interval_s (probe backoff)",
    "hasher": "shardcache places keys with its own ring: pass hashing='mmh3' or hashing='ketama'",
}
_IGNORED = ("use_pooling", "lock_generator")  # pymemcache's; shardcache always pools, without locks


@dataclass(frozen=True, slots=True, kw_only=True)
class Options:
    """Every client option, checked. Immutable; shared by the pieces of one client."""

    hashing: str = "mmh3"
    ketama_naming: str = "libmemcached"
    hash_key_prefix: bool = False
    serde: Serde = default_serde
    connect_timeout: float | None = 1.0
    timeout: float | None = 1.0
    no_delay: bool = True
    socket_module: ModuleType = socket
    socket_keepalive: Any = None
    key_prefix: bytes = b""
    default_noreply: bool = False
    allow_unicode_keys: bool = False
    encoding: str = "ascii"
    tls_context: Any = None
    max_pool_size: int | None = DEFAULT_MAX_IDLE
    pool_idle_timeout: float = 0.0
    max_item_size: int = DEFAULT_MAX_VALUE
    on_error: str = "raise"
    failover: str = "fail_fast"
    health: HealthPolicy = field(default_factory=HealthPolicy)
    failover_ttl_s: int = 60
    gutter_servers: tuple[NodeSpec, ...] = ()
    fence_max_keys: int = 100_000
    fleet_refresh_s: float | None = 0.5
    discovery: Callable[[], Any] | None = None
    discovery_interval_s: float = 30.0
    discovery_warmup_s: float = 60.0
    clock: Clock = time.monotonic

    @property
    def miss_on_error(self) -> bool:
        return self.on_error == "miss"

    def key_codec(self) -> KeyCodec:
        return KeyCodec(
            self.key_prefix, hash_prefix=self.hash_key_prefix, allow_unicode=self.allow_unicode_keys
        )

    @classmethod
    def parse(cls, **kwargs: Any) -> Options:
        """Options from ``Client``'s keyword arguments (pymemcache's names included)."""
        unknown = {k: v for k, v in kwargs.items() if k not in _ACCEPTED}
        if unknown:
            raise _unknown_option(unknown)
        for name in _IGNORED:
            kwargs.pop(name, None)
        if kwargs.pop("ignore_exc", False):
            kwargs.setdefault("on_error", "miss")
            if kwargs["on_error"] != "miss":
                raise ConfigurationError("ignore_exc=True contradicts on_error='raise': give one of them")
        serializer = kwargs.pop("serializer", None)
        deserializer = kwargs.pop("deserializer", None)
        if kwargs.get("serde") is None:
            kwargs.pop("serde", None)
            if serializer is not None or deserializer is not None:
                kwargs["serde"] = LegacyWrappingSerde(serializer, deserializer)
        health = {name: kwargs.pop(name) for name in _HEALTH if name in kwargs}
        if health:
            retry = health.get("retry_interval_s", 1.0)
            longest = health.get("max_retry_interval_s", 30.0)
            if isinstance(retry, int | float) and isinstance(longest, int | float) and retry > longest:
                health["max_retry_interval_s"] = retry  # backoff never waits less than the first wait
            kwargs["health"] = HealthPolicy(**health)
        if "gutter_servers" in kwargs:
            kwargs["gutter_servers"] = _gutter(kwargs["gutter_servers"])
        if "key_prefix" in kwargs:
            kwargs["key_prefix"] = _prefix(kwargs["key_prefix"])
        options = cls(**kwargs)
        options._check()
        return options

    def _check(self) -> None:
        _choice("hashing", self.hashing, ("mmh3", "ketama"))
        _choice("on_error", self.on_error, ("raise", "miss"))
        _choice("failover", self.failover, FAILOVER_POLICIES)
        _seconds("connect_timeout", self.connect_timeout, allow_none=True)
        _seconds("timeout", self.timeout, allow_none=True)
        _seconds("pool_idle_timeout", self.pool_idle_timeout)
        _seconds("discovery_interval_s", self.discovery_interval_s, positive=True)
        _seconds("discovery_warmup_s", self.discovery_warmup_s)
        _seconds("fleet_refresh_s", self.fleet_refresh_s, allow_none=True, positive=True)
        if self.fleet_refresh_s is not None and not 0.05 <= self.fleet_refresh_s <= 60:
            raise ConfigurationError(
                f"fleet_refresh_s={self.fleet_refresh_s!r}: expected seconds in [0.05, 60], or None"
            )
        _integer("max_pool_size", self.max_pool_size, minimum=1, allow_none=True)
        _integer("max_item_size", self.max_item_size, minimum=1024, maximum=1024**3)
        _integer("failover_ttl_s", self.failover_ttl_s, minimum=1, maximum=30 * 24 * 3600)
        _integer("fence_max_keys", self.fence_max_keys, minimum=0)
        if self.discovery is not None and not callable(self.discovery):
            raise ConfigurationError(
                f"discovery={self.discovery!r}: expected a callable returning a server list"
            )
        if not (
            callable(getattr(self.serde, "serialize", None))
            and callable(getattr(self.serde, "deserialize", None))
        ):
            raise ConfigurationError(f"serde={self.serde!r}: needs serialize() and deserialize() methods")
        if not isinstance(self.encoding, str):
            raise ConfigurationError(f"encoding={self.encoding!r}: expected a codec name")
        try:
            "".encode(self.encoding)
        except LookupError:
            raise ConfigurationError(f"encoding={self.encoding!r}: unknown codec") from None
        if self.failover == "gutter" and not self.gutter_servers:
            raise ConfigurationError("failover='gutter' needs gutter_servers: a list of memcached nodes")
        if not callable(self.clock):
            raise ConfigurationError(f"clock={self.clock!r}: expected a callable returning seconds")
        if self.tls_context is not None and not callable(getattr(self.tls_context, "wrap_socket", None)):
            raise ConfigurationError(f"tls_context={self.tls_context!r}: expected an ssl.SSLContext")


_HEALTH = ("failure_threshold", "retry_interval_s", "max_retry_interval_s")
_ACCEPTED = frozenset(
    [f.name for f in fields(Options) if f.name != "health"]
    + [*_HEALTH, "ignore_exc", "serializer", "deserializer", *_IGNORED]
)


def _unknown_option(unknown: dict[str, Any]) -> ConfigurationError:
    name = sorted(unknown)[0]
    if name in _NOT_SUPPORTED:
        return ConfigurationError(f"option {name}={unknown[name]!r} is not supported: {_NOT_SUPPORTED[name]}")
    close = difflib.get_close_matches(name, sorted(_ACCEPTED), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigurationError(f"unknown option {name}={unknown[name]!r}{hint}")


def _seconds(name: str, value: object, *, allow_none: bool = False, positive: bool = False) -> None:
    if value is None and allow_none:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
        or (positive and value == 0)
    ):
        raise ConfigurationError(f"{name}={value!r}: expected finite seconds {'> 0' if positive else '>= 0'}")


def _integer(
    name: str, value: object, *, minimum: int, maximum: int | None = None, allow_none: bool = False
) -> None:
    if value is None and allow_none:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        bound = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
        raise ConfigurationError(f"{name}={value!r}: expected an int {bound}")


def _choice(name: str, value: object, choices: Iterable[str]) -> None:
    options = tuple(choices)
    if value not in options:
        raise ConfigurationError(f"{name}={value!r}: expected one of {', '.join(map(repr, options))}")


def _prefix(given: object) -> bytes:
    prefix = given
    if isinstance(prefix, str):
        try:
            prefix = prefix.encode("ascii")
        except UnicodeEncodeError:
            raise ConfigurationError(f"key_prefix={given!r}: must be ASCII") from None
    if not isinstance(prefix, bytes):
        raise ConfigurationError(f"key_prefix={given!r}: expected str or bytes")
    try:
        KeyCodec(prefix)
    except ArgumentError:
        raise ConfigurationError(
            f"key_prefix={given!r}: no whitespace or control characters, < 250 bytes"
        ) from None
    return prefix


def _gutter(given: Iterable[NodeSpecLike] | str | None) -> tuple[NodeSpec, ...]:
    if given is None or (not isinstance(given, str) and not list(given)):
        return ()
    return parse_nodes(given)
