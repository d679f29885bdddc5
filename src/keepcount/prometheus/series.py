"""The durable side of ``keepcount.prometheus``: one family per metric, one
series per label set, in a keepcount registry's group commit.

A prometheus_client-style metric (``keepcount.prometheus.metrics``) keeps its
values here.  Each family is a ``keepcount.metrics.MetricFamily`` of a
``prometheus.*`` kind (``stores.base``): the group commit writes a series'
whole state, the registry restores it, a fork rebinds it, exactly as for
keepcount's own counters.  What differs is the value: prometheus_client's
floats, kept as JSON text so every value comes back bit for bit.

Stored values (``encode``/``decode``; non-finite floats as ``"+Inf"``,
``"-Inf"``, ``"NaN"``; ``null`` is a *tombstone*: the series was removed)::

    prometheus.counter          [value, created]
    prometheus.gauge.<mode>     [value, set_at]        (set_at: time of the last set(), mostrecent modes)
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
import threading
import time
from bisect import bisect_left
from collections.abc import Callable
from typing import Any, ClassVar

from keepcount.errors import CorruptStore, InvalidInput
from keepcount.metrics import MetricFamily, _Shared, label_key
from keepcount.stores.base import FamilyDef, SeriesValue

__all__ = [
    "GAUGE_MODES",
    "LIVE_MODES",
    "TOMBSTONE",
    "CounterSeries",
    "GaugeSeries",
    "HistogramSeries",
    "InfoSeries",
    "PromFamily",
    "StatesetSeries",
    "SummarySeries",
    "decode",
    "encode",
    "family_class",
    "kind_of",
    "memory_shared",
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
    if isinstance(v, str):
        return _NONFINITE[v]
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise TypeError(f"not a number: {v!r}")
    return float(v)


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


def memory_shared() -> _Shared:
    """What families outside any store share: a lock, and nothing marked."""
    shared = _Shared(threading.Lock(), [], [])
    shared.mark = _ignore
    return shared


def _ignore(child: object) -> None:
    pass


def _check_utf8(name: str, values: tuple[str, ...]) -> None:
    """A label value that cannot be UTF-8 (a lone surrogate) could never be
    written: refused when the series is made, not by every flush after."""
    for value in values:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{name}: label value {value!r} is not valid Unicode") from None


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
        self.value += _float(value)
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
            self.value += value
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


class PromFamily(MetricFamily[Any]):
    """The durable family of one prometheus_client-style metric."""

    kind: ClassVar[str] = "prometheus"
    series_class: ClassVar[Callable[..., _Series]]

    def __init__(
        self,
        shared: _Shared,
        definition: FamilyDef,
        *,
        max_children: int | None = None,
        restored: dict[str, SeriesValue] | None = None,
    ) -> None:
        live = {k: v for k, v in (restored or {}).items() if v != TOMBSTONE}
        super().__init__(shared, definition, max_children=None, restored=live)
        self.states: tuple[str, ...] = ()
        """Enum states, set by the metric that declares the family."""
        self.loaded = restored is not None
        """The slot's stored series were given (made by a restore), or added
        since (``_add_stored``): a series not among them is not stored."""
        self._dropped: set[str] = set()
        self._dropped_where: list[Callable[[tuple[str, ...]], bool]] = []
        """Keys removed before the slot's series were read: their stored
        values are not added when they are (the removal came later)."""
        self.stored = restored is not None
        """In a store (made by a restore, or set by a store-bound registry):
        removals write tombstones, also of series not read yet."""
        self.new_series: Callable[[Any], None] = self._mark_new
        """Called (lock held) with a series just made, not dirty: by default
        it is marked dirty, so its zero value is written by the next flush;
        ``keepcount.prometheus.registry`` puts its own (making a series is
        not yet a use of a lazily bound registry)."""

    def _mark_new(self, series: _Series) -> None:
        series._dirty = True
        self._shared.mark(series)

    def child(self, values: tuple[str, ...]) -> Any:
        """The series of a label set (str values), made on first use; a new
        one is written by the next flush with its zero value, so it is
        exposed before it counts, as in prometheus_client."""
        with self._lock:
            series = self._children.get(values)
            if series is not None and not series.removed:
                return series
            if not all(v.isascii() for v in values):
                _check_utf8(self.name, values)
            key = label_key(values)
            raw = self._restored.pop(key, None)
            old, series = series, self.series_class(self, values, key)
            self._children[values] = series
            if old is None:
                self._count += 1
            else:  # removed earlier: a fresh series, written in the old one's place
                old._successor = series
            if raw is not None:
                self._load_into(series, raw)
            if not series._dirty:
                self.new_series(series)
            return series

    def _load_into(self, series: _Series, raw: SeriesValue) -> None:
        try:
            fields = decode(raw)
            if fields is not None:
                series._load(fields)
        except (ValueError, TypeError, KeyError, OverflowError) as exc:
            raise CorruptStore(
                f"{self.name}{list(series.labelvalues)}: stored value {str(raw)[:80]!r} "
                f"is not a {self.definition.kind}: {exc}"
            ) from None
        series._durable = raw

    def remove(self, values: tuple[str, ...]) -> None:
        """Remove one label set: a tombstone is written in its place."""
        with self._lock:
            self._remove(values, label_key(values))
            self._prune()

    def remove_where(self, match: Callable[[tuple[str, ...]], bool]) -> None:
        with self._lock:
            if self.stored and not self.loaded:
                self._dropped_where.append(match)
            for values, series in list(self._children.items()):
                if not series.removed and match(values):
                    self._remove(values, series.key)
            for key in list(self._restored):
                values = tuple(json.loads(key))
                if match(values):
                    self._remove(values, key)
            self._prune()

    def clear(self) -> None:
        self.remove_where(lambda values: True)

    def _remove(self, values: tuple[str, ...], key: str) -> None:
        series = self._children.get(values)
        restored = self._restored.pop(key, None)
        if not self.stored:  # in memory: nothing to overwrite, nothing to keep
            if series is not None:
                del self._children[values]
                self._count -= 1
            return
        if not self.loaded:
            self._dropped.add(key)  # what the slot holds under it is gone too
        if series is None:
            if restored is None and self.loaded:
                return  # nothing stored under it: nothing to overwrite
            series = self.series_class(self, values, key)
            self._children[values] = series
            self._count += 1
        series.removed = True
        series._touch()

    def _prune(self) -> None:
        """Forget removed series whose tombstone is written (lock held)."""
        gone = [v for v, s in self._children.items() if s.removed and not s._dirty]
        for values in gone:
            if self._children[values]._durable == TOMBSTONE:
                del self._children[values]
                self._count -= 1

    # -- MetricFamily hooks (restore, rebinding after a fork) -----------------

    def labels(self, *values: object, **kwvalues: object) -> Any:
        raise InvalidInput(f"{self.name}: use the keepcount.prometheus metric's labels()")

    def _make(
        self, values: tuple[str, ...], key: str, raw: SeriesValue | None, created: float | None
    ) -> Any:
        series = self.series_class(self, values, key)
        if raw is not None:
            self._load_into(series, raw)
        return series

    def _decode(self, raw: SeriesValue) -> Any:
        return decode(raw)

    def _set_restored_created(self, created: dict[str, float]) -> None:
        pass  # a series' created time is part of its stored value

    def _add_stored(self, stored: dict[str, SeriesValue]) -> None:
        self.loaded = True
        dropped, self._dropped = self._dropped, set()
        where, self._dropped_where = self._dropped_where, []
        for key, raw in stored.items():
            if raw == TOMBSTONE:
                continue
            values = tuple(json.loads(key))
            series = self._children.get(values)
            if key in dropped or any(match(values) for match in where):
                if series is None:  # removed before it was read: overwrite it
                    self._restored[key] = raw
                    self._remove(values, key)
                continue
            if series is None:
                self._restored[key] = raw
            elif series.removed:
                series._durable = raw  # its tombstone is still to be written
            else:
                try:
                    fields = decode(raw)
                    if fields is not None:
                        series._add(fields, raw)
                except (ValueError, TypeError, KeyError, OverflowError) as exc:
                    raise CorruptStore(
                        f"{self.name}{list(values)}: stored value {str(raw)[:80]!r} "
                        f"is not a {self.definition.kind}: {exc}"
                    ) from None

    def _zero(self) -> None:
        self._restored = {}
        self.loaded = False
        self._dropped, self._dropped_where = set(), []
        for values, series in self._children.items():
            if values is series.labelvalues and not series.removed:
                series._zero()


class _LiveGaugeFamily(PromFamily):
    """A gauge of a ``live*`` mode: never restored; a slot's stored series
    are overwritten by tombstones when a process takes the slot."""

    series_class = GaugeSeries

    def __init__(self, shared: _Shared, definition: FamilyDef, **kw: Any) -> None:
        super().__init__(shared, definition, **kw)
        for key in list(self._restored):  # a dead holder's: write tombstones
            self._remove(tuple(json.loads(key)), key)

    def _add_stored(self, stored: dict[str, SeriesValue]) -> None:
        for key, raw in stored.items():
            if raw == TOMBSTONE:
                continue
            values = tuple(json.loads(key))
            series = self._children.get(values)
            if series is None or series.removed:
                self._restored[key] = raw
                self._remove(values, key)
            else:
                series._touch()  # this process's value replaces the dead holder's


_SERIES: dict[str, Callable[..., _Series]] = {
    "prometheus.counter": CounterSeries,
    "prometheus.summary": SummarySeries,
    "prometheus.histogram": HistogramSeries,
    "prometheus.info": InfoSeries,
    "prometheus.stateset": StatesetSeries,
}
_classes: dict[str, type[PromFamily]] = {}


def family_class(definition: FamilyDef) -> type[PromFamily]:
    """The family class of a stored ``prometheus.*`` kind."""
    kind = definition.kind
    cls = _classes.get(kind)
    if cls is not None:
        return cls
    if kind.startswith("prometheus.gauge."):
        mode = kind.removeprefix("prometheus.gauge.")
        if mode not in GAUGE_MODES:
            raise CorruptStore(f"{definition.name}: unknown gauge mode in kind {kind!r}")
        if mode in LIVE_MODES:
            cls = type("LiveGaugeFamily", (_LiveGaugeFamily,), {"kind": kind})
        else:
            cls = type("GaugeFamily", (PromFamily,), {"kind": kind, "series_class": GaugeSeries})
    elif kind in _SERIES:
        series = _SERIES[kind]
        cls = type(
            f"{series.__name__}Family", (PromFamily,), {"kind": kind, "series_class": series}
        )
    else:
        raise CorruptStore(f"{definition.name}: unknown family kind {kind!r}")
    _classes[kind] = cls
    return cls
