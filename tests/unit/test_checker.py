"""The checkers of ``keepcount verify`` on tiny hand-written histories (Jepsen's
``checker_test.clj`` style), plus generated linearizable histories."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keepcount.verify.checker import (
    Fault,
    Result,
    availability,
    check,
    compose,
    counter,
    exactly_once,
    logical_adds,
    merge_valid,
    monotonic,
)
from keepcount.verify.history import (
    HistoryError,
    HistoryWriter,
    Op,
    attempts,
    label_key,
    read_history,
)

LA = {"route": "/a"}
LB = {"route": "/b"}
KA = label_key(LA)
KB = label_key(LB)


class H:
    """Builds a history: each call appends one op with the next index; its
    time is the index unless given."""

    def __init__(self) -> None:
        self.ops: list[Op] = []
        self.open: dict[int, Op] = {}

    def op(self, p: int, type: str, f: str, value: Any = None, *, key: str | None = None,
           node: str | None = None, error: str | None = None, t: float | None = None) -> Op:  # fmt: skip
        i = len(self.ops)
        op = Op(i, p, type, f, float(i) if t is None else t, value, key, node, error)
        self.ops.append(op)
        return op

    def invoke_add(self, p: int, by: int = 1, labels: dict[str, str] = LA,
                   key: str | None = None, t: float | None = None) -> Op:  # fmt: skip
        op = self.op(p, "invoke", "add", {"labels": dict(labels), "by": by}, key=key, t=t)
        self.open[p] = op
        return op

    def invoke_read(self, p: int, t: float | None = None) -> Op:
        op = self.op(p, "invoke", "read", t=t)
        self.open[p] = op
        return op

    def invoke_scrape(self, p: int, t: float | None = None) -> Op:
        op = self.op(p, "invoke", "scrape", t=t)
        self.open[p] = op
        return op

    def end(self, p: int, type: str = "ok", value: Any = None, *, node: str | None = "n1",
            error: str | None = None, t: float | None = None) -> Op:  # fmt: skip
        """Complete process ``p``'s open op; an add's completion carries its
        invoke's value and key; fail / info get a default error text."""
        inv = self.open.pop(p)
        if inv.f == "add":
            value = inv.value
        if type != "ok" and error is None:
            error = {"fail": "422 invalid_amount", "info": "TimeoutError"}[type]
        return self.op(p, type, inv.f, value, key=inv.key, node=node, error=error, t=t)

    def add(self, p: int = 0, by: int = 1, labels: dict[str, str] = LA, outcome: str = "ok",
            key: str | None = None, node: str | None = "n1") -> Op:  # fmt: skip
        self.invoke_add(p, by, labels, key)
        return self.end(p, outcome, node=node if outcome == "ok" else None)

    def end_read(self, p: int, totals: dict[str, int]) -> Op:
        return self.end(p, "ok", {"totals": dict(totals)}, node=None)

    def read(self, totals: dict[str, int], p: int = 9) -> Op:
        self.invoke_read(p)
        return self.end_read(p, totals)

    def end_scrape(self, p: int, node: str, pid: int, values: dict[str, int]) -> Op:
        return self.end(p, "ok", {"node": node, "pid": pid, "values": dict(values)}, node=node)

    def scrape(self, node: str, pid: int, values: dict[str, int], p: int = 8) -> Op:
        self.invoke_scrape(p)
        return self.end_scrape(p, node, pid, values)


# -- counter -----------------------------------------------------------------------


def test_counter_valid_sequential_history() -> None:
    h = H()
    h.add(by=2)
    h.read({KA: 2})
    h.add(by=3, labels=LB)
    h.add(by=1)
    h.read({KA: 3, KB: 3})
    r = counter(h.ops)
    assert r.valid is True, r.errors
    assert r.details["label_sets"][KA] == {
        "acknowledged": 3, "unknown": 0, "failed": 0, "final": 3, "lost": 0, "phantom": 0,
    }  # fmt: skip
    assert r.details["final_read"] == h.ops[-1].index
    assert r.errors == []


