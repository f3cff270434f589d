"""The sharded client: pymemcache's method set over a consistent-hash ring of memcached nodes.

Each key is validated once, routed by the ring (the key prefix is not hashed unless
``hash_key_prefix=True``, as in libmemcached) and sent to its node over a pooled pymemcache
connection. Multi-key calls group their keys by node and pipeline all nodes at once, so they cost
about one round trip however many nodes they touch.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import re
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import ModuleType, TracebackType
from typing import Any, TypeVar

from pymemcache.client.base import Client as PymemcacheClient
from pymemcache.serde import LegacyWrappingSerde

from shardcache._pool import NodePool, node_failure
from shardcache._wire import Reader, read_deleted, read_stored, read_values, rounds
from shardcache.errors import (
    ArgumentError,
    ConfigurationError,
    KeyValidationError,
    NodeError,
    SerializationError,
    ValueTooLargeError,
)
from shardcache.nodes import NodeSpecLike
from shardcache.ring import Ring
from shardcache.serde import Serde, default_serde

__all__ = ["CasToken", "Client"]

logger = logging.getLogger("shardcache")

Key = str | bytes
T = TypeVar("T")

_MAX_KEY_LENGTH = 250
_BAD_KEY_BYTE = re.compile(rb"[\x00-\x20\x7f]").search
_ON_ERROR = ("raise", "miss")
_NOT_YET = {
    "retry_attempts": "failover settings arrive with node health (failure_threshold, retry_interval_s)",
    "retry_timeout": "failover settings arrive with node health (failure_threshold, retry_interval_s)",
    "dead_timeout": "failover settings arrive with node health (failure_threshold, retry_interval_s)",
    "hasher": "shardcache places keys with its own ring: pass hashing='mmh3' or hashing='ketama'",
}


class CasToken(bytes):
    """A CAS token from ``gets`` that remembers the node which issued it.

    It is the server's token (bytes of digits), so it also works wherever pymemcache takes one.
    ``Client.cas`` refuses to use it on another node: a token is only meaningful where it was issued.
    """

    node_id: str

    def __new__(cls, raw: bytes, node_id: str) -> CasToken:
        token = super().__new__(cls, raw)
        token.node_id = node_id
        return token

    def __reduce__(self) -> tuple[Any, ...]:
        return (CasToken, (bytes(self), self.node_id))


class _Topology:
    """The ring and the connection pools of its nodes: read once per call, swapped as a whole."""

    __slots__ = ("pools", "ring")

    def __init__(self, ring: Ring, pools: Mapping[str, NodePool]) -> None:
        self.ring = ring
        self.pools = pools


class Client:
    """A memcached client over many nodes, with pymemcache's methods; thread-safe.

    ``Client(servers, **options)``: ``servers`` is a list of node specs (``"host:port[:weight]"``,
    ``("host", port)``, ...). No connection is made until the first call. One instance is meant to be
    shared by all the threads of a process: each call borrows a connection from the node's pool.

    Options (keyword-only):

    - ``hashing`` (``"mmh3"`` | ``"ketama"``), ``ketama_naming``: how keys are placed (see ``Ring``);
      ``hash_key_prefix``: include ``key_prefix`` in the hashed key (default False, as libmemcached).
    - ``connect_timeout``, ``timeout``: seconds (default 1.0 each); ``None`` waits forever.
    - ``serde``: an object with ``serialize(key, value) -> (bytes, flags)`` and
      ``deserialize(key, bytes, flags)``; default ``shardcache.default_serde`` (bytes, str, int, JSON;
      never pickle). pymemcache's ``serializer``/``deserializer`` functions are accepted too.
    - ``key_prefix`` (str or bytes), ``allow_unicode_keys`` (UTF-8 keys; default ASCII only),
      ``encoding``, ``no_delay`` (default True), ``socket_module``, ``socket_keepalive``,
      ``tls_context``: as in pymemcache.
    - ``default_noreply``: default False — replies are awaited, so failed writes are reported.
    - ``max_pool_size``: idle connections kept per node (None: no cap; a call never waits for a
      connection); ``pool_idle_timeout``: seconds after which an idle connection is closed (0: never).
    - ``on_error``: ``"raise"`` (default) raises node failures; ``"miss"`` turns them into misses
      (reads return the default, writes return False) and logs each on the ``shardcache`` logger.
      pymemcache's ``ignore_exc=True`` means ``on_error="miss"``.
    - ``use_pooling``, ``lock_generator``: accepted for pymemcache compatibility; shardcache always
      pools, without locks.
    """

    def __init__(
        self,
        servers: Iterable[NodeSpecLike] | str,
        *,
        hashing: str = "mmh3",
        ketama_naming: str = "libmemcached",
        hash_key_prefix: bool = False,
        serde: Serde | None = None,
        serializer: Callable[[Any, Any], tuple[Any, int]] | None = None,
        deserializer: Callable[[Any, bytes, int], Any] | None = None,
        connect_timeout: float | None = 1.0,
        timeout: float | None = 1.0,
        no_delay: bool = True,
        socket_module: ModuleType = socket,
        socket_keepalive: Any = None,
        key_prefix: str | bytes = b"",
        default_noreply: bool = False,
        allow_unicode_keys: bool = False,
        encoding: str = "ascii",
        tls_context: Any = None,
        max_pool_size: int | None = None,
        pool_idle_timeout: float = 0,
        on_error: str = "raise",
        ignore_exc: bool = False,
        use_pooling: bool = True,
        lock_generator: Any = None,
        **unknown: Any,
    ) -> None:
        if unknown:
            raise _unknown_option(unknown)
        for name, value in (
            ("connect_timeout", connect_timeout),
            ("timeout", timeout),
            ("pool_idle_timeout", pool_idle_timeout),
        ):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float) or value < 0
            ):
                raise ConfigurationError(f"{name}={value!r}: expected seconds >= 0")
        if max_pool_size is not None and (
            isinstance(max_pool_size, bool) or not isinstance(max_pool_size, int) or max_pool_size < 1
        ):
            raise ConfigurationError(f"max_pool_size={max_pool_size!r}: expected an int >= 1 or None")
        if on_error not in _ON_ERROR:
            raise ConfigurationError(f"on_error={on_error!r}: expected 'raise' or 'miss'")
        if ignore_exc:
            on_error = "miss"
        if serde is None:
            serde = (
                LegacyWrappingSerde(serializer, deserializer)
                if serializer is not None or deserializer is not None
                else default_serde
            )
        elif not (
            callable(getattr(serde, "serialize", None)) and callable(getattr(serde, "deserialize", None))
        ):
            raise ConfigurationError(f"serde={serde!r}: needs serialize() and deserialize() methods")
        self._prefix = _check_prefix(key_prefix)
        self._hash_prefix = bool(hash_key_prefix)
        self._key_encoding = "utf-8" if allow_unicode_keys else "ascii"
        self._serde: Serde = serde
        self._encoding = encoding
        self._default_noreply = bool(default_noreply)
        self._miss_on_error = on_error == "miss"
        self._connection_options: dict[str, Any] = {
            "serde": serde,
            "connect_timeout": connect_timeout,
            "timeout": timeout,
            "no_delay": no_delay,
            "socket_module": socket_module,
            "socket_keepalive": socket_keepalive,
            "key_prefix": b"",
            "default_noreply": self._default_noreply,
            "allow_unicode_keys": True,  # keys are validated and encoded here, before pymemcache
            "encoding": encoding,
            "tls_context": tls_context,
        }
        self._max_idle = max_pool_size
        self._idle_timeout = float(pool_idle_timeout)
        ring = Ring(servers, hashing=hashing, ketama_naming=ketama_naming)
        self._topology = _Topology(ring, {spec.node_id: self._make_pool(spec) for spec in ring.specs})

    def _make_pool(self, spec: Any) -> NodePool:
        options = self._connection_options
        address = spec.address

        def connect() -> PymemcacheClient:
            return PymemcacheClient(address, **options)

        return NodePool(spec.node_id, connect, max_idle=self._max_idle, idle_timeout=self._idle_timeout)

    # -- keys and routing -------------------------------------------------------------------------

    def _wire_key(self, key: Key) -> tuple[bytes, bytes]:
        """``(hashed key, key as sent)``; ``KeyValidationError`` naming the key if it is unsafe."""
        if type(key) is str:
            try:
                raw = key.encode(self._key_encoding)
            except UnicodeEncodeError:
                raise KeyValidationError(
                    f"key {key!r} is not {self._key_encoding}"
                    + (
                        ": pass allow_unicode_keys=True for UTF-8 keys"
                        if self._key_encoding == "ascii"
                        else ""
                    )
                ) from None
        elif isinstance(key, bytes | bytearray | memoryview):
            raw = bytes(key)
        else:
            raise KeyValidationError(f"key must be str or bytes, got {type(key).__name__}: {key!r}")
        wire = self._prefix + raw if self._prefix else raw
        if not raw or len(wire) > _MAX_KEY_LENGTH or _BAD_KEY_BYTE(wire):
            raise KeyValidationError(_key_problem(key, raw, wire))
        return (wire if self._hash_prefix else raw), wire

    def node_for(self, key: Key) -> str:
        """The id of the node that holds ``key``."""
        return self._topology.ring.node_for(self._wire_key(key)[0])

    @property
    def nodes(self) -> tuple[str, ...]:
        """The node ids, in the order they were configured."""
        return self._topology.ring.nodes

    @property
    def ring(self) -> Ring:
        """The current ring (an immutable value)."""
        return self._topology.ring

    # -- failures ---------------------------------------------------------------------------------

    def _failed(
        self, pool: NodePool, conn: PymemcacheClient, exc: Exception, what: str, key: Any
    ) -> Exception:
        """Close ``conn`` and return our exception for ``exc``; the caller raises it or misses."""
        pool.discard(conn)
        return node_failure(exc, pool.node_id, what, key)  # type: ignore[return-value]

    def _miss(self, err: Exception, what: str, *, reading: bool) -> bool:
        """True if ``err`` is to be turned into a miss (and logged), False if it must be raised."""
        if not self._miss_on_error:
            return False
        if isinstance(err, NodeError) or (reading and isinstance(err, SerializationError)):
            logger.warning("shardcache: %s treated as a miss: %s", what, err)
            return True
        return False

    def _on_node(self, key: Key, what: str, call: Callable[[PymemcacheClient, bytes], T], fallback: T) -> T:
        hash_key, wire = self._wire_key(key)
        topology = self._topology
        pool = topology.pools[topology.ring.node_for(hash_key)]
        conn = pool.acquire()
        try:
            result = call(conn, wire)
        except Exception as exc:
            err = self._failed(pool, conn, exc, what, key)
            if self._miss(err, what, reading=what in ("get", "gets")):
                return fallback
            if err is exc:
                raise
            raise err from exc
        pool.release(conn)
        return result

    # -- single-key commands ----------------------------------------------------------------------

    def get(self, key: Key, default: Any = None) -> Any:
        """The value of ``key``, or ``default`` if it is not cached."""
        hash_key, wire = self._wire_key(key)
        topology = self._topology
        pool = topology.pools[topology.ring.node_for(hash_key)]
        conn = pool.acquire()
        try:
            value = conn.get(wire, default)
        except Exception as exc:
            err = self._failed(pool, conn, exc, "get", key)
            if self._miss(err, "get", reading=True):
                return default
            if err is exc:
                raise
            raise err from exc
        pool.release(conn)
        return value

    def set(
        self, key: Key, value: Any, expire: int = 0, noreply: bool | None = None, flags: int | None = None
    ) -> bool:
        """Store ``value`` under ``key`` for ``expire`` seconds (0: no expiry). True if stored."""
        hash_key, wire = self._wire_key(key)
        topology = self._topology
        pool = topology.pools[topology.ring.node_for(hash_key)]
        conn = pool.acquire()
        try:
            stored = conn.set(wire, value, expire, noreply, flags)
        except Exception as exc:
            err = self._failed(pool, conn, exc, "set", key)
            if self._miss(err, "set", reading=False):
                return False
            if err is exc:
                raise
            raise err from exc
        pool.release(conn)
        return bool(stored)

    def add(
        self, key: Key, value: Any, expire: int = 0, noreply: bool | None = None, flags: int | None = None
    ) -> bool:
        """Store ``value`` only if ``key`` is absent. True if stored."""
        return bool(self._on_node(key, "add", lambda c, k: c.add(k, value, expire, noreply, flags), False))

    def replace(
        self, key: Key, value: Any, expire: int = 0, noreply: bool | None = None, flags: int | None = None
    ) -> bool:
        """Store ``value`` only if ``key`` is present. True if stored."""
        return bool(
            self._on_node(key, "replace", lambda c, k: c.replace(k, value, expire, noreply, flags), False)
        )

    def append(
        self, key: Key, value: Any, expire: int = 0, noreply: bool | None = None, flags: int | None = None
    ) -> bool:
        """Append ``value`` (serialized) to the stored bytes of ``key``. True if it was present."""
        return bool(
            self._on_node(key, "append", lambda c, k: c.append(k, value, expire, noreply, flags), False)
        )

    def prepend(
        self, key: Key, value: Any, expire: int = 0, noreply: bool | None = None, flags: int | None = None
    ) -> bool:
        """Prepend ``value`` (serialized) to the stored bytes of ``key``. True if it was present."""
        return bool(
            self._on_node(key, "prepend", lambda c, k: c.prepend(k, value, expire, noreply, flags), False)
        )

    def gets(self, key: Key, default: Any = None, cas_default: Any = None) -> tuple[Any, Any]:
        """``(value, cas_token)`` of ``key``, or ``(default, cas_default)`` if it is not cached.

        The token is a ``CasToken``: it remembers the node that issued it.
        """
        hash_key, wire = self._wire_key(key)
        topology = self._topology
        pool = topology.pools[topology.ring.node_for(hash_key)]
        conn = pool.acquire()
        try:
            value, token = conn.gets(wire, default, None)
        except Exception as exc:
            err = self._failed(pool, conn, exc, "gets", key)
            if self._miss(err, "gets", reading=True):
                return (default, cas_default)
            if err is exc:
                raise
            raise err from exc
        pool.release(conn)
        if token is None:
            return (default, cas_default)
        return (value, CasToken(token, pool.node_id))

    def cas(
        self, key: Key, value: Any, cas: Any, expire: int = 0, noreply: bool = False, flags: int | None = None
    ) -> bool | None:
        """Store ``value`` if ``key`` is unchanged since ``gets`` returned ``cas``.

        True: stored. False: the key changed, or the token came from a node that no longer owns the
        key. None: the key is absent.
        """
        if isinstance(cas, CasToken):
            owner = self.node_for(key)
            if cas.node_id != owner:
                logger.info(
                    "shardcache: cas on %r refused: token from %s, owner now %s", key, cas.node_id, owner
                )
                return False
        result: bool | None = self._on_node(
            key, "cas", lambda c, k: c.cas(k, value, cas, expire, noreply, flags), False
        )
        return result

    def delete(self, key: Key, noreply: bool | None = None) -> bool:
        """Delete ``key``. True if it was deleted (always True with noreply)."""
        return bool(self._on_node(key, "delete", lambda c, k: c.delete(k, noreply), False))

    def incr(self, key: Key, value: int, noreply: bool | None = False) -> int | None:
        """Add ``value`` to the counter at ``key``: the new value, or None if ``key`` is absent.

        memcached counters are unsigned 64-bit integers stored as decimal text: ``incr`` wraps around
        at 2**64, and a value that is not a number raises ``CommandError``.
        """
        result: int | None = self._on_node(key, "incr", lambda c, k: c.incr(k, value, noreply), None)
        return result

    def decr(self, key: Key, value: int, noreply: bool | None = False) -> int | None:
        """Subtract ``value`` from the counter at ``key`` (floored at 0): the new value, or None."""
        result: int | None = self._on_node(key, "decr", lambda c, k: c.decr(k, value, noreply), None)
        return result

    def touch(self, key: Key, expire: int = 0, noreply: bool | None = None) -> bool:
        """Set a new expiry on ``key``. True if it exists."""
        return bool(self._on_node(key, "touch", lambda c, k: c.touch(k, expire, noreply), False))

    # -- multi-key commands -----------------------------------------------------------------------

    def _group(self, keys: Iterable[Key]) -> tuple[_Topology, dict[str, dict[bytes, Key]]]:
        """Validate every key, then group them by node: ``{node_id: {wire_key: key}}``."""
        topology = self._topology
        node_for = topology.ring.node_for
        groups: dict[str, dict[bytes, Key]] = {}
        for key in keys:
            hash_key, wire = self._wire_key(key)
            node = node_for(hash_key)
            group = groups.get(node)
            if group is None:
                groups[node] = {wire: key}
            else:
                group[wire] = key
        return topology, groups

    def _exchange(
        self,
        topology: _Topology,
        groups: Mapping[str, Sequence[Any]],
        encode: Callable[[Sequence[Any]], bytes],
        decode: Callable[[Reader, Sequence[Any]], T] | None,
        size_of: Callable[[Any], int],
    ) -> tuple[dict[str, list[T]], dict[str, Exception]]:
        """Pipeline requests to every node at once, in rounds; results and failures by node.

        Each round writes one chunk to every node that has work left, then reads each node's
        replies (``decode`` None: nothing to read, noreply).
        """
        pending = {node: iter(rounds(items, size_of)) for node, items in groups.items() if items}
        results: dict[str, list[T]] = {node: [] for node in pending}
        errors: dict[str, Exception] = {}
        while pending:
            inflight: list[tuple[str, NodePool, PymemcacheClient, Sequence[Any]]] = []
            for node in list(pending):
                chunk = next(pending[node], None)
                if chunk is None:
                    del pending[node]
                    continue
                pool = topology.pools[node]
                conn = pool.acquire()
                try:
                    if conn.sock is None:
                        conn._connect()
                    conn.sock.sendall(encode(chunk))
                except Exception as exc:
                    pool.discard(conn)
                    errors[node] = exc
                    del pending[node]
                    continue
                inflight.append((node, pool, conn, chunk))
            for node, pool, conn, chunk in inflight:
                if decode is None:
                    pool.release(conn)
                    continue
                try:
                    results[node].append(decode(Reader(conn.sock), chunk))
                except Exception as exc:
                    pool.discard(conn)
                    errors[node] = exc
                    pending.pop(node, None)
                else:
                    pool.release(conn)
        return results, errors

    def _settle(self, errors: Mapping[str, Exception], what: str, *, reading: bool) -> None:
        """Raise the first node failure of a multi-key call, or log them all under on_error='miss'."""
        first: tuple[Exception, Exception] | None = None
        for node, exc in errors.items():
            err = node_failure(exc, node, what)
            assert isinstance(err, Exception)
            if self._miss(err, what, reading=reading):
                continue
            if first is None:
                first = (err, exc)
            else:
                logger.warning("shardcache: %s also failed on %s: %s", what, node, err)
        if first is not None:
            err, exc = first
            if err is exc:
                raise err
            raise err from exc

    def _fetch(self, keys: Iterable[Key], with_cas: bool) -> dict[Key, Any]:
        topology, groups = self._group(keys)
        if not groups:
            return {}
        deserialize = self._serde.deserialize
        command = b"gets " if with_cas else b"get "

        def encode(wires: Sequence[bytes]) -> bytes:
            return command + b" ".join(wires) + b"\r\n"

        def decode(reader: Reader, wires: Sequence[bytes]) -> dict[bytes, Any]:
            return read_values(reader, 1, deserialize, with_cas)

        wire_lists = {node: list(group) for node, group in groups.items()}
        results, errors = self._exchange(topology, wire_lists, encode, decode, lambda w: len(w) + 1)
        found: dict[Key, Any] = {}
        for node, replies in results.items():
            originals = groups[node]
            for reply in replies:
                for wire, value in reply.items():
                    key = originals.get(wire)
                    if key is None:
                        continue  # not asked for: never hand back a value under another key
                    found[key] = (value[0], CasToken(value[1], node)) if with_cas else value
        self._settle(errors, "gets_many" if with_cas else "get_many", reading=True)
        return found

    def get_many(self, keys: Iterable[Key]) -> dict[Key, Any]:
        """The cached values of ``keys`` (absent keys are left out), from all nodes at once."""
        return self._fetch(keys, with_cas=False)

    def gets_many(self, keys: Iterable[Key]) -> dict[Key, tuple[Any, CasToken]]:
        """``{key: (value, cas_token)}`` for the cached ``keys``, from all nodes at once."""
        return self._fetch(keys, with_cas=True)

    def set_many(
        self,
        values: Mapping[Key, Any] | Iterable[tuple[Key, Any]],
        expire: int = 0,
        noreply: bool | None = None,
        flags: int | None = None,
    ) -> list[Key]:
        """Store every item, on all nodes at once; returns the keys that were not stored.

        Every key and value is checked and serialized before anything is sent. A value over a node's
        item size limit raises ``ValueTooLargeError`` naming its key, after the others are stored.
        """
        items = values.items() if isinstance(values, Mapping) else values
        if noreply is None:
            noreply = self._default_noreply
        expire_text = _integer(expire, "expire")
        suffix = b" noreply\r\n" if noreply else b"\r\n"
        topology = self._topology
        node_for = topology.ring.node_for
        serialize = self._serde.serialize
        encoding = self._encoding
        groups: dict[str, list[tuple[Key, bytes]]] = {}
        for key, value in items:
            hash_key, wire = self._wire_key(key)
            data, data_flags = serialize(wire, value)
            if flags is not None:
                data_flags = flags
            if not isinstance(data, bytes):
                data = str(data).encode(encoding)
            command = (
                b"set %b %d %b %d%b" % (wire, data_flags, expire_text, len(data), suffix) + data + b"\r\n"
            )
            groups.setdefault(node_for(hash_key), []).append((key, command))

        def encode(chunk: Sequence[tuple[Key, bytes]]) -> bytes:
            return b"".join(command for _, command in chunk)

        def decode(reader: Reader, chunk: Sequence[tuple[Key, bytes]]) -> list[tuple[Key, Any]]:
            return list(zip((key for key, _ in chunk), read_stored(reader, len(chunk)), strict=True))

        results, errors = self._exchange(
            topology, groups, encode, None if noreply else decode, lambda item: len(item[1])
        )
        failed: list[Key] = []
        too_large: list[tuple[Key, str, Exception]] = []
        for node, replies in results.items():
            for reply in replies:
                for key, outcome in reply:
                    if outcome is True:
                        continue
                    failed.append(key)
                    if isinstance(outcome, Exception):
                        too_large.append((key, node, outcome))
        for node in errors:
            failed.extend(key for key, _ in groups[node])
        self._settle(errors, "set_many", reading=False)
        if too_large:
            key, node, exc = too_large[0]
            err = node_failure(exc, node, "set_many", key)
            if isinstance(err, ValueTooLargeError) and len(too_large) > 1:
                err = ValueTooLargeError(
                    f"{err} (and {len(too_large) - 1} more: {[k for k, _, _ in too_large[1:]]!r})", key, node
                )
            raise err from exc
        return failed

    def delete_many(self, keys: Iterable[Key], noreply: bool | None = None) -> bool:
        """Delete every key, on all nodes at once. True (as pymemcache), unless a node failed."""
        if noreply is None:
            noreply = self._default_noreply
        topology, groups = self._group(keys)
        suffix = b" noreply\r\n" if noreply else b"\r\n"

        def encode(wires: Sequence[bytes]) -> bytes:
            return b"".join(b"delete " + wire + suffix for wire in wires)

        def decode(reader: Reader, wires: Sequence[bytes]) -> list[bool]:
            return read_deleted(reader, len(wires))

        wire_lists = {node: list(group) for node, group in groups.items()}
        _, errors = self._exchange(
            topology, wire_lists, encode, None if noreply else decode, lambda w: len(w) + 9
        )
        self._settle(errors, "delete_many", reading=False)
        return not errors

    # -- cluster-wide commands --------------------------------------------------------------------

    def _each_node(self, what: str, call: Callable[[PymemcacheClient], T], fallback: T) -> dict[str, T]:
        topology = self._topology
        results: dict[str, T] = {}
        errors: dict[str, Exception] = {}
        for node, pool in topology.pools.items():
            conn = pool.acquire()
            try:
                results[node] = call(conn)
            except Exception as exc:
                pool.discard(conn)
                errors[node] = exc
                results[node] = fallback
            else:
                pool.release(conn)
        self._settle(errors, what, reading=False)
        return results

    def flush_all(self, delay: int = 0, noreply: bool | None = None) -> dict[str, bool]:
        """Invalidate every item on every node (after ``delay`` seconds): ``{node_id: ok}``."""
        _integer(delay, "delay")
        return self._each_node("flush_all", lambda c: bool(c.flush_all(delay, noreply)), False)

    def stats(self, *args: str) -> dict[str, dict[bytes, Any]]:
        """``stats [args]`` on every node: ``{node_id: {name: value}}``."""
        return self._each_node("stats", lambda c: dict(c.stats(*args)), {})

    def version(self) -> dict[str, bytes]:
        """The memcached version of every node: ``{node_id: b"1.6.18"}``."""
        return self._each_node("version", lambda c: bytes(c.version()), b"")

    def cache_memlimit(self, memlimit: int) -> dict[str, bool]:
        """Set every node's memory limit, in megabytes: ``{node_id: ok}``."""
        _integer(memlimit, "memlimit")
        return self._each_node("cache_memlimit", lambda c: bool(c.cache_memlimit(memlimit)), False)

    # -- lifecycle and mapping protocol -----------------------------------------------------------

    def close(self) -> None:
        """Close idle connections to every node. The client stays usable: it reconnects on demand."""
        for pool in self._topology.pools.values():
            pool.close()

    def quit(self) -> None:
        """pymemcache's ``quit``: close the connections (the server side closes too)."""
        self.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __getitem__(self, key: Key) -> Any:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            raise KeyError(key)
        return value

    def __setitem__(self, key: Key, value: Any) -> None:
        self.set(key, value)

    def __delitem__(self, key: Key) -> None:
        self.delete(key)

    def __repr__(self) -> str:
        return f"shardcache.Client({list(self.nodes)!r}, hashing={self.ring.hashing!r})"


