"""The sum checkers: Jepsen's counter, and exactly-once under idempotency keys.

Both judge the logical adds of ``keepcount.verify.analysis`` against the ok
reads of the cluster totals.

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
    final read is already outside ``[sum ok, sum ok + sum info]``.  An
    abandoned add settled *applied* counts as ok, one settled *not applied*
    as fail (``keepcount.verify.analysis``): so the final read must equal
    the acknowledged plus the settled-applied, and an add that landed after
    it was settled not applied is a double count.  A settle that says not
    applied for an acknowledged add is a **contradiction** (invalid).

Both run in O(n log n) for a history of n ops (the reads' label sets aside).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

from keepcount.verify.analysis import (
    DOUBLE_COUNT,
    LOST,
    PHANTOM,
    Analysis,
    LogicalAdd,
    completed_at,
    final_read,
    judge,
)
from keepcount.verify.history import FAIL, OK, Op
from keepcount.verify.verdict import MAX_REPORTED, Result, merge_valid

__all__ = ["counter", "counter_of", "exactly_once", "exactly_once_of"]


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
    return judge("counter", history, counter_of)


def counter_of(h: Analysis) -> Result:
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
    final, final_problem = final_read(h)

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
    final_values = None if final is None else h.totals[completed_at(final)]
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


def exactly_once(history: Sequence[Op]) -> Result:
    """Idempotency keys count a retried add once; see the module docstring.

    Details per checked label set (``label_sets``): ``acknowledged``,
    ``unknown``, ``final``, ``adds``, ``retried`` (logical adds with more
    than one attempt), ``unresolved`` (logical adds left info),
    ``settled_applied`` / ``settled_not_applied`` (abandoned adds settled
    so) and ``status``: ``exact``, ``double_count``, ``lost``,
    ``unresolved``.  ``skipped``: label sets that also got unkeyed adds.
    ``settled``: abandoned adds settled ``applied`` / ``not_applied`` in
    all; ``contradictions``: adds settled not applied after an ok attempt.
    Valid: False if any status is ``double_count`` or ``lost`` or there is
    a contradiction; None if any is ``unresolved``,
    there is no ok read, or the final read overlaps an add; else True.
    """
    return judge("exactly_once", history, exactly_once_of)


def exactly_once_of(h: Analysis) -> Result:
    keyed_only: dict[str, bool] = {}
    retried: Counter[str] = Counter()
    contradictions: list[LogicalAdd] = []
    for la in h.logical:
        keyed_only[la.label_key] = keyed_only.get(la.label_key, True) and la.key is not None
        if len(la.attempts) > 1:
            retried[la.label_key] += 1
        if la.contradiction:
            contradictions.append(la)
    checked = sorted(lk for lk, only in keyed_only.items() if only)
    skipped = sorted(lk for lk, only in keyed_only.items() if not only)
    sums = h.sums
    final, final_problem = final_read(h)
    final_values = None if final is None else h.totals[completed_at(final)]
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
            "settled_applied": s["settled_applied"],
            "settled_not_applied": s["settled_not_applied"],
            "status": status,
        }
        if status == LOST:
            errors.append(f"lost: {lk} final {fin} < {ok} acknowledged")
        elif status == DOUBLE_COUNT:
            errors.append(
                f"double count: {lk} final {fin} > {ok} acknowledged"
                + (f" + {info} unresolved" if s["info_adds"] else ", every keyed add resolved")
            )
    for la in contradictions[:MAX_REPORTED]:
        errors.append(
            f"contradiction: key {la.key!r} ({la.label_key}) was settled not applied "
            f"after an attempt was acknowledged (op #{la.acknowledged})"
        )
    settled = {
        "applied": sum(s["settled_applied"] for s in sums.values()),
        "not_applied": sum(s["settled_not_applied"] for s in sums.values()),
    }
    valid: bool | None
    if statuses[LOST] or statuses[DOUBLE_COUNT] or contradictions:
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
    if settled["applied"] or settled["not_applied"] or contradictions:
        summary += (
            f"; abandoned keys settled: {settled['applied']} applied, "
            f"{settled['not_applied']} not applied"
        )
        if contradictions:
            summary += f", {len(contradictions)} contradicted"
    return Result(
        "exactly_once",
        valid,
        summary,
        {
            "final_read": None if final is None else final.end,
            "label_sets": label_sets,
            "skipped": skipped,
            "settled": settled,
            "contradictions": len(contradictions),
        },
        errors,
    )
