"""Group commit: one flusher thread per registry makes increments durable.

Protocol (all state below changes only under the registry lock):

- ``inc()`` puts a child on the dirty list (once per flush).
- ``commit()`` joins ``_next``, the batch the *next* flush will cover, and
  wakes the flusher.  ``commit_sync()`` with no flush in flight leads the
  flush itself, in its own thread.  Either way one flush at a time.  Because the flusher takes the dirty list and swaps
  ``_next`` for a new batch in one step under the lock, every ``inc()`` that
  happened before a ``commit()`` is in the flush that answers it.  With
  nothing dirty, ``commit()`` waits for the flush in flight, if any; with
  none in flight every earlier increment is already durable and it returns
  at once.
- The flusher writes the *absolute values* of the taken children in one
  store write, without holding the lock (the event loop and ``inc()`` never
  wait for I/O), then settles the batch: every waiter wakes, each asyncio
  loop through a single ``call_soon_threadsafe`` resolving one future that
  all of that loop's waiters await.  N concurrent waiters share
  one write and one fsync.
- A failed write fails the batch's waiters (they were not acknowledged) and
  puts its children back on the dirty list, so the next flush writes them
  again; writes of absolute values are idempotent, so this is harmless even
  when the failed write did land.  ``Fenced`` is final: every later commit
  raises it.
- Without any ``commit()``, the flusher still writes every
  ``flush_interval`` seconds.  So an application that never commits loses, on
  a crash, at most the increments of the last ``flush_interval`` seconds plus
  those in the one flush in flight (whose duration is the store's write
  latency).  On ``close()`` and at normal interpreter exit, everything is
  flushed.

Invariant: every increment is in exactly one of: a dirty child, the batch in
flight, the store.

Keyed increments and settles (idempotency keys): ``keepcount.keyed``.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from keepcount.errors import (
    Fenced,
    InvalidInput,
    KeepcountError,
    KeyConflict,
    OutcomeUnknown,
    RegistryClosed,
    StoreUnavailable,
)
from keepcount.keyed import Keyed, KeyedCommit, Refusal
from keepcount.metrics import MAX_VALUE
from keepcount.settle import SettleStatus
from keepcount.stores.base import FamilyDef, KeyRecord, SeriesRow, SeriesValue
from keepcount.waiters import (
    Batch,
    Outcome,
    copy_error,
    resolve,
    resolve_keyed,
)

__all__ = ["DEFAULT_FLUSH_INTERVAL", "DEFAULT_IDEMPOTENCY_TTL", "GroupCommit", "Keyed"]

DEFAULT_FLUSH_INTERVAL = 1.0
"""Seconds between background flushes.  It bounds what an application that
never calls ``commit()`` can lose in a crash, at the cost of one store write
per interval while anything changed (a few hundred microseconds on SQLite)."""

DEFAULT_IDEMPOTENCY_TTL = 86_400.0
"""Seconds an idempotency key is remembered (a day, as common HTTP APIs do)."""

EXPIRE_EVERY = 60.0
"""Seconds between sweeps of expired idempotency keys by the flusher."""

BindFn = Callable[[], "KeepcountError | None"]
WriteFn = Callable[[Sequence[FamilyDef], Sequence[SeriesRow], Sequence[KeyRecord]], None]
LookupFn = Callable[[Sequence[str]], dict[str, KeyRecord | None]]
ExpireFn = Callable[[float], int]

_encode = json.JSONEncoder(separators=(",", ":")).encode  # one encoder, not one per call


class _Flush:
    """What one flush writes: taken children and families, keyed deltas,
    refusals, and the rows and key records composed from them (under the lock)."""

    __slots__ = (
        "children", "families", "keyed", "records", "refusals", "rows", "states", "values",
    )  # fmt: skip

    def __init__(
        self, children: list[Any], families: list[Any], keyed: list[Keyed],
        refusals: list[Refusal],
    ) -> None:  # fmt: skip
        self.children = children
        self.families = families
        self.keyed = keyed
        self.refusals = refusals
        self.rows: list[SeriesRow] = []
        self.states: list[tuple[Any, SeriesValue]] = []
        """(child, the state written for it): its durable state once written."""
        self.records: list[KeyRecord] = []
        self.values: list[int] = []
        """The child's value right after each keyed delta, as recorded."""


