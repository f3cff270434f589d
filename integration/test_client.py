"""shardcache.Client against a real 3-node memcached cluster: commands, routing, batches, safety."""

from __future__ import annotations

import socket
import threading
from collections import Counter
from collections.abc import Callable

import pytest
from pymemcache.client.base import Client as PymemcacheClient
from pymemcache.serde import python_memcache_deserializer, python_memcache_serializer

from shardcache import (
    Client,
    CommandError,
    KeyValidationError,
    NodeUnavailableError,
    ValueTooLargeError,
)
from shardcache.testing import LocalCluster


def _direct_get(spec: str, key: str) -> bytes | None:
    """Read ``key`` straight from one node with pymemcache, bypassing shardcache."""
    host, port = spec.rsplit(":", 1)
    direct = PymemcacheClient((host, int(port)), timeout=2, connect_timeout=2)
    try:
        value: bytes | None = direct.get(key.encode())
        return value
    finally:
        direct.close()


@pytest.fixture
def client(cluster: LocalCluster) -> Client:
    with Client(cluster.specs) as shared:
        yield shared


@pytest.mark.smoke
def test_each_key_lives_on_the_node_the_ring_names(client: Client, cluster: LocalCluster) -> None:
    keys = [f"books/{i}" for i in range(300)]
    sets_before = {node: int(stats[b"cmd_set"]) for node, stats in client.stats().items()}
    assert client.set_many({k: f"page {k}" for k in keys}) == []
    per_node = Counter(client.node_for(k) for k in keys)
    assert set(per_node) == set(cluster.specs)  # spread over every node
    for key in keys[:60]:
        assert _direct_get(client.node_for(key), key) == f"page {key}".encode()
        for other in set(cluster.specs) - {client.node_for(key)}:
            assert _direct_get(other, key) is None
    sets = {node: int(stats[b"cmd_set"]) - sets_before[node] for node, stats in client.stats().items()}
    assert sets == dict(per_node)  # each node received exactly the sets for its keys


@pytest.mark.smoke
def test_single_key_commands_follow_memcached_semantics(client: Client) -> None:
    assert client.get("absent", "dflt") == "dflt"
    assert client.set("k", {"a": [1, 2.5, None, True]}) is True
    assert client.get("k") == {"a": [1, 2.5, None, True]}
    assert client.add("k", 1) is False and client.add("fresh", 1) is True
    assert client.replace("nope", 1) is False and client.replace("fresh", 2) is True
    assert client.get("fresh") == 2
    assert client.set("s", b"mid") and client.append("s", b">") and client.prepend("s", b"<")
    assert client.get("s") == b"<mid>"
    assert client.append("absent", b"x") is False
    assert client.incr("absent", 1) is None
    assert client.set("n", 10) and client.incr("n", 5) == 15 and client.decr("n", 100) == 0
    with pytest.raises(CommandError):
        client.incr("s", 1)
    assert client.touch("n", 100) is True and client.touch("absent") is False
    assert client.delete("n") is True and client.delete("n") is False
    value, token = client.gets("fresh")
    assert value == 2 and token.node_id == client.node_for("fresh")
    assert client.cas("fresh", 3, token) is True
    assert client.cas("fresh", 4, token) is False
    assert client.cas("absent", 1, b"1") is None
    assert client.gets("absent", "d", "c") == ("d", "c")
    assert client["fresh"] == 3
    with pytest.raises(KeyError):
        client["absent"]


def test_multi_key_calls_cover_every_node_and_keep_keys_straight(client: Client) -> None:
    keys = [f"user:{i}:profile" for i in range(2000)] + [f"b{i}".encode() for i in range(500)]
    values = {k: (k if isinstance(k, str) else k.decode()) * 3 for k in keys}
    assert client.set_many(values, expire=300) == []
    got = client.get_many([*keys, "absent", keys[0]])
    assert got == values
    tokens = client.gets_many(keys[:50])
    assert {k: v for k, (v, _) in tokens.items()} == {k: values[k] for k in keys[:50]}
    assert all(t.node_id == client.node_for(k) for k, (_, t) in tokens.items())
    assert client.delete_many(keys[:1000]) is True
    assert client.get_many(keys[:1000]) == {}
    assert len(client.get_many(keys[1000:])) == len(keys) - 1000
    assert client.get_many([]) == {} and client.set_many({}) == []


def test_large_batches_and_values_go_in_rounds_without_stalling(client: Client) -> None:
    big = {f"blob{i}": bytes([i]) * 400_000 for i in range(12)}  # ~4.8 MB, several rounds per node
    assert client.set_many(big) == []
    assert client.get_many(big) == big
    many = {f"small:{i}": i for i in range(20_000)}
    assert client.set_many(many) == []
    assert client.get_many(many) == many


def test_value_over_the_item_limit_names_its_key_and_others_are_stored(client: Client) -> None:
    with pytest.raises(ValueTooLargeError, match="'huge'") as info:
        client.set("huge", b"x" * 2_000_000)
    assert info.value.key == "huge"
    with pytest.raises(ValueTooLargeError, match="'huge'") as many:
        client.set_many({"a": 1, "huge": b"x" * 2_000_000, "b": 2, "c": 3, "huge2": b"y" * 2_000_000})
    assert sorted(many.value.failed) == ["huge", "huge2"]  # what set_many would have returned
    assert client.get_many(["a", "b", "c"]) == {"a": 1, "b": 2, "c": 3}
    assert client.set("after", 1) is True  # connections stayed in step


