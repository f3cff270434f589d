"""shardcache.Client over TLS: three memcached nodes started with ``-Z`` and a self-signed certificate.

The nodes are local processes on every backend (``ProcessNode(tls=...)``): memcached needs the
certificate and key as files it can read at start-up, and ``ContainerNode`` neither mounts files
into the container nor knows whether the image's memcached was built with TLS; the host's
memcached (Debian 12: 1.6.18) is. So this module needs the ``memcached`` binary even when
SHARDCACHE_TEST_BACKEND=docker, as the TLS test in test_infrastructure.py does.

The certificate names 127.0.0.1 (IP SAN) and localhost; clients connect to 127.0.0.1 with hostname
checking on, so a handshake proves the name matched as well as the trust.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pymemcache.client.base import Client as PymemcacheClient

import shardcache
from shardcache.errors import NodeError, NodeUnavailableError
from shardcache.testing import ProcessNode, ServerSetupError, make_self_signed_cert

pytestmark = pytest.mark.smoke

MakeClient = Callable[..., shardcache.Client]


class TlsCluster:
    """Three TLS memcached processes and the certificate they serve."""

    def __init__(self, cert: Path, nodes: list[ProcessNode]) -> None:
        self.cert = cert
        self.nodes = nodes

    @property
    def specs(self) -> list[str]:
        return [node.spec for node in self.nodes]


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsCluster]:
    cert, key = make_self_signed_cert(tmp_path_factory.mktemp("tls"))
    nodes: list[ProcessNode] = []
    try:
        for _ in range(3):
            node = ProcessNode(tls=(cert, key))
            nodes.append(node)
            node.start()
    except ServerSetupError as exc:
        for node in nodes:
            node.close()
        pytest.fail(f"could not start memcached with TLS: {exc}", pytrace=False)
    yield TlsCluster(cert, nodes)
    for node in nodes:
        node.close()


@pytest.fixture
def tls(tls_cluster: TlsCluster) -> TlsCluster:
    """The module's TLS cluster, every node flushed."""
    for node in tls_cluster.nodes:
        node.flush_all()
    return tls_cluster


@pytest.fixture
def client_for(tls: TlsCluster) -> Iterator[MakeClient]:
    """``client_for(tls_context=...)``: a shardcache.Client over the TLS nodes, closed at teardown."""
    made: list[shardcache.Client] = []

    def make(**options: Any) -> shardcache.Client:
        client = shardcache.Client(tls.specs, connect_timeout=1.0, timeout=1.0, **options)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def trusting(cert: Path) -> ssl.SSLContext:
    """A client context that trusts ``cert`` only, with certificate and hostname checks on."""
    ctx = ssl.create_default_context(cafile=str(cert))
    assert ctx.check_hostname
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    return ctx


def test_nodes_serve_tls_only(tls: TlsCluster) -> None:
    for node in tls.nodes:
        with_tls = PymemcacheClient(node.address, tls_context=trusting(tls.cert), timeout=2.0)
        try:
            assert with_tls.stats("settings")[b"ssl_enabled"] in (True, b"yes", "yes")
        finally:
            with_tls.close()


def test_round_trips_over_tls_on_all_three_nodes(tls: TlsCluster, client_for: MakeClient) -> None:
    client = client_for(tls_context=trusting(tls.cert))
    values = {f"tls/{i}": (f"value {i} " * (i % 7 + 1)) for i in range(100)}
    values["tls/large"] = "x" * 300_000  # many TLS records in one reply
    assert {client.node_for(key) for key in values} == set(client.nodes) == set(tls.specs)

    assert client.set("tls/one", b"\x00binary\xff")
    assert client.get("tls/one") == b"\x00binary\xff"

    assert client.set_many(values, expire=60) == []
    assert client.get_many([*values, "tls/absent"]) == values
    assert client.get("tls/large") == values["tls/large"]

    assert client.delete_many(list(values))
    assert client.get_many(values) == {}
    assert client.get("tls/one") == b"\x00binary\xff"
    assert client.delete("tls/one")
    assert client.get("tls/one") is None


def test_client_without_tls_context_fails_with_a_node_error(tls: TlsCluster, client_for: MakeClient) -> None:
    client = client_for()
    with pytest.raises(NodeError) as single:
        client.get("tls/key")
    assert single.value.node_id == client.node_for("tls/key")
    with pytest.raises(NodeError):
        client.set("tls/key", "value")
    keys = [f"tls/{i}" for i in range(30)]
    with pytest.raises(NodeError):
        client.get_many(keys)
    with pytest.raises(NodeError):
        client.set_many(dict.fromkeys(keys, "value"))


def test_context_not_trusting_the_cert_fails_with_unavailable_caused_by_ssl_error(
    tls: TlsCluster,
    client_for: MakeClient,
    tmp_path: Path,
) -> None:
    other_cert, _ = make_self_signed_cert(tmp_path)  # same names, another key: not trusted
    client = client_for(tls_context=trusting(other_cert))

    with pytest.raises(NodeUnavailableError) as single:
        client.set("tls/key", "value")
    assert single.value.node_id == client.node_for("tls/key")
    assert isinstance(single.value.__cause__, ssl.SSLCertVerificationError), repr(single.value.__cause__)

    with pytest.raises(NodeUnavailableError) as multi:
        client.get_many([f"tls/{i}" for i in range(30)])
    assert isinstance(multi.value.__cause__, ssl.SSLError), repr(multi.value.__cause__)
