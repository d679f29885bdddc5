"""A run's history: every operation a client did, as JSON lines (Jepsen's model).

Each client *process* does one thing at a time and records it twice: an
``invoke`` when it starts, then exactly one completion when it ends:

- ``ok``: it happened (an ``add`` answered 200: durable and counted);
- ``fail``: it is known **not** to have happened (a 4xx: nothing changed);
- ``info``: the outcome is unknown (a timeout, a connection reset after the
  request was sent, any 5xx: a 503 from keepcount may still be counted by a
  later flush of that node).  A process whose invoke has no completion at the
  end of the history is treated as ``info`` too.

Operations (``Op.f``) and their ``value``:

- ``add``: one increment, ``{"labels": {...}, "by": int}`` on the invoke and
  the completion alike.  ``key`` is its ``Idempotency-Key`` (None: unkeyed).
  A keyed add whose attempt ended ``info`` is retried **with the same key** by
  the same process: several invoke/completion pairs, one logical increment.
- ``read``: cluster totals through the load balancer; ok value
  ``{"totals": {label_key: int}}``.
- ``scrape``: one node's own values from its ``/metrics``; ok value
  ``{"node": str, "pid": int, "values": {label_key: int}}``.
- ``settle``: an abandoned keyed add's key settled (``GET
  /v1/idempotency/{key}``): ``key`` and ``value`` as the add's; ok value
  ``{"labels", "by", "applied": bool}`` (final: counted once, or never);
  ``info`` while in flight or when the ask failed.

``value`` is None where there is nothing (a read's invoke, a failed scrape).
``node`` is the node that answered (taken from the answer), ``error`` the error
text of a ``fail`` / ``info``.  ``time`` is seconds since the run started
(monotonic clock); ``index`` is the position in the history, in the order the
events happened, and is the order every checker uses.

File format: one JSON object per line, the fields of ``Op`` by name, UTF-8::

    {"index": 0, "process": 3, "type": "invoke", "f": "add", "time": 0.0012,
     "value": {"labels": {"route": "/"}, "by": 1}, "key": "p3-17", "node": null, "error": null}

Example::

    with HistoryWriter(path) as w:
        op = w.record(process=0, type="invoke", f="read", time=0.5)
    assert read_history(path) == [op]
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "ADD",
    "COMPLETIONS",
    "FAIL",
    "FUNCTIONS",
    "INFO",
    "INVOKE",
    "OK",
    "READ",
    "SCRAPE",
    "SETTLE",
    "TYPES",
    "Attempt",
    "HistoryError",
    "HistoryWriter",
    "Op",
    "attempts",
    "label_key",
    "read_history",
]

INVOKE = "invoke"
OK = "ok"
FAIL = "fail"
INFO = "info"
TYPES = frozenset({INVOKE, OK, FAIL, INFO})
COMPLETIONS = frozenset({OK, FAIL, INFO})

ADD = "add"
READ = "read"
SCRAPE = "scrape"
SETTLE = "settle"
FUNCTIONS = frozenset({ADD, READ, SCRAPE, SETTLE})

_FIELDS = ("index", "process", "type", "f", "time", "value", "key", "node", "error")


class HistoryError(ValueError):
    """A history that breaks the model: a bad line or field, a completion
    without an invoke, a process invoking twice, indices out of order.  It
    is a bug of the recorder, not of the system under test, so checkers judge
    such a history *unknown*, never false."""


def label_key(labels: Mapping[str, str]) -> str:
    """The key of a label set in ``read`` totals and ``scrape`` values:
    ``json.dumps(labels, sort_keys=True)``.

    >>> label_key({"status": "200", "route": "/"})
    '{"route": "/", "status": "200"}'
    """
    return json.dumps(dict(labels), sort_keys=True)


def _opt_str(data: Mapping[str, Any], name: str) -> str | None:
    v = data.get(name)
    if v is not None and not isinstance(v, str):
        raise HistoryError(f"op field {name!r} must be a string or null, not {v!r}")
    return v


def _int(data: Mapping[str, Any], name: str) -> int:
    v = data.get(name)
    if not isinstance(v, int) or isinstance(v, bool):
        raise HistoryError(f"op field {name!r} must be an integer, not {v!r}")
    return v


@dataclass(frozen=True, slots=True)
class Op:
    """One event of a history; see the module docstring for the fields.

    >>> op = Op(0, 1, "invoke", "add", 0.25, {"labels": {"r": "/"}, "by": 1}, key="k1")
    >>> Op.from_json(op.to_json()) == op
    True

    Invariants (checked on construction, ``HistoryError``): ``type`` is one of
    ``TYPES``, ``f`` one of ``FUNCTIONS``, ``index >= 0``.
    """

    index: int
    process: int
    type: str
    f: str
    time: float
    value: Any = None
    key: str | None = None
    node: str | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        if self.type not in TYPES:
            raise HistoryError(
                f"op #{self.index}: type {self.type!r} is not one of {sorted(TYPES)}"
            )
        if self.f not in FUNCTIONS:
            raise HistoryError(f"op #{self.index}: f {self.f!r} is not one of {sorted(FUNCTIONS)}")
        if self.index < 0:
            raise HistoryError(f"op index {self.index} is negative")

    def to_dict(self) -> dict[str, Any]:
        """The op as a JSON-able dict, every field present."""
        return {name: getattr(self, name) for name in _FIELDS}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Op:
        """The inverse of ``to_dict``; unknown fields are refused
        (``HistoryError``), missing optional ones are None."""
        extra = set(data) - set(_FIELDS)
        if extra:
            raise HistoryError(f"unknown op fields {sorted(extra)}")
        t = data.get("time")
        if not isinstance(t, int | float) or isinstance(t, bool):
            raise HistoryError(f"op field 'time' must be a number, not {t!r}")
        typ, f = data.get("type"), data.get("f")
        if not isinstance(typ, str) or not isinstance(f, str):
            raise HistoryError(f"op fields 'type' and 'f' must be strings, not {typ!r}, {f!r}")
        return cls(
            index=_int(data, "index"),
            process=_int(data, "process"),
            type=typ,
            f=f,
            time=float(t),
            value=data.get("value"),
            key=_opt_str(data, "key"),
            node=_opt_str(data, "node"),
            error=_opt_str(data, "error"),
        )

    def to_json(self) -> str:
        """One line of the history file (no newline)."""
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> Op:
        """The inverse of ``to_json`` (``HistoryError`` if it is not an op)."""
        try:
            data = json.loads(line)
        except ValueError as exc:
            raise HistoryError(f"not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise HistoryError(f"an op is a JSON object, not {type(data).__name__}")
        return cls.from_dict(data)


def read_history(path: str | os.PathLike[str]) -> list[Op]:
    """Every op of a history file, in file order; blank lines are skipped.
    A line that is not an op raises ``HistoryError`` naming the file and line."""
    ops: list[Op] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                ops.append(Op.from_json(line))
            except HistoryError as exc:
                raise HistoryError(f"{path}:{lineno}: {exc}") from None
    return ops


class HistoryWriter:
    """Appends ops to a history file, one JSON line each, flushed per line
    (a killed workload leaves every recorded op in the file).

    Safe for the tasks of one asyncio loop and for threads: each op is
    written and flushed under a lock, and ``record`` allocates the next
    ``index`` under the same lock, so file order is index order.  Indices
    continue after the ops already in the file (0 for a new file).

    >>> with HistoryWriter(path) as w:                               # doctest: +SKIP
    ...     w.record(process=0, type="invoke", f="add", time=0.1,
    ...              value={"labels": {"route": "/"}, "by": 1}, key="k0")
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        existing = 0
        if self.path.exists():
            with open(self.path, encoding="utf-8") as fh:
                existing = sum(1 for line in fh if line.strip())
        self._next = existing
        self._lock = threading.Lock()
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()

    @property
    def closed(self) -> bool:
        return self._file.closed

    @property
    def next_index(self) -> int:
        """The index ``record`` gives the next op."""
        return self._next

    def write(self, op: Op) -> None:
        """Append ``op`` as it is (its index is the caller's business) and flush."""
        line = op.to_json() + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()
            self._next = max(self._next, op.index + 1)

    def record(
        self,
        *,
        process: int,
        type: str,
        f: str,
        time: float,
        value: Any = None,
        key: str | None = None,
        node: str | None = None,
        error: str | None = None,
    ) -> Op:
        """Build the op with the next index, append it, flush, and return it."""
        with self._lock:
            op = Op(self._next, process, type, f, time, value, key, node, error)
            self._file.write(op.to_json() + "\n")
            self._file.flush()
            self._next += 1
        return op

    def close(self) -> None:
        with self._lock:
            self._file.close()

    def __enter__(self) -> HistoryWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@dataclass(frozen=True, slots=True)
