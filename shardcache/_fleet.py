"""Fleet-wide rejoin fencing: outage marks that every process sees, kept on the other nodes.

The per-process fence log (``_topology.FenceLog``) makes a returning node forget the keys *this
process* wrote elsewhere while it was away. It cannot help a process that never noticed the
outage, nor survive the death of the process that wrote: prefork servers recycle workers all the
time. This module is the fleet-wide half (docs/consistency.md, "Processes").

**Marks.** For each node N there is one *mark*, ``(generation, stage)``, stored under a reserved
key (:func:`mark_key`) on every *other* node, so a reader finds it even while N is down. Stages,
in order: ``DOWN`` (someone saw N fail), ``RETURNING`` (someone saw N answer again; no process may
use N, nor stand in for it, until it is flushed), ``CLEAN`` (N was flushed after that outage).
Marks are ordered by ``(generation, stage)``; a process keeps the highest it has seen per node
and never goes back. A generation is the wall clock in milliseconds when the outage was first
published, and always above every generation the publisher has seen.

**Who does what** (each process, on its prober thread):

- it marks N down itself (``failure_threshold`` failed calls): it publishes ``DOWN(g)``;
- every ``refresh_s`` it reads every node's mark from four nodes (one round trip; a holder
  that lacks an outage still under way gets it back) and applies the newest: ``DOWN`` takes N
  out of its ring view (stand-ins may serve N's keys); ``RETURNING`` too, but stand-ins may not
  (N's keys miss); ``CLEAN`` makes its next probe due;
- it writes or deletes one of N's keys on a stand-in: first it appends the key to N's *journal*
  (:func:`journal_key`) on that stand-in and on the stand-in's *buddy* (the next node by id), so
  one node restarting empty loses no entry (``add`` then ``append``, one round trip, once per key
  and stand-in per outage); if the journal cannot take it (unreachable, or memcached's item size
  limit), the write is refused: no acknowledged write on a stand-in goes unrecorded;
- its probe finds N answering: if N's latest mark is ``CLEAN`` (or there is none), N is readmitted;
  if ``DOWN(g)``, it publishes ``RETURNING(g)`` and waits ``settle_s`` (two refresh periods and a
  margin), so that every process has stopped writing N's keys to stand-ins; then it *cleans* N:
  reads N's journals from every other node, deletes the keys listed on N (their value there is
  from before the outage) and on the stand-ins (their copies must not be read in a later
  outage), deletes the journals, publishes ``CLEAN(g)`` and readmits N. Others readmit N on their
  next probe. Keys never written elsewhere keep their values: counters and locks (never on a
  stand-in) survive an outage. If two other nodes are down, an entry may be on neither: N waits
  for them, out of use, for up to a minute, then is flushed instead.

So a value N held before an outage that any process saw is never served after N returns, whether
or not the processes that wrote elsewhere are alive; a process that saw nothing serves N's old
values for at most ``refresh_s`` after the outage was published (then it treats N as away too).
The cost: one extra round trip per key first written on a stand-in in an outage, and a
returning node's keys miss for about ``settle_s``. Fleet fencing runs under ``remap`` and
``gutter`` only: under ``fail_fast`` nothing is ever written elsewhere.

Everything here is pure decisions plus flows (``refresh_flow``, ``publish_flow``,
``on_answered``): the executor that runs the prober does the I/O.
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Final, NamedTuple, Protocol

import mmh3

from shardcache._events import Events
from shardcache._flows import Call, Fanout, Flow
from shardcache._protocol import (
    RESERVED_PREFIX,
    Expect,
    delete,
    flush_all,
    meta_delete,
    retrieve,
    store,
    valid_wire,
)
from shardcache._reply_items import Meta, Value
from shardcache._router import Plan
from shardcache._topology import Node, Topology
from shardcache.errors import NodeError, NodeUnavailableError
from shardcache.health import UP, Event

__all__ = [
    "CLEAN", "DOWN", "RETURNING", "Fleet", "Mark", "clean_flow", "decode_mark", "encode_mark",
    "journal_flow", "journal_key", "journal_plan", "mark_key", "read_copies", "recorded", "stand_in_tag",
    "tagged",
]  # fmt: skip

DOWN: Final = 0
RETURNING: Final = 1
CLEAN: Final = 2
_STAGE_NAMES: Final = {DOWN: "down", RETURNING: "returning", CLEAN: "clean"}

MARK_PREFIX: Final = RESERVED_PREFIX  # shardcache's own keys: rebalance() leaves them alone
JOURNAL_PREFIX: Final = RESERVED_PREFIX + b"j."
_CHUNK: Final = 1000  # deletes per round trip when cleaning
_PASSES: Final = 3  # reads of the journals per clean, while they may still grow
# A returning node whose journals cannot be read (two other nodes down) waits this long for them,
# out of use, then is flushed: its counters and locks are lost, but it serves again.
_MAX_CLEAN_WAIT_S: Final = 60.0
_FUTURE_S: Final = 24 * 3600.0
_MARK_TTL_S: Final = 7 * 24 * 3600  # generations are wall-clock based: an expired mark loses nothing
_MARK_RE: Final = re.compile(rb"([0-9]{1,19}) ([012])")
_READERS: Final = 4  # holders read per refresh: one may be the node itself, some restarted empty


class Mark(NamedTuple):
    """One node's outage mark; ordered by generation, then stage."""

    gen: int
    stage: int

    def __str__(self) -> str:
        return f"{_STAGE_NAMES[self.stage]} (outage {self.gen})"


