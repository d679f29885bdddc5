"""Metric families and their labelled children, in memory.

A family (``Counter``, ``Histogram``) owns one child per label set.  A
child's ``inc()`` / ``observe()`` touches memory only: it updates the value
under the registry's lock and, the first time since the last flush, appends
the child to the registry's dirty list.  The group commit (``commit.py``)
takes that list, writes the children's absolute values and clears it.

Invariants:

- A counter child's value is an ``int`` in ``[0, 2**63 - 1]`` and only grows.
- A child is on the dirty list exactly when its ``_dirty`` flag is set; both
  change only under the registry lock.
- Children restored from the store are created lazily: a family keeps the
  restored raw values (``_restored``, label key -> value) and turns one into a
  child on the first ``labels()`` call for it, so restoring a million series
  costs one dict, not a million objects.

Example::

    >>> import threading
    >>> fam = Counter.standalone("jobs_total", "Jobs run", ["queue"])
    >>> fam.labels(queue="email").inc(3)
    >>> fam.labels("email").value
    3
"""

from __future__ import annotations

import json
import math
import operator
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from itertools import pairwise
from typing import Any, ClassVar, Generic, TypeVar

from keepcount.errors import CardinalityError, DefinitionConflict, InvalidInput
from keepcount.naming import check_label_names, check_metric_name, label_value
from keepcount.stores.base import FamilyDef, Kind, SeriesValue

__all__ = [
    "DEFAULT_BUCKETS",
    "DEFAULT_MAX_CHILDREN",
    "MAX_VALUE",
    "Counter",
    "CounterChild",
    "Histogram",
    "HistogramChild",
    "HistogramValue",
    "MetricFamily",
    "decode_label_key",
    "label_key",
]

MAX_VALUE = 2**63 - 1
"""Largest counter value: what every store can hold as a signed 64-bit int."""

DEFAULT_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, math.inf,
)  # fmt: skip
"""The same latency buckets as prometheus_client, in seconds."""

DEFAULT_MAX_CHILDREN = 10_000
"""Label sets per family before ``labels()`` refuses new ones.

A family that grows past this is almost always a bug (a user id or a raw path
as a label value); each label set costs memory, a row in every restore and a
series in every scrape.  Raise it per family or per registry when meant."""


def label_key(values: tuple[str, ...]) -> str:
    """The stored key of a label set: its values as a compact JSON array."""
    return json.dumps(values, ensure_ascii=False, separators=(",", ":"))


def decode_label_key(key: str) -> tuple[str, ...]:
    return tuple(json.loads(key))


def _amount(amount: object) -> int:
    """Slow path of ``inc()``: accept any integral non-negative number."""
    if isinstance(amount, bool) or not hasattr(amount, "__index__"):
        raise InvalidInput(f"amount must be a non-negative integer, not {amount!r}")
    value = operator.index(amount)
    if value < 0:
        raise InvalidInput(f"amount must be a non-negative integer, not {value}")
    return value


