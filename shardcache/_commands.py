"""Single-key commands, written once as flows (see ``shardcache._flows``).

Each function here is a generator over a :class:`Core`: it validates its arguments, asks the router
where the key goes, yields the request for that node, and turns the reply into the value pymemcache
would return. The same flow runs under the sync ``Client`` and any other executor. Multi-key and
cluster-wide commands are in ``shardcache._batch``; warm-up in ``shardcache._warmup``.

A key's path reads one way: validate (``Core.keys``) -> route (``Core.router``) -> encode
(``shardcache._protocol``) -> the executor -> parse -> back here, and nothing returns to the caller to
ask what to do next.

The hottest calls also have a flow-less form (``get_now``, ``store_now``): the same routing and
reply handling (``Core.value_of``, ``_stored``) through ``Executor.request``, taken only when the
owner is ready and no ring change is in its windows; otherwise they return ``FLOW`` and the
caller runs the flow. A generator, its sends and its ``StopIteration`` cost about as much Python
as the rest of a ``get``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, NamedTuple

from shardcache import _protocol as proto
from shardcache._events import Events, refusal, report_failure
from shardcache._fleet import read_copies, recorded, tagged
from shardcache._flows import Call, Flow, Quiet
from shardcache._options import Options
from shardcache._protocol import ErrorReply, Expect, Oversized, Value
from shardcache._router import CallKind, Decision, Router
from shardcache._topology import Node, Topology
from shardcache._warmup import forget_previous, warm
from shardcache.errors import (
    ArgumentError,
    CasConflictError,
    NodeError,
    NodeUnavailableError,
    ProtocolError,
    SerializationError,
    ServerError,
    ValueTooLargeError,
)
from shardcache.health import Event
from shardcache.serde import FLAG_BYTES, DefaultSerde

__all__ = ["FLOW", "UNAVAILABLE", "CasToken", "Core", "Engine", "Request"]

UNAVAILABLE: Final = object()  # what pinned flows return when the key's node could not be reached
FLOW: Final = object()  # what a flow-less fast path returns when the flow must run instead
_MISSING: Final = object()
_READ, _WRITE, _REPLACE = CallKind.READ, CallKind.WRITE, CallKind.REPLACING_WRITE
_PINNED, _PINNED_READ = CallKind.PINNED, CallKind.PINNED_READ
_STORED: Final = b"STORED"
_VALUES, _STATUS, _NOOP = Expect.VALUES, Expect.STATUS, Expect.NOOP  # hot paths: no class lookup
_MAX_FLAGS: Final = 2**32 - 1
_WHAT: Final = {name: name.decode() for name in (b"set", b"add", b"replace", b"append", b"prepend")}
_CREATE_ATTEMPTS: Final = 8


class CasToken(bytes):
    """A CAS token from ``gets`` that remembers the node which issued it.

    It is the server's token (bytes of digits), so it also works wherever pymemcache takes one.
    ``Client.cas`` refuses to use it on another node: a token is only meaningful where it was issued.
    """

    node_id: str

    def __new__(cls, raw: bytes, node_id: str) -> CasToken:
        token = super().__new__(cls, raw)
        token.node_id = node_id
        return token

    def __reduce__(self) -> tuple[Any, ...]:
        return (CasToken, (bytes(self), self.node_id))


class Core:
    """What every flow of one client shares: options, keys, serde, router, topology, events.
    Immutable apart from the topology reference it reads from ``membership``; thread-safe."""

    __slots__ = ("events", "journal", "keys", "membership", "miss_on_error", "noreply", "options",
                 "plain_flags", "router", "serde")  # fmt: skip

    def __init__(self, options: Options, membership: Any, router: Router, events: Events) -> None:
        self.options = options
        self.keys = options.key_codec()
        self.serde = options.serde
        # The flags of items whose data is the value itself (DefaultSerde's bytes), read and
        # written without a serde call on the hot paths; -1 (no item has them) for other serdes.
        self.plain_flags = FLAG_BYTES if type(self.serde) is DefaultSerde else -1
        self.membership = membership
        self.router = router
        self.events = events
        self.miss_on_error = options.miss_on_error
        self.noreply = options.default_noreply
        self.journal = membership.prober.fleet is not None  # writes on stand-ins are journaled

    @property
    def topology(self) -> Topology:
        topology: Topology = self.membership.topology
        return topology

    # -- values -----------------------------------------------------------------------------------

    def encode(self, wire: bytes, value: Any, flags: int | None) -> tuple[bytes, int]:
        """``value`` serialized for ``wire``: (data, flags); nothing is sent if this raises."""
        if type(value) is bytes and flags is None and self.plain_flags == FLAG_BYTES:
            return value, FLAG_BYTES  # what DefaultSerde.serialize returns, without its call
        data, data_flags = self.serde.serialize(wire, value)
        if flags is not None:
            data_flags = flags
        if type(data_flags) is not int or not 0 <= data_flags <= _MAX_FLAGS:
            data_flags = proto.check_flags(data_flags)  # raises, naming the value
        if type(data) is not bytes:
            if isinstance(data, bytearray | memoryview):
                data = bytes(data)
            elif isinstance(data, str):
                data = data.encode(self.options.encoding)
            else:
                raise SerializationError(
                    f"serde {self.serde!r} returned {type(data).__name__}, not bytes, for {wire!r}"
                )
        return data, data_flags

    def decode(self, node: Node | None, key: Any, item: Any) -> Any:
        """The value of a reply item; ``_MISSING`` if it cannot be read and ``on_error="miss"``."""
        try:
            if type(item) is Oversized:
                raise self._oversized(node, key, item)
            return self.serde.deserialize(item.key, item.data, item.flags)
        except Exception as exc:
            self._undecodable(node, key, exc)
            return _MISSING

    def value_of(self, node: Node, key: Any, reply: Any, default: Any) -> Any:
        """What a one-key ``get`` returns for ``reply`` from ``node``: the value, or ``default``
        for a miss (or an error reply or an unreadable value if they do not raise: see
        :meth:`refused`, :meth:`decode`). The hot path: a readable value without :meth:`decode`'s
        frame (a plain one without a serde call), which handles everything else (as
        ``_batch.fetch`` does)."""
        if type(reply) is not list:
            self.refused(node, reply, "get", key, _READ)
            return default
        if not reply:
            return default
        item = reply[0]
        if type(item) is Value:
            wire, flags, data, _ = item
            if flags == self.plain_flags:
                return data
            try:
                return self.serde.deserialize(wire, data, flags)
            except Exception:  # decode reads it again: it raises, or reports and misses
                pass
        value = self.decode(node, key, item)
        return default if value is _MISSING else value

    def _oversized(self, node: Node | None, key: Any, item: Oversized) -> ValueTooLargeError:
        limit = self.options.max_item_size
        return ValueTooLargeError(
            f"the value of {key!r} is {item.size} bytes, over max_item_size={limit}"
            " (raise it to match memcached's -I)", key, "" if node is None else node.node_id,
        )  # fmt: skip

    def _undecodable(self, node: Node | None, key: Any, exc: Exception) -> None:
        """A value that could not be read: raise ``exc``, or report it (``on_error="miss"``)."""
        if not (self.miss_on_error and isinstance(exc, SerializationError | ValueTooLargeError)):
            raise exc
        self.events.emit(Event("error", "" if node is None else node.node_id, str(exc), exc, key))

    # -- failures ---------------------------------------------------------------------------------

    def swallowed(self, err: BaseException, *, reading: bool) -> bool:
        """True if ``err`` becomes a miss (``on_error="miss"``); False if it must be raised."""
        if not self.miss_on_error:
            return False
        return isinstance(err, NodeUnavailableError | ServerError | ProtocolError) or (
            reading and isinstance(err, SerializationError)
        )

    def failed(self, target: Node, err: NodeError, kind: CallKind, wire: bytes | None) -> None:
        """After a node failure (already reported): fence a write that may not have happened, then
        return (the caller misses) or raise."""
        if kind.fence_failed and wire is not None and isinstance(err, NodeUnavailableError | ProtocolError):
            target.fence(wire)
        if not self.swallowed(err, reading=kind.reads):
            raise err

    def refused(self, node: Node, reply: ErrorReply, what: str, key: Any, kind: CallKind) -> None:
        """A reply that refused the command: report it, then return (a miss) or raise."""
        err = refusal(node, reply, what, key)
        report_failure(self.events, node, err, "", key)
        if not self.swallowed(err, reading=kind.reads):
            raise err

    def down(self, decision: Decision, what: str) -> None:
        """The key's node is away and there is no stand-in: raise, unless on_error='miss'."""
        err = self.router.unavailable(decision, what)
        if err is not None:
            raise err

    def locate(self, topology: Topology, key: Any) -> tuple[bytes, bytes, Node]:
        """Validate ``key``: (hashed, wire, its owner on ``topology``); no routing, no bookkeeping."""
        hash_key, wire = self.keys.wire(key)
        return hash_key, wire, topology.nodes[topology.ring.node_for(hash_key)]

    def route(
        self, topology: Topology, key: Any, kind: CallKind
    ) -> tuple[bytes, bytes, Node, Decision | None]:
        """Validate ``key`` and route it: (hashed, wire, owner, decision or None if the owner is ready)."""
        hash_key, wire = self.keys.wire(key)
        owner = topology.nodes[topology.ring.node_for(hash_key)]
        if owner.ready:
            return hash_key, wire, owner, None
        return hash_key, wire, owner, self.router.route(topology, owner, hash_key, wire, kind)


