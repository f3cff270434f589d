"""Race-free patterns: the CAS retry loop, a lock, stampede protection, a decorator.

Each works across processes (the state lives in memcached) and is built on memcached's atomic
primitives: ``gets``/``cas`` with node-bound tokens, ``add``, and meta delete with a CAS value. They
are exposed as ``Client`` methods (``cas_update``, ``lock``, ``get_or_set``, ``cached``).

Each recipe is written once, as a flow over the command flows of ``shardcache._commands`` (the
small typed internal API: ``gets``, ``store``, ``compare_delete``, ``get``), and run by the client's
executor through its :class:`~shardcache._commands.Engine`. None of them runs on a stand-in node:
a counter, CAS loop or lock there would restart from nothing.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import random
import uuid
from collections.abc import Callable
from types import TracebackType
from typing import Any, Final, ParamSpec, Protocol, TypeVar

from shardcache import _commands as cmd
from shardcache._commands import UNAVAILABLE, Core, Engine
from shardcache._flows import Compute, Flow, Sleep
from shardcache._router import CallKind
from shardcache.errors import ArgumentError, CasConflictError, LockError

__all__ = ["Lock", "cached", "cas_update", "get_or_set", "key_function"]

P = ParamSpec("P")
R = TypeVar("R")
Key = str | bytes

_MISS: Final = object()
_LOCK_SUFFIX: Final = b":lock"
_MAX_TTL_S: Final = 30 * 24 * 3600  # memcached reads a larger expiry as a Unix timestamp


class HasEngine(Protocol):
    """What the recipes need from a client: its engine (core + executor)."""

    @property
    def _engine(self) -> Engine: ...


def _seconds(name: str, value: object, *, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < float("inf"):
        raise ArgumentError(f"{name} must be finite seconds >= 0, got {value!r}")
    return float(value)


def _ttl(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX_TTL_S:
        raise ArgumentError(
            f"{name} must be an int in 1..{_MAX_TTL_S} (memcached expiry is whole seconds, at most 30 days),"
            f" got {value!r}"
        )
    return value


def _pause(rng: random.Random, attempt: int, base_s: float, cap_s: float) -> Sleep:
    """A jittered exponential backoff ("full jitter"): uniform in [0, min(cap, base * 2**n)]."""
    return Sleep(rng.uniform(0, min(cap_s, base_s * (2 ** min(attempt, 30)))))


# -- the CAS retry loop ---------------------------------------------------------------------------


def cas_update_flow(
    core: Core, key: Any, fn: Callable[[Any], Any], *, initial: Any, expire: int, max_attempts: int,
    backoff_s: float, max_backoff_s: float,
) -> Flow[Any]:  # fmt: skip
    """See :func:`cas_update`."""
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
        raise ArgumentError(f"max_attempts must be an int >= 1, got {max_attempts!r}")
    base = _seconds("backoff_s", backoff_s) or 0.0
    cap = _seconds("max_backoff_s", max_backoff_s) or 0.0
    core.keys.wire(key)
    rng = random.Random()
    for attempt in range(max_attempts):
        found = yield from cmd.gets(core, key, CallKind.PINNED_READ)
        if found is UNAVAILABLE:
            return None  # its node is down or failed and on_error="miss" (with "raise" it raised)
        if found is None:
            new = yield Compute(fn, (initial,))
            outcome = yield from cmd.store(core, b"add", key, new, expire, False, None, CallKind.PINNED)
        else:
            value, token = found
            new = yield Compute(fn, (value,))
            outcome = yield from cmd.store(
                core, b"cas", key, new, expire, False, None, CallKind.PINNED, token
            )
        if outcome is UNAVAILABLE:
            return None
        if outcome:
            return new
        yield _pause(rng, attempt, base, cap)
    raise CasConflictError(
        f"cas_update({key!r}) gave up after {max_attempts} attempts: too much contention", key, max_attempts
    )


def cas_update(
    client: HasEngine, key: Key, fn: Callable[[Any], Any], *, initial: Any = None, expire: int = 0,
    max_attempts: int = 64, backoff_s: float = 0.001, max_backoff_s: float = 0.05,
) -> Any:  # fmt: skip
    """Apply ``fn`` to the value of ``key`` atomically; the value stored is returned.

    The loop: ``gets``; ``new = fn(old)``; ``cas``; on a conflict, back off (jittered) and start
    again. An absent key is created with ``add(key, fn(initial))``, so two creators cannot both
    win. If the key's owner changes between ``gets`` and ``cas`` (a node added, a failover), the
    node-bound token makes ``cas`` report a conflict and the loop re-reads. ``fn`` may run several
    times; if it raises, nothing is written and the exception propagates. After ``max_attempts``
    conflicts, ``CasConflictError``. The loop never runs on a stand-in node: if the key's node is
    unavailable, the node error propagates, or with ``on_error="miss"`` the call returns None.
    """
    engine = client._engine
    return engine.run(cas_update_flow(
        engine.core, key, fn, initial=initial, expire=expire, max_attempts=max_attempts,
        backoff_s=backoff_s, max_backoff_s=max_backoff_s,
    ))  # fmt: skip


# -- the lock -------------------------------------------------------------------------------------


class Lock:
    """A distributed lock on ``name``, held by whoever ``add``-ed its key first; a context manager.

    The key (``name + ":lock"``, validated like any key) holds a unique owner token and expires
    after ``ttl_s`` (so a crashed holder cannot block others forever). Release deletes the key only
    if it still holds this owner's token (meta delete with the CAS value), so an owner whose lock
    expired and was taken by someone else cannot release the new holder's lock. Not reentrant;
    one object per holder and thread (it may be reused after release).
    """

    def __init__(
        self, client: HasEngine, name: Key, *, ttl_s: int = 30, blocking_timeout_s: float | None = 10.0,
        sleep_s: float = 0.01,
    ) -> None:  # fmt: skip
        self._engine = client._engine
        core = self._engine.core
        raw = core.keys.raw(name)
        if not raw:
            raise ArgumentError(f"a lock needs a non-empty name, got {name!r}")
        self._key = raw + _LOCK_SUFFIX
        core.keys.wire(self._key)  # too long, or spaces/control characters: KeyValidationError now
        self._ttl_s = _ttl("ttl_s", ttl_s)
        self._blocking_timeout_s = _seconds("blocking_timeout_s", blocking_timeout_s, allow_none=True)
        self._sleep_s = _seconds("sleep_s", sleep_s) or 0.0
        self.token: bytes | None = None
        self.unavailable = False  # the last acquire failed because the lock's node was unreachable

    @property
    def name(self) -> bytes:
        """The memcached key of the lock."""
        return self._key

    def acquire(self, blocking: bool = True) -> bool:
        """Take the lock; wait up to ``blocking_timeout_s`` if ``blocking``. True if taken."""
        return bool(self._engine.run(self.acquire_flow(blocking)))

    def acquire_flow(self, blocking: bool) -> Flow[bool]:
        """What :meth:`acquire` runs (any executor may run it)."""
        core = self._engine.core
        clock = core.options.clock
        token = uuid.uuid4().hex.encode()
        limit = self._blocking_timeout_s
        deadline = None if limit is None else clock() + limit
        rng = random.Random()
        self.unavailable = False
        for attempt in range(1_000_000):  # bounded by the deadline; the count is a last resort
            taken = yield from cmd.store(
                core, b"add", self._key, token, self._ttl_s, False, None, CallKind.PINNED
            )
            if taken is UNAVAILABLE:  # its node is down (on_error="miss"): no one can hold it now
                self.unavailable = True
                return False
            if taken:
                self.token = token
                return True
            if not blocking or (deadline is not None and clock() >= deadline):
                return False
            pause = rng.uniform(0.5, 1.5) * min(self._sleep_s * (2 ** min(attempt, 6)), 0.2)
            if deadline is not None:
                pause = min(pause, max(deadline - clock(), 0.0))
            yield Sleep(pause)
        return False

    def release(self) -> bool:
        """Release the lock if this owner still holds it. True if released by this call."""
        return bool(self._engine.run(self.release_flow()))

    def release_flow(self) -> Flow[bool]:
        """What :meth:`release` runs."""
        token, self.token = self.token, None
        if token is None:
            return False
        return (yield from cmd.compare_delete(self._engine.core, self._key, token))

    def locked(self) -> bool:
        """True if someone (anyone) holds the lock now. Asks the lock's own node only."""
        return bool(self._engine.run(self.locked_flow()))

    def locked_flow(self) -> Flow[bool]:
        """What :meth:`locked` runs."""
        found = yield from cmd.gets(self._engine.core, self._key, CallKind.PINNED_READ)
        return found is not None and found is not UNAVAILABLE

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


