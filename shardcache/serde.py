"""Serializers: how Python values become memcached bytes plus a 32-bit ``flags`` word, and back.

Any object with pymemcache's two methods is a :class:`Serde` (pymemcache's own ``pickle_serde``,
``compressed_serde`` and ``PickleSerde`` included). The ones here:

- :class:`DefaultSerde` (``default_serde``): safe, never unpickles. bytes, str, int, float, bool,
  None and JSON-able containers.
- :class:`PickleSerde`: opt-in pickle, wire-compatible with pymemcache's ``pickle_serde``.
- :class:`SignedPickleSerde`: pickle behind an HMAC-SHA256 tag bound to the key; verified first.
- :class:`CompressedSerde`: zlib wrapper around any of them, compatible with pymemcache's
  ``compressed_serde``.

Flag table (the wire format; bits 0-4 are pymemcache's, also used by python-memcached)::

    flags    name                 payload                               written by
    0        FLAG_BYTES           raw bytes                             all
    1        FLAG_PICKLE          pickle                                PickleSerde, pymemcache
    2        FLAG_INTEGER         decimal ASCII ("42"; incr/decr work)  all
    4        FLAG_LONG            decimal ASCII (read only)             Python 2 pymemcache
    8        FLAG_COMPRESSED      zlib stream of the payload below      CompressedSerde (OR-ed in)
    16       FLAG_TEXT            UTF-8                                 all
    256      FLAG_JSON            compact UTF-8 JSON                    DefaultSerde (ours)
    512      FLAG_SIGNED_PICKLE   0x01 | HMAC-SHA256 tag (32) | pickle  SignedPickleSerde (ours)

Reads match the flags word exactly (``2`` is an int, ``2 | 16`` is unknown), except that
:class:`CompressedSerde` strips bit 8 before delegating. Unknown or refused flags raise
:class:`~shardcache.errors.SerializationError` naming the key and the flags.

Why pickle is opt-in: memcached has no authentication, so anyone who can reach a node can write any
bytes with flags 1; unpickling them runs their code in every client that reads the key.

JSON values round trip exactly, type included, except that tuples come back as lists. To keep that
promise DefaultSerde refuses what JSON would silently change: NaN and infinities, dict keys that are
not ``str``, subclasses (``IntEnum``, ``OrderedDict``, a ``str`` subclass such as Django's
``SafeString``, namedtuples), nesting deeper than 100 levels, and strings that are not valid Unicode
(lone surrogates). ``bool`` is JSON (``true``), never flag 2, so it reads back as ``bool``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import pickle
import struct
import zlib
from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

from shardcache.errors import ConfigurationError, SerializationError

__all__ = [
    "FLAG_BYTES",
    "FLAG_COMPRESSED",
    "FLAG_INTEGER",
    "FLAG_JSON",
    "FLAG_LONG",
    "FLAG_PICKLE",
    "FLAG_SIGNED_PICKLE",
    "FLAG_TEXT",
    "CompressedSerde",
    "DefaultSerde",
    "PickleSerde",
    "Serde",
    "SignedPickleSerde",
    "default_serde",
]

FLAG_BYTES = 0
FLAG_PICKLE = 1 << 0
FLAG_INTEGER = 1 << 1
FLAG_LONG = 1 << 2
FLAG_COMPRESSED = 1 << 3
FLAG_TEXT = 1 << 4
FLAG_JSON = 1 << 8
FLAG_SIGNED_PICKLE = 1 << 9

_MAX_JSON_DEPTH = 100
_MIN_SECRET_LEN = 16
_SIGNED_VERSION = b"\x01"
_TAG_LEN = hashlib.sha256().digest_size
_SIGNED_HEADER_LEN = len(_SIGNED_VERSION) + _TAG_LEN
_SIGN_DOMAIN = b"shardcache.SignedPickleSerde\x00"
_UNBOUND_KEY_LEN = 0xFFFFFFFF  # marks "tag not bound to a key"; real keys are <= 250 bytes
_BYTES_LIKE = (bytes, bytearray, memoryview)

# Built once: json.dumps/loads with options would build a new encoder/decoder on every call.
_json_encoder = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, check_circular=False, separators=(",", ":")
)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"JSON constant {name} is not allowed")


_json_decoder = json.JSONDecoder(parse_constant=_refuse_constant)


@runtime_checkable
class Serde(Protocol):
    """Turns values into ``(payload, flags)`` and back; pymemcache's serde interface.

    ``key`` is the item's key (``str`` or ``bytes``); serializers may use it (SignedPickleSerde binds
    its tag to it) but must get the same key on both sides. Implementations are shared by every
    connection of a client, so they must be thread-safe.
    """

    def serialize(self, key: str | bytes, value: Any) -> tuple[bytes, int]:
        """Return the bytes to store and the flags word to store with them."""
        ...

    def deserialize(self, key: str | bytes, value: bytes, flags: int) -> Any:
        """Return the value for stored bytes and flags, or raise ``SerializationError``."""
        ...


def _type_name(value: Any) -> str:
    t = type(value)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


class _UnsupportedError(Exception):
    """Internal: a JSON walk hit something it must refuse; ``path`` grows while unwinding."""

    def __init__(self, value: Any, reason: str) -> None:
        super().__init__(reason)
        self.value = value
        self.reason = reason
        self.path: list[str] = []


def _check_json(value: Any, depth: int) -> None:
    """Raise _UnsupportedError unless JSON encodes ``value`` and decodes it to an equal, same-typed value."""
    t = type(value)
    if t is str or t is int or t is bool or value is None:
        return
    if t is float:
        if not math.isfinite(value):
            raise _UnsupportedError(value, f"float {value!r} has no JSON form")
        return
    if depth >= _MAX_JSON_DEPTH:
        raise _UnsupportedError(value, f"nesting is deeper than {_MAX_JSON_DEPTH} levels (or a cycle)")
    if t is list or t is tuple:
        for i, item in enumerate(value):
            try:
                _check_json(item, depth + 1)
            except _UnsupportedError as exc:
                exc.path.append(f"[{i}]")
                raise
        return
    if t is dict:
        for k, item in value.items():
            if type(k) is not str:
                raise _UnsupportedError(k, f"dict key {k!r} of type {_type_name(k)} is not a str")
            try:
                _check_json(item, depth + 1)
            except _UnsupportedError as exc:
                exc.path.append(f"[{k!r}]")
                raise
        return
    raise _UnsupportedError(value, f"type {_type_name(value)} is not supported")


def _cannot_encode(key: Any, value: Any, owner: str, detail: str) -> SerializationError:
    return SerializationError(
        f"cannot serialize the {_type_name(value)} value for key {key!r}: {detail}. {owner} stores "
        "bytes, str, int, float, bool, None, and lists, tuples and str-keyed dicts of those (exact "
        "types, finite floats); convert the value, or opt in to PickleSerde/SignedPickleSerde"
    )


def _encode_scalar(key: Any, value: Any) -> tuple[bytes, int] | None:
    """The bytes/str/int encodings every serde here shares, or None for anything else."""
    t = type(value)
    if t is bytes:
        return value, FLAG_BYTES
    if t is str:
        try:
            return value.encode("utf-8"), FLAG_TEXT
        except UnicodeEncodeError as exc:
            raise SerializationError(
                f"cannot serialize the str value for key {key!r}: it is not valid Unicode ({exc})"
            ) from exc
    if t is int:
        try:
            return b"%d" % value, FLAG_INTEGER
        except ValueError as exc:  # over sys.get_int_max_str_digits()
            raise SerializationError(f"cannot serialize the int value for key {key!r}: {exc}") from exc
    if t is memoryview:
        return value.tobytes(), FLAG_BYTES
    return None


def _encode_json(key: Any, value: Any, owner: str) -> tuple[bytes, int]:
    try:
        _check_json(value, 0)
    except _UnsupportedError as exc:
        where = f" at value{''.join(reversed(exc.path))}" if exc.path else ""
        raise _cannot_encode(key, value, owner, exc.reason + where) from None
    try:
        return _json_encoder.encode(value).encode("utf-8"), FLAG_JSON
    except (ValueError, UnicodeEncodeError) as exc:  # huge int, lone surrogate
        raise _cannot_encode(key, value, owner, str(exc)) from exc


def _refusal(key: Any, flags: int, owner: str) -> SerializationError:
    if flags == FLAG_PICKLE:
        why = (
            "it is pickled (flag 1), and this serde does not unpickle: memcached has no "
            "authentication, so unpickling what anyone on the network can write is remote code "
            "execution. Opt in with serde=SignedPickleSerde(secret) (every writer must use it too), "
            "or serde=PickleSerde() if every host that can reach memcached is trusted"
        )
    elif flags == FLAG_SIGNED_PICKLE:
        why = "it was written by SignedPickleSerde (flag 512); read it with the same SignedPickleSerde"
    elif flags & FLAG_COMPRESSED:
        why = "it is zlib-compressed (flag 8); wrap the serde: CompressedSerde(serde)"
    else:
        why = "these flags are unknown (see the flag table in shardcache.serde)"
    return SerializationError(f"cannot deserialize key {key!r} with flags {flags} using {owner}: {why}")


def _decode_plain(key: Any, value: bytes, flags: int, owner: str) -> Any:
    """Decode the flags every serde here reads (0, 16, 2, 4, JSON); refuse the rest."""
    if flags == FLAG_BYTES:
        return value if type(value) is bytes else bytes(value)
    try:
        if flags == FLAG_TEXT:
            return str(value, "utf-8")
        if flags == FLAG_JSON:
            return _json_decoder.decode(str(value, "utf-8"))
        if flags in (FLAG_INTEGER, FLAG_LONG):
            return int(value)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError included
        raise SerializationError(
            f"cannot deserialize key {key!r} with flags {flags} using {owner}: "
            f"stored bytes are malformed ({exc})"
        ) from exc
    raise _refusal(key, flags, owner)


def _check_protocol(protocol: Any) -> int:
    if type(protocol) is not int or not 0 <= protocol <= pickle.HIGHEST_PROTOCOL:
        raise ConfigurationError(
            f"protocol must be an int from 0 to {pickle.HIGHEST_PROTOCOL}, got {protocol!r}"
        )
    return protocol


def _pickle(key: Any, value: Any, protocol: int) -> bytes:
    try:
        return pickle.dumps(value, protocol)
    except Exception as exc:  # PicklingError, TypeError, AttributeError, RecursionError, ...
        raise SerializationError(
            f"cannot serialize the {_type_name(value)} value for key {key!r}: pickling failed ({exc})"
        ) from exc


def _unpickle(key: Any, data: bytes | memoryview, flags: int) -> Any:
    try:
        return pickle.loads(data)
    except Exception as exc:  # truncated data, missing class, ...
        raise SerializationError(
            f"cannot deserialize key {key!r} with flags {flags}: unpickling failed ({exc})"
        ) from exc


class DefaultSerde:
    """The safe default: bytes, str, int, float, bool, None and JSON-able containers; never unpickles.

    bytes/bytearray/memoryview are stored as-is (flag 0) and read back as ``bytes``; str as UTF-8
    (16); int as decimal (2), so ``incr`` works on it and pymemcache reads it as an int; everything
    else as compact JSON (256). See the module docstring for what is refused and why.

    Thread-safe: stateless.
    """

    __slots__ = ()

    def serialize(self, key: str | bytes, value: Any) -> tuple[bytes, int]:
        t = type(value)
        if t is bytes:
            return value, FLAG_BYTES
        if t is str:
            try:
                return value.encode("utf-8"), FLAG_TEXT
            except UnicodeEncodeError:
                pass  # _encode_scalar raises the explanatory error
        elif t is int:
            try:
                return b"%d" % value, FLAG_INTEGER
            except ValueError:
                pass  # likewise
        encoded = _encode_scalar(key, value)
        if encoded is not None:
            return encoded
        if isinstance(value, _BYTES_LIKE):  # bytearray, bytes subclasses
            return bytes(value), FLAG_BYTES
        return _encode_json(key, value, "DefaultSerde")

    def deserialize(self, key: str | bytes, value: bytes, flags: int) -> Any:
        if flags == FLAG_BYTES and type(value) is bytes:
            return value
        if flags == FLAG_TEXT:
            try:
                return str(value, "utf-8")
            except UnicodeDecodeError:
                pass  # _decode_plain raises the explanatory error
        return _decode_plain(key, value, flags, "DefaultSerde")

    def __repr__(self) -> str:
        return "DefaultSerde()"


default_serde = DefaultSerde()


class PickleSerde:
    """Opt-in pickle, for trusted networks only: any host that can write to memcached can run code
    in every reader. Prefer :class:`SignedPickleSerde`.

    Exact bytes, str and int (and memoryview) are stored as DefaultSerde stores them; everything else,
    bytearray and subclasses included, is pickled with flag 1, as pymemcache's ``pickle_serde`` does,
    so the two read each other's items. Reads everything DefaultSerde reads, plus flag 1. Unlike
    pymemcache, a value that fails to unpickle raises ``SerializationError`` instead of reading as None.

    Thread-safe: stateless after construction.
    """

    __slots__ = ("_protocol",)

    def __init__(self, protocol: int = pickle.HIGHEST_PROTOCOL) -> None:
        self._protocol = _check_protocol(protocol)

    def serialize(self, key: str | bytes, value: Any) -> tuple[bytes, int]:
        encoded = _encode_scalar(key, value)
        if encoded is not None:
            return encoded
        return _pickle(key, value, self._protocol), FLAG_PICKLE

    def deserialize(self, key: str | bytes, value: bytes, flags: int) -> Any:
        if flags == FLAG_PICKLE:
            return _unpickle(key, value, flags)
        return _decode_plain(key, value, flags, "PickleSerde")

    def __repr__(self) -> str:
        return f"PickleSerde(protocol={self._protocol})"


def _check_secret(secret: Any, option: str) -> bytes:
    if not isinstance(secret, bytes):
        raise ConfigurationError(f"{option} must be bytes, got {_type_name(secret)}")
    if len(secret) < _MIN_SECRET_LEN:
        raise ConfigurationError(
            f"{option} must be at least {_MIN_SECRET_LEN} bytes long, got {len(secret)} bytes "
            "(use e.g. secrets.token_bytes(32))"
        )
    return bytes(secret)


class SignedPickleSerde:
    """Pickle behind an HMAC-SHA256 tag, for networks where other hosts could write to memcached.

    Values other than exact bytes/str/int are pickled and stored with flag 512 as
    ``0x01 | tag | pickle``. The tag covers the format version, the flags, the key (unless
    ``bind_key=False``) and the pickle, and is checked with :func:`hmac.compare_digest` before anything
    is unpickled: a forged, truncated or tampered value, or one copied from another key, raises
    ``SerializationError`` ("signature mismatch"). Unsigned pickles (flag 1) are refused.

    bytes, str, int and JSON items are stored and read unsigned, as DefaultSerde does: they are
    parsed, never executed, so a forger can swap data (as with any unauthenticated cache) but cannot
    run code.

    ``secret`` signs and verifies; ``old_secrets`` only verify, so a key can be rotated by deploying
    ``SignedPickleSerde(new, old_secrets=(old,))`` everywhere before dropping ``old``. The key passed
    to ``serialize`` and ``deserialize`` must be the same (``str`` and its UTF-8 ``bytes`` count as
    the same); if a layer passes different keys on the two sides, use ``bind_key=False``.

    Thread-safe: stateless after construction.
    """

    __slots__ = ("_bind_key", "_protocol", "_signer", "_verifiers")

    def __init__(
        self,
        secret: bytes,
        *,
        old_secrets: Iterable[bytes] = (),
        protocol: int = pickle.HIGHEST_PROTOCOL,
        bind_key: bool = True,
    ) -> None:
        secret = _check_secret(secret, "secret")
        if isinstance(old_secrets, (bytes, bytearray, str)):
            raise ConfigurationError(
                "old_secrets must be a sequence of bytes secrets, e.g. old_secrets=(old,), "
                f"got a single {_type_name(old_secrets)}"
            )
        olds = [_check_secret(s, f"old_secrets[{i}]") for i, s in enumerate(old_secrets)]
        if type(bind_key) is not bool:
            raise ConfigurationError(f"bind_key must be a bool, got {bind_key!r}")
        self._protocol = _check_protocol(protocol)
        self._bind_key = bind_key
        # HMAC states primed with the secret and domain; each call copies one (cheaper than new()).
        self._signer = hmac.new(secret, _SIGN_DOMAIN, hashlib.sha256)
        self._verifiers = tuple(hmac.new(s, _SIGN_DOMAIN, hashlib.sha256) for s in [secret, *olds])

    def _tag(self, base: hmac.HMAC, key: Any, flags: int, payload: bytes | memoryview) -> bytes:
        mac = base.copy()
        if self._bind_key:
            if type(key) is str:
                key = key.encode("utf-8", "surrogatepass")
            elif not isinstance(key, _BYTES_LIKE):
                raise SerializationError(f"key {key!r} of type {_type_name(key)} is not str or bytes")
            mac.update(_SIGNED_VERSION + struct.pack(">II", flags, len(key)))
            mac.update(key)
        else:
            mac.update(_SIGNED_VERSION + struct.pack(">II", flags, _UNBOUND_KEY_LEN))
        mac.update(payload)
        return mac.digest()

    def serialize(self, key: str | bytes, value: Any) -> tuple[bytes, int]:
        encoded = _encode_scalar(key, value)
        if encoded is not None:
            return encoded
        payload = _pickle(key, value, self._protocol)
        tag = self._tag(self._signer, key, FLAG_SIGNED_PICKLE, payload)
        return b"".join((_SIGNED_VERSION, tag, payload)), FLAG_SIGNED_PICKLE

    def deserialize(self, key: str | bytes, value: bytes, flags: int) -> Any:
        if flags != FLAG_SIGNED_PICKLE:
            return _decode_plain(key, value, flags, "SignedPickleSerde")
        if len(value) < _SIGNED_HEADER_LEN or value[:1] != _SIGNED_VERSION:
            raise SerializationError(
                f"cannot deserialize key {key!r} with flags {flags}: signature mismatch "
                "(missing tag or unknown signed format); not unpickled"
            )
        view = memoryview(value)
        tag = view[1:_SIGNED_HEADER_LEN]
        payload = view[_SIGNED_HEADER_LEN:]
        for base in self._verifiers:
            if hmac.compare_digest(self._tag(base, key, flags, payload), tag):
                return _unpickle(key, payload, flags)
        raise SerializationError(
            f"cannot deserialize key {key!r} with flags {flags}: signature mismatch (written with "
            "another secret, for another key, or tampered with); not unpickled"
        )

    def __repr__(self) -> str:  # never show the secrets
        return (
            f"SignedPickleSerde(<secret>, old_secrets=<{len(self._verifiers) - 1}>, "
            f"protocol={self._protocol}, bind_key={self._bind_key})"
        )


def _check_int(value: Any, option: str, low: int, high: int | None = None) -> int:
    if type(value) is not int or value < low or (high is not None and value > high):
        bounds = f"from {low} to {high}" if high is not None else f">= {low}"
        raise ConfigurationError(f"{option} must be an int {bounds}, got {value!r}")
    return value


def _payload_bytes(key: Any, payload: Any) -> bytes:
    if isinstance(payload, str):
        return payload.encode("utf-8")
    if isinstance(payload, _BYTES_LIKE):
        return bytes(payload)
    raise SerializationError(
        f"the inner serde returned a {_type_name(payload)} payload for key {key!r}; expected bytes"
    )


class CompressedSerde:
    """Wraps a serde and zlib-compresses its payloads of ``min_size`` bytes or more.

    A compressed payload is kept only if it is smaller; then FLAG_COMPRESSED (8) is OR-ed into the
    flags, as pymemcache's ``compressed_serde`` does, so each reads the other's bytes/str/int items.
    Reads decompress anything with bit 8 set, then hand the inner serde the flags with bit 8 cleared.
    ``max_decompressed_size`` caps what one item may inflate to, so a small forged item cannot
    exhaust memory (a zlib bomb). ``inner`` may also be a pymemcache serde; a ``str`` payload from it
    (pymemcache returns ints as str) is encoded to bytes.

    Thread-safe if ``inner`` is; no state of its own after construction.
    """

    __slots__ = ("_inner", "_level", "_max_decompressed_size", "_min_size")

    def __init__(
        self,
        inner: Serde = default_serde,
        *,
        min_size: int = 400,
        level: int = zlib.Z_DEFAULT_COMPRESSION,
        max_decompressed_size: int = 64 * 1024 * 1024,
    ) -> None:
        if not isinstance(inner, Serde):
            raise ConfigurationError(
                f"inner must have serialize() and deserialize() methods, got {_type_name(inner)}"
            )
        self._inner = inner
        self._min_size = _check_int(min_size, "min_size", 0)
        self._level = _check_int(level, "level", -1, 9)
        self._max_decompressed_size = _check_int(max_decompressed_size, "max_decompressed_size", 1)

    def serialize(self, key: str | bytes, value: Any) -> tuple[bytes, int]:
        payload, flags = self._inner.serialize(key, value)
        if type(payload) is not bytes:
            payload = _payload_bytes(key, payload)
        if len(payload) >= self._min_size and not flags & FLAG_COMPRESSED:
            packed = zlib.compress(payload, self._level)
            if len(packed) < len(payload):
                return packed, flags | FLAG_COMPRESSED
        return payload, flags

    def deserialize(self, key: str | bytes, value: bytes, flags: int) -> Any:
        if flags & FLAG_COMPRESSED:
            value = self._decompress(key, value, flags)
            flags &= ~FLAG_COMPRESSED
        return self._inner.deserialize(key, value, flags)

    def _decompress(self, key: Any, value: bytes, flags: int) -> bytes:
        inflater = zlib.decompressobj()
        try:
            data = inflater.decompress(value, self._max_decompressed_size)
        except zlib.error as exc:
            raise SerializationError(
                f"cannot deserialize key {key!r} with flags {flags}: bad zlib data ({exc})"
            ) from exc
        if inflater.unconsumed_tail:
            raise SerializationError(
                f"cannot deserialize key {key!r} with flags {flags}: it inflates to more than "
                f"max_decompressed_size={self._max_decompressed_size} bytes"
            )
        if not inflater.eof:
            raise SerializationError(
                f"cannot deserialize key {key!r} with flags {flags}: truncated zlib data"
            )
        return data

    def __repr__(self) -> str:
        return (
            f"CompressedSerde({self._inner!r}, min_size={self._min_size}, level={self._level}, "
            f"max_decompressed_size={self._max_decompressed_size})"
        )
