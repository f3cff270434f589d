"""Node spec parsing: every accepted form, and a clear error naming each bad entry."""

import pytest

from shardcache import ConfigurationError, NodeSpec, parse_nodes
from shardcache.nodes import MAX_WEIGHT, parse_node


@pytest.mark.parametrize(
    ("entry", "node_id", "weight"),
    [
        ("10.0.0.1:11211", "10.0.0.1:11211", 1),
        ("cache-1", "cache-1:11211", 1),
        ("cache-1:11212:3", "cache-1:11212", 3),
        ("  cache-1:11212  ", "cache-1:11212", 1),
        ("[::1]:11211", "[::1]:11211", 1),
        ("[::1]", "[::1]:11211", 1),
        ("[2001:db8::7]:11300:2", "[2001:db8::7]:11300", 2),
        ("unix:/run/memcached.sock", "unix:/run/memcached.sock", 1),
        (("10.0.0.1", 11211), "10.0.0.1:11211", 1),
        (("10.0.0.1", 11300, 5), "10.0.0.1:11300", 5),
        (("::1", 11211), "[::1]:11211", 1),
        (["h", "11299"], "h:11299", 1),
        (NodeSpec("h", 1, 2), "h:1", 2),
    ],
)
def test_accepted_forms_give_canonical_ids(entry: object, node_id: str, weight: int) -> None:
    spec = parse_node(entry)
    assert spec.node_id == node_id
    assert spec.weight == weight


def test_twemproxy_alias_is_kept_for_hashing() -> None:
    spec = parse_node("10.0.0.1:11211:2 alpha")
    assert (spec.node_id, spec.weight, spec.alias) == ("10.0.0.1:11211", 2, "alpha")


def test_unix_spec_address_is_the_path() -> None:
    spec = parse_node("unix:/tmp/mc.sock")
    assert spec.unix and spec.address == "/tmp/mc.sock"
    assert parse_node("h:1").address == ("h", 1)


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ("", "empty host"),
        (":11211", "empty host"),
        ("h:0", "out of range"),
        ("h:65536", "out of range"),
        ("h:port", "must be a number"),
        pytest.param("h:" + "9" * 5000, "out of range", id="h:<5000 nines>"),
        ("h:11211:0", "weight"),
        ("h:11211:-1", "weight"),
        ("h:11211:1.5", "weight"),
        ("h:1:2:3", "too many"),
        ("::1", "brackets"),
        ("[::1", "missing ']'"),
        ("[::1]x", "':port'"),
        ("ho st:1", "whitespace"),
        ("h\r\n:1", "invalid character"),
        ("h:1:2 bad alias", "whitespace"),
        ("unix:relative.sock", "absolute"),
        (("h", 0), "out of range"),
        (("h", True), "port must be an int"),
        (("h", 1, 0), "weight"),
        (("h", 1, True), "weight"),
        (("h", 1, 2.0), "weight"),
        (("", 1), "empty host"),
        (("h",), "expected (host, port)"),
        (42, "expected a string"),
    ],
)
def test_bad_spec_raises_configuration_error_naming_it(entry: object, fragment: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        parse_node(entry)
    assert fragment in str(info.value)
    assert repr(entry) in str(info.value)


def test_duplicates_are_refused_naming_both_entries() -> None:
    with pytest.raises(ConfigurationError, match=r"'h:11211'.*duplicate of 'h'"):
        parse_nodes(["h", "h:11211"])


def test_empty_list_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="empty"):
        parse_nodes([])
    with pytest.raises(ConfigurationError, match="empty"):
        parse_nodes(" , ")


def test_comma_and_semicolon_strings_are_split() -> None:
    assert [s.node_id for s in parse_nodes("a:1, b:2;c")] == ["a:1", "b:2", "c:11211"]


def test_single_tuple_is_one_server() -> None:
    assert [s.node_id for s in parse_nodes(("127.0.0.1", 11211))] == ["127.0.0.1:11211"]


def test_the_callers_list_is_not_mutated() -> None:
    servers = ["a:1", "b:2"]
    parse_nodes(servers)
    assert servers == ["a:1", "b:2"]


# Each bad weight of issue 10, and what the error must say about it (it also names the whole entry).
BAD_WEIGHTS = [
    (0, "weight 0 out of range 1..1000"),
    (-1, "weight -1 out of range 1..1000"),
    (1.5, "weight must be an int in 1..1000, got 1.5"),
    (True, "weight must be an int in 1..1000, got True"),
    ("2", "weight must be an int in 1..1000, got '2'"),
    (10**9, "weight 1000000000 out of range 1..1000"),
    (1e9, "weight must be an int in 1..1000, got 1000000000.0"),
]


@pytest.mark.parametrize(("weight", "fragment"), BAD_WEIGHTS, ids=[repr(w) for w, _ in BAD_WEIGHTS])
def test_bad_weight_raises_configuration_error_naming_the_value(weight: object, fragment: str) -> None:
    entries = [
        ("h", 1, weight),
        NodeSpec("h", 1, weight),  # type: ignore[arg-type]
        NodeSpec("/run/mc.sock", 0, weight, unix=True),  # type: ignore[arg-type]
    ]
    for entry in entries:
        with pytest.raises(ConfigurationError) as info:
            parse_node(entry)
        assert fragment in str(info.value)
        assert repr(entry) in str(info.value)


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ("h:1:0", "weight 0 out of range"),
        ("h:1:-1", "got '-1'"),
        ("h:1:1.5", "got '1.5'"),
        ("h:1:True", "got 'True'"),
        ("h:1:1000000000", "weight 1000000000 out of range"),
        ("h:1:1e9", "got '1e9'"),
        ("[::1]:1:1001", "weight 1001 out of range"),
        # checked before int(), which raises ValueError past 4300 digits
        pytest.param("h:1:" + "9" * 5000, "out of range", id="h:1:<5000 nines>"),
    ],
)
def test_bad_weight_in_a_spec_string_raises_naming_it(entry: str, fragment: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        parse_node(entry)
    assert fragment in str(info.value)
    assert repr(entry) in str(info.value)


def test_weight_bounds_are_inclusive() -> None:
    assert parse_node(("h", 1, 1)).weight == 1
    assert parse_node(("h", 1, MAX_WEIGHT)).weight == MAX_WEIGHT
    assert parse_node(f"h:1:{MAX_WEIGHT}").weight == MAX_WEIGHT
    assert parse_node("h:1:0003").weight == 3
    with pytest.raises(ConfigurationError, match=f"weight {MAX_WEIGHT + 1} out of range 1..{MAX_WEIGHT}"):
        parse_node(("h", 1, MAX_WEIGHT + 1))


def test_with_weight_checks_the_new_weight() -> None:
    spec = parse_node("h:1")
    with pytest.raises(ConfigurationError, match="1000000000"):
        spec.with_weight(10**9)
    assert spec.with_weight(MAX_WEIGHT).weight == MAX_WEIGHT