# -- stampede protection --------------------------------------------------------------------------


def get_or_set_flow(
    core: Core, key: Any, factory: Callable[[], Any], lock: Lock, *, expire: int, wait_s: float, poll_s: float
) -> Flow[Any]:
    """See :func:`get_or_set`."""
    clock = core.options.clock
    value = yield from cmd.get(core, key, _MISS)
    if value is not _MISS:
        return value
    deadline = clock() + wait_s
    rng = random.Random()
    for attempt in range(1_000_000):  # bounded by the deadline
        taken = yield from lock.acquire_flow(blocking=False)
        if not taken and lock.unavailable:  # nobody can coordinate: compute, and cache if we can
            return (yield from _compute_and_store(core, key, factory, expire))
        if taken:
            try:
                value = yield from cmd.get(core, key, _MISS)  # someone may have finished just before
                if value is _MISS:
                    value = yield from _compute_and_store(core, key, factory, expire)
                return value
            finally:
                token, lock.token = lock.token, None
                if token is not None:
                    yield from cmd.compare_delete(core, lock.name, token)
        yield Sleep(rng.uniform(0.5, 1.5) * min(poll_s * (2 ** min(attempt, 4)), 0.1))
        value = yield from cmd.get(core, key, _MISS)
        if value is not _MISS:
            return value
        if clock() >= deadline:
            break
    return (yield from _compute_and_store(core, key, factory, expire))


