"""The series of ``keepcount.prometheus``: one label set's durable state.

A prometheus_client-style metric (``keepcount.prometheus.metrics``) keeps its
values in series of its family (``families``), a ``MetricFamily`` of a
``prometheus.*`` kind (``stores.base``): the group commit writes a series'
whole state, the registry restores it, a fork rebinds it, exactly as for
keepcount's own counters.  What differs is the value: prometheus_client's
floats, kept as JSON text so every value comes back bit for bit.

Stored values (``encode``/``decode``; non-finite floats as ``"+Inf"``,
``"-Inf"``, ``"NaN"``; ``null`` is a *tombstone*: the series was removed)::

    prometheus.counter          [value, created]
    prometheus.gauge.<mode>     [value, set_at]        (set_at: of the last set(), mostrecent)
    prometheus.summary          [count, sum, created]
    prometheus.histogram        [bucket counts..., sum, created]  (not cumulative)
    prometheus.info             [{label: value}, set_at]
    prometheus.stateset         [state, set_at, [states...]]

Merging on restore (``_add``): a series may have counted before its slot was
bound (a lazily opened registry counts from the first call, and restores in
the background); the slot's stored state is *added* to what was counted, and
a value *set* since (``Gauge.set``, ``Info.info``, ``Enum.state``,
``Counter.reset``) wins over the stored one, as it came later.  A gauge of a
``live*`` mode is never restored: its value belonged to a process that is
gone, so binding a slot writes tombstones over the slot's stored ones.

Removal (``remove``/``clear``) writes a tombstone, so a removed series stays
removed across restarts; its label set may be used again (a fresh series).
"""

from __future__ import annotations

import json
import math
import time
from bisect import bisect_left
from typing import TYPE_CHECKING, Any

from keepcount.stores.base import SeriesValue

if TYPE_CHECKING:
    from .families import PromFamily

__all__ = [
    "GAUGE_MODES",
    "LIVE_MODES",
    "TOMBSTONE",
    "CounterSeries",
    "GaugeSeries",
    "HistogramSeries",
    "InfoSeries",
    "StatesetSeries",
    "SummarySeries",
    "decode",
    "encode",
    "kind_of",
]

TOMBSTONE = "null"
GAUGE_MODES = frozenset((
    "all", "liveall", "min", "livemin", "max", "livemax", "sum", "livesum",
    "mostrecent", "livemostrecent",
))  # fmt: skip
"""prometheus_client's ``multiprocess_mode`` values (``Gauge._MULTIPROC_MODES``)."""
LIVE_MODES = frozenset(m for m in GAUGE_MODES if m.startswith("live"))

_encoder = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
_JSON_SCALAR = (str, int, float, bool)
_NONFINITE = {"+Inf": math.inf, "-Inf": -math.inf, "NaN": math.nan}


def _num(x: float) -> float | str:
    if x - x == 0:  # finite
        return x
    return "NaN" if math.isnan(x) else ("+Inf" if x > 0 else "-Inf")


def _float(v: object) -> float:
    """A stored number as it was: a float, or an int (prometheus_client's
    ``Counter.reset()`` sets the int 0, and int arithmetic goes on from it)."""
    if isinstance(v, str):
        return _NONFINITE[v]
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise TypeError(f"not a number: {v!r}")
    return v


def encode(fields: list[Any]) -> str:
    """JSON text of a series' fields, non-finite floats spelt out."""
    return _encoder.encode([_num(f) if isinstance(f, float) else f for f in fields])


def decode(raw: SeriesValue) -> list[Any] | None:
    """The fields of a stored value; None for a tombstone.  Raises ValueError."""
    if not isinstance(raw, str):
        raise ValueError(f"not text: {raw!r}")
    fields = json.loads(raw)
    if fields is None:
        return None
    if not isinstance(fields, list):
        raise ValueError(f"not a JSON array: {raw[:80]!r}")
    return fields


def kind_of(prom_type: str, mode: str = "") -> str:
    """The stored kind of a prometheus_client metric type (``_type``)."""
    return f"prometheus.{prom_type}.{mode}" if prom_type == "gauge" else f"prometheus.{prom_type}"


