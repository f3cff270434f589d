"""shardcache.contrib.flask.ShardCache: Flask-Caching and cachelib semantics on a real 3-node cluster."""

from __future__ import annotations

import datetime as dt
import pickle
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from flask import Flask, jsonify
from flask_caching import Cache

import shardcache
from shardcache.contrib.flask import ShardCache
from shardcache.testing import LocalCluster

PREFIX = "t:"


def meta_get(node_id: str, wire_key: str, flags: str = "t f") -> dict[str, int] | None:
    """memcached's own view of an item (``mg <key> t f``): remaining TTL and client flags, or None."""
    host, port = node_id.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=2) as sock:
        sock.sendall(f"mg {wire_key} {flags}\r\n".encode())
        reply = b""
        while not reply.endswith(b"\r\n"):
            chunk = sock.recv(4096)
            assert chunk, "connection closed"
            reply += chunk
    words = reply.decode().split()
    if words[0] == "EN":
        return None
    assert words[0] == "HD", reply
    return {word[0]: int(word[1:]) for word in words[1:]}


def make_app(servers: Any, **config: Any) -> tuple[Flask, Cache]:
    app = Flask(__name__)
    app.config.update(
        {
            "CACHE_TYPE": "shardcache.contrib.flask.ShardCache",
            "CACHE_MEMCACHED_SERVERS": servers,
            "CACHE_KEY_PREFIX": PREFIX,
            "CACHE_DEFAULT_TIMEOUT": 300,
            **config,
        }
    )
    return app, Cache(app)


@pytest.fixture
def backend(cluster: LocalCluster) -> Iterator[ShardCache]:
    app, cache = make_app(cluster.specs)
    store = app.extensions["cache"][cache]
    assert isinstance(store, ShardCache)
    yield store
    store.client.close()


def test_flask_caching_builds_the_backend_from_app_config(cluster: LocalCluster) -> None:
    app, cache = make_app(",".join(cluster.specs), CACHE_OPTIONS={"timeout": 0.5, "hashing": "ketama"})
    store = app.extensions["cache"][cache]
    assert isinstance(store, ShardCache)
    assert sorted(store.client.nodes) == sorted(cluster.specs)
    assert store.client.ring.hashing == "ketama"
    assert store.default_timeout == 300
    with app.app_context():
        assert cache.set("greeting", "hello")
        assert cache.get("greeting") == "hello"
    # CACHE_KEY_PREFIX is applied by the client: the item sits under "t:greeting" on its node
    assert meta_get(store.client.node_for("greeting"), PREFIX + "greeting") is not None


def test_configuration_errors_name_the_setting(cluster: LocalCluster) -> None:
    with pytest.raises(shardcache.ConfigurationError, match=r"CACHE_OPTIONS.*no_dealy.*no_delay"):
        make_app(cluster.specs, CACHE_OPTIONS={"no_dealy": True})
    with pytest.raises(shardcache.ConfigurationError, match=r"CACHE_MEMCACHED_SERVERS.*'nohost:port'"):
        make_app([*cluster.specs, "nohost:port"])
    with pytest.raises(shardcache.ConfigurationError, match="CACHE_MEMCACHED_SERVERS is not set"):
        make_app(None)
    with pytest.raises(shardcache.ConfigurationError, match="set CACHE_KEY_PREFIX instead"):
        make_app(cluster.specs, CACHE_OPTIONS={"key_prefix": "x"})
    with pytest.raises(shardcache.ConfigurationError, match=r"CACHE_KEY_PREFIX.*key_prefix='has space'"):
        make_app(cluster.specs, CACHE_KEY_PREFIX="has space")
    with pytest.raises(shardcache.ConfigurationError, match="CACHE_ARGS"):
        make_app(cluster.specs, CACHE_ARGS=["x"])


@pytest.mark.parametrize(
    ("timeout", "low", "high"),
    [
        (None, 295, 300),  # CACHE_DEFAULT_TIMEOUT
        (120, 115, 120),
        (dt.timedelta(minutes=2), 115, 120),
        # > 30 days: sent as a Unix time; memcached's clock ticks once a second, so allow 2 s over
        (40 * 24 * 3600, 40 * 24 * 3600 - 5, 40 * 24 * 3600 + 2),
    ],
    ids=["default", "seconds", "timedelta", "over-30-days"],
)
def test_timeouts_become_memcached_expiry(backend: ShardCache, timeout: Any, low: int, high: int) -> None:
    assert backend.set("ttl", "v", timeout=timeout) is True
    item = meta_get(backend.client.node_for("ttl"), PREFIX + "ttl")
    assert item is not None
    assert low <= item["t"] <= high


