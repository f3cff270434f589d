"""The CAS recipes' argument checks and objects, with no server: every check fires before any I/O.

Clients here get a ``socket_module`` that fails the test if anything tries to open a connection,
so "raises ArgumentError" also proves "raises before sending anything".
"""

from __future__ import annotations

import pickle
from types import ModuleType
from typing import Any

import pytest
from pymemcache.exceptions import MemcacheError

from shardcache import ArgumentError, CasConflictError, Client, Lock, LockError, ShardcacheError


class _NoNetwork(ModuleType):
    """A stand-in for the ``socket`` module: any use of it fails the test."""

    def __getattr__(self, name: str) -> Any:
        pytest.fail(f"network I/O attempted: socket.{name}")


def offline_client() -> Client:
    return Client(["127.0.0.1:1", "127.0.0.1:2"], socket_module=_NoNetwork("socket"))


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "3", None])
def test_cas_update_rejects_a_bad_max_attempts_before_any_io(bad: object) -> None:
    with pytest.raises(ArgumentError, match="max_attempts"):
        offline_client().cas_update("hit_count", lambda n: n + 1, initial=0, max_attempts=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("option", ["backoff_s", "max_backoff_s"])
def test_cas_update_rejects_a_negative_backoff_before_any_io(option: str) -> None:
    with pytest.raises(ArgumentError, match=option):
        offline_client().cas_update("hit_count", lambda n: n + 1, initial=0, **{option: -1.0})


@pytest.mark.parametrize("bad", [0, -5, True, 1.5, None, "30"])
def test_lock_rejects_a_ttl_that_is_not_whole_seconds_before_any_io(bad: object) -> None:
    with pytest.raises(ArgumentError, match="ttl_s"):
        offline_client().lock("report:42", ttl_s=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [-1, True, 1.5, "0"])
@pytest.mark.parametrize("command", ["incr", "decr"])
def test_counters_reject_a_bad_initial_before_any_io(command: str, bad: object) -> None:
    with pytest.raises(ArgumentError, match="initial"):
        getattr(offline_client(), command)("hit_count", 1, initial=bad)


@pytest.mark.parametrize("bad", [b"abc", b"-1", None, 1.5])
def test_cas_with_a_malformed_token_raises_argument_error_before_any_io(bad: object) -> None:
    with pytest.raises(ArgumentError, match="cas"):
        offline_client().cas("hit_count", 11, bad)


@pytest.mark.parametrize(
    ("name", "key"), [("report:42", b"report:42:lock"), (b"report:42", b"report:42:lock")]
)
def test_a_lock_lives_under_its_name_plus_lock_and_needs_no_io_until_used(
    name: str | bytes, key: bytes
) -> None:
    lock = offline_client().lock(name, ttl_s=5)
    assert isinstance(lock, Lock)
    assert lock.name == key
    assert lock.token is None
    assert lock.release() is False  # never acquired: nothing to release, nothing sent


def test_cached_keeps_the_functions_identity_and_does_no_io_when_decorating() -> None:
    client = offline_client()

    def book_page(book_id: int) -> str:
        """The page of a book."""
        return f"<h1>{book_id}</h1>"

    wrapped = client.cached(expire=60, key="books/{0}")(book_page)
    assert wrapped.__name__ == "book_page" and wrapped.__doc__ == "The page of a book."
    assert wrapped.__wrapped__ is book_page  # type: ignore[attr-defined]
    assert wrapped.uncached is book_page  # type: ignore[attr-defined]
    assert wrapped.uncached(7) == "<h1>7</h1>"  # type: ignore[attr-defined]
    assert callable(wrapped.invalidate)  # type: ignore[attr-defined]


def test_recipe_errors_are_shardcache_and_pymemcache_errors_and_pickle_with_their_details() -> None:
    conflict = pickle.loads(pickle.dumps(CasConflictError("gave up", "hit_count", 64)))
    assert (str(conflict), conflict.key, conflict.attempts) == ("gave up", "hit_count", 64)
    lock_error = pickle.loads(pickle.dumps(LockError("not acquired", b"L:lock")))
    assert (str(lock_error), lock_error.name) == ("not acquired", b"L:lock")
    for err in (conflict, lock_error):
        assert isinstance(err, ShardcacheError) and isinstance(err, MemcacheError)
