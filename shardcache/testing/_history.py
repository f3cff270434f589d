"""A history checker in the spirit of Jepsen: operations logged by many processes, judged afterwards.

Pure: no sockets, no clock. A history is a list of :class:`Op` (one call, with the time it started
and ended and what it returned), the nemesis' :class:`Fault` events, and the counters' final values
read once every node was healthy again. :func:`check_history` applies three rules and returns a
:class:`HistoryReport` (text and JSON):

- **registers** (``set``/``delete``/``get``; every value written is unique): a read may return any
  write that was not *strictly superseded* before the read began. It violates if it returns a value
  never written (``unknown_value``), a value whose write started after the read ended
  (``future_read``), or a value W while an acknowledged write or delete W2 of the key started after
  W was acknowledged and was itself acknowledged before the read started (``stale_read``; its
  ``scope`` says whether W2 came from the reading process, which docs/consistency.md guarantees, or
  from another one). A miss is never a violation (a cache may lose data): the miss rate is reported.
  Failed and ambiguous writes *may* have happened, at any time after they started: they justify a
  read and never supersede one.
- **counters** (``incr``, ``cas_update``; keys disjoint from the registers): every acknowledged
  result is unique (``duplicate_result``: two increments saw the same value, one update was lost);
  results never go backwards in real time (``non_monotonic``: A ended before B started and B's
  result is not above A's); the final value lies in ``[acked, acked + ambiguous]``
  (``lost_increments`` below, ``extra_increments`` above).
- **locks** (``acquire``/``release``, paired by the holder id in ``arg``): a holder surely holds the
  lock from the end of its acknowledged acquire to the start of its release, or until the lock's
  TTL (minus ``ttl_slack_ns``: memcached expires on its one-second clock) ran out; two holders'
  sure intervals on the same name never overlap (``double_holder``).

A node killed and restarted comes back empty: counters and locks on it restart. An anomaly on a key
that one of its calls was routed to such a node (``Op.node``) during the anomaly's span is filed as
*data loss* (``HistoryReport.explained``), not as a violation: memcached is a cache, it loses data.

The consistency model allows one kind of stale read, for a bounded time (docs/consistency.md): a
process that has not yet learnt that another one saw a node fail may read the node while the other
writes its keys to a stand-in. Given when processes marked nodes down (``History.detections``)
and the bound, such reads are filed with the explained anomalies (``explained_by.kind ==
"detected"``), counted apart, never hidden.

Times are integers in nanoseconds from ``time.clock_gettime_ns(time.CLOCK_MONOTONIC)``, one clock for
all the processes of a Linux machine (``time.monotonic()`` is not comparable across processes).
"""

from __future__ import annotations

import bisect
import dataclasses
import enum
import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = ["Fault", "History", "HistoryReport", "Op", "Outcome", "Violation", "check_history", "load_history"]

REGISTER_KINDS = frozenset({"set", "delete", "get"})
COUNTER_KINDS = frozenset({"incr", "cas_update"})
LOCK_KINDS = frozenset({"acquire", "release"})
WIPE_KINDS = frozenset({"kill"})  # faults after which a node restarts empty
NEVER = 2**63  # the end of an operation that never completed (its process was killed)
_EXAMPLES = 5  # offending operations kept per rule in the report


class Outcome(str, enum.Enum):
    """What a call returned: a value (``ok``), nothing (``miss``), a definite refusal (``failed``:
    not stored, conflict, lock not taken), or an error after which it may or may not have happened
    (``ambiguous``: a timeout, a connection lost, a process killed mid-call)."""

    OK = "ok"
    MISS = "miss"
    FAILED = "failed"
    AMBIGUOUS = "ambiguous"


@dataclasses.dataclass(frozen=True, slots=True)
class Op:
    """One call. ``arg``: the value written, the delta, or the lock holder id; ``value``: the value
    read, the counter's new value, or None. ``node``: the key's node in the caller's ring when the
    call started (None if unknown). ``end_ns`` is :data:`NEVER` for a call that never returned."""

    process: str
    thread: int
    kind: str
    key: str
    start_ns: int
    end_ns: int
    outcome: Outcome
    arg: Any = None
    value: Any = None
    node: str | None = None

    @property
    def acked(self) -> bool:
        return self.outcome is Outcome.OK

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["outcome"] = self.outcome.value
        if self.end_ns == NEVER:
            data["end_ns"] = None
        return data