def _observation(value: object) -> float:
    if isinstance(value, bool | str | bytes) or not hasattr(value, "__float__"):
        raise InvalidInput(f"observation must be a number, not {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise InvalidInput(f"observation must be finite, not {value!r}")
    return value


class _Shared:
    """What every family and child of one registry shares."""

    __slots__ = ("dirty", "lock", "mark", "meta_dirty")

    def __init__(self, lock: threading.Lock, dirty: list[Any], meta_dirty: list[Any]) -> None:
        self.lock = lock
        self.dirty = dirty
        self.mark: Callable[[Any], None] = dirty.append
        self.meta_dirty = meta_dirty


class CounterChild:
    """One label set of a counter: an integer that only grows."""

    __slots__ = (
        "_dirty", "_durable", "_lock", "_mark", "_value", "created", "family", "key",
        "labelvalues",
    )  # fmt: skip

    def __init__(
        self, family: Counter, values: tuple[str, ...], key: str, value: int, created: float | None
    ) -> None:
        self.family = family
        self.labelvalues = values
        self.key = key
        self.created = created
        self._value = value
        self._durable: SeriesValue = value
        """The value as of the last successful flush (what the store holds for sure)."""
        self._dirty = False
        self._lock = family._shared.lock
        self._mark = family._shared.mark

    def inc(self, amount: int = 1) -> None:
        """Add ``amount`` (a non-negative int) in memory; durable after ``commit()``."""
        if amount.__class__ is not int or amount < 0:
            amount = _amount(amount)
        with self._lock:
            value = self._value + amount
            if value > MAX_VALUE:
                raise InvalidInput(
                    f"{self.family.name}: value would pass 2**63-1; increment refused"
                )
            self._value = value
            if not self._dirty:
                self._dirty = True
                self._mark(self)

    @property
    def value(self) -> int:
        return self._value

    @property
    def durable_value(self) -> int:
        """The value as of the last successful flush: the least a restart
        restores.  What ``/metrics`` and the HTTP API expose."""
        value = self._durable
        assert isinstance(value, int)
        return value

    def labeldict(self) -> dict[str, str]:
        return dict(zip(self.family.labelnames, self.labelvalues, strict=True))

    def _state(self) -> SeriesValue:
        return self._value

    def _zero(self) -> None:
        self._value = 0
        self._durable = 0
        self.created = None

    def _add(self, stored: int, raw: SeriesValue) -> None:
        self._value += stored
        self._durable = raw

    def __repr__(self) -> str:
        return f"<CounterChild {self.family.name}{self.labelvalues!r} = {self._value}>"


class HistogramValue:
    """A histogram child's state: per-bucket counts (not cumulative) and sum."""

    __slots__ = ("counts", "sum")
    __hash__ = None  # type: ignore[assignment]  # mutable

    def __init__(self, counts: list[int], sum: float) -> None:
        self.counts = counts
        self.sum = sum

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[int]:
        out, acc = [], 0
        for c in self.counts:
            acc += c
            out.append(acc)
        return out

    def encode(self) -> str:
        return json.dumps([*self.counts, self.sum], separators=(",", ":"))

    @classmethod
    def decode(cls, raw: SeriesValue, nbuckets: int) -> HistogramValue:
        if not isinstance(raw, str):
            raise ValueError(f"histogram value is not text: {raw!r}")
        items = json.loads(raw)
        if not isinstance(items, list) or len(items) != nbuckets + 1:
            raise ValueError(f"histogram value has {len(items)} fields, expected {nbuckets + 1}")
        counts = items[:-1]
        if not all(type(c) is int and c >= 0 for c in counts):
            raise ValueError("histogram bucket counts must be non-negative integers")
        total = items[-1]
        if not isinstance(total, int | float):
            raise ValueError("histogram sum must be a number")
        return cls(counts, total)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, HistogramValue)
            and self.counts == other.counts
            and self.sum == other.sum
        )

    def __repr__(self) -> str:
        return f"HistogramValue(counts={self.counts!r}, sum={self.sum!r})"


