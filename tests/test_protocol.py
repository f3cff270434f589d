"""The sans-I/O protocol core, without servers: exact request bytes, number and key checks, and the
reply parser fed whole, byte by byte and in random pieces, including hostile and broken input."""

from __future__ import annotations

import enum
import itertools
import random
import tracemalloc
from collections.abc import Callable, Iterable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardcache import _protocol as proto
from shardcache._protocol import (
    MAX_LINE,
    NEED_DATA,
    NOOP,
    ErrorReply,
    Expect,
    KeyCodec,
    Meta,
    Oversized,
    ReplyParser,
    Value,
)
from shardcache.errors import ArgumentError, KeyValidationError, ProtocolError, ShardcacheError

FUZZ = settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

I32_MIN, I32_MAX, U32_MAX, U64_MAX = -(2**31), 2**31 - 1, 2**32 - 1, 2**64 - 1


class Seconds(enum.IntEnum):
    MINUTE = 60


# -- helpers --------------------------------------------------------------------------------------


def parse(expects: Iterable[tuple[Any, ...]], chunks: Iterable[bytes], *, max_value: int = 1024) -> list[Any]:
    """Every reply the parser hands back for ``chunks``, draining after each feed."""
    parser = ReplyParser(max_value=max_value, node_id="n1")
    for expect in expects:
        parser.expect(*expect)
    replies = []
    for chunk in chunks:
        parser.feed(chunk)
        while (reply := parser.next()) is not NEED_DATA:
            replies.append(reply)
    return replies


def byte_by_byte(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def random_chunks(data: bytes, rng: random.Random, most: int = 6) -> list[bytes]:
    """``data`` cut at up to ``most`` random places."""
    cuts = (
        sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, most))))
        if len(data) > 1
        else []
    )
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def splittings(data: bytes) -> list[list[bytes]]:
    """Whole, byte by byte, and a few seeded random chunkings."""
    rng = random.Random(data)
    return [[data], byte_by_byte(data), *(random_chunks(data, rng) for _ in range(5))]


_STORAGE = {b"set", b"add", b"replace", b"append", b"prepend", b"cas", b"ms"}


def assert_one_command(out: bytes) -> None:
    """``out`` is exactly one command line (printable tokens, single spaces) plus exactly the data
    block its line declares, if the command has one."""
    line, sep, rest = out.partition(b"\r\n")
    assert sep, out
    assert all((b > 0x20 and b != 0x7F) or b == 0x20 for b in line), line  # UTF-8 keys have bytes >= 0x80
    tokens = line.split(b" ")
    assert all(tokens), line  # no empty token: no leading, trailing or double space
    if tokens[0] in _STORAGE:
        size = int(tokens[2] if tokens[0] == b"ms" else tokens[4])
        assert len(rest) == size + 2 and rest.endswith(b"\r\n"), out
    else:
        assert rest == b"", out


# -- keys -----------------------------------------------------------------------------------------


def test_key_codec_returns_hashed_and_wire_keys() -> None:
    assert KeyCodec().wire("user:1") == (b"user:1", b"user:1")
    assert KeyCodec(b"app:").wire(b"k") == (b"k", b"app:k")
    assert KeyCodec(b"app:", hash_prefix=True).wire("k") == (b"app:k", b"app:k")
    assert KeyCodec(allow_unicode=True).wire("clé") == ("clé".encode(), "clé".encode())
    assert KeyCodec().wire(bytearray(b"k")) == (b"k", b"k")
    assert KeyCodec().wire(memoryview(b"k")) == (b"k", b"k")
    assert KeyCodec().wire(b"k" * 250)[1] == b"k" * 250


def test_key_codec_unprefixed_undoes_the_wire_prefix_only_when_not_hashed() -> None:
    assert KeyCodec(b"app:").unprefixed(b"app:k") == b"k"
    assert KeyCodec(b"app:", hash_prefix=True).unprefixed(b"app:k") == b"app:k"
    assert KeyCodec().unprefixed(b"k") == b"k"


@pytest.mark.parametrize(
    ("codec", "key", "problem"),
    [
        (KeyCodec(), "a b", "whitespace"),
        (KeyCodec(), b"a\r\nflush_all", "whitespace"),
        (KeyCodec(), b"a\x00", "control"),
        (KeyCodec(), b"a\x7f", "control"),
        (KeyCodec(), b"\t", "control"),
        (KeyCodec(), b"k" * 251, "251 bytes"),
        (KeyCodec(b"p:"), b"k" * 249, "251 bytes"),
        (KeyCodec(), "", "empty"),
        (KeyCodec(b"p:"), b"", "empty"),
        (KeyCodec(), "clé", "allow_unicode_keys"),
        (KeyCodec(allow_unicode=True), "\ud800", "utf-8"),
        (KeyCodec(), 12, "str or bytes"),
        (KeyCodec(), None, "str or bytes"),
    ],
)
def test_unsafe_key_raises_key_validation_error(codec: KeyCodec, key: object, problem: str) -> None:
    with pytest.raises(KeyValidationError, match=problem):
        codec.wire(key)


def test_key_codec_copies_a_bytearray_prefix_to_bytes() -> None:
    codec = KeyCodec(bytearray(b"p:"))
    assert codec.prefix == b"p:"
    assert type(codec.wire("k")[1]) is bytes
    assert proto.delete(codec.wire("k")[1]) == b"delete p:k\r\n"


@pytest.mark.parametrize("prefix", [b"a b", b"\n", b"p" * 250, "p:", 5])
def test_unsafe_key_prefix_raises_argument_error(prefix: bytes) -> None:
    with pytest.raises(ArgumentError, match="prefix"):
        KeyCodec(prefix)


# -- encoders: exact bytes ------------------------------------------------------------------------

