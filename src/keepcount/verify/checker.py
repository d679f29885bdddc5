"""The checkers of ``keepcount verify``: pure functions of a history (Jepsen style).

Each checker takes a history (``verify.history``; ops in index order) and
returns a ``Result`` whose ``valid`` is True, False or None (unknown: the
history cannot decide).  They do no I/O and read no clock; each runs in
O(n log n) time for a history of n ops (the reads' label sets aside: a read
is compared label set by label set).

Logical adds (shared by every checker)
    An *attempt* is an invoke and its completion on one process.  Unkeyed,
    every add attempt is one logical add.  Keyed, every attempt with the
    same ``(key, labels, by)`` is one logical add (the retries of an
    ``info``; a key reused for another increment is another logical add,
    which the server must refuse).  A logical add is **ok** if any attempt
    is ok, **fail** if every attempt failed, else **info** (an attempt left
    open at the end of the history is info).  It is *invoked* at its first
    attempt's invoke and *acknowledged* at its first ok completion.

``counter`` (Jepsen's counter, per label set)
    For each ok read, per label set (a label set missing from the read is 0):
    ``lower`` = the sum of ``by`` over logical adds acknowledged before the
    read's invoke; ``upper`` = the sum over logical adds invoked before the
    read's completion that are not fail.  The value must lie in
    ``[lower, upper]``: below is **lost**, above is **phantom**.  The final
    read (the last ok read; the workload takes it after every add ended)
    must lie in ``[sum ok, sum ok + sum info]``: the same bounds, once no
    add is in flight.

``exactly_once`` (idempotency keys)
    For each label set that received only keyed adds: with no logical add
    left info, the final read equals the sum of ok (above: **double count**,
    below: **lost**); with some left info the result is unknown unless the
    final read is already outside ``[sum ok, sum ok + sum info]``.

``monotonic`` (G3: no resets)
    Per node and label key, every ok scrape of that node shows at least the
    largest value that any earlier ok scrape of the node showed, across
    restarts (a new pid is the same node; a label key missing from a scrape
    is 0).  Likewise every ok read, per label set, against earlier ok reads.
    "Earlier" is real-time order: the earlier op *completed before* this one
    was *invoked*.  (Two overlapping requests may be answered in either
    order; for one process scraping in turn this is simply "successive".)
    Each decrease across a restart also carries ``unacknowledged``: the sum
    of ``by`` over that label set's add attempts that ended info (or never
    ended) and were invoked before the higher scrape completed.  A node's
    ``/metrics`` shows memory, which may hold such increments before they
    are durable; a crash may drop them without breaking G1, so a decrease
    within that amount points at that, not at a lost acknowledged add.  It
    is still reported (DESIGN §8: no node-level value ever decreases).

``availability`` (informational)
    Valid unless no add was ever acknowledged.  Counts add attempts by
    outcome, client-visible errors (fail + info attempts, at their
    completion time) overall and inside each fault window, per fault the
    seconds from its start to the next ok add and to the next ok add the
    faulted node answered, and ok adds per second outside and inside faults.

``compose`` merges results: false outranks unknown outranks true
(Jepsen's ``merge-valid``).  ``check`` runs them all.

Example::

    from keepcount.verify.history import read_history
    results = check(read_history("history.jsonl"), faults)
    assert results["valid"].valid is True, results["valid"].summary
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections import Counter, defaultdict
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
    Attempt,
    HistoryError,
    Op,
    attempts,
    label_key,
)

__all__ = [
    "MAX_REPORTED",
    "Fault",
    "LogicalAdd",
    "Result",
    "availability",
    "check",
    "compose",
    "counter",
    "exactly_once",
    "logical_adds",
    "merge_valid",
    "monotonic",
]

MAX_REPORTED = 100
"""Violations listed in full per result; the rest are only counted (a broken
system loses at every read after the loss: a 1M-op history could list 100k)."""

LOST = "lost"
PHANTOM = "phantom"
DOUBLE_COUNT = "double_count"


@dataclass(frozen=True, slots=True)
class Fault:
    """A fault window of the nemesis: ``kind`` (``kill``, ``pause``, ...)
    done to ``target`` (a node id such as ``node-2``, optionally followed by
    a space and details, or another process: ``etcd-1``, ``cassandra-0``)
    from ``start`` to ``end``, in the history's clock (seconds since the run
    started)."""

    kind: str
    target: str
    start: float
    end: float

    def __post_init__(self) -> None:
        if not self.end >= self.start:
            raise ValueError(
                f"fault {self.kind} {self.target}: end {self.end} < start {self.start}"
            )


@dataclass
class Result:
    """What a checker concluded.

    ``valid``: True, False, or None (unknown); ``summary``: one line;
    ``details``: JSON-able figures for the report; ``errors``: one line per
    problem found (violations first, capped at ``MAX_REPORTED``).
    """

    name: str
    valid: bool | None
    summary: str
    details: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "valid": self.valid,
            "summary": self.summary,
            "details": self.details,
            "errors": list(self.errors),
        }


def merge_valid(values: Iterable[bool | None]) -> bool | None:
    """False if any is False, else None if any is None, else True (True for none)."""
    out: bool | None = True
    for v in values:
        if v is False:
            return False
        if v is None:
            out = None
    return out


def _valid_word(v: bool | None) -> str:
    return "unknown" if v is None else str(v).lower()


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
class _Analysis:
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


def _end(a: Attempt) -> int:
    """The completion index of a completed attempt."""
    assert a.completion is not None
    return a.completion.index


def _per_label_sums(logical: Iterable[LogicalAdd]) -> dict[str, dict[str, int]]:
    """Per label key: ``acknowledged`` / ``unknown`` / ``failed`` (sums of
    ``by`` of ok / info / fail logical adds), ``adds``, ``info_adds``."""
    sums: dict[str, dict[str, int]] = {}
    for la in logical:
        s = sums.setdefault(
            la.label_key, {"acknowledged": 0, "unknown": 0, "failed": 0, "adds": 0, "info_adds": 0}
        )
        o = la.outcome
        s["adds"] += 1
        if o == OK:
            s["acknowledged"] += la.by
        elif o == FAIL:
            s["failed"] += la.by
        else:
            s["unknown"] += la.by
            s["info_adds"] += 1
    return sums


def _analyze(history: Sequence[Op]) -> _Analysis:
    pairs = attempts(history)
    adds: list[Attempt] = []
    reads: list[Attempt] = []
    totals: dict[int, dict[str, int]] = {}
    scrapes: list[tuple[Attempt, str, int | None, dict[str, int]]] = []
    logical: list[LogicalAdd] = []
    keyed: dict[tuple[str, str, int], LogicalAdd] = {}
    keys_of: dict[tuple[tuple[str, str], ...], str] = {}
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
        elif done is not None and done.type == OK:
            if inv.f == READ:
                reads.append(a)
                totals[done.index] = _totals(done)
            elif inv.f == SCRAPE:
                node, pid, values = _scrape(done)
                node_ids.add(node)
                scrapes.append((a, node, pid, values))
    reads.sort(key=_end)
    scrapes.sort(key=lambda s: _end(s[0]))
    times = [op.time for op in history]
    return _Analysis(
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
    return _analyze(history).logical


def _unknown(name: str, exc: HistoryError) -> Result:
    return Result(name, None, f"malformed history, not judged: {exc}", {}, [str(exc)])


def _run(name: str, history: Sequence[Op], fn: Callable[[_Analysis], Result]) -> Result:
    try:
        h = _analyze(history)
    except HistoryError as exc:
        return _unknown(name, exc)
    return fn(h)


# -- counter -----------------------------------------------------------------------


def _final_read(h: _Analysis) -> tuple[Attempt | None, str | None]:
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


def counter(history: Sequence[Op]) -> Result:
    """Jepsen's counter checker, per label set; see the module docstring.

    Details: ``label_sets`` (per label key: ``acknowledged`` = sum ok,
    ``unknown`` = sum info, ``failed`` = sum fail, ``final``, ``lost`` and
    ``phantom`` counts), ``reads`` checked, ``final_read`` index,
    ``violations`` (each: ``kind``, ``label_key``, ``read`` (completion
    index), ``invoke``, ``value``, ``lower``, ``upper``, ``final``).
    Valid: False on any violation; None without an ok read or if the last ok
    read overlaps an add; else True.
    """
    return _run("counter", history, _counter)


def _counter(h: _Analysis) -> Result:
    upper_at: dict[int, LogicalAdd] = {}
    lower_at: dict[int, LogicalAdd] = {}
    for la in h.logical:
        o = la.outcome
        if o != FAIL:
            upper_at[la.invoked] = la
        if o == OK:
            ack = la.acknowledged
            assert ack is not None
            lower_at[ack] = la
    read_at_invoke = {r.invoke.index: r for r in h.reads}
    read_at_end = {r.end: r for r in h.reads}
    final, final_problem = _final_read(h)

    lower: dict[str, int] = defaultdict(int)
    upper: dict[str, int] = defaultdict(int)
    snaps: dict[int, dict[str, int]] = {}
    violations: list[dict[str, Any]] = []
    tally: dict[str, Counter[str]] = defaultdict(Counter)
    seen: set[str] = set()
    for op in h.ops:
        i = op.index
        invoked = upper_at.get(i)
        if invoked is not None:
            upper[invoked.label_key] += invoked.by
        acked = lower_at.get(i)
        if acked is not None:
            lower[acked.label_key] += acked.by
        if i in read_at_invoke:
            snaps[i] = {k: v for k, v in lower.items() if v}
        r = read_at_end.get(i)
        if r is None:
            continue
        lo_snap = snaps.pop(r.invoke.index)
        values = h.totals[i]
        seen.update(values)
        for lk in values.keys() | lo_snap.keys():
            v, lo, hi = values.get(lk, 0), lo_snap.get(lk, 0), upper.get(lk, 0)
            if lo <= v <= hi:
                continue
            kind = LOST if v < lo else PHANTOM
            tally[lk][kind] += 1
            if len(violations) < MAX_REPORTED:
                violations.append(
                    {
                        "kind": kind,
                        "label_key": lk,
                        "read": i,
                        "invoke": r.invoke.index,
                        "value": v,
                        "lower": lo,
                        "upper": hi,
                        "final": r is final,
                    }
                )

    sums = h.sums
    final_values = None if final is None else h.totals[_end(final)]
    label_sets: dict[str, dict[str, Any]] = {}
    for lk in sorted(sums.keys() | seen):
        s = sums.get(lk, {"acknowledged": 0, "unknown": 0, "failed": 0})
        label_sets[lk] = {
            "acknowledged": s["acknowledged"],
            "unknown": s["unknown"],
            "failed": s["failed"],
            "final": None if final_values is None else final_values.get(lk, 0),
            LOST: tally[lk][LOST],
            PHANTOM: tally[lk][PHANTOM],
        }
    n_lost = sum(t[LOST] for t in tally.values())
    n_phantom = sum(t[PHANTOM] for t in tally.values())
    errors = [
        f"{v['kind']}: read op #{v['read']} (invoked #{v['invoke']}) saw {v['value']} for "
        f"{v['label_key']}, outside [{v['lower']}, {v['upper']}]"
        + (" (final read)" if v["final"] else "")
        for v in violations
    ]
    if n_lost + n_phantom > len(violations):
        errors.append(f"... {n_lost + n_phantom - len(violations)} more violations not listed")
    if final_problem is not None:
        errors.append(final_problem)
    valid = merge_valid([not (n_lost or n_phantom), None if final_problem else True])
    summary = (
        f"{len(h.reads)} ok reads of {len(label_sets)} label sets: "
        f"{n_lost} lost, {n_phantom} phantom"
    )
    if final_problem is not None:
        summary += f"; {final_problem}"
    return Result(
        "counter",
        valid,
        summary,
        {
            "reads": len(h.reads),
            "logical_adds": len(h.logical),
            "final_read": None if final is None else final.end,
            "label_sets": label_sets,
            "violations": violations,
        },
        errors,
    )


# -- exactly once ------------------------------------------------------------------


def exactly_once(history: Sequence[Op]) -> Result:
    """Idempotency keys count a retried add once; see the module docstring.

    Details per checked label set (``label_sets``): ``acknowledged``,
    ``unknown``, ``final``, ``adds``, ``retried`` (logical adds with more
    than one attempt), ``unresolved`` (logical adds left info) and
    ``status``: ``exact``, ``double_count``, ``lost``, ``unresolved``.
    ``skipped``: label sets that also got unkeyed adds.  Valid: False if any
    status is ``double_count`` or ``lost``; None if any is ``unresolved``,
    there is no ok read, or the final read overlaps an add; else True.
    """
    return _run("exactly_once", history, _exactly_once)


def _exactly_once(h: _Analysis) -> Result:
    keyed_only: dict[str, bool] = {}
    retried: Counter[str] = Counter()
    for la in h.logical:
        keyed_only[la.label_key] = keyed_only.get(la.label_key, True) and la.key is not None
        if len(la.attempts) > 1:
            retried[la.label_key] += 1
    checked = sorted(lk for lk, only in keyed_only.items() if only)
    skipped = sorted(lk for lk, only in keyed_only.items() if not only)
    sums = h.sums
    final, final_problem = _final_read(h)
    final_values = None if final is None else h.totals[_end(final)]
    label_sets: dict[str, dict[str, Any]] = {}
    errors: list[str] = []
    statuses: Counter[str] = Counter()
    for lk in checked:
        s = sums[lk]
        ok, info = s["acknowledged"], s["unknown"]
        fin = None if final_values is None else final_values.get(lk, 0)
        if fin is None or final_problem is not None:
            status = "unresolved"  # no final read to judge by
        elif fin < ok:
            status = LOST
        elif s["info_adds"] == 0:
            status = "exact" if fin == ok else DOUBLE_COUNT
        else:
            status = DOUBLE_COUNT if fin > ok + info else "unresolved"
        statuses[status] += 1
        label_sets[lk] = {
            "acknowledged": ok,
            "unknown": info,
            "final": fin,
            "adds": s["adds"],
            "retried": retried[lk],
            "unresolved": s["info_adds"],
            "status": status,
        }
        if status == LOST:
            errors.append(f"lost: {lk} final {fin} < {ok} acknowledged")
        elif status == DOUBLE_COUNT:
            errors.append(
                f"double count: {lk} final {fin} > {ok} acknowledged"
                + (f" + {info} unresolved" if s["info_adds"] else ", every keyed add resolved")
            )
    valid: bool | None
    if statuses[LOST] or statuses[DOUBLE_COUNT]:
        valid = False
    elif not checked:
        valid = True
    elif final_problem is not None:
        valid = None
        errors.append(final_problem)
    elif statuses["unresolved"]:
        valid = None
        errors.append(
            f"{statuses['unresolved']} label set(s) still have keyed adds of unknown outcome: "
            "exactly-once is not decided"
        )
    else:
        valid = True
    if not checked:
        summary = "no label set received only keyed adds: nothing to check"
    else:
        summary = f"{len(checked)} keyed label sets: " + ", ".join(
            f"{n} {st}" for st, n in sorted(statuses.items())
        )
    return Result(
        "exactly_once",
        valid,
        summary,
        {
            "final_read": None if final is None else final.end,
            "label_sets": label_sets,
            "skipped": skipped,
        },
        errors,
    )


# -- monotonic ---------------------------------------------------------------------


@dataclass(slots=True)
class _Track:
    """One series' completed observations: completion indices, the running
    max up to each, and where (op index, pid) that max was seen."""

    ends: list[int] = field(default_factory=list)
    maxes: list[int] = field(default_factory=list)
    sources: list[tuple[int, int | None]] = field(default_factory=list)


def _decreases(
    observations: Iterable[tuple[Attempt, str | None, int | None, dict[str, int]]],
    kind: str,
) -> tuple[list[dict[str, Any]], int]:
    """Observations (attempt, group, pid, values) in completion order; each is
    compared with the max of its group's observations that completed before
    it was invoked.  Returns the first ``MAX_REPORTED`` decreases and the count."""
    groups: dict[str | None, dict[str, _Track]] = {}
    found: list[dict[str, Any]] = []
    count = 0
    for a, group, pid, values in observations:
        end = a.end
        assert end is not None
        tracks = groups.setdefault(group, {})
        inv = a.invoke.index
        for lk, tr in tracks.items():
            pos = bisect_left(tr.ends, inv) - 1
            if pos < 0:
                continue
            prev, v = tr.maxes[pos], values.get(lk, 0)
            if v >= prev:
                continue
            count += 1
            if len(found) < MAX_REPORTED:
                src, src_pid = tr.sources[pos]
                found.append(
                    {
                        "kind": kind,
                        "node": group,
                        "label_key": lk,
                        "from": prev,
                        "to": v,
                        "from_index": src,
                        "to_index": end,
                        "from_pid": src_pid,
                        "to_pid": pid,
                        "pid_changed": src_pid != pid,
                    }
                )
        for lk, v in values.items():
            track = tracks.get(lk)
            if track is None:
                track = tracks[lk] = _Track()
            track.ends.append(end)
            if track.maxes and track.maxes[-1] >= v:
                track.maxes.append(track.maxes[-1])
                track.sources.append(track.sources[-1])
            else:
                track.maxes.append(v)
                track.sources.append((end, pid))
    return found, count


def monotonic(history: Sequence[Op]) -> Result:
    """Scraped node values and read totals never go backwards; see the module
    docstring.  Details: ``scrapes`` and ``reads`` checked, ``nodes`` (per
    node: ``scrapes``, ``pids`` in order of appearance, ``restarts`` = pid
    changes between successive scrapes), ``decreases`` (each: ``kind``
    ``scrape`` / ``read``, ``node`` (None for reads), ``label_key``,
    ``from``, ``to``, ``from_index``, ``to_index`` (completion indices),
    ``from_pid``, ``to_pid``, ``pid_changed``, and for a scrape across a
    restart ``unacknowledged``).  Valid: False on any decrease."""
    return _run("monotonic", history, _monotonic)


def _monotonic(h: _Analysis) -> Result:
    scrape_dec, n_scrape = _decreases(h.scrapes, SCRAPE)
    read_obs = ((r, None, None, h.totals[_end(r)]) for r in h.reads)
    read_dec, n_read = _decreases(read_obs, READ)
    nodes: dict[str, dict[str, Any]] = {}
    last_pid: dict[str, int | None] = {}
    for _, node, pid, _ in h.scrapes:
        n = nodes.setdefault(node, {"scrapes": 0, "pids": [], "restarts": 0})
        n["scrapes"] += 1
        if node in last_pid and last_pid[node] != pid:
            n["restarts"] += 1
        last_pid[node] = pid
        if pid not in n["pids"]:
            n["pids"].append(pid)
    # Unacknowledged add attempts per label key: invoke indices (ascending)
    # and the running sum of their ``by``.
    info_attempts = sorted(
        (a.invoke.index, la.label_key, la.by)
        for la in h.logical
        for a in la.attempts
        if a.outcome == INFO
    )
    unacked: dict[str, tuple[list[int], list[int]]] = {}
    for i, lk, by in info_attempts:
        idx, cum = unacked.setdefault(lk, ([], []))
        idx.append(i)
        cum.append((cum[-1] if cum else 0) + by)
    decreases = (scrape_dec + read_dec)[:MAX_REPORTED]
    errors = []
    for d in decreases:
        where = f"node {d['node']}" if d["kind"] == SCRAPE else "cluster reads"
        restart = ""
        if d["kind"] == SCRAPE:
            restart = (
                f" across a restart (pid {d['from_pid']} -> {d['to_pid']})"
                if d["pid_changed"]
                else f" within pid {d['to_pid']}"
            )
        if d["kind"] == SCRAPE and d["pid_changed"]:
            idx, cum = unacked.get(d["label_key"], ([], []))
            pos = bisect_left(idx, d["from_index"])
            d["unacknowledged"] = cum[pos - 1] if pos else 0
            restart += f"; {d['unacknowledged']} unacknowledged before it"
        errors.append(
            f"decrease: {where} {d['label_key']} went {d['from']} (op #{d['from_index']}) -> "
            f"{d['to']} (op #{d['to_index']}){restart}"
        )
    total = n_scrape + n_read
    if total > len(decreases):
        errors.append(f"... {total - len(decreases)} more decreases not listed")
    return Result(
        "monotonic",
        total == 0,
        f"{len(h.scrapes)} scrapes of {len(nodes)} nodes, {len(h.reads)} reads: "
        f"{n_scrape} scrape and {n_read} read decreases",
        {
            "scrapes": len(h.scrapes),
            "reads": len(h.reads),
            "nodes": nodes,
            "scrape_decreases": n_scrape,
            "read_decreases": n_read,
            "decreases": decreases,
        },
        errors,
    )


# -- availability ------------------------------------------------------------------


def _count_in(sorted_times: Sequence[float], start: float, end: float) -> int:
    return bisect_right(sorted_times, end) - bisect_left(sorted_times, start)


def _next_after(sorted_times: Sequence[float], start: float) -> float | None:
    i = bisect_left(sorted_times, start)
    return sorted_times[i] - start if i < len(sorted_times) else None


def _rate(n: int, seconds: float) -> float | None:
    return n / seconds if seconds > 0 else None


def availability(history: Sequence[Op], faults: Sequence[Fault] = ()) -> Result:
    """What clients saw during the faults; see the module docstring.

    An attempt is placed in time at its completion (an attempt left open:
    at its invoke); windows are closed intervals ``[start, end]``, clipped
    to the run (first to last op) for the throughput figures.

    Details: ``attempts`` (``ok``, ``fail``, ``info``, ``unfinished``, the
    last included in ``info``), ``errors`` (fail + info), ``error_texts``
    (the 10 most frequent), ``run`` (``start``, ``end``, ``seconds``),
    ``throughput`` (``steady`` / ``faulted`` ok adds per second and their
    ``*_ok`` and ``*_seconds``), ``faults`` (per fault: ``kind``,
    ``target``, ``start``, ``end``, ``errors``, ``fail``, ``info``, ``ok``,
    ``throughput``, ``to_next_ok`` (seconds from start to the next ok add,
    None if never), ``target_is_node``, ``to_next_ok_on_target`` (to the
    next ok add the target node answered; None if never or not a node)).
    Valid: False if no add attempt was ok, else True.
    """
    return _run("availability", history, lambda h: _availability(h, faults))


def _availability(h: _Analysis, faults: Sequence[Fault]) -> Result:
    counts: Counter[str] = Counter({OK: 0, FAIL: 0, INFO: 0})
    unfinished = 0
    ok_times: list[float] = []
    ok_by_node: dict[str, list[float]] = defaultdict(list)
    fail_times: list[float] = []
    info_times: list[float] = []
    texts: Counter[str] = Counter()
    for a in h.adds:
        done = a.completion
        if done is None:
            unfinished += 1
            counts[INFO] += 1
            info_times.append(a.invoke.time)
            texts["(no completion)"] += 1
            continue
        counts[done.type] += 1
        if done.type == OK:
            ok_times.append(done.time)
            if done.node is not None:
                ok_by_node[done.node].append(done.time)
        else:
            (fail_times if done.type == FAIL else info_times).append(done.time)
            texts[done.error or f"({done.type})"] += 1
    ok_times.sort()
    fail_times.sort()
    info_times.sort()
    for times in ok_by_node.values():
        times.sort()

    start, end = h.first_time, h.last_time
    windows = sorted(
        (max(f.start, start), min(f.end, end)) for f in faults if f.end >= start and f.start <= end
    )
    merged: list[list[float]] = []
    for s, e in windows:
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    faulted_seconds = sum(e - s for s, e in merged)
    faulted_ok = sum(_count_in(ok_times, s, e) for s, e in merged)
    steady_seconds = max(end - start - faulted_seconds, 0.0)
    steady_ok = len(ok_times) - faulted_ok

    per_fault: list[dict[str, Any]] = []
    for f in faults:
        n_fail = _count_in(fail_times, f.start, f.end)
        n_info = _count_in(info_times, f.start, f.end)
        n_ok = _count_in(ok_times, f.start, f.end)
        node = f.target.split(" ", 1)[0]  # "node-2 (node-2.a, isolate)": a partition's target
        is_node = node in h.node_ids
        per_fault.append(
            {
                "kind": f.kind,
                "target": f.target,
                "start": f.start,
                "end": f.end,
                "errors": n_fail + n_info,
                "fail": n_fail,
                "info": n_info,
                "ok": n_ok,
                "throughput": _rate(n_ok, f.end - f.start),
                "to_next_ok": _next_after(ok_times, f.start),
                "target_is_node": is_node,
                "to_next_ok_on_target": (
                    _next_after(ok_by_node.get(node, []), f.start) if is_node else None
                ),
            }
        )
    steady_rate = _rate(steady_ok, steady_seconds)
    faulted_rate = _rate(faulted_ok, faulted_seconds)
    n_errors = counts[FAIL] + counts[INFO]
    valid = counts[OK] > 0

    def fmt(rate: float | None) -> str:
        return "n/a" if rate is None or math.isnan(rate) else f"{rate:.1f}"

    summary = (
        f"{counts[OK]} ok, {counts[FAIL]} fail, {counts[INFO]} info add attempts; "
        f"{fmt(steady_rate)} ok/s steady, {fmt(faulted_rate)} ok/s during {len(faults)} faults"
    )
    return Result(
        "availability",
        valid,
        summary,
        {
            "attempts": {
                OK: counts[OK],
                FAIL: counts[FAIL],
                INFO: counts[INFO],
                "unfinished": unfinished,
            },
            "errors": n_errors,
            "error_texts": dict(texts.most_common(10)),
            "run": {"start": start, "end": end, "seconds": end - start},
            "throughput": {
                "steady": steady_rate,
                "faulted": faulted_rate,
                "steady_ok": steady_ok,
                "faulted_ok": faulted_ok,
                "steady_seconds": steady_seconds,
                "faulted_seconds": faulted_seconds,
            },
            "faults": per_fault,
        },
        [] if valid else ["no add was ever acknowledged"],
    )


# -- composition -------------------------------------------------------------------


def compose(results: Iterable[Result], name: str = "valid") -> Result:
    """One result for several: ``valid`` merged with ``merge_valid`` (false
    outranks unknown outranks true), ``details["results"]`` each one's
    validity by name, every error prefixed with its checker's name."""
    results = list(results)
    valid = merge_valid(r.valid for r in results)
    by_word: dict[str, list[str]] = defaultdict(list)
    for r in results:
        by_word[_valid_word(r.valid)].append(r.name)
    parts = [f"{w}: {', '.join(by_word[w])}" for w in ("false", "unknown", "true") if by_word[w]]
    return Result(
        name,
        valid,
        f"{_valid_word(valid)} ({'; '.join(parts) or 'no checkers'})",
        {"results": {r.name: r.valid for r in results}},
        [f"{r.name}: {e}" for r in results for e in r.errors],
    )


def check(history: Sequence[Op], faults: Sequence[Fault] = ()) -> dict[str, Result]:
    """Every checker on one history (taken apart once): ``counter``,
    ``exactly_once``, ``monotonic``, ``availability``, and ``valid``, their
    composition."""
    names = ("counter", "exactly_once", "monotonic", "availability")
    try:
        h = _analyze(history)
    except HistoryError as exc:
        out = {n: _unknown(n, exc) for n in names}
    else:
        out = {
            "counter": _counter(h),
            "exactly_once": _exactly_once(h),
            "monotonic": _monotonic(h),
            "availability": _availability(h, faults),
        }
    out["valid"] = compose(out.values())
    return out