class HistogramChild:
    """One label set of a histogram: bucket counts and a sum of observations."""

    __slots__ = (
        "_counts", "_dirty", "_durable", "_lock", "_mark", "_sum", "_upper",
        "created", "family", "key", "labelvalues",
    )  # fmt: skip

    def __init__(
        self,
        family: Histogram,
        values: tuple[str, ...],
        key: str,
        state: HistogramValue,
        created: float | None,
    ) -> None:
        self.family = family
        self.labelvalues = values
        self.key = key
        self.created = created
        self._upper = family.buckets
        self._counts = state.counts
        self._sum = state.sum
        self._durable: SeriesValue = state.encode()
        """The encoded state as of the last successful flush."""
        self._dirty = False
        self._lock = family._shared.lock
        self._mark = family._shared.mark

    def observe(self, value: float) -> None:
        """Count one observation in memory; durable after ``commit()``."""
        if value.__class__ is not float and value.__class__ is not int:
            value = _observation(value)
        i = bisect_left(self._upper, value)
        with self._lock:
            total = self._sum + value
            if total - total != 0:  # inf or nan (given, or by overflow): not storable
                raise InvalidInput(
                    f"{self.family.name}: observation {value!r} overflows the sum (not finite)"
                )
            self._counts[i] += 1
            self._sum = total
            if not self._dirty:
                self._dirty = True
                self._mark(self)

    @property
    def value(self) -> HistogramValue:
        with self._lock:
            return HistogramValue(list(self._counts), self._sum)

    @property
    def durable_value(self) -> HistogramValue:
        """The state as of the last successful flush (see ``CounterChild``)."""
        raw = self._durable
        assert isinstance(raw, str)
        return HistogramValue.decode(raw, len(self._upper))

    def _state(self) -> SeriesValue:
        # Called under the lock by the flusher; encoding is cheap next to I/O.
        return HistogramValue(self._counts, self._sum).encode()

    def _zero(self) -> None:
        self._counts[:] = [0] * len(self._counts)
        self._sum = 0.0
        self._durable = self._state()
        self.created = None

    def _add(self, stored: HistogramValue, raw: SeriesValue) -> None:
        for i, c in enumerate(stored.counts):
            self._counts[i] += c
        self._sum += stored.sum
        self._durable = raw

    def __repr__(self) -> str:
        return f"<HistogramChild {self.family.name}{self.labelvalues!r}>"


ChildT = TypeVar("ChildT", CounterChild, HistogramChild)