ENCODED = [
    (lambda: proto.store(b"set", b"k", b"v", 5, 10), b"set k 5 10 1\r\nv\r\n"),
    (lambda: proto.store(b"add", b"k", b"v", 0, 0, noreply=True), b"add k 0 0 1 noreply\r\nv\r\n"),
    (
        lambda: proto.store(b"replace", b"k", b"", U32_MAX, I32_MAX),
        b"replace k 4294967295 2147483647 0\r\n\r\n",
    ),
    (lambda: proto.store(b"append", b"k", b"a\r\nb", 0, I32_MIN), b"append k 0 -2147483648 4\r\na\r\nb\r\n"),
    (lambda: proto.store(b"prepend", b"k", bytearray(b"xy"), 1, -1), b"prepend k 1 -1 2\r\nxy\r\n"),
    (
        lambda: proto.store(b"cas", b"k", b"v", 0, 0, cas=U64_MAX),
        b"cas k 0 0 1 18446744073709551615\r\nv\r\n",
    ),
    (
        lambda: proto.store(b"cas", b"k", b"v", 0, 0, cas=b"7", noreply=True),
        b"cas k 0 0 1 7 noreply\r\nv\r\n",
    ),
    (lambda: proto.store(b"cas", b"k", b"v", 0, 0, cas="8"), b"cas k 0 0 1 8\r\nv\r\n"),
    (lambda: proto.store(b"set", b"k", memoryview(b"abc"), 0, Seconds.MINUTE), b"set k 0 60 3\r\nabc\r\n"),
    (lambda: proto.retrieve([b"a"]), b"get a\r\n"),
    (lambda: proto.retrieve([b"a", b"b"], cas=True), b"gets a b\r\n"),
    (lambda: proto.retrieve([b"a", b"b"], touch=5), b"gat 5 a b\r\n"),
    (lambda: proto.retrieve([b"a"], cas=True, touch=-1), b"gats -1 a\r\n"),
    (lambda: proto.delete(b"k"), b"delete k\r\n"),
    (lambda: proto.delete(b"k", noreply=True), b"delete k noreply\r\n"),
    (lambda: proto.incr_decr(b"k", 5), b"incr k 5\r\n"),
    (
        lambda: proto.incr_decr(b"k", U64_MAX, decr=True, noreply=True),
        b"decr k 18446744073709551615 noreply\r\n",
    ),
    (lambda: proto.touch(b"k", 10), b"touch k 10\r\n"),
    (lambda: proto.touch(b"k", 0, noreply=True), b"touch k 0 noreply\r\n"),
    (proto.version, b"version\r\n"),
    (proto.stats, b"stats\r\n"),
    (lambda: proto.stats(["slabs", b"items"]), b"stats slabs items\r\n"),
    (proto.flush_all, b"flush_all 0\r\n"),
    (lambda: proto.flush_all(I32_MAX, noreply=True), b"flush_all 2147483647 noreply\r\n"),
    (lambda: proto.cache_memlimit(U32_MAX), b"cache_memlimit 4294967295\r\n"),
    (lambda: proto.meta_get(b"k"), b"mg k v\r\n"),
    (
        lambda: proto.meta_get(
            b"k", value=False, cas=True, flags=True, ttl=True, key=True, vivify=30, recache=5, new_ttl=60
        ),
        b"mg k c f t k N30 R5 T60\r\n",
    ),
    (lambda: proto.meta_set(b"k", b"abc"), b"ms k 3 F0 T0\r\nabc\r\n"),
    (lambda: proto.meta_set(b"k", b"a", mode="add"), b"ms k 1 F0 T0 ME\r\na\r\n"),
    (lambda: proto.meta_set(b"k", b"a", mode="replace"), b"ms k 1 F0 T0 MR\r\na\r\n"),
    (lambda: proto.meta_set(b"k", b"a", mode="prepend"), b"ms k 1 F0 T0 MP\r\na\r\n"),
    (
        lambda: proto.meta_set(
            b"k", b"abc", flags=1, ttl=2, mode="append", cas=5, invalidate=True, return_cas=True
        ),
        b"ms k 3 F1 T2 MA C5 I c\r\nabc\r\n",
    ),
    (lambda: proto.meta_delete(b"k"), b"md k\r\n"),
    (lambda: proto.meta_delete(b"k", cas=5, invalidate=True, ttl=30), b"md k C5 I T30\r\n"),
    (lambda: proto.meta_arithmetic(b"k", 1), b"ma k v D1\r\n"),
    (lambda: proto.meta_arithmetic(b"k", 0, initial=0), b"ma k v D0 N0 J0\r\n"),
    (
        lambda: proto.meta_arithmetic(b"k", 1, decr=True, initial=U64_MAX, vivify_ttl=60, ttl=30),
        b"ma k v D1 MD N60 J18446744073709551615 T30\r\n",
    ),
]


@pytest.mark.parametrize(("encode", "expected"), ENCODED)
def test_encoder_produces_exact_bytes(encode: Callable[[], bytes], expected: bytes) -> None:
    out = encode()
    assert out == expected
    assert type(out) is bytes
    assert_one_command(out)


def test_noop_is_mn() -> None:
    assert NOOP == b"mn\r\n"


# -- encoders: every number is range-checked ------------------------------------------------------

BAD_EXPIRES = [2**63, -(2**63) - 1, 2**31, U32_MAX, I32_MIN - 1, True, 1.5, "10", b"10", None]
BAD_FLAGS = [-1, 2**32, 2**63, True, 1.0, "1", None]
BAD_CAS = [2**64, -1, True, 1.5, b"", b"12a", "x", b"1" * 21, "-1", bytearray(b"1")]
BAD_DELTAS = [2**64, -1, 2**100, True, 1.5, "1", b"1", None]
BAD_DELAYS = [-1, 2**31, U32_MAX, True, 0.5, "1"]

