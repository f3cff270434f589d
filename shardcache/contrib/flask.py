"""Flask-Caching backend: ``shardcache.contrib.flask.ShardCache``.

::

    app.config.update(
        CACHE_TYPE="shardcache.contrib.flask.ShardCache",
        CACHE_MEMCACHED_SERVERS=["10.0.0.1:11211", "10.0.0.2:11211"],  # or "a:11211,b:11211"
        CACHE_KEY_PREFIX="myapp:",           # Flask-Caching's default is "flask_cache_"
        CACHE_DEFAULT_TIMEOUT=300,
        CACHE_OPTIONS={"timeout": 0.5},     # shardcache.Client options
    )
    cache = Cache(app)

It implements cachelib's ``BaseCache`` interface with cachelib's semantics: a timeout of ``None``
means ``CACHE_DEFAULT_TIMEOUT``, ``0`` never expires, a negative one expires at once (longer than
30 days is sent as an absolute time, as memcached requires); ``get`` returns None for a miss,
``set``/``add`` return whether the value was stored, ``delete`` whether the key existed,
``get_many`` a list, ``get_dict`` a dict (None for misses), ``set_many`` the keys stored,
``delete_many`` the keys now absent (``RuntimeError`` naming the others when
``CACHE_IGNORE_ERRORS`` is False), ``inc``/``dec`` the new value, starting from 0 for a missing
key, or None when it could not be stored.

Differences from Flask-Caching's ``MemcachedCache``, and why:

- **Values are pickled** (:class:`shardcache.PickleSerde`): Flask-Caching stores whole responses
  and arbitrary objects. For networks where other hosts can reach memcached, pass
  ``CACHE_OPTIONS={"serde": shardcache.SignedPickleSerde(secret)}`` (see shardcache.serde for the
  trade-off: forged pickles are refused before they are loaded, at one HMAC per value).
- **Any key works.** ``@cache.cached`` builds keys from ``request.path``, which a client chooses:
  it can hold spaces or run past memcached's 250 bytes. Such a key (and, so no two keys collide,
  any key already starting with ``~sha256:``) is stored under ``~sha256:`` and the SHA-256 of
  the key, instead of being refused (cachelib silently returns None for them on ``get`` only).
- ``inc``/``dec`` are atomic: ``Client.incr(initial=)`` when the counter is a non-negative integer,
  ``Client.cas_update`` otherwise (negative values, decrements).
  cachelib's memcached backend reads and writes back, losing concurrent updates.
- ``get_many``/``set_many``/``delete_many``/``get_dict`` talk to every node at once.
- ``has`` reads the item (a pickled ``None`` counts as present); cachelib appends an empty string
  to it, which changes the item's CAS token.
- Node failures raise by default; ``CACHE_OPTIONS={"on_error": "miss"}`` turns them into misses
  (logged on the ``shardcache`` logger). ``@cache.cached``/``@cache.memoize`` catch and log
  backend exceptions themselves unless the app is in debug mode.

Thread-safe: one instance serves every thread of the app.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Mapping
from typing import Any

from flask import Flask
from flask_caching.backends.base import BaseCache

import shardcache
from shardcache.contrib import _original_pickling_error

__all__ = ["ShardCache"]

logger = logging.getLogger("shardcache")

_MAX_KEY_BYTES = 250
_BAD_KEY_BYTE = re.compile(rb"[\x00-\x20\x7f]").search
_HASHED_MARK = "~sha256:"
_HASHED_MARK_BYTES = _HASHED_MARK.encode("ascii")
_THIRTY_DAYS_S = 60 * 60 * 24 * 30
_COUNTER_ATTEMPTS = 20
_PICKLE = shardcache.PickleSerde()
_MISSING = object()


class ShardCache(BaseCache):
    """A Flask-Caching/cachelib cache over a ``shardcache.Client``; see the module docstring.

    ``ShardCache(servers, default_timeout=300, key_prefix=None, ignore_delete_many_errors=False,
    **client_options)``; Flask-Caching calls :meth:`factory` with the app's config. Thread-safe.
    """

    def __init__(
        self,
        servers: Any,
        default_timeout: int = 300,
        key_prefix: str | bytes | None = None,
        ignore_delete_many_errors: bool = False,
        **client_options: Any,
    ) -> None:
        super().__init__(default_timeout=default_timeout, ignore_delete_many_errors=ignore_delete_many_errors)
        if servers is None or servers in ("", [], ()):
            raise shardcache.ConfigurationError(
                "CACHE_MEMCACHED_SERVERS is not set: list the memcached servers, e.g. ['10.0.0.1:11211']"
            )
        prefix = key_prefix or b""
        options: dict[str, Any] = {
            "serde": _PICKLE,
            "allow_unicode_keys": True,
            "default_noreply": False,
            **client_options,
        }
        if "serde" not in client_options and ({"serializer", "deserializer"} & client_options.keys()):
            del options["serde"]  # pymemcache-style serializer functions given instead
        try:
            shardcache.parse_nodes(servers)
        except shardcache.ConfigurationError as exc:
            raise shardcache.ConfigurationError(f"CACHE_MEMCACHED_SERVERS: {exc}") from exc
        try:
            self._client = shardcache.Client(servers, key_prefix=prefix, **options)
        except shardcache.ConfigurationError as exc:
            where = "CACHE_KEY_PREFIX" if str(exc).startswith("key_prefix=") else "CACHE_OPTIONS"
            raise shardcache.ConfigurationError(f"{where}: {exc}") from exc
        # the client accepted the prefix: ASCII, no whitespace
        self._prefix_bytes = len(prefix.encode("ascii") if isinstance(prefix, str) else prefix)

    @classmethod
    def factory(
        cls, app: Flask, config: dict[str, Any], args: list[Any], kwargs: dict[str, Any]
    ) -> ShardCache:
        """Build the cache from Flask-Caching's config (``kwargs`` holds ``default_timeout``,
        ``ignore_delete_many_errors`` and ``CACHE_OPTIONS``)."""
        if args:
            raise shardcache.ConfigurationError(
                f"CACHE_ARGS={args!r}: not used by {cls.__module__}.{cls.__name__}; use CACHE_OPTIONS"
            )
        if "key_prefix" in kwargs:
            raise shardcache.ConfigurationError(
                f"CACHE_OPTIONS key_prefix={kwargs['key_prefix']!r}: set CACHE_KEY_PREFIX instead"
            )
        return cls(config.get("CACHE_MEMCACHED_SERVERS"), key_prefix=config.get("CACHE_KEY_PREFIX"), **kwargs)

    @property
    def client(self) -> shardcache.Client:
        """The ``shardcache.Client`` behind this cache (keys given to it are used as is)."""
        return self._client

    # -- keys and timeouts ------------------------------------------------------------------------

    def _key(self, key: str | bytes) -> str | bytes:
        """``key`` if memcached can take it, else its ``~sha256:`` digest (see the module docstring)."""
        try:
            raw = key if isinstance(key, bytes) else key.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates
            raw = key.encode("utf-8", "surrogatepass")  # type: ignore[union-attr]
        else:
            if (
                raw
                and len(raw) + self._prefix_bytes <= _MAX_KEY_BYTES
                and not _BAD_KEY_BYTE(raw)
                and not raw.startswith(_HASHED_MARK_BYTES)
            ):
                return key
        return _HASHED_MARK + hashlib.sha256(raw).hexdigest()

    def _expire(self, timeout: Any) -> int:
        """cachelib's timeout (None: default; 0: never; seconds or timedelta) as memcached's exptime."""
        seconds = self._normalize_timeout(timeout)
        if seconds == 0:
            return 0
        if seconds < 0:
            return -1  # memcached: already expired
        if seconds > _THIRTY_DAYS_S:
            return int(time.time()) + seconds  # memcached reads more than 30 days as a Unix time
        return seconds

    # -- cachelib interface -----------------------------------------------------------------------

    def get(self, key: str) -> Any:
        return self._client.get(self._key(key))

    def has(self, key: str) -> bool:
        return self._client.get(self._key(key), _MISSING) is not _MISSING

    def set(self, key: str, value: Any, timeout: Any = None) -> bool:
        wire = self._key(key)
        try:
            return self._client.set(wire, value, self._expire(timeout))
        except shardcache.SerializationError as exc:
            raise _original_pickling_error(exc) from None
        except shardcache.ValueTooLargeError as exc:
            logger.warning("shardcache: %s", exc)
            return False

    def add(self, key: str, value: Any, timeout: Any = None) -> bool:
        try:
            return self._client.add(self._key(key), value, self._expire(timeout))
        except shardcache.SerializationError as exc:
            raise _original_pickling_error(exc) from None
        except shardcache.ValueTooLargeError as exc:
            logger.warning("shardcache: %s", exc)
            return False

    def delete(self, key: str) -> bool:
        return self._client.delete(self._key(key))

    def get_many(self, *keys: str) -> list[Any]:
        found = self.get_dict(*keys)
        return [found[key] for key in keys]

    def get_dict(self, *keys: str) -> dict[str, Any]:
        wires = {self._key(key): key for key in keys}
        found = self._client.get_many(wires)
        return {key: found.get(self._key(key)) for key in keys}

    def set_many(self, mapping: Mapping[str, Any], timeout: Any = None) -> list[Any]:
        wires = {self._key(key): key for key in mapping}
        expire = self._expire(timeout)
        items = {wire: mapping[key] for wire, key in wires.items()}
        try:
            failed = set(self._client.set_many(items, expire))
        except shardcache.SerializationError as exc:  # raised before anything is sent
            raise _original_pickling_error(exc) from None
        except shardcache.ValueTooLargeError as exc:
            # The others were stored, but the error names only some of the refused keys: store
            # one at a time to learn exactly which keys took (this path only runs on that error).
            logger.warning("shardcache: %s; storing the batch one key at a time", exc)
            return [key for key in mapping if self.set(key, mapping[key], timeout)]
        return [key for wire, key in wires.items() if wire not in failed]

    def delete_many(self, *keys: str) -> list[Any]:
        wires = {self._key(key): key for key in keys}
        if not wires or self._client.delete_many(wires):
            return list(keys)
        # A node failed (only possible with on_error="miss"): find which, one node at a time.
        by_node: dict[str, list[str | bytes]] = {}
        for wire in wires:
            by_node.setdefault(self._client.node_for(wire), []).append(wire)
        failed = {wire for group in by_node.values() if not self._client.delete_many(group) for wire in group}
        if failed and not self.ignore_delete_many_errors:
            raise RuntimeError(f"Failed to delete keys: {[wires[wire] for wire in failed]}")
        return [key for key in keys if self._key(key) not in failed]

    def clear(self) -> bool:
        """Flush every node: keys of other prefixes and other apps go too (as cachelib's)."""
        return all(self._client.flush_all().values())

    def inc(self, key: str, delta: int = 1) -> int | None:
        return self._add_to_counter(key, delta)

    def dec(self, key: str, delta: int = 1) -> int | None:
        return self._add_to_counter(key, -delta)

    def _add_to_counter(self, key: str, delta: int) -> int | None:
        wire = self._key(key)
        expire = self._expire(None)
        if delta >= 0:  # memcached's incr: one atomic round trip, for non-negative counters
            try:
                value = self._client.incr(wire, delta, initial=delta, expire=expire)
            except (shardcache.CommandError, shardcache.CasConflictError):
                pass  # a negative or non-numeric value (or an unreachable node): the CAS loop decides
            else:
                if value is not None:
                    return value
        try:
            new: int = self._client.cas_update(
                wire,
                lambda current: current + delta,
                initial=0,
                expire=expire,
                max_attempts=_COUNTER_ATTEMPTS,
            )
        except shardcache.CasConflictError as exc:
            logger.warning("shardcache: counter %r not updated: %s", key, exc)
            return None
        return new
