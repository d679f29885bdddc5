"""The registry: a node's metric families, restored on open, made durable by commit.

Example::

    import keepcount
    reg = keepcount.open("sqlite:///counters.db", node="node-1")   # claims + restores
    hits = reg.counter("http_requests_total", "Requests", labelnames=["route"])
    hits.labels(route="/").inc()      # memory only
    reg.commit_sync()                 # every earlier inc() is now durable
    reg.close()

Invariants:

- Open = claim, then restore, then serve: the constructor returns only once
  the node id is claimed (with an epoch higher than any earlier one) and
  every stored value of the node is loaded; a family declared later picks up
  its stored values.
- A value never goes backwards: restored values are the last durable ones,
  and no other live process can write this node's rows (the claim).
- ``commit()`` returning means durable (``commit.GroupCommit``); raising
  means not acknowledged.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import threading
import time
import weakref
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from keepcount.commit import DEFAULT_FLUSH_INTERVAL, DEFAULT_IDEMPOTENCY_TTL, GroupCommit, _copy
from keepcount.errors import InvalidInput, KeepcountError, RegistryClosed
from keepcount.metrics import (
    DEFAULT_BUCKETS,
    DEFAULT_MAX_CHILDREN,
    Counter,
    CounterChild,
    Histogram,
    MetricFamily,
    _Shared,
    counter_def,
    histogram_def,
)
from keepcount.naming import check_node_id
from keepcount.stores import open_store
from keepcount.stores.base import FamilyDef, KeyRecord, SeriesRow, SeriesValue, Store
from keepcount.totals import SeriesTotal, cluster_totals

__all__ = ["Receipt", "Registry", "open"]

log = logging.getLogger("keepcount.registry")

_open_registries: weakref.WeakSet[Registry] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    # Normal interpreter exit flushes; only a crash loses the last interval.
    for reg in list(_open_registries):
        try:
            reg.close()
        except Exception:  # noqa: S110 - exit must go on
            pass


@dataclass(frozen=True, slots=True)
class Receipt:
    """What a durable increment answers: the node's value right after it."""

    node: str
    name: str
    labels: dict[str, str]
    value: int
    replayed: bool = False
    """True when an idempotency key matched an earlier increment: nothing was counted now."""


def open(  # noqa: A001 - the public name in DESIGN §3
    url: str,
    node: str,
    *,
    flush_interval: float | None = DEFAULT_FLUSH_INTERVAL,
    max_children: int | None = DEFAULT_MAX_CHILDREN,
    epoch: int | None = None,
    idempotency_ttl: float = DEFAULT_IDEMPOTENCY_TTL,
) -> Registry:
    """Open the store at ``url``, claim ``node`` and restore its values.

    ``epoch`` comes from a coordinator when one issues the claim; without it
    the store issues the next epoch itself.  ``idempotency_ttl``: seconds
    an idempotency key given to ``increment()`` is remembered.  Raises ``ClaimConflict`` if
    another live process holds ``node``, ``CorruptStore`` for a damaged or
    foreign store, ``StoreUnavailable`` if it cannot be reached.
    """
    check_node_id(node)
    store = open_store(url)
    try:
        return Registry(
            store,
            node,
            flush_interval=flush_interval,
            max_children=max_children,
            epoch=epoch,
            idempotency_ttl=idempotency_ttl,
        )
    except BaseException:
        store.close()
        raise


