"""Pure parsers of reply pieces for ``shardcache._replies.ReplyParser``: a whole get reply
already in hand, the entries of an ``lru_crawler metadump``, an error line. No state: each takes
bytes and returns values, or None for anything it does not recognise (the parser then reads it
the slow way, or refuses it)."""

from __future__ import annotations

import re
from typing import Any, Final, NamedTuple
from urllib.parse import unquote_to_bytes

__all__ = [
    "DumpEntry",
    "ErrorReply",
    "Meta",
    "Oversized",
    "Value",
    "dump_entry",
    "error_reply",
    "parse_values",
]

_U32: Final = 2**32
_U64: Final = 2**64
_new_tuple = tuple.__new__  # a NamedTuple without its Python-level __new__ (a hot path's frame)


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


class DumpEntry(NamedTuple):
    """One item of an ``lru_crawler metadump`` reply: the key as stored, its CAS value, and its
    expiry as a Unix time (-1: none)."""

    wire: bytes
    cas: int
    exp: int


def parse_values(data: bytes, wanted: Any, with_cas: bool, size_limit: int) -> tuple[list[Value], int] | None:
    """The items of the whole get/gets reply at the start of ``data`` and the length of that
    reply (its END line included), or None if it is anything else (``ReplyParser._whole_values``).

    A usual header is read by one regex match, which after the first item also checks the CRLF
    that ends the value before it (``_HEADERS``); any other line by :func:`_header`, which accepts
    or declines exactly the same headers (and the odd keys the regex leaves out)."""
    match, match_next = _CAS_HEADERS if with_cas else _HEADERS
    one = type(wanted) is bytes
    items: list[Value] = []
    pos = 0  # where the next header starts; after an item, where the CRLF that ends its value is due
    cas: int | None
    while True:
        found = match(data, pos)
        if found is not None:
            start = found.end()
            if with_cas:
                key, flags, size, token = found.groups()
                cas = int(token)
                if cas >= _U64:
                    return None
            else:
                key, flags, size = found.groups()
                cas = None
            number, length = 0 if flags == b"0" else int(flags), int(size)
        else:
            if items:
                if not data.startswith(b"\r\n", pos):
                    return None
                pos += 2
            if data.startswith(b"END\r\n", pos):
                return items, pos + 5
            header = _header(data, pos, with_cas)
            if header is None:
                return None
            key, number, length, cas, start = header
        if (
            number >= _U32
            or length > size_limit
            or (
                (key not in wanted if not one else (key != wanted or items))
                if wanted is not None
                else not 0 < len(key) <= 250
            )
        ):
            return None
        pos = start + length
        items.append(_new_tuple(Value, (key, number, data[start:pos], cas)))
        match = match_next


# What _header accepts, for the usual keys (no byte below "!": one range test per byte is the
# fastest the regex engine does): at most 10 digits for flags and size (below 2**32, never a huge
# int to parse), 20 for the CAS unique. The second of each pair reads a header after a value,
# with the CRLF that ends the value.
_VALUE: Final = rb"VALUE ([!-\xff]+) ([0-9]{1,10}) ([0-9]{1,10})"
_HEADERS: Final = (re.compile(_VALUE + rb"\r\n").match, re.compile(rb"\r\n" + _VALUE + rb"\r\n").match)
_CAS_HEADERS: Final = (
    re.compile(_VALUE + rb" ([0-9]{1,20})\r\n").match,
    re.compile(rb"\r\n" + _VALUE + rb" ([0-9]{1,20})\r\n").match,
)
# A whole one-key get/gets reply (for ``ReplyParser.whole``), the value's length still to check.
ONE_VALUE: Final = re.compile(_VALUE + rb"\r\n.*\r\nEND\r\n", re.DOTALL).fullmatch
ONE_CAS_VALUE: Final = re.compile(_VALUE + rb" ([0-9]{1,20})\r\n.*\r\nEND\r\n", re.DOTALL).fullmatch


def _header(data: bytes, pos: int, with_cas: bool) -> tuple[bytes, int, int, int | None, int] | None:
    """``(key, flags, size, cas, where the data starts)`` of the value header line at ``pos``, or
    None if it is not one (an unfinished line included)."""
    head = data.find(b"\r\n", pos)
    if head < 0:
        return None
    parts = data[pos:head].split(b" ")
    if len(parts) != (5 if with_cas else 4) or parts[0] != b"VALUE":
        return None
    key, flags, size = parts[1], parts[2], parts[3]
    if not (flags.isdigit() and size.isdigit() and len(flags) <= 10 and len(size) <= 10):
        return None
    cas = None
    if with_cas:
        token = parts[4]
        if not (token.isdigit() and len(token) <= 20) or int(token) >= _U64:
            return None
        cas = int(token)
    return key, int(flags), int(size), cas, head + 2


def error_reply(line: bytes, data_block: bool) -> ErrorReply | None:
    """The error line memcached sends in place of a reply, or None if ``line`` is not one.
    ``data_block``: the request was a text storage command (an error then is fatal)."""
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
    if head == b"BUSY":  # lru_crawler: another crawl is running
        return ErrorReply("BUSY", message, False)
    return None


def dump_entry(line: bytes) -> DumpEntry | None:
    """``key=<URL-encoded key> exp=<time> la=... cas=<n> ...``; None for a line that is not one
    (memcached may add fields: only these are read)."""
    fields = dict(token.split(b"=", 1) for token in line.split(b" ") if b"=" in token)
    key, cas, exp = fields.get(b"key"), fields.get(b"cas", b""), fields.get(b"exp", b"-1")
    if not key or not cas.isdigit() or len(cas) > 20 or not exp.lstrip(b"-").isdigit() or len(exp) > 20:
        return None
    return DumpEntry(unquote_to_bytes(key), int(cas), int(exp))


def value_header(parts: list[bytes], with_cas: bool) -> tuple[bytes, int, int | None, int] | str:
    """``(key, flags, cas, size)`` of ``VALUE <key> <flags> <size> [<cas>]`` split on spaces, or
    what is wrong with it."""
    size, flags = _number(parts[3]), _number(parts[2])
    cas = _number(parts[4]) if len(parts) == 5 else None
    if size is None or flags is None or flags >= _U32 or (len(parts) == 5 and cas is None):
        return "malformed value header"
    if cas is None and with_cas:
        return "no CAS unique in a gets/gats reply"
    if cas is not None and cas >= _U64:
        return "CAS unique out of range"
    return parts[1], flags, cas, size


def _number(token: bytes) -> int | None:
    return int(token) if token.isdigit() and len(token) <= 20 else None
