"""Unit tests for shardcache.serde: round trips, the wire format, pymemcache interop, and refusals."""

from __future__ import annotations

import collections
import datetime
import decimal
import enum
import pickle
import random
import threading
import zlib
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pymemcache import serde as pm
from pymemcache.exceptions import MemcacheIllegalInputError

from shardcache import serde
from shardcache.errors import ConfigurationError, SerializationError
from shardcache.serde import (
    FLAG_BYTES,
    FLAG_COMPRESSED,
    FLAG_INTEGER,
    FLAG_JSON,
    FLAG_LONG,
    FLAG_PICKLE,
    FLAG_SIGNED_PICKLE,
    FLAG_TEXT,
    CompressedSerde,
    DefaultSerde,
    PickleSerde,
    Serde,
    SignedPickleSerde,
    default_serde,
)

SECRET = b"k" * 32
OTHER_SECRET = b"o" * 32
KEY = "books/321"

# Unpickling an _Canary appends to this list: it proves whether a serde ever unpickled a payload.
UNPICKLED: list[str] = []


def _record_unpickle(tag: str) -> str:
    UNPICKLED.append(tag)
    return tag


class _Canary:
    def __reduce__(self) -> tuple[Any, ...]:
        return (_record_unpickle, ("canary",))


@pytest.fixture(autouse=True)
def _clear_canary() -> None:
    UNPICKLED.clear()


@dataclass(frozen=True)
class Book:
    title: str
    pages: int


class Color(enum.IntEnum):
    RED = 1


class MyStr(str):
    pass


Point = collections.namedtuple("Point", "x y")


def wire(payload: Any) -> bytes:
    """What pymemcache's Client sends for a serializer's payload (it returns ints as str)."""
    return payload if isinstance(payload, bytes) else str(payload).encode("ascii")


def canonical(value: Any) -> str:
    """repr after JSON's one allowed change (tuple -> list); repr tells 1/1.0/True and 0.0/-0.0 apart."""
    if isinstance(value, tuple | list):
        return "[" + ", ".join(canonical(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {canonical(v)}" for k, v in value.items()) + "}"
    return repr(value)


def short_id(value: Any) -> str:
    return f"{type(value).__name__}-{len(str(value)) if type(value) is not int else value.bit_length()}"


def round_trip(s: Serde, value: Any, key: str | bytes = KEY) -> Any:
    payload, flags = s.serialize(key, value)
    assert type(payload) is bytes
    return s.deserialize(key, payload, flags)


json_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=5)
        | st.lists(children, max_size=5).map(tuple)
        | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=25,
)


# --- the flag table ------------------------------------------------------------------------------


def test_pymemcache_flag_values_are_the_ones_pymemcache_uses() -> None:
    assert (FLAG_BYTES, FLAG_PICKLE, FLAG_INTEGER, FLAG_LONG, FLAG_COMPRESSED, FLAG_TEXT) == (
        pm.FLAG_BYTES,
        pm.FLAG_PICKLE,
        pm.FLAG_INTEGER,
        pm.FLAG_LONG,
        pm.FLAG_COMPRESSED,
        pm.FLAG_TEXT,
    )


def test_own_flag_bits_are_single_bits_pymemcache_does_not_use() -> None:
    pymemcache_bits = pm.FLAG_PICKLE | pm.FLAG_INTEGER | pm.FLAG_LONG | pm.FLAG_COMPRESSED | pm.FLAG_TEXT
    for flag in (FLAG_JSON, FLAG_SIGNED_PICKLE):
        assert flag & (flag - 1) == 0
        assert flag & pymemcache_bits == 0
    assert FLAG_JSON != FLAG_SIGNED_PICKLE


def test_module_all_lists_each_public_name_once() -> None:
    # ruff's RUF022 keeps the order (constants, classes, then the rest, each sorted)
    assert len(set(serde.__all__)) == len(serde.__all__)
    for name in serde.__all__:
        assert hasattr(serde, name)


def test_serde_protocol_accepts_pymemcache_and_shardcache_serdes() -> None:
    candidates = [
        pm.pickle_serde,
        pm.compressed_serde,
        pm.PickleSerde(),
        default_serde,
        PickleSerde(),
        SignedPickleSerde(SECRET),
        CompressedSerde(default_serde),
    ]
    for candidate in candidates:
        assert isinstance(candidate, Serde)
    assert not isinstance(object(), Serde)