class Attempt:
    """One invoke and its completion (None: the history ended before it)."""

    invoke: Op
    completion: Op | None

    @property
    def outcome(self) -> str:
        """``ok``, ``fail`` or ``info`` (no completion counts as ``info``)."""
        return INFO if self.completion is None else self.completion.type

    @property
    def end(self) -> int | None:
        """The completion's index, None if there is none."""
        return None if self.completion is None else self.completion.index


def attempts(history: Sequence[Op]) -> list[Attempt]:
    """Pair each invoke with its process's next completion; the attempts
    come in invoke order (an invoke still open at the end has completion None).

    Raises ``HistoryError`` if indices do not strictly increase, a process
    invokes while its previous op is still open, or a completion has no open
    invoke of the same ``f`` on its process.
    """
    pending: dict[int, Op] = {}
    done: dict[int, Attempt] = {}
    order: list[Op] = []
    last = -1
    for op in history:
        if op.index <= last:
            raise HistoryError(f"op #{op.index} follows op #{last}: indices must increase")
        last = op.index
        if op.type == INVOKE:
            if op.process in pending:
                raise HistoryError(
                    f"process {op.process} invoked op #{op.index} while "
                    f"op #{pending[op.process].index} is still open"
                )
            pending[op.process] = op
            order.append(op)
            continue
        inv = pending.pop(op.process, None)
        if inv is None:
            raise HistoryError(
                f"op #{op.index} ({op.type}) has no open invoke on process {op.process}"
            )
        if inv.f != op.f:
            raise HistoryError(
                f"op #{op.index} completes a {op.f!r} but #{inv.index} invoked {inv.f!r}"
            )
        done[inv.index] = Attempt(inv, op)
    return [done.get(inv.index) or Attempt(inv, None) for inv in order]
