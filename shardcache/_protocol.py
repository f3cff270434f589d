"""The memcached protocol, sans I/O: every request shardcache sends is encoded here, every reply is
parsed here, and nothing else in the package makes or reads protocol bytes.

No sockets and no clocks: an encoder turns checked arguments into bytes; a :class:`ReplyParser` is
fed whatever bytes arrived and hands back whole replies, in order. The executors (sync and async)
move the bytes; the router and the commands decide what to send. The same ``get`` is encoded and
parsed the same way whatever the node's health, warm-up window or I/O flavour.

Safety rules, enforced here because this is where bytes are made:

- **Keys** are checked once by :class:`KeyCodec` (str/bytes, no whitespace or control byte, at
  most 250 bytes with the prefix); encoders take only keys it produced.
- **Every number** that reaches the wire is range-checked (expire, flags, CAS, delta, initial,
  delay, memory limit, TTLs): memcached refuses an out-of-range number on a storage command line
  but does not consume the data block, so the value bytes would run as commands.
- **Replies are bounded**: a header line longer than ``MAX_LINE`` or a value longer than the
  configured ``max_value`` never grows a buffer without limit. A value over ``max_value`` (the
  item size limit) is skipped as it arrives and reported as :class:`Oversized`; a length no
  memcached can send, or anything malformed, raises :class:`~shardcache.errors.ProtocolError`
  (the connection must then be dropped).
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
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any, Final, NamedTuple

from shardcache.errors import ArgumentError, KeyValidationError, ProtocolError

__all__ = [
    "DEFAULT_MAX_VALUE",
    "MAX_KEY_LENGTH",
    "MAX_LINE",
    "NEED_DATA",
    "NOOP",
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
    "retrieve",
    "stats",
    "store",
    "touch",
    "version",
]

MAX_KEY_LENGTH: Final = 250
MAX_LINE: Final = 64 * 1024  # a reply header or STAT line; memcached's are far shorter
DEFAULT_MAX_VALUE: Final = 1024 * 1024  # memcached's default item size limit (-I 1m)
_HARD_MAX_VALUE: Final = 1024 * 1024 * 1024  # memcached refuses -I over 1 GiB: a larger length is garbage
_U32: Final = 2**32
_U64: Final = 2**64
_EXPIRE_MIN: Final = -(2**31)
_BAD_KEY_BYTE = re.compile(rb"[\x00-\x20\x7f]").search
_STAT_TOKEN = re.compile(rb"[\x21-\x7e]+").fullmatch

NOOP: Final = b"mn\r\n"


# -- keys -------------------------------------------------------------------------------------------


class KeyCodec:
    """Checks keys and turns them into ``(hashed key, wire key)``; immutable, thread-safe.

    ``prefix`` is prepended on the wire (and hashed only with ``hash_prefix``, as libmemcached);
    str keys are encoded as ASCII, or UTF-8 with ``allow_unicode``.
    """

    __slots__ = ("_encoding", "_hash_prefix", "prefix")

    def __init__(self, prefix: bytes = b"", *, hash_prefix: bool = False, allow_unicode: bool = False) -> None:
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
                return key.encode(self._encoding)  # type: ignore[union-attr]
            except UnicodeEncodeError:
                hint = ": pass allow_unicode_keys=True for UTF-8 keys" if self._encoding == "ascii" else ""
                raise KeyValidationError(f"key {key!r} is not {self._encoding}{hint}") from None
        if isinstance(key, bytes | bytearray | memoryview):
            return bytes(key)
        raise KeyValidationError(f"key must be str or bytes, got {type(key).__name__}: {key!r}")

    def wire(self, key: object) -> tuple[bytes, bytes]:
        """``(hashed key, key as sent)``; ``KeyValidationError`` naming the key if it is unsafe."""
        raw = self.raw(key)
        wire = self.prefix + raw if self.prefix else raw
        if not raw or len(wire) > MAX_KEY_LENGTH or _BAD_KEY_BYTE(wire):
            raise KeyValidationError(_key_problem(key, raw, wire))
        return (wire if self._hash_prefix else raw), wire

    def unprefixed(self, wire: bytes) -> bytes:
        """The hashed form of a wire key read back from a server (``lru_crawler metadump``)."""
        if self._hash_prefix or not self.prefix:
            return wire
        return wire[len(self.prefix) :]


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
    """Seconds (<= 30 days), or a Unix time; negative means already expired. -2**31..2**32-1:
    beyond that memcached's 32-bit clock wraps and the item would expire at an arbitrary time."""
    return _integer(value, name, _EXPIRE_MIN, _U32 - 1)


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
    """A flush_all delay in seconds, or a memory limit in megabytes: unsigned 32 bits."""
    return _integer(value, name, 0, _U32 - 1)


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
    if command not in _STORE_COMMANDS:
        raise ArgumentError(f"not a storage command: {command!r}")
    flags = check_flags(flags)
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


