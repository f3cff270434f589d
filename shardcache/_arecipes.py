"""The recipes for ``AsyncClient``: the lock as an ``async with``, and ``cached`` for coroutine
functions. Both run the flows of ``shardcache.recipes`` (the lock's ``acquire_flow``,
``release_flow``, ``locked_flow``; ``get_or_set`` for ``cached``): nothing is decided here.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Coroutine
from types import TracebackType
from typing import Any, ParamSpec, Protocol, TypeVar

from shardcache.errors import LockError
from shardcache.recipes import Lock, _ttl, key_function

__all__ = ["AsyncLock", "acached"]

P = ParamSpec("P")
R = TypeVar("R")
Key = str | bytes


class AsyncLock:
    """A distributed lock for asyncio: ``async with client.lock("report:42"): ...``. The same lock
    as :class:`shardcache.Lock` (same key, owner token, expiry, release rule), awaited."""

    def __init__(self, lock: Lock, run: Callable[[Any], Awaitable[Any]]) -> None:
        self._lock = lock
        self._run = run

    @property
    def name(self) -> bytes:
        return self._lock.name

    @property
    def token(self) -> bytes | None:
        return self._lock.token

    async def acquire(self, blocking: bool = True) -> bool:
        """Take the lock; wait up to ``blocking_timeout_s`` if ``blocking``. True if taken."""
        return bool(await self._run(self._lock.acquire_flow(blocking)))

    async def release(self) -> bool:
        """Release the lock if this owner still holds it. True if released by this call."""
        return bool(await self._run(self._lock.release_flow()))

    async def locked(self) -> bool:
        """True if someone (anyone) holds the lock now."""
        return bool(await self._run(self._lock.locked_flow()))

    async def __aenter__(self) -> AsyncLock:
        if not await self.acquire():
            raise LockError(f"could not acquire lock {self.name!r} in time", self.name)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.release()


class _AsyncCache(Protocol):
    async def get_or_set(
        self, key: Key, factory: Callable[[], Any], *, expire: int = 0, lock_ttl_s: int = 10,
        wait_s: float | None = None,
    ) -> Any: ...  # fmt: skip

    async def delete(self, key: Key, noreply: bool | None = None) -> bool: ...


def acached(
    client: _AsyncCache, *, expire: int = 0, key: Callable[..., Key] | str | None = None, lock_ttl_s: int = 10
) -> Callable[[Callable[P, Coroutine[Any, Any, R]]], Callable[P, Coroutine[Any, Any, R]]]:
    """``recipes.cached`` for coroutine functions: one computation per miss across processes
    (``get_or_set``); the same keys; ``wrapper.uncached`` and ``await wrapper.invalidate(...)``."""
    _ttl("lock_ttl_s", lock_ttl_s)

    def decorate(func: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
        key_for = key_function(func, key)

        @functools.wraps(func)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            result: R = await client.get_or_set(
                key_for(*args, **kwargs), lambda: func(*args, **kwargs), expire=expire, lock_ttl_s=lock_ttl_s
            )
            return result

        async def invalidate(*args: Any, **kwargs: Any) -> bool:
            return await client.delete(key_for(*args, **kwargs), noreply=False)

        wrapper.uncached = func  # type: ignore[attr-defined]
        wrapper.invalidate = invalidate  # type: ignore[attr-defined]
        return wrapper

    return decorate
