"""The background work of an ``AsyncClient`` as asyncio tasks: the prober and discovery.

:class:`AsyncProber` has the sync :class:`~shardcache._prober.Prober`'s interface (``start``,
``close``, ``fleet``), so ``Membership`` and the nodes wake it the same way, but runs its passes
in a task on the running loop. A pass is the same :func:`~shardcache._prober.prober_pass` the
thread drives: only the driver (await instead of a blocking call) is here. ``start`` outside a
running loop does nothing: the next call made in one starts it (a DOWN node's requests call it).

:class:`AsyncDiscovery` polls ``discovery=`` every ``discovery_interval_s`` in a task: the source
is called in a worker thread (``dns_discovery`` resolves names, which blocks), then the result is
applied on the loop, with the sync poller's failure handling (:class:`~shardcache.discovery.Poller`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from shardcache._events import Events
from shardcache._fleet import Fleet
from shardcache._flows import Flow
from shardcache._prober import Pass, prober_pass
from shardcache._topology import Topology
from shardcache.discovery import Poller

__all__ = ["AsyncDiscovery", "AsyncProber", "drive_pass_async"]

logger = logging.getLogger("shardcache")

ARun = Callable[[Flow[Any]], Coroutine[Any, Any, Any]]


async def drive_pass_async(one_pass: Pass, run: ARun) -> float | None:
    """Run a :func:`~shardcache._prober.prober_pass` with an async ``run``."""
    try:
        flow = next(one_pass)
        while True:
            try:
                result = await run(flow)
            except Exception as exc:
                flow = one_pass.throw(exc)
                continue
            flow = one_pass.send(result)
    except StopIteration as stop:
        wait: float | None = stop.value
        return wait


class AsyncProber:
    """The prober task of one ``AsyncClient``; used from its event loop."""

    def __init__(
        self, topology: Callable[[], Topology], run: ARun, events: Events, fleet: Fleet | None = None
    ) -> None:
        self._topology = topology
        self._run = run
        self._events = events
        self.fleet = fleet
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None

    def start(self, wake: bool = True) -> None:
        """Wake the prober (``wake``: it has new work now), starting its task if needed."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop here: started by the next request made in one
        task = self._task
        if task is None or task.done() or task.get_loop() is not loop:
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._loop(), name="shardcache-prober")
        elif wake and self._wake is not None:
            self._wake.set()

    async def _loop(self) -> None:
        wake = self._wake
        assert wake is not None
        while True:
            wake.clear()
            try:
                wait = await drive_pass_async(
                    prober_pass(self._topology, self._events, self.fleet), self._run
                )
            except Exception:  # a bug, not a node failure (those are thrown into the flows)
                logger.exception("shardcache: the prober failed")
                wait = 1.0
            if wait is None and not wake.is_set():
                self._task = None
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await wake.wait()

    def close(self) -> None:
        """Stop the task (``wait_closed`` awaits its end); a later ``start`` runs it again."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            with contextlib.suppress(RuntimeError):  # its loop is closed: nothing runs it any more
                task.cancel()

    async def wait_closed(self, task: asyncio.Task[None] | None = None) -> None:
        if task is not None and task.get_loop() is asyncio.get_running_loop():
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._task


class AsyncDiscovery:
    """Polls a ``discovery=`` source in a task; ``apply`` runs on the loop."""

    def __init__(
        self,
        source: Callable[[], Any],
        apply: Callable[[Any], Any],
        interval_s: float,
        emit: Callable[..., None],
    ) -> None:
        self._poller = Poller(source, apply, interval_s, emit, thread=False)
        self._interval_s = interval_s
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def start(self) -> None:
        """Start polling on the running loop (once; again on another loop)."""
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        task = self._task
        if task is None or task.done() or task.get_loop() is not loop:
            self._task = loop.create_task(self._loop(), name="shardcache-discovery")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self.poll_once()

    async def poll_once(self) -> None:
        """One poll: the source in a worker thread, its list applied here."""
        found = await asyncio.to_thread(self._poller.fetch)
        if found is not None:
            self._poller.apply(found[0])

    async def aclose(self) -> None:
        self._closed = True
        task, self._task = self._task, None
        if task is not None and task.get_loop() is asyncio.get_running_loop():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()
