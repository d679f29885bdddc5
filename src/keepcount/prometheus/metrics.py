# mypy: disable-error-code="no-untyped-call"
"""prometheus_client's metric classes, with durable values.

Each class *is* prometheus_client's (a subclass): names, label checks,
``labels()``, ``remove()``, decorators and context managers, the errors they
raise, and ``describe()`` all come from prometheus_client unchanged.  What is
replaced is where a value lives: a series of a durable family
(``keepcount.prometheus.series``) instead of a ``values.ValueClass``, and the
few methods that touch it (``inc``/``dec``/``set``/``observe``/``info``/
``state``, their samples, removal).

A metric's family comes from its registry (``_family_for``): a store-bound
``keepcount.prometheus.CollectorRegistry`` declares it in its keepcount
registry, any other registry (prometheus_client's own, ``None``) keeps it in
memory.  Children made by ``labels()`` get their parent's family through
``_kwargs``, as prometheus_client passes a parent's options to its children.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from typing import Any

import prometheus_client.metrics as _pc
from prometheus_client.metrics import _validate_exemplar  # type: ignore[attr-defined]
from prometheus_client.registry import CollectorRegistry as _PCRegistry
from prometheus_client.samples import Exemplar, Sample
from prometheus_client.utils import floatToGoString

from keepcount.prometheus.families import PromFamily
from keepcount.prometheus.registry import REGISTRY, family_for

__all__ = ["Counter", "Enum", "Gauge", "Histogram", "Info", "Summary"]


def _attach(metric: Any, registry: _PCRegistry | None) -> None:
    """After prometheus_client's ``__init__`` of a parent or label-less
    metric (registered by then): its family, and its series if it has one."""
    family = family_for(metric, registry)
    metric._family = family
    metric._kwargs["_family"] = family
    if metric._is_observable():
        metric._metric_init()


def _all_str(values: Any) -> bool:
    # A loop, not all() of a generator: this is on labels()' fast path.
    for v in values:  # noqa: SIM110
        if v.__class__ is not str:
            return False
    return True


class _Durable:
    """What every metric here adds to prometheus_client's: its series and
    family, and removal that reaches the store (a tombstone per series)."""

    _series: Any = None
    _family: Any  # PromFamily; None only inside __init__
    _labelnames: tuple[str, ...]

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Iterable[str] = (),
        namespace: str = "",
        subsystem: str = "",
        unit: str = "",
        registry: _PCRegistry | None = REGISTRY,
        _labelvalues: Sequence[str] | None = None,
        *extra: Any,
        _family: PromFamily | None = None,
        **kw: Any,
    ) -> None:
        """prometheus_client's signature (``extra``/``kw``: a gauge's
        ``multiprocess_mode``, a histogram's ``buckets``, an enum's
        ``states``); ``_family`` is given to the children of a parent."""
        self._family = _family
        super().__init__(  # type: ignore[call-arg]
            name, documentation, labelnames, namespace, subsystem, unit, registry, _labelvalues,
            *extra, **kw,
        )  # fmt: skip
        if _family is None:
            _attach(self, registry)

    def labels(self, *labelvalues: Any, **labelkwargs: Any) -> Any:
        """The child of a label set (prometheus_client's ``labels()``).

        A child made before is found by the values as given, when they are
        the strings it was made with; anything else (other types, a wrong
        count, a chained call) takes prometheus_client's path, with its
        conversions and errors.
        """
        children = self.__dict__.get("_metrics")
        if children is not None:
            if labelkwargs:
                # Names in labelnames order, the usual case, need no reordering.
                if not labelvalues and tuple(labelkwargs) == self._labelnames:
                    key = tuple(labelkwargs.values())
                    if _all_str(key):
                        child = children.get(key)
                        if child is not None:
                            return child
            elif _all_str(labelvalues):
                child = children.get(labelvalues)
                if child is not None:
                    return child
        return super().labels(*labelvalues, **labelkwargs)  # type: ignore[misc]

    def remove(self, *labelvalues: Any) -> None:
        """Remove the given labelset from the metric (durably)."""
        super().remove(*labelvalues)  # type: ignore[misc]
        self._family.remove(tuple(str(v) for v in labelvalues))

    def remove_by_labels(self, labels: dict[str, str]) -> None:
        """Remove all series whose labelset partially matches the given labels (durably)."""
        super().remove_by_labels(labels)  # type: ignore[misc]
        if labels:
            want = {self._labelnames.index(k): str(v) for k, v in labels.items()}
            self._family.remove_where(lambda values: all(values[i] == v for i, v in want.items()))

    def clear(self) -> None:
        """Remove all labelsets from the metric (durably)."""
        super().clear()  # type: ignore[misc]
        if self._labelnames:
            self._family.clear()


class Counter(_Durable, _pc.Counter):
    __doc__ = _pc.Counter.__doc__

    def _metric_init(self) -> None:
        if self._family is not None:
            self._series = self._value = self._family.child(self._labelvalues)
            self._exemplar: Exemplar | None = None

    def inc(self, amount: float = 1, exemplar: dict[str, str] | None = None) -> None:
        """Increment counter by the given amount."""
        series = self._series
        if series is None:
            self._raise_if_not_observable()
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        series.inc(amount)
        if exemplar:
            _validate_exemplar(exemplar)
            self._exemplar = Exemplar(exemplar, amount, time.time())

    def reset(self) -> None:
        """Reset the counter to zero (durably: the next flush writes it)."""
        self._value.set(0)

    def _child_samples(self) -> Iterable[Sample]:
        series = self._series
        sample = Sample("_total", {}, series.get(), None, self._exemplar)
        if _pc._use_created:
            return (sample, Sample("_created", {}, series.created, None, None))
        return (sample,)


class Gauge(_Durable, _pc.Gauge):
    __doc__ = _pc.Gauge.__doc__
    _function = None

    def _metric_init(self) -> None:
        if self._family is not None:
            self._series = self._value = self._family.child(self._labelvalues)

    def inc(self, amount: float = 1) -> None:
        """Increment gauge by the given amount."""
        if self._is_most_recent:
            raise RuntimeError("inc must not be used with the mostrecent mode")
        series = self._series
        if series is None:
            self._raise_if_not_observable()
        series.inc(amount)

    def dec(self, amount: float = 1) -> None:
        """Decrement gauge by the given amount."""
        if self._is_most_recent:
            raise RuntimeError("dec must not be used with the mostrecent mode")
        series = self._series
        if series is None:
            self._raise_if_not_observable()
        series.inc(-amount)

    def set(self, value: float) -> None:
        """Set gauge to the given value."""
        series = self._series
        if series is None:
            self._raise_if_not_observable()
        if self._is_most_recent:
            series.set(float(value), time.time())
        else:
            series.set(float(value))

    def set_function(self, f: Any) -> None:
        """Take the value from ``f`` at each collect, in the collecting
        process (never stored: a function cannot outlive its process)."""
        super().set_function(f)
        self._function = f

    def _child_samples(self) -> Iterable[Sample]:
        return (Sample("", {}, self._series.get(), None, None),)


class Summary(_Durable, _pc.Summary):
    __doc__ = _pc.Summary.__doc__

    def _metric_init(self) -> None:
        if self._family is not None:
            self._series = self._family.child(self._labelvalues)

    def observe(self, amount: float) -> None:
        """Observe the given amount."""
        series = self._series
        if series is None:
            self._raise_if_not_observable()
        series.observe(amount)

    def _child_samples(self) -> Iterable[Sample]:
        series = self._series
        with series._lock:
            count, total, created = series.count, series.sum, series.created
        samples = [Sample("_count", {}, count, None, None), Sample("_sum", {}, total, None, None)]
        if _pc._use_created:
            samples.append(Sample("_created", {}, created, None, None))
        return tuple(samples)


class Histogram(_Durable, _pc.Histogram):
    __doc__ = _pc.Histogram.__doc__

    def _prepare_buckets(self, source_buckets: Sequence[float | str]) -> None:
        super()._prepare_buckets(source_buckets)
        bounds = self._upper_bounds
        if not all(math.isfinite(b) for b in bounds[:-1]):
            # prometheus_client takes NaN, -Inf or +Inf twice: no store could
            # give such bounds back as they were (keepcount's one difference).
            raise ValueError(
                f"Bucket bounds must be finite numbers, then +Inf last: {list(source_buckets)}"
            )

    def _metric_init(self) -> None:
        if self._family is not None:
            self._series = self._family.child(self._labelvalues)
            self._exemplars: list[Exemplar | None] = [None] * len(self._upper_bounds)

    def observe(self, amount: float, exemplar: dict[str, str] | None = None) -> None:
        """Observe the given amount."""
        series = self._series
        if series is None:
            self._raise_if_not_observable()
        series.observe(amount)
        if exemplar and not math.isnan(amount):
            for i, bound in enumerate(self._upper_bounds):
                if amount <= bound:
                    _validate_exemplar(exemplar)
                    self._exemplars[i] = Exemplar(exemplar, amount, time.time())
                    break

    def _child_samples(self) -> Iterable[Sample]:
        series = self._series
        with series._lock:
            counts, total, created = list(series.counts), series.sum, series.created
        samples = []
        acc = 0.0
        for i, bound in enumerate(self._upper_bounds):
            acc += counts[i]
            samples.append(
                Sample("_bucket", {"le": floatToGoString(bound)}, acc, None, self._exemplars[i])
            )
        samples.append(Sample("_count", {}, acc, None, None))
        if self._upper_bounds[0] >= 0:
            samples.append(Sample("_sum", {}, total, None, None))
        if _pc._use_created:
            samples.append(Sample("_created", {}, created, None, None))
        return tuple(samples)


class Info(_Durable, _pc.Info):
    __doc__ = _pc.Info.__doc__

    def _metric_init(self) -> None:
        if self._family is not None:
            self._labelname_set = set(self._labelnames)
            self._series = self._family.child(self._labelvalues)

    def info(self, val: dict[str, str]) -> None:
        """Set info metric."""
        if self._labelname_set.intersection(val.keys()):
            raise ValueError(
                f"Overlapping labels for Info metric, metric: {self._labelnames} child: {val}"
            )
        if any(i is None for i in val.values()):
            raise ValueError("Label value cannot be None")
        self._series.set(dict(val))

    def _child_samples(self) -> Iterable[Sample]:
        return (Sample("_info", self._series.get(), 1.0, None, None),)


class Enum(_Durable, _pc.Enum):
    __doc__ = _pc.Enum.__doc__

    def _metric_init(self) -> None:
        if self._family is not None:
            self._series = self._family.child(self._labelvalues)

    def state(self, state: str) -> None:
        """Set enum metric state."""
        self._raise_if_not_observable()
        self._series.set(self._states.index(state))

    def _child_samples(self) -> Iterable[Sample]:
        current = self._series.get()
        return [
            Sample("", {self._name: s}, 1 if i == current else 0, None, None)
            for i, s in enumerate(self._states)
        ]