@dataclasses.dataclass(frozen=True, slots=True)
class Fault:
    """A nemesis event: ``kind`` (kill, pause, blackhole, add, remove, reweight, worker-kill...),
    the node or process it hit, and when it started and ended."""

    kind: str
    target: str
    start_ns: int
    end_ns: int
    detail: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class History:
    """Everything the checker judges. ``finals``: counter key -> value read after the run (None:
    absent). ``lock_ttl_ns``: the TTL every lock was taken with."""

    ops: Sequence[Op]
    faults: Sequence[Fault] = ()
    finals: dict[str, int | None] = dataclasses.field(default_factory=dict)
    lock_ttl_ns: int = 10 * 10**9
    ttl_slack_ns: int = 10**9
    #: when some process marked a node down (kind ``"detected"``, target the node), and the bound
    #: docs/consistency.md states for the others to learn it (fleet fencing: one refresh period):
    #: a cross-process stale read of a key of that node within the bound is filed as bounded.
    detections: Sequence[Fault] = ()
    detection_bound_ns: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class Violation:
    """A broken rule on one key, with the operations that show it."""

    rule: str
    key: str
    message: str
    ops: tuple[Op, ...]
    scope: str = ""
    explained_by: Fault | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"rule": self.rule, "key": self.key, "message": self.message}
        if self.scope:
            data["scope"] = self.scope
        if self.explained_by is not None:
            data["explained_by"] = dataclasses.asdict(self.explained_by)
        data["ops"] = [op.to_json() for op in self.ops]
        return data


@dataclasses.dataclass(slots=True)
class HistoryReport:
    """The checker's verdict: ``violations`` (rules broken), ``explained`` (anomalies a node restart
    accounts for, or stale reads within the bound the model states; ``explained_by`` says which),
    counts per operation kind and outcome, and the read miss rate."""

    counts: dict[str, dict[str, int]]
    violations: list[Violation]
    explained: list[Violation]
    faults: list[Fault]
    reads: int
    read_misses: int
    counters: dict[str, dict[str, Any]]

    @property
    def ok(self) -> bool:
        return not self.violations

    @property
    def ops(self) -> int:
        return sum(sum(by_outcome.values()) for by_outcome in self.counts.values())

    @property
    def read_hits(self) -> int:
        return self.reads - self.read_misses

    def violation_counts(self) -> dict[str, int]:
        """``rule`` (``rule/scope`` where a scope is set) -> number of violations."""
        return dict(Counter(_label(v) for v in self.violations))

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "ops": self.ops,
            "counts": self.counts,
            "reads": self.reads,
            "read_misses": self.read_misses,
            "violation_counts": self.violation_counts(),
            "explained_counts": dict(Counter(_label(v) for v in self.explained)),
            "bounded": sum(1 for v in self.explained if v.explained_by and v.explained_by.kind == "detected"),
            "violations": [v.to_json() for v in _examples(self.violations)],
            "explained": [v.to_json() for v in _examples(self.explained)],
            "faults": [dataclasses.asdict(f) for f in self.faults],
            "counters": self.counters,
        }

    def to_text(self) -> str:
        lines = [f"history: {self.ops} operations, {len(self.faults)} faults"]
        for kind in sorted(self.counts):
            parts = ", ".join(f"{o} {n}" for o, n in sorted(self.counts[kind].items()))
            lines.append(f"  {kind:<10} {parts}")
        rate = self.read_misses / self.reads if self.reads else 0.0
        lines.append(f"reads: {self.reads}, misses {self.read_misses} ({rate:.1%})")
        faults = Counter(f.kind for f in self.faults)
        lines.append("faults: " + (", ".join(f"{k} {n}" for k, n in sorted(faults.items())) or "none"))
        sections = (
            ("VIOLATIONS", self.violations),
            (
                "explained (a node restart, or within the stated bound after a node was seen down)",
                self.explained,
            ),
        )
        for title, found in sections:
            lines.append(f"{title}: {len(found)}")
            counts = Counter(_label(v) for v in found)
            lines.extend(f"  {label}: {n}" for label, n in sorted(counts.items()))
            for v in _examples(found):
                lines.append(f"  - [{_label(v)}] {v.key}: {v.message}")
                lines.extend(f"      {_describe(op)}" for op in v.ops)
        return "\n".join(lines)


