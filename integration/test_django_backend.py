"""shardcache.contrib.django.ShardCache on a real 3-node cluster: configuration, pickling, keys,
connections kept across requests, fork safety, a dead node.

Django's own memcached test case runs against the backend in integration/django_suite/. Django
settings are the example project's (examples/django_project/settings.py, pointed at the session
cluster through SHARDCACHE_SERVERS); tests that need other CACHES use ``override_settings``.
"""

from __future__ import annotations

import datetime as dt
import decimal
import os
import pickle
import signal
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from pymemcache.client.base import Client as PymemcacheClient
from pymemcache.serde import pickle_serde

import shardcache
from shardcache.testing import LocalCluster

BACKEND = "shardcache.contrib.django.ShardCache"
_CHILD_TIMEOUT_S = 30


def caches_for(cluster: LocalCluster, **entry: Any) -> dict[str, Any]:
    return {"default": {"BACKEND": BACKEND, "LOCATION": cluster.specs, **entry}}


def node_items(node_id: str, wire_key: str) -> dict[str, int] | None:
    """memcached's own view of an item (``mg <key> f t``): client flags and TTL, or None."""
    host, port = node_id.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=2) as sock:
        sock.sendall(f"mg {wire_key} f t\r\n".encode())
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


def total_connections(watcher: shardcache.Client) -> dict[str, int]:
    return {node: int(stats[b"total_connections"]) for node, stats in watcher.stats().items()}


@pytest.fixture
def watcher(cluster: LocalCluster) -> Iterator[shardcache.Client]:
    """A separate client that reads the nodes' stats (its own connections are opened at once)."""
    client = shardcache.Client(cluster.specs)
    client.stats()
    yield client
    client.close()


# -- configuration ---------------------------------------------------------------------------------


def test_location_forms_name_the_same_nodes(cluster: LocalCluster, django_settings: Any) -> None:
    from django.core.cache import caches
    from django.test import override_settings

    for location in (
        cluster.specs,
        ",".join(cluster.specs),
        ";".join(cluster.specs),
        " , ".join(cluster.specs),
    ):
        with override_settings(CACHES=caches_for(cluster, LOCATION=location)):
            cache = caches["default"]
            assert sorted(cache.client.nodes) == sorted(cluster.specs)
            cache.set("where", location)
            assert cache.get("where") == location


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            {"LOCATION": "127.0.0.1:11211,127.0.0.1:port"},
            r"CACHES\['default'\]: LOCATION: .*127\.0\.0\.1:port",
        ),
        ({"LOCATION": ""}, r"CACHES\['default'\]: LOCATION is empty"),
        ({"LOCATION": ["a:1", "a:1"]}, r"CACHES\['default'\]: LOCATION: .*duplicate"),
        (
            {"OPTIONS": {"no_dealy": True}},
            r"CACHES\['default'\]: OPTIONS: .*no_dealy.*did you mean 'no_delay'",
        ),
        ({"OPTIONS": {"timeout": -1}}, r"CACHES\['default'\]: OPTIONS: timeout=-1"),
        (
            {"OPTIONS": {"MAX_ENTRIES": 1000}},
            r"CACHES\['default'\]: OPTIONS\['MAX_ENTRIES'\] is not supported",
        ),
        ({"OPTIONS": {"serde": "json"}}, r"OPTIONS\['serde'\]='json'"),
    ],
    ids=["bad-port", "empty", "duplicate", "unknown-option", "bad-timeout", "max-entries", "bad-serde"],
)
def test_bad_configuration_is_improperly_configured(
    cluster: LocalCluster, django_settings: Any, entry: dict[str, Any], message: str
) -> None:
    from django.core.cache import caches
    from django.core.exceptions import ImproperlyConfigured
    from django.test import override_settings

    with (
        override_settings(CACHES=caches_for(cluster, **entry)),
        pytest.raises(ImproperlyConfigured, match=message),
    ):
        caches["default"]  # the backend is built on first access


