"""Ring math and properties: placement, movement, balance, immutability, bad input."""

import bisect
import contextlib
import io
import os
import subprocess
import sys

import mmh3
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardcache import ConfigurationError, KeyValidationError, Ring
from shardcache.ring import POINTS_PER_WEIGHT

NODE_IDS = st.lists(
    st.builds(
        "10.{}.{}.{}:{}".format,
        st.integers(0, 3),
        st.integers(0, 255),
        st.integers(1, 254),
        st.sampled_from([11211, 11212, 22122]),
    ),
    min_size=1,
    max_size=12,
    unique=True,
)
KEYS = st.one_of(
    st.text(min_size=1, max_size=250),
    st.binary(min_size=1, max_size=250),
)
SAMPLE_KEYS = [f"books/{i}" for i in range(4000)] + [f"user:{i}:profile".encode() for i in range(4000)]
PROPS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _owner_by_arcs(arcs: tuple[list[int], list[str]], hashing: str, key: str | bytes) -> str:
    """The owner of ``key`` found by bisecting the ring's arcs (the reference for the lookup table)."""
    bounds, owners = arcs
    if hashing == "mmh3":
        h = (mmh3.hash(key, 0, False) >> 12) << 12
    else:
        import hashlib

        data = key.encode() if isinstance(key, str) else key
        h = int.from_bytes(hashlib.md5(data).digest()[:4], "little")
    return owners[bisect.bisect_right(bounds, h) - 1]


@pytest.mark.parametrize("hashing", ["mmh3", "ketama"])
def test_str_key_hashes_as_its_utf8_bytes(hashing: str) -> None:
    ring = Ring([f"n{i}:11211" for i in range(7)], hashing=hashing)
    for key in ["books/321", "über/ключ", "日本"]:
        assert ring.node_for(key) == ring.node_for(key.encode())


@pytest.mark.parametrize("hashing", ["mmh3", "ketama"])
def test_lookup_table_agrees_with_the_ring_arcs(hashing: str) -> None:
    ring = Ring([f"10.0.0.{i}:{11211 + i % 2}" for i in range(1, 30)], hashing=hashing)
    arcs = ring._arcs()  # built once: rebuilding the ~44k mmh3 arcs per key took seconds
    for key in SAMPLE_KEYS[::7]:
        assert ring.node_for(key) == _owner_by_arcs(arcs, hashing, key)


@PROPS
@given(NODE_IDS, st.sampled_from(["mmh3", "ketama"]))
def test_adding_a_node_moves_keys_only_onto_it(nodes: list[str], hashing: str) -> None:
    before = Ring(nodes, hashing=hashing)
    after = before.with_node("192.168.77.1:11300")
    diff = before.diff(after)
    assert all(dst == "192.168.77.1:11300" for _, dst in diff.flows)
    for key in SAMPLE_KEYS[::40]:
        old, new = before.node_for(key), after.node_for(key)
        assert new in (old, "192.168.77.1:11300")


@PROPS
@given(NODE_IDS.filter(lambda n: len(n) >= 2), st.data())
def test_removing_a_node_moves_only_its_keys(nodes: list[str], data: st.DataObject) -> None:
    victim = data.draw(st.sampled_from(nodes))
    hashing = data.draw(st.sampled_from(["mmh3", "ketama"]))
    before = Ring(nodes, hashing=hashing)
    after = before.without_node(victim)
    assert all(src == victim for src, _ in before.diff(after).flows)
    for key in SAMPLE_KEYS[::40]:
        if before.node_for(key) != victim:
            assert after.node_for(key) == before.node_for(key)


@PROPS
@given(NODE_IDS.filter(lambda n: len(n) >= 2), st.data())
def test_reweighting_one_node_never_moves_keys_between_others(nodes: list[str], data: st.DataObject) -> None:
    target = data.draw(st.sampled_from(nodes))
    weight = data.draw(st.integers(2, 4))
    before = Ring(nodes)
    after = before.with_weight(target, weight)
    diff = before.diff(after)
    assert diff.moved > 0
    assert all(target in (src, dst) for src, dst in diff.flows)


@pytest.mark.parametrize("n", [3, 10, 50])
def test_adding_node_n_plus_1_moves_about_one_in_n_plus_1(n: int) -> None:
    before = Ring([f"cache-{i}.internal:11211" for i in range(n)])
    diff = before.diff(before.with_node("cache-new.internal:11211"))
    assert abs(diff.moved - 1 / (n + 1)) <= 0.1 / (n + 1)
    assert diff.moved_to("cache-new.internal:11211") == pytest.approx(diff.moved)


def test_balance_at_100_nodes_is_within_ten_percent() -> None:
    for pattern in ("10.0.{}.9:11211", "cache-{}.example.com:11211", "mc{}:11300"):
        share = Ring([pattern.format(i) for i in range(100)]).share()
        assert max(share.values()) * 100 <= 1.10, pattern
        assert sum(share.values()) == pytest.approx(1.0)