# the executor's flow-less request: (node, payload, expected kind, what, key, data_block, wanted) -> reply
Request = Callable[[Node, bytes, int, str, Any, bool, Any], Any]


class Engine(NamedTuple):
    """A client's flows and the executor that runs them: what recipes and integrations use."""

    core: Core
    run: Callable[[Flow[Any]], Any]


# -- reads ----------------------------------------------------------------------------------------


def get_now(core: Core, request: Request, key: Any, default: Any) -> Any:
    """``get`` without a flow when nothing but the owner is involved (it is ready, no window is
    open): one request through ``request`` (the executor's). ``FLOW`` when :func:`get` must run."""
    topology = core.membership.topology
    hash_key, wire = core.keys.wire(key)
    owner = topology.nodes[topology.ring.node_for(hash_key)]
    if not owner.ready or topology.window:
        return FLOW
    try:
        reply = request(owner, proto.retrieve_one(wire), _VALUES, "get", key, False, wire)
    except NodeError as err:
        core.failed(owner, err, _READ, None)
        return default
    return core.value_of(owner, key, reply, default)


def get(core: Core, key: Any, default: Any) -> Flow[Any]:
    """The value of ``key``, or ``default``; during a window a miss is warmed from the previous owner."""
    topology = core.membership.topology
    hash_key, wire, owner, decision = core.route(topology, key, _READ)
    target = owner
    if decision is not None:
        if decision.target is None:
            core.down(decision, "get")
            return default
        target = decision.target
    try:
        reply = yield Call(target, proto.retrieve_one(wire), Expect.VALUES, "get", key, False, wire)
    except NodeError as err:
        core.failed(target, err, _READ, None)
        return default
    if target is not owner and type(reply) is list:
        reply = read_copies(owner, reply)  # only a copy written there in this outage
    if reply == [] and topology.window:
        warmed = yield from warm(core, topology, [(hash_key, wire, owner)])
        return warmed.get(wire, default)
    return core.value_of(target, key, reply, default)


