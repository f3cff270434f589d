"""The machinery under ``shardcache.Client``: options, key validation, routing, failure handling,
membership changes, warm-up and discovery. ``Client`` adds the memcached commands on top.
"""

from __future__ import annotations

import builtins
import inspect
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import ModuleType
from typing import Any, TypeVar

from pymemcache.client.base import Client as PymemcacheClient
from pymemcache.serde import LegacyWrappingSerde

from shardcache._config import (
    BAD_KEY_BYTE,
    MAX_KEY_LENGTH,
    check_choice,
    check_flags,
    check_int,
    check_prefix,
    check_seconds,
    integer_arg,
    key_problem,
    unknown_option,
)
from shardcache._pool import NodePool
from shardcache._warmup import forget_previous, warm
from shardcache._wire import Reader, connected, raise_for_error
from shardcache.errors import (
    ConfigurationError,
    KeyValidationError,
    NodeUnavailableError,
    ProtocolError,
    SerializationError,
    ServerError,
)
from shardcache.health import UP, Clock, Event, HealthPolicy
from shardcache.membership import FAILOVER_POLICIES, Membership, Node, Topology
from shardcache.nodes import NodeSpec, NodeSpecLike, parse_nodes
from shardcache.ring import Ring
from shardcache.serde import Serde, default_serde

__all__ = ["COUNTER", "READ", "UNAVAILABLE", "WRITE", "ClientCore", "Key"]

logger = logging.getLogger("shardcache")

Key = str | bytes
T = TypeVar("T")

READ, WRITE, COUNTER = 0, 1, 2  # kinds of call: COUNTER calls are never sent to a stand-in
UNAVAILABLE = object()  # what internal calls return when the key's node could not be reached


