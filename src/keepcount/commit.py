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

Keyed increments (idempotency keys)
-----------------------------------
``submit_keyed()`` does not touch the child's value.  It queues a ``Keyed``
delta; the flush writes the child's value *plus* its queued deltas together
with one ``KeyRecord`` per delta, in one store write.  The store refuses the
whole write if any key is already recorded (``KeyConflict``, by any node on
the store); the flusher then looks each such key up and:

- drops the delta if the record is another request's: its waiters get the
  recorded receipt (a replay) or, for another fingerprint,
  ``IdempotencyKeyReused``;
- keeps it as written if the record carries the delta's own ``token``: an
  earlier write whose outcome was unknown did land;

and writes the rest again.  Only after the write succeeded is the delta added
to the child's value in memory.  A failed write leaves the delta queued (its
token unchanged) for the next flush; its waiters get the error (not
acknowledged), and a retry of the same key on this node joins it rather than
counting again.  So a key is counted at most once per store, whichever nodes
its retries reach, and a delta is counted iff its key record is in the store.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from keepcount.errors import (
    Fenced,
    IdempotencyKeyReused,
    InvalidInput,
    KeepcountError,
    KeyConflict,
    OutcomeUnknown,
    RegistryClosed,
    StoreUnavailable,
)
from keepcount.metrics import MAX_VALUE
from keepcount.stores.base import FamilyDef, KeyRecord, SeriesRow, SeriesValue
from keepcount.waiters import (
    Batch,
    KeyedOutcome,
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


class Keyed:
    """One increment under an idempotency key, queued until a flush records it."""

    __slots__ = ("by", "child", "expires", "fingerprint", "key", "token", "waiters")

    def __init__(self, child: Any, by: int, key: str, fingerprint: str, expires: float) -> None:
        self.child = child
        self.by = by
        self.key = key
        self.fingerprint = fingerprint
        self.expires = expires
        self.token = uuid.uuid4().hex
        self.waiters: list[asyncio.Future[KeyedOutcome]] = []


class _Flush:
    """What one flush writes: taken children and families, keyed deltas, and
    the rows and key records composed from them (under the lock)."""

    __slots__ = ("children", "families", "keyed", "records", "rows", "states", "values")

    def __init__(self, children: list[Any], families: list[Any], keyed: list[Keyed]) -> None:
        self.children = children
        self.families = families
        self.keyed = keyed
        self.rows: list[SeriesRow] = []
        self.states: list[tuple[Any, SeriesValue]] = []
        """(child, the state written for it): its durable state once written."""
        self.records: list[KeyRecord] = []
        self.values: list[int] = []
        """The child's value right after each keyed delta, as recorded."""


def _receipt_value(record: KeyRecord) -> int:
    value = json.loads(record.result)["value"]
    assert isinstance(value, int)
    return value


class GroupCommit:
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
        # A successor (after a fork) takes over its predecessor's lists: the
        # children hold their bound ``append``.
        self.dirty: list[Any] = [] if dirty is None else dirty
        self.meta_dirty: list[Any] = [] if meta_dirty is None else meta_dirty
        self.keyed: dict[str, Keyed] = {}
        """Keyed deltas queued or in flight, by key."""
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
        self._queued: list[Keyed] = []  # keyed deltas for the next flush
        self._replies: dict[asyncio.AbstractEventLoop, list[tuple[Any, KeyedOutcome]]] = {}
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
        if self.dirty or self.meta_dirty or self._queued:
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

    def submit_keyed(
        self, child: Any, by: int, key: str, fingerprint: str, ttl: float
    ) -> asyncio.Future[KeyedOutcome]:
        """Queue ``by`` for ``child`` under ``key``; the future answers once it is
        settled (see the module docstring).  A key already queued or in
        flight on this registry is joined, not counted again."""
        fut: asyncio.Future[KeyedOutcome] = asyncio.get_running_loop().create_future()
        with self._lock:
            self._check()
            keyed = self.keyed.get(key)
            if keyed is not None:
                if keyed.fingerprint != fingerprint:
                    raise IdempotencyKeyReused(
                        f"idempotency key {key!r} is in use by a different request; nothing counted"
                    )
            else:
                queued = sum(k.by for k in self.keyed.values() if k.child is child)
                if child._value + queued + by > MAX_VALUE:
                    raise InvalidInput(
                        f"{child.family.name}: value would pass 2**63-1; increment refused"
                    )
                keyed = self.keyed[key] = Keyed(child, by, key, fingerprint, time.time() + ttl)
                self._queued.append(keyed)
            keyed.waiters.append(fut)
            self._want()
        return fut

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
        taken = _Flush(children, families, self._queued)
        self._queued = []
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
            if f.rows or f.records:
                self.counted = True
            for child, state in f.states:  # what the store now holds for sure
                child._durable = state
            for k, value, record in zip(f.keyed, f.values, f.records, strict=True):
                k.child._value += k.by  # durable now: counted
                self._answer(k, (value, False, record))
        else:
            self._put_back(f.children, f.families)
            self._queued[:0] = f.keyed  # same tokens: a landed write is recognised
            for k in f.keyed:
                self._answer(k, error, keep=True)
            if isinstance(error, Fenced):
                self._fatal = error
        self._settle(batch, error)
        self._reply()
        self._cv.notify()  # commits that queued behind this flush may go now

    def _answer(self, k: Keyed, outcome: KeyedOutcome, *, keep: bool = False) -> None:
        """Queue the answer to ``k``'s waiters (lock held); forget ``k`` unless it
        stays queued.  ``_reply()`` delivers every queued answer.

        The first waiter is the request that queued it; later ones joined it
        with the same key, so they are told it is a replay.
        """
        if not keep:
            self.keyed.pop(k.key, None)
        waiters, k.waiters = k.waiters, []
        for i, fut in enumerate(waiters):
            answer = outcome
            if i and isinstance(outcome, tuple):
                answer = (outcome[0], True, outcome[2])
            self._replies.setdefault(fut.get_loop(), []).append((fut, answer))

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
        return bool(self.dirty or self.meta_dirty or self._queued)

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
        for _ in range(len(f.keyed) + 2):
            try:
                self._write([fam.definition for fam in f.families], f.rows, f.records)
            except KeyConflict as conflict:
                error = self._resolve_conflict(f, conflict.keys, conflict.pending)
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

    def _resolve_conflict(
        self, f: _Flush, keys: list[str], pending: Sequence[str] = ()
    ) -> KeepcountError | None:
        if self._lookup is None:
            return StoreUnavailable("idempotency key conflict without a lookup")
        try:
            found = self._lookup(keys)
        except KeepcountError as exc:
            return exc
        busy = set(pending)
        with self._lock:
            keep = []
            for k in f.keyed:
                record = found.get(k.key)
                if k.key in busy:
                    # Another live node is recording this key (a retry reached
                    # us while its first attempt was in flight there): only
                    # this request fails, not the flush; its retry learns how
                    # the first one ended.
                    self._answer(
                        k,
                        OutcomeUnknown(
                            f"idempotency key {k.key!r} is being recorded by another node; "
                            "not acknowledged here (retry with the same key)"
                        ),
                    )
                elif record is None:  # not in conflict, or expired since: write it again
                    keep.append(k)
                elif record.token == k.token:  # an earlier write of ours did land
                    k.child._value += k.by
                    self._answer(k, (_receipt_value(record), False, record))
                elif record.fingerprint == k.fingerprint:  # a retry: answer as recorded
                    self._answer(k, (_receipt_value(record), True, record))
                else:
                    self._answer(
                        k,
                        IdempotencyKeyReused(
                            f"idempotency key {k.key!r} was first used for a different request "
                            f"(on node {record.node!r}); nothing counted"
                        ),
                    )
            f.keyed = keep
            self._compose(f)
            self._reply()
        return None

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
        self._queued.clear()
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
