"""DNS discovery with an injected resolver: no network."""

import socket

import pytest

from shardcache import dns_discovery


def test_dns_discovery_returns_sorted_specs_with_ipv6_in_brackets() -> None:
    answers = [
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.2", 11211)),
        (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("2001:db8::1", 11211, 0, 0)),
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.1", 11211)),
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.1", 11211)),
    ]
    seen = []

    def resolver(name: str, port: int) -> list[tuple[object, ...]]:
        seen.append((name, port))
        return answers

    discover = dns_discovery("memcached.internal", 11300, resolver=resolver)
    assert discover() == ["10.0.0.1:11300", "10.0.0.2:11300", "[2001:db8::1]:11300"]
    assert seen == [("memcached.internal", 11300)]


def test_a_name_with_no_records_raises_so_the_last_good_list_is_kept() -> None:
    with pytest.raises(LookupError, match="no address"):
        dns_discovery("empty.internal", resolver=lambda n, p: [])()