class MetricFamily(Generic[ChildT]):
    """A named metric with fixed label names; one child per label set."""

    kind: ClassVar[Kind]

    def __init__(
        self,
        shared: _Shared,
        definition: FamilyDef,
        *,
        max_children: int | None,
        restored: dict[str, SeriesValue] | None = None,
    ) -> None:
        self._shared = shared
        self._definition = definition
        self.name = definition.name
        self.labelnames = definition.labelnames
        self.max_children = max_children
        self._children: dict[tuple[Any, ...], ChildT] = {}
        self._count = 0  # distinct children in _children (which also holds aliases)
        self._restored: dict[str, SeriesValue] = restored if restored is not None else {}
        self._restored_created: dict[str, float] = {}
        """label key -> first-write time of restored series (kept for ``_created``)."""
        self._lock = shared.lock

    @property
    def help(self) -> str:
        return self._definition.help

    @property
    def definition(self) -> FamilyDef:
        return self._definition

    def labels(self, *values: object, **kwvalues: object) -> ChildT:
        """The child of one label set, created on first use (then cached).

        Values go by position in ``labelnames`` order or by name, not both.
        """
        if kwvalues:
            # Fast when names come in labelnames order (the usual case).
            if values or tuple(kwvalues) != self.labelnames:
                values = self._from_kwargs(values, kwvalues)
            else:
                values = tuple(kwvalues.values())
        child = self._children.get(values)
        if child is None:
            child = self._new_child(values)
        return child

    def _from_kwargs(self, values: tuple[object, ...], kw: dict[str, object]) -> tuple[object, ...]:
        if values:
            raise InvalidInput(f"{self.name}: give label values by position or by name, not both")
        if sorted(kw) != sorted(self.labelnames):
            raise InvalidInput(
                f"{self.name}: expected labels {list(self.labelnames)}, got {sorted(kw)}"
            )
        return tuple([kw[n] for n in self.labelnames])

    def _new_child(self, values: tuple[object, ...]) -> ChildT:
        if len(values) != len(self.labelnames):
            raise InvalidInput(
                f"{self.name}: expected {len(self.labelnames)} label values "
                f"{list(self.labelnames)}, got {len(values)}"
            )
        normal = tuple(label_value(n, v) for n, v in zip(self.labelnames, values, strict=True))
        with self._lock:
            child = self._children.get(normal)
            if child is None:
                key = label_key(normal)
                raw = self._restored.pop(key, None)
                if raw is None:
                    limit = self.max_children
                    if limit is not None and self._count + len(self._restored) >= limit:
                        raise CardinalityError(
                            f"{self.name}: already {limit} label sets (max_children); "
                            f"refusing {dict(zip(self.labelnames, normal, strict=True))}"
                        )
                    child = self._make(normal, key, None, time.time())
                else:
                    child = self._make(normal, key, raw, self._restored_created.pop(key, None))
                self._children[normal] = child
                self._count += 1
            if values != normal:
                self._children[values] = child  # e.g. labels(status=200) next time
        return child

    def _make(
        self, values: tuple[str, ...], key: str, raw: SeriesValue | None, created: float | None
    ) -> ChildT:
        raise NotImplementedError

    def __len__(self) -> int:
        """Label sets held: created children plus restored ones not touched yet."""
        return self._count + len(self._restored)

    def items(self) -> Iterator[tuple[tuple[str, ...], Any]]:
        """Every label set with its current value (restored ones included)."""
        with self._lock:
            children = [c for k, c in self._children.items() if k is c.labelvalues]
            restored = list(self._restored.items())
        for child in children:
            yield child.labelvalues, child.value
        for key, raw in restored:
            yield decode_label_key(key), self._decode(raw)

    def series(self) -> Iterator[tuple[tuple[str, ...], Any, float | None]]:
        """Every label set with its *durable* value (as of the last successful
        flush: a crash can never take it back, so an exposed value never goes
        backwards across a restart, DESIGN G3) and its created time (unix
        seconds of its first write, stable across restarts; None only for a
        restored series whose store kept none)."""
        with self._lock:
            children = [c for k, c in self._children.items() if k is c.labelvalues]
            restored = list(self._restored.items())
            created = self._restored_created
        for child in children:
            yield child.labelvalues, child.durable_value, child.created
        for key, raw in restored:
            yield decode_label_key(key), self._decode(raw), created.get(key)

    def _decode(self, raw: SeriesValue) -> Any:
        return raw

    def _set_restored_created(self, created: dict[str, float]) -> None:
        """Created times of the restored series, read after the values (lock
        held): children made from them meanwhile get theirs now."""
        for values, child in self._children.items():
            if values is child.labelvalues and child.created is None:
                child.created = created.get(child.key)
        self._restored_created = created

    # -- rebinding to another slot (keepcount.registry, after a fork) ----------

    def _zero(self) -> None:
        """Forget every stored value (lock held, nothing dirty): the family
        now counts from zero until ``_add_stored`` adds a slot's values."""
        self._restored = {}
        self._restored_created = {}
        for values, child in self._children.items():
            if values is child.labelvalues:
                child._zero()

    def _add_stored(self, stored: dict[str, SeriesValue]) -> None:
        """Add a slot's stored values (lock held) to what was counted since
        ``_zero``: a child's value becomes stored + counted, its durable
        value the stored one; series no child holds yet stay lazy."""
        by_key = {c.key: c for v, c in self._children.items() if v is c.labelvalues}
        for key, raw in stored.items():
            decoded = self._decode(raw)
            child = by_key.get(key)
            if child is None:
                self._restored[key] = raw
            else:
                child._add(decoded, raw)

    def _redefine(self, new: FamilyDef) -> None:
        if not new.same_shape(self._definition):
            old = self._definition
            raise DefinitionConflict(
                f"{self.name} is already a {old.kind} with labels {list(old.labelnames)}"
                + (f" and buckets {list(old.buckets)}" if old.buckets else "")
                + f"; cannot declare it as a {new.kind} with labels {list(new.labelnames)}"
                + (f" and buckets {list(new.buckets)}" if new.buckets else "")
                + " (its stored values would be misread: use a new name)"
            )
        if new.help and new.help != self._definition.help:
            with self._lock:
                self._definition = new
                self._shared.meta_dirty.append(self)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} labels={list(self.labelnames)} n={len(self)}>"