def test_weights_scale_the_share() -> None:
    share = Ring(["a:1:1", "b:1:3"]).share()
    assert share["b:1"] / share["a:1"] == pytest.approx(3, rel=0.1)


def test_placement_does_not_depend_on_the_order_nodes_are_given_in() -> None:
    nodes = [f"n{i}:11211" for i in range(9)]
    a, b = Ring(nodes), Ring(list(reversed(nodes)))
    assert [a.node_for(k) for k in SAMPLE_KEYS] == [b.node_for(k) for k in SAMPLE_KEYS]


def test_placement_is_identical_across_processes_and_hash_seeds() -> None:
    code = (
        "from shardcache import Ring\n"
        "r = Ring(['a:11211', 'b:11211', 'c:11212:2'])\n"
        "k = Ring(['a:11211', 'b:11211', 'c:11212:2'], hashing='ketama')\n"
        "print([r.node_for(f'key{i}') for i in range(300)], [k.node_for(f'key{i}') for i in range(300)])\n"
    )
    # Two child interpreters with fixed hash seeds, started in parallel, and this process (whose
    # seed is random unless PYTHONHASHSEED is set) give three placements that must be identical.
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env=dict(os.environ, PYTHONHASHSEED=seed),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in ("0", "12345")
    ]
    here = io.StringIO()
    with contextlib.redirect_stdout(here):
        exec(code, {})
    outputs = {here.getvalue()}
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        outputs.add(out)
    assert len(outputs) == 1


def test_pinned_placements_do_not_change_between_releases() -> None:
    # Changing these means every deployed cache is reshuffled on upgrade: it must never happen silently.
    ring = Ring(["10.0.0.1:11211", "10.0.0.2:11211", "10.0.0.3:11211"])
    got = [ring.node_for(f"books/{i}") for i in range(8)]
    assert got == PINNED


PINNED = [
    "10.0.0.3:11211",
    "10.0.0.2:11211",
    "10.0.0.1:11211",
    "10.0.0.2:11211",
    "10.0.0.3:11211",
    "10.0.0.2:11211",
    "10.0.0.3:11211",
    "10.0.0.3:11211",
]


@PROPS
@given(NODE_IDS, KEYS, st.integers(1, 15), st.sampled_from(["mmh3", "ketama"]))
def test_preference_list_starts_at_the_owner_and_is_distinct(
    nodes: list[str], key: str | bytes, n: int, hashing: str
) -> None:
    ring = Ring(nodes, hashing=hashing)
    prefs = ring.preference_list(key, n)
    assert prefs[0] == ring.node_for(key)
    assert len(prefs) == min(n, len(nodes)) == len(set(prefs))


@pytest.fixture(scope="module")
def two_node_rings() -> list[Ring]:
    return [Ring(["a:1", "b:2"], hashing=hashing) for hashing in ("mmh3", "ketama")]


@PROPS
@given(KEYS)
def test_any_str_or_bytes_key_hashes(two_node_rings: list[Ring], key: str | bytes) -> None:
    for ring in two_node_rings:
        try:
            assert ring.node_for(key) in ("a:1", "b:2")
        except KeyValidationError:
            assert isinstance(key, str)  # only lone surrogates, which are not UTF-8, are refused
            with pytest.raises(UnicodeEncodeError):
                key.encode()


@pytest.mark.parametrize("key", [1, None, 1.5, ["k"]])
def test_non_string_keys_raise_naming_the_key(key: object) -> None:
    for hashing in ("mmh3", "ketama"):
        with pytest.raises(KeyValidationError, match=repr(key).replace("[", r"\[")):
            Ring(["a:1"], hashing=hashing).node_for(key)  # type: ignore[arg-type]


def test_rings_are_values_with_node_returns_a_new_ring() -> None:
    ring = Ring(["a:1", "b:2"])
    bigger = ring.with_node("c:3")
    assert ring.nodes == ("a:1", "b:2")
    assert bigger.nodes == ("a:1", "b:2", "c:3")
    assert bigger.without_node("c:3") == ring


def test_membership_errors() -> None:
    ring = Ring(["a:1", "b:2"])
    with pytest.raises(ConfigurationError, match="already"):
        ring.with_node("a:1")
    with pytest.raises(ConfigurationError, match="not on the ring"):
        ring.without_node("z:9")
    with pytest.raises(ConfigurationError, match="last node"):
        Ring(["a:1"]).without_node("a:1")
    with pytest.raises(ConfigurationError, match="hashing='md4'"):
        Ring(["a:1"], hashing="md4")


def test_diff_with_keys_counts_real_keys() -> None:
    a = Ring([f"n{i}:1" for i in range(4)])
    b = a.with_node("n9:1")
    counted = a.diff(b, SAMPLE_KEYS)
    assert counted.keys_counted == len(SAMPLE_KEYS)
    assert counted.moved == pytest.approx(a.diff(b).moved, abs=0.02)


