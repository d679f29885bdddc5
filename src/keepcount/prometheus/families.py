"""The families of ``keepcount.prometheus``: one per metric, holding its
series (``series``) in a keepcount registry's group commit.

A family is a ``keepcount.metrics.MetricFamily`` of a ``prometheus.*`` kind:
it makes a label set's series on first use (with the stored state, when the
slot has one), removes series with tombstones, and merges a slot's stored
series into what was counted when the slot is bound (``_add_stored``) or
rebound after a fork (``_zero``).  The stored format and the merge rules are
in ``series``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any, ClassVar

from keepcount.errors import CorruptStore, InvalidInput
from keepcount.metrics import MetricFamily, _Shared, label_key
from keepcount.stores.base import FamilyDef, SeriesValue

from .series import (
    GAUGE_MODES,
    LIVE_MODES,
    TOMBSTONE,
    CounterSeries,
    GaugeSeries,
    HistogramSeries,
    InfoSeries,
    StatesetSeries,
    SummarySeries,
    _Series,
    decode,
)

__all__ = ["PromFamily", "family_class", "memory_shared"]


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
        self._removed: set[tuple[str, ...]] = set()
        """Label sets whose series is a tombstone still held (``_prune``)."""
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
                self._removed.discard(values)
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
        self._removed.add(values)

    def _prune(self) -> None:
        """Forget removed series whose tombstone is written (lock held)."""
        for values in list(self._removed):  # not every series: removals may come in a loop
            series = self._children[values]
            if not series._dirty and series._durable == TOMBSTONE:
                del self._children[values]
                self._count -= 1
                self._removed.discard(values)

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
