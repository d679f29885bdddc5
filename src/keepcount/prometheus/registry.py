# mypy: disable-error-code="no-untyped-call"
"""``CollectorRegistry``: prometheus_client's registry, bound to a store or not.

A registry made without a store is prometheus_client's, in memory: libraries
and tests that make their own keep working unchanged.  One bound to a store
(``CollectorRegistry(store=url, node=host)``, ``configure()``, or the default
``REGISTRY`` with ``KEEPCOUNT_STORE`` and ``KEEPCOUNT_NODE`` set) keeps its
metrics' values in a keepcount registry (``keepcount.registry.open_lazily``):

- **Bound on first use.** Metrics are declared at import, before anything is
  configured; nothing is opened then.  The first change of any value (or a
  ``collect()``/``commit()``) starts the keepcount registry, whose first
  flush opens the store, takes a slot of the host and adds the slot's stored
  values to what was counted meanwhile.  A process that only imports the app
  (gunicorn's ``--preload`` master, a management command) takes nothing.
- **Durable** like ``keepcount.open``: ``commit()``/``commit_sync()`` return
  once every earlier change is in the store; the background flush writes at
  least every ``flush_interval`` seconds without them.
- **Collected for the host**: ``collect()`` first commits this process's
  changes, then reads every slot of the host from the store and combines
  them per metric type (``keepcount.prometheus.host``), as prometheus_client's
  multiprocess collector combines its processes' files.  So ``/metrics`` says
  the same whichever worker answers, and ``get_sample_value`` sees a value
  just changed.

Families live in one table and one lock per registry (``_shared``), made
with the registry and handed to the keepcount registry when it is bound, so
a metric's series never move.
"""

from __future__ import annotations

import copy
import os
import threading
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import CollectorRegistry as _PCRegistry

from keepcount.commit import DEFAULT_FLUSH_INTERVAL
from keepcount.errors import InvalidInput
from keepcount.metrics import MetricFamily
from keepcount.registry import Registry, open_lazily
from keepcount.slots import DEFAULT_MAX_SLOTS
from keepcount.stores.base import FamilyDef

from .families import PromFamily, family_class, memory_shared
from .host import HostRead, host_metrics
from .series import kind_of

__all__ = ["REGISTRY", "CollectorRegistry", "configure", "family_for"]

STORE_ENV = "KEEPCOUNT_STORE"
NODE_ENV = "KEEPCOUNT_NODE"