def _node_hash(node_id: str) -> bytes:
    return b"%032x" % mmh3.hash128(node_id.encode("utf-8", "surrogatepass"), signed=False)


def mark_key(node_id: str) -> bytes:
    """The reserved key holding ``node_id``'s mark (a hash: node ids may hold any character)."""
    return MARK_PREFIX + _node_hash(node_id)


def journal_key(node_id: str) -> bytes:
    """The reserved key listing the keys written in ``node_id``'s place on a stand-in."""
    return JOURNAL_PREFIX + _node_hash(node_id)


def encode_mark(mark: Mark) -> bytes:
    return b"%d %d" % (mark.gen, mark.stage)


def decode_mark(data: bytes) -> Mark | None:
    """A mark, or None for anything else (a hostile or foreign value is ignored, not trusted)."""
    found = _MARK_RE.fullmatch(data)
    return None if found is None else Mark(int(found.group(1)), int(found.group(2)))


class Fleet:
    """The fleet-wide rejoin fencing of one client; thread-safe (run by its prober thread).

    ``refresh_s``: how often marks are read; ``settle_s``: how long a returning node stays out of
    use before it is flushed. ``clock`` is monotonic; ``wall`` (seconds since the epoch) only
    makes generations.
    """

    def __init__(
        self,
        refresh_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.refresh_s = refresh_s
        self.settle_s = 2 * refresh_s + 0.2
        self._clock = clock
        self._wall = wall
        self._offset = (rng or random.Random()).randrange(1 << 30)  # spreads readers over holders
        self._next_refresh = float("-inf")
        self._lock = threading.Lock()
        self._first_read = threading.Event()  # set once the marks were read (or could not be)
        self._known: dict[str, Mark] = {}

    # -- reading marks ----------------------------------------------------------------------------

    def refresh_due(self) -> bool:
        return self._clock() >= self._next_refresh

    def seconds_until_refresh(self) -> float:
        return max(0.0, self._next_refresh - self._clock())

    def wait_first_read(self, timeout: float) -> bool:
        """Block until the marks have been read once (at most ``timeout``): a new process must
        know of an outage published before it started before its first request uses the node."""
        return self._first_read.wait(timeout)

    def refresh_flow(self, topology: Topology) -> Flow[bool]:
        """Read every node's mark from four ready nodes and apply the newest; False if none answered."""
        try:
            return (yield from self._refresh(topology))
        finally:
            self._first_read.set()

    def _refresh(self, topology: Topology) -> Flow[bool]:
        self._next_refresh = self._clock() + self.refresh_s
        nodes = list(topology.all_nodes())
        holders = sorted((n for n in nodes if n.ready), key=lambda n: n.node_id)
        if not holders or len(nodes) < 2:
            return False
        start = self._offset % len(holders)
        chosen = [holders[(start + i) % len(holders)] for i in range(min(_READERS, len(holders)))]
        keys = {mark_key(node.node_id): node for node in nodes}
        payload = retrieve(sorted(keys))
        jobs = {h.node_id: (h, (payload, [(Expect.VALUES, False)])) for h in chosen}
        results = yield Fanout(jobs, "read outage marks")
        held: dict[str, dict[str, Mark]] = {}  # holder id -> {node id: its mark there}
        for holder_id, result in results.items():
            if isinstance(result, NodeError) or not isinstance(result, list):
                continue
            held[holder_id] = marks = {}
            for item in result[0] if result and isinstance(result[0], list) else ():
                node = keys.get(item.key) if isinstance(item, Value) else None
                mark = decode_mark(item.data) if node is not None else None
                if node is not None and mark is not None and node.node_id != holder_id:
                    marks[node.node_id] = mark  # a node's own mark there is from before a restart
        newest: dict[str, Mark] = {}
        for marks in held.values():
            for node_id, mark in marks.items():
                if node_id not in newest or mark > newest[node_id]:
                    newest[node_id] = mark
        for node in nodes:
            mark = newest.get(node.node_id)
            if mark is not None:
                self.apply(node, mark)
        yield from self._repair(topology, held, newest)
        return bool(held)

    def _repair(
        self, topology: Topology, held: dict[str, dict[str, Mark]], newest: dict[str, Mark]
    ) -> Flow[None]:
        """Write an outage still under way back on a holder that lacks it (restarted empty since
        it was published), so that a process reading there learns of it too."""
        jobs = {}
        for holder_id, marks in held.items():
            missing = [
                (node_id, mark)
                for node_id, mark in newest.items()
                if mark.stage != CLEAN
                and node_id != holder_id
                and (node_id not in marks or marks[node_id] < mark)
            ]
            holder = topology.node(holder_id)
            if missing and holder is not None:
                payload = b"".join(
                    store(b"set", mark_key(n), encode_mark(m), 0, _MARK_TTL_S) for n, m in missing
                )
                jobs[holder_id] = (holder, (payload, [(Expect.STATUS, True)] * len(missing)))
        if jobs:
            yield Fanout(jobs, "repair outage marks")

    def known(self, node_id: str) -> Mark | None:
        """The newest mark this process knows for ``node_id`` (a node removed and added back gets
        it again: a new ``Node`` object must not forget an outage still under way)."""
        return self._known.get(node_id)

    def apply(self, node: Node, mark: Mark) -> bool:
        """Take ``mark`` into account if it is newer than what this process knows; True if it was.
        A generation more than a day ahead of this clock is ignored (forged, or a wild clock)."""
        if mark.gen > (self._wall() + _FUTURE_S) * 1000:
            return False
        with self._lock:
            seen = node.fleet_mark
            if seen is not None and mark <= seen:
                return False
            node.fleet_mark = mark
            self._known[node.node_id] = mark
            if mark.stage == RETURNING:
                node.fleet_returning_at = self._clock()
        if seen is None or mark.gen != seen.gen:
            node.forget_journaled()  # a new outage: its journals are new ones
        if mark.stage == DOWN:
            node.may_stand_in = True
            if node.health.state == UP:
                node.health.force_down(f"another process saw it fail ({mark})")
        elif mark.stage == RETURNING:
            node.may_stand_in = False  # a stand-in's copy would be newer than the flushed node
            if node.health.state == UP:
                node.health.force_down(f"returning after an outage ({mark}): out of use until flushed")
        else:
            node.may_stand_in = False  # flushed: whoever still has it down must miss, not stand in
            node.health.probe_soon()
        return True

    # -- writing marks ----------------------------------------------------------------------------

    def publish_pending(self, topology: Topology) -> Flow[None]:
        """Publish ``DOWN`` for every node this process marked down since the last step."""
        pending = [node for node in topology.all_nodes() if node.fleet_publish]
        if not pending:
            return
        yield from self.refresh_flow(topology)  # the newest generation, before making a new one
        for node in pending:
            node.fleet_publish = False
            seen = node.fleet_mark
            if seen is not None and seen.stage == DOWN:
                continue  # the fleet knows already: one outage, one generation
            gen = max(int(self._wall() * 1000), 0 if seen is None else seen.gen + 1)
            mark = Mark(gen, DOWN)
            self.apply(node, mark)
            yield from self.publish_flow(topology, node, mark)

    def publish_flow(self, topology: Topology, node: Node, mark: Mark) -> Flow[int]:
        """Write ``node``'s mark on every other ready node; how many took it (-1: there is no
        other ready node, so no process can read marks or stand in anywhere either)."""
        holders = [other for other in topology.all_nodes() if other is not node and other.ready]
        if not holders:
            return -1
        payload = store(b"set", mark_key(node.node_id), encode_mark(mark), 0, _MARK_TTL_S)
        jobs = {h.node_id: (h, (payload, [(Expect.STATUS, True)])) for h in holders}
        results = yield Fanout(jobs, f"publish outage mark of {node.node_id}")
        return sum(1 for r in results.values() if isinstance(r, list) and r == [b"STORED"])

    # -- readmission ------------------------------------------------------------------------------

    def on_answered(self, node: Node, topology: Topology) -> Flow[float]:
        """``node`` answered a probe: 0.0 if it may be readmitted now, else seconds to wait before
        probing again (it is returning; the flush comes once every process has stopped using it)."""
        yield from self.refresh_flow(topology)
        seen = node.fleet_mark
        if seen is None or seen.stage == CLEAN:
            return 0.0
        if seen.stage == DOWN or node.fleet_returning_at is None:
            returning = Mark(seen.gen, RETURNING)
            self.apply(node, returning)
            if (yield from self.publish_flow(topology, node, returning)) == 0:
                node.fleet_returning_at = None  # nobody else can know: publish it again first
                return self.refresh_s
            node.fleet_returning_at = self._clock()
            return self.settle_s
        waited = self._clock() - node.fleet_returning_at
        if waited < self.settle_s:
            return self.settle_s - waited
        give_up = waited >= self.settle_s + _MAX_CLEAN_WAIT_S
        if not (yield from clean_flow(node, topology, give_up=give_up)):
            return self.refresh_s
        clean = Mark(seen.gen, CLEAN)
        self.apply(node, clean)
        yield from self.publish_flow(topology, node, clean)
        return 0.0


# -- stand-in copies --------------------------------------------------------------------------------

STAND_IN_BIT: Final = 1 << 31
USER_FLAGS: Final = (1 << 16) - 1  # the flags a value may have to be written on a stand-in
_TAG_BITS: Final = 0xFFFF0000


def stand_in_tag(owner: Node) -> int:
    """The high flag bits of a copy written on a stand-in in ``owner``'s place now: a stand-in bit
    and the outage's generation, so that a stand-in serves only copies of the current outage,
    never a value it owned before a ring change nor a copy an earlier outage left behind."""
    mark = owner.fleet_mark
    gen = mark.gen % 32767 + 1 if mark is not None and mark.stage == DOWN else 0
    return STAND_IN_BIT | (gen << 16)


def tagged(owner: Node, flags: int) -> int | None:
    """``flags`` for a copy in ``owner``'s place; None if the value's own flags do not fit."""
    return None if flags > USER_FLAGS else flags | stand_in_tag(owner)


def read_copies(owner: Node, items: list[Any]) -> list[Any]:
    """The items of a stand-in's reply that are copies of this outage, their flags untagged."""
    tag = stand_in_tag(owner)
    return [
        item._replace(flags=item.flags & USER_FLAGS) if type(item) is Value else item
        for item in items
        if type(item) is not Value or item.flags & _TAG_BITS == tag
    ]


# -- journals ---------------------------------------------------------------------------------------


def _buddies(topology: Topology, owner: Node) -> dict[str, Node | None]:
    """For each node that may stand in for ``owner``: the second node its journal entries go to
    (the next node by id, other than ``owner``), so that one node restarting empty loses none."""
    others = sorted((n for n in topology.all_nodes() if n is not owner), key=lambda n: n.node_id)
    if len(others) < 2:
        return {n.node_id: None for n in others}
    return {n.node_id: others[(i + 1) % len(others)] for i, n in enumerate(others)}


def journal_flow(topology: Topology, entries: Iterable[tuple[Node, Node, bytes]]) -> Flow[set[bytes]]:
    """Record ``(owner, stand-in, wire)``: the wire is about to be written on the stand-in in the
    owner's place. The entry goes to the stand-in and to its buddy (there is none with fewer than
    three nodes), all in one round trip; the wires recorded on both (or earlier in this outage)
    are returned. A wire not returned must not be written (its buddy is down, or a holder
    refused)."""
    done: set[bytes] = set()
    todo: dict[str, tuple[Node, dict[str, list[bytes]]]] = {}
    placed: list[tuple[Node, bytes, list[str]]] = []
    buddies: dict[str, dict[str, Node | None]] = {}
    for owner, stand_in, wire in entries:
        if owner.journaled(stand_in.node_id, wire):
            done.add(wire)
            continue
        if owner.node_id not in buddies:
            buddies[owner.node_id] = _buddies(topology, owner)
        buddy = buddies[owner.node_id].get(stand_in.node_id)
        if buddy is not None and buddy.health.state != UP:
            continue  # on the stand-in alone the entry could be lost: not written (as fail_fast)
        holders = [stand_in] if buddy is None else [stand_in, buddy]
        for holder in holders:
            todo.setdefault(holder.node_id, (holder, {}))[1].setdefault(owner.node_id, []).append(wire)
        placed.append((owner, wire, [h.node_id for h in holders]))
    if not todo:
        return done
    jobs = {}
    for holder_id, (holder, by_owner) in todo.items():
        payload = b"".join(
            store(b"add", journal_key(owner_id), b"", 0, 0)
            + store(b"append", journal_key(owner_id), b" ".join(wires) + b" ", 0, 0)
            for owner_id, wires in by_owner.items()
        )
        jobs[holder_id] = (holder, (payload, [(Expect.STATUS, True)] * (2 * len(by_owner))))
    results = yield Fanout(jobs, "journal stand-in writes")
    stored: set[tuple[str, str]] = set()
    for holder_id, (_, by_owner) in todo.items():
        replies = results.get(holder_id)
        if isinstance(replies, list):
            stored.update((holder_id, o) for i, o in enumerate(by_owner) if replies[2 * i + 1] == b"STORED")
    for owner, wire, holder_ids in placed:
        if all((h, owner.node_id) in stored for h in holder_ids):
            owner.record_journaled(holder_ids[0], [wire])
            done.add(wire)
    return done


class Reporter(Protocol):
    """What :func:`recorded` needs of the client's core."""

    events: Events

    @property
    def topology(self) -> Topology: ...

    def swallowed(self, err: BaseException, *, reading: bool) -> bool: ...


def recorded(core: Reporter, owner: Node, stand_in: Node, wire: bytes, key: Any, what: str) -> Flow[bool]:
    """Before one write of ``owner``'s key on ``stand_in``: journal it. False (after raising,
    unless ``on_error="miss"``) if the journal could not take it: the write must not be made."""
    if wire in (yield from journal_flow(core.topology, [(owner, stand_in, wire)])):
        return True
    err = NodeUnavailableError(
        f"memcached node {owner.node_id} is down and stand-in {stand_in.node_id} could not journal "
        f"the {what} (unreachable, or the journal is full): not written",
        owner.node_id,
    )
    core.events.emit(Event("error", owner.node_id, str(err), err, key))
    if not core.swallowed(err, reading=False):
        raise err
    return False


def journal_plan(topology: Topology, plan: Plan, hashed: Iterable[tuple[Any, bytes, bytes]]) -> Flow[None]:
    """Before a multi-key write: journal the keys ``plan`` sends to stand-ins. Those the journal
    could not take are dropped from the plan (not written) and their owner is added to
    ``plan.down``, so the call reports them as it reports keys of a node that is down."""
    moved = plan.moved
    owners = {wire: topology.owner(hash_key) for _, hash_key, wire in hashed if wire in moved}
    groups = plan.groups
    entries = [(owners[w], plan.targets[t], w) for t, group in groups.items() for w in group if w in owners]
    done = yield from journal_flow(topology, entries)
    for target_id, group in list(plan.groups.items()):
        for wire in [w for w in group if w in owners and w not in done]:
            del group[wire]
            owner = owners[wire]
            plan.down.setdefault(
                owner.node_id,
                NodeUnavailableError(
                    f"memcached node {owner.node_id} is down and stand-in {target_id} could not journal "
                    "the write (unreachable, or the journal is full): not written",
                    owner.node_id,
                ),
            )
        if not group:
            del plan.groups[target_id], plan.targets[target_id]


def _journal_wires(data: bytes) -> set[bytes]:
    """The keys a journal lists; anything that is not a valid key is dropped, never sent back."""
    return {wire for wire in data.split(b" ") if valid_wire(wire)}


def clean_flow(node: Node, topology: Topology, *, give_up: bool = False) -> Flow[bool]:
    """Make returning ``node`` forget every key written elsewhere in its place, as its journals on
    the other nodes list them, and remove those copies and journals. An entry is on two nodes when
    there are three or more, so one unreadable node loses nothing; with more (or, with two nodes,
    the other one), False: wait for them, or with ``give_up`` flush ``node`` instead. A journal
    that grew while it was applied is read again; it is deleted only unchanged (CAS).
    False if it could not be done."""
    others = [other for other in topology.all_nodes() if other is not node]
    key = journal_key(node.node_id)
    tolerated = 1 if len(others) >= 2 else 0
    cleaned: set[bytes] = set()
    for _ in range(_PASSES):
        journals = yield from _read_journals(others, key)
        if len(others) - len(journals) > tolerated:
            return (yield from _flush(node, others)) if give_up else False
        wires = sorted(set().union(*(listed for listed, _ in journals.values())) - cleaned)
        if (
            wires
            and not (yield from _delete_all({node.node_id: (node, wires)}, "clean after an outage"))[
                node.node_id
            ]
        ):
            return False
        cleaned.update(wires)
        copies = {
            holder_id: (holder, sorted(listed))
            for holder_id, (listed, _) in journals.items()
            if listed and (holder := topology.node(holder_id)) is not None
        }
        yield from _delete_all(copies, "remove stand-in copies")  # best effort: what is left expires
        drop = {
            h: (n, (meta_delete(key, cas=cas), [(Expect.META, False)]))
            for h, (_, cas) in journals.items()
            if cas is not None and (n := topology.node(h)) is not None
        }
        results = (yield Fanout(drop, "delete journals")) if drop else {}
        if all(
            isinstance(r, list) and isinstance(r[0], Meta) and r[0].status != b"EX" for r in results.values()
        ):
            return (yield from _drop_leftovers(node, others))
    return False  # journals still growing: not clean yet


def _drop_leftovers(node: Node, others: list[Node]) -> Flow[bool]:
    """``node`` may hold copies it took in another node's place, and their journal, from an
    outage of that node cleaned while ``node`` was away (the cleaner could not reach it): they
    are outdated. Delete them, for every node whose outage is over, before ``node`` serves again."""
    over = [o for o in others if o.fleet_mark is None or o.fleet_mark.stage == CLEAN]
    if not over:
        return True
    keys = [journal_key(o.node_id) for o in over]
    try:
        found = yield Call(node, retrieve(keys, cas=True), Expect.CAS_VALUES, "read leftover journals")
    except NodeError:
        return False
    items = [v for v in found if isinstance(v, Value)] if isinstance(found, list) else []
    wires = sorted(set().union(*(_journal_wires(v.data) for v in items)))
    work = {node.node_id: (node, wires)}
    if wires and not (yield from _delete_all(work, "remove leftover copies"))[node.node_id]:
        return False
    drops = [meta_delete(v.key, cas=v.cas) for v in items if v.cas is not None]
    if drops:
        job = (b"".join(drops), [(Expect.META, False)] * len(drops))
        yield Fanout({node.node_id: (node, job)}, "delete leftover journals")
    return True


def _read_journals(others: list[Node], key: bytes) -> Flow[dict[str, tuple[set[bytes], int | None]]]:
    """``{holder id: (keys listed, CAS of the journal or None if absent)}`` of the readable nodes."""
    read = {
        o.node_id: (o, (retrieve([key], cas=True), [(Expect.CAS_VALUES, False)]))
        for o in others
        if o.health.state == UP
    }
    results = (yield Fanout(read, "read journals")) if read else {}
    journals: dict[str, tuple[set[bytes], int | None]] = {}
    for holder_id, result in results.items():
        if isinstance(result, list) and result and isinstance(result[0], list):
            found = [v for v in result[0] if isinstance(v, Value)]
            journals[holder_id] = (
                set().union(*(_journal_wires(v.data) for v in found)),
                found[0].cas if found else None,
            )
    return journals


def _flush(node: Node, others: list[Node]) -> Flow[bool]:
    """The last resort of a clean: forget everything (counters and locks included), except the
    marks and journals ``node`` holds for the other nodes, which are read first and put back."""
    kept = [k for o in others for k in (mark_key(o.node_id), journal_key(o.node_id))]
    try:
        found = yield Call(node, retrieve(kept), Expect.VALUES, "read what a flush must keep")
        reply = yield Call(node, flush_all(0), Expect.OK, "flush after an outage (journals unreadable)")
        if reply != b"OK" or not isinstance(found, list):
            return False
        items = [v for v in found if isinstance(v, Value)]
        if items:
            payload = b"".join(store(b"set", v.key, v.data, 0, 0) for v in items)
            yield Fanout({node.node_id: (node, (payload, [(Expect.STATUS, True)] * len(items)))}, "restore")
    except NodeError:
        return False
    node.forget_flushed()
    return True  # the copies stay on the stand-ins, recorded in their journals, until their TTL


def _delete_all(work: dict[str, tuple[Node, list[bytes]]], what: str) -> Flow[dict[str, bool]]:
    """Delete each node's keys, ``_CHUNK`` per round trip, all nodes at once; which nodes did."""
    done = {node_id: True for node_id in work}
    for start in range(0, max((len(wires) for _, wires in work.values()), default=0), _CHUNK):
        jobs = {}
        for node_id, (node, wires) in work.items():
            chunk = wires[start : start + _CHUNK]
            if chunk and done[node_id]:
                jobs[node_id] = (
                    node,
                    (b"".join(delete(w) for w in chunk), [(Expect.STATUS, False)] * len(chunk)),
                )
        results = (yield Fanout(jobs, what)) if jobs else {}
        for node_id, result in results.items():
            done[node_id] = done[node_id] and isinstance(result, list)
    return done
