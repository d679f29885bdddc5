"""The checkers of ``keepcount verify``: pure functions of a history (Jepsen style).

Each checker takes a history (``verify.history``; ops in index order) and
returns a ``Result`` whose ``valid`` is True, False or None (unknown: the
history cannot decide).  They do no I/O and read no clock; each runs in
O(n log n) time for a history of n ops (the reads' label sets aside: a read
is compared label set by label set).  One module per concept, each stating
its checker's contract:

- ``verify.analysis``: the history taken apart once, and the *logical adds*
  (an increment and its retries with the same key) every checker judges;
- ``verify.counter``: ``counter`` (Jepsen's counter: each read between the
  acknowledged and the possible sum; below is lost, above is phantom) and
  ``exactly_once`` (keyed adds counted exactly once by the final read);
- ``verify.monotonic``: ``monotonic`` (G3: no node value and no total ever
  goes backwards, across restarts);
- ``verify.availability``: ``availability`` (informational: errors and
  throughput inside and outside the fault windows);
- ``verify.verdict``: ``Result``, ``Fault``, ``merge_valid`` and ``compose``
  (false outranks unknown outranks true: Jepsen's ``merge-valid``).

This module is the front door: every public name above is importable from
here, and ``check`` runs them all on one history, taken apart once.

Example::

    from keepcount.verify.history import read_history
    results = check(read_history("history.jsonl"), faults)
    assert results["valid"].valid is True, results["valid"].summary
"""

from __future__ import annotations

from collections.abc import Sequence

from keepcount.verify.analysis import LogicalAdd, analyze, logical_adds, malformed
from keepcount.verify.availability import availability, availability_of
from keepcount.verify.counter import counter, counter_of, exactly_once, exactly_once_of
from keepcount.verify.history import HistoryError, Op
from keepcount.verify.monotonic import monotonic, monotonic_of
from keepcount.verify.verdict import MAX_REPORTED, Fault, Result, compose, merge_valid

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


def check(history: Sequence[Op], faults: Sequence[Fault] = ()) -> dict[str, Result]:
    """Every checker on one history (taken apart once): ``counter``,
    ``exactly_once``, ``monotonic``, ``availability``, and ``valid``, their
    composition."""
    names = ("counter", "exactly_once", "monotonic", "availability")
    try:
        h = analyze(history)
    except HistoryError as exc:
        out = {n: malformed(n, exc) for n in names}
    else:
        out = {
            "counter": counter_of(h),
            "exactly_once": exactly_once_of(h),
            "monotonic": monotonic_of(h),
            "availability": availability_of(h, faults),
        }
    out["valid"] = compose(out.values())
    return out