_MISSING = object()


def _integer(value: object, name: str) -> bytes:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentError(f"{name} must be an int, got {value!r}")
    return b"%d" % value


def _check_prefix(given: object) -> bytes:
    prefix = given
    if isinstance(prefix, str):
        try:
            prefix = prefix.encode("ascii")
        except UnicodeEncodeError:
            raise ConfigurationError(f"key_prefix={given!r}: must be ASCII") from None
    if not isinstance(prefix, bytes):
        raise ConfigurationError(f"key_prefix={given!r}: expected str or bytes")
    if len(prefix) >= _MAX_KEY_LENGTH or _BAD_KEY_BYTE(prefix):
        raise ConfigurationError(f"key_prefix={given!r}: no whitespace or control characters, < 250 bytes")
    return prefix


def _key_problem(key: object, raw: bytes, wire: bytes) -> str:
    if not raw:
        return f"key {key!r} is empty"
    if len(wire) > _MAX_KEY_LENGTH:
        return f"key {key!r} is {len(wire)} bytes with its prefix; memcached allows {_MAX_KEY_LENGTH}"
    return f"key {key!r} contains whitespace or a control character, which memcached cannot take"


def _unknown_option(unknown: Mapping[str, Any]) -> ConfigurationError:
    name = sorted(unknown)[0]
    if name in _NOT_YET:
        return ConfigurationError(f"option {name}={unknown[name]!r} is not supported: {_NOT_YET[name]}")
    known = [p for p in inspect.signature(Client.__init__).parameters if p not in ("self", "unknown")]
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigurationError(f"unknown option {name}={unknown[name]!r}{hint}")
