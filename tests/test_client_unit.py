"""Client behaviour that needs no server: options, key validation, routing, tokens, exports."""

import pickle
import socket

import pytest

import shardcache
from shardcache import (
    ArgumentError,
    CasToken,
    Client,
    ConfigurationError,
    KeyValidationError,
    NodeTimeoutError,
    NodeUnavailableError,
    Ring,
)

SERVERS = ["10.0.0.1:11211", ("10.0.0.2", 11211), "10.0.0.3:11211:2"]


PUBLIC_API = [
    "ArgumentError", "AsyncClient", "CasConflictError", "CasToken", "Client", "CommandError",
    "CompressedSerde", "ConfigurationError", "DefaultSerde", "Event", "KeyValidationError", "Lock",
    "LockError", "NodeError",
    "NodeSpec", "NodeTimeoutError", "NodeUnavailableError", "PickleSerde", "ProtocolError", "RebalanceReport",
    "Ring", "RingDiff", "Serde", "SerializationError", "ServerError", "ShardcacheError", "SignedPickleSerde",
    "ValueTooLargeError", "__version__", "default_serde", "dns_discovery", "parse_nodes",
]  # fmt: skip


def test_public_surface_is_exactly_this() -> None:
    # Adding or removing a public name is an API change: it must change this list too.
    assert shardcache.__all__ == PUBLIC_API
    for name in PUBLIC_API:
        assert getattr(shardcache, name) is not None
    exported = {n for n in dir(shardcache) if not n.startswith("_") and n not in PUBLIC_API}
    modules = {n for n in exported if type(getattr(shardcache, n)).__name__ == "module"}
    assert exported == modules  # anything else public-looking is a submodule, not a stray name


def test_constructor_does_no_io_even_for_unreachable_nodes() -> None:
    client = Client(["192.0.2.1:11211", "192.0.2.2:11211"])  # TEST-NET: nothing is contacted
    assert client.nodes == ("192.0.2.1:11211", "192.0.2.2:11211")


def test_routing_matches_a_ring_of_the_same_servers() -> None:
    client = Client(SERVERS)
    ring = Ring(SERVERS)
    for i in range(500):
        assert client.node_for(f"books/{i}") == ring.node_for(f"books/{i}")


def test_key_prefix_is_not_hashed_unless_asked() -> None:
    plain = Client(SERVERS)
    prefixed = Client(SERVERS, key_prefix="app1:")
    hashed = Client(SERVERS, key_prefix="app1:", hash_key_prefix=True)
    keys = [f"k{i}" for i in range(300)]
    assert [plain.node_for(k) for k in keys] == [prefixed.node_for(k) for k in keys]
    ring = Ring(SERVERS)
    assert [ring.node_for("app1:" + k) for k in keys] == [hashed.node_for(k) for k in keys]


@pytest.mark.parametrize(
    ("key", "fragment"),
    [
        ("a\r\nflush_all", "whitespace or a control character"),
        ("key with spaces", "whitespace"),
        (b"tab\tkey", "whitespace"),
        ("nul\x00", "control"),
        ("del\x7f", "control"),
        ("x" * 251, "251 bytes"),
        ("", "empty"),
        ("\u0fff", "allow_unicode_keys"),
        (12, "must be str or bytes"),
        (None, "must be str or bytes"),
    ],
)
def test_unsafe_keys_raise_before_anything_is_sent(key: object, fragment: str) -> None:
    client = Client(["192.0.2.1:11211"], connect_timeout=0.01, timeout=0.01)
    for call in (client.get, client.delete, client.node_for, lambda k: client.set(k, 1)):
        with pytest.raises(KeyValidationError, match=fragment):
            call(key)  # a network attempt would raise NodeError instead
    with pytest.raises(KeyValidationError, match=fragment):  # the bad key is named, wherever it is
        client.get_many(["fine", key, "also fine"])  # type: ignore[list-item]
    with pytest.raises(KeyValidationError, match=fragment):
        client.set_many({"fine": 1, key: 2, "also fine": 3})  # type: ignore[dict-item]


def test_prefix_counts_towards_the_key_length() -> None:
    client = Client(["192.0.2.1:11211"], key_prefix="p" * 10)
    with pytest.raises(KeyValidationError, match="260 bytes with its prefix"):
        client.get("k" * 250)