def test_counter_lost_acknowledged_increment_is_invalid() -> None:
    h = H()
    h.add(by=1)
    h.add(by=1)
    final = h.read({KA: 1})
    r = counter(h.ops)
    assert r.valid is False
    [v] = r.details["violations"]
    assert v == {
        "kind": "lost", "label_key": KA, "read": final.index, "invoke": final.index - 1,
        "value": 1, "lower": 2, "upper": 2, "final": True,
    }  # fmt: skip
    assert r.details["label_sets"][KA]["lost"] == 1
    assert "lost" in r.errors[0] and f"#{final.index}" in r.errors[0]


def test_counter_missing_label_set_is_zero_so_its_acknowledged_adds_are_lost() -> None:
    h = H()
    h.add(labels=LB)
    h.read({})
    r = counter(h.ops)
    assert r.valid is False
    assert r.details["violations"][0]["label_key"] == KB
    assert r.details["violations"][0]["value"] == 0


@pytest.mark.parametrize("counted", [0, 1])
def test_counter_info_add_may_or_may_not_be_counted(counted: int) -> None:
    h = H()
    h.add(by=2)
    h.add(by=1, outcome="info")
    h.read({KA: 2 + counted})
    r = counter(h.ops)
    assert r.valid is True, r.errors
    assert r.details["label_sets"][KA]["unknown"] == 1
    assert r.details["label_sets"][KA]["acknowledged"] == 2


def test_counter_read_above_every_invoked_add_is_a_phantom() -> None:
    h = H()
    h.add(by=1)
    h.add(by=1, outcome="info")
    h.read({KA: 3})
    r = counter(h.ops)
    assert r.valid is False
    assert r.details["violations"][0]["kind"] == "phantom"
    assert r.details["violations"][0]["upper"] == 2


def test_counter_failed_add_is_not_in_the_upper_bound() -> None:
    h = H()
    h.add(by=5, outcome="fail")
    h.read({KA: 5})
    r = counter(h.ops)
    assert r.valid is False
    assert (
        r.details["violations"][0] | {"kind": "phantom", "lower": 0, "upper": 0}
        == (r.details["violations"][0])
    )
    assert r.details["label_sets"][KA]["failed"] == 5


def test_counter_label_set_never_added_is_a_phantom() -> None:
    h = H()
    h.add()
    h.read({KA: 1, KB: 1})
    r = counter(h.ops)
    assert r.valid is False
    assert [v["label_key"] for v in r.details["violations"]] == [KB]


def test_counter_concurrent_read_may_or_may_not_see_an_add() -> None:
    for seen in (0, 1):
        h = H()
        h.invoke_read(9)
        h.add(by=1)  # entirely inside the read
        h.end_read(9, {KA: seen})
        h.read({KA: 1})
        assert counter(h.ops).valid is True


def test_counter_read_invoked_after_an_ack_must_see_it() -> None:
    h = H()
    h.invoke_add(0)
    h.invoke_read(9)  # invoked before the ack: may miss it
    h.end(0)
    h.end_read(9, {})
    h.invoke_read(9)  # invoked after the ack: must see it
    h.end_read(9, {})
    h.read({KA: 1})
    r = counter(h.ops)
    assert r.valid is False
    [v] = r.details["violations"]
    assert (v["read"], v["lower"], v["final"]) == (5, 1, False)


def test_counter_add_invoked_after_the_read_ended_is_not_in_its_upper_bound() -> None:
    h = H()
    h.read({KA: 1})
    h.add()
    h.read({KA: 1})
    r = counter(h.ops)
    assert r.valid is False
    assert r.details["violations"][0]["read"] == 1