class _Series:
    """One label set's state; every field changes under the registry lock."""

    __slots__ = (
        "_dirty", "_durable", "_lock", "_mark", "_set", "_successor", "created", "family",
        "key", "labelvalues", "removed",
    )  # fmt: skip

    def __init__(self, family: PromFamily, values: tuple[str, ...], key: str) -> None:
        self.family = family
        self.labelvalues = values
        self.key = key
        self.created = time.time()
        self.removed = False
        self._set = False
        """A value was set (not added to) since the slot was bound: it wins over the stored one."""
        self._durable: SeriesValue | None = None
        self._successor: _Series | None = None
        """The series made for the same label set after this one was removed:
        what this one writes from then on (an old child object a caller kept
        counts alone, as in prometheus_client, and never overwrites it)."""
        self._dirty = False
        self._lock = family._shared.lock
        self._mark = family._shared.mark

    def _touch(self) -> None:
        """Lock held: on the dirty list once until the next flush."""
        if not self._dirty:
            self._dirty = True
            self._mark(self)

    def _fields(self) -> list[Any]:
        raise NotImplementedError

    def _state(self) -> SeriesValue:
        if self._successor is not None:
            return self._successor._state()
        return TOMBSTONE if self.removed else encode(self._fields())

    def _load(self, fields: list[Any]) -> None:
        """Take a stored state (lock held); raises on a malformed one."""
        raise NotImplementedError

    def _add(self, fields: list[Any], raw: SeriesValue) -> None:
        """Merge the slot's stored state into what was counted (lock held)."""
        if not self._set:
            self._load_sum(fields)
        self._durable = raw

    def _load_sum(self, fields: list[Any]) -> None:
        raise NotImplementedError

    def _reset(self) -> None:
        """Back to a fresh series (lock held): counted nothing, set nothing."""
        raise NotImplementedError

    def _zero(self) -> None:
        self._reset()
        self._set = False


class _ValueSeries(_Series):
    """One float that ``inc()`` adds to: a counter's or a gauge's."""

    __slots__ = ("value",)

    def __init__(self, family: PromFamily, values: tuple[str, ...], key: str) -> None:
        super().__init__(family, values, key)
        self.value = 0.0

    def inc(self, amount: float) -> None:
        with self._lock:
            self.value += amount
            if not self._dirty:
                self._dirty = True
                self._mark(self)

    def get(self) -> float:
        with self._lock:
            return self.value

    def _reset(self) -> None:
        self.value = 0.0


class CounterSeries(_ValueSeries):
    __slots__ = ()

    def set(self, value: float) -> None:
        """``Counter.reset()``: a new series from ``value``, created now."""
        with self._lock:
            self.value = value
            self.created = time.time()
            self._set = True
            self._touch()

    def _fields(self) -> list[Any]:
        return [self.value, self.created]

    def _load(self, fields: list[Any]) -> None:
        value, created = fields
        self.value, self.created = _float(value), _float(created)

    def _load_sum(self, fields: list[Any]) -> None:
        value, created = fields
        # Nothing counted yet: the stored value as it is (an int stays an int).
        self.value = _float(value) + self.value if self.value else _float(value)
        self.created = _float(created)


class GaugeSeries(_ValueSeries):
    __slots__ = ("set_at",)

    def __init__(self, family: PromFamily, values: tuple[str, ...], key: str) -> None:
        super().__init__(family, values, key)
        self.set_at = 0.0

    def set(self, value: float, timestamp: float = 0.0) -> None:
        """Set the value; ``timestamp`` (unix time) for the ``mostrecent`` modes."""
        with self._lock:
            self.value = value
            self.set_at = timestamp
            self._set = True
            if not self._dirty:
                self._dirty = True
                self._mark(self)

    def _fields(self) -> list[Any]:
        return [self.value, self.set_at]

    def _load(self, fields: list[Any]) -> None:
        value, set_at = fields
        self.value, self.set_at = _float(value), _float(set_at)

    def _add(self, fields: list[Any], raw: SeriesValue) -> None:
        value, set_at = _float(fields[0]), _float(fields[1])
        if not self._set:
            self.value = value + self.value if self.value else value
            self.set_at = set_at
        elif set_at > self.set_at:  # set here, but set later in the slot (mostrecent)
            self.value, self.set_at = value, set_at
        self._durable = raw

    def _reset(self) -> None:
        self.value = 0.0
        self.set_at = 0.0


