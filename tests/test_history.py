"""The history checker (shardcache.testing._history) on synthetic histories: each rule passes a clean
history and catches a crafted violation; concurrency, failed and ambiguous calls are judged as the
model says. Times below are milliseconds, converted to the checker's nanoseconds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from shardcache.testing import Fault, History, Op, Outcome, check_history, load_history
from shardcache.testing._history import NEVER

OK, MISS, FAILED, AMBIGUOUS = Outcome.OK, Outcome.MISS, Outcome.FAILED, Outcome.AMBIGUOUS
MS = 1_000_000


def op(kind: str, key: str, start: float, end: float | None, outcome: Outcome = OK, **kw: Any) -> Op:
    return Op(
        process=kw.pop("process", "p0"), thread=kw.pop("thread", 0), kind=kind, key=key,
        start_ns=int(start * MS), end_ns=NEVER if end is None else int(end * MS), outcome=outcome, **kw,
    )  # fmt: skip


def rules(history: History) -> list[str]:
    return sorted(v.rule for v in check_history(history).violations)


# -- registers ------------------------------------------------------------------------------------


def test_reads_of_the_latest_write_and_misses_pass() -> None:
    ops = [
        op("set", "k", 0, 1, arg="a"),
        op("get", "k", 2, 3, value="a"),
        op("set", "k", 4, 5, arg="b", process="p1"),
        op("get", "k", 6, 7, MISS),
        op("get", "k", 8, 9, value="b"),
    ]
    report = check_history(History(ops))
    assert report.ok
    assert (report.reads, report.read_misses, report.read_hits) == (3, 1, 2)


def test_a_read_of_a_superseded_value_is_stale_and_says_which_process_wrote_the_newer_one() -> None:
    ops = [
        op("set", "k", 0, 1, arg="a"),
        op("set", "k", 2, 3, arg="b", process="p1"),
        op("get", "k", 4, 5, value="a"),
        op("get", "k", 4, 5, value="a", process="p1"),
    ]
    found = check_history(History(ops)).violations
    assert [(v.rule, v.scope) for v in found] == [
        ("stale_read", "cross_process"),
        ("stale_read", "same_process"),
    ]
    assert found[0].ops[2].arg == "b"


def test_a_cross_process_stale_read_soon_after_its_node_was_seen_down_is_bounded_not_hidden() -> None:
    def history(read_at: float, reader: str = "p0") -> History:
        ops = [
            op("set", "k", 0, 1, arg="a", node="n1"),
            op("set", "k", 12, 13, arg="b", process="p1", node="n1"),  # on a stand-in: p1 saw n1 down
            op("get", "k", read_at, read_at + 1, value="a", node="n1", process=reader),
        ]
        seen = [Fault("detected", "n1", 10 * MS, 10 * MS)]
        return History(ops, detections=seen, detection_bound_ns=750 * MS)

    within = check_history(history(700))
    assert within.ok and within.to_json()["bounded"] == 1
    cause = within.explained[0].explained_by
    assert cause is not None and cause.kind == "detected"
    assert rules(history(761)) == ["stale_read"]  # past the bound: a violation
    assert rules(history(700, reader="p1")) == ["stale_read"]  # never after the reader's own write


def test_a_read_of_a_deleted_value_is_stale() -> None:
    ops = [op("set", "k", 0, 1, arg="a"), op("delete", "k", 2, 3), op("get", "k", 4, 5, value="a")]
    assert rules(History(ops)) == ["stale_read"]


def test_concurrent_writes_may_be_read_in_either_order() -> None:
    ops = [
        op("set", "k", 0, 10, arg="a"),
        op("set", "k", 5, 8, arg="b", process="p1"),  # started before "a" was acknowledged
        op("get", "k", 11, 12, value="a"),
        op("get", "k", 11, 12, value="b", process="p2"),
    ]
    assert rules(History(ops)) == []


def test_a_write_acknowledged_after_the_read_began_does_not_supersede() -> None:
    ops = [op("set", "k", 0, 1, arg="a"), op("set", "k", 2, 6, arg="b"), op("get", "k", 5, 7, value="a")]
    assert rules(History(ops)) == []


def test_failed_and_ambiguous_writes_justify_reads_and_never_supersede() -> None:
    ops = [
        op("set", "k", 0, 1, arg="a"),
        op("set", "k", 2, 3, AMBIGUOUS, arg="b"),
        op("set", "k", 4, None, arg="c"),  # its process was killed mid-call
        op("delete", "k", 4, 5, FAILED),
        op("get", "k", 6, 7, value="a"),
        op("get", "k", 8, 9, value="b"),
        op("get", "k", 10, 11, value="c"),
        op("get", "k", 12, 13, value="a"),  # "b" and "c" may never have happened
    ]
    assert rules(History(ops)) == []


def test_values_never_written_or_written_after_the_read_are_violations() -> None:
    ops = [
        op("get", "k", 0, 1, value="ghost"),
        op("get", "k", 2, 3, value="later"),
        op("set", "k", 4, 5, arg="later"),
    ]
    assert rules(History(ops)) == ["future_read", "unknown_value"]


# -- counters -------------------------------------------------------------------------------------


def counter(results: list[tuple[float, float, Outcome, int | None]], kind: str = "incr") -> list[Op]:
    return [op(kind, "c", s, e, o, arg=1, value=v, thread=i) for i, (s, e, o, v) in enumerate(results)]


def test_a_counter_equal_to_its_acknowledged_increments_passes() -> None:
    ops = counter([(0, 1, OK, 1), (2, 4, OK, 2), (3, 5, OK, 3)])
    report = check_history(History(ops, finals={"c": 3}))
    assert report.ok
    assert report.counters["c"] == {"final": 3, "acked": 3, "ambiguous": 0, "ops": 3}


def test_ambiguous_increments_bound_the_final_value_from_above_only() -> None:
    ops = counter([(0, 1, OK, 1), (2, 3, AMBIGUOUS, None), (4, None, AMBIGUOUS, None)])
    assert rules(History(ops, finals={"c": 1})) == []
    assert rules(History(ops, finals={"c": 3})) == []
    assert rules(History(ops, finals={"c": 4})) == ["extra_increments"]
    assert rules(History(ops, finals={"c": 0})) == ["lost_increments"]
    assert rules(History(ops, finals={"c": None})) == ["lost_increments"]


def test_two_increments_returning_the_same_value_are_a_lost_update() -> None:
    ops = counter([(0, 3, OK, 1), (1, 2, OK, 1)], kind="cas_update")
    assert rules(History(ops, finals={"c": 2})) == ["duplicate_result"]


def test_a_counter_going_backwards_in_real_time_is_caught() -> None:
    ops = counter([(0, 1, OK, 5), (2, 3, OK, 1)])
    assert "non_monotonic" in rules(History(ops, finals={"c": 5}))


def test_a_counter_reset_by_a_node_restart_is_data_loss_not_a_violation() -> None:
    ops = [
        op("incr", "c", 0, 1, arg=1, value=1, node="n1"),
        op("incr", "c", 4, 5, arg=1, value=1, node="n1"),
    ]
    kill = Fault("kill", "n1", 2 * MS, 3 * MS)
    report = check_history(History(ops, faults=[kill], finals={"c": 1}))
    assert report.ok
    assert sorted(v.rule for v in report.explained) == [
        "duplicate_result",
        "lost_increments",
        "non_monotonic",
    ]
    assert all(v.explained_by == kill for v in report.explained)
    other = Fault("kill", "n2", 2 * MS, 3 * MS)  # another node's restart explains nothing
    assert not check_history(History(ops, faults=[other], finals={"c": 1})).ok


# -- locks ----------------------------------------------------------------------------------------


def hold(holder: str, acquired: tuple[float, float], released: tuple[float, float] | None) -> list[Op]:
    ops = [op("acquire", "l", *acquired, arg=holder, process=holder, node="n1")]
    if released is not None:
        ops.append(op("release", "l", *released, arg=holder, process=holder, value=True))
    return ops


def test_successive_holders_pass_and_overlapping_ones_are_caught() -> None:
    clean = hold("a", (0, 1), (5, 6)) + hold(
        "b", (2, 5.5), (8, 9)
    )  # b's acquire ended after a's release began
    assert rules(History(clean)) == []
    double = hold("a", (0, 1), (5, 6)) + hold("b", (2, 3), (8, 9))
    found = check_history(History(double)).violations
    assert [v.rule for v in found] == ["double_holder"]
    assert {o.arg for o in found[0].ops} == {"a", "b"}


def test_a_hold_past_the_lock_ttl_or_an_unacknowledged_acquire_is_not_a_double_holder() -> None:
    expired = hold("a", (0, 1), None) + hold("b", (30, 31), (32, 33))  # a's process died holding it
    assert rules(History(expired, lock_ttl_ns=20 * MS, ttl_slack_ns=5 * MS)) == []
    assert rules(History(expired, lock_ttl_ns=40 * MS, ttl_slack_ns=5 * MS)) == ["double_holder"]
    ops = [op("acquire", "l", 0, 1, AMBIGUOUS, arg="a", process="a"), *hold("b", (2, 3), (4, 5))]
    assert rules(History(ops)) == []


# -- report and loading ---------------------------------------------------------------------------


def test_the_report_counts_kinds_and_renders_as_text_and_json() -> None:
    ops = [op("set", "k", 0, 1, arg="a"), op("set", "k", 2, 3, arg="b"), op("get", "k", 4, 5, value="a")]
    report = check_history(History(ops, faults=[Fault("pause", "n1", 0, MS)]))
    assert report.counts == {"get": {"ok": 1}, "set": {"ok": 2}}
    assert report.violation_counts() == {"stale_read/same_process": 1}
    text = report.to_text()
    assert "stale_read/same_process: 1" in text and "faults: pause 1" in text
    data = json.loads(json.dumps(report.to_json()))
    assert data["ok"] is False and data["violations"][0]["ops"][0]["kind"] == "get"


def test_load_history_pairs_invocations_with_completions(tmp_path: Path) -> None:
    lines = [
        {"i": 1, "p": "w0", "th": 0, "k": "set", "key": "k", "arg": "a", "s": 0, "n": "n1"},
        {"c": 1, "e": 10, "o": "ok", "v": True},
        {"i": 2, "p": "w0", "th": 0, "k": "incr", "key": "c", "arg": 1, "s": 20, "n": "n1"},
    ]
    text = "".join(json.dumps(line) + "\n" for line in lines) + '{"c": 2, "e"'  # killed mid-write
    (tmp_path / "ops-w0.jsonl").write_text(text)
    (tmp_path / "faults.jsonl").write_text(
        json.dumps({"kind": "kill", "target": "n1", "start_ns": 5, "end_ns": 6}) + "\n"
    )
    (tmp_path / "run.json").write_text(
        json.dumps({"finals": {"c": 1}, "lock_ttl_s": 3, "detection_bound_s": 0.5})
    )
    (tmp_path / "worker-w0.log").write_text("7 node_down n1 no reply\n8 fenced n1 cleaned\ngarbage\n")
    history = load_history(tmp_path)
    assert [(d.target, d.start_ns) for d in history.detections] == [("n1", 7)]
    assert history.detection_bound_ns == 5 * 10**8
    by_kind = {o.kind: o for o in history.ops}
    assert by_kind["set"].end_ns == 10 and by_kind["set"].outcome is OK
    assert by_kind["incr"].end_ns == NEVER and by_kind["incr"].outcome is AMBIGUOUS
    assert history.faults[0].target == "n1" and history.finals == {"c": 1}
    assert history.lock_ttl_ns == 3 * 10**9
    assert check_history(history).ok