def test_counter_keyed_retries_are_one_logical_add() -> None:
    h = H()
    h.add(key="k1", outcome="info")
    h.add(key="k1", outcome="info")
    h.add(key="k1", outcome="ok")
    h.read({KA: 2})
    [la] = logical_adds(h.ops)
    assert (la.outcome, la.by, len(la.attempts), la.invoked, la.acknowledged) == ("ok", 1, 3, 0, 5)
    r = counter(h.ops)
    assert r.valid is False  # upper is 1: the key was counted twice
    assert r.details["label_sets"][KA]["acknowledged"] == 1


def test_logical_add_outcomes() -> None:
    h = H()
    h.add(key="f", outcome="fail")
    h.add(key="f", outcome="fail")
    h.add(key="i", outcome="info")
    h.add(key="i", outcome="fail")
    h.add(outcome="info")
    h.add(outcome="info")
    h.invoke_add(1, key="open")  # never completed: info
    outcomes = [(la.key, la.outcome, len(la.attempts)) for la in logical_adds(h.ops)]
    assert outcomes == [
        ("f", "fail", 2), ("i", "info", 2), (None, "info", 1), (None, "info", 1),
        ("open", "info", 1),
    ]  # fmt: skip


def test_key_reused_for_another_increment_is_another_logical_add() -> None:
    h = H()
    h.add(key="k", by=1)
    h.add(key="k", by=2, outcome="fail")  # the server refuses the reuse
    assert [(la.by, la.outcome) for la in logical_adds(h.ops)] == [(1, "ok"), (2, "fail")]


def test_counter_without_reads_is_unknown() -> None:
    h = H()
    h.add()
    r = counter(h.ops)
    assert r.valid is None
    assert "no ok read" in r.errors[0]


def test_counter_final_read_overlapping_an_add_is_unknown_not_false() -> None:
    h = H()
    h.add()
    h.invoke_add(0)
    h.read({KA: 1})
    r = counter(h.ops)
    assert r.valid is None
    assert "in flight" in r.errors[-1]


def test_counter_failed_reads_are_ignored() -> None:
    h = H()
    h.add()
    h.invoke_read(9)
    h.end(9, "info")
    h.invoke_read(9)
    h.end(9, "fail")
    h.read({KA: 1})
    assert counter(h.ops).valid is True


# -- exactly once ------------------------------------------------------------------


def test_exactly_once_double_count_of_a_keyed_retry_is_invalid() -> None:
    h = H()
    h.add(key="k1", by=2, outcome="info")
    h.add(key="k1", by=2, outcome="ok")  # the retry: resolved, nothing left unknown
    h.read({KA: 4})
    r = exactly_once(h.ops)
    assert r.valid is False
    assert r.details["label_sets"][KA] == {
        "acknowledged": 2, "unknown": 0, "final": 4, "adds": 1, "retried": 1, "unresolved": 0,
        "settled_applied": 0, "settled_not_applied": 0, "status": "double_count",
    }  # fmt: skip
    assert r.errors[0].startswith("double count")
    assert counter(h.ops).valid is False


def test_exactly_once_keyed_info_resolved_by_its_retry_is_valid() -> None:
    h = H()
    h.add(key="k1", outcome="info")
    h.add(key="k1", outcome="ok", node="n2")  # the retry landed on another node
    h.add(key="k2")
    h.read({KA: 2})
    r = exactly_once(h.ops)
    assert r.valid is True, r.errors
    assert r.details["label_sets"][KA]["status"] == "exact"


@pytest.mark.parametrize("final", [1, 2])
def test_exactly_once_unresolved_keyed_info_is_unknown(final: int) -> None:
    h = H()
    h.add(key="k1")
    h.add(key="k2", outcome="info")
    h.read({KA: final})
    r = exactly_once(h.ops)
    assert r.valid is None
    assert r.details["label_sets"][KA]["status"] == "unresolved"
    assert counter(h.ops).valid is True


@pytest.mark.parametrize(("final", "status"), [(0, "lost"), (3, "double_count")])
def test_exactly_once_unresolved_but_out_of_bounds_is_invalid(final: int, status: str) -> None:
    h = H()
    h.add(key="k1")
    h.add(key="k2", outcome="info")
    h.read({KA: final})
    r = exactly_once(h.ops)
    assert r.valid is False
    assert r.details["label_sets"][KA]["status"] == status