def test_backends_of_every_thread_share_one_client(django_settings: Any) -> None:
    from django.core.cache import caches

    seen: list[Any] = []
    backends: list[Any] = []

    def look() -> None:
        backend = caches["default"]
        backends.append(backend)
        seen.append(backend.client)

    threads = [threading.Thread(target=look) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert len({id(b) for b in backends}) == 4  # Django builds one backend object per thread ...
    assert all(client is caches["default"].client for client in seen)  # ... sharing one client


# -- values and keys -------------------------------------------------------------------------------


@dataclass
class Review:
    stars: int
    body: str
    posted: dt.datetime
    price: decimal.Decimal


def test_values_are_pickled_compatibly_with_pymemcache(django_settings: Any) -> None:
    from django.core.cache import cache

    review = Review(5, "great", dt.datetime(2019, 7, 7, tzinfo=dt.timezone.utc), decimal.Decimal("9.99"))
    cache.set("review", review)
    assert cache.get("review") == review
    wire = cache.make_key("review")
    node = cache.client.node_for(wire)
    item = node_items(node, wire)
    assert item is not None
    assert item["f"] == 1  # pickle: what PyMemcacheCache's pickle_serde writes
    host, port = node.rsplit(":", 1)
    reader = PymemcacheClient((host, int(port)), serde=pickle_serde, timeout=2, connect_timeout=2)
    try:
        assert reader.get(wire) == review  # pymemcache reads ShardCache's items ...
        reader.set(wire, [review, "from pymemcache"], noreply=False)
    finally:
        reader.close()
    assert cache.get("review") == [review, "from pymemcache"]  # ... and the other way round


def test_signed_serde_refuses_forged_pickles(cluster: LocalCluster, django_settings: Any) -> None:
    from django.core.cache import caches
    from django.test import override_settings

    with override_settings(CACHES=caches_for(cluster, OPTIONS={"serde": "signed"})):
        cache = caches["default"]
        cache.set("session", {"user": 1})
        assert cache.get("session") == {"user": 1}
        wire = cache.make_key("session")
        node = cache.client.node_for(wire)
        item = node_items(node, wire)
        assert item is not None
        assert item["f"] == 512  # SignedPickleSerde
        host, port = node.rsplit(":", 1)
        forger = PymemcacheClient((host, int(port)), serde=pickle_serde, timeout=2, connect_timeout=2)
        try:
            forger.set(
                wire, {"user": 0, "admin": True}, noreply=False
            )  # a plain pickle, as an attacker would write
        finally:
            forger.close()
        with pytest.raises(shardcache.SerializationError, match="pickled"):
            cache.get("session")


def test_signed_serde_rotates_with_secret_key_fallbacks(cluster: LocalCluster, django_settings: Any) -> None:
    from django.core.cache import caches
    from django.test import override_settings

    signed = caches_for(cluster, OPTIONS={"serde": "signed"})
    with override_settings(CACHES=signed, SECRET_KEY="old-secret-key-0123456789"):
        caches["default"].set("token", ["written", "with", "old"])
    with (
        override_settings(CACHES=signed, SECRET_KEY="new-secret-key-0123456789", SECRET_KEY_FALLBACKS=[]),
        pytest.raises(shardcache.SerializationError, match="signature mismatch"),
    ):
        caches["default"].get("token")
    with override_settings(
        CACHES=signed,
        SECRET_KEY="new-secret-key-0123456789",
        SECRET_KEY_FALLBACKS=["old-secret-key-0123456789"],
    ):
        assert caches["default"].get("token") == ["written", "with", "old"]


def test_keys_over_250_utf8_bytes_are_invalid(cluster: LocalCluster, django_settings: Any) -> None:
    from django.core.cache import cache, caches
    from django.core.cache.backends.base import InvalidCacheKey
    from django.test import override_settings

    key = "é" * 120  # 120 characters (Django's own check passes), 240 bytes + ":1:" + prefix
    with pytest.raises(InvalidCacheKey, match="bytes in UTF-8"):
        cache.set(key, 1)
    with override_settings(CACHES=caches_for(cluster, KEY_PREFIX="", OPTIONS={"key_prefix": "p" * 10})):
        shorter = "é" * 118  # 236 bytes + ":1:" = 239, + 10 of key_prefix = 249: fits
        caches["default"].set(shorter, 1)
        assert caches["default"].get(shorter) == 1
        with pytest.raises(InvalidCacheKey, match="key_prefix"):
            caches["default"].get(shorter + "xy")  # 251 bytes with the client's key_prefix


def test_unpicklable_values_raise_pickle_errors(django_settings: Any) -> None:
    from django.core.cache import cache

    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        cache.set("lock", threading.Lock())
    with pytest.raises(AttributeError, match="Can't pickle local object"):  # what pickle raises
        cache.set_many({"fine": 1, "local": lambda: 1})
    assert cache.get("fine") is None  # nothing was sent


# -- connections -----------------------------------------------------------------------------------


def test_connections_are_kept_across_requests(django_settings: Any, watcher: shardcache.Client) -> None:
    """Django's memcached backends reconnect on every request (ticket #11331); ShardCache does not."""
    from django.test import Client

    browser = Client()
    assert browser.get("/shelf/").status_code == 200  # opens (at most) one connection per node
    before = total_connections(watcher)
    for start in range(1, 21):
        assert browser.get(f"/shelf/?start={start}").status_code == 200
        assert browser.get(f"/books/{start}").status_code == 200
    after = total_connections(watcher)
    assert after == before, "ShardCache opened connections during requests"

    before = total_connections(watcher)
    for _ in range(5):
        assert browser.get("/shelf/?cache=pymemcache").status_code == 200
    reconnects = sum(after_n - before[node] for node, after_n in total_connections(watcher).items())
    assert reconnects >= 5  # PyMemcacheCache: closed at request_finished, reopened next request


def test_forked_child_opens_its_own_connections(django_settings: Any, watcher: shardcache.Client) -> None:
    from django.core.cache import cache

    expected = {f"fork/{i}": i for i in range(60)}
    cache.set_many(expected)
    assert cache.get_many(expected) == expected  # the parent's pools now hold a connection per node
    nodes_used = {cache.client.node_for(cache.make_key(key)) for key in expected}
    assert nodes_used == set(cache.client.nodes)
    before = total_connections(watcher)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # Python >= 3.12 warns if threads exist
        pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 70
        try:
            ok = cache.get_many(expected) == expected
            cache.set("fork/child", "from the child")
            ok = ok and cache.get("fork/child") == "from the child"
            code = 0 if ok else 1
        finally:
            os._exit(code)

    deadline = time.monotonic() + _CHILD_TIMEOUT_S
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"the forked child did not finish within {_CHILD_TIMEOUT_S} s")
        time.sleep(0.01)
    assert os.waitstatus_to_exitcode(status) == 0
    after = total_connections(watcher)
    # one new connection per node: the child's own; it never wrote on the parent's sockets
    assert {node: after[node] - before[node] for node in after} == dict.fromkeys(after, 1)
    # and the parent's connections are intact, in step, and still the only ones it uses
    assert cache.get_many(expected) == expected
    assert cache.get("fork/child") == "from the child"
    assert total_connections(watcher) == after