def test_timeout_zero_never_expires_and_negative_expires_at_once(backend: ShardCache) -> None:
    assert backend.set("forever", "v", timeout=0) is True
    item = meta_get(backend.client.node_for("forever"), PREFIX + "forever")
    assert item is not None
    assert item["t"] == -1  # memcached: no expiry
    assert backend.set("gone", "v", timeout=-1) is True
    assert backend.get("gone") is None
    assert backend.has("gone") is False


def test_cachelib_return_values(backend: ShardCache) -> None:
    assert backend.get("absent") is None
    assert backend.set("k", {"a": 1}) is True
    assert backend.get("k") == {"a": 1}
    assert backend.add("k", "other") is False
    assert backend.get("k") == {"a": 1}
    assert backend.add("new", 5) is True
    assert backend.has("k") is True
    assert backend.has("absent") is False
    assert backend.delete("k") is True
    assert backend.delete("k") is False
    assert backend.set("none", None) is True
    assert backend.has("none") is True  # a cached None is present
    assert backend.get("none") is None


def test_multi_key_calls(backend: ShardCache) -> None:
    mapping = {f"book/{i}": f"page {i}" for i in range(40)}
    assert backend.set_many(mapping) == list(mapping)
    assert backend.get_many("book/3", "absent", "book/1") == ["page 3", None, "page 1"]
    assert backend.get_dict("book/3", "absent") == {"book/3": "page 3", "absent": None}
    assert backend.get_dict(*mapping) == mapping
    assert sorted(backend.delete_many("book/1", "book/2", "absent")) == ["absent", "book/1", "book/2"]
    assert backend.get_many("book/1", "book/2", "book/3") == [None, None, "page 3"]
    assert backend.delete_many() == []
    # the keys are spread over every node
    nodes = {backend.client.node_for(key) for key in mapping}
    assert nodes == set(backend.client.nodes)


def test_clear_flushes_every_node(backend: ShardCache) -> None:
    backend.set_many({f"k{i}": i for i in range(30)})
    assert backend.clear() is True
    assert backend.get_many(*(f"k{i}" for i in range(30))) == [None] * 30


def test_inc_dec_start_from_zero_and_go_negative(backend: ShardCache) -> None:
    assert backend.inc("hits") == 1
    assert backend.inc("hits", 10) == 11
    assert backend.dec("hits", 4) == 7
    assert backend.get("hits") == 7
    assert backend.dec("hits", 10) == -3  # memcached's decr would stop at 0
    assert backend.inc("hits") == -2
    assert backend.get("hits") == -2
    assert backend.dec("fresh", 2) == -2
    backend.set("text", "abc")
    with pytest.raises(TypeError):
        backend.inc("text")


def test_inc_is_atomic_across_threads(backend: ShardCache) -> None:
    threads_n, per_thread = 8, 50
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(per_thread):
                assert backend.inc("counter") is not None
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    assert backend.get("counter") == threads_n * per_thread


def test_dec_is_atomic_across_threads(backend: ShardCache) -> None:
    backend.set("stock", 10)
    results: list[int | None] = []
    lock = threading.Lock()

    def work() -> None:
        for _ in range(20):
            value = backend.dec("stock")
            with lock:
                results.append(value)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert None not in results
    assert sorted(results, reverse=True) == list(range(9, 10 - 81, -1))  # every value seen once
    assert backend.get("stock") == 10 - 80


@dataclass
class Shelf:
    name: str
    books: list[int]
    updated: dt.datetime


def test_arbitrary_objects_are_pickled(backend: ShardCache) -> None:
    shelf = Shelf("classics", [1, 2, 3], dt.datetime(2019, 7, 7, 12, 0))
    assert backend.set("shelf", shelf)
    assert backend.get("shelf") == shelf
    item = meta_get(backend.client.node_for("shelf"), PREFIX + "shelf")
    assert item is not None
    assert item["f"] == 1  # pickle, as pymemcache's pickle_serde writes it


class Unpicklable:
    def __reduce__(self) -> Any:
        raise pickle.PicklingError("not today")


def test_unpicklable_value_raises_the_pickle_error(backend: ShardCache) -> None:
    with pytest.raises(pickle.PicklingError, match="not today"):
        backend.set("bad", Unpicklable())
    with pytest.raises(pickle.PicklingError):
        backend.add("bad", Unpicklable())
    with pytest.raises(pickle.PicklingError):
        backend.set_many({"good": 1, "bad": Unpicklable()})
    assert backend.get("good") is None  # nothing was sent