NUMBER_ENCODERS: list[tuple[str, Callable[[Any], bytes], list[Any]]] = [
    ("set expire", lambda x: proto.store(b"set", b"k", b"v", 0, x), BAD_EXPIRES),
    ("set flags", lambda x: proto.store(b"set", b"k", b"v", x, 0), BAD_FLAGS),
    ("cas unique", lambda x: proto.store(b"cas", b"k", b"v", 0, 0, cas=x), BAD_CAS),
    ("gat expire", lambda x: proto.retrieve([b"k"], touch=x), BAD_EXPIRES[:-1]),
    ("touch expire", lambda x: proto.touch(b"k", x), BAD_EXPIRES),
    ("incr delta", lambda x: proto.incr_decr(b"k", x), BAD_DELTAS),
    ("decr delta", lambda x: proto.incr_decr(b"k", x, decr=True), BAD_DELTAS),
    ("flush_all delay", proto.flush_all, BAD_DELAYS),
    ("cache_memlimit", proto.cache_memlimit, [-1, 2**32, True, 1.0, "64"]),
    ("mg vivify", lambda x: proto.meta_get(b"k", vivify=x), BAD_EXPIRES[:-1]),
    ("mg recache", lambda x: proto.meta_get(b"k", recache=x), BAD_EXPIRES[:-1]),
    ("mg new_ttl", lambda x: proto.meta_get(b"k", new_ttl=x), BAD_EXPIRES[:-1]),
    ("ms ttl", lambda x: proto.meta_set(b"k", b"v", ttl=x), BAD_EXPIRES),
    ("ms flags", lambda x: proto.meta_set(b"k", b"v", flags=x), BAD_FLAGS),
    ("ms cas", lambda x: proto.meta_set(b"k", b"v", cas=x), BAD_CAS),
    ("md cas", lambda x: proto.meta_delete(b"k", cas=x), BAD_CAS),
    ("md ttl", lambda x: proto.meta_delete(b"k", ttl=x), BAD_EXPIRES[:-1]),
    ("ma delta", lambda x: proto.meta_arithmetic(b"k", x), BAD_DELTAS),
    ("ma initial", lambda x: proto.meta_arithmetic(b"k", 1, initial=x), BAD_DELTAS[:-1]),
    ("ma vivify_ttl", lambda x: proto.meta_arithmetic(b"k", 1, initial=0, vivify_ttl=x), BAD_EXPIRES[:-1]),
    ("ma ttl", lambda x: proto.meta_arithmetic(b"k", 1, ttl=x), BAD_EXPIRES[:-1]),
]


@pytest.mark.parametrize(
    ("encode", "bads"), [pytest.param(encode, bads, id=name) for name, encode, bads in NUMBER_ENCODERS]
)
def test_out_of_range_or_mistyped_number_raises_argument_error_naming_it(
    encode: Callable[[Any], bytes], bads: list[Any]
) -> None:
    for bad in bads:
        with pytest.raises(ArgumentError) as caught:
            encode(bad)
        assert isinstance(caught.value, ShardcacheError)
        assert repr(bad) in str(caught.value), (bad, caught.value)


@pytest.mark.parametrize(
    ("check", "low", "high"),
    [
        (proto.check_expire, I32_MIN, I32_MAX),
        (proto.check_flags, 0, U32_MAX),
        (proto.check_cas, 0, U64_MAX),
        (proto.check_delta, 0, U64_MAX),
        (proto.check_delay, 0, I32_MAX),
    ],
)
def test_number_checks_accept_their_whole_range_and_nothing_beyond(
    check: Callable[[object], int], low: int, high: int
) -> None:
    assert check(low) == low
    assert check(high) == high
    for outside in (low - 1, high + 1):
        with pytest.raises(ArgumentError, match=str(outside)):
            check(outside)


def test_number_checks_take_int_subclasses_as_plain_ints() -> None:
    assert type(proto.check_expire(Seconds.MINUTE)) is int
    assert proto.check_cas(b"00000000000000000001") == 1
    assert proto.check_cas(str(U64_MAX)) == U64_MAX


@pytest.mark.parametrize(
    "encode",
    [
        lambda: proto.store(b"get", b"k", b"v", 0, 0),
        lambda: proto.store(bytearray(b"set"), b"k", b"v", 0, 0),
        lambda: proto.store("set", b"k", b"v", 0, 0),
        lambda: proto.store(b"cas", b"k", b"v", 0, 0),
        lambda: proto.store(b"set", b"k", "text", 0, 0),
        lambda: proto.store(b"set", b"k", 5, 0, 0),
        lambda: proto.retrieve([]),
        lambda: proto.meta_set(b"k", b"v", mode="cas"),
        lambda: proto.meta_set(b"k", b"v", mode=[]),
        lambda: proto.meta_set(b"k", None),
        lambda: proto.stats(["a b"]),
        lambda: proto.stats([""]),
        lambda: proto.stats(["é"]),
        lambda: proto.stats(["\ud800"]),
        lambda: proto.stats([7]),
        lambda: proto.stats([bytearray(b"x")]),
        lambda: proto.stats(["x" * 251]),
    ],
)
def test_bad_command_or_argument_raises_argument_error(encode: Callable[[], bytes]) -> None:
    with pytest.raises(ArgumentError):
        encode()


BAD_WIRE_KEYS = [b"a b", b"a\r\nflush_all", b"\x00", b"\x7f", b"", b"k" * 251, "k", bytearray(b"k"), None]
KEY_ENCODERS: list[Callable[[Any], bytes]] = [
    lambda w: proto.store(b"set", w, b"v", 0, 0),
    lambda w: proto.retrieve([b"ok", w]),
    proto.delete,
    lambda w: proto.incr_decr(w, 1),
    lambda w: proto.touch(w, 1),
    proto.meta_get,
    lambda w: proto.meta_set(w, b"v"),
    proto.meta_delete,
    lambda w: proto.meta_arithmetic(w, 1),
]


@pytest.mark.parametrize("encode", KEY_ENCODERS)
def test_encoders_refuse_an_unsafe_wire_key(encode: Callable[[Any], bytes]) -> None:
    for wire in BAD_WIRE_KEYS:
        with pytest.raises(KeyValidationError):
            encode(wire)


# -- parser: every reply kind ---------------------------------------------------------------------

