"""The prober: brings DOWN nodes back, and makes returning nodes forget what changed meanwhile.

One daemon thread per client, started when a node goes down or has keys to forget, and stopped by
itself when there is nothing left to do; with fleet-wide fencing (``shardcache._fleet``) it runs
for as long as the client is used (started by its first connection, and again in a forked child),
and each pass first publishes the outages this process saw and reads the fleet's outage marks
every ``fleet_refresh_s``. For each node:

- DOWN, backoff elapsed: probe it (``version`` on a new connection). If it answers it is
  readmitted at once, so requests stop standing in for it, then fenced (below); until its fence
  log is empty it is not ``ready`` and reads of the keys still to forget miss. If the probe fails
  the backoff doubles. With fleet fencing, a node returning from an outage the fleet knows of is
  first kept out of use, then cleaned of what its journals list (``Fleet.on_answered``).
- UP with keys to forget: delete them on it (or flush it, past ``fence_max_keys``), and delete the
  copies its stand-ins took during the outage. A pass that fails counts as one transport failure.

The work itself is written as flows (``probe_flow``, ``forget_flow``), and a whole pass as a
generator of flows (``prober_pass``), so any executor can run it: the thread here, or the asyncio
task of ``AsyncClient`` (``shardcache._aprober``), which only drive the same pass.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Callable, Generator
from typing import Any

from shardcache._events import Events
from shardcache._fleet import Fleet
from shardcache._flows import Call, Fanout, Flow, Probe
from shardcache._protocol import ErrorReply, Expect, delete, flush_all
from shardcache._topology import ForgetWork, Node, Topology
from shardcache.errors import NodeError
from shardcache.health import DOWN, UP, Event

__all__ = ["Pass", "Prober", "drive_pass", "forget_flow", "probe_flow", "prober_pass"]

logger = logging.getLogger("shardcache")

_IDLE_S = 0.5
_PASSES = 5


def probe_flow(
    node: Node, topology: Callable[[], Topology], events: Events, fleet: Fleet | None = None
) -> Flow[bool]:
    """PROBING: ask for ``version``; if it answers, readmit the node, then fence it. With fleet
    fencing, a node returning from an outage other processes saw is first kept out of use for a
    while, then flushed (``Fleet.on_answered``)."""
    answer = yield Probe(node.spec)
    if isinstance(answer, NodeError):
        node.health.probe_failed(f"probe failed: {answer}")
        return False
    if fleet is not None:
        flushed_before = node.fleet_mark
        wait = yield from fleet.on_answered(node, topology())
        if wait > 0:
            node.health.probe_later(wait, f"answers again; {node.fleet_mark}: flushed once it is out of use")
            return False
        if node.fleet_mark is not flushed_before and node.fleet_mark is not None:
            events.emit(Event("fenced", node.node_id, f"cleaned after an outage ({node.fleet_mark})"))
    node.health.readmit()
    node.retire_copies()  # no request stands in for it any more: its stand-ins' copies are stale
    return (yield from forget_flow(node, topology, events))


def forget_flow(node: Node, topology: Callable[[], Topology], events: Events) -> Flow[bool]:
    """Delete on ``node`` the keys in its fence log, and its stale copies on stand-ins.

    A few passes, while requests may still be adding keys; False if a pass failed.
    """
    for _ in range(_PASSES):
        work = node.take_work()
        if not work:
            node.settle_work(work, done=True, kept_stale={})
            return True
        done, kept = yield from _apply(node, work, topology())
        node.settle_work(work, done=done, kept_stale=kept)
        if not done:
            return False
        if not work.keys and not work.flush and kept == work.stale:
            break  # only copies on stand-ins that are down: kept for when they are back, quietly
        detail = "flushed (fence log overflowed)" if work.flush else f"forgot {len(work.keys)} keys"
        copies = sum(len(v) for v in work.stale.values()) - sum(len(v) for v in kept.values())
        events.emit(Event("fenced", node.node_id, f"{detail}; removed {copies} copies"))
    node.refresh_ready()
    return True


def _apply(node: Node, work: ForgetWork, topology: Topology) -> Flow[tuple[bool, dict[str, set[bytes]]]]:
    if work.flush:
        try:
            reply = yield Call(node, flush_all(0), Expect.OK, "fence (flush_all)")
        except NodeError:
            return False, {}
        if reply != b"OK":
            logger.warning("shardcache: flushing %s before readmission failed: %r", node.node_id, reply)
            return False, {}
    elif work.keys:
        payload = b"".join(delete(wire) for wire in sorted(work.keys))
        expects = [(Expect.STATUS, False)] * len(work.keys)
        results = yield Fanout({node.node_id: (node, (payload, expects))}, "fence (delete)")
        if not _all_deleted(results.get(node.node_id)):
            return False, {}
    live: dict[str, tuple[Node, tuple[bytes, list[tuple[int, bool]]]]] = {}
    kept: dict[str, set[bytes]] = {}
    for holder_id, wires in work.stale.items():
        holder = topology.node(holder_id)
        if holder is None:
            continue  # no longer configured: its copies expire by their capped TTL
        if holder.health.state != UP:
            kept[holder_id] = wires  # down, but still configured: removed when it is back
            continue
        payload = b"".join(delete(wire) for wire in sorted(wires))
        live[holder_id] = (holder, (payload, [(Expect.STATUS, False)] * len(wires)))
    if live:
        results = yield Fanout(live, "remove stand-in copies")
        for holder_id, result in results.items():
            if not _all_deleted(result):
                logger.warning("shardcache: removing copies for %s on %s failed; they expire by TTL",
                               node.node_id, holder_id)  # fmt: skip
    return True, kept


def _all_deleted(result: Any) -> bool:
    return isinstance(result, list) and not any(isinstance(r, ErrorReply) for r in result)


# One pass of a prober, whatever runs it: it yields the flows to run, one at a time, and gets
# each one's result back (or its exception thrown in); it returns how long to wait before the
# next pass, or None when there is nothing left to do (the prober may stop until woken).
Pass = Generator[Flow[Any], Any, float | None]


def prober_pass(topology: Callable[[], Topology], events: Events, fleet: Fleet | None) -> Pass:
    """Publish and read the fleet's outage marks (if due), probe the DOWN nodes whose backoff has
    elapsed, make UP nodes forget what they must. The one implementation of a prober's work: the
    sync prober's thread and the asyncio prober's task only drive it (:func:`drive_pass`)."""
    waits: list[float] = []
    busy = fleet is not None  # the fleet's marks are read for as long as the client runs
    if fleet is not None:
        try:  # a failure is the holders' (counted on their health by the executor): tried again
            yield fleet.publish_pending(topology())
            if fleet.refresh_due():
                yield fleet.refresh_flow(topology())
        except Exception:  # the prober must survive anything a step raises
            logger.exception("shardcache: reading or publishing outage marks failed")
        waits.append(fleet.seconds_until_refresh())
    for node in list(topology().all_nodes()):
        state = node.health.state
        if state == DOWN:
            busy = True
            if node.health.begin_probe():
                yield probe_flow(node, topology, events, fleet)
            due = node.health.seconds_until_probe()
            if due is not None:
                waits.append(due)
        elif state == UP and node.has_work():
            busy = True
            yield forget_flow(node, topology, events)
    return min([*waits, _IDLE_S]) if busy else None


def drive_pass(one_pass: Pass, run: Callable[[Flow[Any]], Any], stopped: Callable[[], bool]) -> float | None:
    """Run a :func:`prober_pass` with a sync ``run`` (stopping early once ``stopped()``)."""
    try:
        flow = next(one_pass)
        while not stopped():
            try:
                result = run(flow)
            except Exception as exc:
                flow = one_pass.throw(exc)
                continue
            flow = one_pass.send(result)
    except StopIteration as stop:
        wait: float | None = stop.value
        return wait
    one_pass.close()
    return None


class Prober:
    """The prober thread of one client; thread-safe."""

    def __init__(
        self,
        topology: Callable[[], Topology],
        run: Callable[[Flow[Any]], Any],
        events: Events,
        fleet: Fleet | None = None,
    ) -> None:
        self._topology = topology
        self._run = run
        self._events = events
        self.fleet = fleet
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        _probers.add(self)

    def start(self, wake: bool = True) -> None:
        """Wake the prober (``wake``: it has new work now), starting its thread if needed."""
        if wake:
            self._wake.set()
        elif self._thread is not None and self._thread.is_alive():
            return  # running, on its own schedule: nothing to do (no lock on this path)
        with self._lock:
            if self._closed.is_set() or (self._thread is not None and self._thread.is_alive()):
                return
            self._thread = threading.Thread(target=self._loop, name="shardcache-prober", daemon=True)
            self._thread.start()

    def is_current_thread(self) -> bool:
        return self._thread is threading.current_thread()

    def _loop(self) -> None:
        while not self._closed.is_set():
            self._wake.clear()
            wait = drive_pass(prober_pass(self._topology, self._events, self.fleet), self._run,
                              self._closed.is_set)  # fmt: skip
            if self._closed.is_set():
                return
            if wait is None:
                with self._lock:
                    if not self._wake.is_set():
                        self._thread = None
                        return
                continue
            self._wake.wait(wait)

    def close(self) -> None:
        """Stop the thread (bounded wait); a later ``start`` runs it again."""
        self._closed.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
        with self._lock:
            self._thread = None
            self._closed.clear()

    def _after_fork_in_child(self) -> None:
        # The parent's thread does not exist here, and its lock or events may have been copied
        # while held: fresh ones. If it ran in the parent it runs in the child too (the fleet's
        # marks are read in every process; a probe or a fence in progress is redone).
        ran = self._thread is not None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._thread = None
        if ran:
            self.start()


_probers: weakref.WeakSet[Prober] = weakref.WeakSet()


def _reset_in_child() -> None:
    for prober in list(_probers):
        prober._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_in_child)