class ClientCore:
    """Options, routing, failures, membership and warm-up; the commands live in ``Client``.

    Thread-safe: requests read the current topology once; membership changes swap it under a lock
    that requests never take.
    """

    def __init__(
        self,
        servers: Iterable[NodeSpecLike] | str,
        *,
        hashing: str = "mmh3",
        ketama_naming: str = "libmemcached",
        hash_key_prefix: bool = False,
        serde: Serde | None = None,
        serializer: Callable[[Any, Any], tuple[Any, int]] | None = None,
        deserializer: Callable[[Any, bytes, int], Any] | None = None,
        connect_timeout: float | None = 1.0,
        timeout: float | None = 1.0,
        no_delay: bool = True,
        socket_module: ModuleType = socket,
        socket_keepalive: Any = None,
        key_prefix: str | bytes = b"",
        default_noreply: bool = False,
        allow_unicode_keys: bool = False,
        encoding: str = "ascii",
        tls_context: Any = None,
        max_pool_size: int | None = None,
        pool_idle_timeout: float = 0,
        on_error: str = "raise",
        failover: str = "fail_fast",
        failure_threshold: int = 2,
        retry_interval_s: float = 1.0,
        max_retry_interval_s: float = 30.0,
        failover_ttl_s: int = 60,
        gutter_servers: Iterable[NodeSpecLike] | str | None = None,
        fence_max_keys: int = 100_000,
        discovery: Callable[[], Any] | None = None,
        discovery_interval_s: float = 30.0,
        discovery_warmup_s: float = 60.0,
        clock: Clock = time.monotonic,
        ignore_exc: bool = False,
        use_pooling: bool = True,
        lock_generator: Any = None,
        **unknown: Any,
    ) -> None:
        if unknown:
            raise unknown_option(unknown, _OPTION_NAMES)
        check_seconds("connect_timeout", connect_timeout, allow_none=True)
        check_seconds("timeout", timeout, allow_none=True)
        check_seconds("pool_idle_timeout", pool_idle_timeout)
        check_int("max_pool_size", max_pool_size, minimum=1, allow_none=True)
        check_choice("on_error", on_error, ("raise", "miss"))
        check_choice("failover", failover, FAILOVER_POLICIES)
        check_int("failover_ttl_s", failover_ttl_s, minimum=1)
        check_int("fence_max_keys", fence_max_keys, minimum=0)
        check_seconds("discovery_interval_s", discovery_interval_s, positive=True)
        check_seconds("discovery_warmup_s", discovery_warmup_s)
        if discovery is not None and not callable(discovery):
            raise ConfigurationError(f"discovery={discovery!r}: expected a callable returning a server list")
        policy = HealthPolicy(
            failure_threshold=failure_threshold,
            retry_interval_s=retry_interval_s,
            max_retry_interval_s=max(max_retry_interval_s, retry_interval_s)
            if isinstance(retry_interval_s, int | float) and isinstance(max_retry_interval_s, int | float)
            else max_retry_interval_s,
        )
        if serde is None:
            serde = (
                LegacyWrappingSerde(serializer, deserializer)
                if serializer is not None or deserializer is not None
                else default_serde
            )
        elif not (
            callable(getattr(serde, "serialize", None)) and callable(getattr(serde, "deserialize", None))
        ):
            raise ConfigurationError(f"serde={serde!r}: needs serialize() and deserialize() methods")
        self._prefix = check_prefix(key_prefix)
        self._hash_prefix = bool(hash_key_prefix)
        self._key_encoding = "utf-8" if allow_unicode_keys else "ascii"
        self._serde: Serde = serde
        self._encoding = encoding
        self._default_noreply = bool(default_noreply)
        self._miss_on_error = on_error == "miss" or bool(ignore_exc)
        self._connection_options: dict[str, Any] = {
            "serde": serde,
            "connect_timeout": connect_timeout,
            "timeout": timeout,
            "no_delay": no_delay,
            "socket_module": socket_module,
            "socket_keepalive": socket_keepalive,
            "key_prefix": b"",
            "default_noreply": self._default_noreply,
            "allow_unicode_keys": True,  # keys are validated and encoded here, before pymemcache
            "encoding": encoding,
            "tls_context": tls_context,
        }
        self._max_idle = max_pool_size
        self._idle_timeout = float(pool_idle_timeout)
        ring = Ring(servers, hashing=hashing, ketama_naming=ketama_naming)
        gutter_ring = self._gutter_ring(failover, gutter_servers, ring, hashing)
        self._membership = Membership(
            ring,
            make_pool=self._make_pool,
            probe_connection=self._connection,
            policy=policy,
            failover=failover,
            failover_ttl_s=failover_ttl_s,
            gutter_ring=gutter_ring,
            fence_max_keys=fence_max_keys,
            clock=clock,
        )

        self._clock = clock
        self._reconfigure = threading.Lock()
        self._discovery_stop = threading.Event()
        self._discovery: threading.Thread | None = None
        if discovery is not None:
            self._discovery = threading.Thread(
                target=self._discover,
                args=(discovery, float(discovery_interval_s), float(discovery_warmup_s)),
                name="shardcache-discovery",
                daemon=True,
            )
            self._discovery.start()

    @staticmethod
    def _gutter_ring(
        failover: str, gutter_servers: Iterable[NodeSpecLike] | str | None, ring: Ring, hashing: str
    ) -> Ring | None:
        if gutter_servers is None or (not isinstance(gutter_servers, str) and not list(gutter_servers)):
            if failover == "gutter":
                raise ConfigurationError("failover='gutter' needs gutter_servers: a list of memcached nodes")
            return None
        gutter = parse_nodes(gutter_servers)
        shared = [spec.node_id for spec in gutter if spec.node_id in ring]
        if shared:
            raise ConfigurationError(f"gutter_servers: {shared[0]!r} is also a ring member")
        return Ring(list(gutter), hashing=hashing)

    def _connection(self, spec: NodeSpec) -> PymemcacheClient:
        return PymemcacheClient(spec.address, **self._connection_options)

    def _make_pool(self, spec: NodeSpec) -> NodePool:
        return NodePool(
            spec.node_id,
            lambda: self._connection(spec),
            max_idle=self._max_idle,
            idle_timeout=self._idle_timeout,
        )

    # -- keys and routing -------------------------------------------------------------------------

    def _wire_key(self, key: Key) -> tuple[bytes, bytes]:
        """``(hashed key, key as sent)``; ``KeyValidationError`` naming the key if it is unsafe."""
        if isinstance(key, str):
            try:
                raw = key.encode(self._key_encoding)
            except UnicodeEncodeError:
                hint = (
                    ": pass allow_unicode_keys=True for UTF-8 keys" if self._key_encoding == "ascii" else ""
                )
                raise KeyValidationError(f"key {key!r} is not {self._key_encoding}{hint}") from None
        elif isinstance(key, bytes | bytearray | memoryview):
            raw = bytes(key)
        else:
            raise KeyValidationError(f"key must be str or bytes, got {type(key).__name__}: {key!r}")
        wire = self._prefix + raw if self._prefix else raw
        if not raw or len(wire) > MAX_KEY_LENGTH or BAD_KEY_BYTE(wire):
            raise KeyValidationError(key_problem(key, raw, wire))
        return (wire if self._hash_prefix else raw), wire

    def node_for(self, key: Key) -> str:
        """The id of the node that owns ``key`` on the ring (whatever its health)."""
        return self._membership.topology.ring.node_for(self._wire_key(key)[0])

    @property
    def nodes(self) -> tuple[str, ...]:
        """The node ids, in the order they were configured."""
        return self._membership.topology.ring.nodes

    @property
    def ring(self) -> Ring:
        """The current ring (an immutable value)."""
        return self._membership.topology.ring

    def node_states(self) -> dict[str, str]:
        """``{node_id: "up" | "down" | "probing"}`` for every ring node."""
        return self._membership.node_states()

    def node_counters(self) -> dict[str, dict[str, int]]:
        """Per node: ``ops``, ``errors``, ``timeouts``, ``failovers``, ``state_changes``."""
        return {node_id: node.counters() for node_id, node in self._membership.topology.nodes.items()}

    def add_listener(self, callback: Callable[[Event], None]) -> None:
        """Call ``callback(event)`` on every ``shardcache.Event``: node_down, node_up, failover,
        error, fenced. Callbacks run on the thread that saw the event; exceptions are logged."""
        self._membership.add_listener(callback)

    def remove_listener(self, callback: Callable[[Event], None]) -> None:
        """Stop calling ``callback``."""
        self._membership.remove_listener(callback)

    # -- failures ---------------------------------------------------------------------------------

    def _miss(self, err: BaseException, *, reading: bool) -> bool:
        """True if ``err`` is to become a miss (on_error='miss'); False if it must be raised."""
        if not self._miss_on_error:
            return False
        return isinstance(err, NodeUnavailableError | ServerError | ProtocolError) or (
            reading and isinstance(err, SerializationError)
        )

    def _call_failed(self, node: Node, exc: Exception, what: str, key: Any, wire: bytes | None) -> None:
        """Report a failed call to ``node``; raise our exception for it unless it becomes a miss.

        ``wire`` is given for writes (the key is fenced on a transport failure).
        """
        err = self._membership.failed(node, exc, what, key, wire)
        if self._miss(err, reading=wire is None and what in _READS):
            return
        if err is exc:
            raise exc
        raise err from exc

    def _down(self, node: Node, what: str) -> NodeUnavailableError:
        return NodeUnavailableError(
            f"memcached node {node.node_id} is {node.health.state} "
            f"({what}; failover={self._membership.failover})",
            node.node_id,
        )

    def _route(
        self, topology: Topology, node: Node, hash_key: bytes, wire: bytes, kind: int, what: str
    ) -> Node | None:
        """Where a call for ``node``'s key goes when ``node`` is not ready; None: nowhere (a miss).

        Raises (``on_error="raise"``) when the node is down and the policy has no stand-in.
        """
        membership = self._membership
        if node.health.state == UP:  # up, with keys still to forget
            if kind != WRITE and wire in node.fence:
                return None  # its value there may be stale: a miss (counters: unavailable)
            return node
        target = membership.stand_in(topology, node, hash_key, counter=kind == COUNTER)
        if target is None:
            if kind == WRITE:  # the write did not happen: the node's old value must go, and so
                membership.stood_in(node, None, wire, writing=True)  # must older stand-in copies
            if self._miss_on_error:
                return None
            raise self._down(node, what)
        if kind == READ and membership.stale_on(node, target, wire):
            return None  # an outdated copy from an earlier outage, not yet removed
        membership.stood_in(node, target, wire, writing=kind != READ)
        return target

    def _run(
        self,
        key: Key,
        what: str,
        call: Callable[[PymemcacheClient, bytes, Node, bool], T],
        missed: T,
        kind: int,
    ) -> T:
        """Run ``call(connection, wire_key, target, stand_in)`` on the node serving ``key``."""
        hash_key, wire = self._wire_key(key)
        topology = self._membership.topology
        node = topology.nodes[topology.ring.node_for(hash_key)]
        if what in _UNCONDITIONAL and topology.previous is not None:
            # set/delete during a window: the previous owner's copy goes first (see _warmup)
            self._forget_previous(topology, [(hash_key, wire, node)])
        target = node
        if not node.ready:
            routed = self._route(topology, node, hash_key, wire, kind, what)
            if routed is None:
                return missed
            target = routed
        target.ops += 1
        pool = target.pool
        conn = pool.acquire()
        try:
            result = call(conn, wire, target, target is not node)
        except Exception as exc:
            pool.discard(conn)
            # A failed write may have left the node's old value: fence it. Not a counter's: its
            # value is not replaced by the failed increment, and deleting it would lose the count.
            self._call_failed(target, exc, what, key, wire if kind == WRITE else None)
            return missed
        pool.release(conn)
        if target.health.failures:
            target.health.record_success()
        if (
            kind != READ
            and what not in _UNCONDITIONAL
            and what not in _READS  # a counter-routed gets is still a read
            and topology.previous is not None
            and result is not None
            and result is not False
        ):  # a conditional write took effect: the previous owner's copy must not come back
            self._forget_previous(topology, [(hash_key, wire, node)])
        return result

    def _store_command(
        self,
        name: bytes,
        wire: bytes,
        value: Any,
        expire: int,
        flags: int | None,
        noreply: bool,
        cas: bytes = b"",
    ) -> bytes:
        """A storage command (``set``/``add``/...) for one item, serialized; nothing is sent."""
        data, data_flags = self._serde.serialize(wire, value)
        if flags is not None:
            data_flags = flags
        check_flags(data_flags)
        if type(data) is not bytes:
            data = (
                bytes(data) if isinstance(data, bytearray | memoryview) else str(data).encode(self._encoding)
            )
        return b"%b %b %d %b %d%b%b\r\n%b\r\n" % (
            name, wire, data_flags, integer_arg(expire, "expire"), len(data), cas,
            b" noreply" if noreply else b"", data,
        )  # fmt: skip

    def _delete_if_value(self, key: Key, expected: Any) -> bool:
        """Delete ``key`` only if it still holds ``expected`` (a compare-and-delete). True if deleted.

        Uses memcached's meta delete with the item's CAS value (``md <key> C<cas>``), so a value
        replaced between the read and the delete is left alone.
        """
        found = self._gets(key, _UNSET, None, COUNTER)  # type: ignore[attr-defined]
        if found is None or found is UNAVAILABLE:
            return False
        value, token = found
        if value != expected:
            return False
        hash_key, wire = self._wire_key(key)
        topology = self._membership.topology
        node = topology.nodes[topology.ring.node_for(hash_key)]
        if node.node_id != token.node_id or not node.ready:
            return False
        conn = node.pool.acquire()
        try:
            sock = connected(conn)
            sock.sendall(b"md %b C%b\r\n" % (wire, bytes(token)))
            line = Reader(sock).line()
            if line not in (b"HD", b"EX", b"NF"):
                raise_for_error(line)
        except Exception as exc:
            node.pool.discard(conn)
            self._call_failed(node, exc, "delete (compare)", key, wire)
            return False
        node.pool.release(conn)
        return line == b"HD"

    def _warm_one(self, key: Key) -> bool:
        """During a warm-up or drain window: copy ``key`` from its previous owner. True if found."""
        topology = self._membership.topology
        if topology.previous is None:
            return False
        hash_key, wire = self._wire_key(key)
        node = topology.nodes[topology.ring.node_for(hash_key)]
        return bool(self._warm(topology, [(hash_key, wire, node)]))

    def _hashed(self, keys: Iterable[Key]) -> list[tuple[Key, bytes, bytes]]:
        """Validate every key first: ``[(key, hashed key, wire key)]``."""
        wire_key = self._wire_key
        return [(key, *wire_key(key)) for key in keys]

    def _plan(
        self, hashed: Iterable[tuple[Key, bytes, bytes]], kind: int, what: str
    ) -> tuple[dict[str, Node], dict[str, dict[bytes, Key]], builtins.set[bytes], dict[str, BaseException]]:
        """Route validated keys: targets, ``{target: {wire: key}}``, the wires going to stand-ins,
        and the failures of nodes that are down with no stand-in."""
        topology = self._membership.topology
        node_for = topology.ring.node_for
        targets: dict[str, Node] = {}
        groups: dict[str, dict[bytes, Key]] = {}
        moved: builtins.set[bytes] = builtins.set()
        down: dict[str, BaseException] = {}
        for key, hash_key, wire in hashed:
            node = topology.nodes[node_for(hash_key)]
            target = node
            if not node.ready:
                try:
                    routed = self._route(topology, node, hash_key, wire, kind, what)
                except NodeUnavailableError as exc:
                    down.setdefault(node.node_id, exc)
                    continue
                if routed is None:
                    continue
                if routed is not node:
                    moved.add(wire)
                target = routed
            group = groups.get(target.node_id)
            if group is None:
                targets[target.node_id] = target
                groups[target.node_id] = {wire: key}
            else:
                group[wire] = key
        for target in targets.values():
            target.ops += 1
        return targets, groups, moved, down

    def _settle(
        self, targets: Mapping[str, Node], errors: Mapping[str, Exception], down: Mapping[str, BaseException],
        what: str, *, reading: bool, fenced: Mapping[str, Iterable[bytes]] | None = None,
    ) -> None:  # fmt: skip
        """Report the failures of a multi-key call; raise the first unless on_error='miss'."""
        first: tuple[BaseException, BaseException] | None = None
        for node_id, exc in errors.items():
            node = targets[node_id]
            err = self._membership.failed(node, exc, what, None, None)
            if fenced is not None and isinstance(err, NodeUnavailableError | ProtocolError):
                for wire in fenced[node_id]:
                    node.fence.add(wire)
            if not self._miss(err, reading=reading) and first is None:
                first = (err, exc)
        if first is None and down and not self._miss_on_error:
            raise next(iter(down.values()))
        if first is not None:
            translated, original = first
            if translated is original:
                raise translated
            raise translated from original
        for target in targets.values():
            if target.health.failures and target.node_id not in errors:
                target.health.record_success()

    def _each_node(
        self,
        what: str,
        call: Callable[[PymemcacheClient], T],
        fallback: T,
        nodes: Mapping[str, Node] | None = None,
    ) -> dict[str, T]:
        """``call`` on every ring node (or on ``nodes``), one after the other: ``{node_id: result}``."""
        if nodes is None:
            nodes = self._membership.topology.nodes
        results: dict[str, T] = {}
        errors: dict[str, Exception] = {}
        down: dict[str, BaseException] = {}
        for node_id, node in nodes.items():
            results[node_id] = fallback
            if node.health.state != UP:
                down[node_id] = self._down(node, what)
                continue
            conn = node.pool.acquire()
            try:
                results[node_id] = call(conn)
            except Exception as exc:
                node.pool.discard(conn)
                errors[node_id] = exc
            else:
                node.pool.release(conn)
        self._settle(nodes, errors, down, what, reading=False)
        return results

    def close(self) -> None:
        """Close idle connections, stop the prober and discovery. Requests still work afterwards
        (connections reopen on demand, the prober restarts when needed); discovery does not."""
        self._discovery_stop.set()
        if self._discovery is not None and self._discovery is not threading.current_thread():
            self._discovery.join(timeout=5)
        self._membership.close()

    # -- membership -------------------------------------------------------------------------------

    def add_node(self, spec: NodeSpecLike, *, warmup_s: float = 0.0) -> None:
        """Add a node. For ``warmup_s`` seconds a miss on a key that moved to it is read from the
        key's previous owner and copied over. ``ConfigurationError`` if it is already present."""
        check_seconds("warmup_s", warmup_s)
        with self._reconfigure:
            ring = self._membership.topology.ring.with_node(spec)
            self._check_not_gutter(ring)
            self._membership.change(ring, float(warmup_s))

    def remove_node(self, node_id: str, *, drain_s: float = 0.0) -> None:
        """Remove a node. For ``drain_s`` seconds a miss on one of its keys is read from it while it
        still answers. ``ConfigurationError`` if it is absent or the last node."""
        check_seconds("drain_s", drain_s)
        with self._reconfigure:
            self._membership.change(self._membership.topology.ring.without_node(node_id), float(drain_s))

    def set_nodes(
        self, servers: Iterable[NodeSpecLike] | str, *, warmup_s: float = 0.0
    ) -> tuple[list[str], list[str]]:
        """Reconcile to ``servers`` (added nodes warm up and removed ones drain for ``warmup_s``).

        Returns the node ids added and removed.
        """
        check_seconds("warmup_s", warmup_s)
        with self._reconfigure:
            current = self._membership.topology.ring
            ring = Ring(servers, hashing=current.hashing, ketama_naming=current.ketama_naming)
            if ring.specs == current.specs:
                return [], []
            self._check_not_gutter(ring)
            return self._membership.change(ring, float(warmup_s))

    def _check_not_gutter(self, ring: Ring) -> None:
        gutter = self._membership.topology.gutter_ring
        if gutter is not None:
            shared = [node_id for node_id in ring.nodes if node_id in gutter]
            if shared:
                raise ConfigurationError(f"node {shared[0]!r} is a gutter server; it cannot join the ring")

    def _discover(self, discovery: Callable[[], Any], interval_s: float, warmup_s: float) -> None:
        while not self._discovery_stop.wait(interval_s):
            try:
                servers = discovery()
                specs = parse_nodes(servers)
            except Exception as exc:
                self._membership.emit(Event("discovery_failed", "", f"kept the last good list: {exc!r}", exc))
                continue
            try:
                self.set_nodes(list(specs), warmup_s=warmup_s)
            except Exception as exc:
                self._membership.emit(
                    Event("discovery_failed", "", f"could not apply {servers!r}: {exc}", exc)
                )

    # -- warm-up ----------------------------------------------------------------------------------

    def _warm(self, topology: Topology, misses: Sequence[tuple[bytes, bytes, Node]]) -> dict[bytes, Any]:
        """Copy missed keys from their previous owners (see ``shardcache._warmup``)."""
        return warm(self._membership, self._serde.deserialize, topology, misses, self._clock())

    def _forget_previous(self, topology: Topology, moved: Iterable[tuple[bytes, bytes, Node]]) -> None:
        """Delete moved keys on their previous owners, before (set/delete) or after a write."""
        forget_previous(self._membership, topology, moved, self._clock())


_UNSET = object()
_UNCONDITIONAL = ("set", "delete")  # writes that replace whatever is there
_READS = ("get", "gets")
_OPTION_NAMES = [p for p in inspect.signature(ClientCore.__init__).parameters if p not in ("self", "unknown")]