def retrieve(wires: Sequence[bytes], *, cas: bool = False, touch: int | None = None) -> bytes:
    """``get``/``gets`` of one or more keys, or ``gat``/``gats`` with a new expiry (``touch``)."""
    if not wires:
        raise ArgumentError("a retrieval needs at least one key")
    keys = b" ".join(wires)
    if touch is None:
        return (b"gets " if cas else b"get ") + keys + b"\r\n"
    return b"%b %d %b\r\n" % (b"gats" if cas else b"gat", check_expire(touch, "expire"), keys)


def delete(wire: bytes, *, noreply: bool = False) -> bytes:
    return b"delete " + wire + (b" noreply\r\n" if noreply else b"\r\n")


def incr_decr(wire: bytes, delta: object, *, decr: bool = False, noreply: bool = False) -> bytes:
    return b"%b %b %d%b\r\n" % (
        b"decr" if decr else b"incr", wire, check_delta(delta), b" noreply" if noreply else b""
    )


def touch(wire: bytes, expire: object, *, noreply: bool = False) -> bytes:
    return b"touch %b %d%b\r\n" % (wire, check_expire(expire), b" noreply" if noreply else b"")


def version() -> bytes:
    return b"version\r\n"


def stats(args: Iterable[object] = ()) -> bytes:
    """``stats [args]``: each argument must be one printable token (``"slabs"``, ``"items"``)."""
    tokens = []
    for arg in args:
        token = arg.encode("ascii", "replace") if isinstance(arg, str) else arg
        if not isinstance(token, bytes) or not _STAT_TOKEN(token) or len(token) > MAX_KEY_LENGTH:
            raise ArgumentError(f"stats argument must be one printable word, got {arg!r}")
        tokens.append(token)
    return b"stats" + b"".join(b" " + t for t in tokens) + b"\r\n"


def flush_all(delay: object = 0, *, noreply: bool = False) -> bytes:
    return b"flush_all %d%b\r\n" % (check_delay(delay), b" noreply" if noreply else b"")


def cache_memlimit(megabytes: object) -> bytes:
    return b"cache_memlimit %d\r\n" % check_delay(megabytes, "memlimit")


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
    out = [b"mg ", wire]
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
    try:
        mode_token = _MS_MODES[mode]
    except KeyError:
        raise ArgumentError(f"meta set mode must be one of {', '.join(_MS_MODES)}, got {mode!r}") from None
    head = b"ms %b %d F%d T%d%b" % (wire, len(data), check_flags(flags), check_expire(ttl, "ttl"), mode_token)
    if cas is not None:
        head += b" C%d" % check_cas(cas)
    if invalidate:
        head += b" I"
    if return_cas:
        head += b" c"
    return head + b"\r\n" + data + b"\r\n"


def meta_delete(wire: bytes, *, cas: int | None = None, invalidate: bool = False, ttl: int | None = None) -> bytes:
    """``md``: delete, only if the CAS matches (``C``); ``invalidate`` (``I``) marks it stale instead,
    with a new ``ttl`` (``T``)."""
    out = b"md " + wire
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
    out = b"ma %b v D%d" % (wire, check_delta(delta))
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


# -- replies ----------------------------------------------------------------------------------------


class Value(NamedTuple):
    """One item of a ``get``/``gets``/``gat``/``gats`` reply. ``cas`` is None without ``gets``."""

    key: bytes
    flags: int
    data: bytes
    cas: int | None


class Oversized(NamedTuple):
    """An item whose value was longer than the parser's ``max_value``: skipped, not buffered."""

    key: bytes
    size: int


