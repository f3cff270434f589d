"""Race-free patterns over a ``Client``: the CAS retry loop, a lock, stampede protection, a decorator.

Each works across processes (the state lives in memcached), and each is built on memcached's atomic
primitives: ``gets``/``cas`` with node-bound tokens, and ``add``. All are exposed as ``Client``
methods (``cas_update``, ``lock``, ``get_or_set``, ``cached``).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import random
import time
import uuid
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from shardcache._core import COUNTER, UNAVAILABLE
from shardcache.errors import ArgumentError, CasConflictError, LockError

if TYPE_CHECKING:
    from shardcache._core import Key
    from shardcache.client import Client

__all__ = ["Lock", "cached", "cas_update", "get_or_set"]

P = ParamSpec("P")
R = TypeVar("R")

_MISS = object()
_LOCK_SUFFIX = b":lock"


def _backoff(attempt: int, base_s: float, cap_s: float, rng: random.Random) -> None:
    """Sleep a jittered exponential backoff ("full jitter"): uniform in [0, min(cap, base * 2**n)]."""
    time.sleep(rng.uniform(0, min(cap_s, base_s * (2**attempt))))


def cas_update(
    client: Client,
    key: Key,
    fn: Callable[[Any], Any],
    *,
    initial: Any = None,
    expire: int = 0,
    max_attempts: int = 64,
    backoff_s: float = 0.001,
    max_backoff_s: float = 0.05,
) -> Any:
    """Apply ``fn`` to the value of ``key`` atomically; the value stored is returned.

    The loop: ``gets``; ``new = fn(old)``; ``cas``; on a conflict, back off (jittered) and start
    again. An absent key is created with ``add(key, fn(initial))``, so two creators cannot both
    win. If the key's owner changes between ``gets`` and ``cas`` (a node added, a failover), the
    node-bound token makes ``cas`` report a conflict and the loop re-reads. ``fn`` may run several
    times; if it raises, nothing is written and the exception propagates. After ``max_attempts``
    conflicts, ``CasConflictError``. The loop never runs on a stand-in node (the value would
    restart from ``initial`` there): if the key's node is unavailable, the node error propagates,
    or with ``on_error="miss"`` the call returns None.
    """
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
        raise ArgumentError(f"max_attempts must be an int >= 1, got {max_attempts!r}")
    for name, value in (("backoff_s", backoff_s), ("max_backoff_s", max_backoff_s)):
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ArgumentError(f"{name} must be seconds >= 0, got {value!r}")
    rng = random.Random()
    for attempt in range(max_attempts):
        # COUNTER routing: never on a stand-in node, where the value would restart from `initial`
        found = client._gets(key, _MISS, None, COUNTER)
        if found is UNAVAILABLE:
            return None  # its node is down or failed and on_error="miss" (with "raise" it raised)
        if found is None:
            new = fn(initial)
            outcome = client._store(b"add", key, new, expire, False, None, kind=COUNTER, missed=UNAVAILABLE)
        else:
            value, token = found
            new = fn(value)
            outcome = client._cas(key, new, token, expire, False, None, COUNTER)
        if outcome is UNAVAILABLE:
            return None
        if outcome:
            return new
        _backoff(attempt, backoff_s, max_backoff_s, rng)
    raise CasConflictError(
        f"cas_update({key!r}) gave up after {max_attempts} attempts: too much contention",
        key,
        max_attempts,
    )


class Lock:
    """A distributed lock on ``name``, held by whoever ``add``-ed its key first; a context manager.

    The key holds a unique owner token and expires after ``ttl_s`` (so a crashed holder cannot
    block others forever). Release deletes the key only if it still holds this owner's token
    (memcached's meta delete with the CAS value), so an owner whose lock expired and was taken by
    someone else cannot release the new holder's lock. Not reentrant; one ``Lock`` object per
    acquisition attempt is the intended use, but it may be reused after release.
    """

    def __init__(
        self,
        client: Client,
        name: Key,
        *,
        ttl_s: int = 30,
        blocking_timeout_s: float | None = 10.0,
        sleep_s: float = 0.01,
    ) -> None:
        if isinstance(ttl_s, bool) or not isinstance(ttl_s, int) or ttl_s < 1:
            raise ArgumentError(f"ttl_s must be an int >= 1 (memcached expiry is in seconds), got {ttl_s!r}")
        self._client = client
        self._key = (name.encode() if isinstance(name, str) else bytes(name)) + _LOCK_SUFFIX
        self._ttl_s = ttl_s
        self._blocking_timeout_s = blocking_timeout_s
        self._sleep_s = sleep_s
        self.token: bytes | None = None
        self.unavailable = False  # the last acquire failed because the lock's node was unreachable

    @property
    def name(self) -> bytes:
        """The memcached key of the lock."""
        return self._key

    def acquire(self, blocking: bool = True) -> bool:
        """Take the lock; wait up to ``blocking_timeout_s`` if ``blocking``. True if taken."""
        token = uuid.uuid4().hex.encode()
        deadline = None if self._blocking_timeout_s is None else time.monotonic() + self._blocking_timeout_s
        rng = random.Random()
        attempt = 0
        self.unavailable = False
        while True:
            # COUNTER routing: a lock never moves to a stand-in, where a second holder could take it
            taken = self._client._store(
                b"add", self._key, token, self._ttl_s, False, None, kind=COUNTER, missed=UNAVAILABLE
            )
            if taken is UNAVAILABLE:  # its node is down (on_error="miss"): no one can hold it now
                self.unavailable = True
                return False
            if taken:
                self.token = token
                return True
            if not blocking or (deadline is not None and time.monotonic() >= deadline):
                return False
            pause = rng.uniform(0.5, 1.5) * min(self._sleep_s * (2 ** min(attempt, 6)), 0.2)
            if deadline is not None:
                pause = min(pause, max(deadline - time.monotonic(), 0))
            time.sleep(pause)
            attempt += 1

    def release(self) -> bool:
        """Release the lock if this owner still holds it. True if released by this call."""
        token, self.token = self.token, None
        if token is None:
            return False
        return self._client._delete_if_value(self._key, token)

    def locked(self) -> bool:
        """True if someone (anyone) holds the lock now."""
        return self._client.get(self._key) is not None

    def __enter__(self) -> Lock:
        if not self.acquire():
            raise LockError(
                f"could not acquire lock {self._key!r} within {self._blocking_timeout_s} s", self._key
            )
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def get_or_set(
    client: Client,
    key: Key,
    factory: Callable[[], Any],
    *,
    expire: int = 0,
    lock_ttl_s: int = 10,
    wait_s: float | None = None,
    poll_s: float = 0.01,
) -> Any:
    """The value of ``key``; on a miss, exactly one caller (across processes) runs ``factory``.

    The first caller to miss takes a short lock (``add``) and computes the value; the others poll
    the key until it appears (up to ``wait_s``, default ``lock_ttl_s``). If the holder dies, its
    lock expires after ``lock_ttl_s`` and a waiter takes over. A waiter that runs out of time
    computes the value itself rather than fail.
    """
    value = client.get(key, _MISS)
    if value is not _MISS:
        return value
    lock = Lock(client, key, ttl_s=lock_ttl_s, blocking_timeout_s=0)
    deadline = time.monotonic() + (lock_ttl_s if wait_s is None else wait_s)
    rng = random.Random()
    attempt = 0
    while True:
        taken = lock.acquire(blocking=False)
        if not taken and lock.unavailable:  # nobody can coordinate: compute, and cache if we can
            value = factory()
            client.set(key, value, expire, noreply=False)
            return value
        if taken:
            try:
                value = client.get(key, _MISS)  # someone may have finished just before we locked
                if value is _MISS:
                    value = factory()
                    client.set(key, value, expire, noreply=False)
                return value
            finally:
                lock.release()
        time.sleep(rng.uniform(0.5, 1.5) * min(poll_s * (2 ** min(attempt, 4)), 0.1))
        attempt += 1
        value = client.get(key, _MISS)
        if value is not _MISS:
            return value
        if time.monotonic() >= deadline:
            value = factory()
            client.set(key, value, expire, noreply=False)
            return value


def cached(
    client: Client,
    *,
    expire: int = 0,
    key: Callable[..., Key] | str | None = None,
    lock_ttl_s: int = 10,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorator: cache a function's result in memcached, one computation per miss (``get_or_set``).

    ``key`` is a callable taking the function's arguments, a ``str.format`` template over them
    (``"books/{0}"`` or ``"books/{book_id}"``), or None: the function's qualified name plus a SHA-1
    of the arguments' ``repr``. ``wrapper.uncached`` calls the function directly and
    ``wrapper.invalidate(*args, **kwargs)`` deletes the entry.
    """

    def decorate(func: Callable[P, R]) -> Callable[P, R]:
        prefix = f"{func.__module__}.{func.__qualname__}"

        signature = inspect.signature(func)

        def key_for(*args: Any, **kwargs: Any) -> Key:
            if callable(key):
                return key(*args, **kwargs)
            if isinstance(key, str):  # "{0}" and "{name}" both work, however the call passed it
                bound = signature.bind(*args, **kwargs)
                bound.apply_defaults()
                return key.format(*bound.args, **bound.arguments)
            digest = hashlib.sha1(repr((args, sorted(kwargs.items()))).encode()).hexdigest()
            return f"{prefix}:{digest}"

        @functools.wraps(func)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            result: R = get_or_set(
                client, key_for(*args, **kwargs), lambda: func(*args, **kwargs), expire=expire,
                lock_ttl_s=lock_ttl_s,
            )  # fmt: skip
            return result

        def invalidate(*args: Any, **kwargs: Any) -> bool:
            return client.delete(key_for(*args, **kwargs), noreply=False)

        wrapper.uncached = func  # type: ignore[attr-defined]
        wrapper.invalidate = invalidate  # type: ignore[attr-defined]
        return wrapper

    return decorate
