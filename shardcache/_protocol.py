"""The memcached protocol, sans I/O: every request shardcache sends is encoded here, every reply is
parsed here, and nothing else in the package makes or reads protocol bytes.

No sockets and no clocks: an encoder turns checked arguments into bytes; a :class:`ReplyParser` is
fed whatever bytes arrived and hands back whole replies, in order. The executors (sync and async)
move the bytes; the router and the commands decide what to send. The same ``get`` is encoded and
parsed the same way whatever the node's health, warm-up window or I/O flavour.

Safety rules, enforced here because this is where bytes are made:

- **Keys** are checked by :class:`KeyCodec` (str/bytes, no whitespace or control byte, at most
  250 bytes with the prefix); encoders check the wire key again (a cheap scan), so no caller can
  smuggle a second command into a request line.
- **Every number** that reaches the wire is range-checked (expire, flags, CAS, delta, initial,
  delay, memory limit, TTLs): memcached (1.6.18) truncates an out-of-range expire or flags to 32
  bits without a word (an expire of 2**31 becomes negative: the item is gone at once), and a
  number it does refuse on a storage command line leaves the data block to run as commands.
- **Replies are bounded** (the parser lives in :mod:`shardcache._replies`, re-exported here): a
  header line longer than ``MAX_LINE`` or a value longer than the configured ``max_value`` never
  grows a buffer without limit. A value over ``max_value`` (the item size limit) is skipped as
  it arrives and reported as :class:`Oversized`; a length no memcached can send, or anything
  malformed, raises :class:`~shardcache.errors.ProtocolError` (the connection must then be dropped).
- **Staying in step**: after ``noreply`` commands the encoder's caller appends ``mn``
  (:data:`NOOP`); the parser consumes everything up to its ``MN`` (including any error memcached
  sends despite ``noreply``), so a later reply is never read as an earlier one's.

Why requests no longer go through pymemcache's parser: it reads from a socket (no incremental,
sans-I/O use, so an asyncio client could not share it), it allocates whatever length a server
announces, and a reply for another key or a missing field escapes as ``KeyError``/``ValueError``.
pymemcache still serves users where it is the standard: our exceptions subclass its exceptions, the
default serde is flag-compatible with its serde, its stats conversions are reused, and its own
test suite runs against ``shardcache.Client``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any, Final

from shardcache._replies import (
    DEFAULT_MAX_VALUE,
    MAX_LINE,
    NEED_DATA,
    DumpEntry,
    ErrorReply,
    Expect,
    Meta,
    Oversized,
    ReplyParser,
    Value,
)
from shardcache.errors import ArgumentError, KeyValidationError

__all__ = [
    "DEFAULT_MAX_VALUE",
    "MAX_KEY_LENGTH",
    "MAX_LINE",
    "NEED_DATA",
    "NOOP",
    "DumpEntry",
    "ErrorReply",
    "Expect",
    "KeyCodec",
    "Meta",
    "Oversized",
    "ReplyParser",
    "Value",
    "cache_memlimit",
    "check_cas",
    "check_delay",
    "check_delta",
    "check_expire",
    "check_flags",
    "delete",
    "flush_all",
    "incr_decr",
    "meta_arithmetic",
    "meta_delete",
    "meta_get",
    "meta_set",
    "metadump",
    "retrieve",
    "stats",
    "store",
    "store_many",
    "touch",
    "version",
]

MAX_KEY_LENGTH: Final = 250
# Keys shardcache itself keeps on the nodes (fleet fencing's outage marks and journals): never a
# stray for rebalance(); applications must not use keys that start with it.
RESERVED_PREFIX: Final = b"shardcache.fleet."
_U32: Final = 2**32
_U64: Final = 2**64
_I32_MIN: Final = -(2**31)
_I32_MAX: Final = 2**31 - 1
_BAD_KEY_BYTE = re.compile(rb"[\x00-\x20\x7f]").search
_BAD_NON_SPACE = re.compile(rb"[\x00-\x1f\x7f]").search
_ONLY_BYTES: Final = {bytes}
_ONLY_STR: Final = {str}
_ONLY_INT: Final = {int}
_STAT_TOKEN = re.compile(rb"[\x21-\x7e]+").fullmatch

NOOP: Final = b"mn\r\n"


# -- keys -------------------------------------------------------------------------------------------


class KeyCodec:
    """Checks keys and turns them into ``(hashed key, wire key)``; immutable, thread-safe.

    ``prefix`` is prepended on the wire (and hashed only with ``hash_prefix``, as libmemcached);
    str keys are encoded as ASCII, or UTF-8 with ``allow_unicode``.
    """

    __slots__ = ("_encoding", "_hash_prefix", "prefix")

    def __init__(
        self, prefix: bytes = b"", *, hash_prefix: bool = False, allow_unicode: bool = False
    ) -> None:
        if type(prefix) is not bytes:
            if not isinstance(prefix, bytearray | memoryview):
                raise ArgumentError(f"key prefix must be bytes, got {type(prefix).__name__}: {prefix!r}")
            prefix = memoryview(prefix).tobytes()  # a bytearray prefix would make bytearray wire keys
        if len(prefix) >= MAX_KEY_LENGTH or _BAD_KEY_BYTE(prefix):
            raise ArgumentError(f"key prefix {prefix!r}: no whitespace or control characters, < 250 bytes")
        self.prefix = prefix
        self._hash_prefix = hash_prefix
        self._encoding = "utf-8" if allow_unicode else "ascii"

    def raw(self, key: object) -> bytes:
        """``key`` as bytes (without the prefix); ``KeyValidationError`` for a key of the wrong type
        or encoding. bytearray and memoryview keys are copied to bytes."""
        if type(key) is str or isinstance(key, str):
            try:
                return key.encode(self._encoding)
            except UnicodeEncodeError:
                hint = ": pass allow_unicode_keys=True for UTF-8 keys" if self._encoding == "ascii" else ""
                raise KeyValidationError(f"key {key!r} is not {self._encoding}{hint}") from None
        if isinstance(key, bytes | bytearray | memoryview):
            return bytes(key)
        raise KeyValidationError(f"key must be str or bytes, got {type(key).__name__}: {key!r}")

    def wire(self, key: object) -> tuple[bytes, bytes]:
        """``(hashed key, key as sent)``; ``KeyValidationError`` naming the key if it is unsafe."""
        # The common case, an ASCII str, without a call to raw() and without the regex scan: an
        # ASCII str is printable and has no space exactly when it has no byte _BAD_KEY_BYTE finds
        # (the prefix was checked when the codec was made).
        if type(key) is str and key.isascii():
            raw, clean = key.encode(), key.isprintable() and " " not in key
        else:
            raw, clean = self.raw(key), False
        wire = self.prefix + raw if self.prefix else raw
        if not raw or len(wire) > MAX_KEY_LENGTH or (not clean and _BAD_KEY_BYTE(wire)):
            raise KeyValidationError(_key_problem(key, raw, wire))
        return (wire if self._hash_prefix else raw), wire

    def wire_many(self, keys: Iterable[Any]) -> list[tuple[Any, bytes, bytes]]:
        """``(key, hashed key, wire key)`` of each key, checked as :meth:`wire` does, in one call
        (the loop of a batch); a bytearray or memoryview key becomes bytes (a dict key)."""
        if type(keys) is list or type(keys) is tuple:
            usual = self._wire_ascii(keys)
            if usual is not None:
                return usual
        prefix, hash_prefix, out = self.prefix, self._hash_prefix, []
        key: Any
        for given in keys:
            if type(given) is str and given.isascii():
                key, raw = given, given.encode("ascii")
            else:
                key = bytes(given) if isinstance(given, bytearray | memoryview) else given
                raw = self.raw(key)
            wire = prefix + raw if prefix else raw
            if not raw or len(wire) > MAX_KEY_LENGTH:
                raise KeyValidationError(_key_problem(key, raw, wire))
            out.append((key, wire if hash_prefix else raw, wire))
        # one scan of all the keys together (a bad byte shows wherever it is); then the bad key
        if _BAD_KEY_BYTE(b"".join([wire for _, _, wire in out])):
            key, _, wire = next(item for item in out if _BAD_KEY_BYTE(item[2]))
            raise KeyValidationError(_key_problem(key, wire, wire))
        return out

    def _wire_ascii(self, keys: list[Any] | tuple[Any, ...]) -> list[tuple[Any, bytes, bytes]] | None:
        """:meth:`wire_many` of the usual batch, ASCII str keys that are all fine, in loops that run
        in C; None for anything else (its loop then checks key by key and names a bad one)."""
        if not keys or set(map(type, keys)) != _ONLY_STR or not "".join(keys).isascii():
            return None
        raws = list(map(str.encode, keys))
        wires = list(map(self.prefix.__add__, raws)) if self.prefix else raws
        if min(map(len, raws)) == 0 or max(map(len, wires)) > MAX_KEY_LENGTH:
            return None
        if _BAD_KEY_BYTE(b"".join(wires)):
            return None
        return list(zip(keys, wires if self._hash_prefix else raws, wires, strict=True))

    def unprefixed(self, wire: bytes) -> bytes:
        """The hashed form of a wire key read back from a server (``lru_crawler metadump``)."""
        if self._hash_prefix or not self.prefix:
            return wire
        return wire[len(self.prefix) :]


def valid_wire(wire: bytes) -> bool:
    """True if ``wire`` can be sent as a key (no space, control byte or DEL; 1-250 bytes)."""
    return 0 < len(wire) <= MAX_KEY_LENGTH and not _BAD_KEY_BYTE(wire)


def _checked_wire(wire: object) -> bytes:
    """A wire key as :meth:`KeyCodec.wire` makes them, or ``KeyValidationError``."""
    if type(wire) is not bytes or not wire or len(wire) > MAX_KEY_LENGTH or _BAD_KEY_BYTE(wire):
        if type(wire) is not bytes:
            raise KeyValidationError(f"wire key must be bytes, got {type(wire).__name__}: {wire!r}")
        raise KeyValidationError(_key_problem(wire, wire, wire))
    return wire


def _data_block(data: object) -> bytes:
    """A value as bytes: its length on the command line must be the length of what follows."""
    if type(data) is bytes:
        return data
    if isinstance(data, bytearray | memoryview):
        return memoryview(data).tobytes()
    raise ArgumentError(f"a value must be bytes, got {type(data).__name__}")


def _key_problem(key: object, raw: bytes, wire: bytes) -> str:
    if not raw:
        return f"key {key!r} is empty"
    if len(wire) > MAX_KEY_LENGTH:
        return f"key {key!r} is {len(wire)} bytes with its prefix; memcached allows {MAX_KEY_LENGTH}"
    return f"key {key!r} contains whitespace or a control character, which memcached cannot take"


# -- numbers ----------------------------------------------------------------------------------------


def _integer(value: object, name: str, low: int, high: int) -> int:
    if type(value) is not int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ArgumentError(f"{name} must be an int, got {type(value).__name__}: {value!r}")
        value = int(value)
    if not low <= value <= high:
        raise ArgumentError(f"{name}={value!r} is out of range {low}..{high}")
    return value


def check_expire(value: object, name: str = "expire") -> int:
    """Seconds (<= 30 days), or a Unix time; negative means already expired. -2**31..2**31-1:
    memcached parses it as a signed 32-bit number and silently wraps anything larger (2**31 and
    up become negative, so the item would expire at once)."""
    return _integer(value, name, _I32_MIN, _I32_MAX)


def check_flags(value: object) -> int:
    """Client flags: 32 bits."""
    return _integer(value, "flags", 0, _U32 - 1)


def check_cas(value: object) -> int:
    """A CAS unique: 64 bits. Bytes or str of digits (as ``gets`` returns them) are accepted."""
    if isinstance(value, bytes | str) and not isinstance(value, bool):
        text = value.encode("ascii", "replace") if isinstance(value, str) else bytes(value)
        if not text.isdigit() or len(text) > 20:
            raise ArgumentError(f"cas must be a token from gets (digits), got {value!r}")
        value = int(text)
    return _integer(value, "cas", 0, _U64 - 1)


def check_delta(value: object, name: str = "delta") -> int:
    """An incr/decr delta or an initial counter value: unsigned 64 bits."""
    return _integer(value, name, 0, _U64 - 1)


def check_delay(value: object, name: str = "delay") -> int:
    """A flush_all delay: 0..2**31-1 (memcached parses it as a signed 32-bit number and wraps a
    larger one to a negative delay, which flushes at once). Like an expire, a delay over 30 days
    (2592000) is read by memcached as a Unix time, so one in the past also flushes at once."""
    return _integer(value, name, 0, _I32_MAX)


# -- encoders: the classic text protocol ------------------------------------------------------------

_STORE_COMMANDS = frozenset((b"set", b"add", b"replace", b"append", b"prepend", b"cas"))


def store(
    command: bytes,
    wire: bytes,
    data: bytes,
    flags: int,
    expire: int,
    *,
    noreply: bool = False,
    cas: int | None = None,
) -> bytes:
    """``set``/``add``/``replace``/``append``/``prepend``/``cas`` of one item; numbers are checked."""
    if type(command) is not bytes or command not in _STORE_COMMANDS:
        raise ArgumentError(f"not a storage command: {command!r}")
    # each check inline for the common, valid case; the check_* functions raise, naming the value
    if type(wire) is not bytes or not 0 < len(wire) <= MAX_KEY_LENGTH or _BAD_KEY_BYTE(wire):
        wire = _checked_wire(wire)
    if type(data) is not bytes:
        data = _data_block(data)
    if type(flags) is not int or not 0 <= flags < _U32:
        flags = check_flags(flags)
    if type(expire) is not int or not _I32_MIN <= expire <= _I32_MAX:
        expire = check_expire(expire)
    if command == b"cas":
        if cas is None:
            raise ArgumentError("cas needs a CAS unique")
        tail = b" %d" % check_cas(cas)
    else:
        tail = b""
    if noreply:
        tail += b" noreply"
    return b"%b %b %d %d %d%b\r\n%b\r\n" % (command, wire, flags, expire, len(data), tail, data)


def store_many(
    command: bytes, items: Sequence[tuple[bytes, bytes, int]], expire: int, *, noreply: bool = False
) -> list[bytes]:
    """:func:`store` of each ``(wire, data, flags)`` (not ``cas``), the checks made once for the
    batch where they can be (one scan of all the keys, as :func:`retrieve` does); if anything is
    off, item by item with :func:`store`, which raises naming the bad one."""
    if command == b"cas" or not items:
        return [store(command, w, d, f, expire, noreply=noreply) for w, d, f in items]
    wires, datas, flags = zip(*items, strict=True)
    try:
        well_formed = (
            set(map(type, wires)) == _ONLY_BYTES
            and set(map(type, datas)) == _ONLY_BYTES
            and set(map(type, flags)) == _ONLY_INT
            and min(map(len, wires)) > 0
            and max(map(len, wires)) <= MAX_KEY_LENGTH
            and min(flags) >= 0
            and max(flags) < _U32
            and not _BAD_KEY_BYTE(b"".join(wires))
        )
    except TypeError:
        well_formed = False
    if not well_formed or type(command) is not bytes or command not in _STORE_COMMANDS:
        return [store(command, w, d, f, expire, noreply=noreply) for w, d, f in items]
    if type(expire) is not int or not _I32_MIN <= expire <= _I32_MAX:
        expire = check_expire(expire)
    line = b"%b %%b %%d %d %%d%b\r\n%%b\r\n" % (command, expire, b" noreply" if noreply else b"")
    return [line % (w, f, len(d), d) for w, d, f in items]


def retrieve_one(wire: bytes, cas: bool = False) -> bytes:
    """``get``/``gets`` of one key: the common case, one check and one concatenation."""
    if type(wire) is not bytes or not 0 < len(wire) <= MAX_KEY_LENGTH or _BAD_KEY_BYTE(wire):
        wire = _checked_wire(wire)  # raises, naming the problem
    return (b"gets " if cas else b"get ") + wire + b"\r\n"


def retrieve(wires: Sequence[bytes], *, cas: bool = False, touch: int | None = None) -> bytes:
    """``get``/``gets`` of one or more keys, or ``gat``/``gats`` with a new expiry (``touch``)."""
    if not wires:
        raise ArgumentError("a retrieval needs at least one key")
    if touch is None and len(wires) == 1:
        return retrieve_one(wires[0], cas)
    # One scan of the whole line instead of one per key: only bytes, no control byte anywhere,
    # exactly the separating spaces (an empty key or a key with a space changes the count), every
    # length in range (map, min and max loop in C); else key by key, which names the bad one.
    try:
        keys = b" ".join(wires)
        well_formed = (
            set(map(type, wires)) == _ONLY_BYTES
            and min(map(len, wires)) > 0
            and max(map(len, wires)) <= MAX_KEY_LENGTH
            and keys.count(b" ") == len(wires) - 1
            and not _BAD_NON_SPACE(keys)
        )
    except TypeError:
        well_formed = False
    if not well_formed:
        keys = b" ".join([_checked_wire(wire) for wire in wires])
    if touch is None:
        return (b"gets " if cas else b"get ") + keys + b"\r\n"
    return b"%b %d %b\r\n" % (b"gats" if cas else b"gat", check_expire(touch, "expire"), keys)


def delete(wire: bytes, *, noreply: bool = False) -> bytes:
    return b"delete " + _checked_wire(wire) + (b" noreply\r\n" if noreply else b"\r\n")


def incr_decr(wire: bytes, delta: object, *, decr: bool = False, noreply: bool = False) -> bytes:
    return b"%b %b %d%b\r\n" % (
        b"decr" if decr else b"incr",
        _checked_wire(wire),
        check_delta(delta),
        b" noreply" if noreply else b"",
    )


def touch(wire: bytes, expire: object, *, noreply: bool = False) -> bytes:
    return b"touch %b %d%b\r\n" % (_checked_wire(wire), check_expire(expire), b" noreply" if noreply else b"")


def version() -> bytes:
    return b"version\r\n"


def stats(args: Iterable[object] = ()) -> bytes:
    """``stats [args]``: each argument must be one printable token (``"slabs"``, ``"items"``)."""
    tokens = []
    for arg in args:
        token = arg.encode("utf-8", "surrogatepass") if isinstance(arg, str) else arg  # non-ASCII fails
        if type(token) is not bytes or not _STAT_TOKEN(token) or len(token) > MAX_KEY_LENGTH:
            raise ArgumentError(f"stats argument must be one printable word, got {arg!r}")
        tokens.append(token)
    return b"stats" + b"".join(b" " + t for t in tokens) + b"\r\n"


def metadump(classes: Iterable[int] | None = None) -> bytes:
    """``lru_crawler metadump``: every item (``classes`` None), or those of some slab classes
    (1..63, as ``stats items`` names them). Its reply: ``Expect.DUMP``."""
    if classes is None:
        return b"lru_crawler metadump all\r\n"
    ids = [_integer(c, "slab class", 1, 63) for c in classes]
    if not ids:
        raise ArgumentError("metadump needs at least one slab class (or None for all)")
    return b"lru_crawler metadump %b\r\n" % b",".join(b"%d" % i for i in ids)


def flush_all(delay: object = 0, *, noreply: bool = False) -> bytes:
    return b"flush_all %d%b\r\n" % (check_delay(delay), b" noreply" if noreply else b"")


def cache_memlimit(megabytes: object) -> bytes:
    """``cache_memlimit``: megabytes, unsigned 32 bits (memcached refuses over 1,000,000 itself)."""
    return b"cache_memlimit %d\r\n" % _integer(megabytes, "memlimit", 0, _U32 - 1)


# -- encoders: the meta protocol (memcached >= 1.6) ---------------------------------------------------


def meta_get(
    wire: bytes,
    *,
    value: bool = True,
    cas: bool = False,
    flags: bool = False,
    ttl: bool = False,
    key: bool = False,
    vivify: int | None = None,
    recache: int | None = None,
    new_ttl: int | None = None,
) -> bytes:
    """``mg``: return the value (``v``), CAS (``c``), client flags (``f``), remaining TTL (``t``),
    key (``k``); ``vivify`` (``N``: create an empty item on a miss, win flag), ``recache`` (``R``),
    ``new_ttl`` (``T``: touch)."""
    out = [b"mg ", _checked_wire(wire)]
    for on, token in ((value, b" v"), (cas, b" c"), (flags, b" f"), (ttl, b" t"), (key, b" k")):
        if on:
            out.append(token)
    for number, letter in ((vivify, b"N"), (recache, b"R"), (new_ttl, b"T")):
        if number is not None:
            out.append(b" %b%d" % (letter, check_expire(number, "ttl")))
    out.append(b"\r\n")
    return b"".join(out)


_MS_MODES = {"set": b"", "add": b" ME", "replace": b" MR", "append": b" MA", "prepend": b" MP"}


def meta_set(
    wire: bytes,
    data: bytes,
    *,
    flags: int = 0,
    ttl: int = 0,
    mode: str = "set",
    cas: int | None = None,
    invalidate: bool = False,
    return_cas: bool = False,
) -> bytes:
    """``ms`` in ``mode`` (set/add/replace/append/prepend), compare-and-set with ``cas`` (``C``),
    ``invalidate`` (``I``: with ``cas``, store as stale if the item's CAS is newer), ``return_cas``
    (``c``). memcached discards the data block of a refused ``ms``, so it never runs as a command."""
    mode_token = _MS_MODES.get(mode) if type(mode) is str else None
    if mode_token is None:
        raise ArgumentError(f"meta set mode must be one of {', '.join(_MS_MODES)}, got {mode!r}")
    wire, data = _checked_wire(wire), _data_block(data)
    head = b"ms %b %d F%d T%d%b" % (wire, len(data), check_flags(flags), check_expire(ttl, "ttl"), mode_token)
    if cas is not None:
        head += b" C%d" % check_cas(cas)
    if invalidate:
        head += b" I"
    if return_cas:
        head += b" c"
    return head + b"\r\n" + data + b"\r\n"


def meta_delete(
    wire: bytes, *, cas: int | None = None, invalidate: bool = False, ttl: int | None = None
) -> bytes:
    """``md``: delete, only if the CAS matches (``C``); ``invalidate`` (``I``) marks it stale instead,
    with a new ``ttl`` (``T``)."""
    out = b"md " + _checked_wire(wire)
    if cas is not None:
        out += b" C%d" % check_cas(cas)
    if invalidate:
        out += b" I"
    if ttl is not None:
        out += b" T%d" % check_expire(ttl, "ttl")
    return out + b"\r\n"


def meta_arithmetic(
    wire: bytes,
    delta: object,
    *,
    decr: bool = False,
    initial: object = None,
    vivify_ttl: object = None,
    ttl: object = None,
) -> bytes:
    """``ma`` returning the new value: ``D`` delta, ``MD`` to decrement; with ``initial`` and
    ``vivify_ttl`` an absent counter is created at ``initial`` (``N``/``J``) in the same round trip."""
    out = b"ma %b v D%d" % (_checked_wire(wire), check_delta(delta))
    if decr:
        out += b" MD"
    if initial is not None:
        out += b" N%d J%d" % (
            check_expire(0 if vivify_ttl is None else vivify_ttl, "expire"),
            check_delta(initial, "initial"),
        )
    if ttl is not None:
        out += b" T%d" % check_expire(ttl, "expire")
    return out + b"\r\n"
