"""Server discovery: a ``discovery=`` callable polled in the background, in every process.

``Client(servers, discovery=fn, discovery_interval_s=30, discovery_warmup_s=60)`` calls ``fn()``
every ``discovery_interval_s`` and reconciles the ring to the list it returns (``set_nodes`` with a
warm-up of ``discovery_warmup_s``). A call that raises, or returns something that is not a server
list, keeps the last good list and emits a ``discovery_failed`` event.

Prefork servers (gunicorn, uwsgi) fork workers from a parent that built the client: a thread does
not survive ``fork()``, so every poller is restarted in the child (``os.register_at_fork``).
Without that, workers would keep the server list they had at fork time forever.
"""

from __future__ import annotations

import os
import socket
import threading
import weakref
from collections.abc import Callable
from typing import Any

from shardcache.health import Event

__all__ = ["Poller", "Resolver", "dns_discovery"]

Resolver = Callable[[str, int], list[tuple[Any, ...]]]


def dns_discovery(
    name: str, port: int = 11211, *, resolver: Resolver | None = None
) -> Callable[[], list[str]]:
    """A ``discovery=`` callable: the A/AAAA records of ``name``, as sorted ``addr:port`` specs.

    ``resolver(name, port)`` returns ``socket.getaddrinfo``-style tuples (the default is
    ``socket.getaddrinfo`` over TCP); inject one in tests. A name that resolves to nothing raises,
    so the client keeps its last good list.
    """

    def default_resolver(host: str, service: int) -> list[tuple[Any, ...]]:
        return socket.getaddrinfo(host, service, type=socket.SOCK_STREAM)

    resolve = resolver or default_resolver

    def discover() -> list[str]:
        specs: set[str] = set()
        for info in resolve(name, port):
            address = info[4][0]
            specs.add(f"[{address}]:{port}" if ":" in address else f"{address}:{port}")
        if not specs:
            raise LookupError(f"{name!r} resolved to no address")
        return sorted(specs)

    return discover


class Poller:
    """Calls ``source()`` every ``interval_s`` on a daemon thread and hands the result to ``apply``;
    restarted in a forked child; stopped by :meth:`close`."""

    def __init__(
        self,
        source: Callable[[], Any],
        apply: Callable[[Any], Any],
        interval_s: float,
        emit: Callable[[Event], None],
        *,
        thread: bool = True,
    ) -> None:
        """``thread=False``: no thread; an asyncio task calls :meth:`fetch` and :meth:`apply`."""
        self._source = source
        self._apply = apply
        self._interval_s = interval_s
        self._emit = emit
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if thread:
            _pollers.add(self)
            self._start()

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="shardcache-discovery", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        stop = self._stop
        while not stop.wait(self._interval_s):
            self.poll_once()

    def poll_once(self) -> None:
        """One poll: fetch the list and apply it; failures become ``discovery_failed`` events."""
        found = self.fetch()
        if found is not None:
            self.apply(found[0])

    def fetch(self) -> tuple[Any] | None:
        """``(servers,)`` from the source, or None if it failed (a ``discovery_failed`` event)."""
        try:
            return (self._source(),)
        except Exception as exc:
            self._emit(Event("discovery_failed", "", f"kept the last good list: {exc!r}", exc))
            return None

    def apply(self, servers: Any) -> None:
        """Reconcile to ``servers``; a failure is a ``discovery_failed`` event."""
        try:
            self._apply(servers)
        except Exception as exc:
            self._emit(Event("discovery_failed", "", f"could not apply {servers!r:.200}: {exc}", exc))

    @property
    def running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def close(self) -> None:
        """Stop polling (waits up to 5 s for a poll in progress, unless called from the poller)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def _after_fork_in_child(self) -> None:
        # The parent's thread does not exist here; a fresh stop flag too (the old one may have
        # been copied while held), unless the poller had been closed.
        if self._stop.is_set():
            return
        self._stop = threading.Event()
        self._start()


_pollers: weakref.WeakSet[Poller] = weakref.WeakSet()


def _restart_in_child() -> None:
    for poller in list(_pollers):
        poller._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_restart_in_child)