def _compute_and_store(core: Core, key: Any, factory: Callable[[], Any], expire: int) -> Flow[Any]:
    value = yield Compute(factory)
    yield from cmd.store(core, b"set", key, value, expire, False, None, CallKind.REPLACING_WRITE)
    return value


def get_or_set(
    client: HasEngine, key: Key, factory: Callable[[], Any], *, expire: int = 0, lock_ttl_s: int = 10,
    wait_s: float | None = None, poll_s: float = 0.01,
) -> Any:  # fmt: skip
    """The value of ``key``; on a miss, one caller (across processes) runs ``factory``.

    The first caller to miss takes a short lock (``add``) and computes the value; the others poll
    the key until it appears (up to ``wait_s``, default ``lock_ttl_s``). If the holder dies, its
    lock expires after ``lock_ttl_s`` and a waiter takes over. A waiter that runs out of time
    computes the value itself rather than fail.
    """
    engine = client._engine
    core = engine.core
    core.keys.wire(key)
    lock = Lock(client, key, ttl_s=lock_ttl_s, blocking_timeout_s=0)
    wait = _seconds("wait_s", wait_s, allow_none=True)
    poll = _seconds("poll_s", poll_s) or 0.0
    wait_for = float(lock_ttl_s) if wait is None else wait
    return engine.run(get_or_set_flow(core, key, factory, lock, expire=expire, wait_s=wait_for, poll_s=poll))


class _Cache(HasEngine, Protocol):
    def delete(self, key: Key, noreply: bool | None = None) -> bool: ...


def key_function(func: Callable[..., Any], key: Callable[..., Key] | str | None) -> Callable[..., Key]:
    """The cache key of a call of ``func``, as :func:`cached` makes it from its ``key`` argument."""
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

    return key_for


def cached(
    client: _Cache, *, expire: int = 0, key: Callable[..., Key] | str | None = None, lock_ttl_s: int = 10
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorator: cache a function's result in memcached, one computation per miss (``get_or_set``).

    ``key`` is a callable taking the function's arguments, a ``str.format`` template over them
    (``"books/{0}"`` or ``"books/{book_id}"``), or None: the function's qualified name plus a SHA-1
    of the arguments' ``repr``. ``wrapper.uncached`` calls the function directly and
    ``wrapper.invalidate(*args, **kwargs)`` deletes the entry.
    """
    _ttl("lock_ttl_s", lock_ttl_s)

    def decorate(func: Callable[P, R]) -> Callable[P, R]:
        key_for = key_function(func, key)

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
