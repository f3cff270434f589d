"""In-process fakes for routing, fencing and warm-up tests: no sockets, no threads, no sleeping.

- :class:`FakeClock`: a monotonic clock the test moves by hand.
- :class:`FakeServer`: one memcached node in memory. It executes the bytes shardcache sends (the
  classic text commands and the meta commands it uses) and answers with the bytes memcached would,
  so every reply still goes through the real ``ReplyParser``. It can be made unreachable
  (``down``) or slow (``hang``), and a ``before`` hook runs ahead of each command it receives, so a
  test can play a concurrent writer between two steps of a flow.
- :class:`FakeExecutor`: drives flows (``shardcache._flows``) against fake servers as the sync
  executor drives them against sockets: it counts ops, reports failures and successes to the node,
  throws ``NodeError`` into the flow, advances the fake clock on ``Sleep``.
- :class:`Cluster`: the pieces ``Client`` wires together (options, membership, router, core), over
  fake servers and a fake clock, with a prober the test runs by hand (:meth:`Cluster.prober_pass`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any
from unittest import mock
from urllib.parse import quote_from_bytes

from shardcache import _batch, _membership
from shardcache import _commands as cmd
from shardcache._commands import Core
from shardcache._conn import ConnectionSettings
from shardcache._events import Events, report_failure
from shardcache._flows import Call, Compute, Each, Fanout, Flow, Probe, Quiet, Sleep
from shardcache._membership import Membership
from shardcache._options import Options
from shardcache._prober import Prober, drive_pass, prober_pass
from shardcache._protocol import NEED_DATA, NOOP, Expect, ReplyParser
from shardcache._router import CallKind, Router
from shardcache._topology import Node
from shardcache.errors import NodeError, NodeTimeoutError, NodeUnavailableError
from shardcache.health import DOWN, Event
from shardcache.ring import Ring

__all__ = ["Cluster", "FakeClock", "FakeExecutor", "FakeServer", "ManualProber"]

_THIRTY_DAYS = 30 * 24 * 3600


class FakeClock:
    """A monotonic clock in seconds that only moves when told to."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class _Item:
    __slots__ = ("cas", "data", "exptime", "flags")

    def __init__(self, data: bytes, flags: int, exptime: float | None, cas: int) -> None:
        self.data = data
        self.flags = flags
        self.exptime = exptime
        self.cas = cas


