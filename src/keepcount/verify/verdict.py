"""What a checker concludes, and how conclusions combine (Jepsen's ``merge-valid``).

A checker (``keepcount.verify.checker``) returns a ``Result`` whose ``valid``
is True, False or None (unknown: the history cannot decide).  ``compose``
merges several: false outranks unknown outranks true.  ``Fault`` is a
nemesis's fault window, which the availability checker and the report place
in time.

Example::

    ok = Result("a", True, "fine")
    unknown = Result("b", None, "cannot tell", errors=["no final read"])
    compose([ok, unknown]).valid is None
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MAX_REPORTED", "Fault", "Result", "compose", "merge_valid"]

MAX_REPORTED = 100
"""Violations listed in full per result; the rest are only counted (a broken
system loses at every read after the loss: a 1M-op history could list 100k)."""


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