PARSED: list[tuple[str, list[tuple[Any, ...]], bytes, list[Any]]] = [
    (
        "get hit",
        [(Expect.VALUES, False, b"k")],
        b"VALUE k 3 2\r\nhi\r\nEND\r\n",
        [[Value(b"k", 3, b"hi", None)]],
    ),
    ("get miss", [(Expect.VALUES, False, b"k")], b"END\r\n", [[]]),
    (
        "get many",
        [(Expect.VALUES, False, frozenset((b"a", b"b")))],
        b"VALUE a 0 4\r\na\r\nb\r\nVALUE b 4294967295 0\r\n\r\nEND\r\n",
        [[Value(b"a", 0, b"a\r\nb", None), Value(b"b", U32_MAX, b"", None)]],
    ),
    (
        "gets",
        [(Expect.CAS_VALUES, False, b"k")],
        b"VALUE k 0 1 18446744073709551615\r\nx\r\nEND\r\n",
        [[Value(b"k", 0, b"x", U64_MAX)]],
    ),
    ("gets via VALUES", [(Expect.VALUES,)], b"VALUE k 0 1 9\r\nx\r\nEND\r\n", [[Value(b"k", 0, b"x", 9)]]),
    (
        "oversized get",
        [(Expect.VALUES, False, b"k"), (Expect.VERSION,)],
        b"VALUE k 0 2000\r\n" + b"x" * 2000 + b"\r\nEND\r\nVERSION 1.6.18\r\n",
        [[Oversized(b"k", 2000)], b"1.6.18"],
    ),
    (
        "get refused",
        [(Expect.VALUES,)],
        b"SERVER_ERROR out of memory\r\n",
        [ErrorReply("SERVER_ERROR", "out of memory", False)],
    ),
    *(
        ("status " + s.decode(), [(Expect.STATUS,)], s + b"\r\n", [s])
        for s in (b"STORED", b"NOT_STORED", b"EXISTS", b"NOT_FOUND", b"DELETED", b"TOUCHED")
    ),
    (
        "storage refused",
        [(Expect.STATUS, True)],
        b"CLIENT_ERROR bad data chunk\r\n",
        [ErrorReply("CLIENT_ERROR", "bad data chunk", True)],
    ),
    (
        "delete refused",
        [(Expect.STATUS, False)],
        b"CLIENT_ERROR x\r\n",
        [ErrorReply("CLIENT_ERROR", "x", False)],
    ),
    ("unknown command", [(Expect.STATUS,)], b"ERROR\r\n", [ErrorReply("ERROR", "unknown command", True)]),
    ("incr", [(Expect.NUMBER,)], b"18446744073709551615\r\n", [U64_MAX]),
    ("decr padded", [(Expect.NUMBER,)], b"9   \r\n", [9]),
    ("incr miss", [(Expect.NUMBER,)], b"NOT_FOUND\r\n", [b"NOT_FOUND"]),
    (
        "incr non-numeric value",
        [(Expect.NUMBER,)],
        b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n",
        [ErrorReply("CLIENT_ERROR", "cannot increment or decrement non-numeric value", False)],
    ),
    (
        "meta hit",
        [(Expect.META,)],
        b"VA 2 c5 f3 kk\r\nhi\r\n",
        [Meta(b"VA", {b"c": b"5", b"f": b"3", b"k": b"k"}, b"hi")],
    ),
    ("meta header", [(Expect.META,)], b"HD c9 W\r\n", [Meta(b"HD", {b"c": b"9", b"W": b""}, None)]),
    *(
        (f"meta {s.decode()}", [(Expect.META,)], s + b"\r\n", [Meta(s, {}, None)])
        for s in (b"EN", b"NF", b"NS", b"EX", b"MN")
    ),
    (
        "meta oversized",
        [(Expect.META,)],
        b"VA 2000 kbig\r\n" + b"x" * 2000 + b"\r\n",
        [Oversized(b"big", 2000)],
    ),
    (
        "meta refused",
        [(Expect.META,)],
        b"CLIENT_ERROR bad command line format\r\n",
        [ErrorReply("CLIENT_ERROR", "bad command line format", False)],
    ),
    (
        "stats",
        [(Expect.STATS,)],
        b"STAT pid 1\r\nSTAT version 1.6.18\r\nSTAT empty \r\nITEM k [1 b; 0 s]\r\nEND\r\n",
        [{b"pid": b"1", b"version": b"1.6.18", b"empty": b"", b"k": b"[1 b; 0 s]"}],
    ),
    ("stats empty", [(Expect.STATS,)], b"END\r\n", [{}]),
    ("stats refused", [(Expect.STATS,)], b"ERROR\r\n", [ErrorReply("ERROR", "unknown command", True)]),
    ("version", [(Expect.VERSION,)], b"VERSION 1.6.18\r\n", [b"1.6.18"]),
    ("flush_all", [(Expect.OK,)], b"OK\r\n", [b"OK"]),
    (
        "cache_memlimit refused",
        [(Expect.OK,)],
        b"MEMLIMIT_TOO_SMALL cannot set maxbytes to less than 8m\r\n",
        [ErrorReply("MEMLIMIT_TOO_SMALL", "cannot set maxbytes to less than 8m", False)],
    ),
    ("noreply then mn", [(Expect.NOOP,), (Expect.VERSION,)], b"MN\r\nVERSION 1\r\n", [b"1"]),
    (
        "pipeline",
        [(Expect.STATUS, True), (Expect.VALUES, False, b"k"), (Expect.NUMBER,), (Expect.META,), (Expect.OK,)],
        b"STORED\r\nVALUE k 0 5\r\nEND\r\n\r\nEND\r\n42\r\nVA 1\r\n\n\r\nOK\r\n",
        [b"STORED", [Value(b"k", 0, b"END\r\n", None)], 42, Meta(b"VA", {}, b"\n"), b"OK"],
    ),
]