class FakeServer:
    """One memcached node in memory; executes request bytes, returns reply bytes."""

    def __init__(self, node_id: str, clock: FakeClock) -> None:
        self.node_id = node_id
        self.clock = clock
        self._items: dict[bytes, _Item] = {}
        self._cas = 0
        self.down = False  # connections are refused
        self.hang = False  # requests time out
        self.attempts = 0  # connection attempts (one per request the executor sends here)
        self.commands: list[bytes] = []  # every command line received, in order
        self.before: Callable[[bytes], None] | None = None  # runs before each command line
        self.refuse: set[bytes] = set()  # verbs answered with SERVER_ERROR
        self.crawler_busy = 0  # this many metadumps are answered BUSY first
        self.extra_item_stats = b""  # more STAT lines in the reply to "stats items"

    # -- the test's view of the data --------------------------------------------------------------

    def peek(self, wire: bytes) -> bytes | None:
        item = self._live(wire)
        return None if item is None else item.data

    def put(self, wire: bytes, data: bytes, *, flags: int = 0, ttl: int = 0) -> None:
        """Store directly, as another process would."""
        self._store(wire, data, flags, ttl)

    def remove(self, wire: bytes) -> None:
        self._items.pop(wire, None)

    def ttl_of(self, wire: bytes) -> float | None:
        """Seconds left (None: no expiry)."""
        item = self._live(wire)
        assert item is not None, f"{wire!r} is not on {self.node_id}"
        return None if item.exptime is None else item.exptime - self.clock()

    def stored(self) -> set[bytes]:
        return {wire for wire in list(self._items) if self._live(wire) is not None}

    def sent(self, verb: bytes) -> list[bytes]:
        """The command lines received that start with ``verb``."""
        return [line for line in self.commands if line.split(b" ", 1)[0] == verb]

    # -- execution --------------------------------------------------------------------------------

    def handle(self, payload: bytes) -> bytes:
        out: list[bytes] = []
        pos = 0
        while pos < len(payload):
            end = payload.index(b"\r\n", pos)
            line = payload[pos:end]
            pos = end + 2
            parts = line.split(b" ")
            data = b""
            size = _data_size(parts)
            if size is not None:
                data = payload[pos : pos + size]
                assert payload[pos + size : pos + size + 2] == b"\r\n", "data block not terminated"
                pos += size + 2
            self.commands.append(line)
            if self.before is not None:
                self.before(line)
            if parts[0] in self.refuse:
                out.append(b"SERVER_ERROR out of memory\r\n")
                continue
            out.append(self._command(parts, data))
        return b"".join(out)

    def _command(self, parts: list[bytes], data: bytes) -> bytes:
        verb = parts[0]
        noreply = parts[-1] == b"noreply"
        reply = self._dispatch(verb, parts, data)
        return b"" if noreply else reply

    def _dispatch(self, verb: bytes, parts: list[bytes], data: bytes) -> bytes:
        if verb in (b"get", b"gets"):
            out = []
            for wire in parts[1:]:
                item = self._live(wire)
                if item is not None:
                    tail = b" %d" % item.cas if verb == b"gets" else b""
                    out.append(
                        b"VALUE %b %d %d%b\r\n%b\r\n" % (wire, item.flags, len(item.data), tail, item.data)
                    )
            return b"".join(out) + b"END\r\n"
        if verb in (b"set", b"add", b"replace", b"append", b"prepend", b"cas"):
            return self._storage(verb, parts, data)
        if verb == b"delete":
            if self._live(parts[1]) is None:
                return b"NOT_FOUND\r\n"
            del self._items[parts[1]]
            return b"DELETED\r\n"
        if verb == b"touch":
            item = self._live(parts[1])
            if item is None:
                return b"NOT_FOUND\r\n"
            item.exptime = self._exptime(int(parts[2]))
            return b"TOUCHED\r\n"
        if verb in (b"incr", b"decr"):
            item = self._live(parts[1])
            if item is None:
                return b"NOT_FOUND\r\n"
            if not item.data.isdigit():
                return b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n"
            value = int(item.data)
            value = (value + int(parts[2])) % 2**64 if verb == b"incr" else max(value - int(parts[2]), 0)
            item.data = b"%d" % value
            item.cas = self._next_cas()
            return b"%d\r\n" % value
        if verb == b"flush_all":
            self._items.clear()
            return b"OK\r\n"
        if verb == b"version":
            return b"VERSION 1.6.fake\r\n"
        if verb == b"mg":
            return self._meta_get(parts)
        if verb == b"ms":
            return self._meta_set(parts, data)
        if verb == b"md":
            return self._meta_delete(parts)
        if verb == b"mn":
            return b"MN\r\n"
        if verb == b"stats" and parts[1:] == [b"items"]:  # every item in slab class 1
            count = len(self.stored())
            mine = b"STAT items:1:number %d\r\n" % count if count else b""
            return mine + self.extra_item_stats + b"END\r\n"
        if verb == b"lru_crawler" and parts[1] == b"metadump":
            if self.crawler_busy:
                self.crawler_busy -= 1
                return b"BUSY currently processing crawler request\r\n"
            lines = [
                b"key=%b exp=-1 la=0 cas=%d fetch=no cls=1 size=%d\n"
                % (quote_from_bytes(wire, safe="").encode(), item.cas, len(item.data))
                for wire, item in list(self._items.items())
                if self._live(wire) is not None
            ]
            return b"".join(lines) + b"END\r\n"
        return b"ERROR\r\n"

    def _storage(self, verb: bytes, parts: list[bytes], data: bytes) -> bytes:
        wire, flags, exptime = parts[1], int(parts[2]), int(parts[3])
        item = self._live(wire)
        if verb == b"add" and item is not None:
            return b"NOT_STORED\r\n"
        if verb in (b"replace", b"append", b"prepend") and item is None:
            return b"NOT_STORED\r\n"
        if verb == b"cas":
            if item is None:
                return b"NOT_FOUND\r\n"
            if item.cas != int(parts[5]):
                return b"EXISTS\r\n"
        if verb in (b"append", b"prepend"):
            assert item is not None
            item.data = item.data + data if verb == b"append" else data + item.data
            item.cas = self._next_cas()
            return b"STORED\r\n"
        self._store(wire, data, flags, exptime)
        return b"STORED\r\n"

    def _meta_get(self, parts: list[bytes]) -> bytes:
        wire, tokens = parts[1], parts[2:]
        item = self._live(wire)
        if item is None:
            return b"EN\r\n"
        flags = []
        for token in tokens:
            if token == b"c":
                flags.append(b"c%d" % item.cas)
            elif token == b"f":
                flags.append(b"f%d" % item.flags)
            elif token == b"t":
                flags.append(
                    b"t-1" if item.exptime is None else b"t%d" % max(int(item.exptime - self.clock()), 0)
                )
            elif token == b"k":
                flags.append(b"k" + wire)
        head = b"".join(b" " + f for f in flags)
        if b"v" in tokens:
            return b"VA %d%b\r\n%b\r\n" % (len(item.data), head, item.data)
        return b"HD%b\r\n" % head

    def _meta_set(self, parts: list[bytes], data: bytes) -> bytes:
        wire, tokens = parts[1], parts[3:]
        opts = {t[:1]: t[1:] for t in tokens}
        item = self._live(wire)
        mode = opts.get(b"M", b"S")
        if mode == b"E" and item is not None:
            return b"NS\r\n"
        if b"C" in opts and (item is None or item.cas != int(opts[b"C"])):
            return b"NF\r\n" if item is None else b"EX\r\n"
        stored = self._store(wire, data, int(opts.get(b"F", b"0")), int(opts.get(b"T", b"0")))
        return b"HD c%d\r\n" % stored.cas if b"c" in opts else b"HD\r\n"

    def _meta_delete(self, parts: list[bytes]) -> bytes:
        wire, opts = parts[1], {t[:1]: t[1:] for t in parts[2:]}
        item = self._live(wire)
        if item is None:
            return b"NF\r\n"
        if b"C" in opts and item.cas != int(opts[b"C"]):
            return b"EX\r\n"
        del self._items[wire]
        return b"HD\r\n"

    # -- storage ----------------------------------------------------------------------------------

    def _next_cas(self) -> int:
        self._cas += 1
        return self._cas

    def _exptime(self, expire: int) -> float | None:
        if expire == 0:
            return None
        if expire < 0:
            return self.clock() - 1
        assert expire <= _THIRTY_DAYS, "the fake does not do Unix-time expiries"
        return self.clock() + expire

    def _store(self, wire: bytes, data: bytes, flags: int, expire: int) -> _Item:
        item = _Item(data, flags, self._exptime(expire), self._next_cas())
        self._items[wire] = item
        return item

    def _live(self, wire: bytes) -> _Item | None:
        item = self._items.get(wire)
        if item is not None and item.exptime is not None and item.exptime <= self.clock():
            del self._items[wire]
            return None
        return item


