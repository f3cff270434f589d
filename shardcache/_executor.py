"""The sync executor: the one place a request meets a socket.

For every kind of call (one node, one or many pipelined requests; many nodes at once) it does the
same sequence: take a connection from the node's pool, send, read the replies the request expects,
give the connection back (or close it if its state is unknown), and report the outcome to the
node's health. Nothing here decides *where* a request goes (the router does) or *what* a reply
means (the commands do).

Multi-node calls are multiplexed with ``poll``: every node's request is written and its replies
read as the sockets allow, so the nodes work at the same time, a large request never deadlocks
against a large reply, and the whole call is bounded by one deadline. (Reading the nodes' replies
in turn would be cheaper, but a node that hangs would then hold back the replies of the others
until the deadline, and a large one would not fit in its socket's buffer meanwhile: a frozen node
would fail every node's part of a ``get_many``.) A node's job of one get or status request on an
idle connection is expected only when its first bytes come (``_Pending._first_read``), so a reply
that arrives whole is parsed in one piece, as a single ``get``'s is.

``Executor.request`` is ``call`` outside a flow, with a deadline of its own: ``get`` and
``set``/``add``/... use it directly when only the key's owner is involved (``_commands.get_now``,
``store_now``), which keeps the Python work between two round trips near the old hand-written
path's (benchmarks/README.md, compare_commits).
"""

from __future__ import annotations

import select
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

from shardcache._conn import Connection, ConnectionSettings, connect
from shardcache._events import Events, report_failure
from shardcache._flows import Call, Compute, Each, Fanout, Flow, Job, Probe, Quiet, Sleep
from shardcache._protocol import NOOP, ErrorReply, Expect, ReplyParser, version
from shardcache._topology import Node
from shardcache.errors import NodeError
from shardcache.health import Event
from shardcache.nodes import NodeSpec

__all__ = ["Executor", "report_call_failure", "report_swallowed"]

T = TypeVar("T")

_POLLIN = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP
_monotonic = time.monotonic
_QUIET = Expect.NOOP
_WHOLE_KINDS = frozenset((Expect.VALUES, Expect.CAS_VALUES, Expect.STATUS))  # what ReplyParser.whole reads
_OWN_DEADLINE: Any = object()  # Executor.request outside a flow: from the executor's timeout