class Registry:
    """A node's counters and histograms, backed by a store.

    Thread-safe; ``inc()`` never does I/O.  Use ``await commit()`` in asyncio
    code and ``commit_sync()`` in threads.  The registry owns the store it is
    given and closes it in ``close()``.
    """

    def __init__(
        self,
        store: Store,
        node: str,
        *,
        flush_interval: float | None = DEFAULT_FLUSH_INTERVAL,
        max_children: int | None = DEFAULT_MAX_CHILDREN,
        epoch: int | None = None,
        idempotency_ttl: float = DEFAULT_IDEMPOTENCY_TTL,
    ) -> None:
        self.node = check_node_id(node)
        self.store = store
        self.max_children = max_children
        self._lock = threading.Lock()
        if not idempotency_ttl > 0:
            raise ValueError("idempotency_ttl must be positive")
        self.idempotency_ttl = idempotency_ttl
        self._group = GroupCommit(
            self._lock,
            self._write,
            node=self.node,
            lookup=store.lookup_key,
            expire=store.expire_keys,
            interval=flush_interval,
            name=f"keepcount-flush-{node}",
        )
        self._shared = _Shared(self._lock, self._group.dirty, self._group.meta_dirty)
        self._families: dict[str, MetricFamily[Any]] = {}
        self._closed = False
        started = time.perf_counter()
        self.epoch = store.claim(node, epoch)
        try:
            snapshot = store.load(node)
            for name, definition in snapshot.families.items():
                values = snapshot.values.get(name, {})
                self._families[name] = self._family(definition, values, max_children)
        except BaseException:
            store.release(node, self.epoch)
            raise
        self.restored_series = snapshot.series_count()
        self.restore_seconds = time.perf_counter() - started
        self._created = threading.Event()
        if self.restored_series:
            threading.Thread(
                target=self._load_created, name=f"keepcount-created-{node}", daemon=True
            ).start()
        else:
            self._created.set()
        self._group.start()
        _open_registries.add(self)

    def _load_created(self) -> None:
        """Read the restored series' created times (for ``_created`` samples)
        after the values: as long again to read, and not needed to count."""
        try:
            created = self.store.load_created(self.node)
        except Exception as exc:  # a closed or failing store: exposition goes without
            if not self._closed:
                log.warning("node %s: cannot read created times: %s", self.node, exc)
            created = {}
        with self._lock:
            for name, family in self._families.items():
                family._set_restored_created(created.get(name, {}))
        self._created.set()

    def wait_created(self, timeout: float | None = None) -> bool:
        """Wait until the restored series' created times are loaded (they load
        in the background after ``open()``); False if ``timeout`` passed."""
        return self._created.wait(timeout)

    # -- families --------------------------------------------------------------

    def counter(
        self,
        name: str,
        help: str = "",
        labelnames: Sequence[str] = (),
        *,
        max_children: int | None = None,
    ) -> Counter:
        """Declare (or get) a counter family; its stored values come back with it."""
        family = self._declare(counter_def(name, help, labelnames), max_children)
        assert isinstance(family, Counter)
        return family

    def histogram(
        self,
        name: str,
        help: str = "",
        labelnames: Sequence[str] = (),
        *,
        buckets: Sequence[float] = DEFAULT_BUCKETS,
        max_children: int | None = None,
    ) -> Histogram:
        """Declare (or get) a histogram family with the given bucket upper bounds."""
        family = self._declare(histogram_def(name, help, labelnames, buckets), max_children)
        assert isinstance(family, Histogram)
        return family

    def _declare(self, definition: FamilyDef, max_children: int | None) -> MetricFamily[Any]:
        self._check_open()
        with self._lock:
            family = self._families.get(definition.name)
            if family is None:
                limit = self.max_children if max_children is None else max_children
                family = self._family(definition, {}, limit)
                self._families[definition.name] = family
                self._group.meta_dirty.append(family)
                return family
        family._redefine(definition)
        if max_children is not None:
            family.max_children = max_children
        return family

    def _family(
        self, definition: FamilyDef, values: dict[str, SeriesValue], limit: int | None
    ) -> MetricFamily[Any]:
        cls = Counter if definition.kind == "counter" else Histogram
        return cls(self._shared, definition, max_children=limit, restored=values)

    def get(self, name: str) -> MetricFamily[Any] | None:
        """The family called ``name`` (declared or restored), or None."""
        return self._families.get(name)

    def families(self) -> list[MetricFamily[Any]]:
        with self._lock:
            return list(self._families.values())

    # -- durability --------------------------------------------------------------

    def commit(self) -> Coroutine[Any, Any, None]:
        """``await reg.commit()``: return once every earlier ``inc()`` is durable.

        Raises ``StoreUnavailable`` (not acknowledged; retried by the next
        flush), ``Fenced`` (this incarnation lost its claim for good) or
        ``RegistryClosed``.  Never blocks the event loop.  Cancelling it takes
        effect when the flush it waits for ends.
        """
        return self._group.commit()  # no wrapper coroutine: this is the hot path

    async def increment(
        self,
        child: CounterChild,
        by: int = 1,
        *,
        key: str | None = None,
        fingerprint: str = "",
    ) -> Receipt:
        """Add ``by`` to a counter child and return once it is durable.

        With ``key`` (an idempotency key) the increment is counted at most
        once per key across every node of the store, for
        ``idempotency_ttl`` seconds: a request that comes again with the
        same key and ``fingerprint`` gets the first one's receipt
        (``replayed=True``) and counts nothing; with another fingerprint it
        raises ``IdempotencyKeyReused``.  The key is recorded in the same
        store write as the value.  Raises like ``commit()``: not acknowledged.
        """
        self._check_open()
        if key is None:
            child.inc(by)
            value = child.value
            await self._group.commit()
            return Receipt(self.node, child.family.name, child.labeldict(), value)
        if by.__class__ is not int or by < 0:
            raise InvalidInput(f"increment must be a non-negative int, got {by!r}")
        fut = self._group.submit_keyed(child, by, key, fingerprint, self.idempotency_ttl)
        outcome = await asyncio.shield(fut)  # one request's cancel must not drop the answer
        if isinstance(outcome, KeepcountError):
            raise _copy(outcome)
        value, replayed, record = outcome
        if replayed and record is not None:
            answer = json.loads(record.result)
            return Receipt(answer["node"], answer["name"], answer["labels"], value, True)
        return Receipt(self.node, child.family.name, child.labeldict(), value, replayed)

    def commit_sync(self, timeout: float | None = None) -> None:
        """``commit()`` for threads; ``OutcomeUnknown`` if ``timeout`` passes first."""
        self._group.commit_sync(timeout)

    def _write(
        self, families: Sequence[FamilyDef], rows: Sequence[SeriesRow], keys: Sequence[KeyRecord]
    ) -> None:
        self.store.write(self.node, self.epoch, families, rows, keys)

    @property
    def fenced(self) -> bool:
        """True once a newer incarnation took the node id: nothing more is acknowledged."""
        return self._group.fatal is not None

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def flushes(self) -> int:
        """Successful flushes so far (each one store write)."""
        return self._group.flushes

    # -- cluster -----------------------------------------------------------------

    def cluster(self, name: str | None = None) -> list[SeriesTotal]:
        """Totals over every node in the store (dead and released ones too).

        Reads the store: call it from a thread in asyncio code.
        """
        self._check_open()
        return cluster_totals(self.store.read_cluster(name))

    # -- closing ----------------------------------------------------------------

    def close(self) -> None:
        """Flush everything, give the claim back, close the store.

        Raises the final flush's error (after releasing everything) if it
        failed: those increments were not made durable.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        _open_registries.discard(self)
        error = self._group.close()
        try:
            if self._group.fatal is None:
                self.store.release(self.node, self.epoch)
        finally:
            self.store.close()
        if error is not None:
            raise error

    async def aclose(self) -> None:
        """``close()`` without blocking the event loop."""
        await asyncio.to_thread(self.close)

    def _check_open(self) -> None:
        if self._closed:
            raise RegistryClosed(f"registry of node {self.node!r} is closed")

    def __enter__(self) -> Registry:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    async def __aenter__(self) -> Registry:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<Registry node={self.node!r} epoch={self.epoch} store={self.store.url!r}>"