def test_exactly_once_lost_keyed_add_is_invalid() -> None:
    h = H()
    h.add(key="k1")
    h.add(key="k2")
    h.read({KA: 1})
    r = exactly_once(h.ops)
    assert r.valid is False
    assert r.details["label_sets"][KA]["status"] == "lost"


def test_exactly_once_checks_only_label_sets_with_only_keyed_adds() -> None:
    h = H()
    h.add(key="k1", labels=LA)
    h.add(labels=LB)
    h.add(labels=LB, outcome="info")
    h.read({KA: 1, KB: 2})
    r = exactly_once(h.ops)
    assert r.valid is True
    assert list(r.details["label_sets"]) == [KA]
    assert r.details["skipped"] == [KB]


def test_exactly_once_without_keyed_adds_has_nothing_to_check() -> None:
    h = H()
    h.add()
    h.read({KA: 1})
    r = exactly_once(h.ops)
    assert r.valid is True
    assert "nothing to check" in r.summary


def test_exactly_once_final_read_overlapping_an_add_is_unknown() -> None:
    h = H()
    h.add(key="k1")
    h.invoke_add(0, key="k2")
    h.read({KA: 2})
    r = exactly_once(h.ops)
    assert r.valid is None
    assert r.details["label_sets"][KA]["status"] == "unresolved"


# -- monotonic ---------------------------------------------------------------------


def test_monotonic_scrape_going_back_across_a_restart_is_invalid() -> None:
    h = H()
    h.scrape("n1", 100, {KA: 5})
    h.scrape("n2", 200, {KA: 1})
    h.scrape("n1", 101, {KA: 3})  # restarted, restored less than it had shown
    r = monotonic(h.ops)
    assert r.valid is False
    [d] = r.details["decreases"]
    assert d == {
        "kind": "scrape", "node": "n1", "label_key": KA, "from": 5, "to": 3, "from_index": 1,
        "to_index": 5, "from_pid": 100, "to_pid": 101, "pid_changed": True, "unacknowledged": 0,
    }  # fmt: skip
    assert "across a restart" in r.errors[0]
    assert r.details["nodes"]["n1"] == {"scrapes": 2, "pids": [100, 101], "restarts": 1}


def test_monotonic_restart_decrease_notes_the_unacknowledged_adds_before_it() -> None:
    h = H()
    h.add(by=2, outcome="info")  # in n1's memory, maybe never durable
    h.add(by=1, outcome="fail")
    h.add(by=1)
    h.scrape("n1", 100, {KA: 3})
    h.add(by=4, outcome="info")  # after the scrape: could not be in it
    h.scrape("n1", 101, {KA: 1})
    r = monotonic(h.ops)
    assert r.valid is False  # still reported: DESIGN §8
    [d] = r.details["decreases"]
    assert (d["from"], d["to"], d["unacknowledged"]) == (3, 1, 2)
    assert "2 unacknowledged before it" in r.errors[0]


def test_monotonic_scrape_going_back_within_one_process_is_invalid() -> None:
    h = H()
    h.scrape("n1", 100, {KA: 5, KB: 2})
    h.scrape("n1", 100, {KA: 6})  # KB missing: 0
    h.scrape("n1", 100, {KA: 4, KB: 2})
    r = monotonic(h.ops)
    assert r.valid is False
    got = [(d["label_key"], d["from"], d["to"], d["pid_changed"]) for d in r.details["decreases"]]
    assert sorted(got) == [(KA, 6, 4, False), (KB, 2, 0, False)]
    assert "within pid 100" in r.errors[0]


def test_monotonic_values_continuing_across_restarts_are_valid() -> None:
    h = H()
    h.scrape("n1", 100, {KA: 5})
    h.scrape("n1", 101, {KA: 5})
    h.scrape("n1", 101, {KA: 7, KB: 1})
    h.scrape("n2", 200, {KA: 0})  # other nodes are other series
    r = monotonic(h.ops)
    assert r.valid is True, r.errors
    assert r.details["scrapes"] == 4