@pytest.mark.smoke
def test_injection_keys_never_reach_a_server(client: Client, cluster: LocalCluster) -> None:
    client.set_many({f"sentinel{i}": i for i in range(30)})
    flushes_before = sum(int(s[b"cmd_flush"]) for s in client.stats().values())
    for bad in ("a\r\nflush_all", b"x\r\nflush_all\r\n", "a b", "tab\t", "nul\x00"):
        with pytest.raises(KeyValidationError):
            client.set(bad, "v")
        with pytest.raises(KeyValidationError):
            client.get_many(["sentinel1", bad])
        with pytest.raises(KeyValidationError):
            client.delete_many(["sentinel2", bad])
    assert client.get_many([f"sentinel{i}" for i in range(30)]) == {f"sentinel{i}": i for i in range(30)}
    assert sum(int(s[b"cmd_flush"]) for s in client.stats().values()) == flushes_before


def test_cluster_wide_calls_answer_per_node(client: Client, cluster: LocalCluster) -> None:
    assert set(client.version()) == set(cluster.specs)
    assert all(v.startswith(b"1.") for v in client.version().values())
    client.set_many({f"k{i}": i for i in range(50)})
    assert client.flush_all() == dict.fromkeys(cluster.specs, True)
    assert client.get_many([f"k{i}" for i in range(50)]) == {}
    settings = client.stats("settings")
    assert set(settings) == set(cluster.specs) and all(b"maxbytes" in s for s in settings.values())


def test_values_interoperate_with_pymemcache_serde(client: Client) -> None:
    plain = {"bytes": b"\x00\xff raw", "text": "olé", "int": 12345678901234}
    client.set_many(plain)
    for key, value in plain.items():
        reader, writer = _pymemcache_on(client.node_for(key)), _pymemcache_on(client.node_for(key + "2"))
        try:
            assert reader.get(key) == value
            writer.set(key + "2", value)
        finally:
            reader.close()
            writer.close()
        assert client.get(key + "2") == value


def _pymemcache_on(spec: str) -> PymemcacheClient:
    host, port = spec.rsplit(":", 1)
    return PymemcacheClient(
        (host, int(port)),
        serializer=python_memcache_serializer,
        deserializer=python_memcache_deserializer,
        default_noreply=False,
        timeout=2,
    )


def test_noreply_writes_are_visible_to_the_same_thread(cluster: LocalCluster) -> None:
    with Client(cluster.specs, default_noreply=True) as fast:
        fast.set_many({f"n{i}": i for i in range(200)})
        fast.set("one", 1)
        assert fast.get("one") == 1
        assert fast.get_many([f"n{i}" for i in range(200)]) == {f"n{i}": i for i in range(200)}


def test_threads_sharing_one_client_never_see_another_keys_value(client: Client) -> None:
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(150):
                key = f"t{n}:{i % 40}"
                client.set(key, f"{key}={i}")
                value = client.get(key)
                assert value is None or value.startswith(f"{key}=")
                batch = [f"t{n}:{j}" for j in range(0, 40, 3)]
                for k, v in client.get_many(batch).items():
                    assert v.startswith(f"{k}="), (k, v)
        except BaseException as exc:  # collected and re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []


def test_a_down_node_fails_only_its_keys_naming_it(cluster: LocalCluster) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    dead = f"127.0.0.1:{probe.getsockname()[1]}"
    probe.close()  # nothing listens there
    with Client([*cluster.specs, dead], connect_timeout=0.5, timeout=0.5) as client:
        keys = [f"k{i}" for i in range(200)]
        live = [k for k in keys if client.node_for(k) != dead]
        on_dead = [k for k in keys if client.node_for(k) == dead]
        assert live and on_dead
        assert client.set_many(dict.fromkeys(live, 1)) == []
        with pytest.raises(NodeUnavailableError) as info:
            client.get(on_dead[0])
        assert info.value.node_id == dead
        with pytest.raises(NodeUnavailableError, match=dead):
            client.get_many(keys)
        with pytest.raises(NodeUnavailableError, match=dead):
            client.set_many(dict.fromkeys(keys, 2))
        assert client.get_many(live) == dict.fromkeys(live, 2)  # the live nodes were still written
    with Client([*cluster.specs, dead], connect_timeout=0.5, timeout=0.5, on_error="miss") as lenient:
        assert lenient.get_many(keys) == dict.fromkeys(live, 2)
        assert sorted(lenient.set_many(dict.fromkeys(keys, 3))) == sorted(on_dead)
        assert lenient.get(on_dead[0], "dflt") == "dflt"


def _spread(client: Client, n: int) -> Callable[[], Counter[str]]:
    return lambda: Counter(client.node_for(f"k{i}") for i in range(n))


def test_ketama_client_places_keys_like_libmemcached_does(cluster: LocalCluster) -> None:
    with Client(cluster.specs, hashing="ketama") as client:
        client.set_many({f"k{i}": i for i in range(300)})
        for key in (f"k{i}" for i in range(0, 300, 7)):
            assert _direct_get(client.node_for(key), key) is not None
        assert len(_spread(client, 300)()) == 3


def test_the_same_server_under_two_names_is_warned_about(
    cluster: LocalCluster, caplog: pytest.LogCaptureFixture
) -> None:
    host, port = cluster.specs[0].rsplit(":", 1)
    assert host == "127.0.0.1"
    twice = [f"localhost:{port}", f"127.0.0.1:{port}", cluster.specs[1]]
    with caplog.at_level("WARNING", logger="shardcache"), Client(twice) as client:
        client.stats()  # one connection to each node
        warnings = [r.getMessage() for r in caplog.records if "same server" in r.getMessage()]
    assert len(warnings) == 1
    assert f"localhost:{port}" in warnings[0] and f"127.0.0.1:{port}" in warnings[0]
    with caplog.at_level("WARNING", logger="shardcache"), Client(cluster.specs) as distinct:
        caplog.clear()
        distinct.stats()
        assert not [r for r in caplog.records if "same server" in r.getMessage()]