class Meta(NamedTuple):
    """A meta-command reply: ``status`` (``HD``, ``VA``, ``EN``, ``NF``, ``NS``, ``EX``, ``MN``),
    its flags (``{b"c": b"123", b"W": b""}``), and the value for ``VA``."""

    status: bytes
    flags: dict[bytes, bytes]
    data: bytes | None


class ErrorReply(NamedTuple):
    """``ERROR``, ``CLIENT_ERROR ...``, ``SERVER_ERROR ...`` or another refusal line.

    ``fatal``: the connection can no longer be trusted (a command with a data block was refused,
    so the data may have been read as commands, or memcached did not know the command) and must
    be dropped after this reply.
    """

    kind: str
    message: str
    fatal: bool


class Expect:
    """What a request expects back; pass one to :meth:`ReplyParser.expect` per request sent."""

    VALUES: Final = 0  # get/gets/gat/gats: VALUE ... END -> list[Value | Oversized]
    STATUS: Final = 1  # storage, delete, touch: one status line -> bytes (b"STORED", ...)
    NUMBER: Final = 2  # incr/decr: int, or b"NOT_FOUND"
    META: Final = 3  # mg/ms/md/ma/mn -> Meta
    STATS: Final = 4  # STAT name value ... END -> dict[bytes, bytes]
    VERSION: Final = 5  # VERSION x -> bytes
    OK: Final = 6  # flush_all, cache_memlimit: b"OK"
    NOOP: Final = 7  # internal: everything up to MN after noreply commands; never returned


NEED_DATA: Final = object()  # next() has no complete reply yet: feed more bytes

_STATUS_LINES = frozenset(
    (b"STORED", b"NOT_STORED", b"EXISTS", b"NOT_FOUND", b"DELETED", b"TOUCHED")
)
_META_STATUSES = frozenset((b"HD", b"EN", b"NF", b"NS", b"EX", b"MN"))