def _label(v: Violation) -> str:
    return f"{v.rule}/{v.scope}" if v.scope else v.rule


def _examples(found: list[Violation]) -> Iterator[Violation]:
    seen: Counter[str] = Counter()
    for v in found:
        seen[_label(v)] += 1
        if seen[_label(v)] <= _EXAMPLES:
            yield v


def _describe(op: Op) -> str:
    end = "never" if op.end_ns == NEVER else f"{op.end_ns / 1e9:.6f}"
    got = f" -> {op.value!r}" if op.value is not None else ""
    arg = f"({op.arg!r})" if op.arg is not None else ""
    node = f" on {op.node}" if op.node else ""
    return (
        f"{op.process}/{op.thread} {op.kind} {op.key}{arg} [{op.start_ns / 1e9:.6f} .. {end}] "
        f"{op.outcome.value}{got}{node}"
    )


# -- the rules -----------------------------------------------------------------------------------


def check_history(history: History) -> HistoryReport:
    """Apply every rule to ``history`` (see the module docstring)."""
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    by_key: dict[str, list[Op]] = defaultdict(list)
    for op in history.ops:
        counts[op.kind][op.outcome.value] += 1
        by_key[op.key].append(op)
    wipes = _Wipes(history.faults)
    bounded = _Detections(history.detections, history.detection_bound_ns)
    found: list[Violation] = []
    counters: dict[str, dict[str, Any]] = {}
    for key, ops in sorted(by_key.items()):
        kinds = {op.kind for op in ops}
        if kinds & REGISTER_KINDS:
            found.extend(bounded.explain(v) for v in _check_register(key, ops))
        if kinds & COUNTER_KINDS:
            summary, anomalies = _check_counter(key, ops, history.finals.get(key))
            counters[key] = summary
            found.extend(wipes.explain(v) for v in anomalies)
        if kinds & LOCK_KINDS:
            ttl = history.lock_ttl_ns - history.ttl_slack_ns
            found.extend(wipes.explain(v) for v in _check_lock(key, ops, ttl))
    reads = [op for op in history.ops if op.kind == "get" and op.outcome is not Outcome.FAILED]
    return HistoryReport(
        counts={kind: dict(c) for kind, c in sorted(counts.items())},
        violations=[v for v in found if v.explained_by is None],
        explained=[v for v in found if v.explained_by is not None],
        faults=sorted(history.faults, key=lambda f: f.start_ns),
        reads=len(reads),
        read_misses=sum(op.outcome is Outcome.MISS for op in reads),
        counters=counters,
    )


class _Wipes:
    """Kills (a node restarts empty) by node, to explain counter and lock anomalies."""

    def __init__(self, faults: Iterable[Fault]) -> None:
        self._by_node: dict[str, list[Fault]] = defaultdict(list)
        for fault in sorted(faults, key=lambda f: f.start_ns):
            if fault.kind in WIPE_KINDS:
                self._by_node[fault.target].append(fault)

    def explain(self, v: Violation) -> Violation:
        nodes = {op.node for op in v.ops if op.node is not None}
        lo = min(op.start_ns for op in v.ops)
        # a count lost at any time after the first update shows only in the final read
        hi = NEVER if v.rule == "lost_increments" else max(op.end_ns for op in v.ops)
        for node in sorted(nodes):
            for fault in self._by_node.get(node, ()):
                if lo <= fault.start_ns <= hi:
                    return dataclasses.replace(v, explained_by=fault)
        return v