# --- DefaultSerde: round trips -------------------------------------------------------------------


@pytest.mark.parametrize("value", [b"", b"abc", bytearray(b"abc"), memoryview(b"abc"), b"\x00\xff\r\n"])
def test_bytes_like_values_are_stored_as_is_with_flag_0_and_read_back_as_bytes(value: Any) -> None:
    payload, flags = default_serde.serialize(KEY, value)
    assert (payload, flags) == (bytes(value), FLAG_BYTES)
    out = default_serde.deserialize(KEY, payload, flags)
    assert type(out) is bytes
    assert out == bytes(value)


def test_bytes_are_serialized_and_deserialized_without_a_copy() -> None:
    value = b"x" * 1000
    payload, flags = default_serde.serialize(KEY, value)
    assert payload is value
    assert default_serde.deserialize(KEY, payload, flags) is payload


@pytest.mark.parametrize("stored", [bytearray(b"abc"), memoryview(b"abc")])
def test_flag_0_deserializes_to_bytes_whatever_buffer_it_is_given(stored: Any) -> None:
    out = default_serde.deserialize(KEY, stored, FLAG_BYTES)
    assert type(out) is bytes
    assert out == b"abc"


@pytest.mark.parametrize("value", ["", "hello", "héllo wörld", "日本語", "emoji 🎉", "a\x00b"])
def test_str_is_stored_as_utf8_with_flag_16(value: str) -> None:
    assert default_serde.serialize(KEY, value) == (value.encode("utf-8"), FLAG_TEXT)
    assert round_trip(default_serde, value) == value


@pytest.mark.parametrize("value", [0, 1, -1, 42, 2**63, 2**64 - 1, 2**64, -(2**100)])
def test_int_is_stored_as_decimal_ascii_with_flag_2(value: int) -> None:
    assert default_serde.serialize(KEY, value) == (str(value).encode("ascii"), FLAG_INTEGER)
    out = round_trip(default_serde, value)
    assert type(out) is int
    assert out == value


def test_int_shrunk_by_memcached_decr_reads_back_despite_space_padding() -> None:
    # memcached keeps the item length on decr and pads the shorter number with spaces.
    assert default_serde.deserialize(KEY, b"9  ", FLAG_INTEGER) == 9


def test_flag_long_from_python2_pymemcache_reads_as_int() -> None:
    assert default_serde.deserialize(KEY, b"12345678901234567890", FLAG_LONG) == 12345678901234567890


@pytest.mark.parametrize(
    ("value", "stored"),
    [
        (True, b"true"),
        (False, b"false"),
        (None, b"null"),
        (1.5, b"1.5"),
        ([1, "a", None], b'[1,"a",null]'),
        ({"a": [True, 2.0]}, b'{"a":[true,2.0]}'),
        ({"é": "ü"}, '{"é":"ü"}'.encode()),
    ],
)
def test_bool_float_none_and_containers_are_compact_json_with_flag_256(value: Any, stored: bytes) -> None:
    assert default_serde.serialize(KEY, value) == (stored, FLAG_JSON)
    assert canonical(round_trip(default_serde, value)) == canonical(value)


def test_bool_reads_back_as_bool_not_int() -> None:
    assert round_trip(default_serde, True) is True
    assert round_trip(default_serde, False) is False


def test_tuple_reads_back_as_list() -> None:
    assert round_trip(default_serde, (1, (2, "x"))) == [1, [2, "x"]]


@pytest.mark.parametrize("value", [0.1, -0.0, 1e-300, 5e-324, 1.7976931348623157e308, 2.0**53 + 2])
def test_floats_round_trip_bit_for_bit(value: float) -> None:
    assert repr(round_trip(default_serde, value)) == repr(value)


# 100 examples (was 300; Hypothesis's default): drawing nested values is most of the cost.
# The same strategy also reaches DefaultSerde through the CompressedSerde round-trip test below.
@settings(max_examples=100, database=None)
@given(json_values)
def test_json_able_values_round_trip_exactly_except_tuples_become_lists(value: Any) -> None:
    assert canonical(round_trip(default_serde, value)) == canonical(value)


@settings(database=None)
@given(st.binary() | st.text() | st.integers())
def test_bytes_str_and_int_round_trip_with_their_type(value: Any) -> None:
    out = round_trip(default_serde, value)
    assert type(out) is type(value)
    assert out == value