def gets(core: Core, key: Any, kind: CallKind) -> Flow[Any]:
    """``(value, CasToken)``, None if absent, or ``UNAVAILABLE`` if no node could answer."""
    found = yield from _gets_once(core, key, kind)
    topology = core.topology
    if found is None and (topology.window or (kind is _PINNED_READ and topology.previous is not None)):
        hash_key, wire = core.keys.wire(key)
        if (yield from warm(core, topology, [(hash_key, wire, topology.owner(hash_key))])):
            found = yield from _gets_once(core, key, kind)  # moved in a membership change: copied over
    return found


def _gets_once(core: Core, key: Any, kind: CallKind) -> Flow[Any]:
    topology = core.topology
    _, wire, owner, decision = core.route(topology, key, kind)
    target = owner
    if decision is not None:
        if decision.target is None:
            core.down(decision, "gets")
            return UNAVAILABLE
        target = decision.target
    try:
        reply = yield Call(
            target, proto.retrieve([wire], cas=True), Expect.CAS_VALUES, "gets", key, wanted=wire
        )
    except NodeError as err:
        core.failed(target, err, kind, None)
        return UNAVAILABLE
    if type(reply) is not list:
        core.refused(target, reply, "gets", key, kind)
        return UNAVAILABLE
    if target is not owner:
        reply = read_copies(owner, reply)
    if not reply:
        return None
    item = reply[0]
    value = core.decode(target, key, item)
    if value is _MISSING:
        return None
    return value, CasToken(b"%d" % item.cas, target.node_id)