class GroupCommit(KeyedCommit):
    """The flusher of one registry.

    ``dirty`` and ``meta_dirty`` are the lists children and families append
    themselves to (under ``lock``); ``write`` persists one batch; ``lookup``
    and ``expire`` read and sweep idempotency keys.  ``node`` goes into the
    key records.
    """

    def __init__(
        self,
        lock: threading.Lock,
        write: WriteFn,
        *,
        node: str = "",
        lookup: LookupFn | None = None,
        expire: ExpireFn | None = None,
        interval: float | None = DEFAULT_FLUSH_INTERVAL,
        name: str = "keepcount-flusher",
        bind: BindFn | None = None,
        check: BindFn | None = None,
        dirty: list[Any] | None = None,
        meta_dirty: list[Any] | None = None,
    ) -> None:
        if interval is not None and not interval > 0:
            raise ValueError("flush_interval must be positive or None")
        super().__init__()
        # A successor (after a fork) takes over its predecessor's lists: the
        # children hold their bound ``append``.
        self.dirty: list[Any] = [] if dirty is None else dirty
        self.meta_dirty: list[Any] = [] if meta_dirty is None else meta_dirty
        self.flushes = 0
        self.counted = False
        """True once a flush wrote values or keys (not only definitions)."""
        self.bind = bind
        """Called (no lock held) before a flush while ``unbound``; returns
        the error that fails the flush, or None once bound."""
        self.unbound = False
        """The registry holds no slot yet: the next flush binds it first."""
        self.check = check
        """Called (no lock held) after each successful write: the error that
        keeps the flush from being acknowledged, or None (a claim's trust)."""
        self._replies: dict[asyncio.AbstractEventLoop, list[tuple[Any, Any]]] = {}
        self.node = node
        self._lock = lock
        self._cv = threading.Condition(lock)
        self._write = write
        self._lookup = lookup
        self._expire = expire
        self._next_expire = time.monotonic()
        self._interval = interval
        self._next = Batch()
        self._inflight: Batch | None = None
        self._fatal: KeepcountError | None = None
        self._closing = False
        self._stopped = False
        self._close_error: KeepcountError | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def fatal(self) -> KeepcountError | None:
        return self._fatal

    # -- waiting -------------------------------------------------------------

    def _check(self) -> None:
        if self._fatal is not None:
            raise copy_error(self._fatal)
        if self._closing:
            raise RegistryClosed("the registry is closed")

    def _want(self) -> Batch:
        batch = self._next
        if not batch.wanted:
            batch.wanted = True
            self._cv.notify()
        return batch

    def _join(self) -> Batch | None:
        """The batch whose success makes every earlier increment durable (lock held)."""
        self._check()
        if self._pending():
            return self._want()
        return self._inflight

    async def commit(self) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            batch = self._join()
            if batch is None:
                return
            outcome = batch.outcomes.get(loop)
            if outcome is None:
                outcome = batch.outcomes[loop] = Outcome(loop=loop)
        error = await outcome
        if error is not None:
            raise copy_error(error)

    def commit_sync(self, timeout: float | None = None) -> None:
        with self._lock:
            batch = self._join()
            if batch is None:
                return
            if batch is self._next and self._inflight is None and not self.unbound:
                # Lead: with no flush in flight, write in this thread rather
                # than hand over to the flusher and back (two thread wake-ups,
                # about as long as the write itself on SQLite).
                taken = self._start()
            else:
                taken = None
                if batch.event is None:
                    batch.event = threading.Event()
                event = batch.event
        if taken is not None:
            error = self._flush(taken)
            with self._lock:
                self._finish(batch, taken, error)
            if error is not None:
                raise copy_error(error)
            return
        if not event.wait(timeout):
            raise OutcomeUnknown(f"commit did not finish within {timeout} s; not acknowledged")
        if batch.error is not None:
            raise copy_error(batch.error)

    # -- the flusher -----------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                self._wait_for_work()
                if self._fatal is not None or (self._closing and not self._pending()):
                    break
                if not self._pending():
                    continue
                closing = self._closing
                unbound = self.unbound and self.bind is not None
                if not unbound:
                    batch = self._next
                    taken = self._start()
            error = None
            if unbound:
                # commit_sync() never leads while unbound, so no flush can
                # start before the flag is cleared here, with the start.
                assert self.bind is not None
                error = self.bind()
                with self._lock:
                    if error is None:
                        self.unbound = False
                    batch = self._next
                    taken = self._start()
            if error is None:
                error = self._flush(taken)
            with self._lock:
                self._finish(batch, taken, error)
                if closing and error is not None:
                    self._close_error = error
                    break
            self._sweep_keys()
        with self._lock:
            self._stopped = True
            closed = self._fatal or RegistryClosed("the registry was closed before this commit")
            self._abandon(closed)

    def _start(self) -> _Flush:
        """Begin the flush of ``_next`` (lock held, no flush in flight).

        At most one flush is in flight at a time: two concurrent writes of
        absolute values could land out of order and put an older value last.
        """
        self._inflight, self._next = self._next, Batch()
        children = self.dirty[:]
        self.dirty.clear()
        for child in children:
            child._dirty = False
        families = self.meta_dirty[:]
        self.meta_dirty.clear()
        taken = _Flush(children, families, self._queued, self._queued_refusals)
        self._queued = []
        self._queued_refusals = []
        self._compose(taken)
        self._reply()  # increments _compose refused
        return taken

    def _compose(self, f: _Flush) -> None:
        """The rows and key records of ``f`` from the current values (lock held)."""
        now = time.time()
        after: dict[Any, int] = {}  # child -> value with its keyed deltas
        keyed, values = [], []
        for k in f.keyed:
            value = after.get(k.child, k.child._value) + k.by
            if value > MAX_VALUE:  # inc() calls since it was queued took the room
                self._answer(k, InvalidInput(f"{k.child.family.name}: value would pass 2**63-1"))
                continue
            after[k.child] = value
            keyed.append(k)
            values.append(value)
        f.keyed, f.values = keyed, values
        rows: list[SeriesRow] = []
        append = rows.append
        states: list[tuple[Any, SeriesValue]] = []
        for child in f.children:
            state = after.pop(child) if after and child in after else child._state()
            append((child.family.name, child.key, state, child.created or now))
            states.append((child, state))
        for child, state in after.items():
            append((child.family.name, child.key, state, child.created or now))
            states.append((child, state))
        f.rows = rows
        f.states = states
        f.records = [
            KeyRecord(k.key, self.node, k.fingerprint, self._result(k, v), k.token, k.expires)
            for k, v in zip(keyed, values, strict=True)
        ]

    def _result(self, k: Keyed, value: int) -> str:
        child = k.child
        labels = dict(zip(child.family.labelnames, child.labelvalues, strict=True))
        return _encode(
            {"node": self.node, "name": child.family.name, "labels": labels, "value": value}
        )

    def _finish(self, batch: Batch, f: _Flush, error: KeepcountError | None) -> None:
        """End the flush in flight (lock held): account, settle, wake the flusher."""
        self._inflight = None
        if error is None:
            self.flushes += 1
            if f.rows or f.records or f.refusals:
                self.counted = True
            for child, state in f.states:  # what the store now holds for sure
                child._durable = state
            for k, value, record in zip(f.keyed, f.values, f.records, strict=True):
                k.child._value += k.by  # durable now: counted
                self._answer(k, (value, False, record))
            for r in f.refusals:
                self._settled(r, (SettleStatus.NOT_APPLIED, None))
        else:
            self._put_back(f.children, f.families)
            self._queued[:0] = f.keyed  # same tokens: a landed write is recognised
            for k in f.keyed:
                self._answer(k, error, keep=True)
            self._queued_refusals[:0] = f.refusals  # same tokens, as the deltas
            for r in f.refusals:
                self._settled(r, error, keep=True)
            if isinstance(error, Fenced):
                self._fatal = error
        self._settle(batch, error)
        self._reply()
        self._cv.notify()  # commits that queued behind this flush may go now

    def _reply(self) -> None:
        """Deliver the queued answers (lock held): one wake-up per event loop,
        however many keyed increments a flush settled."""
        replies, self._replies = self._replies, {}
        for loop, answers in replies.items():
            try:
                loop.call_soon_threadsafe(resolve_keyed, answers)
            except RuntimeError:  # that loop is closed: nobody is waiting any more
                pass

    def _pending(self) -> bool:
        return bool(self.dirty or self.meta_dirty or self._queued or self._queued_refusals)

    def _wait_for_work(self) -> None:
        """Until a flush is wanted (or due) and none is in flight (lock held)."""
        deadline = None if self._interval is None else time.monotonic() + self._interval
        while True:
            if self._fatal is not None:
                return
            if self._inflight is None:
                if self._next.wanted or self._closing:
                    return
                if deadline is not None and time.monotonic() >= deadline:
                    return
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.001)
            self._cv.wait(remaining)

    def _flush(self, f: _Flush) -> KeepcountError | None:
        """Write ``f``; on a key conflict settle the keys already recorded and
        write the rest again (each round settles at least one key)."""
        for _ in range(len(f.keyed) + len(f.refusals) + 2):
            records = f.records
            if f.refusals:
                records = records + [r.record for r in f.refusals]
            try:
                self._write([fam.definition for fam in f.families], f.rows, records)
            except KeyConflict as conflict:
                error = self._resolve_conflict(
                    f, conflict.keys, conflict.pending, conflict.undecided
                )
                if error is not None:
                    return error
                continue
            except KeepcountError as exc:
                return exc
            except Exception as exc:  # a bug or an untranslated driver error: not acknowledged
                err = StoreUnavailable(f"flush failed: {exc!r}")
                err.__cause__ = exc
                return err
            return None if self.check is None else self.check()
        return StoreUnavailable("idempotency keys kept changing under the flush; not written")

    def _put_back(self, children: list[Any], families: list[Any]) -> None:
        for child in children:
            if not child._dirty:
                child._dirty = True
                self.dirty.append(child)
        for fam in families:
            if fam not in self.meta_dirty:
                self.meta_dirty.append(fam)

    def _settle(self, batch: Batch, error: KeepcountError | None) -> None:
        batch.error = error
        if batch.event is not None:
            batch.event.set()
        outcomes, batch.outcomes = batch.outcomes, {}
        for loop, outcome in outcomes.items():
            try:
                loop.call_soon_threadsafe(resolve, outcome, error)
            except RuntimeError:  # that loop is closed: nobody is waiting any more
                pass

    def _abandon(self, error: KeepcountError) -> None:
        """Fail everything still waiting: the flusher has stopped (lock held)."""
        self._settle(self._next, error)
        for k in list(self.keyed.values()):
            self._answer(k, error)
        for r in list(self.refusals.values()):
            self._settled(r, error)
        self._queued.clear()
        self._queued_refusals.clear()
        self._reply()

    def _sweep_keys(self) -> None:
        """Delete expired idempotency keys now and then (flusher thread, no lock)."""
        if self._expire is None or time.monotonic() < self._next_expire:
            return
        self._next_expire = time.monotonic() + EXPIRE_EVERY
        try:
            self._expire(time.time())
        except KeepcountError:
            pass  # housekeeping only: the next sweep tries again

    # -- shutting down -----------------------------------------------------------

    def close(self) -> KeepcountError | None:
        """Flush what is dirty, stop the thread; return the final flush's error."""
        with self._lock:
            self._closing = True
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join()
        elif not self._stopped:  # never started
            with self._lock:
                self._abandon(RegistryClosed("the registry was closed"))
        return self._close_error