def test_ketama_diff_is_exact_on_the_hash_space() -> None:
    a = Ring([f"n{i}:11211" for i in range(5)], hashing="ketama")
    b = a.without_node("n2:11211")
    assert a.diff(b).moved == pytest.approx(a.share()["n2:11211"])


def test_alias_names_the_points_so_moving_an_address_keeps_placement() -> None:
    a = Ring(["10.0.0.1:11211:1 alpha", "10.0.0.2:11211:1 beta"])
    b = Ring(["10.9.9.9:11211:1 alpha", "10.0.0.2:11211:1 beta"])
    assert [a.node_for(k).replace("10.0.0.1", "X") for k in SAMPLE_KEYS[:500]] == [
        b.node_for(k).replace("10.9.9.9", "X") for k in SAMPLE_KEYS[:500]
    ]


@pytest.mark.parametrize("hashing", ["mmh3", "ketama"])
def test_lone_surrogates_raise_instead_of_reaching_the_hash(hashing: str) -> None:
    # mmh3 5.x crashes the interpreter on a str with a lone surrogate: it must never see one
    ring = Ring(["a:1", "b:2"], hashing=hashing)
    for key in ("x\udcff", "\ud800", "ok\udfffok"):
        with pytest.raises(KeyValidationError):
            ring.node_for(key)
        with pytest.raises(KeyValidationError):
            ring.preference_list(key, 2)


@pytest.mark.parametrize(
    "nodes",
    [
        ["solo:11211"],
        ["a:1", "b:2", "c:3:4"],
        [f"10.0.{i // 250}.{i % 250}:11211" for i in range(300)] + ["heavy:1:7"],
    ],
)
def test_numpy_and_pure_python_builds_give_the_same_table(
    nodes: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import shardcache._ring_math as ring_math

    monkeypatch.setattr(ring_math, "_NUMPY_FROM_POINTS", 0)  # numpy for small rings too
    fast = Ring(nodes)
    monkeypatch.setattr(ring_math, "_use_numpy", False)
    pure = Ring(nodes)
    assert fast._table == pure._table
    assert fast._runs == pure._runs


def test_numpy_and_pure_python_share_and_diff_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    import shardcache._ring_math as ring_math

    # One change that removes, reweights and adds a node, so every kind of flow is counted.
    a, b = Ring(["a:1", "b:2", "c:3:2", "d:4"]), Ring(["b:2", "c:3:3", "d:4", "e:5"])
    binned = (a.share(), b.share(), a.diff(b))
    monkeypatch.setattr(ring_math, "_MAX_FLOW_BINS", 0)  # the sorting path, used for big rings
    assert a.diff(b) == binned[2]
    monkeypatch.setattr(ring_math, "_use_numpy", False)
    assert (a.share(), b.share(), a.diff(b)) == binned
    assert binned[2].moved > 0


@pytest.mark.parametrize("hashing", ["mmh3", "ketama"])
def test_a_huge_weight_is_a_configuration_error_not_a_memory_error(hashing: str) -> None:
    with pytest.raises(ConfigurationError, match=r"weight 1000000000 out of range 1\.\.1000"):
        Ring([("a", 1, 10**9), "b:2"], hashing=hashing)
    ring = Ring(["a:1", "b:2"], hashing=hashing)
    for weight in (10**9, 1e9, 0, True):
        with pytest.raises(ConfigurationError, match="weight"):
            ring.with_weight("a:1", weight)  # type: ignore[arg-type]


def test_an_mmh3_ring_holds_at_most_max_ring_points() -> None:
    # Refused before anything is allocated; building either ring would take seconds and ~300 MB.
    with pytest.raises(ConfigurationError, match=r"total weight 5000 .*7,680,000 points"):
        Ring([f"n{i}:1:1000" for i in range(5)])
    with pytest.raises(ConfigurationError, match="4097 nodes with total weight 4097"):
        Ring([f"n{i}:1" for i in range(4097)])


@pytest.mark.parametrize(("hashing", "points_per_node"), [("mmh3", POINTS_PER_WEIGHT), ("ketama", 160)])
def test_ring_points_bound_is_inclusive(
    hashing: str, points_per_node: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shardcache.ring as ring_module

    # A small bound, so the rings on both sides of it are cheap to build.
    monkeypatch.setattr(ring_module, "MAX_RING_POINTS", 3 * points_per_node)
    ring = Ring(["a:1", "b:1", "c:1"], hashing=hashing)
    with pytest.raises(ConfigurationError, match="MAX_RING_POINTS"):
        ring.with_node("d:1")
    if hashing == "mmh3":
        with pytest.raises(ConfigurationError, match="total weight 4"):
            ring.with_weight("a:1", 2)