class _Detections:
    """When processes marked each node down, to file the stale reads the consistency model allows:
    a process that has not yet learnt that another one saw the key's node fail reads the node while
    the other writes to a stand-in, for at most the stated bound."""

    def __init__(self, detections: Iterable[Fault], bound_ns: int) -> None:
        self._bound = bound_ns
        self._by_node: dict[str, list[int]] = defaultdict(list)
        for d in detections:
            self._by_node[d.target].append(d.start_ns)
        for times in self._by_node.values():
            times.sort()

    def explain(self, v: Violation) -> Violation:
        if v.rule != "stale_read" or v.scope != "cross_process" or not self._bound:
            return v
        read = v.ops[0]
        times = self._by_node.get(read.node or "", [])
        i = bisect.bisect_right(times, read.start_ns)
        if i and read.start_ns - times[i - 1] <= self._bound:
            fault = Fault(
                "detected", read.node or "", times[i - 1], times[i - 1] + self._bound, "within the bound"
            )
            return dataclasses.replace(v, explained_by=fault)
        return v


def _check_register(key: str, ops: list[Op]) -> Iterator[Violation]:
    writes = [op for op in ops if op.kind in ("set", "delete")]
    by_value = {op.arg: op for op in writes if op.kind == "set"}
    acked = sorted((op for op in writes if op.acked), key=lambda op: op.end_ns)
    ends = [op.end_ns for op in acked]
    latest: list[Op] = []  # latest[i]: the acked write with the greatest start among acked[: i + 1]
    for op in acked:
        latest.append(op if not latest or op.start_ns > latest[-1].start_ns else latest[-1])
    for read in ops:
        if read.kind != "get" or read.outcome is not Outcome.OK:
            continue
        write = by_value.get(read.value)
        if write is None:
            yield Violation("unknown_value", key, f"read {read.value!r}, never written", (read,))
            continue
        if write.start_ns > read.end_ns:
            yield Violation("future_read", key, "read a value written after the read ended", (read, write))
            continue
        if not write.acked:
            continue  # may have landed at any time after it started: never superseded
        i = bisect.bisect_left(ends, read.start_ns) - 1  # acked writes that ended before the read
        if i >= 0 and latest[i].start_ns > write.end_ns:
            newer = latest[i]
            what = "deleted" if newer.kind == "delete" else f"overwritten with {newer.arg!r}"
            scope = "same_process" if newer.process == read.process else "cross_process"
            yield Violation(
                "stale_read", key, f"read {read.value!r}, {what} before the read began",
                (read, write, newer), scope,
            )  # fmt: skip


def _check_counter(key: str, ops: list[Op], final: int | None) -> tuple[dict[str, Any], list[Violation]]:
    acked = [op for op in ops if op.kind in COUNTER_KINDS and op.acked]
    unsure = [op for op in ops if op.kind in COUNTER_KINDS and op.outcome is Outcome.AMBIGUOUS]
    found: list[Violation] = []
    by_result: dict[Any, list[Op]] = defaultdict(list)
    for op in acked:
        by_result[op.value].append(op)
    for value, same in sorted(by_result.items(), key=lambda item: str(item[0])):
        if len(same) > 1:
            message = f"{len(same)} updates returned {value!r}"
            found.append(Violation("duplicate_result", key, message, tuple(same)))
    found.extend(_backwards(key, acked))
    total = sum(int(op.arg) if op.kind == "incr" else 1 for op in acked)
    extra = sum(int(op.arg) if op.kind == "incr" else 1 for op in unsure)
    seen = final or 0
    summary = {"final": final, "acked": total, "ambiguous": extra, "ops": len(acked) + len(unsure)}
    if acked and seen < total:
        first = min(acked, key=lambda op: op.start_ns)
        last = max(acked, key=lambda op: op.end_ns)
        found.append(
            Violation("lost_increments", key, f"final {final!r} < {total} acknowledged", (first, last))
        )
    if seen > total + extra:
        last = max(acked, key=lambda op: op.end_ns)
        found.append(
            Violation("extra_increments", key, f"final {seen} > {total} acked + {extra} ambiguous", (last,))
        )
    return summary, found


def _backwards(key: str, acked: list[Op]) -> Iterator[Violation]:
    """Results that are not above the result of an update that ended before they started."""
    done = sorted(acked, key=lambda op: op.end_ns)
    ends = [op.end_ns for op in done]
    best: list[Op] = []  # best[i]: the greatest result among done[: i + 1]
    for op in done:
        best.append(op if not best or op.value > best[-1].value else best[-1])
    for op in acked:
        i = bisect.bisect_left(ends, op.start_ns) - 1
        if i >= 0 and best[i].value >= op.value:
            yield Violation(
                "non_monotonic", key,
                f"returned {op.value!r} after an update that had returned {best[i].value!r}", (best[i], op),
            )  # fmt: skip