# --- DefaultSerde: refusals ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        ({1, 2}, "set"),
        (frozenset(), "frozenset"),
        (object(), "object"),
        (1j, "complex"),
        (decimal.Decimal("1.5"), "decimal.Decimal"),
        (datetime.date(2024, 1, 1), "datetime.date"),
        (Book("Dune", 412), "Book"),
        (Color.RED, "Color"),
        (MyStr("x"), "MyStr"),
        (collections.OrderedDict(a=1), "collections.OrderedDict"),
        (Point(1, 2), "Point"),
    ],
)
def test_values_json_cannot_reproduce_exactly_are_refused_naming_key_and_type(
    value: Any, type_name: str
) -> None:
    with pytest.raises(SerializationError) as info:
        default_serde.serialize(KEY, value)
    message = str(info.value)
    assert repr(KEY) in message
    assert type_name in message
    assert "PickleSerde" in message


def test_serialization_error_is_a_pymemcache_illegal_input_error() -> None:
    with pytest.raises(MemcacheIllegalInputError):
        default_serde.serialize(KEY, {1, 2})


@pytest.mark.parametrize("value", [{1: "a"}, {("a",): 1}, {None: 1}, {True: 1}, [{"ok": {2.5: 1}}]])
def test_dict_keys_that_are_not_str_are_refused(value: Any) -> None:
    with pytest.raises(SerializationError, match="is not a str"):
        default_serde.serialize(KEY, value)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), [1.0, float("nan")]])
def test_nan_and_infinity_are_refused(value: Any) -> None:
    with pytest.raises(SerializationError, match="no JSON form"):
        default_serde.serialize(KEY, value)


def test_refusal_of_nested_value_names_where_it_is() -> None:
    with pytest.raises(SerializationError, match=r"type set is not supported at value\['tags'\]\[1\]"):
        default_serde.serialize(KEY, {"title": "Dune", "tags": ["scifi", {"x"}]})


@pytest.mark.parametrize("value", ["\ud800", ["ok", "\udfff"], {"\ud800": 1}])
def test_strings_that_are_not_valid_unicode_are_refused(value: Any) -> None:
    with pytest.raises(SerializationError, match=repr(KEY)):
        default_serde.serialize(KEY, value)


def test_nesting_deeper_than_the_limit_is_refused() -> None:
    value: Any = []
    for _ in range(200):
        value = [value]
    with pytest.raises(SerializationError, match="deeper than"):
        default_serde.serialize(KEY, value)


def test_self_referencing_list_is_refused() -> None:
    value: list[Any] = []
    value.append(value)
    with pytest.raises(SerializationError, match="deeper than"):
        default_serde.serialize(KEY, value)


@pytest.mark.parametrize("value", [10**5000, [10**5000]], ids=["int", "int-in-list"])
def test_int_too_long_to_print_is_refused(value: Any) -> None:
    with pytest.raises(SerializationError, match=repr(KEY)):
        default_serde.serialize(KEY, value)


def test_pickle_flag_is_refused_explaining_the_risk_and_how_to_opt_in() -> None:
    payload = pickle.dumps(_Canary())
    with pytest.raises(SerializationError) as info:
        default_serde.deserialize(KEY, payload, FLAG_PICKLE)
    message = str(info.value)
    assert "remote code execution" in message
    assert "SignedPickleSerde" in message
    assert "PickleSerde()" in message
    assert UNPICKLED == []


def test_item_written_by_pymemcache_pickle_serde_is_refused_not_unpickled() -> None:
    payload, flags = pm.pickle_serde.serialize(KEY, _Canary())
    with pytest.raises(SerializationError, match="does not unpickle"):
        default_serde.deserialize(KEY, wire(payload), flags)
    assert UNPICKLED == []


@pytest.mark.parametrize("flags", [1 << 5, FLAG_TEXT | FLAG_INTEGER, 1 << 20, 2**32 - 1])
def test_unknown_flags_are_refused_naming_key_and_flags(flags: int) -> None:
    with pytest.raises(SerializationError) as info:
        default_serde.deserialize(KEY, b"x", flags)
    assert repr(KEY) in str(info.value)
    assert f"flags {flags}" in str(info.value)


def test_compressed_item_is_refused_with_a_hint_to_wrap_in_compressed_serde() -> None:
    with pytest.raises(SerializationError, match=r"CompressedSerde\(serde\)"):
        default_serde.deserialize(KEY, zlib.compress(b"x"), FLAG_TEXT | FLAG_COMPRESSED)


