"""Django cache backend: ``shardcache.contrib.django.ShardCache``.

::

    CACHES = {
        "default": {
            "BACKEND": "shardcache.contrib.django.ShardCache",
            "LOCATION": ["10.0.0.1:11211", "10.0.0.2:11211"],  # or "a:11211,b:11211" or "a;b"
            "OPTIONS": {"timeout": 0.5},                       # shardcache.Client options
        }
    }

It is Django's ``BaseMemcachedCache`` (the base of Django's ``PyMemcacheCache``) over a
``shardcache.Client``, so timeouts (0 expires at once, None never, over 30 days absolute), key
validation (``InvalidCacheKey`` for keys memcached would refuse) and ``incr``/``decr`` behave as in
Django's memcached backends, and Django's own memcached test case passes against it
(integration/django_suite). What differs, and why:

- **Connections outlive requests.** Django's memcached backends close their connections on every
  ``request_finished`` (ticket #11331, for clients that leaked them), so each request reconnects.
  shardcache's pools are thread-safe and drop inherited connections in a forked child, so
  :meth:`ShardCache.close` does nothing. Django builds one backend object per thread (and per
  request under ASGI); they all share one ``shardcache.Client`` per distinct (LOCATION, OPTIONS)
  in the process, so the ring is built once and connections stay warm.
- **Multi-key calls** (``get_many``, ``set_many``, ``delete_many``) talk to every node at once.
- **Values are pickled**, as Django expects of a cache, with :class:`shardcache.PickleSerde`
  (wire-compatible with the ``pickle_serde`` PyMemcacheCache uses, so both read each other's
  items). ``OPTIONS["serde"]`` is ``"pickle"`` (the default), ``"signed"`` (HMAC-signed pickles,
  keyed from ``SECRET_KEY``; see below) or any serde object. As in PyMemcacheCache,
  ``allow_unicode_keys`` is True and ``default_noreply`` False unless OPTIONS say otherwise.
- **Keys** are also refused (``InvalidCacheKey``) when over 250 bytes in UTF-8 with the
  ``key_prefix`` option; Django itself counts characters.
- **Errors** in LOCATION or OPTIONS raise ``ImproperlyConfigured`` naming the CACHES entry and the
  bad value, when the backend is first used. ``MAX_ENTRIES``/``CULL_FREQUENCY`` are refused:
  memcached evicts on its own.

Pickle or signed pickle: memcached has no authentication, so any host that can reach a node can
store a forged pickle that runs code in every Django process that reads it. ``"pickle"`` is right
when only your application servers can reach memcached (firewall, private network), and it is what
Django's own backends do. ``"signed"`` (:class:`shardcache.SignedPickleSerde`) verifies an
HMAC-SHA256 tag, bound to the key, before unpickling: forged or copied values raise
``SerializationError`` instead. It costs 33 bytes and one HMAC per value, every writer must share
the ``SECRET_KEY``, keys in ``SECRET_KEY_FALLBACKS`` still verify (rotation), and unsigned
pickles (from PyMemcacheCache or ``"pickle"``) are refused, so switch with a fresh key prefix or
an empty cache. Signing stops code execution, not forgery: str, bytes, int and JSON items are
stored and read unsigned (parsed, never executed), so a host that can write to memcached can still
plant one, e.g. a JSON dict where a cached session is expected. Either way, keep memcached
reachable by your servers only.

Node failures raise by default, as PyMemcacheCache does; ``OPTIONS={"on_error": "miss"}`` turns
them into misses (logged on the ``shardcache`` logger), so a dead node degrades to a slower page.

Thread-safe: one backend object may be used by many threads.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any

from django.conf import settings
from django.core.cache.backends.base import (
    DEFAULT_TIMEOUT,
    InvalidCacheKey,
)
from django.core.cache.backends.memcached import BaseMemcachedCache
from django.core.exceptions import ImproperlyConfigured
from django.utils.crypto import salted_hmac

import shardcache
from shardcache.contrib import _original_pickling_error

__all__ = ["ShardCache"]

_BACKEND = "shardcache.contrib.django.ShardCache"
_MAX_KEY_BYTES = 250
_PICKLE = shardcache.PickleSerde()
_SIGNING_SALT = "shardcache.contrib.django.ShardCache"
_CULL_OPTIONS = ("MAX_ENTRIES", "CULL_FREQUENCY")

# One client per distinct configuration, shared by every backend object of the process. The value
# keeps the servers and options alive, so the id() of an unhashable option in a key is never reused.
_clients: dict[tuple[Any, ...], tuple[shardcache.Client, Any]] = {}
_clients_lock = threading.Lock()


class ShardCache(BaseMemcachedCache):  # type: ignore[misc]
    """A Django cache over a ``shardcache.Client``; see the module docstring. Thread-safe."""

    _servers: Any
    _options: dict[str, Any]

    def __init__(self, server: Any, params: dict[str, Any]) -> None:
        super().__init__(server, params, library=shardcache, value_not_found_exception=KeyError)
        servers: Any = self._servers  # set by BaseMemcachedCache: LOCATION split on ';' and ','
        given: Any = self._options
        self._servers = _checked_servers(servers, server, params)
        self._options = options = _client_options(given, server, params)
        # Shadows BaseMemcachedCache's lazy ``_cache``: the client is made (or found) now, so a bad
        # option is reported when the cache is first used, not on some later request.
        self._cache = _shared_client(self._servers, options, server, params)
        prefix = options.get("key_prefix", b"")  # valid: the client accepted it
        self._prefix_bytes = len(prefix.encode("ascii") if isinstance(prefix, str) else prefix)

    @property
    def client(self) -> shardcache.Client:
        """The ``shardcache.Client`` behind this cache, for what Django's API lacks (``node_for``,
        ``gets``/``cas``, ``stats``). Keys passed to it are used as is: build them with ``make_key``.
        """
        client: shardcache.Client = self._cache
        return client

    def validate_key(self, key: str) -> None:
        """Raise ``InvalidCacheKey`` for a key memcached would refuse (as Django's memcached backends),
        including one over 250 bytes in UTF-8 with the ``key_prefix`` option."""
        super().validate_key(key)
        try:
            size = len(key.encode("utf-8")) + self._prefix_bytes
        except UnicodeEncodeError:
            raise InvalidCacheKey(
                f"Cache key will cause errors if used with memcached: {key!r} (not valid Unicode)"
            ) from None
        if size > _MAX_KEY_BYTES:
            raise InvalidCacheKey(
                f"Cache key will cause errors if used with memcached: {key!r} ({size} bytes in "
                f"UTF-8 with the key_prefix option; memcached allows {_MAX_KEY_BYTES})"
            )

    def add(self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: Any = None) -> bool:
        key = self.make_and_validate_key(key, version=version)
        try:
            return bool(self._cache.add(key, value, self.get_backend_timeout(timeout)))
        except shardcache.SerializationError as exc:
            raise _original_pickling_error(exc) from None

    def set(self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: Any = None) -> None:
        key = self.make_and_validate_key(key, version=version)
        try:
            stored = self._cache.set(key, value, self.get_backend_timeout(timeout))
        except shardcache.SerializationError as exc:
            raise _original_pickling_error(exc) from None
        except shardcache.ValueTooLargeError:
            # memcached drops the old value itself when a set is refused; be sure of it, as the
            # cache_db session backend relies on never reading the previous session back.
            self._cache.delete(key)
            raise
        if not stored:
            self._cache.delete(key)

    def get_many(self, keys: Iterable[Any], version: Any = None) -> dict[Any, Any]:
        key_map = {self.make_and_validate_key(key, version=version): key for key in keys}
        found = self._cache.get_many(key_map)
        return {key_map[key]: value for key, value in found.items()}

    def set_many(
        self, data: Mapping[Any, Any], timeout: Any = DEFAULT_TIMEOUT, version: Any = None
    ) -> list[Any]:
        safe_data: dict[str, Any] = {}
        original_keys: dict[Any, Any] = {}
        for key, value in data.items():
            safe_key = self.make_and_validate_key(key, version=version)
            safe_data[safe_key] = value
            original_keys[safe_key] = key
        try:
            failed = self._cache.set_many(safe_data, self.get_backend_timeout(timeout))
        except shardcache.SerializationError as exc:  # raised before anything is sent
            raise _original_pickling_error(exc) from None
        return [original_keys[key] for key in failed]

    def delete_many(self, keys: Iterable[Any], version: Any = None) -> None:
        self._cache.delete_many([self.make_and_validate_key(key, version=version) for key in keys])

    def close(self, **kwargs: Any) -> None:
        """Keep the connections: Django calls this after every request (see the module docstring).

        ``cache.client.close()`` closes the idle connections if you must; they reopen on demand.
        """


def _entry_name(server: Any, params: Mapping[str, Any]) -> str:
    """``CACHES['alias']`` for the settings entry these arguments came from (best effort)."""
    try:
        configured = settings.CACHES
    except ImproperlyConfigured:
        configured = {}
    aliases = [
        alias
        for alias, entry in configured.items()
        if isinstance(entry, Mapping)
        and entry.get("LOCATION", "") == server
        and entry.get("OPTIONS") == params.get("OPTIONS")
        and all(entry.get(name) == params.get(name) for name in ("KEY_PREFIX", "VERSION", "TIMEOUT"))
    ]
    if not aliases:
        return f"CACHES entry with BACKEND {_BACKEND!r}"
    return " / ".join(f"CACHES[{alias!r}]" for alias in aliases)


def _improperly(server: Any, params: Mapping[str, Any], message: str) -> ImproperlyConfigured:
    return ImproperlyConfigured(f"{_entry_name(server, params)}: {message}")


def _checked_servers(servers: Any, server: Any, params: Mapping[str, Any]) -> Any:
    """The server list with blanks stripped; ImproperlyConfigured naming a bad entry."""
    if isinstance(servers, list):
        servers = [s.strip() if isinstance(s, str) else s for s in servers]
        servers = [s for s in servers if s != ""]
    if not servers:
        raise _improperly(
            server, params, "LOCATION is empty: list the memcached servers, e.g. ['10.0.0.1:11211', ...]"
        )
    try:
        shardcache.parse_nodes(servers)
    except shardcache.ConfigurationError as exc:
        raise _improperly(server, params, f"LOCATION: {exc}") from exc
    return servers


def _client_options(given: Any, server: Any, params: Mapping[str, Any]) -> dict[str, Any]:
    """OPTIONS as ``shardcache.Client`` keyword arguments, with PyMemcacheCache's defaults."""
    if not isinstance(given, Mapping):
        raise _improperly(
            server, params, f"OPTIONS must be a dict of shardcache.Client options, got {given!r}"
        )
    for name in _CULL_OPTIONS:
        if name in given:
            raise _improperly(
                server,
                params,
                f"OPTIONS[{name!r}] is not supported: memcached evicts the least recently used items "
                "by itself (size each node with memcached -m)",
            )
    options: dict[str, Any] = {"allow_unicode_keys": True, "default_noreply": False, **given}
    if "serde" in options or not ({"serializer", "deserializer"} & options.keys()):
        serde = options.get("serde", "pickle")
        if isinstance(serde, str):
            if serde == "pickle":
                options["serde"] = _PICKLE
            elif serde == "signed":
                fallbacks = tuple(getattr(settings, "SECRET_KEY_FALLBACKS", ()))
                options["serde"] = _signed_serde(settings.SECRET_KEY, fallbacks)
            else:
                raise _improperly(
                    server,
                    params,
                    f"OPTIONS['serde']={serde!r}: expected 'pickle', 'signed' or a serde object",
                )
    return options


@lru_cache(maxsize=8)
def _signed_serde(secret: str | bytes, fallbacks: tuple[str | bytes, ...]) -> shardcache.SignedPickleSerde:
    """A SignedPickleSerde keyed from SECRET_KEY (a derived key, never the secret itself)."""

    def derive(key: str | bytes) -> bytes:
        digest: bytes = salted_hmac(
            _SIGNING_SALT, "SignedPickleSerde", secret=key, algorithm="sha256"
        ).digest()
        return digest

    return shardcache.SignedPickleSerde(derive(secret), old_secrets=[derive(key) for key in fallbacks])


def _frozen(value: Any) -> Any:
    """A hashable stand-in for an option value: the value itself, or its identity."""
    if isinstance(value, list | tuple):
        return (type(value).__name__, tuple(_frozen(item) for item in value))
    try:
        hash(value)
    except TypeError:
        return ("id", id(value))
    return (type(value).__qualname__, value)


def _shared_client(
    servers: Any, options: dict[str, Any], server: Any, params: Mapping[str, Any]
) -> shardcache.Client:
    fingerprint = (_frozen(servers), tuple((name, _frozen(options[name])) for name in sorted(options)))
    with _clients_lock:
        entry = _clients.get(fingerprint)
        if entry is None:
            try:
                client = shardcache.Client(servers, **options)
            except shardcache.ConfigurationError as exc:
                raise _improperly(server, params, f"OPTIONS: {exc}") from exc
            entry = _clients[fingerprint] = (client, (servers, options))
        return entry[0]