@pytest.mark.parametrize(
    ("expects", "stream", "expected"), [pytest.param(*case[1:], id=case[0]) for case in PARSED]
)
def test_reply_parses_the_same_whole_byte_by_byte_and_in_random_pieces(
    expects: list[tuple[Any, ...]], stream: bytes, expected: list[Any]
) -> None:
    for chunks in splittings(stream):
        assert parse(expects, chunks) == expected


@pytest.mark.parametrize(
    ("expects", "stream", "expected"), [pytest.param(*case[1:], id=case[0]) for case in PARSED]
)
def test_truncated_reply_is_incomplete_not_garbage(
    expects: list[tuple[Any, ...]], stream: bytes, expected: list[Any]
) -> None:
    for cut in range(1, len(stream)):
        parser = ReplyParser(max_value=1024)
        for expect in expects:
            parser.expect(*expect)
        parser.feed(stream[:cut])
        got = []
        while (reply := parser.next()) is not NEED_DATA:
            got.append(reply)
        assert got == expected[: len(got)]
        assert len(got) < len(expected)
        assert 1 <= parser.pending <= len(expects) - len(got)


def test_errors_sent_despite_noreply_are_swallowed_up_to_mn() -> None:
    parser = ReplyParser()
    parser.expect(Expect.NOOP)
    parser.expect(Expect.OK)
    assert parser.pending == 2
    parser.feed(b"CLIENT_ERROR bad command line format\r\nERROR\r\nSERVER_ERROR oom\r\nMN\r\nOK\r\n")
    assert parser.next() == b"OK"
    assert parser.next() is NEED_DATA
    assert parser.pending == 0
    assert parser.swallowed == [
        ErrorReply("CLIENT_ERROR", "bad command line format", True),
        ErrorReply("ERROR", "unknown command", True),
        ErrorReply("SERVER_ERROR", "oom", False),
    ]