def test_monotonic_overlapping_scrapes_may_complete_in_either_order() -> None:
    h = H()
    h.invoke_scrape(1)
    h.invoke_scrape(2)
    h.end_scrape(2, "n1", 100, {KA: 6})  # answered last, completed first
    h.end_scrape(1, "n1", 100, {KA: 5})
    assert monotonic(h.ops).valid is True
    h.scrape("n1", 100, {KA: 5})  # but after both ended, 6 was seen
    assert monotonic(h.ops).valid is False


def test_monotonic_reads_going_back_are_invalid() -> None:
    h = H()
    h.add()
    h.add()
    h.read({KA: 2})
    h.read({KA: 1})
    r = monotonic(h.ops)
    assert r.valid is False
    [d] = r.details["decreases"]
    assert (d["kind"], d["node"], d["from"], d["to"]) == ("read", None, 2, 1)


# -- availability ------------------------------------------------------------------


def _availability_history() -> H:
    h = H()
    h.invoke_add(0, t=0.0)
    h.end(0, "ok", node="n1", t=1.0)
    h.invoke_add(0, t=2.0)
    h.end(0, "info", node=None, t=3.0)  # inside the kill of n2
    h.invoke_add(0, t=4.0)
    h.end(0, "ok", node="n1", t=5.0)  # inside: another node answers
    h.invoke_add(0, t=7.0)
    h.end(0, "ok", node="n2", t=8.0)  # n2 is back
    h.invoke_add(0, t=9.0)
    h.end(0, "fail", node="n2", error="422 invalid_amount", t=10.0)
    return h


def test_availability_figures_with_fault_windows() -> None:
    faults = [Fault("kill", "n2", 2.5, 6.0), Fault("pause", "etcd-1", 9.5, 20.0)]
    r = availability(_availability_history().ops, faults)
    assert r.valid is True
    d = r.details
    assert d["attempts"] == {"ok": 3, "fail": 1, "info": 1, "unfinished": 0}
    assert d["errors"] == 2
    assert d["error_texts"] == {"TimeoutError": 1, "422 invalid_amount": 1}
    assert d["run"] == {"start": 0.0, "end": 10.0, "seconds": 10.0}
    kill, pause = d["faults"]
    assert kill | {"errors": 1, "info": 1, "fail": 0, "ok": 1} == kill
    assert kill["to_next_ok"] == pytest.approx(2.5)
    assert kill["target_is_node"] is True
    assert kill["to_next_ok_on_target"] == pytest.approx(5.5)
    assert kill["throughput"] == pytest.approx(1 / 3.5)
    assert pause | {"errors": 1, "fail": 1, "ok": 0, "throughput": 0.0} == pause
    assert pause["to_next_ok"] is None
    assert (pause["target_is_node"], pause["to_next_ok_on_target"]) == (False, None)
    t = d["throughput"]
    assert (t["faulted_ok"], t["steady_ok"]) == (1, 2)
    assert t["faulted_seconds"] == pytest.approx(4.0)  # the pause is clipped to the run's end
    assert t["steady_seconds"] == pytest.approx(6.0)
    assert t["faulted"] == pytest.approx(1 / 4.0)
    assert t["steady"] == pytest.approx(2 / 6.0)


def test_availability_overlapping_faults_are_counted_once_in_throughput() -> None:
    faults = [Fault("kill", "n2", 2.0, 6.0), Fault("pause", "n1", 4.0, 7.0)]
    t = availability(_availability_history().ops, faults).details["throughput"]
    assert (t["faulted_seconds"], t["faulted_ok"], t["steady_ok"]) == (5.0, 1, 2)