class Counter(MetricFamily[CounterChild]):
    """A family of integer counters.

    Example::

        >>> hits = Counter.standalone("http_requests_total", "Requests", ["route"])
        >>> hits.labels(route="/").inc()
        >>> hits.labels(route="/").value
        1
    """

    kind = "counter"

    def _make(
        self, values: tuple[str, ...], key: str, raw: SeriesValue | None, created: float | None
    ) -> CounterChild:
        return CounterChild(self, values, key, 0 if raw is None else self._decode(raw), created)

    def _decode(self, raw: SeriesValue) -> int:
        if type(raw) is not int or not 0 <= raw <= MAX_VALUE:
            raise ValueError(f"{self.name}: stored counter value {raw!r} is not a valid count")
        return raw

    def inc(self, amount: int = 1) -> None:
        """``inc()`` of the only child of a family without labels."""
        self._only().inc(amount)

    @property
    def value(self) -> int:
        return self._only().value

    def _only(self) -> CounterChild:
        if self.labelnames:
            raise InvalidInput(f"{self.name} has labels {list(self.labelnames)}: use .labels()")
        return self.labels()

    @classmethod
    def standalone(
        cls,
        name: str,
        help: str = "",
        labelnames: Sequence[str] = (),
        *,
        max_children: int | None = None,
    ) -> Counter:
        """A family outside any registry (for tests and benchmarks): never flushed."""
        shared = _Shared(threading.Lock(), [], [])
        return cls(shared, counter_def(name, help, labelnames), max_children=max_children)


class Histogram(MetricFamily[HistogramChild]):
    """A family of histograms with fixed bucket upper bounds (the last is +Inf)."""

    kind = "histogram"

    def __init__(self, shared: _Shared, definition: FamilyDef, **kw: Any) -> None:
        super().__init__(shared, definition, **kw)
        self.buckets = definition.buckets

    def _make(
        self, values: tuple[str, ...], key: str, raw: SeriesValue | None, created: float | None
    ) -> HistogramChild:
        state = HistogramValue([0] * len(self.buckets), 0.0) if raw is None else self._decode(raw)
        return HistogramChild(self, values, key, state, created)

    def _decode(self, raw: SeriesValue) -> HistogramValue:
        try:
            return HistogramValue.decode(raw, len(self.buckets))
        except ValueError as exc:
            raise ValueError(f"{self.name}: stored histogram value is invalid: {exc}") from None

    def observe(self, value: float) -> None:
        if self.labelnames:
            raise InvalidInput(f"{self.name} has labels {list(self.labelnames)}: use .labels()")
        self.labels().observe(value)


def counter_def(name: str, help: str, labelnames: Sequence[str]) -> FamilyDef:
    if not isinstance(help, str):
        raise InvalidInput(f"{name}: help must be a string")
    return FamilyDef(check_metric_name(name), "counter", help, check_label_names(labelnames))


def histogram_def(
    name: str, help: str, labelnames: Sequence[str], buckets: Sequence[float]
) -> FamilyDef:
    if not isinstance(help, str):
        raise InvalidInput(f"{name}: help must be a string")
    return FamilyDef(
        check_metric_name(name),
        "histogram",
        help,
        check_label_names(labelnames, reserved=("le",)),
        check_buckets(buckets),
    )


def check_buckets(buckets: Sequence[float]) -> tuple[float, ...]:
    try:
        bounds = [float(b) for b in buckets]
    except (TypeError, ValueError):
        raise InvalidInput(f"histogram buckets must be numbers, got {buckets!r}") from None
    if not bounds or bounds[-1] != math.inf:
        bounds.append(math.inf)
    if any(math.isnan(b) for b in bounds) or any(a >= b for a, b in pairwise(bounds)):
        raise InvalidInput(f"histogram buckets must be strictly increasing numbers: {buckets!r}")
    if len(bounds) < 2:
        raise InvalidInput("a histogram needs at least one finite bucket bound")
    return tuple(bounds)