def test_oversized_value_is_skipped_without_buffering_it() -> None:
    gib = 1024**3
    parser = ReplyParser()  # max_value 1 MiB
    parser.expect(Expect.VALUES, False, b"big")
    chunk = bytes(1024 * 1024)
    tracemalloc.start()
    try:
        parser.feed(b"VALUE big 0 %d\r\n" % gib + chunk[:100])
        assert parser.next() is NEED_DATA
        for _ in range(gib // len(chunk) - 1):
            parser.feed(chunk)
        parser.feed(chunk[:-100])
        assert parser.next() is NEED_DATA
        parser.feed(b"\r")
        parser.feed(b"\nEND\r\n")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert parser.next() == [Oversized(b"big", gib)]
    assert peak < 4 * 1024 * 1024


def test_value_within_max_value_is_kept_across_feeds() -> None:
    data = bytes(range(256)) * 4
    stream = b"VALUE k 1 1024\r\n" + data + b"\r\nEND\r\n"
    assert parse([(Expect.VALUES,)], [stream[:20], stream[20:900], stream[900:]]) == [
        [Value(b"k", 1, data, None)]
    ]


# -- parser: malformed replies --------------------------------------------------------------------

MALFORMED: list[tuple[str, list[tuple[Any, ...]], bytes]] = [
    ("value for another key", [(Expect.VALUES, False, b"a")], b"VALUE b 0 1\r\nx\r\nEND\r\n"),
    (
        "value for a key not in the batch",
        [(Expect.VALUES, False, frozenset((b"a",)))],
        b"VALUE b 0 1\r\nx\r\nEND\r\n",
    ),
    (
        "two values for a one-key get",
        [(Expect.VALUES, False, b"a")],
        b"VALUE a 0 1\r\nx\r\nVALUE a 0 1\r\nx\r\nEND\r\n",
    ),
    ("gets without cas", [(Expect.CAS_VALUES, False, b"a")], b"VALUE a 0 1\r\nx\r\nEND\r\n"),
    ("length 2**45", [(Expect.VALUES,)], b"VALUE a 0 35184372088832\r\n"),
    ("length just over 1 GiB", [(Expect.VALUES,)], b"VALUE a 0 1073741825\r\n"),
    ("negative length", [(Expect.VALUES,)], b"VALUE a 0 -1\r\nEND\r\n"),
    ("length not a number", [(Expect.VALUES,)], b"VALUE a 0 1x\r\n"),
    ("length of 21 digits", [(Expect.VALUES,)], b"VALUE a 0 000000000000000000001\r\n"),
    ("flags over 32 bits", [(Expect.VALUES,)], b"VALUE a 4294967296 1\r\nx\r\nEND\r\n"),
    ("negative flags", [(Expect.VALUES,)], b"VALUE a -1 1\r\nx\r\nEND\r\n"),
    ("cas over 64 bits", [(Expect.VALUES,)], b"VALUE a 0 1 18446744073709551616\r\nx\r\nEND\r\n"),
    ("cas not a number", [(Expect.CAS_VALUES,)], b"VALUE a 0 1 x\r\nx\r\nEND\r\n"),
    ("header too short", [(Expect.VALUES,)], b"VALUE a 0\r\n"),
    ("header too long", [(Expect.VALUES,)], b"VALUE a 0 1 2 3\r\n"),
    ("data longer than announced", [(Expect.VALUES,)], b"VALUE a 0 1\r\nxy\r\nEND\r\n"),
    (
        "oversized data longer than announced",
        [(Expect.VALUES,)],
        b"VALUE a 0 2000\r\n" + b"x" * 2001 + b"\r\nEND\r\n",
    ),
    ("stray line after a value", [(Expect.VALUES,)], b"VALUE a 0 1\r\nx\r\nSTORED\r\n"),
    ("error after a value", [(Expect.VALUES,)], b"VALUE a 0 1\r\nx\r\nSERVER_ERROR oom\r\n"),
    ("non-numeric incr reply", [(Expect.NUMBER,)], b"12a\r\n"),
    ("negative incr reply", [(Expect.NUMBER,)], b"-1\r\n"),
    ("incr reply over 64 bits", [(Expect.NUMBER,)], b"18446744073709551616\r\n"),
    ("incr reply of 21 digits", [(Expect.NUMBER,)], b"000000000000000000001\r\n"),
    ("empty line", [(Expect.STATUS,)], b"\r\n"),
    ("garbage", [(Expect.STATUS,)], b"\x00\xff garbage\r\n"),
    ("status for version", [(Expect.VERSION,)], b"STORED\r\n"),
    ("bare VERSION", [(Expect.VERSION,)], b"VERSION\r\n"),
    ("status for ok", [(Expect.OK,)], b"STORED\r\n"),
    ("ERROR with text", [(Expect.OK,)], b"ERRORS\r\n"),
    ("meta without length", [(Expect.META,)], b"VA\r\n"),
    ("meta bad length", [(Expect.META,)], b"VA x\r\n"),
    ("meta data too long", [(Expect.META,)], b"VA 2\r\nabc\r\n"),
    ("meta unknown status", [(Expect.META,)], b"XX c1\r\n"),
    ("meta huge length", [(Expect.META,)], b"VA 35184372088832\r\n"),
    ("stats stray line", [(Expect.STATS,)], b"STAT a 1\r\nSTORED\r\n"),
    ("stats garbage", [(Expect.STATS,)], b"what\r\n"),
    ("noreply garbage", [(Expect.NOOP,)], b"STORED\r\nMN\r\n"),
    ("reply nobody asked for", [], b"STORED\r\n"),
    ("two replies for one request", [(Expect.STATUS,)], b"STORED\r\nSTORED\r\n"),
]


@pytest.mark.parametrize(("expects", "stream"), [pytest.param(*case[1:], id=case[0]) for case in MALFORMED])
def test_malformed_reply_raises_protocol_error_however_it_arrives(
    expects: list[tuple[Any, ...]], stream: bytes
) -> None:
    for chunks in splittings(stream):
        with pytest.raises(ProtocolError) as caught:
            parse(expects, chunks)
        assert caught.value.node_id == "n1"


def test_overlong_line_raises_protocol_error_with_or_without_its_newline() -> None:
    long_line = b"VERSION " + b"x" * MAX_LINE
    for chunks in ([long_line], [long_line + b"\r\n"], [long_line[:1000], long_line[1000:] + b"\r"]):
        with pytest.raises(ProtocolError, match="longer than"):
            parse([(Expect.VERSION,)], chunks)
    exact = b"VERSION " + b"x" * (MAX_LINE - 8)
    for chunks in ([exact + b"\r\n"], [exact + b"\r", b"\n"], [exact, b"\r\n"]):
        assert parse([(Expect.VERSION,)], chunks) == [b"x" * (MAX_LINE - 8)]


def test_line_dripped_byte_by_byte_costs_linear_time() -> None:
    line = b"VERSION " + b"x" * (MAX_LINE - 8) + b"\r\n"  # quadratic re-copying took seconds
    assert parse([(Expect.VERSION,)], byte_by_byte(line)) == [line[8:-2]]


def test_closed_connection_raises_protocol_error() -> None:
    parser = ReplyParser(node_id="n1")
    with pytest.raises(ProtocolError, match="closed"):
        parser.feed(b"")


def test_parser_without_node_id_names_memcached() -> None:
    parser = ReplyParser()
    parser.feed(b"x\r\n")
    with pytest.raises(ProtocolError, match="memcached"):
        parser.next()


@pytest.mark.parametrize("max_value", [-1, 2**30 + 1, 1.5, None])
def test_parser_refuses_a_bad_max_value(max_value: Any) -> None:
    with pytest.raises(ArgumentError, match="max_value"):
        ReplyParser(max_value=max_value)


@pytest.mark.parametrize("kind", [99, -1, None, "VALUES"])
def test_parser_refuses_an_unknown_expect_kind(kind: Any) -> None:
    with pytest.raises(ArgumentError, match="Expect"):
        ReplyParser().expect(kind)


# -- fuzz: hostile input into encoders ------------------------------------------------------------

HOSTILE_NUMBERS = st.one_of(
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([2**63, -(2**63) - 1, 2**64, 2**31, 2**32, -1, 0, I32_MIN - 1, U64_MAX]),
    st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=25),
    st.binary(max_size=25),
    st.none(),
)
HOSTILE_KEYS = st.one_of(
    st.binary(max_size=260),
    st.binary(min_size=245, max_size=255).map(lambda b: bytes(b"ab\r\n "[c % 5] for c in b)),
    st.sampled_from([b"k", b"a b", b"k\r\nflush_all", b"k\nx", b"\x00", b"x" * 250, b"x" * 251]),
    st.text(max_size=10),
)
HOSTILE_DATA = st.one_of(st.binary(max_size=60), st.text(max_size=5), st.none(), st.integers())


@st.composite
def hostile_encoding(draw: st.DrawFn) -> Callable[[], bytes]:
    key, data = draw(HOSTILE_KEYS), draw(HOSTILE_DATA)
    n1, n2, n3 = draw(HOSTILE_NUMBERS), draw(HOSTILE_NUMBERS), draw(HOSTILE_NUMBERS)
    noreply, flag = draw(st.booleans()), draw(st.booleans())
    command = draw(st.sampled_from([b"set", b"add", b"replace", b"append", b"prepend", b"cas"]))
    mode = draw(st.sampled_from(["set", "add", "replace", "append", "prepend", "bad"]))
    return draw(
        st.sampled_from(
            [
                lambda: proto.store(command, key, data, n1, n2, noreply=noreply, cas=n3),
                lambda: proto.retrieve([key, b"ok"], cas=flag, touch=n1),
                lambda: proto.delete(key, noreply=noreply),
                lambda: proto.incr_decr(key, n1, decr=flag, noreply=noreply),
                lambda: proto.touch(key, n1, noreply=noreply),
                lambda: proto.flush_all(n1, noreply=noreply),
                lambda: proto.cache_memlimit(n1),
                lambda: proto.stats([key]),
                lambda: proto.meta_get(key, cas=flag, vivify=n1, recache=n2, new_ttl=n3),
                lambda: proto.meta_set(key, data, flags=n1, ttl=n2, mode=mode, cas=n3, invalidate=flag),
                lambda: proto.meta_delete(key, cas=n1, invalidate=flag, ttl=n2),
                lambda: proto.meta_arithmetic(key, n1, decr=flag, initial=n2, vivify_ttl=n3, ttl=n3),
            ]
        )
    )