def test_availability_without_any_ok_add_is_invalid() -> None:
    h = H()
    h.add(outcome="info")
    h.add(outcome="fail")
    h.invoke_add(1)
    r = availability(h.ops, [])
    assert r.valid is False
    assert r.details["attempts"] == {"ok": 0, "fail": 1, "info": 2, "unfinished": 1}


def test_fault_end_before_start_is_refused() -> None:
    with pytest.raises(ValueError, match="end"):
        Fault("kill", "n1", 2.0, 1.0)


# -- compose and check -------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([], True),
        ([True, True], True),
        ([True, None], None),
        ([None, False, True], False),
        ([False, None], False),
        ([None, None], None),
    ],
)
def test_compose_false_outranks_unknown_outranks_true(
    values: list[bool | None], expected: bool | None
) -> None:
    results = [Result(f"c{i}", v, "", {}, [f"e{i}"]) for i, v in enumerate(values)]
    r = compose(results)
    assert r.valid is expected
    assert merge_valid(values) is expected
    assert r.details["results"] == {f"c{i}": v for i, v in enumerate(values)}
    assert r.errors == [f"c{i}: e{i}" for i in range(len(values))]


def test_check_runs_every_checker_and_composes_them() -> None:
    h = H()
    h.add(key="k1", outcome="info")
    h.add(key="k1")
    h.scrape("n1", 100, {KA: 1})
    h.read({KA: 1})
    out = check(h.ops, [Fault("kill", "n1", 0.5, 1.5)])
    assert set(out) == {"counter", "exactly_once", "monotonic", "availability", "valid"}
    assert all(r.valid is True for r in out.values()), {n: r.errors for n, r in out.items()}
    json.dumps({n: r.to_dict() for n, r in out.items()})  # JSON-able for the report

    h.read({KA: 0})
    out = check(h.ops)
    assert (out["counter"].valid, out["monotonic"].valid, out["valid"].valid) == (False,) * 3
    assert "false: counter, exactly_once, monotonic" in out["valid"].summary


def test_malformed_history_is_unknown_not_false() -> None:
    h = H()
    h.invoke_add(0)
    h.op(0, "invoke", "add", {"labels": LA, "by": 1})  # process 0 invoked twice
    out = check(h.ops)
    assert {r.valid for r in out.values()} == {None}
    assert "still open" in out["counter"].errors[0]
    assert counter(h.ops).valid is None


@pytest.mark.parametrize(
    "ops",
    [
        [Op(0, 0, "ok", "add", 0.0)],  # completion without invoke
        [Op(0, 0, "invoke", "read", 0.0), Op(1, 0, "ok", "add", 0.1)],  # another f
        [Op(1, 0, "invoke", "read", 0.0), Op(0, 1, "invoke", "read", 0.1)],  # indices back
        [Op(0, 0, "invoke", "add", 0.0, {"labels": LA, "by": "1"})],  # bad value
    ],
)
def test_attempts_refuse_broken_histories(ops: list[Op]) -> None:
    with pytest.raises(HistoryError):
        logical_adds(ops)


# -- the history format ------------------------------------------------------------


def test_op_json_round_trip() -> None:
    ops = [
        Op(0, 3, "invoke", "add", 0.001234, {"labels": {"route": "/é"}, "by": 2}, key="p3-1"),
        Op(
            1,
            3,
            "info",
            "add",
            1.5,
            {"labels": {"route": "/é"}, "by": 2},
            key="p3-1",
            error="503 claim_lost",
        ),
        Op(2, 1, "ok", "scrape", 2.0, {"node": "n1", "pid": 42, "values": {KA: 7}}, node="n1"),
        Op(3, 2, "invoke", "read", 3.0),
    ]
    for op in ops:
        line = op.to_json()
        assert "\n" not in line
        assert Op.from_json(line) == op
        assert Op.from_dict(json.loads(line)) == op
    assert Op.from_dict({"index": 0, "process": 0, "type": "invoke", "f": "read", "time": 1}) == (
        Op(0, 0, "invoke", "read", 1.0)
    )