def test_request_finished_does_not_close(django_settings: Any, watcher: shardcache.Client) -> None:
    from django.core import signals
    from django.core.cache import cache

    cache.get_many([f"k{i}" for i in range(30)])
    before = total_connections(watcher)
    for _ in range(5):
        signals.request_finished.send(sender=None)
        cache.get_many([f"k{i}" for i in range(30)])
    assert total_connections(watcher) == before


# -- failures --------------------------------------------------------------------------------------


def test_on_error_miss_degrades_a_dead_node_to_misses(
    fresh_cluster: Callable[..., LocalCluster], django_settings: Any
) -> None:
    from django.core.cache import caches
    from django.test import override_settings

    fleet = fresh_cluster(3)
    options = {"on_error": "miss", "timeout": 0.5, "connect_timeout": 0.5}
    with override_settings(CACHES=caches_for(fleet, OPTIONS=options)):
        cache = caches["default"]
        values = {f"page/{i}": f"<p>{i}</p>" for i in range(30)}
        assert cache.set_many(values) == []
        dead = fleet.nodes[1]
        on_dead = {key for key in values if cache.client.node_for(cache.make_key(key)) == dead.spec}
        assert on_dead
        dead.kill()
        assert cache.get_many(values) == {k: v for k, v in values.items() if k not in on_dead}
        for key in on_dead:
            assert cache.get(key, "default") == "default"
        failed = cache.set_many(values)
        assert set(failed) == on_dead


def test_node_failure_raises_by_default(
    fresh_cluster: Callable[..., LocalCluster], django_settings: Any
) -> None:
    from django.core.cache import caches
    from django.test import override_settings

    fleet = fresh_cluster(1)
    with override_settings(CACHES=caches_for(fleet, OPTIONS={"timeout": 0.5, "connect_timeout": 0.5})):
        cache = caches["default"]
        cache.set("k", 1)
        fleet.nodes[0].kill()
        with pytest.raises(shardcache.NodeError):
            cache.get("k")