def test_signed_pickle_item_is_refused_by_default_serde() -> None:
    payload, flags = SignedPickleSerde(SECRET).serialize(KEY, _Canary())
    with pytest.raises(SerializationError, match="SignedPickleSerde"):
        default_serde.deserialize(KEY, payload, flags)
    assert UNPICKLED == []


@pytest.mark.parametrize(
    ("stored", "flags"),
    [
        (b"\xff\xfe", FLAG_TEXT),
        (b"", FLAG_INTEGER),
        (b"12a", FLAG_INTEGER),
        (b"1.5", FLAG_LONG),
        (b"{", FLAG_JSON),
        (b"NaN", FLAG_JSON),
        (b"[Infinity]", FLAG_JSON),
        (b"\xff", FLAG_JSON),
        (b"[" * 100_000, FLAG_JSON),
    ],
)
def test_malformed_stored_bytes_raise_serialization_error_naming_key(stored: bytes, flags: int) -> None:
    with pytest.raises(SerializationError, match="malformed") as info:
        default_serde.deserialize(KEY, stored, flags)
    assert repr(KEY) in str(info.value)


def test_bytes_keys_are_named_in_errors_too() -> None:
    with pytest.raises(SerializationError, match=r"b'books/321'"):
        default_serde.serialize(b"books/321", {1, 2})


# --- interop with pymemcache's serde -------------------------------------------------------------


@settings(database=None)
@given(st.binary() | st.text() | st.integers(min_value=-(2**80), max_value=2**80))
def test_pymemcache_reads_bytes_str_and_int_written_by_default_serde(value: Any) -> None:
    payload, flags = default_serde.serialize(KEY, value)
    out = pm.python_memcache_deserializer(KEY, payload, flags)
    assert type(out) is type(value)
    assert out == value


@settings(database=None)
@given(st.binary() | st.text() | st.integers(min_value=-(2**80), max_value=2**80))
def test_default_serde_reads_bytes_str_and_int_written_by_pymemcache(value: Any) -> None:
    payload, flags = pm.python_memcache_serializer(KEY, value)
    out = default_serde.deserialize(KEY, wire(payload), flags)
    assert type(out) is type(value)
    assert out == value


@pytest.mark.parametrize("value", [b"raw", "text", 7, -7])
def test_pickle_serdes_store_bytes_str_and_int_exactly_like_default_serde(value: Any) -> None:
    expected = default_serde.serialize(KEY, value)
    assert PickleSerde().serialize(KEY, value) == expected
    assert SignedPickleSerde(SECRET).serialize(KEY, value) == expected
    payload, flags = pm.pickle_serde.serialize(KEY, value)
    assert (wire(payload), flags) == expected


# --- PickleSerde ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [Book("Dune", 412), {1, 2}, (1, 2), {1: "a"}, 1.5, None, True, bytearray(b"ba"), Color.RED],
)
def test_pickle_serde_round_trips_arbitrary_objects_with_their_type(value: Any) -> None:
    payload, flags = PickleSerde().serialize(KEY, value)
    assert flags == FLAG_PICKLE
    out = PickleSerde().deserialize(KEY, payload, flags)
    assert type(out) is type(value)
    assert out == value


@pytest.mark.parametrize("value", [Book("Dune", 412), {"a": (1, 2)}, 2.5, None])
def test_pickle_serde_and_pymemcache_pickle_serde_read_each_others_pickles(value: Any) -> None:
    ours = PickleSerde()
    payload, flags = ours.serialize(KEY, value)
    assert pm.pickle_serde.deserialize(KEY, payload, flags) == value
    payload, flags = pm.pickle_serde.serialize(KEY, value)
    assert ours.deserialize(KEY, wire(payload), flags) == value


def test_pickle_serde_reads_json_items_written_by_default_serde() -> None:
    payload, flags = default_serde.serialize(KEY, {"a": [1, None]})
    assert PickleSerde().deserialize(KEY, payload, flags) == {"a": [1, None]}


def test_pickle_serde_uses_the_requested_protocol() -> None:
    payload, _ = PickleSerde(protocol=2).serialize(KEY, [1])
    assert payload.startswith(b"\x80\x02")