@FUZZ
@given(hostile_encoding())
def test_hostile_arguments_give_a_shardcache_error_or_exactly_one_command(
    encode: Callable[[], bytes],
) -> None:
    try:
        out = encode()
    except ShardcacheError:
        return
    assert_one_command(out)


# -- fuzz: hostile bytes into the parser ----------------------------------------------------------

ALL_EXPECTS = [
    (Expect.VALUES, False, b"k"),
    (Expect.VALUES,),
    (Expect.CAS_VALUES,),
    (Expect.STATUS, True),
    (Expect.NUMBER,),
    (Expect.META,),
    (Expect.STATS,),
    (Expect.VERSION,),
    (Expect.OK,),
    (Expect.NOOP,),
]
REPLY_TYPES = {
    Expect.VALUES: list,
    Expect.CAS_VALUES: list,
    Expect.STATUS: bytes,
    Expect.NUMBER: (int, bytes),
    Expect.META: (Meta, Oversized),
    Expect.STATS: dict,
    Expect.VERSION: bytes,
    Expect.OK: bytes,
}
VALID_STREAM = b"".join(case[2] for case in PARSED)


def parse_hostile(expects: list[tuple[Any, ...]], chunks: list[bytes]) -> None:
    """Only ProtocolError, or replies of the kind asked for."""
    try:
        replies = parse(expects, [c for c in chunks if c], max_value=64)
    except ProtocolError:
        return
    kinds = [e[0] for e in expects if e[0] != Expect.NOOP]
    for kind, reply in zip(kinds, replies, strict=False):
        assert type(reply) is ErrorReply or isinstance(reply, REPLY_TYPES[kind]), (kind, reply)
        if isinstance(reply, list):
            assert all(type(item) in (Value, Oversized) for item in reply)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    stream = bytearray(draw(st.sampled_from([case[2] for case in PARSED])))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(stream)))
        action = draw(st.sampled_from(["flip", "drop", "insert", "cut"]))
        if action == "flip" and at < len(stream):
            stream[at] = draw(st.sampled_from(b"\r\n 0123456789-xVAEND\x00\xff"))
        elif action == "drop":
            del stream[at : at + draw(st.integers(1, 3))]
        elif action == "insert":
            stream[at:at] = draw(st.sampled_from([b"\r\n", b" ", b"9", b"99999999999", b"END\r\n", b"\x00"]))
        else:
            del stream[at:]
    return bytes(stream)


@FUZZ
@given(
    st.lists(st.sampled_from(ALL_EXPECTS), min_size=1, max_size=4),
    st.one_of(st.binary(min_size=1, max_size=200), mutated()),
    st.randoms(use_true_random=False),
)
def test_random_or_mutated_bytes_give_protocol_error_or_well_typed_replies(
    expects: list[tuple[Any, ...]], stream: bytes, rng: random.Random
) -> None:
    parse_hostile(expects, [stream])
    parse_hostile(expects, random_chunks(stream, rng))


# -- fuzz: valid streams stay in sync however they are split --------------------------------------

TOKENS = st.binary(min_size=1, max_size=12).map(lambda b: bytes(33 + c % 94 for c in b))
DATA = st.one_of(st.binary(max_size=80), st.sampled_from([b"", b"\r\n", b"END\r\n", b"VALUE k 0 1\r\n"]))


@st.composite
def valid_reply(draw: st.DrawFn) -> tuple[tuple[Any, ...], bytes, Any]:
    """``(expect args, wire bytes, parsed reply)``, with max_value 64."""
    kind = draw(st.sampled_from([e[0] for e in ALL_EXPECTS]))
    if kind in (Expect.VALUES, Expect.CAS_VALUES):
        items = draw(
            st.lists(st.tuples(TOKENS, st.integers(0, U32_MAX), DATA, st.integers(0, U64_MAX)), max_size=3)
        )
        wire, parsed = b"", []
        for key, flags, data, cas in items:
            with_cas = kind == Expect.CAS_VALUES or draw(st.booleans())
            wire += b"VALUE %b %d %d%b\r\n%b\r\n" % (
                key,
                flags,
                len(data),
                b" %d" % cas if with_cas else b"",
                data,
            )
            item = Value(key, flags, data, cas if with_cas else None)
            parsed.append(item if len(data) <= 64 else Oversized(key, len(data)))
        return (kind, False, frozenset(i[0] for i in items)), wire + b"END\r\n", parsed
    if kind == Expect.META:
        flags = draw(st.dictionaries(st.sampled_from([b"c", b"f", b"t", b"k", b"W"]), TOKENS, max_size=3))
        head = b"".join(b" " + name + value for name, value in flags.items())
        if draw(st.booleans()):
            data = draw(DATA)
            parsed = (
                Meta(b"VA", flags, data) if len(data) <= 64 else Oversized(flags.get(b"k", b""), len(data))
            )
            return (kind,), b"VA %d%b\r\n%b\r\n" % (len(data), head, data), parsed
        status = draw(st.sampled_from([b"HD", b"EN", b"NF", b"NS", b"EX", b"MN"]))
        return (kind,), status + head + b"\r\n", Meta(status, flags, None)
    if kind == Expect.STATS:
        stats = draw(st.dictionaries(TOKENS, TOKENS, max_size=4))
        return (kind,), b"".join(b"STAT %b %b\r\n" % kv for kv in stats.items()) + b"END\r\n", stats
    if kind == Expect.NUMBER:
        number = draw(st.integers(0, U64_MAX))
        return (kind,), b"%d\r\n" % number, number
    if kind == Expect.NOOP:
        return (kind,), b"SERVER_ERROR x\r\n" * draw(st.integers(0, 2)) + b"MN\r\n", None
    line, parsed = {
        Expect.STATUS: (b"NOT_STORED", b"NOT_STORED"),
        Expect.VERSION: (b"VERSION 1.6.18", b"1.6.18"),
        Expect.OK: (b"OK", b"OK"),
    }[kind]
    if draw(st.booleans()):
        line, parsed = b"SERVER_ERROR busy", ErrorReply("SERVER_ERROR", "busy", False)
    return (kind,), line + b"\r\n", parsed