class Executor:
    """Runs flows and their requests on nodes; thread-safe (all state is in the pools and nodes).

    ``timeout`` (seconds, None: no limit) bounds each stretch of a flow's I/O: the whole of a
    ``get``, however many round trips or nodes it takes, from its first request on (the time spent
    checking and serializing values before it is not counted).
    """

    __slots__ = ("_events", "_settings", "_timeout")

    def __init__(self, events: Events, settings: ConnectionSettings, timeout: float | None) -> None:
        self._events = events
        self._settings = settings
        self._timeout = timeout

    def with_timeout(self, timeout: float | None) -> Executor:
        """An executor on the same pools and events whose flows have ``timeout`` (long jobs)."""
        return Executor(self._events, self._settings, timeout)

    def run(self, flow: Flow[T]) -> T:
        """Drive ``flow`` to its end and return its value."""
        timeout = self._timeout
        try:
            # dispatch on the exact type (faster than isinstance); Any because mypy cannot narrow it
            request: Any = next(flow)
            # from the first request on: checking and serializing a big batch is not I/O
            deadline = None if timeout is None else _monotonic() + timeout
            while True:
                kind = type(request)
                try:
                    if kind is Call:
                        result: Any = self.call(request, deadline)
                    elif kind is Fanout:
                        result = self.fanout(request.jobs, deadline, request.what, request.key)
                    elif kind is Quiet:
                        self.call_quiet(request.node, request.payload, deadline, request.what, request.key)
                        result = None
                    elif kind is Each:
                        result = self.each(
                            request.nodes, request.payload, request.kind, deadline, request.what
                        )
                    elif kind is Probe:
                        result = self.probe(request.spec)
                    elif kind is Sleep:
                        time.sleep(max(request.seconds, 0.0))
                        result = None
                        deadline = None if timeout is None else _monotonic() + timeout
                    elif kind is Compute:
                        try:
                            result = request.fn(*request.args)
                        except BaseException as exc:  # the caller's error: the flow cleans up, re-raises
                            request = flow.throw(exc)
                            continue
                        finally:
                            deadline = None if timeout is None else _monotonic() + timeout
                    else:
                        raise TypeError(f"a flow yielded {request!r}")
                except NodeError as err:
                    request = flow.throw(err)
                    continue
                request = flow.send(result)
        except StopIteration as stop:
            value: T = stop.value
            return value

    def probe(self, spec: NodeSpec) -> bytes | NodeError:
        """``version`` on a new connection, closed afterwards: the version, or the failure."""
        timeout = self._timeout
        deadline = None if timeout is None else _monotonic() + timeout
        try:
            conn = connect(spec, self._settings, deadline)
        except NodeError as err:
            return err
        try:
            conn.parser.expect(Expect.VERSION)
            conn.send(version(), deadline)
            reply = conn.read_reply(deadline)
        except NodeError as err:
            return err
        finally:
            conn.close()
        return (
            reply
            if isinstance(reply, bytes)
            else NodeError(f"probe of {spec.node_id}: {reply!r}", spec.node_id)
        )

    def failed(self, node: Node, err: NodeError, what: str, key: Any = None) -> None:
        """Report a failed call: counters, health (transport failures), an ``error`` event. The
        error's message gains the name of the call (it was made where the call was not known)."""
        report_call_failure(self._events, node, err, what, key)

    # -- one node ---------------------------------------------------------------------------------

    def call(self, request: Call, deadline: float | None) -> Any:
        """Send one request to its node and return its reply (``NodeError`` on failure)."""
        return self.request(
            request.node, request.payload, request.kind, request.what, request.key,
            request.data_block, request.wanted, deadline,
        )  # fmt: skip

    def request(
        self, node: Node, payload: bytes, kind: int, what: str, key: Any = None,
        data_block: bool = False, wanted: Any = None, deadline: Any = _OWN_DEADLINE,
    ) -> Any:  # fmt: skip
        """One request to one node: take a connection, send ``payload``, read the one reply it
        expects (see ``ReplyParser.expect``), settle; the reply, ``NodeError`` on failure. Outside
        a flow (the flow-less fast paths of single-key commands) it has a deadline of its own.
        ``kind=Expect.NOOP``: noreply requests, as :meth:`call_quiet` (None, nothing awaited)."""
        if deadline is _OWN_DEADLINE:
            timeout = self._timeout
            deadline = None if timeout is None else _monotonic() + timeout
        if kind == _QUIET:
            self.call_quiet(node, payload, deadline, what, key)
            return None
        node.ops += 1
        pool = node.pool
        try:
            conn = pool.acquire(deadline)
        except NodeError as err:
            self.failed(node, err, what, key)
            raise
        try:
            conn.send(payload, deadline)
            reply = conn.read_one(kind, data_block, wanted, deadline)
        except NodeError as err:
            pool.discard(conn)
            self.failed(node, err, what, key)
            raise
        if type(reply) is ErrorReply and reply.fatal:
            pool.discard(conn)  # its data block may have run as commands: out of step
        else:
            pool.release(conn)
        if conn.parser.swallowed:
            self._swallowed(node, conn)
        if node.health.failures:
            node.report_success()
        return reply

    def call_quiet(
        self, node: Node, payload: bytes, deadline: float | None, what: str, key: Any = None
    ) -> None:
        """Send noreply requests; an ``mn`` behind them keeps the connection in step (its reply,
        and any error memcached sends despite noreply, is read by the next user)."""
        node.ops += 1
        pool = node.pool
        try:
            conn = pool.acquire(deadline)
        except NodeError as err:
            self.failed(node, err, what, key)
            raise
        conn.parser.expect(Expect.NOOP)
        try:
            conn.send(payload + NOOP, deadline)
        except NodeError as err:
            pool.discard(conn)
            self.failed(node, err, what, key)
            raise
        pool.release(conn)
        # no report_success: bytes in the kernel's send buffer prove nothing, and counting them would
        # reset the failures the reads of a frozen node build up, so it would never be marked down

    def pipeline(self, node: Node, job: Job, deadline: float | None, what: str, key: Any = None) -> list[Any]:
        """Send several requests to one node at once; their replies, in order."""
        return self._only_result(node, self.fanout({node.node_id: (node, job)}, deadline, what, key))

    @staticmethod
    def _only_result(node: Node, results: Mapping[str, list[Any] | NodeError]) -> list[Any]:
        result = results[node.node_id]
        if isinstance(result, NodeError):
            raise result
        return result

    def _swallowed(self, node: Node, conn: Connection) -> None:
        report_swallowed(self._events, node, conn.parser)

    # -- many nodes at once -----------------------------------------------------------------------

    def fanout(
        self, jobs: Mapping[str, tuple[Node, Job]], deadline: float | None, what: str, key: Any = None
    ) -> dict[str, list[Any] | NodeError]:
        """Run each node's job concurrently; ``{node_id: replies}`` or the node's ``NodeError``."""
        results: dict[str, list[Any] | NodeError] = {}
        active: dict[int, _Pending] = {}
        for node_id, (node, (payload, expects)) in jobs.items():
            node.ops += 1
            try:
                conn = node.pool.acquire(deadline)
            except NodeError as err:
                self.failed(node, err, what, key)
                results[node_id] = err
                continue
            pending = _Pending(node, conn, payload, expects)
            try:
                pending.start()
            except NodeError as err:
                self._fail(pending, err, what, key, results)
                continue
            if pending.done():
                self._finish(pending, results)
            else:
                active[conn.fileno()] = pending
        if active:
            self._multiplex(active, deadline, what, key, results)
        return results

    def _multiplex(
        self, active: dict[int, _Pending], deadline: float | None, what: str, key: Any,
        results: dict[str, list[Any] | NodeError],
    ) -> None:  # fmt: skip
        poller = select.poll()
        for fd, pending in active.items():
            poller.register(fd, pending.events())
        while active:
            if deadline is None:
                timeout_ms = None
            else:
                left = deadline - _monotonic()
                timeout_ms = left * 1000 if left > 0 else 0  # poll rounds a float up: never early
            ready = poller.poll(timeout_ms) if timeout_ms != 0 else []
            if not ready:
                for fd, pending in list(active.items()):
                    poller.unregister(fd)
                    del active[fd]
                    self._fail(pending, pending.conn.timed_out(), what, key, results)
                return
            for fd, flags in ready:
                pending = active[fd]
                try:
                    pending.advance(flags)
                except NodeError as err:
                    poller.unregister(fd)
                    del active[fd]
                    self._fail(pending, err, what, key, results)
                    continue
                if pending.done():
                    poller.unregister(fd)
                    del active[fd]
                    self._finish(pending, results)
                else:
                    poller.modify(fd, pending.events())

    def _finish(self, pending: _Pending, results: dict[str, list[Any] | NodeError]) -> None:
        node, conn = pending.node, pending.conn
        replies = pending.replies
        if ErrorReply in set(map(type, replies)) and any(type(r) is ErrorReply and r.fatal for r in replies):
            node.pool.discard(conn)
        else:
            node.pool.release(conn)
        self._swallowed(node, conn)
        if pending.replies:  # only a reply proves the node works (a noreply send only filled a buffer)
            node.report_success()
        results[node.node_id] = pending.replies

    def _fail(
        self,
        pending: _Pending,
        err: NodeError,
        what: str,
        key: Any,
        results: dict[str, list[Any] | NodeError],
    ) -> None:
        pending.node.pool.discard(pending.conn)
        self.failed(pending.node, err, what, key)
        results[pending.node.node_id] = err

    def each(
        self, nodes: Iterable[Node], payload: bytes, kind: int, deadline: float | None, what: str
    ) -> dict[str, Any]:
        """One request to every node at once: ``{node_id: reply or NodeError}``."""
        job: Job = (payload, ((kind, False),))
        results = self.fanout({n.node_id: (n, job) for n in nodes}, deadline, what)
        return {node_id: r if isinstance(r, NodeError) else r[0] for node_id, r in results.items()}


