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
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from keepcount.errors import (
    Fenced,
    KeepcountError,
    OutcomeUnknown,
    RegistryClosed,
    StoreUnavailable,
)
from keepcount.stores.base import FamilyDef, SeriesRow

__all__ = ["DEFAULT_FLUSH_INTERVAL", "GroupCommit"]

DEFAULT_FLUSH_INTERVAL = 1.0
"""Seconds between background flushes.  It bounds what an application that
never calls ``commit()`` can lose in a crash, at the cost of one store write
per interval while anything changed (a few hundred microseconds on SQLite)."""

WriteFn = Callable[[Sequence[FamilyDef], Sequence[SeriesRow]], None]


class _Outcome(asyncio.Future[KeepcountError | None]):
    """One future per (flush, event loop), awaited by all of that loop's waiters.

    Its result is the flush's error or None; each waiter raises its own copy.
    It refuses cancellation: one waiter's cancel must not cancel the others'
    wait, so a cancelled ``commit()`` takes effect when the flush it waits
    for ends (one store write at most).
    """

    def cancel(self, msg: object = None) -> bool:
        return False


class _Batch:
    """The waiters of one flush."""

    __slots__ = ("error", "event", "outcomes", "wanted")

    def __init__(self) -> None:
        self.wanted = False
        self.error: KeepcountError | None = None
        self.event: threading.Event | None = None
        self.outcomes: dict[asyncio.AbstractEventLoop, _Outcome] = {}


def _copy(err: KeepcountError) -> KeepcountError:
    """A fresh exception per waiter: one instance raised in many threads or
    tasks would collect all their tracebacks."""
    new = type(err)(*err.args)
    new.__cause__ = err
    return new


def _resolve(outcome: _Outcome, error: KeepcountError | None) -> None:
    if not outcome.done():
        outcome.set_result(error)


class GroupCommit:
    """The flusher of one registry.

    ``dirty`` and ``meta_dirty`` are the lists children and families append
    themselves to (under ``lock``); ``write`` persists one batch.
    """

    def __init__(
        self,
        lock: threading.Lock,
        write: WriteFn,
        *,
        interval: float | None = DEFAULT_FLUSH_INTERVAL,
        name: str = "keepcount-flusher",
    ) -> None:
        if interval is not None and not interval > 0:
            raise ValueError("flush_interval must be positive or None")
        self.dirty: list[Any] = []
        self.meta_dirty: list[Any] = []
        self.flushes = 0
        self._lock = lock
        self._cv = threading.Condition(lock)
        self._write = write
        self._interval = interval
        self._next = _Batch()
        self._inflight: _Batch | None = None
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

    def _join(self) -> _Batch | None:
        """The batch whose success makes every earlier increment durable (lock held)."""
        if self._fatal is not None:
            raise _copy(self._fatal)
        if self._closing:
            raise RegistryClosed("the registry is closed")
        if self.dirty or self.meta_dirty:
            batch = self._next
            if not batch.wanted:
                batch.wanted = True
                self._cv.notify()
            return batch
        return self._inflight

    async def commit(self) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            batch = self._join()
            if batch is None:
                return
            outcome = batch.outcomes.get(loop)
            if outcome is None:
                outcome = batch.outcomes[loop] = _Outcome(loop=loop)
        error = await outcome
        if error is not None:
            raise _copy(error)

    def commit_sync(self, timeout: float | None = None) -> None:
        with self._lock:
            batch = self._join()
            if batch is None:
                return
            if batch is self._next and self._inflight is None:
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
            error = self._flush(taken[1], taken[2])
            with self._lock:
                self._finish(batch, taken[0], taken[1], error)
            if error is not None:
                raise _copy(error)
            return
        if not event.wait(timeout):
            raise OutcomeUnknown(f"commit did not finish within {timeout} s; not acknowledged")
        if batch.error is not None:
            raise _copy(batch.error)

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
                batch = self._next
                children, families, rows = self._start()
            error = self._flush(families, rows)
            with self._lock:
                self._finish(batch, children, families, error)
                if closing and error is not None:
                    self._close_error = error
                    break
        with self._lock:
            self._stopped = True
            closed = self._fatal or RegistryClosed("the registry was closed before this commit")
            self._settle(self._next, closed)

    def _start(self) -> tuple[list[Any], list[Any], list[SeriesRow]]:
        """Begin the flush of ``_next`` (lock held, no flush in flight).

        At most one flush is in flight at a time: two concurrent writes of
        absolute values could land out of order and put an older value last.
        """
        self._inflight, self._next = self._next, _Batch()
        return self._take()

    def _finish(
        self, batch: _Batch, children: list[Any], families: list[Any], error: KeepcountError | None
    ) -> None:
        """End the flush in flight (lock held): account, settle, wake the flusher."""
        self._inflight = None
        if error is not None:
            self._put_back(children, families)
            if isinstance(error, Fenced):
                self._fatal = error
        else:
            self.flushes += 1
        self._settle(batch, error)
        self._cv.notify()  # commits that queued behind this flush may go now

    def _pending(self) -> bool:
        return bool(self.dirty or self.meta_dirty)

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

    def _take(self) -> tuple[list[Any], list[Any], list[SeriesRow]]:
        children = self.dirty[:]
        self.dirty.clear()
        families = self.meta_dirty[:]
        self.meta_dirty.clear()
        now = time.time()
        rows: list[SeriesRow] = []
        append = rows.append
        for child in children:
            child._dirty = False
            append((child.family.name, child.key, child._state(), child.created or now))
        return children, families, rows

    def _flush(self, families: list[Any], rows: list[SeriesRow]) -> KeepcountError | None:
        try:
            self._write([f.definition for f in families], rows)
        except KeepcountError as exc:
            return exc
        except Exception as exc:  # a bug or an untranslated driver error: not acknowledged
            err = StoreUnavailable(f"flush failed: {exc!r}")
            err.__cause__ = exc
            return err
        return None

    def _put_back(self, children: list[Any], families: list[Any]) -> None:
        for child in children:
            if not child._dirty:
                child._dirty = True
                self.dirty.append(child)
        for fam in families:
            if fam not in self.meta_dirty:
                self.meta_dirty.append(fam)

    def _settle(self, batch: _Batch, error: KeepcountError | None) -> None:
        batch.error = error
        if batch.event is not None:
            batch.event.set()
        outcomes, batch.outcomes = batch.outcomes, {}
        for loop, outcome in outcomes.items():
            try:
                loop.call_soon_threadsafe(_resolve, outcome, error)
            except RuntimeError:  # that loop is closed: nobody is waiting any more
                pass

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
                self._settle(self._next, RegistryClosed("the registry was closed"))
        return self._close_error