def _data_size(parts: list[bytes]) -> int | None:
    """The length of the data block that follows a command line, if it has one."""
    verb = parts[0]
    if verb in (b"set", b"add", b"replace", b"append", b"prepend", b"cas"):
        return int(parts[4])
    if verb == b"ms":
        return int(parts[2])
    return None


class FakeExecutor:
    """Runs flows against :class:`FakeServer` objects, as the sync executor runs them on sockets."""

    def __init__(self, servers: dict[str, FakeServer], events: Events, clock: FakeClock) -> None:
        self.servers = servers
        self.events = events
        self.clock = clock
        self.slept: list[float] = []

    def run(self, flow: Flow[Any]) -> Any:
        try:
            request = next(flow)
            for _ in range(10_000):  # every flow is bounded; a runaway one fails the test
                try:
                    result = self._do(request)
                except NodeError as err:
                    request = flow.throw(err)
                    continue
                except _CallerError as raised:
                    request = flow.throw(raised.exc)
                    continue
                request = flow.send(result)
            raise AssertionError("a flow yielded 10,000 requests")
        except StopIteration as stop:
            return stop.value

    def _do(self, request: Any) -> Any:
        kind = type(request)
        if kind is Call:
            expect = (request.kind, request.data_block, request.wanted)
            return self._exchange(request.node, request.payload, [expect], request.what, request.key)[0]
        if kind is Quiet:
            self._exchange(request.node, request.payload, [], request.what, request.key)
            return None
        if kind is Fanout:
            results: dict[str, Any] = {}
            for node_id, (node, (payload, expects)) in request.jobs.items():
                try:
                    results[node_id] = self._exchange(node, payload, list(expects), request.what, request.key)
                except NodeError as err:
                    results[node_id] = err
            return results
        if kind is Each:
            replies: dict[str, Any] = {}
            for node in request.nodes:
                try:
                    job = [(request.kind, False)]
                    replies[node.node_id] = self._exchange(node, request.payload, job, request.what, None)[0]
                except NodeError as err:
                    replies[node.node_id] = err
            return replies
        if kind is Probe:
            server = self.servers[request.spec.node_id]
            server.attempts += 1
            if server.down or server.hang:
                return NodeUnavailableError(
                    f"memcached node {server.node_id}: refused (probe)", server.node_id
                )
            return server.handle(b"version\r\n")[len(b"VERSION ") : -2]
        if kind is Sleep:
            self.slept.append(request.seconds)
            self.clock.advance(max(request.seconds, 0.0))
            return None
        if kind is Compute:
            try:
                return request.fn(*request.args)
            except BaseException as exc:
                raise _CallerError(exc) from exc
        raise TypeError(f"a flow yielded {request!r}")

    def _exchange(
        self, node: Node, payload: bytes, expects: list[tuple[Any, ...]], what: str, key: Any
    ) -> list[Any]:
        node.ops += 1
        server = self.servers[node.node_id]
        server.attempts += 1
        err: NodeError | None = None
        if server.down:
            err = NodeUnavailableError(f"memcached node {node.node_id}: connection refused", node.node_id)
        elif server.hang:
            err = NodeTimeoutError(f"memcached node {node.node_id}: timed out", node.node_id)
        if err is not None:
            report_failure(self.events, node, err, what, key)
            raise err
        parser = ReplyParser(node_id=node.node_id)
        if expects:
            for expect in expects:
                parser.expect(*expect)
        else:
            parser.expect(Expect.NOOP)
            payload += NOOP
        answer = server.handle(payload)
        if answer:
            parser.feed(answer)
        replies = []
        for _ in expects:
            reply = parser.next()
            assert reply is not NEED_DATA, "the fake server answered less than was asked"
            replies.append(reply)
        node.report_success()
        return replies


