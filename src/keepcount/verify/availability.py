"""The availability checker (informational): what clients saw during faults.

``availability``
    Valid unless no add was ever acknowledged.  Counts add attempts by
    outcome, client-visible errors (fail + info attempts, at their
    completion time) overall and inside each fault window, per fault the
    seconds from its start to the next ok add and to the next ok add the
    faulted node answered, and ok adds per second outside and inside faults.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

from keepcount.verify.analysis import Analysis, judge
from keepcount.verify.history import FAIL, INFO, OK, Op
from keepcount.verify.verdict import Fault, Result

__all__ = ["availability", "availability_of"]


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
    return judge("availability", history, lambda h: availability_of(h, faults))


def availability_of(h: Analysis, faults: Sequence[Fault]) -> Result:
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