class CollectorRegistry(_PCRegistry):
    """prometheus_client's ``CollectorRegistry``; with ``store`` and ``node``,
    its metrics are durable (see the module docstring)."""

    def __init__(
        self,
        auto_describe: bool = False,
        target_info: dict[str, str] | None = None,
        support_collectors_without_names: bool = False,
        *,
        store: str | None = None,
        node: str | None = None,
        flush_interval: float | None = DEFAULT_FLUSH_INTERVAL,
        max_slots: int = DEFAULT_MAX_SLOTS,
        coordinator: str | None = None,
    ) -> None:
        super().__init__(auto_describe, target_info, support_collectors_without_names)
        self._families: dict[str, MetricFamily[Any]] = {}
        self._shared = memory_shared()
        self._keepcount: Registry | None = None
        self._unwritten: list[Any] = []
        """Series made before first use, written from then on."""
        self._configure_lock = threading.Lock()
        if store is not None or node is not None:
            self.configure(
                store, node=node, flush_interval=flush_interval, max_slots=max_slots,
                coordinator=coordinator,
            )  # fmt: skip

    # -- binding ------------------------------------------------------------------

    def configure(
        self,
        store: str | None,
        *,
        node: str | None,
        flush_interval: float | None = DEFAULT_FLUSH_INTERVAL,
        max_slots: int = DEFAULT_MAX_SLOTS,
        coordinator: str | None = None,
    ) -> None:
        """Bind this registry to ``store`` as host ``node``: its metrics,
        declared already or later, become durable.  Opens nothing yet (first
        use does).  Values counted before are kept, and added to the slot's.
        Raises ``InvalidInput`` if either is missing or it is bound already."""
        if not store or not node:
            raise InvalidInput(
                f"a durable registry needs a store URL and a node id (got store={store!r}, "
                f"node={node!r}): set {STORE_ENV} and {NODE_ENV}, or pass both"
            )
        with self._configure_lock, self._shared.lock:
            if self._keepcount is not None:
                raise InvalidInput(
                    f"this registry is bound to {self._keepcount!r} already; configure() "
                    "must come before first use, once"
                )
            shared = self._shared
            self._keepcount = keepcount = open_lazily(
                store, node, shared=shared, families=self._families,
                flush_interval=flush_interval, max_slots=max_slots, coordinator=coordinator,
            )  # fmt: skip
            append = shared.dirty.append

            def mark(series: object) -> None:
                append(series)
                if not keepcount._started:
                    self._start_locked()

            # Families and series hold ``shared``: switch what it does in
            # place.  What changed in memory so far is a use already.
            shared.mark = mark
            changed = False
            for family in self._families.values():
                if isinstance(family, PromFamily):
                    family.stored = True
                for series in family._children.values():
                    series._mark = mark
                    if series._dirty:
                        append(series)
                        changed = True
                    else:
                        self._unwritten.append(series)
            if changed:
                self._start_locked()

    def _made(self, series: Any) -> None:
        """A series was made (lock held): written with the next flush once
        the registry is in use; in memory, nothing to do."""
        keepcount = self._keepcount
        if keepcount is None:
            return
        if keepcount._started:
            series._dirty = True
            self._shared.dirty.append(series)
        else:
            self._unwritten.append(series)

    def _start_locked(self) -> None:
        """First use (lock held): start the keepcount registry, and put the
        series made before on the dirty list, so they are exposed at zero."""
        assert self._keepcount is not None
        self._keepcount.start()
        for series in self._unwritten:
            if not series._dirty:
                series._dirty = True
                self._shared.dirty.append(series)
        self._unwritten.clear()

    def _start(self) -> Registry | None:
        keepcount = self._keepcount
        if keepcount is not None and not keepcount._started:
            with self._shared.lock:
                self._start_locked()
        return keepcount

    @property
    def keepcount(self) -> Registry | None:
        """The keepcount registry behind this one (None in memory)."""
        return self._keepcount

    def _family(self, definition: FamilyDef) -> PromFamily:
        """Declare (or get) a metric's family in this registry (lock held)."""
        family = self._families.get(definition.name)
        if family is None:
            family = family_class(definition)(self._shared, definition)
            self._families[definition.name] = family
            self._shared.meta_dirty.append(family)
        else:
            family._redefine(definition)  # DefinitionConflict if the shape differs
            if not isinstance(family, PromFamily):
                raise InvalidInput(f"{definition.name} is a keepcount {family.definition.kind}")
        family.new_series = self._made
        family.stored = self._keepcount is not None
        return family

    # -- durability -----------------------------------------------------------------

    def commit_sync(self, timeout: float | None = None) -> None:
        """Return once every earlier change of this registry's metrics is
        durable (a no-op in memory).  Raises like ``keepcount.Registry.commit_sync``."""
        keepcount = self._start()
        if keepcount is not None:
            keepcount.commit_sync(timeout)

    async def commit(self) -> None:
        """``commit_sync()`` for asyncio: ``await REGISTRY.commit()``."""
        keepcount = self._start()
        if keepcount is not None:
            await keepcount.commit()

    def close(self) -> None:
        """Flush, give the slot back, close the store (at exit it happens by itself)."""
        if self._keepcount is not None:
            self._keepcount.close()

    # -- collecting -------------------------------------------------------------------

    def collect(self) -> Iterable[Metric]:
        """Every metric of the registry: in memory, prometheus_client's; bound,
        this process's changes made durable first, then the host's values."""
        keepcount = self._keepcount
        if keepcount is None:
            yield from super().collect()
            return
        self.commit_sync()
        read = HostRead.of(keepcount)
        with self._lock:
            collectors = copy.copy(self._collector_to_names)
            target = self._target_info_metric() if self._target_info else None
        if target is not None:
            yield target
        yield from host_metrics(read, collectors)

    def restricted_registry(self, names: Iterable[str]) -> Any:
        """Only the samples called ``names`` (``/metrics?name[]=...``); bound,
        from the host's values too."""
        if self._keepcount is None:
            return super().restricted_registry(names)
        return _Restricted(self, set(names))

    def describe(self) -> Iterator[Metric]:
        """What the registered collectors describe (no I/O): lets a
        prometheus_client registry register this one as a collector."""
        with self._lock:
            collectors = list(self._collector_to_names)
        for collector in collectors:
            describe = getattr(collector, "describe", None)
            if describe is not None:
                yield from describe()


class _Restricted:
    def __init__(self, registry: CollectorRegistry, names: set[str]) -> None:
        self.registry = registry
        self.names = names

    def collect(self) -> Iterator[Metric]:
        for metric in self.registry.collect():
            restricted = metric._restricted_metric(self.names)
            if restricted is not None:
                yield restricted


def family_for(metric: Any, registry: _PCRegistry | None) -> PromFamily:
    """The family of a parent or label-less ``metric`` registered in ``registry``."""
    prom_type = metric._type
    definition = FamilyDef(
        metric._name,
        kind_of(prom_type, getattr(metric, "_multiprocess_mode", "")),
        metric._documentation if isinstance(metric._documentation, str) else "",
        tuple(metric._labelnames),
        tuple(metric._upper_bounds) if prom_type == "histogram" else (),
    )
    if isinstance(registry, CollectorRegistry):
        try:
            with registry._shared.lock:
                family = registry._family(definition)
        except BaseException:
            registry.unregister(metric)
            raise
    else:
        family = family_class(definition)(memory_shared(), definition)
    if prom_type == "stateset":
        family.states = tuple(metric._states)
    return family


def configure(
    store: str,
    node: str,
    *,
    flush_interval: float | None = DEFAULT_FLUSH_INTERVAL,
    max_slots: int = DEFAULT_MAX_SLOTS,
    coordinator: str | None = None,
) -> None:
    """Bind the default ``REGISTRY`` to ``store`` as host ``node`` (instead of
    ``KEEPCOUNT_STORE``/``KEEPCOUNT_NODE``); call it before first use."""
    REGISTRY.configure(
        store, node=node, flush_interval=flush_interval, max_slots=max_slots,
        coordinator=coordinator,
    )  # fmt: skip


def _default_registry() -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=True)
    store, node = os.environ.get(STORE_ENV), os.environ.get(NODE_ENV)
    if store or node:
        registry.configure(store, node=node)
    return registry


REGISTRY = _default_registry()
"""The default registry; durable when ``KEEPCOUNT_STORE`` and ``KEEPCOUNT_NODE`` are set."""