@FUZZ
@given(st.lists(valid_reply(), min_size=1, max_size=8), st.randoms(use_true_random=False))
def test_valid_stream_split_anywhere_parses_to_the_same_replies(
    replies: list[tuple[tuple[Any, ...], bytes, Any]], rng: random.Random
) -> None:
    expects = [r[0] for r in replies]
    stream = b"".join(r[1] for r in replies)
    expected = [r[2] for r in replies if r[0][0] != Expect.NOOP]
    assert parse(expects, [stream], max_value=64) == expected
    assert parse(expects, random_chunks(stream, rng), max_value=64) == expected
    assert parse(expects, random_chunks(stream, rng, most=len(stream) // 4 + 1), max_value=64) == expected


def test_many_pipelined_get_replies_over_the_copy_limit_parse_in_order() -> None:
    # More than _COPY_WHOLE_BUFFER buffered at once (each reply is then copied up to its own END),
    # and values that hold "\r\nEND\r\n" (the copy is cut inside them: the line path reads them).
    replies, stream, expects = [], b"", []
    for n in range(60):
        keys = [b"k%d-%d" % (n, i) for i in range(20)]
        items = [
            Value(k, i, (b"\r\nEND\r\n" if i % 7 == 0 else b"v") * 140, None) for i, k in enumerate(keys)
        ]
        stream += b"".join(b"VALUE %b %d %d\r\n%b\r\n" % (v.key, v.flags, len(v.data), v.data) for v in items)
        stream += b"END\r\n"
        replies.append(items)
        expects.append((Expect.VALUES, False, frozenset(keys)))
    assert len(stream) > 256 * 1024
    parser = ReplyParser(max_value=1024)
    parser.expect_many(expects)
    parser.feed(stream)
    assert parser.next_many(100) == replies
    assert parser.pending == 0
    assert not parser.buffered


def test_whole_parses_a_single_reply_at_once_and_declines_anything_else() -> None:
    parser = ReplyParser(max_value=100)
    assert parser.whole(Expect.STATUS, b"STORED\r\n", None) == b"STORED"
    assert parser.whole(Expect.VALUES, b"END\r\n", b"k") == []
    assert parser.whole(Expect.VALUES, b"VALUE k 5 3\r\nabc\r\nEND\r\n", b"k") == [
        Value(b"k", 5, b"abc", None)
    ]
    assert parser.whole(Expect.CAS_VALUES, b"VALUE k 0 1 77\r\nx\r\nEND\r\n", b"k") == [
        Value(b"k", 0, b"x", 77)
    ]
    many = b"VALUE a 1 1\r\nx\r\nVALUE b 2 2\r\nyz\r\nEND\r\n"
    assert parser.whole(Expect.VALUES, many, frozenset([b"a", b"b", b"c"])) == [
        Value(b"a", 1, b"x", None),
        Value(b"b", 2, b"yz", None),
    ]
    declined = [
        (Expect.STATUS, b"STORED\r\nSTORED\r\n", None),  # two lines: not one reply
        (Expect.VALUES, b"VALUE j 0 1\r\nx\r\nEND\r\n", b"k"),  # another key
        (Expect.VALUES, b"VALUE k 0 2\r\nx\r\nEND\r\n", b"k"),  # wrong length
        (Expect.VALUES, b"VALUE k 0 101\r\n" + b"x" * 101 + b"\r\nEND\r\n", b"k"),  # over max_value
        (Expect.VALUES, b"VALUE k 4294967296 1\r\nx\r\nEND\r\n", b"k"),  # flags over 32 bits
        (Expect.VALUES, b"VALUE k 0 1\r\nx\r\n", b"k"),  # not whole
        (Expect.CAS_VALUES, b"VALUE k 0 1\r\nx\r\nEND\r\n", b"k"),  # no CAS
        (Expect.CAS_VALUES, b"VALUE k 0 1 18446744073709551616\r\nx\r\nEND\r\n", b"k"),  # CAS over 64 bits
        (Expect.VALUES, b"VALUE k 0 1\r\nx\r\nEND\r\nEND\r\n", frozenset([b"k"])),  # more than one reply
        (Expect.VALUES, b"VALUE j 0 1\r\nx\r\nEND\r\n", frozenset([b"k"])),  # a key not asked for
        (Expect.VALUES, b"VALUE k 0 1\r\nx\r\nEND\r\n", None),  # wanted unknown: the checking path
        (Expect.NUMBER, b"42\r\n", None),  # not a kind it reads
    ]
    for kind, data, wanted in declined:
        assert parser.whole(kind, data, wanted) is None, data
    parser.expect(Expect.NOOP)  # something pending before: declined, untouched
    assert parser.whole(Expect.STATUS, b"STORED\r\n", None) is None
    assert parser.pending == 1


def test_expect_many_takes_pairs_and_triples_and_refuses_a_bad_kind() -> None:
    parser = ReplyParser()
    parser.expect_many([(Expect.STATUS, True), (Expect.STATUS, False)])
    parser.expect_many([(Expect.VALUES, False, b"k")])
    assert parser.pending == 3
    with pytest.raises(ArgumentError, match="not an Expect kind: 99"):
        parser.expect_many([(Expect.STATUS, True), (99, False)])
    assert parser.pending == 3  # nothing added
    parser.feed(b"STORED\r\nNOT_STORED\r\nEND\r\n")
    assert parser.next_many(5) == [b"STORED", b"NOT_STORED", []]