# -- writes ---------------------------------------------------------------------------------------


def store_now(
    core: Core, request: Request, command: bytes, key: Any, value: Any, expire: int, noreply: bool | None,
    flags: int | None, kind: CallKind,
) -> Any:  # fmt: skip
    """:func:`store` (not ``cas``) without a flow when nothing but the owner is involved (it is
    ready, no change is in its windows); ``FLOW`` when :func:`store` must run."""
    topology = core.membership.topology
    if topology.previous is not None:
        return FLOW
    hash_key, wire = core.keys.wire(key)
    owner = topology.nodes[topology.ring.node_for(hash_key)]
    if not owner.ready:
        return FLOW
    if noreply is None:
        noreply = core.noreply
    data, flags = core.encode(wire, value, flags)
    payload = proto.store(command, wire, data, flags, expire, noreply=bool(noreply))
    what = _WHAT[command]
    try:
        if noreply:
            request(owner, payload, _NOOP, what, key, False, None)
            return True
        reply = request(owner, payload, _STATUS, what, key, True, None)
    except NodeError as err:
        core.failed(owner, err, kind, wire)
        return UNAVAILABLE
    return _stored(core, owner, command, key, kind, reply)


def store(
    core: Core, command: bytes, key: Any, value: Any, expire: int, noreply: bool | None, flags: int | None,
    kind: CallKind = _WRITE, cas: Any = None,
) -> Flow[Any]:  # fmt: skip
    """A storage command: True (stored), False (not stored), None (cas: absent), or
    ``UNAVAILABLE`` if the key's node could not be reached."""
    if noreply is None:
        noreply = core.noreply
    topology = core.topology
    hash_key, wire, owner = core.locate(topology, key)
    data, flags = core.encode(wire, value, flags)
    payload = proto.store(command, wire, data, flags, expire, noreply=bool(noreply), cas=_cas_number(cas))
    if topology.previous is not None:
        if kind.forget_before:  # the previous owner's copy goes first
            yield from forget_previous(core, topology, [(hash_key, wire, owner)])
        elif command != b"cas" and (topology.window or kind is _PINNED):
            # add/replace/append/prepend act on what exists, which may still be on the previous
            # owner: bring it over first (add then refuses, the others apply to it). A CAS token
            # comes from gets, which has already brought it over. Outside a warm-up window only
            # pinned calls (a lock's add) do this: a plain moved key is a miss there.
            yield from warm(core, topology, [(hash_key, wire, owner)])
    target = owner
    if not owner.ready:
        decision = core.router.route(topology, owner, hash_key, wire, kind)
        if decision.target is None:
            core.down(decision, command.decode())
            return UNAVAILABLE
        target = decision.target
        if decision.stand_in:
            capped = core.router.capped_ttl(proto.check_expire(expire))
            copy_flags = tagged(owner, flags)  # marked as this outage's copy
            if copy_flags is None:
                core.down(
                    decision._replace(down=True), f"{command.decode()} (flags {flags} too high for a copy)"
                )
                return UNAVAILABLE
            payload = proto.store(
                command, wire, data, copy_flags, capped, noreply=bool(noreply), cas=_cas_number(cas)
            )
    if isinstance(cas, CasToken) and cas.node_id != target.node_id:
        return False  # a token only means something on the node that issued it
    what = command.decode()
    journal = target is not owner and core.journal  # a write on a stand-in: journal it first
    if journal and not (yield from recorded(core, owner, target, wire, key, what)):
        return UNAVAILABLE
    try:
        if noreply:
            yield Quiet(target, payload, what, key)
            return True
        reply = yield Call(target, payload, Expect.STATUS, what, key, data_block=True)
    except NodeError as err:
        core.failed(target, err, kind, wire)
        return UNAVAILABLE
    result = _stored(core, target, command, key, kind, reply)
    if target is not owner and result is not UNAVAILABLE:
        owner.landed_elsewhere(target, wire)
    if result is True and kind.forget_after and topology.previous is not None:
        # a conditional write took effect: the previous owner's copy must not come back
        yield from forget_previous(core, topology, [(hash_key, wire, owner)])
    return result