class _CallerError(Exception):
    def __init__(self, exc: BaseException) -> None:
        super().__init__(exc)
        self.exc = exc


class ManualProber(Prober):
    """A prober that never starts a thread: ``start`` only counts wakes; the test runs passes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.wakes = 0  # start() calls
        self.woken = 0  # of which asked to wake it (new work), not just to keep it running

    def start(self, wake: bool = True) -> None:
        self.wakes += 1
        self.woken += wake


class Cluster:
    """A client's pieces over fake servers: what ``Client.__init__`` wires, minus sockets and threads."""

    def __init__(
        self, servers: Iterable[str], *, share: Cluster | None = None, read_marks: bool = True, **options: Any
    ) -> None:
        """``share``: another Cluster whose servers and clock this one uses (a second process).
        Fleet fencing is off unless ``fleet_refresh_s`` is given: most tests here are about one
        process's own fence log. With it, the fleet's marks are read once at the start
        (``read_marks``), as a client's first request waits for."""
        self.clock = FakeClock() if share is None else share.clock
        options.setdefault("fleet_refresh_s", None)
        self.options = Options.parse(clock=self.clock, **options)
        opts = self.options
        ring = Ring(list(servers), hashing=opts.hashing)
        gutter_ring = Ring(list(opts.gutter_servers), hashing=opts.hashing) if opts.gutter_servers else None
        self.events = Events()
        self.seen: list[Event] = []
        self.events.add_listener(self.seen.append)
        settings = ConnectionSettings(
            connect_timeout=1.0, no_delay=True, socket_module=None, keepalive=None, tls_context=None,
            max_value=opts.max_item_size,
        )  # fmt: skip
        ids = [*ring.nodes, *(gutter_ring.nodes if gutter_ring else ())]
        self.servers = {node_id: FakeServer(node_id, self.clock) for node_id in ids}
        if share is not None:
            self.servers = share.servers
        self.executor = FakeExecutor(self.servers, self.events, self.clock)
        with mock.patch.object(_membership, "Prober", ManualProber):
            self.membership = Membership(
                opts, ring, gutter_ring, events=self.events, settings=settings, run=self.executor.run
            )
        fleet = self.membership.prober.fleet
        if fleet is not None and read_marks:
            self.executor.run(fleet.refresh_flow(self.membership.__dict__["_unread"]))
        self.router = Router(
            opts.failover, failover_ttl_s=opts.failover_ttl_s, miss_on_error=opts.miss_on_error
        )
        self.core = Core(opts, self.membership, self.router, self.events)

    # -- plumbing ---------------------------------------------------------------------------------

    def run(self, flow: Flow[Any]) -> Any:
        return self.executor.run(flow)

    @property
    def topology(self) -> Any:
        return self.membership.topology

    def node(self, node_id: str) -> Node:
        found = self.topology.node(node_id)
        assert found is not None, node_id
        return found

    def server_for(self, key: str) -> FakeServer:
        return self.servers[self.owner_id(key)]

    def owner_id(self, key: str) -> str:
        return self.topology.ring.node_for(key)

    def key_on(self, node_id: str, *, prefix: str = "k", skip: int = 0) -> str:
        """A key the current ring places on ``node_id`` (the ``skip``-th one found)."""
        for i in range(100_000):
            key = f"{prefix}{i}"
            if self.owner_id(key) == node_id:
                if skip == 0:
                    return key
                skip -= 1
        raise AssertionError(f"no key found for {node_id}")

    def change(self, ring: Ring, window_s: float) -> tuple[list[str], list[str]]:
        """Swap to ``ring`` (new servers start empty), as ``add_node``/``remove_node`` do."""
        for node_id in ring.nodes:
            self.servers.setdefault(node_id, FakeServer(node_id, self.clock))
        return self.membership.change(ring, window_s)

    def kinds(self) -> list[str]:
        return [event.kind for event in self.seen]

    def fail(self, node_id: str) -> None:
        """The server stops answering; ``failure_threshold`` transport failures are reported, so its
        node is DOWN."""
        self.servers[node_id].down = True
        node = self.node(node_id)
        for _ in range(self.options.health.failure_threshold):
            node.report_failure(NodeUnavailableError(f"memcached node {node_id}: refused", node_id))
        assert node.health.state == DOWN

    def revive(self, node_id: str) -> None:
        """The server answers again (with the data it held) and its probe is due."""
        self.servers[node_id].down = False
        self.servers[node_id].hang = False
        wait = self.node(node_id).health.seconds_until_probe()
        self.clock.advance(0.0 if wait is None else wait)

    def prober_pass(self) -> None:
        """What one pass of the prober thread does: probe DOWN nodes that are due, make UP nodes
        forget what they must."""
        one_pass = prober_pass(lambda: self.membership.topology, self.events, self.membership.prober.fleet)
        drive_pass(one_pass, self.run, lambda: False)

    def close(self) -> None:
        self.membership.close()

    # -- commands, as Client runs them ------------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        return self.run(cmd.get(self.core, key, default))

    def set(self, key: str, value: Any, expire: int = 0) -> bool:
        return (
            self.run(cmd.store(self.core, b"set", key, value, expire, None, None, CallKind.REPLACING_WRITE))
            is True
        )

    def add(self, key: str, value: Any, expire: int = 0) -> bool:
        return self.run(cmd.store(self.core, b"add", key, value, expire, None, None)) is True

    def delete(self, key: str) -> bool:
        return bool(self.run(cmd.delete(self.core, key, None)))

    def gets(self, key: str) -> Any:
        return self.run(cmd.gets(self.core, key, CallKind.READ))

    def cas(self, key: str, value: Any, token: Any) -> Any:
        return self.run(cmd.store(self.core, b"cas", key, value, 0, False, None, CallKind.WRITE, token))

    def incr(self, key: str, delta: int = 1, *, initial: int | None = None) -> int | None:
        return self.run(
            cmd.counter(self.core, key, delta, decr=False, noreply=False, initial=initial, expire=0)
        )

    def set_many(self, values: dict[str, Any], expire: int = 0) -> list[Any]:
        return self.run(_batch.set_many(self.core, values, expire, None, None))  # type: ignore[no-any-return]

    def delete_many(self, keys: list[str]) -> bool:
        return bool(self.run(_batch.delete_many(self.core, keys, None)))

    def get_many(self, keys: list[str]) -> dict[Any, Any]:
        return self.run(_batch.fetch(self.core, keys, with_cas=False))  # type: ignore[no-any-return]
