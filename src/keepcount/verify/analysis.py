"""A history taken apart once for every checker: attempts, logical adds, sums.

Every checker of ``keepcount.verify.checker`` reads the same ``Analysis``:
the add attempts, the ok reads and scrapes (in completion order) with their
decoded values, and the *logical adds*.  ``check`` builds it once per
history; each checker on its own builds it through ``judge``, which turns a
malformed history into an unknown result instead of an exception.

Logical adds (shared by every checker)
    An *attempt* is an invoke and its completion on one process.  Unkeyed,
    every add attempt is one logical add.  Keyed, every attempt with the
    same ``(key, labels, by)`` is one logical add (the retries of an
    ``info``; a key reused for another increment is another logical add,
    which the server must refuse).  A logical add is **ok** if any attempt
    is ok, **fail** if every attempt failed, else **info** (an attempt left
    open at the end of the history is info).  It is *invoked* at its first
    attempt's invoke and *acknowledged* at its first ok completion.

Settled adds
    A keyed add its client abandoned is settled by its key (ops ``settle``
    with the add's key and value).  An ok settle is final: ``applied`` makes
    the logical add **ok**, acknowledged at the settle's completion (it was
    counted once, by then); not applied makes it **fail** (never counted,
    and never will be).  A settle that says not applied for an add with an
    ok attempt contradicts it: ``LogicalAdd.contradiction``.

The final read
    The last ok read; the workload takes it after every add ended, so the
    counter and exactly-once bounds apply to it with no add in flight
    (``final_read`` says why they do not when an add overlaps it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from keepcount.verify.history import (
    ADD,
    FAIL,
    INFO,
    OK,
    READ,
    SCRAPE,
    SETTLE,
    Attempt,
    HistoryError,
    Op,
    attempts,
    label_key,
)
from keepcount.verify.verdict import Result

__all__ = [
    "DOUBLE_COUNT",
    "LOST",
    "PHANTOM",
    "Analysis",
    "LogicalAdd",
    "analyze",
    "completed_at",
    "final_read",
    "judge",
    "logical_adds",
    "malformed",
]

LOST = "lost"
"""A value below what was acknowledged: an acknowledged increment missing."""
PHANTOM = "phantom"
"""A value above every add that may have happened."""
DOUBLE_COUNT = "double_count"
"""A keyed add counted more than once."""


@dataclass(slots=True)
class LogicalAdd:
    """One increment as the client meant it: one attempt, or a keyed
    attempt and its retries with the same key (see the module docstring).

    ``outcome``: ``ok`` if any attempt is ok, ``fail`` if every one failed,
    else ``info``; ``invoked``: index of the first attempt's invoke;
    ``acknowledged``: index of the first ok completion (None: never).  All
    three are kept up to date by ``attach``.
    """

    labels: dict[str, str]
    label_key: str
    by: int
    key: str | None
    attempts: list[Attempt] = field(default_factory=list)
    outcome: str = INFO
    invoked: int = -1
    acknowledged: int | None = None
    settled: bool | None = None
    """How its key was settled: True applied, False not applied, None not settled."""
    contradiction: bool = False
    """Settled not applied although an attempt was acknowledged."""

    def attach(self, attempt: Attempt) -> None:
        """Add one more attempt (in invoke order)."""
        if not self.attempts:
            self.invoked = attempt.invoke.index
            self.outcome = FAIL if attempt.outcome == FAIL else INFO
        self.attempts.append(attempt)
        o, end = attempt.outcome, attempt.end
        if o == OK:
            self.outcome = OK
            assert end is not None
            self.acknowledged = end if self.acknowledged is None else min(self.acknowledged, end)
        elif o == INFO and self.outcome == FAIL:
            self.outcome = INFO

    def settle(self, applied: bool, end: int) -> None:
        """Its key was settled (an ok ``settle`` completing at ``end``)."""
        self.settled = applied
        if applied:
            self.outcome = OK
            self.acknowledged = end if self.acknowledged is None else min(self.acknowledged, end)
        elif self.outcome == OK:
            self.contradiction = True
        else:
            self.outcome = FAIL


def _add_value(op: Op) -> tuple[dict[str, str], int]:
    v = op.value
    if not isinstance(v, Mapping):
        raise HistoryError(f"add op #{op.index}: value must be {{'labels', 'by'}}, not {v!r}")
    labels, by = v.get("labels"), v.get("by")
    if not isinstance(labels, Mapping) or not all(
        isinstance(k, str) and isinstance(x, str) for k, x in labels.items()
    ):
        raise HistoryError(f"add op #{op.index}: labels must map strings to strings: {labels!r}")
    if not isinstance(by, int) or isinstance(by, bool):
        raise HistoryError(f"add op #{op.index}: 'by' must be an integer, not {by!r}")
    return dict(labels), by


def _int_map(op: Op, v: Any, what: str) -> dict[str, int]:
    if not isinstance(v, Mapping) or not all(
        isinstance(k, str) and isinstance(x, int) and not isinstance(x, bool) for k, x in v.items()
    ):
        raise HistoryError(f"{op.f} op #{op.index}: {what} must map label keys to integers: {v!r}")
    return dict(v)


def _totals(op: Op) -> dict[str, int]:
    v = op.value
    if not isinstance(v, Mapping):
        raise HistoryError(
            f"read op #{op.index}: an ok read's value is {{'totals': ...}}, not {v!r}"
        )
    return _int_map(op, v.get("totals"), "totals")


def _scrape(op: Op) -> tuple[str, int | None, dict[str, int]]:
    v = op.value
    if not isinstance(v, Mapping):
        raise HistoryError(
            f"scrape op #{op.index}: value must be {{'node', 'pid', 'values'}}, not {v!r}"
        )
    node = v.get("node") or op.node
    pid = v.get("pid")
    if not isinstance(node, str):
        raise HistoryError(f"scrape op #{op.index}: no node")
    if pid is not None and (not isinstance(pid, int) or isinstance(pid, bool)):
        raise HistoryError(f"scrape op #{op.index}: pid must be an integer, not {pid!r}")
    return node, pid, _int_map(op, v.get("values"), "values")


@dataclass(slots=True)
class Analysis:
    """A history taken apart once, shared by the checkers of ``check``."""

    ops: Sequence[Op]
    adds: list[Attempt]
    reads: list[Attempt]  # ok reads only, in completion order
    totals: dict[int, dict[str, int]]  # read completion index -> totals
    scrapes: list[tuple[Attempt, str, int | None, dict[str, int]]]  # ok, completion order
    logical: list[LogicalAdd]
    sums: dict[str, dict[str, int]]  # per label key: see _per_label_sums
    node_ids: set[str]
    first_time: float
    last_time: float


def completed_at(a: Attempt) -> int:
    """The completion index of a completed attempt."""
    assert a.completion is not None
    return a.completion.index


def _per_label_sums(logical: Iterable[LogicalAdd]) -> dict[str, dict[str, int]]:
    """Per label key: ``acknowledged`` / ``unknown`` / ``failed`` (sums of
    ``by`` of ok / info / fail logical adds), ``adds``, ``info_adds``,
    ``settled_applied`` / ``settled_not_applied`` (logical adds settled so)."""
    sums: dict[str, dict[str, int]] = {}
    zero = dict.fromkeys(
        ("acknowledged", "unknown", "failed", "adds", "info_adds", "settled_applied",
         "settled_not_applied"), 0,
    )  # fmt: skip
    for la in logical:
        s = sums.get(la.label_key)
        if s is None:
            s = sums[la.label_key] = dict(zero)
        o = la.outcome
        s["adds"] += 1
        if la.settled is not None:
            s["settled_applied" if la.settled else "settled_not_applied"] += 1
        if o == OK:
            s["acknowledged"] += la.by
        elif o == FAIL:
            s["failed"] += la.by
        else:
            s["unknown"] += la.by
            s["info_adds"] += 1
    return sums


def _settle(a: Attempt, keyed: Mapping[tuple[str, str, int], LogicalAdd]) -> None:
    """Apply an ok settle to the keyed logical add it settles."""
    done = a.completion
    assert done is not None
    labels, by = _add_value(done)
    applied = done.value.get("applied")
    if not isinstance(applied, bool):
        raise HistoryError(f"settle op #{done.index}: 'applied' must be true or false")
    la = keyed.get((done.key or "", label_key(labels), by))
    if la is None:
        raise HistoryError(f"settle op #{done.index}: no keyed add of key {done.key!r} settles")
    la.settle(applied, done.index)


def analyze(history: Sequence[Op]) -> Analysis:
    """Take ``history`` apart; ``HistoryError`` if an op's value is malformed."""
    pairs = attempts(history)
    adds: list[Attempt] = []
    reads: list[Attempt] = []
    totals: dict[int, dict[str, int]] = {}
    scrapes: list[tuple[Attempt, str, int | None, dict[str, int]]] = []
    logical: list[LogicalAdd] = []
    keyed: dict[tuple[str, str, int], LogicalAdd] = {}
    keys_of: dict[tuple[tuple[str, str], ...], str] = {}
    settled: list[Attempt] = []
    node_ids = {op.node for op in history if op.node is not None}
    for a in pairs:
        inv, done = a.invoke, a.completion
        if inv.f == ADD:
            adds.append(a)
            labels, by = _add_value(inv)
            # json.dumps is most of the cost of a big history: one per label set.
            items = tuple(sorted(labels.items()))
            lk = keys_of.get(items) or keys_of.setdefault(items, label_key(labels))
            if inv.key is None:
                la = LogicalAdd(labels, lk, by, None)
                logical.append(la)
            else:
                got = keyed.get((inv.key, lk, by))
                if got is None:
                    got = keyed[inv.key, lk, by] = LogicalAdd(labels, lk, by, inv.key)
                    logical.append(got)
                la = got
            la.attach(a)
        elif inv.f == SETTLE:
            if done is not None and done.type == OK:
                settled.append(a)
        elif done is not None and done.type == OK:
            if inv.f == READ:
                reads.append(a)
                totals[done.index] = _totals(done)
            elif inv.f == SCRAPE:
                node, pid, values = _scrape(done)
                node_ids.add(node)
                scrapes.append((a, node, pid, values))
    for a in settled:
        _settle(a, keyed)
    reads.sort(key=completed_at)
    scrapes.sort(key=lambda s: completed_at(s[0]))
    times = [op.time for op in history]
    return Analysis(
        ops=history,
        adds=adds,
        reads=reads,
        totals=totals,
        scrapes=scrapes,
        logical=logical,
        sums=_per_label_sums(logical),
        node_ids=node_ids,
        first_time=min(times, default=0.0),
        last_time=max(times, default=0.0),
    )


