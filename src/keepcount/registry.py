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
import json
import logging
import os
import threading
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from keepcount.binding import SlotBinding, Slots, registries
from keepcount.commit import DEFAULT_FLUSH_INTERVAL, DEFAULT_IDEMPOTENCY_TTL, GroupCommit
from keepcount.errors import (
    InvalidInput,
    KeepcountError,
    RegistryClosed,
)
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
from keepcount.naming import check_host_id, check_node_id
from keepcount.settle import Settlement, SettleStatus
from keepcount.slots import (
    DEFAULT_MAX_SLOTS,
    Claimer,
    CoordinatorClaimer,
    Hold,
    LockClaimer,
    host_of,
)
from keepcount.stores import open_store
from keepcount.stores.base import (
    FamilyDef,
    KeyRecord,
    SeriesRow,
    SeriesValue,
    Snapshot,
    Store,
)
from keepcount.totals import SeriesTotal, cluster_totals, host_snapshot
from keepcount.waiters import copy_error

__all__ = ["Receipt", "Registry", "open", "open_lazily", "receipt_of"]

log = logging.getLogger("keepcount.registry")


@dataclass(frozen=True, slots=True)
class Receipt:
    """What a durable increment answers: the node's value right after it."""

    node: str
    name: str
    labels: dict[str, str]
    value: int
    replayed: bool = False
    """True when an idempotency key matched an earlier increment: nothing was counted now."""


def receipt_of(record: KeyRecord, *, replayed: bool = False) -> Receipt:
    """The receipt an idempotency key's record holds (the first answer to it)."""
    answer = json.loads(record.result)
    return Receipt(answer["node"], answer["name"], answer["labels"], answer["value"], replayed)


def open(  # noqa: A001 - the public name in DESIGN §3
    url: str,
    node: str,
    *,
    flush_interval: float | None = DEFAULT_FLUSH_INTERVAL,
    max_children: int | None = DEFAULT_MAX_CHILDREN,
    epoch: int | None = None,
    idempotency_ttl: float = DEFAULT_IDEMPOTENCY_TTL,
    max_slots: int = DEFAULT_MAX_SLOTS,
    coordinator: str | None = None,
) -> Registry:
    """Open the store at ``url``, take a slot of host ``node``, restore it.

    Every process that opens the same ``node`` gets a slot of its own
    (``keepcount.slots``): the lowest one no live process holds, restored
    before this returns.  ``reg.node`` is the slot's id (``node`` itself for
    slot 0, ``node@1``, ...), ``reg.host`` is ``node``.  A registry opened
    before a fork (gunicorn ``--preload``, an import in a forking master)
    gives its slot back at the fork, and each child takes and restores a slot
    of its own (see ``Registry``).  ``max_slots=1`` makes the id exclusive:
    a second live process gets ``ClaimConflict``.

    ``coordinator`` (``etcd://...``, ``zookeeper://...``) takes the slots
    there instead of by local locks (``keepcount.slots``): a slot is free
    once its holder's lease expired, and nothing is acknowledged unless the
    claim is trusted.

    ``epoch`` (from a coordinator that issued the claim) claims exactly
    ``node``, with no slots.  ``idempotency_ttl``: seconds an idempotency key
    given to ``increment()`` is remembered.  Raises ``ClaimConflict`` if live
    processes hold every slot, ``CorruptStore`` for a damaged or foreign
    store, ``StoreUnavailable`` if it cannot be reached.
    """
    options: dict[str, Any] = {
        "flush_interval": flush_interval,
        "max_children": max_children,
        "idempotency_ttl": idempotency_ttl,
    }
    if epoch is not None:
        check_node_id(node)
    else:
        check_host_id(node)
    store = open_store(url)
    try:
        if epoch is not None:
            return Registry(store, node, epoch=epoch, **options)
        claimer: Claimer = (
            LockClaimer(url, max_slots)
            if coordinator is None
            else CoordinatorClaimer(coordinator, max_slots)
        )
        return Registry(store, node, slots=Slots(url, claimer), **options)
    except BaseException:
        store.close()
        raise


def open_lazily(
    url: str,
    node: str,
    *,
    shared: _Shared | None = None,
    families: dict[str, MetricFamily[Any]] | None = None,
    flush_interval: float | None = DEFAULT_FLUSH_INTERVAL,
    max_slots: int = DEFAULT_MAX_SLOTS,
    coordinator: str | None = None,
) -> Registry:
    """A host registry like ``open()``'s that has done nothing yet: no store
    opened, no slot taken, no flusher thread.  ``start()`` (first use) starts
    the flusher, whose first flush opens the store, takes a slot and adds
    its stored values to what was counted meanwhile, before it writes.

    For ``keepcount.prometheus``, whose module-level metrics exist from
    import time but must not claim anything until the process counts (a
    command that only imports the app, gunicorn's ``--preload`` master).
    Families are unlimited (``max_children=None``), as prometheus_client's.
    ``shared`` and ``families``: the lock, dirty lists and family table the
    caller's metrics already use (made before the store was known).
    """
    check_host_id(node)
    claimer: Claimer = (
        LockClaimer(url, max_slots)
        if coordinator is None
        else CoordinatorClaimer(coordinator, max_slots)
    )
    return Registry(
        None,
        node,
        slots=Slots(url, claimer),
        flush_interval=flush_interval,
        max_children=None,
        shared=shared,
        families=families,
    )