@pytest.mark.parametrize("protocol", [-1, pickle.HIGHEST_PROTOCOL + 1, "5", 2.0, True])
def test_pickle_serde_rejects_bad_protocol_naming_the_option(protocol: Any) -> None:
    with pytest.raises(ConfigurationError, match="protocol"):
        PickleSerde(protocol=protocol)


@pytest.mark.parametrize("value", [lambda: 1, threading.Lock()])
def test_pickle_serde_raises_serialization_error_for_unpicklable_values(value: Any) -> None:
    with pytest.raises(SerializationError, match="pickling failed"):
        PickleSerde().serialize(KEY, value)


def test_pickle_serde_raises_instead_of_returning_none_for_a_corrupt_pickle() -> None:
    with pytest.raises(SerializationError, match="unpickling failed"):
        PickleSerde().deserialize(KEY, b"\x80\x05garbage", FLAG_PICKLE)


def test_pickle_serde_refuses_signed_items() -> None:
    payload, flags = SignedPickleSerde(SECRET).serialize(KEY, [1])
    with pytest.raises(SerializationError, match="SignedPickleSerde"):
        PickleSerde().deserialize(KEY, payload, flags)


# --- SignedPickleSerde ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", [Book("Dune", 412), {1, 2}, (1, 2), 1.5, None, {"a": [1]}])
def test_signed_pickle_round_trips_with_its_own_flag(value: Any) -> None:
    signed = SignedPickleSerde(SECRET)
    payload, flags = signed.serialize(KEY, value)
    assert flags == FLAG_SIGNED_PICKLE
    assert signed.deserialize(KEY, payload, flags) == value


def test_signed_pickle_refuses_every_single_byte_tamper_without_unpickling() -> None:
    signed = SignedPickleSerde(SECRET)
    payload, flags = signed.serialize(KEY, _Canary())
    assert signed.deserialize(KEY, payload, flags) == "canary"  # sanity: the canary works
    UNPICKLED.clear()
    for i in range(len(payload)):
        for bit in (0x01, 0x80):
            tampered = bytearray(payload)
            tampered[i] ^= bit
            with pytest.raises(SerializationError, match="signature mismatch"):
                signed.deserialize(KEY, bytes(tampered), flags)
    assert UNPICKLED == []


@pytest.mark.parametrize("cut", [0, 1, 32, 33])
def test_signed_pickle_refuses_truncated_or_missing_tag(cut: int) -> None:
    signed = SignedPickleSerde(SECRET)
    payload, flags = signed.serialize(KEY, [1, 2, 3])
    with pytest.raises(SerializationError, match="signature mismatch"):
        signed.deserialize(KEY, payload[:cut], flags)


def test_signed_pickle_refuses_a_bare_pickle_stored_under_its_flag() -> None:
    with pytest.raises(SerializationError, match="signature mismatch"):
        SignedPickleSerde(SECRET).deserialize(KEY, pickle.dumps(_Canary()), FLAG_SIGNED_PICKLE)
    assert UNPICKLED == []


def test_signed_pickle_refuses_values_signed_with_another_secret() -> None:
    payload, flags = SignedPickleSerde(OTHER_SECRET).serialize(KEY, _Canary())
    with pytest.raises(SerializationError, match="signature mismatch"):
        SignedPickleSerde(SECRET).deserialize(KEY, payload, flags)
    assert UNPICKLED == []


def test_signed_pickle_verifies_with_old_secrets_and_signs_with_the_first() -> None:
    old = SignedPickleSerde(OTHER_SECRET)
    rotated = SignedPickleSerde(SECRET, old_secrets=[OTHER_SECRET])
    payload, flags = old.serialize(KEY, Book("Dune", 412))
    assert rotated.deserialize(KEY, payload, flags) == Book("Dune", 412)
    payload, flags = rotated.serialize(KEY, Book("Emma", 300))
    assert SignedPickleSerde(SECRET).deserialize(KEY, payload, flags) == Book("Emma", 300)
    with pytest.raises(SerializationError, match="signature mismatch"):
        old.deserialize(KEY, payload, flags)


def test_signed_pickle_refuses_a_value_copied_to_another_key() -> None:
    signed = SignedPickleSerde(SECRET)
    payload, flags = signed.serialize("user/1/profile", {"admin": False})
    with pytest.raises(SerializationError, match="signature mismatch"):
        signed.deserialize("user/2/profile", payload, flags)