@pytest.mark.parametrize(
    "line",
    [
        "not json",
        "[1, 2]",
        '{"index": 0, "process": 0, "type": "begin", "f": "add", "time": 0}',
        '{"index": 0, "process": 0, "type": "ok", "f": "mul", "time": 0}',
        '{"index": 0, "process": 0, "type": "ok", "f": "add", "time": "0"}',
        '{"index": true, "process": 0, "type": "ok", "f": "add", "time": 0}',
        '{"index": 0, "process": 0, "type": "ok", "f": "add", "time": 0, "extra": 1}',
        '{"index": 0, "process": 0, "type": "ok", "f": "add", "time": 0, "key": 5}',
    ],
)
def test_op_from_json_refuses_what_is_not_an_op(line: str) -> None:
    with pytest.raises(HistoryError):
        Op.from_json(line)


def test_label_key_is_sorted_json() -> None:
    assert (
        label_key({"b": "2", "a": "1"}) == '{"a": "1", "b": "2"}' == label_key({"a": "1", "b": "2"})
    )


def test_writer_appends_flushed_lines_and_reader_reads_them(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    h = H()
    h.add(key="k1", outcome="info")
    h.read({KA: 1})
    with HistoryWriter(path) as w:
        for op in h.ops:
            w.write(op)
        assert read_history(path) == h.ops  # flushed per line, before close
        assert w.next_index == len(h.ops)
    assert w.closed
    with HistoryWriter(path) as w:  # appends, indices continue
        op = w.record(process=5, type="invoke", f="read", time=9.5)
    assert op == Op(len(h.ops), 5, "invoke", "read", 9.5)
    assert read_history(path) == [*h.ops, op]
    assert len(path.read_text().splitlines()) == len(h.ops) + 1


def test_writer_record_from_threads_keeps_index_order_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    with HistoryWriter(path) as w:

        def work(p: int) -> None:
            for i in range(200):
                w.record(process=p, type="invoke", f="read", time=float(i))

        threads = [threading.Thread(target=work, args=(p,)) for p in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    ops = read_history(path)
    assert [op.index for op in ops] == list(range(800))


def test_read_history_names_the_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    path.write_text(Op(0, 0, "invoke", "read", 0.0).to_json() + "\n\n{torn\n")
    with pytest.raises(HistoryError, match=r"history\.jsonl:3"):
        read_history(path)


def test_attempts_pair_invokes_with_completions() -> None:
    h = H()
    h.invoke_add(0)
    h.invoke_read(1)
    h.end_read(1, {})
    h.end(0, "info")
    h.invoke_read(1)
    pairs = attempts(h.ops)
    assert [(a.invoke.index, a.end, a.outcome) for a in pairs] == [
        (0, 3, "info"), (1, 2, "ok"), (4, None, "info"),
    ]  # fmt: skip


# -- generated histories -----------------------------------------------------------


@dataclass
class _Logical:
    lk: str
    by: int
    outcomes: list[str] = field(default_factory=list)
    applied: bool = False


@dataclass
class _Sim:
    """A linearizable counter driven by several processes: each op takes
    effect at one moment between its invoke and its completion."""

    ops: list[Op] = field(default_factory=list)
    state: dict[str, int] = field(default_factory=dict)
    logical: list[_Logical] = field(default_factory=list)
    tasks: dict[int, dict[str, Any]] = field(default_factory=dict)
    retry: dict[int, tuple[str, dict[str, Any], _Logical]] = field(default_factory=dict)

    def emit(self, p: int, type: str, f: str, value: Any = None, key: str | None = None) -> None:
        error = {"fail": "422", "info": "timeout"}.get(type)
        node = "n1" if type == "ok" else None
        i = len(self.ops)
        self.ops.append(Op(i, p, type, f, float(i), value, key, node, error))

    def step(self, draw: Any, p: int) -> None:
        task = self.tasks.get(p)
        if task is None:  # invoke something
            if draw(st.booleans()):
                self.tasks[p] = {"f": "read", "effect": False}
                self.emit(p, "invoke", "read")
                return
            key: str | None
            if p in self.retry and draw(st.booleans()):
                key, value, la = self.retry.pop(p)
            else:
                self.retry.pop(p, None)
                labels = draw(st.sampled_from([LA, LB]))
                value = {"labels": labels, "by": draw(st.integers(1, 3))}
                key = f"k{len(self.logical)}" if draw(st.booleans()) else None
                la = _Logical(label_key(labels), value["by"])
                self.logical.append(la)
            outcome = draw(st.sampled_from(["ok", "ok", "fail", "info"]))
            if outcome == "fail" and la.applied:
                outcome = "ok"  # a retry of an applied key is answered ok
            self.tasks[p] = {"f": "add", "effect": False, "value": value, "key": key,
                             "la": la, "outcome": outcome}  # fmt: skip
            self.emit(p, "invoke", "add", value, key)
        elif not task["effect"]:  # the moment it takes effect
            task["effect"] = True
            if task["f"] == "read":
                task["snapshot"] = dict(self.state)
                return
            la = task["la"]
            apply = task["outcome"] == "ok" or (task["outcome"] == "info" and draw(st.booleans()))
            if apply and not la.applied:
                la.applied = True
                self.state[la.lk] = self.state.get(la.lk, 0) + la.by
        else:  # complete
            del self.tasks[p]
            if task["f"] == "read":
                self.emit(p, "ok", "read", {"totals": task["snapshot"]})
                return
            task["la"].outcomes.append(task["outcome"])
            self.emit(p, task["outcome"], "add", task["value"], task["key"])
            if task["outcome"] == "info" and task["key"] is not None:
                self.retry[p] = (task["key"], task["value"], task["la"])

    def finish(self, draw: Any) -> None:
        while self.tasks:
            self.step(draw, min(self.tasks))
        self.emit(0, "invoke", "read")
        self.emit(0, "ok", "read", {"totals": dict(self.state)})

    def bounds(self) -> dict[str, tuple[int, int]]:
        out: dict[str, tuple[int, int]] = {KA: (0, 0), KB: (0, 0)}
        for la in self.logical:
            lo, hi = out[la.lk]
            ok = "ok" in la.outcomes
            maybe = ok or any(o != "fail" for o in la.outcomes)
            out[la.lk] = (lo + la.by * ok, hi + la.by * maybe)
        return out


@st.composite
def linearizable(draw: Any) -> _Sim:
    sim = _Sim()
    processes = draw(st.integers(1, 4))
    for _ in range(draw(st.integers(0, 80))):
        sim.step(draw, draw(st.integers(0, processes - 1)))
    sim.finish(draw)
    return sim


def _with_final(sim: _Sim, lk: str, value: int) -> list[Op]:
    final = sim.ops[-1]
    totals = dict(final.value["totals"]) | {lk: value}
    return [*sim.ops[:-1], Op(final.index, 0, "ok", "read", final.time, {"totals": totals})]


@settings(max_examples=300, deadline=None)
@given(linearizable(), st.sampled_from([KA, KB]))
def test_generated_linearizable_histories_are_valid(sim: _Sim, lk: str) -> None:
    results = check(sim.ops)
    assert results["counter"].valid is True, results["counter"].errors
    assert results["monotonic"].valid is True, results["monotonic"].errors
    assert results["exactly_once"].valid is not False, results["exactly_once"].errors
    lo, hi = sim.bounds()[lk]
    stats = results["counter"].details["label_sets"].get(lk, {"acknowledged": 0, "unknown": 0})
    assert (stats["acknowledged"], stats["acknowledged"] + stats["unknown"]) == (lo, hi)

    lost = counter(_with_final(sim, lk, lo - 1))
    assert lost.valid is False
    assert {v["kind"] for v in lost.details["violations"]} == {"lost"}
    phantom = counter(_with_final(sim, lk, hi + 1))
    assert phantom.valid is False
    assert {v["kind"] for v in phantom.details["violations"]} == {"phantom"}