class Registry(SlotBinding):
    """A node's counters and histograms, backed by a store.

    Thread-safe; ``inc()`` never does I/O.  Use ``await commit()`` in asyncio
    code and ``commit_sync()`` in threads.  The registry owns the store it is
    given and closes it in ``close()``.

    **Hosts of many workers** (made by ``keepcount.open``): the registry
    holds a *slot* of its host (``keepcount.slots``).  Across a fork:

    - the parent flushes, gives its slot back and closes its store (nothing
      that cannot cross a fork - the flusher thread, a connection, a driver
      session - is there when the child starts); its values stay durable in
      the slot, and in the host's totals;
    - the child takes the lowest free slot and restores it before it goes
      on, so a gunicorn worker serves with its slot's values;
    - a parent that had counted takes a slot again at once; one that never
      did (gunicorn's master with ``--preload``) only when it next needs to
      write, so it holds no slot while it only supervises workers.

    A child that cannot take a slot (store down) answers every commit with
    the error until a later flush manages to.  A registry built directly on
    a store (``Registry(store, node)``, one exact node id) cannot be shared:
    in a forked child every commit raises ``RegistryClosed``.
    """

    def __init__(
        self,
        store: Store | None,
        node: str,
        *,
        flush_interval: float | None = DEFAULT_FLUSH_INTERVAL,
        max_children: int | None = DEFAULT_MAX_CHILDREN,
        epoch: int | None = None,
        idempotency_ttl: float = DEFAULT_IDEMPOTENCY_TTL,
        slots: Slots | None = None,
        shared: _Shared | None = None,
        families: dict[str, MetricFamily[Any]] | None = None,
    ) -> None:
        self.host = check_host_id(node) if slots is not None else check_node_id(node)
        """The node id the registry was opened with (the host, for slots)."""
        self.node = self.host
        """The store node id written: the slot's id (``host`` or ``host@N``)."""
        if store is not None:
            self.store: Store = store
        self.max_children = max_children
        self._shared = shared or _Shared(threading.Lock(), [], [])
        self._lock = self._shared.lock
        if not idempotency_ttl > 0:
            raise ValueError("idempotency_ttl must be positive")
        self.idempotency_ttl = idempotency_ttl
        self._interval = flush_interval
        self._slots = slots
        self._slot_lock: Hold | None = None
        self._bind_lock = threading.Lock()
        self._store_open = store is not None
        self._started = store is not None
        """False for a registry of ``open_lazily`` until ``start()``."""
        self._start_lock = threading.Lock()
        self._pid = os.getpid()
        self._fork_restart = False
        self._counted_before_fork = False
        self._group = self._new_group()
        self._families: dict[str, MetricFamily[Any]] = {} if families is None else families
        self._closed = False
        self._created = threading.Event()
        self.epoch = 0
        self.restored_series = 0
        self.restore_seconds = 0.0
        if slots is None:
            if store is None:
                raise ValueError("a registry without slots needs its store")
            self._bind_exact(epoch)
        elif store is None:
            self._group.unbound = True  # the first flush binds (open_lazily)
        else:
            error = self._bind_slot()
            if error is not None:
                raise error
        if self._started:
            self._group.start()
        registries.add(self)

    def start(self) -> None:
        """Start a registry of ``open_lazily`` (idempotent; no I/O, and no
        wait for the lock: safe with it held).  Its flusher binds it at its
        first flush: the next ``commit()``, or within ``flush_interval``."""
        with self._start_lock:
            if not self._started:
                self._started = True
                self._group.start()

    def _new_group(self) -> GroupCommit:
        return GroupCommit(
            self._lock,
            self._write,
            node=self.node,
            lookup=self._lookup_keys,
            expire=self._expire_keys,
            interval=self._interval,
            name=f"keepcount-flush-{self.host}",
            bind=self._bind_slot if self._slots is not None else None,
            check=self._check_hold,
            dirty=self._shared.dirty,
            meta_dirty=self._shared.meta_dirty,
        )

    def _bind_exact(self, epoch: int | None) -> None:
        started = time.perf_counter()
        self.epoch = self.store.claim(self.node, epoch)
        try:
            snapshot = self.store.load(self.node)
            with self._lock:
                self._apply(snapshot)
        except BaseException:
            self.store.release(self.node, self.epoch)
            raise
        self._restored(snapshot, started)

    def _restored(self, snapshot: Snapshot, started: float) -> None:
        self.restored_series = snapshot.series_count()
        self.restore_seconds = time.perf_counter() - started
        self._created.clear()
        if self.restored_series:
            node = self.node
            threading.Thread(
                target=self._load_created, args=(node,), name=f"keepcount-created-{node}",
                daemon=True,
            ).start()  # fmt: skip
        else:
            self._created.set()

    def _load_created(self, node: str) -> None:
        """Read the restored series' created times (for ``_created`` samples)
        after the values: as long again to read, and not needed to count."""
        try:
            created = self.store.load_created(node)
        except Exception as exc:  # a closed or failing store: exposition goes without
            if not self._closed:
                log.warning("node %s: cannot read created times: %s", node, exc)
            created = {}
        with self._lock:
            if node == self.node:
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
        if definition.kind == "counter":
            return Counter(self._shared, definition, max_children=limit, restored=values)
        if definition.kind == "histogram":
            return Histogram(self._shared, definition, max_children=limit, restored=values)
        # A family written through keepcount.prometheus (restored before the
        # process declared it, or found in a node's rows): its own classes.
        from keepcount.prometheus.families import family_class

        return family_class(definition)(self._shared, definition, restored=values)

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
            raise copy_error(outcome)
        value, replayed, record = outcome
        if replayed and record is not None:
            return receipt_of(record, replayed=True)
        return Receipt(self.node, child.family.name, child.labeldict(), value, replayed)

    async def settle_key(self, key: str) -> Settlement:
        """Settle idempotency key ``key`` for good (``keepcount.settle``).

        ``applied`` (with the receipt the first answer to the key carried),
        ``not_applied`` - final: a refusal of the key is now durable in the
        store, written by this registry's flush under its claim, so no
        increment of that key queued anywhere can count later (it fails with
        ``IdempotencyKeySettled``) - or ``in_flight``: the key's increment is
        queued or being flushed here, or another live node is recording it;
        ask again later.  A refusal expires with the key, after
        ``idempotency_ttl`` seconds.  Raises like ``commit()`` when the
        refusal could not be written: the outcome is still open, and the
        refusal stays queued for the next flush (ask again).
        """
        self._check_open()
        if not isinstance(key, str) or not key:
            raise InvalidInput(f"an idempotency key is a non-empty string, not {key!r}")
        fut = self._group.submit_settle(key, self.idempotency_ttl)
        outcome = await asyncio.shield(fut)
        if isinstance(outcome, KeepcountError):
            raise copy_error(outcome)
        status, record = outcome
        if status is not SettleStatus.APPLIED or record is None:
            return Settlement(key, status)
        return Settlement(key, status, receipt_of(record))

    def commit_sync(self, timeout: float | None = None) -> None:
        """``commit()`` for threads; ``OutcomeUnknown`` if ``timeout`` passes first."""
        self._group.commit_sync(timeout)

    def _write(
        self, families: Sequence[FamilyDef], rows: Sequence[SeriesRow], keys: Sequence[KeyRecord]
    ) -> None:
        self.store.write(self.node, self.epoch, families, rows, keys)

    def _check_hold(self) -> KeepcountError | None:
        hold = self._slot_lock
        return None if hold is None else hold.check()

    def _lookup_keys(self, keys: Sequence[str]) -> dict[str, KeyRecord | None]:
        return self.store.lookup_keys(keys)

    def _expire_keys(self, now: float) -> int:
        return self.store.expire_keys(now)

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
        return cluster_totals(self._read_store().read_cluster(name))

    def host_totals(self, name: str | None = None) -> list[SeriesTotal]:
        """Totals over this registry's host: every slot of it (``host``,
        ``host@1``, ...), dead ones too, from durable values.  Each total's
        ``nodes`` holds the slots' parts.  Reads the store, as ``cluster()``."""
        return cluster_totals(host_snapshot(self._read_store(), self.host, name))

    def live_slots(self) -> set[str]:
        """The slots of this host a live process holds now: by their locks
        (once their holder's first write landed), or the claims a
        coordinator lists; failing both (a coordinator client not open in
        this process), those claimed and not released in the store, which
        counts a killed holder's slot until it is taken again.  Reads the
        store, as ``cluster()``."""
        live = None if self._slots is None else self._slots.claimer.live(self.host)
        if live is None:
            live = {
                r.node
                for r in self._read_store().nodes()
                if host_of(r.node) == self.host and r.released_at is None
            }
        return live

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
        registries.discard(self)
        error = self._group.close()
        bound = self._slots is None or self._slot_lock is not None
        self._give_back(released=self._group.fatal is None and bound)
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
        url = self._slots.url if self._slots is not None else self.store.url
        return f"<Registry node={self.node!r} epoch={self.epoch} store={url!r}>"