def test_signed_pickle_treats_a_str_key_and_its_utf8_bytes_as_the_same_key() -> None:
    signed = SignedPickleSerde(SECRET)
    payload, flags = signed.serialize("clé", [1])
    assert signed.deserialize("clé".encode(), payload, flags) == [1]


def test_signed_pickle_without_key_binding_accepts_a_value_under_another_key() -> None:
    unbound = SignedPickleSerde(SECRET, bind_key=False)
    payload, flags = unbound.serialize("a", [1])
    assert unbound.deserialize("b", payload, flags) == [1]
    with pytest.raises(SerializationError, match="signature mismatch"):
        SignedPickleSerde(SECRET).deserialize("a", payload, flags)


def test_signed_pickle_refuses_unsigned_pickles_without_unpickling() -> None:
    payload, flags = pm.pickle_serde.serialize(KEY, _Canary())
    with pytest.raises(SerializationError, match="does not unpickle"):
        SignedPickleSerde(SECRET).deserialize(KEY, wire(payload), flags)
    assert UNPICKLED == []


def test_signed_pickle_reads_plain_items_written_by_default_serde() -> None:
    signed = SignedPickleSerde(SECRET)
    for value in (b"raw", "text", 5, {"a": [1.5]}):
        payload, flags = default_serde.serialize(KEY, value)
        assert signed.deserialize(KEY, payload, flags) == value


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"secret": b"short"}, "secret"),
        ({"secret": "k" * 32}, "secret"),
        ({"secret": None}, "secret"),
        ({"secret": SECRET, "old_secrets": [OTHER_SECRET, b"short"]}, r"old_secrets\[1\]"),
        ({"secret": SECRET, "old_secrets": OTHER_SECRET}, "old_secrets"),
        ({"secret": SECRET, "protocol": 99}, "protocol"),
        ({"secret": SECRET, "bind_key": "yes"}, "bind_key"),
    ],
)
def test_signed_pickle_rejects_bad_configuration_naming_the_option(kwargs: Any, option: str) -> None:
    with pytest.raises(ConfigurationError, match=option):
        SignedPickleSerde(**kwargs)


def test_signed_pickle_accepts_a_16_byte_secret() -> None:
    assert round_trip(SignedPickleSerde(b"s" * 16), {1}) == {1}


def test_signed_pickle_repr_does_not_show_secrets() -> None:
    text = repr(SignedPickleSerde(SECRET, old_secrets=[OTHER_SECRET]))
    assert "kkkk" not in text
    assert "oooo" not in text


def test_signed_pickle_raises_serialization_error_for_unpicklable_values() -> None:
    with pytest.raises(SerializationError, match="pickling failed"):
        SignedPickleSerde(SECRET).serialize(KEY, threading.Lock())


# --- CompressedSerde -----------------------------------------------------------------------------


def test_payload_below_min_size_is_not_compressed() -> None:
    value = "a" * 399
    assert CompressedSerde(default_serde).serialize(KEY, value) == (value.encode(), FLAG_TEXT)


def test_payload_at_min_size_is_compressed_and_flagged() -> None:
    compressed = CompressedSerde(default_serde)
    payload, flags = compressed.serialize(KEY, "a" * 400)
    assert flags == FLAG_TEXT | FLAG_COMPRESSED
    assert zlib.decompress(payload) == b"a" * 400
    assert compressed.deserialize(KEY, payload, flags) == "a" * 400


def test_min_size_is_configurable() -> None:
    payload, flags = CompressedSerde(default_serde, min_size=50).serialize(KEY, b"b" * 50)
    assert flags == FLAG_BYTES | FLAG_COMPRESSED
    assert len(payload) < 50


def test_payload_that_does_not_shrink_is_stored_uncompressed() -> None:
    noise = random.Random(7).randbytes(2000)
    assert CompressedSerde(default_serde).serialize(KEY, noise) == (noise, FLAG_BYTES)


@pytest.mark.parametrize(
    "value",
    [b"b" * 1000, "s" * 1000, 10**600, {"rows": list(range(300))}, [None] * 500, b"short", 5],
    ids=short_id,
)
def test_compressed_default_serde_round_trips(value: Any) -> None:
    assert round_trip(CompressedSerde(default_serde), value) == value