def _stored(core: Core, node: Node, command: bytes, key: Any, kind: CallKind, reply: Any) -> Any:
    """What a storage command returns for ``reply`` from ``node``: True (stored), False (not
    stored), None (cas: absent), ``UNAVAILABLE`` (an error reply, reported, if it does not raise)."""
    if type(reply) is ErrorReply:
        core.refused(node, reply, command.decode(), key, kind)
        return UNAVAILABLE
    if reply == _STORED:
        return True
    if command == b"cas" and reply == b"NOT_FOUND":
        return None
    return False


def _cas_number(cas: Any) -> int | None:
    return None if cas is None else proto.check_cas(cas)


def delete(core: Core, key: Any, noreply: bool | None) -> Flow[bool]:
    """Delete ``key``: True if it was there (always True with noreply). A delete that fails or
    cannot reach the node is fenced: the key is deleted there before the node serves it again."""
    if noreply is None:
        noreply = core.noreply
    topology = core.topology
    hash_key, wire, owner = core.locate(topology, key)
    if topology.previous is not None:
        yield from forget_previous(core, topology, [(hash_key, wire, owner)])
    target = owner
    if not owner.ready:
        decision = core.router.route(topology, owner, hash_key, wire, _REPLACE)
        if decision.target is None:
            core.down(decision, "delete")
            return False
        target = decision.target
        if core.journal and not (yield from recorded(core, owner, target, wire, key, "delete")):
            return False
    try:
        if noreply:
            yield Quiet(target, proto.delete(wire, noreply=True), "delete", key)
            return True
        reply = yield Call(target, proto.delete(wire), Expect.STATUS, "delete", key)
    except NodeError as err:
        core.failed(target, err, _REPLACE, wire)
        return False
    if type(reply) is ErrorReply:
        core.refused(target, reply, "delete", key, _REPLACE)
        return False
    return bool(reply == b"DELETED")


def touch(core: Core, key: Any, expire: int, noreply: bool | None) -> Flow[bool]:
    """A new expiry for ``key``: True if it exists."""
    if noreply is None:
        noreply = core.noreply
    expire = proto.check_expire(expire)
    topology = core.topology
    hash_key, wire, owner, decision = core.route(topology, key, _WRITE)
    if topology.window:  # touch what exists, which may still be on its previous owner
        yield from warm(core, topology, [(hash_key, wire, owner)])
    target, ttl = owner, expire
    if decision is not None:
        if decision.target is None:
            core.down(decision, "touch")
            return False
        target = decision.target
        if decision.stand_in:
            ttl = core.router.capped_ttl(expire)
    try:
        if noreply:
            yield Quiet(target, proto.touch(wire, ttl, noreply=True), "touch", key)
            return True
        reply = yield Call(target, proto.touch(wire, ttl), Expect.STATUS, "touch", key)
    except NodeError as err:
        core.failed(target, err, _WRITE, wire)
        return False
    if type(reply) is ErrorReply:
        core.refused(target, reply, "touch", key, _WRITE)
        return False
    if reply == b"TOUCHED":
        if topology.previous is not None:
            yield from forget_previous(core, topology, [(hash_key, wire, owner)])
        return True
    return False


# -- counters -------------------------------------------------------------------------------------


