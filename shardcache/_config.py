"""Validation of client options and keys: one clear ``ConfigurationError``/``KeyValidationError`` each."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from typing import Any

from shardcache.errors import ArgumentError, ConfigurationError

__all__ = [
    "BAD_KEY_BYTE",
    "MAX_KEY_LENGTH",
    "check_choice",
    "check_flags",
    "check_int",
    "check_prefix",
    "check_seconds",
    "integer_arg",
    "key_problem",
    "unknown_option",
]

MAX_KEY_LENGTH = 250
BAD_KEY_BYTE = re.compile(rb"[\x00-\x20\x7f]").search

_NOT_SUPPORTED = {
    "retry_attempts": "shardcache marks a node down after failure_threshold consecutive failures",
    "retry_timeout": "use retry_interval_s (first wait before a DOWN node is probed)",
    "dead_timeout": "use retry_interval_s and max_retry_interval_s (probe backoff)",
    "hasher": "shardcache places keys with its own ring: pass hashing='mmh3' or hashing='ketama'",
}


def check_seconds(name: str, value: object, *, allow_none: bool = False, positive: bool = False) -> None:
    if value is None and allow_none:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or value < 0
        or (positive and value == 0)
    ):
        raise ConfigurationError(f"{name}={value!r}: expected seconds {'> 0' if positive else '>= 0'}")


def check_int(name: str, value: object, *, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"{name}={value!r}: expected an int >= {minimum}")


def check_choice(name: str, value: object, choices: Iterable[str]) -> None:
    options = tuple(choices)
    if value not in options:
        raise ConfigurationError(f"{name}={value!r}: expected one of {', '.join(map(repr, options))}")


def check_prefix(given: object) -> bytes:
    prefix = given
    if isinstance(prefix, str):
        try:
            prefix = prefix.encode("ascii")
        except UnicodeEncodeError:
            raise ConfigurationError(f"key_prefix={given!r}: must be ASCII") from None
    if not isinstance(prefix, bytes):
        raise ConfigurationError(f"key_prefix={given!r}: expected str or bytes")
    if len(prefix) >= MAX_KEY_LENGTH or BAD_KEY_BYTE(prefix):
        raise ConfigurationError(f"key_prefix={given!r}: no whitespace or control characters, < 250 bytes")
    return prefix


def key_problem(key: object, raw: bytes, wire: bytes) -> str:
    if not raw:
        return f"key {key!r} is empty"
    if len(wire) > MAX_KEY_LENGTH:
        return f"key {key!r} is {len(wire)} bytes with its prefix; memcached allows {MAX_KEY_LENGTH}"
    return f"key {key!r} contains whitespace or a control character, which memcached cannot take"


def unknown_option(unknown: dict[str, Any], known: Iterable[str]) -> ConfigurationError:
    name = sorted(unknown)[0]
    if name in _NOT_SUPPORTED:
        return ConfigurationError(f"option {name}={unknown[name]!r} is not supported: {_NOT_SUPPORTED[name]}")
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigurationError(f"unknown option {name}={unknown[name]!r}{hint}")


def check_flags(flags: object) -> None:
    """Client flags must be an int in 0..2**32-1: anything else would make memcached skip the data
    block and read the value as a command."""
    if isinstance(flags, bool) or not isinstance(flags, int) or not 0 <= flags < 2**32:
        raise ArgumentError(f"flags must be an int in 0..4294967295, got {flags!r}")


def integer_arg(value: object, name: str) -> bytes:
    """An int argument (expire, delay, ...) as protocol text; ``ArgumentError`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentError(f"{name} must be an int, got {value!r}")
    return b"%d" % value