def logical_adds(history: Sequence[Op]) -> list[LogicalAdd]:
    """The logical adds of a history, in order of their first invoke."""
    return analyze(history).logical


def malformed(name: str, exc: HistoryError) -> Result:
    """Checker ``name``'s result for a history it cannot read: unknown."""
    return Result(name, None, f"malformed history, not judged: {exc}", {}, [str(exc)])


def judge(name: str, history: Sequence[Op], fn: Callable[[Analysis], Result]) -> Result:
    """``fn`` on the analysis of ``history``; unknown (``malformed``) if it is malformed."""
    try:
        h = analyze(history)
    except HistoryError as exc:
        return malformed(name, exc)
    return fn(h)


def final_read(h: Analysis) -> tuple[Attempt | None, str | None]:
    """The final read and, if it does not follow every add, why its final
    bounds do not apply."""
    if not h.reads:
        return None, "no ok read: nothing to judge"
    final = h.reads[-1]
    inv = final.invoke.index
    open_adds = [a.invoke.index for a in h.adds if a.end is None or a.end > inv]
    if open_adds:
        return final, (
            f"the final read (op #{final.end}) was invoked while {len(open_adds)} add "
            f"attempt(s) were in flight (first: op #{open_adds[0]}): the workload must "
            "take it after every add ended"
        )
    return final, None
