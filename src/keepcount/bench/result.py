"""What a benchmark returns: figures side by side with a peer, as a ratio.

The machine a benchmark runs on is shared and noisy, so an absolute figure
alone says little; every ``Comparison`` therefore carries the peer's figure
measured in the same run, interleaved with ours, and the ratio of the two.
A ``Target`` states what the ratio (or our own figure) should be; whether it
was met is recorded, never asserted: benchmarks measure, tests assert.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "BenchError",
    "BenchResult",
    "Comparison",
    "Report",
    "Settings",
    "Target",
    "settings_json",
]

Report = Callable[[int, int, str], None]
"""Progress callback: ``report(done, total, text)``; the CLI draws it."""


class BenchError(Exception):
    """A benchmark cannot run here (a peer is missing, a server would not start)."""


@dataclass(frozen=True, slots=True)
class Settings:
    """How big and how long: the full run, or ``quick`` for a CI smoke test."""

    workdir: Path
    """A directory on disk (not tmpfs: fsync must cost what it costs)."""
    quick: bool = False
    duration: float = 5.0
    """Seconds per throughput measurement (each side, each repetition)."""


_OPS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">=": operator.ge,
    ">": operator.gt,
}


@dataclass(frozen=True, slots=True)
class Target:
    """A bound on the ratio (``of="ratio"``) or on our own figure (``of="ours"``)."""

    of: Literal["ratio", "ours"]
    op: Literal["<", "<=", ">=", ">"]
    bound: float
    unit: str = "x"

    def met(self, ours: float, ratio: float) -> bool:
        return _OPS[self.op](ratio if self.of == "ratio" else ours, self.bound)

    def __str__(self) -> str:
        if self.of == "ratio":
            return f"ratio {self.op} {self.bound:.1f}x"
        return f"keepcount {self.op} {self.bound:g} {self.unit}"


@dataclass(slots=True)
class Comparison:
    """One measure: keepcount's median figure, the peer's, and ours / peer."""

    measure: str
    unit: str
    ours: float
    peer: float
    peer_name: str
    target: Target | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    """Machine-readable extras, written to the JSON."""
    note: str = ""
    """A short human-readable aside for the table (e.g. a breakdown)."""

    @property
    def ratio(self) -> float:
        return self.ours / self.peer if self.peer else float("inf")

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.target.met(self.ours, self.ratio)

    def to_json(self) -> dict[str, Any]:
        return {
            "measure": self.measure,
            "unit": self.unit,
            "keepcount": self.ours,
            "peer": self.peer,
            "peer_name": self.peer_name,
            "ratio": self.ratio,
            "target": None if self.target is None else str(self.target),
            "met": self.met,
            "detail": self.detail,
            "note": self.note,
        }


@dataclass(slots=True)
class BenchResult:
    """Everything one benchmark measured; ``notes`` hold context (sizes, counts)."""

    name: str
    title: str
    comparisons: list[Comparison] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "seconds": self.seconds,
            "comparisons": [c.to_json() for c in self.comparisons],
            "notes": self.notes,
        }


def settings_json(settings: Settings) -> dict[str, Any]:
    out = asdict(settings)
    out["workdir"] = str(settings.workdir)
    return out