@pytest.mark.parametrize(
    "key",
    ["view//nearby/SW1A 1AA/5", "x" * 300, "tab\there", "~sha256:" + "0" * 64, "naïve café " * 30],
    ids=["space", "too-long", "control", "marker", "long-unicode"],
)
def test_keys_memcached_cannot_take_still_work(backend: ShardCache, key: str) -> None:
    assert backend.set(key, "value") is True
    assert backend.get(key) == "value"
    assert backend.has(key) is True
    assert backend.get_dict(key, "other") == {key: "value", "other": None}
    assert backend.inc(key + "/n") == 1
    assert backend.delete(key) is True
    assert backend.get(key) is None


def test_hashed_key_does_not_collide_with_its_digest(backend: ShardCache) -> None:
    spaced = "a key with spaces"
    backend.set(spaced, "spaced")
    digest_key = backend._key(spaced)  # white-box: the key it was stored under
    assert isinstance(digest_key, str)
    assert digest_key.startswith("~sha256:")
    backend.set(digest_key, "literal")
    assert backend.get(spaced) == "spaced"
    assert backend.get(digest_key) == "literal"


def test_value_too_large_is_not_stored(backend: ShardCache) -> None:
    backend.set("big", "small")
    too_big = "x" * (2 * 1024 * 1024)
    assert backend.set("big", too_big) is False
    assert backend.get("big") is None  # memcached drops the old value when a set is refused
    assert backend.add("big2", too_big) is False
    stored = backend.set_many({"a": 1, "huge": too_big, "b": 2})
    assert sorted(stored) == ["a", "b"]
    assert backend.get_many("a", "huge", "b") == [1, None, 2]


def test_cached_and_memoize_decorators(cluster: LocalCluster) -> None:
    app, cache = make_app(cluster.specs)
    calls: dict[str, int] = {"view": 0, "memo": 0}

    @app.route("/nearby/<postcode>/<radius>")
    @cache.cached(timeout=120)
    def nearby_stores(postcode: str, radius: str) -> Any:
        calls["view"] += 1
        return jsonify(postcode=postcode, radius=radius, call=calls["view"])

    @cache.memoize()
    def distance(a: str, b: str) -> int:
        calls["memo"] += 1
        return len(a) + len(b)

    client = app.test_client()
    first = client.get("/nearby/SW1A/5").get_json()
    assert client.get("/nearby/SW1A/5").get_json() == first
    assert client.get("/nearby/SW1A/6").get_json()["call"] == 2
    assert calls["view"] == 2
    with app.app_context():
        assert distance("ab", "c") == 3
        assert distance("ab", "c") == 3
        assert distance("ab", "cd") == 4
        assert calls["memo"] == 2
        cache.delete_memoized(distance, "ab", "c")
        assert distance("ab", "c") == 3
        assert calls["memo"] == 3
        assert cache.delete_cached(nearby_stores, path="/nearby/SW1A/5") is True
    assert client.get("/nearby/SW1A/5").get_json()["call"] == 3


def test_on_error_miss_serves_pages_with_a_dead_node(fresh_cluster: Callable[..., LocalCluster]) -> None:
    fleet = fresh_cluster(3)
    app, cache = make_app(
        fleet.specs, CACHE_OPTIONS={"on_error": "miss", "timeout": 0.5, "connect_timeout": 0.5}
    )
    store = app.extensions["cache"][cache]
    calls = {"n": 0}

    @app.route("/books/<int:book_id>")
    @cache.cached(timeout=60)
    def book(book_id: int) -> str:
        calls["n"] += 1
        return f"book {book_id}"

    client = app.test_client()
    paths = [f"/books/{i}" for i in range(30)]
    for path in paths:
        assert client.get(path).status_code == 200
    dead = fleet.nodes[0]
    dead.kill()
    on_dead = [p for p in paths if store.client.node_for("view/" + p) == dead.spec]
    assert on_dead, "no page landed on the killed node"
    before = calls["n"]
    for path in paths:
        response = client.get(path)
        assert response.status_code == 200
        assert response.get_data(as_text=True) == "book " + path.rsplit("/", 1)[1]
    assert calls["n"] - before == len(on_dead)  # only the dead node's pages were computed again
    assert store.get_many(*(f"k{i}" for i in range(10))) == [None] * 10
    counter = next(f"n{i}" for i in range(1000) if store.client.node_for(f"n{i}") == dead.spec)
    assert store.set(counter, 5) is False
    assert store.inc(counter) is None  # cachelib: None when the backend fails
    assert store.dec(counter) is None
