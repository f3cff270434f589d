"""Regression tests for the safety defects issue 10 closes: hostile numbers, names and containers are
refused with a ShardcacheError naming the bad value, before anything is sent.

The clients point at 127.0.0.1:9 (discard; nothing listens there in a test run): if a call reached
the network it would raise NodeUnavailableError instead of the ArgumentError asserted here, so each
test also proves that nothing was sent. The wire-level half (exact bytes, parser) is in
``test_protocol.py``; the fork half of discovery is below.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import pytest

from shardcache import ArgumentError, Client, ConfigurationError, KeyValidationError, ShardcacheError
from shardcache.discovery import Poller

NOWHERE = "127.0.0.1:9"
HUGE = [2**63, -(2**63) - 1, 2**64, 2**31, -(2**31) - 1, 10**30]


@pytest.fixture
def client() -> Any:
    with Client([NOWHERE], connect_timeout=0.2, timeout=0.2) as c:
        yield c


def refused(exc: pytest.ExceptionInfo[BaseException], bad: Any) -> None:
    assert isinstance(exc.value, ShardcacheError)
    assert repr(bad) in str(exc.value) or str(bad) in str(exc.value), str(exc.value)


@pytest.mark.parametrize("expire", HUGE)
@pytest.mark.parametrize("noreply", [False, True])
def test_an_expire_out_of_range_is_refused_before_anything_is_sent(
    client: Any, expire: int, noreply: bool
) -> None:
    for call in (client.set, client.add, client.replace, client.append, client.prepend):
        with pytest.raises(ArgumentError) as exc:
            call("k", b"flush_all", expire=expire, noreply=noreply)
        refused(exc, expire)
    with pytest.raises(ArgumentError):
        client.touch("k", expire)
    with pytest.raises(ArgumentError):
        client.set_many({"k": b"set victim/0 0 0 1\r\nx"}, expire=expire)


@pytest.mark.parametrize("token", [2**64, -1, 10**40])
def test_a_cas_token_out_of_range_is_refused(client: Any, token: int) -> None:
    with pytest.raises(ArgumentError) as exc:
        client.cas("k", b"flush_all", token)
    refused(exc, token)


@pytest.mark.parametrize("number", [2**64, -1, 10**30, 1.5, True, "1"])
def test_counter_deltas_and_initials_out_of_range_are_refused(client: Any, number: Any) -> None:
    with pytest.raises(ArgumentError):
        client.incr("k", number)
    with pytest.raises(ArgumentError):
        client.incr("k", 1, initial=number)
    with pytest.raises(ArgumentError):
        client.decr("k", number)


@pytest.mark.parametrize("ttl", [2**63, 2**31, -1, 0, 1.5, True])
def test_a_lock_ttl_out_of_range_is_refused(client: Any, ttl: Any) -> None:
    with pytest.raises((ArgumentError, ConfigurationError)):
        client.lock("rebuild", ttl_s=ttl)


BAD_NAMES = [None, 1.5, ("a",), "\ud800", "", b"", 10**9, "caf\u00e9", "a b", "a\r\nset"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_lock_names_are_refused_with_our_exception(client: Any, name: Any) -> None:
    with pytest.raises((ArgumentError, KeyValidationError)) as exc:
        client.lock(name)
    assert isinstance(exc.value, ShardcacheError)


@pytest.mark.parametrize("name", [5, 0])
def test_an_int_lock_name_is_refused_not_read_as_a_length(client: Any, name: int) -> None:
    # bytes(5) would be five NUL bytes, and 0 an empty name that locks ":lock"
    with pytest.raises((ArgumentError, KeyValidationError)):
        client.lock(name)


@pytest.mark.parametrize("keys", [None, 5, "abc", b"abc", {"k": 1}.items(), [["a"]], [None], [1.5]])
def test_multi_key_calls_refuse_a_wrong_container_or_key_with_our_exception(client: Any, keys: Any) -> None:
    for call in (client.get_many, client.gets_many, client.delete_many):
        with pytest.raises(ShardcacheError):
            call(keys)


def test_set_many_refuses_a_wrong_shape_before_sending_anything(client: Any) -> None:
    for values in (None, 5, "ab", [("a",)], [("a", 1, 2)], [1, 2]):
        with pytest.raises(ShardcacheError):
            client.set_many(values)
    with pytest.raises(ArgumentError):  # one bad item: nothing half-written
        client.set_many({"ok": 1, "bad": 2}, expire=2**63)


@pytest.mark.parametrize("weight", [0, -1, 1.5, True, "2", 10**9, 1e9])
def test_a_bad_weight_is_a_configuration_error_not_a_memory_error(weight: Any) -> None:
    with pytest.raises(ConfigurationError) as exc:
        Client([("127.0.0.1", 11211, weight)])
    assert str(weight) in str(exc.value) or repr(weight) in str(exc.value)


def test_the_idle_pool_is_bounded_by_default() -> None:
    with Client([NOWHERE]) as c:
        assert c._core.options.max_pool_size == 16  # 200 greenlets leave at most 16 idle sockets


def test_a_discovery_poller_runs_again_in_a_forked_child() -> None:
    """Prefork servers (gunicorn, uwsgi) fork after the client is made: the child must poll too."""
    if not hasattr(os, "fork"):
        pytest.skip("no fork() on this platform")
    polled = threading.Event()
    poller = Poller(lambda: ["127.0.0.1:11211"], lambda nodes: polled.set(), 0.05, lambda event: None)
    try:
        assert polled.wait(5)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report whether its own poller polls, then leave at once
            try:
                polled.clear()
                ok = polled.wait(5)
                os.write(write_end, b"1" if ok else b"0")
            finally:
                os._exit(0)
        os.close(write_end)
        deadline = time.monotonic() + 10
        answer = b""
        while not answer and time.monotonic() < deadline:
            answer = os.read(read_end, 1)
        os.close(read_end)
        os.waitpid(pid, 0)
        assert answer == b"1"
    finally:
        poller.close()


def test_timeout_is_a_deadline_for_the_whole_call_not_for_each_recv() -> None:
    """A lying server that drips its reply one byte every 0.05 s: each recv succeeds within the
    timeout, so only a deadline for the whole call stops it (it took ~10 s with timeout=1.0)."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    port = server.getsockname()[1]
    stop = threading.Event()

    def drip() -> None:
        server.settimeout(0.1)
        conns = []
        try:
            while not stop.is_set():
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    continue
                conns.append(conn)
                reply = b"VALUE k 0 40\r\n" + b"x" * 40 + b"\r\nEND\r\n"
                for byte in reply:
                    if stop.wait(0.05):
                        break
                    try:
                        conn.send(bytes([byte]))
                    except OSError:
                        break
        finally:
            for conn in conns:
                conn.close()

    thread = threading.Thread(target=drip, daemon=True)
    thread.start()
    try:
        with Client([f"127.0.0.1:{port}"], timeout=0.3, connect_timeout=1.0) as c:
            started = time.monotonic()
            with pytest.raises(ShardcacheError) as exc:
                c.get("k")
            elapsed = time.monotonic() - started
        assert "timeout" in str(exc.value) or "timed out" in str(exc.value)
        assert elapsed < 1.5  # one call, bounded by its deadline (0.3 s), not 40 bytes x 0.05 s = 2 s
    finally:
        stop.set()
        thread.join(5)
        server.close()


def test_incr_with_noreply_cannot_create_a_counter_so_it_says_so(client: Any) -> None:
    with pytest.raises(ArgumentError) as exc:
        client.incr("hits", 1, initial=1, noreply=True)
    assert "initial=1" in str(exc.value) and "noreply" in str(exc.value)