class ReplyParser:
    """Incremental reply parser for one connection; not thread-safe (one connection, one user).

    Call :meth:`expect` once per request sent (in order), :meth:`feed` with the bytes received,
    and :meth:`next` until it returns :data:`NEED_DATA`. A malformed reply raises
    :class:`~shardcache.errors.ProtocolError`; the parser (and its connection) is then unusable.
    ``expect(kind, data_block=True)`` marks a text storage command: an error line in reply to it
    is fatal (see :class:`ErrorReply`).

    Memory is bounded: a value is buffered only up to ``max_value`` bytes (longer ones are
    discarded as they arrive and reported as :class:`Oversized`), a line only up to ``MAX_LINE``.
    """

    __slots__ = ("_buf", "_data", "_expect", "_head", "_items", "_max_value", "_need", "_node", "_pos",
                 "_ready", "_skip", "swallowed")  # fmt: skip

    def __init__(self, *, max_value: int = DEFAULT_MAX_VALUE, node_id: str = "") -> None:
        self._max_value = max_value
        self._node = node_id
        self._buf = b""
        self._pos = 0
        self._expect: deque[tuple[int, bool, Any]] = deque()
        self._items: list[Value | Oversized] = []  # a get reply being read
        # A value arriving across several feeds: (meta flags or None for get, key, flags, cas, size)
        self._head: tuple[dict[bytes, bytes] | None, bytes, int, int | None, int] | None = None
        self._data: list[bytes] = []
        self._need = 0  # bytes of that value still to come (its CRLF included)
        self._skip = 0  # bytes of an oversized value still to discard (its CRLF included)
        self._ready: Any = None  # a meta reply completed by feed()
        self.swallowed: list[ErrorReply] = []  # errors memcached sent despite noreply

    # -- feeding --------------------------------------------------------------------------------

    def expect(self, kind: int, data_block: bool = False, wanted: Any = None) -> None:
        """One more reply to read. ``wanted`` (VALUES): the key, or a container of the keys, that
        were asked for; a value for any other key means the stream is out of step (ProtocolError)."""
        self._expect.append((kind, data_block, wanted))

    @property
    def pending(self) -> int:
        """Replies expected and not yet returned (the ``mn`` after noreply commands included)."""
        return len(self._expect)

    def feed(self, data: bytes) -> None:
        """Bytes received from the connection (``b""`` means the server closed it)."""
        if not data:
            raise self._error("connection closed by the server")
        if self._skip:
            if len(data) < self._skip:
                self._skip -= len(data)
                return
            data = data[self._skip :]
            self._skip = 0
            self._end_value(None)
        elif self._need:
            if len(data) < self._need:
                self._data.append(data)
                self._need -= len(data)
                return
            self._data.append(data[: self._need])
            data = data[self._need :]
            self._need = 0
            self._end_value(b"".join(self._data))
            self._data = []
        if not data:
            return
        buf, pos = self._buf, self._pos
        self._buf = buf[pos:] + data if pos < len(buf) else data
        self._pos = 0

    # -- parsing --------------------------------------------------------------------------------

    def next(self) -> Any:
        """The next complete reply, or :data:`NEED_DATA`."""
        while True:
            if self._need or self._skip:
                return NEED_DATA
            if self._ready is not None:
                reply, self._ready = self._ready, None
                self._expect.popleft()
                return reply
            if not self._expect:
                if self._pos < len(self._buf):
                    raise self._error(f"unexpected bytes {self._buf[self._pos : self._pos + 40]!r}")
                return NEED_DATA
            kind, data_block, wanted = self._expect[0]
            start = self._pos
            if kind == 0:
                reply = self._values(wanted)
            elif kind == 7:
                reply = self._noop()
            else:
                line = self._line()
                reply = NEED_DATA if line is None else self._simple(kind, data_block, line)
            if reply is NEED_DATA:
                if kind == 4:
                    self._pos = start  # a partial stats reply is parsed again when complete
                return NEED_DATA
            if reply is _NOOP_DONE:
                self._expect.popleft()
                continue
            self._expect.popleft()
            return reply

    def _line(self) -> bytes | None:
        buf = self._buf
        end = buf.find(b"\r\n", self._pos)
        if end < 0:
            if len(buf) - self._pos > MAX_LINE:
                raise self._error(f"a reply line longer than {MAX_LINE} bytes")
            return None
        line = buf[self._pos : end]
        self._pos = end + 2
        return line

    def _simple(self, kind: int, data_block: bool, line: bytes) -> Any:
        if kind == 1:
            if line in _STATUS_LINES:
                return line
        elif kind == 2:
            digits = line.rstrip(b" ")  # some memcached versions pad decr replies with spaces
            if digits.isdigit():
                if len(digits) > 20 or int(digits) >= _U64:
                    raise self._error(f"counter value out of range {line[:32]!r}")
                return int(digits)
            if line == b"NOT_FOUND":
                return line
        elif kind == 3:
            return self._meta(line)
        elif kind == 4:
            return self._stats(line)
        elif kind == 5:
            if line.startswith(b"VERSION "):
                return line[8:]
        elif kind == 6 and line == b"OK":
            return line
        return self._refusal(line, data_block)

    def _refusal(self, line: bytes, data_block: bool) -> ErrorReply:
        """An error line in place of a reply, or ProtocolError if it is not one."""
        head, _, rest = line.partition(b" ")
        message = rest.decode("utf-8", "replace")
        if head == b"SERVER_ERROR":
            return ErrorReply("SERVER_ERROR", message, False)
        if head == b"CLIENT_ERROR":
            return ErrorReply("CLIENT_ERROR", message, data_block)
        if line == b"ERROR":
            return ErrorReply("ERROR", "unknown command", True)
        if head in (b"MEMLIMIT_TOO_SMALL", b"MEMLIMIT_ADJUST_FAILED"):
            return ErrorReply(head.decode(), message, False)
        raise self._error(f"unexpected reply {line[:40]!r}")

    def _values(self, wanted: Any) -> Any:
        items = self._items
        while True:
            line = self._line()
            if line is None:
                return NEED_DATA
            if line == b"END":
                self._items = []
                return items
            parts = line.split(b" ")
            if parts[0] != b"VALUE" or len(parts) not in (4, 5):
                if items:
                    raise self._error(f"unexpected line in a get reply {line[:40]!r}")
                return self._refusal(line, False)
            key, size, flags = parts[1], _number(parts[3]), _number(parts[2])
            cas = _number(parts[4]) if len(parts) == 5 else None
            if size is None or flags is None or flags >= _U32 or (len(parts) == 5 and cas is None):
                raise self._error(f"malformed value header {line[:60]!r}")
            if cas is not None and cas >= _U64:
                raise self._error(f"CAS unique out of range {line[:60]!r}")
            if wanted is not None and key != wanted and (type(wanted) is bytes or key not in wanted):
                raise self._error(f"a value for {key[:40]!r}, which was not asked for: out of step")
            value = self._value(None, key, flags, cas, size)
            if value is NEED_DATA:
                return NEED_DATA
            items.append(value)

    def _value(self, meta: dict[bytes, bytes] | None, key: bytes, flags: int, cas: int | None, size: int) -> Any:
        """The data of a value whose header was just read: the item, or NEED_DATA after arranging
        for feed() to collect (or skip) the rest as it arrives."""
        if size > _HARD_MAX_VALUE:
            raise self._error(f"value length {size} announced for {key[:40]!r}: no memcached sends that")
        buf, pos = self._buf, self._pos
        stop = pos + size
        if stop + 2 <= len(buf):
            if buf[stop : stop + 2] != b"\r\n":
                raise self._error(f"value of {key[:40]!r} not terminated by CRLF")
            self._pos = stop + 2
            if size > self._max_value:
                return Oversized(key, size)
            data = buf[pos:stop]
            return Value(key, flags, data, cas) if meta is None else Meta(b"VA", meta, data)
        rest = buf[pos:]
        self._buf, self._pos = b"", 0
        self._head = (meta, key, flags, cas, size)
        if size > self._max_value:
            self._skip = size + 2 - len(rest)
        else:
            self._data = [rest]
            self._need = size + 2 - len(rest)
        return NEED_DATA

    def _end_value(self, data: bytes | None) -> None:
        """The value collected by feed() is complete (``data`` ends with its CRLF; None: skipped)."""
        assert self._head is not None
        meta, key, flags, cas, size = self._head
        self._head = None
        if data is None:
            item: Any = Oversized(key, size)
        elif data[-2:] != b"\r\n":
            raise self._error(f"value of {key[:40]!r} not terminated by CRLF")
        else:
            item = Value(key, flags, data[:-2], cas) if meta is None else Meta(b"VA", meta, data[:-2])
        if meta is None:
            self._items.append(item)
        else:
            self._ready = item

    def _meta(self, line: bytes) -> Any:
        parts = line.split(b" ")
        status = parts[0]
        if status == b"VA":
            size = _number(parts[1]) if len(parts) > 1 else None
            if size is None:
                raise self._error(f"malformed meta value header {line[:60]!r}")
            flags = _meta_flags(parts[2:])
            return self._value(flags, flags.get(b"k", b""), 0, None, size)
        if status in _META_STATUSES:
            return Meta(status, _meta_flags(parts[1:]), None)
        return self._refusal(line, False)

    def _stats(self, line: bytes) -> Any:
        found: dict[bytes, bytes] = {}
        while True:
            if line == b"END":
                return found
            head, _, rest = line.partition(b" ")
            if head == b"STAT" or head == b"ITEM":
                name, _, value = rest.partition(b" ")
                found[name] = value
            elif not found:
                return self._refusal(line, False)
            else:
                raise self._error(f"unexpected line in a stats reply {line[:40]!r}")
            next_line = self._line()
            if next_line is None:
                return NEED_DATA
            line = next_line

    def _noop(self) -> Any:
        """Consume up to ``MN``; errors before it belong to noreply commands."""
        while True:
            line = self._line()
            if line is None:
                return NEED_DATA
            if line == b"MN":
                return _NOOP_DONE
            self.swallowed.append(self._refusal(line, True))

    def _error(self, message: str) -> ProtocolError:
        node = self._node or "memcached"
        return ProtocolError(f"memcached node {node}: {message}", self._node)


_NOOP_DONE: Final = object()


def _number(token: bytes) -> int | None:
    return int(token) if token.isdigit() and len(token) <= 20 else None


def _meta_flags(tokens: Sequence[bytes]) -> dict[bytes, bytes]:
    return {token[:1]: token[1:] for token in tokens if token}
