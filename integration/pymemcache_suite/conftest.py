"""Fixtures that pymemcache's own integration tests take, pointed at shardcache over 3 real nodes.

pymemcache's ``pymemcache/test/conftest.py`` defines these from command-line options (a memcached
on localhost:11211) and is not loaded when we import its test module, so we provide them here:

- ``host``/``port``: node 0 of the session ``cluster``. pymemcache's tests pass ``(host, port)`` to
  ``client_class``; the few that build ``pymemcache.client.base.Client`` themselves talk to node 0.
- ``client_class``: :class:`ShardcacheSuiteClient` bound to the session cluster: called as
  ``client_class((host, port), **kwargs)`` like pymemcache's classes, it returns a real
  ``shardcache.Client`` over all 3 nodes with those kwargs (serde, socket_module, key_prefix,
  allow_unicode_keys). Every client made is closed at teardown.
- ``socket_module``: parametrized with the standard ``socket`` module only (gevent is not installed;
  pymemcache adds it when it is).
- ``key_prefix``: parametrized ``[b"", b"prefix"]`` for tests that take it and do not parametrize it
  themselves, as pymemcache's ``pytest_generate_tests`` does.

pymemcache's ``test_incr_decr``, ``test_misc`` and ``test_serialization_deserialization`` build a
``pymemcache.client.base.Client`` of their own and never close it. Our suite turns warnings into
errors, so the ``ResourceWarning: unclosed <socket.socket ...>`` its garbage collection emits would
fail them; for these three tests only, that one warning is ignored.

``test_misc`` changes node 0's memory limit (``cache_memlimit 50``); the session cluster is shared,
so every node's limit is put back after each test here.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pymemcache.client.base import Client as PymemcacheClient

import shardcache
from shardcache.testing import LocalCluster

_KEY_PREFIXES = [pytest.param(b"", id="no-prefix"), pytest.param(b"prefix", id="prefix")]


class ShardcacheSuiteClient(shardcache.Client):
    """A ``shardcache.Client`` over every node of ``cluster``, built the way pymemcache builds clients.

    pymemcache's tests call ``client_class(server, **kwargs)`` with one ``(host, port)``; ``server``
    must be a node of the cluster (it stands for the cluster), and the kwargs go to
    ``shardcache.Client`` unchanged. Subclasses made by :func:`bind` carry the cluster.
    """

    cluster: LocalCluster
    made: list[shardcache.Client]

    def __init__(self, server: tuple[str, int], **kwargs: Any) -> None:
        addresses = [node.address for node in self.cluster.nodes]
        if tuple(server) not in addresses:
            raise AssertionError(f"server {server!r} is not a node of the session cluster {addresses}")
        super().__init__(self.cluster.specs, **kwargs)
        self.made.append(self)

    @classmethod
    def bind(cls, cluster: LocalCluster) -> type[ShardcacheSuiteClient]:
        """A subclass whose instances span ``cluster`` and are recorded in its ``made`` list."""
        return type(cls.__name__, (cls,), {"cluster": cluster, "made": []})


_LEAVE_CLIENTS_OPEN = ("test_incr_decr", "test_misc", "test_serialization_deserialization")
_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if (
            isinstance(item, pytest.Function)
            and item.function.__name__ in _LEAVE_CLIENTS_OPEN
            and Path(item.path).resolve().parent == _HERE
        ):
            item.add_marker(pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning"))


def _parametrized_by_test(metafunc: pytest.Metafunc, name: str) -> bool:
    """True if the test's own ``@pytest.mark.parametrize`` marks already cover ``name``."""
    for mark in metafunc.definition.iter_markers("parametrize"):
        argnames = mark.args[0] if mark.args else mark.kwargs.get("argnames", ())
        if isinstance(argnames, str):
            argnames = [part.strip() for part in argnames.split(",")]
        if name in argnames:
            return True
    return False


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "socket_module" in metafunc.fixturenames:
        metafunc.parametrize("socket_module", [socket], ids=["socket"])
    if "key_prefix" in metafunc.fixturenames and not _parametrized_by_test(metafunc, "key_prefix"):
        metafunc.parametrize("key_prefix", _KEY_PREFIXES)


@pytest.fixture
def host(cluster: LocalCluster) -> str:
    return cluster.nodes[0].host


@pytest.fixture
def port(cluster: LocalCluster) -> int:
    return cluster.nodes[0].port


@pytest.fixture
def client_class(cluster: LocalCluster) -> Iterator[type[ShardcacheSuiteClient]]:
    bound = ShardcacheSuiteClient.bind(cluster)
    yield bound
    for client in bound.made:
        client.close()


def _memory_limits(cluster: LocalCluster) -> dict[tuple[str, int], int]:
    limits = {}
    for node in cluster.nodes:
        with _direct(node.address) as client:
            limits[node.address] = int(client.stats("settings")[b"maxbytes"])
    return limits


def _direct(address: tuple[str, int]) -> contextlib.closing[PymemcacheClient]:
    """A plain pymemcache client to one node, closed on exit."""
    return contextlib.closing(PymemcacheClient(address, connect_timeout=2.0, timeout=2.0))


@pytest.fixture(autouse=True)
def _restore_memory_limits(cluster: LocalCluster) -> Iterator[None]:
    """Put back any node memory limit a test changed (``test_misc`` runs ``cache_memlimit 50``)."""
    before = _memory_limits(cluster)
    yield
    for address, limit in _memory_limits(cluster).items():
        if limit != before[address]:
            with _direct(address) as client:
                assert client.cache_memlimit(before[address] // (1024 * 1024))