def report_call_failure(events: Events, node: Node, err: NodeError, what: str, key: Any = None) -> None:
    """Report a failed call (every executor): counters, health, an ``error`` event; the error's
    message gains the name of the call (it was made where the call was not known)."""
    if what and err.args and isinstance(err.args[0], str) and not err.args[0].endswith(")"):
        err.args = (f"{err.args[0]} ({what})", *err.args[1:])
    report_failure(events, node, err, "", key)


def report_swallowed(events: Events, node: Node, parser: ReplyParser) -> None:
    """Emit the error replies memcached sent to noreply commands (every executor)."""
    errors = parser.swallowed
    if errors:
        parser.swallowed = []
        for error in errors:
            message = f"error reply to a noreply command: {error.kind} {error.message}"
            events.emit(Event("error", node.node_id, message, None))


class _Pending:
    """One node's side of a multiplexed call: what is left to send, the replies read so far."""

    __slots__ = ("conn", "count", "node", "replies", "single", "view")

    def __init__(
        self, node: Node, conn: Connection, payload: bytes, expects: Sequence[tuple[Any, ...]]
    ) -> None:
        self.node = node
        self.conn = conn
        self.view = memoryview(payload)
        self.count = len(expects)
        self.replies: list[Any] = []
        # One get or status reply on an idle connection: expected only when its first bytes come,
        # so that a reply which arrives whole is parsed in one piece (ReplyParser.whole).
        self.single: tuple[int, bool, Any] | None = None
        parser = conn.parser
        if (
            len(expects) == 1
            and expects[0][0] in _WHOLE_KINDS
            and not (conn.tls or parser.pending or parser.buffered)
        ):
            kind, data_block, *wanted = expects[0]
            self.single = (kind, data_block, wanted[0] if wanted else None)
            return
        parser.expect_many(expects)
        if not expects:  # noreply requests: an mn keeps the connection in step, read by its next user
            parser.expect(Expect.NOOP)
            self.view = memoryview(payload + NOOP)

    def start(self) -> None:
        sent = self.conn.send_some(self.view)
        self.view = self.view[sent:]
        if self.single is None and self.conn.parser.buffered:
            self._drain()  # replies already buffered from an earlier noreply's mn, if any

    def events(self) -> int:
        return _POLLIN | select.POLLOUT if self.view else _POLLIN

    def done(self) -> bool:
        return not self.view and len(self.replies) == self.count

    def advance(self, flags: int) -> None:
        conn = self.conn
        if self.view and flags & (select.POLLOUT | select.POLLERR | select.POLLHUP):
            sent = conn.send_some(self.view)
            self.view = self.view[sent:]
        if flags & _POLLIN and len(self.replies) < self.count:
            if self.single is not None:
                self._first_read()
                return
            while conn.receive():
                self._drain()
                if not (conn.tls and conn.sock.pending()):
                    break

    def _first_read(self) -> None:
        """The first bytes of a single reply: parsed whole, or expected and fed as usual."""
        data = self.conn.recv_some()
        if data is None or self.single is None:
            return
        (kind, data_block, wanted), self.single = self.single, None
        parser = self.conn.parser
        reply = parser.whole(kind, data, wanted)
        if reply is not None:
            self.replies.append(reply)
            return
        parser.expect(kind, data_block, wanted)
        parser.feed(data)
        self._drain()

    def _drain(self) -> None:
        missing = self.count - len(self.replies)
        if missing:
            self.replies.extend(self.conn.parser.next_many(missing))
