"""memcached replies, sans I/O: the reply types and the incremental :class:`ReplyParser`.

Split from :mod:`shardcache._protocol` (which re-exports every name here) so that encoding and
parsing each fit in one module; see that module's docstring for the safety rules both follow.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from itertools import islice, repeat
from operator import itemgetter
from typing import Any, Final

from shardcache._reply_items import (
    ONE_CAS_VALUE,
    ONE_VALUE,
    DumpEntry,
    ErrorReply,
    Meta,
    Oversized,
    Value,
    dump_entry,
    error_reply,
    parse_values,
    value_header,
)
from shardcache.errors import ArgumentError, ProtocolError

__all__ = [
    "DEFAULT_MAX_VALUE",
    "MAX_DUMP",
    "MAX_LINE",
    "NEED_DATA",
    "DumpEntry",
    "ErrorReply",
    "Expect",
    "Meta",
    "Oversized",
    "ReplyParser",
    "Value",
]

MAX_LINE: Final = 64 * 1024  # a reply header or STAT line; memcached's are far shorter
MAX_DUMP: Final = 256 * 1024 * 1024  # an lru_crawler metadump reply (~100 bytes per item)
DEFAULT_MAX_VALUE: Final = 1024 * 1024  # memcached's default item size limit (-I 1m)
_HARD_MAX_VALUE: Final = 1024 * 1024 * 1024  # memcached refuses -I over 1 GiB: a larger length is garbage
_U32: Final = 2**32
_U64: Final = 2**64
_first, _second = itemgetter(0), itemgetter(1)
_COPY_WHOLE_BUFFER: Final = 256 * 1024  # a whole get reply is parsed from one copy of the buffer up to this
_new_tuple = tuple.__new__  # a NamedTuple without its Python-level __new__ (a hot path's frame)


# -- replies ----------------------------------------------------------------------------------------


class Expect:
    """What a request expects back; pass one to :meth:`ReplyParser.expect` per request sent."""

    VALUES: Final = 0  # get/gat (gets/gats: CAS_VALUES): VALUE ... END -> list[Value | Oversized]
    STATUS: Final = 1  # storage, delete, touch: one status line -> bytes (b"STORED", ...)
    NUMBER: Final = 2  # incr/decr: int, or b"NOT_FOUND"
    META: Final = 3  # mg/ms/md/ma/mn -> Meta
    STATS: Final = 4  # STAT name value ... END -> dict[bytes, bytes]
    VERSION: Final = 5  # VERSION x -> bytes
    OK: Final = 6  # flush_all, cache_memlimit: b"OK"
    NOOP: Final = 7  # internal: everything up to MN after noreply commands; never returned
    CAS_VALUES: Final = 8  # gets/gats: as VALUES, and an item without its CAS is a ProtocolError
    DUMP: Final = 9  # lru_crawler metadump: LF-terminated "key=... cas=..." lines, END -> list[DumpEntry]


_VALUES, _STATUS, _CAS_VALUES = Expect.VALUES, Expect.STATUS, Expect.CAS_VALUES  # hot paths: no class lookup
_KINDS: Final = frozenset(v for k, v in vars(Expect).items() if k.isupper())
NEED_DATA: Final = object()  # next() has no complete reply yet: feed more bytes

_STATUS_LINES = frozenset((b"STORED", b"NOT_STORED", b"EXISTS", b"NOT_FOUND", b"DELETED", b"TOUCHED"))
_STATUS_REPLIES: Final = {line + b"\r\n": line for line in _STATUS_LINES}
_STORED, _STORED_CRLF, _ONLY_STATUS = b"STORED", b"STORED\r\n", {_STATUS}
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

    __slots__ = ("_buf", "_data", "_expect", "_found", "_head", "_items", "_max_value", "_need", "_node",
                 "_pos", "_ready", "_scan", "_skip", "swallowed")  # fmt: skip

    def __init__(self, *, max_value: int = DEFAULT_MAX_VALUE, node_id: str = "") -> None:
        if type(max_value) is not int or not 0 <= max_value <= _HARD_MAX_VALUE:
            raise ArgumentError(f"max_value={max_value!r}: an int of bytes, 0..{_HARD_MAX_VALUE}")
        self._max_value = max_value
        self._node = node_id
        self._buf = bytearray()  # received and not yet parsed from _pos on; grows by appending
        self._pos = 0
        self._scan = 0  # no CRLF in _buf[_pos:_scan]: where the search for the next line resumes
        self._expect: deque[tuple[int, bool, Any]] = deque()
        self._items: list[Value | Oversized] = []  # a get reply being read
        self._found: dict[bytes, bytes] = {}  # a stats reply being read
        # A value arriving across several feeds: (meta flags or None for get, key, flags, cas, size)
        self._head: tuple[dict[bytes, bytes] | None, bytes, int, int | None, int] | None = None
        self._data: list[bytes] = []
        self._need = 0  # bytes of that value still to come (its CRLF included)
        self._skip = 0  # bytes of an oversized value still to discard (then _need collects its CRLF)
        self._ready: Any = None  # a meta reply completed by feed()
        self.swallowed: list[ErrorReply] = []  # errors memcached sent despite noreply

    # -- feeding --------------------------------------------------------------------------------

    def expect(self, kind: int, data_block: bool = False, wanted: Any = None) -> None:
        """One more reply to read. ``wanted`` (VALUES): the key, or a container of the keys, that
        were asked for; a value for any other key means the stream is out of step (ProtocolError)."""
        if kind not in _KINDS:
            raise ArgumentError(f"not an Expect kind: {kind!r}")
        self._expect.append((kind, data_block, wanted))

    def expect_many(self, expects: Iterable[tuple[int, bool] | tuple[int, bool, Any]]) -> None:
        """:meth:`expect` for each of ``expects`` (``(kind, data_block[, wanted])``), in order."""
        expects = list(expects)
        if not _KINDS.issuperset(map(_first, expects)):
            bad = next(e[0] for e in expects if e[0] not in _KINDS)
            raise ArgumentError(f"not an Expect kind: {bad!r}")
        sizes = set(map(len, expects))
        if sizes == {2}:  # (kind, data_block): the usual pipeline; zip and map loop in C
            self._expect.extend(zip(map(_first, expects), map(_second, expects), repeat(None)))
        else:
            self._expect.extend((e[0], e[1], e[2] if len(e) > 2 else None) for e in expects)

    @property
    def buffered(self) -> bool:
        """True if anything received is not consumed yet (a reply may be complete without reading)."""
        return self._pos < len(self._buf) or self._ready is not None or bool(self._need or self._skip)

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
            self._skip = 0  # _need is still 2: the CRLF after the discarded bytes
        if self._need:
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
        if pos and pos * 2 >= len(buf):  # drop what was parsed once it is most of the buffer
            del buf[:pos]
            self._pos, self._scan = 0, max(self._scan - pos, 0)
        buf += data

    def whole(self, kind: int, data: bytes, wanted: Any) -> Any:
        """The reply to a single request (``kind``, ``wanted`` as for :meth:`expect`) when it
        arrived whole in ``data`` and nothing else is pending or buffered: parsed at once, without
        ``expect``/``feed``/``next``. Only a status line or a get/gets reply (``wanted``: the key,
        or a container of the keys); None (nothing consumed, the parser untouched) for anything
        else: the caller then expects and feeds the usual way, whose checks read or refuse it."""
        if self._expect or self._pos < len(self._buf) or self._ready is not None or self._need or self._skip:
            return None
        if kind == _STATUS:
            return _STATUS_REPLIES.get(data)
        if kind not in (_VALUES, _CAS_VALUES) or wanted is None:
            return None
        if type(wanted) is not bytes:  # a get of several keys: the reply must be all of data
            if not data.endswith(b"END\r\n"):
                return None
            found = parse_values(data, wanted, kind == _CAS_VALUES, self._max_value)
            return found[0] if found is not None and found[1] == len(data) else None
        # one key: not parse_values, whose loop costs a get ~15% more instructions (callgrind)
        if data == b"END\r\n":
            return []
        with_cas = kind == _CAS_VALUES
        match = (ONE_CAS_VALUE if with_cas else ONE_VALUE)(data)
        if match is None or match[1] != wanted:
            return None
        flags, size = match[2], match[3]
        cas = int(match[4]) if with_cas else None
        start = match.end(4 if with_cas else 3) + 2
        number, length = 0 if flags == b"0" else int(flags), int(size)
        if number >= _U32 or length > self._max_value or start + length + 7 != len(data):
            return None
        if cas is not None and cas >= _U64:
            return None
        return [_new_tuple(Value, (wanted, number, data[start : start + length], cas))]

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
                    raise self._error(f"unexpected bytes {bytes(self._buf[self._pos : self._pos + 40])!r}")
                return NEED_DATA
            kind, data_block, wanted = self._expect[0]
            if kind == Expect.VALUES and not self._items and self._buf.endswith(b"END\r\n"):
                # a whole get reply, most likely: the fast path, without _values' line-by-line loop
                reply = self._whole_values(wanted, False)
                if reply is None:
                    reply = self._values(wanted, False)
            elif kind in (Expect.VALUES, Expect.CAS_VALUES):
                reply = self._values(wanted, kind == Expect.CAS_VALUES)
            elif kind == Expect.NOOP:
                reply = self._noop()
            elif kind == Expect.DUMP:
                reply = self._dump()
            else:
                line = self._line()
                reply = NEED_DATA if line is None else self._simple(kind, data_block, line)
            if reply is NEED_DATA:
                return NEED_DATA
            if reply is _NOOP_DONE:
                self._expect.popleft()
                continue
            self._expect.popleft()
            return reply

    def next_many(self, limit: int) -> list[Any]:
        """Up to ``limit`` complete replies, fewer if the rest has not arrived: :meth:`next` in a
        loop, with the usual status lines (the replies of a pipelined ``set_many``) read in place."""
        out: list[Any] = []
        expect, buf = self._expect, self._buf
        if limit > 1 and not (self._need or self._skip or self._ready is not None):
            count = _stored_run(buf, self._pos, expect, limit)
            if count:
                self._pos = self._scan = self._pos + 8 * count
                for _ in range(count):
                    expect.popleft()
                out = [_STORED] * count
        while len(out) < limit:
            if (
                expect
                and expect[0][0] == _STATUS
                and not (self._need or self._skip or self._ready is not None)
            ):
                pos = self._pos
                end = buf.find(b"\r\n", pos)
                if 0 < end - pos <= 10:  # the longest status line, NOT_STORED, has 10 bytes
                    status = bytes(buf[pos:end])
                    if status in _STATUS_LINES:
                        self._pos = self._scan = end + 2
                        expect.popleft()
                        out.append(status)
                        continue
            reply = self.next()
            if reply is NEED_DATA:
                break
            out.append(reply)
        return out

    def _line(self) -> bytes | None:
        buf = self._buf
        end = buf.find(b"\r\n", max(self._pos, self._scan))
        # The same limit whether or not the CRLF has arrived yet (a buffered "\r" may be half of it),
        # so a reply is accepted or refused the same way however the bytes were split.
        if (end if end >= 0 else len(buf) - 1) - self._pos > MAX_LINE:
            raise self._error(f"a reply line longer than {MAX_LINE} bytes")
        if end < 0:
            self._scan = max(len(buf) - 1, self._pos)  # a final "\r" may be half of the CRLF
            return None
        line = bytes(buf[self._pos : end])
        self._pos = self._scan = end + 2
        return line

    def _simple(self, kind: int, data_block: bool, line: bytes) -> Any:
        if kind == Expect.STATUS:
            if line in _STATUS_LINES:
                return line
        elif kind == Expect.NUMBER:
            digits = line.rstrip(b" ")  # some memcached versions pad decr replies with spaces
            if digits.isdigit():
                if len(digits) > 20 or int(digits) >= _U64:
                    raise self._error(f"counter value out of range {line[:32]!r}")
                return int(digits)
            if line == b"NOT_FOUND":
                return line
        elif kind == Expect.META:
            return self._meta(line)
        elif kind == Expect.STATS:
            return self._stats(line)
        elif kind == Expect.VERSION:
            if line.startswith(b"VERSION "):
                return line[8:]
        elif kind == Expect.OK and line == b"OK":
            return line
        return self._refusal(line, data_block)

    def _refusal(self, line: bytes, data_block: bool) -> ErrorReply:
        """An error line in place of a reply, or ProtocolError if it is not one."""
        refused = error_reply(line, data_block)
        if refused is None:
            raise self._error(f"unexpected reply {line[:40]!r}")
        return refused

    def _values(self, wanted: Any, with_cas: bool) -> Any:
        items = self._items
        if not items and self._buf.endswith(b"END\r\n"):  # all there, most likely
            whole = self._whole_values(wanted, with_cas)
            if whole is not None:
                return whole
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
            header = value_header(parts, with_cas)
            if isinstance(header, str):
                raise self._error(f"{header} {line[:60]!r}")
            key, flags, cas, size = header
            if wanted is not None and key != wanted and (type(wanted) is bytes or key not in wanted):
                raise self._error(f"a value for {key[:40]!r}, which was not asked for: out of step")
            if type(wanted) is bytes and items:
                raise self._error(f"a second value for {key[:40]!r} in a one-key get: out of step")
            value = self._value(None, key, flags, cas, size)
            if value is NEED_DATA:
                return NEED_DATA
            items.append(value)

    def _whole_values(self, wanted: Any, with_cas: bool) -> list[Value] | None:
        """The fast path: a get reply that is all in the buffer and well-formed, parsed in one go;
        None (nothing consumed) for anything else, which the line-by-line path then reads or
        refuses with its own checks."""
        buf, pos = self._buf, self._pos
        if buf.startswith(b"END\r\n", pos):
            items: list[Value] = []
            pos += 5
        else:
            # The reply as bytes (slices of bytes are one copy, of a bytearray two): what is
            # buffered, or with a lot buffered (many pipelined replies) up to the first CRLF END
            # CRLF, so each reply is not copied again with all the ones after it. If a value holds
            # those bytes the copy is cut short inside it, and the parse declines (the line-by-line
            # path reads it).
            stop = len(buf)
            if stop - pos > _COPY_WHOLE_BUFFER:
                stop = buf.find(b"\r\nEND\r\n", pos) + 7
                if stop < 7:
                    return None
            with memoryview(buf) as view:  # released before buf.clear()
                data = bytes(view[pos:stop])
            found = parse_values(data, wanted, with_cas, self._max_value)
            if found is None:
                return None
            items, used = found
            pos += used
        if pos == len(buf):  # all consumed: start afresh (an old END must not look whole)
            buf.clear()
            pos = 0
        self._pos = self._scan = pos
        return items

    def _value(
        self, meta: dict[bytes, bytes] | None, key: bytes, flags: int, cas: int | None, size: int
    ) -> Any:
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
            data = bytes(buf[pos:stop])
            return Value(key, flags, data, cas) if meta is None else Meta(b"VA", meta, data)
        rest = bytes(buf[pos:])
        self._buf, self._pos, self._scan = bytearray(), 0, 0
        self._head = (meta, key, flags, cas, size)
        if size > self._max_value:
            self._skip = max(size - len(rest), 0)
            rest = rest[size:]  # whatever part of the CRLF already arrived
        self._data = [rest]
        self._need = size + 2 - len(rest) if size <= self._max_value else 2 - len(rest)
        return NEED_DATA

    def _end_value(self, data: bytes) -> None:
        """The value collected by feed() is complete: ``data`` ends with its CRLF (and is only
        the CRLF for an oversized value, whose bytes were skipped)."""
        assert self._head is not None
        meta, key, flags, cas, size = self._head
        self._head = None
        if data[-2:] != b"\r\n":
            raise self._error(f"value of {key[:40]!r} not terminated by CRLF")
        if size > self._max_value:
            item: Any = Oversized(key, size)
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
        found = self._found
        while True:
            if line == b"END":
                self._found = {}
                return found
            if not found and line in (b"RESET", b"OK"):  # "stats reset", "stats detail on|off"
                return {}
            head, _, rest = line.partition(b" ")
            if head in (b"STAT", b"ITEM"):
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

    def _dump(self) -> Any:
        """An ``lru_crawler metadump`` reply: its entries once END has arrived (an error line, or
        BUSY while another crawl runs, as an ``ErrorReply``); at most ``MAX_DUMP`` bytes."""
        buf, pos = self._buf, self._pos
        if buf.startswith(b"END\r\n", pos):
            self._pos = self._scan = pos + 5
            return []
        if not buf.startswith(b"key=", pos) and len(buf) - pos >= 4:
            line = self._line()
            if line is None:
                return NEED_DATA
            return self._refusal(line, False)  # BUSY while another crawl runs, or an error
        end = buf.find(b"\nEND\r\n", max(pos, self._scan - 6))
        if end < 0:
            if len(buf) - pos > MAX_DUMP:
                raise self._error(f"an lru_crawler metadump reply over {MAX_DUMP} bytes")
            self._scan = len(buf)
            return NEED_DATA
        body = bytes(buf[pos:end])
        self._pos = self._scan = end + 6
        return [entry for entry in map(dump_entry, body.split(b"\n")) if entry is not None]

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


def _stored_run(buf: bytearray, pos: int, expect: deque[tuple[int, bool, Any]], limit: int) -> int:
    """How many of the next ``limit`` replies, if more than one, are STORED lines to STATUS
    requests (a set_many's, the usual case), found with one comparison; 0 if not all are."""
    count = min(limit, len(expect), (len(buf) - pos) // 8)
    stored = count > 1 and buf.startswith(_STORED_CRLF * count, pos)
    return count if stored and set(map(_first, islice(expect, count))) == _ONLY_STATUS else 0


def _number(token: bytes) -> int | None:
    return int(token) if token.isdigit() and len(token) <= 20 else None


def _meta_flags(tokens: Sequence[bytes]) -> dict[bytes, bytes]:
    return {token[:1]: token[1:] for token in tokens if token}