def _check_lock(key: str, ops: list[Op], ttl_ns: int) -> Iterator[Violation]:
    releases = {(op.process, op.arg): op for op in ops if op.kind == "release"}
    holds: list[tuple[int, int, Op, Op | None]] = []
    for acq in ops:
        if acq.kind != "acquire" or not acq.acked:
            continue
        rel = releases.get((acq.process, acq.arg))
        until = min(rel.start_ns if rel is not None else NEVER, acq.start_ns + ttl_ns)
        if until > acq.end_ns:
            holds.append((acq.end_ns, until, acq, rel))
    holds.sort(key=lambda h: (h[0], h[1]))
    widest: tuple[int, int, Op, Op | None] | None = None
    for hold in holds:
        if widest is not None and hold[0] < widest[1] and hold[2].arg != widest[2].arg:
            shown = tuple(op for op in (widest[2], widest[3], hold[2], hold[3]) if op is not None)
            yield Violation(
                "double_holder", key,
                f"{hold[2].arg} acquired while {widest[2].arg} held it "
                f"({(widest[1] - hold[0]) / 1e6:.1f} ms overlap)", shown,
            )  # fmt: skip
        if widest is None or hold[1] > widest[1]:
            widest = hold


# -- reading a history from disk ------------------------------------------------------------------


def load_history(directory: str | Path) -> History:
    """Read a run's directory: ``ops-*.jsonl`` (one per worker process: an ``invoke`` line
    ``{"i": id, "p", "th", "k", "key", "arg", "s", "n"}`` before each call and a completion line
    ``{"c": id, "e", "o", "v"}`` after it; an invoke without completion never returned),
    ``faults.jsonl`` (one :class:`Fault` per line) and ``run.json`` (``finals``, ``lock_ttl_s``)."""
    root = Path(directory)
    ops: list[Op] = []
    for path in sorted(root.glob("ops-*.jsonl")):
        ops.extend(_load_ops(path))
    faults = []
    if (root / "faults.jsonl").exists():
        for line in _lines(root / "faults.jsonl"):
            faults.append(Fault(**line))
    meta: dict[str, Any] = {}
    if (root / "run.json").exists():
        meta = json.loads((root / "run.json").read_text(encoding="utf-8"))
    detections = []
    for path in sorted(root.glob("worker-*.log")):  # "<ns> node_down <node> <detail>" trace lines
        for text in path.read_text(encoding="utf-8", errors="replace").splitlines():
            parts = text.split(" ", 3)
            if len(parts) >= 3 and parts[1] == "node_down" and parts[0].isdigit():
                detections.append(Fault("detected", parts[2], int(parts[0]), int(parts[0])))
    return History(
        ops=ops,
        faults=faults,
        finals=dict(meta.get("finals", {})),
        lock_ttl_ns=int(float(meta.get("lock_ttl_s", 10)) * 1e9),
        detections=detections,
        detection_bound_ns=int(float(meta.get("detection_bound_s", 0)) * 1e9),
    )


def _lines(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.endswith("\n"):  # a process killed mid-write leaves a partial last line
                yield json.loads(line)


def _load_ops(path: Path) -> list[Op]:
    invoked: dict[int, dict[str, Any]] = {}
    done: dict[int, dict[str, Any]] = {}
    for line in _lines(path):
        if "i" in line:
            invoked[line["i"]] = line
        else:
            done[line["c"]] = line
    ops = []
    for op_id, inv in invoked.items():
        end = done.get(op_id)
        op = Op(
            process=inv["p"], thread=inv["th"], kind=inv["k"], key=inv["key"], start_ns=inv["s"],
            end_ns=end["e"] if end else NEVER,
            outcome=Outcome(end["o"]) if end else Outcome.AMBIGUOUS,
            arg=inv.get("arg"), value=end.get("v") if end else None, node=inv.get("n"),
        )  # fmt: skip
        ops.append(op)
    return ops