class SummarySeries(_Series):
    __slots__ = ("count", "sum")

    def __init__(self, family: PromFamily, values: tuple[str, ...], key: str) -> None:
        super().__init__(family, values, key)
        self.count = 0.0
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        with self._lock:
            if not self._dirty:  # first: the count changes even if the sum then raises
                self._dirty = True
                self._mark(self)
            self.count += 1.0
            self.sum += amount  # after the count, as prometheus_client's order

    def _fields(self) -> list[Any]:
        return [self.count, self.sum, self.created]

    def _load(self, fields: list[Any]) -> None:
        count, total, created = fields
        self.count, self.sum, self.created = _float(count), _float(total), _float(created)

    def _load_sum(self, fields: list[Any]) -> None:
        count, total, created = fields
        self.count += _float(count)
        self.sum += _float(total)
        self.created = _float(created)

    def _reset(self) -> None:
        self.count = 0.0
        self.sum = 0.0


class HistogramSeries(_Series):
    __slots__ = ("_upper", "counts", "sum")

    def __init__(self, family: PromFamily, values: tuple[str, ...], key: str) -> None:
        super().__init__(family, values, key)
        self._upper = family.definition.buckets
        self.counts = [0.0] * len(self._upper)
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        with self._lock:
            self.sum += amount  # first: a non-number raises before a bucket counts
            if amount == amount:  # noqa: PLR0124 - NaN falls in no bucket, as in prometheus_client
                self.counts[bisect_left(self._upper, amount)] += 1.0
            if not self._dirty:
                self._dirty = True
                self._mark(self)

    def _fields(self) -> list[Any]:
        return [*self.counts, self.sum, self.created]

    def _split(self, fields: list[Any]) -> tuple[list[float], float, float]:
        if len(fields) != len(self._upper) + 2:
            raise ValueError(f"{len(fields)} fields for {len(self._upper)} buckets")
        return [_float(c) for c in fields[:-2]], _float(fields[-2]), _float(fields[-1])

    def _load(self, fields: list[Any]) -> None:
        self.counts, self.sum, self.created = self._split(fields)

    def _load_sum(self, fields: list[Any]) -> None:
        counts, total, created = self._split(fields)
        self.counts = [a + b for a, b in zip(self.counts, counts, strict=True)]
        self.sum += total
        self.created = created

    def _reset(self) -> None:
        self.counts = [0.0] * len(self._upper)
        self.sum = 0.0


class InfoSeries(_Series):
    __slots__ = ("labels", "set_at")

    def __init__(self, family: PromFamily, values: tuple[str, ...], key: str) -> None:
        super().__init__(family, values, key)
        self.labels: dict[str, str] = {}
        self.set_at = 0.0

    def set(self, labels: dict[str, str]) -> None:
        with self._lock:
            self.labels = labels
            self.set_at = time.time()
            self._set = True
            self._touch()

    def get(self) -> dict[str, str]:
        with self._lock:
            return self.labels

    def _fields(self) -> list[Any]:
        # Values as given (prometheus_client fails at exposition on a value
        # that is not a str, and so will the host's view), but always storable.
        return [
            {str(k): v if isinstance(v, _JSON_SCALAR) else str(v) for k, v in self.labels.items()},
            self.set_at,
        ]

    def _load(self, fields: list[Any]) -> None:
        labels, set_at = fields
        if not isinstance(labels, dict):
            raise ValueError("info labels must be a JSON object")
        self.labels, self.set_at = labels, _float(set_at)

    _load_sum = _load

    def _reset(self) -> None:
        self.labels = {}
        self.set_at = 0.0


class StatesetSeries(_Series):
    __slots__ = ("set_at", "state")

    def __init__(self, family: PromFamily, values: tuple[str, ...], key: str) -> None:
        super().__init__(family, values, key)
        self.state = 0
        """Index into the metric's states (prometheus_client's ``Enum._value``)."""
        self.set_at = 0.0

    def set(self, index: int) -> None:
        with self._lock:
            self.state = index
            self.set_at = time.time()
            self._set = True
            self._touch()

    def get(self) -> int:
        with self._lock:
            return self.state

    def _fields(self) -> list[Any]:
        states = [str(s) for s in self.family.states]
        return [states[self.state] if states else "", self.set_at, states]

    def _load(self, fields: list[Any]) -> None:
        state, set_at, _ = fields
        states = self.family.states
        # A state a later version no longer has: the first one, as for a new series.
        self.state = states.index(state) if state in states else 0
        self.set_at = _float(set_at)

    _load_sum = _load

    def _reset(self) -> None:
        self.state = 0
        self.set_at = 0.0