@pytest.mark.parametrize("value", [b"b" * 1000, "s" * 1000, 10**600, b"short", "short", 5], ids=short_id)
def test_pymemcache_compressed_serde_reads_what_compressed_serde_writes(value: Any) -> None:
    payload, flags = CompressedSerde(default_serde).serialize(KEY, value)
    assert pm.compressed_serde.deserialize(KEY, payload, flags) == value


# pymemcache's compressed_serde itself fails on ints over 400 digits (zlib gets a str), so none here.
@pytest.mark.parametrize("value", [b"b" * 1000, "s" * 1000, b"short", "short", 5])
def test_compressed_serde_reads_what_pymemcache_compressed_serde_writes(value: Any) -> None:
    payload, flags = pm.compressed_serde.serialize(KEY, value)
    assert CompressedSerde(default_serde).deserialize(KEY, wire(payload), flags) == value


def test_compressed_serde_over_pymemcache_pickle_serde_returns_bytes_for_int() -> None:
    compressed = CompressedSerde(pm.pickle_serde)
    payload, flags = compressed.serialize(KEY, 42)
    assert (payload, flags) == (b"42", FLAG_INTEGER)
    big = {"a": list(range(500))}
    payload, flags = compressed.serialize(KEY, big)
    assert flags == FLAG_PICKLE | FLAG_COMPRESSED
    assert compressed.deserialize(KEY, payload, flags) == big


def test_compressed_signed_pickle_round_trips_and_still_refuses_tampering() -> None:
    compressed = CompressedSerde(SignedPickleSerde(SECRET))
    value = {"rows": [Book("Dune", i) for i in range(100)]}
    payload, flags = compressed.serialize(KEY, value)
    assert flags == FLAG_SIGNED_PICKLE | FLAG_COMPRESSED
    assert compressed.deserialize(KEY, payload, flags) == value
    inner = bytearray(zlib.decompress(payload))
    inner[-2] ^= 1
    with pytest.raises(SerializationError, match="signature mismatch"):
        compressed.deserialize(KEY, zlib.compress(bytes(inner)), flags)


def test_inner_serde_sees_flags_with_the_compressed_bit_cleared() -> None:
    seen: list[int] = []

    class Recorder:
        def serialize(self, key: str | bytes, value: Any) -> tuple[bytes, int]:
            return value, FLAG_JSON

        def deserialize(self, key: str | bytes, value: bytes, flags: int) -> Any:
            seen.append(flags)
            return value

    compressed = CompressedSerde(Recorder())
    payload, flags = compressed.serialize(KEY, b"z" * 1000)
    assert flags == FLAG_JSON | FLAG_COMPRESSED
    assert compressed.deserialize(KEY, payload, flags) == b"z" * 1000
    assert seen == [FLAG_JSON]


def test_zlib_bomb_beyond_max_decompressed_size_is_refused() -> None:
    bomb = zlib.compress(b"\x00" * 10_000_000, 9)
    assert len(bomb) < 20_000
    with pytest.raises(SerializationError, match="max_decompressed_size"):
        CompressedSerde(default_serde, max_decompressed_size=1_000_000).deserialize(
            KEY, bomb, FLAG_BYTES | FLAG_COMPRESSED
        )


@pytest.mark.parametrize(
    ("stored", "match"),
    [(b"not zlib", "bad zlib data"), (zlib.compress(b"x" * 1000)[:-5], "truncated zlib data")],
)
def test_corrupt_compressed_data_raises_serialization_error(stored: bytes, match: str) -> None:
    with pytest.raises(SerializationError, match=match):
        CompressedSerde(default_serde).deserialize(KEY, stored, FLAG_BYTES | FLAG_COMPRESSED)


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"inner": object()}, "inner"),
        ({"min_size": -1}, "min_size"),
        ({"min_size": 1.5}, "min_size"),
        ({"level": 10}, "level"),
        ({"level": -2}, "level"),
        ({"max_decompressed_size": 0}, "max_decompressed_size"),
    ],
)
def test_compressed_serde_rejects_bad_configuration_naming_the_option(kwargs: Any, option: str) -> None:
    kwargs = {"inner": default_serde, **kwargs}
    with pytest.raises(ConfigurationError, match=option):
        CompressedSerde(**kwargs)


@settings(max_examples=100, database=None)
@given(json_values | st.binary())
def test_compressed_default_serde_round_trips_any_supported_value(value: Any) -> None:
    compressed = CompressedSerde(DefaultSerde(), min_size=0)
    assert canonical(round_trip(compressed, value)) == canonical(value)