def test_unicode_keys_are_utf8_when_allowed() -> None:
    client = Client(SERVERS, allow_unicode_keys=True)
    assert client.node_for("clé") == client.node_for("clé".encode())


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"timeout": -1}, "timeout=-1"),
        ({"connect_timeout": "1"}, "connect_timeout='1'"),
        ({"max_pool_size": 0}, "max_pool_size=0"),
        ({"on_error": "ignore"}, "on_error='ignore'"),
        ({"key_prefix": "a b"}, "key_prefix='a b'"),
        ({"key_prefix": 5}, "key_prefix=5"),
        ({"serde": object()}, "serde="),
        ({"hashing": "crc32"}, "hashing='crc32'"),
        ({"timeuot": 1}, "did you mean 'timeout'"),
        ({"hasher": object}, "hashing='mmh3'"),
    ],
)
def test_bad_options_raise_naming_the_option(options: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Client(SERVERS, **options)  # type: ignore[arg-type]
    assert fragment in str(info.value)


def test_bad_server_list_raises_naming_the_entry() -> None:
    with pytest.raises(ConfigurationError, match="'h:99999'"):
        Client(["a:1", "h:99999"])


def test_callers_server_list_is_not_mutated() -> None:
    servers = ["a:1", ("b", 2)]
    Client(servers)
    assert servers == ["a:1", ("b", 2)]


def test_cas_token_remembers_its_node_and_survives_pickling() -> None:
    token = CasToken(b"12345", "10.0.0.1:11211")
    assert token == b"12345" and token.isdigit()
    again = pickle.loads(pickle.dumps(token))
    assert (again, again.node_id, type(again)) == (b"12345", "10.0.0.1:11211", CasToken)


def test_cas_with_a_token_from_another_node_is_a_conflict_without_io() -> None:
    client = Client(["192.0.2.1:11211", "192.0.2.2:11211"], connect_timeout=0.01)
    owner = client.node_for("hit_count")
    other = next(n for n in client.nodes if n != owner)
    assert client.cas("hit_count", 11, CasToken(b"7", other)) is False


def test_bad_expire_raises_argument_error() -> None:
    client = Client(["192.0.2.1:11211"])
    with pytest.raises(ArgumentError, match="expire"):
        client.set_many({"k": 1}, expire="soon")  # type: ignore[arg-type]
    with pytest.raises(ArgumentError, match="delay"):
        client.flush_all(delay=1.5)  # type: ignore[arg-type]


def test_unreachable_node_fails_within_the_timeout_naming_the_node() -> None:
    # A listening socket that never accepts: connects complete (backlog) but no reply ever comes.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    try:
        client = Client([f"127.0.0.1:{port}"], connect_timeout=0.1, timeout=0.1)
        with pytest.raises(NodeTimeoutError) as info:
            client.get("k")
        assert info.value.node_id == f"127.0.0.1:{port}"
        assert isinstance(info.value, NodeUnavailableError)
        with pytest.raises(NodeTimeoutError, match=f"127.0.0.1:{port}"):
            client.get_many(["a", "b"])
        miss = Client([f"127.0.0.1:{port}"], timeout=0.1, on_error="miss")
        assert miss.get("k", "dflt") == "dflt"
        assert miss.set("k", 1) is False
        assert miss.get_many(["a"]) == {}
    finally:
        listener.close()


def test_refused_connection_is_node_unavailable() -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    client = Client([f"127.0.0.1:{port}"], connect_timeout=0.5)
    with pytest.raises(NodeUnavailableError, match="refused"):
        client.set("k", 1)
    with pytest.raises(NodeUnavailableError):
        client.set_many({"k": 1})


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"failover": "retry"}, "failover='retry'"),
        ({"failure_threshold": 0}, "failure_threshold=0"),
        ({"failure_threshold": -3}, "failure_threshold=-3"),
        ({"retry_interval_s": -1}, "retry_interval_s=-1"),
        ({"failover_ttl_s": 0}, "failover_ttl_s=0"),
        ({"fence_max_keys": -1}, "fence_max_keys=-1"),
        ({"failover": "gutter"}, "needs gutter_servers"),
        ({"failover": "gutter", "gutter_servers": []}, "needs gutter_servers"),
        ({"failover": "gutter", "gutter_servers": ["10.0.0.1:11211"]}, "also a ring member"),
        ({"gutter_servers": ["g:0"]}, "'g:0'"),
        ({"dead_timeout": 60}, "retry_interval_s"),
    ],
)
def test_bad_failover_options_raise_naming_the_option(options: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Client(SERVERS, **options)  # type: ignore[arg-type]
    assert fragment in str(info.value)


def test_new_client_reports_every_node_up_with_zero_counters() -> None:
    client = Client(SERVERS)
    assert client.node_states() == dict.fromkeys(client.nodes, "up")
    assert all(
        c == {"ops": 0, "errors": 0, "timeouts": 0, "failovers": 0, "state_changes": 0}
        for c in client.node_counters().values()
    )


@pytest.mark.parametrize("flags", [-1, 2**32, 1.5, "7", True])
def test_bad_flags_raise_before_anything_is_sent(flags: object) -> None:
    # flags=-1 would make memcached skip the data block and run the value as a command
    client = Client(["192.0.2.1:11211"], connect_timeout=0.01, timeout=0.01)
    with pytest.raises(ArgumentError, match="flags"):
        client.set("k", b"flush_all", flags=flags)  # type: ignore[arg-type]
    with pytest.raises(ArgumentError, match="flags"):
        client.set_many({"k": b"flush_all"}, flags=flags)  # type: ignore[arg-type]


@pytest.mark.parametrize("token", [b"12a", "x", -1, 1.5, None, b""])
def test_bad_cas_tokens_raise_before_anything_is_sent(token: object) -> None:
    client = Client(["192.0.2.1:11211"], connect_timeout=0.01, timeout=0.01)
    with pytest.raises(ArgumentError, match="cas"):
        client.cas("k", 1, token)


def test_pymemcache_multi_names_are_the_many_calls() -> None:
    from pymemcache.client.base import Client as PymemcacheClient

    for old, new in (("get_multi", "get_many"), ("set_multi", "set_many"), ("delete_multi", "delete_many")):
        assert hasattr(PymemcacheClient, old)
        assert getattr(Client, old) is getattr(Client, new)
