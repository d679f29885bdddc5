"""The monotonic checker (G3: no resets): node values and totals never go back.

``monotonic``
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
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from keepcount.verify.analysis import Analysis, completed_at, judge
from keepcount.verify.history import INFO, READ, SCRAPE, Attempt, Op
from keepcount.verify.verdict import MAX_REPORTED, Result

__all__ = ["monotonic", "monotonic_of"]


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
    return judge("monotonic", history, monotonic_of)


def monotonic_of(h: Analysis) -> Result:
    scrape_dec, n_scrape = _decreases(h.scrapes, SCRAPE)
    read_obs = ((r, None, None, h.totals[completed_at(r)]) for r in h.reads)
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