def counter(
    core: Core, key: Any, delta: Any, *, decr: bool, noreply: bool | None, initial: Any, expire: int
) -> Flow[int | None]:
    """incr/decr: the new value; None if absent (or unreachable with ``on_error="miss"``).

    With ``initial`` an absent counter is created at ``initial`` and ``initial`` is returned (the
    delta is not applied: memcached's and libmemcached's convention), with ``add`` so concurrent
    creators never overwrite each other. During a warm-up window the counter may still be on its
    previous owner, so it is brought over first. (Meta arithmetic could create it in the same
    round trip, but memcached 1.6 gives a vivified item client flags 0, so ``get`` would return
    the counter as bytes instead of an int.)
    """
    name = "decr" if decr else "incr"
    delta = proto.check_delta(delta)
    if initial is not None:
        initial = proto.check_delta(initial, "initial")
        expire = proto.check_expire(expire)
    hash_key, wire = core.keys.wire(key)
    if noreply and initial is not None:
        raise ArgumentError(
            f"{name}({key!r}, initial={initial}, noreply=True): creating an absent counter needs the reply"
        )
    if noreply:
        yield from _pinned(core, key, proto.incr_decr(wire, delta, decr=decr, noreply=True), None, name)
        return None
    for _ in range(_CREATE_ATTEMPTS):
        reply = yield from _pinned(core, key, proto.incr_decr(wire, delta, decr=decr), Expect.NUMBER, name)
        if reply is UNAVAILABLE:
            return None
        if type(reply) is int:
            return reply
        topology = core.topology
        moved = [(hash_key, wire, topology.owner(hash_key))]
        if topology.previous is not None and (yield from warm(core, topology, moved)):
            # the counter was still on its previous owner: now it is here, and counted here only
            yield from forget_previous(core, topology, moved)
            continue
        if initial is None:
            return None
        created = yield from store(core, b"add", key, b"%d" % initial, expire, False, _FLAG_INTEGER, _PINNED)
        if created is UNAVAILABLE:
            return None
        if created:
            return int(initial)
    raise CasConflictError(
        f"{name}({key!r}, initial={initial}): the counter kept appearing and disappearing",
        key,
        _CREATE_ATTEMPTS,
    )


_FLAG_INTEGER: Final = 2  # pymemcache's flag for int values, so get() returns an int


def _pinned(core: Core, key: Any, payload: bytes, kind: int | None, what: str) -> Flow[Any]:
    """One request to the key's owner only (never a stand-in); ``UNAVAILABLE`` if it is away."""
    topology = core.topology
    _, wire, owner, decision = core.route(topology, key, _PINNED)
    if decision is not None and decision.target is None:
        core.down(decision, what)
        return UNAVAILABLE
    try:
        if kind is None:
            yield Quiet(owner, payload, what, key)
            return None
        reply = yield Call(owner, payload, kind, what, key)
    except NodeError as err:
        core.failed(owner, err, _PINNED, wire)
        return UNAVAILABLE
    if type(reply) is ErrorReply:
        core.refused(owner, reply, what, key, _PINNED)
        return UNAVAILABLE
    return reply


def compare_delete(core: Core, key: Any, expected: Any) -> Flow[bool]:
    """Delete ``key`` only if it still holds ``expected`` (meta delete with the CAS value read
    first), so a value replaced between the read and the delete is left alone. True if deleted."""
    found = yield from gets(core, key, _PINNED_READ)
    if found is None or found is UNAVAILABLE:
        return False
    value, token = found
    if value != expected:
        return False
    topology = core.topology
    _, wire, owner, decision = core.route(topology, key, _PINNED)
    if owner.node_id != token.node_id or decision is not None:
        return False
    try:
        reply = yield Call(
            owner, proto.meta_delete(wire, cas=int(token)), Expect.META, "delete (compare)", key
        )
    except NodeError as err:
        core.failed(owner, err, _REPLACE, wire)  # fenced: the lock is ours, so its deletion is wanted
        return False
    if type(reply) is ErrorReply:
        core.refused(owner, reply, "delete (compare)", key, _PINNED)
        return False
    if reply.status != b"HD":
        return False
    if topology.previous is not None:  # the value may still be on its previous owner: a later
        hash_key, _ = core.keys.wire(key)  # warm-up (or add) would bring the deleted lock back
        yield from forget_previous(core, topology, [(hash_key, wire, owner)])
    return True
