"""A registry's binding to a slot, and its life across exits and forks.

``SlotBinding`` is the part of ``keepcount.registry.Registry`` that holds a
slot of a host (``keepcount.slots``, DESIGN §10): take the lowest free slot,
claim it, add its stored values to what was counted since the last unbind;
give it back; and carry it across ``fork()``:

- *before* (in the parent): stop the flusher (it flushes what is pending),
  release the claim and the slot, close the store and the coordinator
  client, so nothing that cannot cross a fork is there when the child
  starts; the in-memory values go back to zero (all durable in the slot);
- *after, in the child*: take the lowest free slot and restore it before
  the child goes on;
- *after, in the parent*: a parent that had counted takes a slot again at
  once, one that never did (gunicorn's master) only when it next flushes.

It also closes every open registry at interpreter exit (flush, release),
and in multiprocessing's exit finalizers, which run where atexit does not (a
``multiprocessing`` child ends with ``os._exit``).
"""

from __future__ import annotations

import atexit

# Before the fork hooks below: concurrent.futures.thread holds a global lock
# across fork() and frees it in the child with a hook of its own.  Hooks run
# after a fork in the order they were registered, so if that module were
# first imported later (by the Cassandra driver, lazily) the hook here, which
# opens the store again (a driver's ThreadPoolExecutor.submit), would wait
# for that lock forever.
import concurrent.futures.thread  # noqa: F401 - imported for its fork hooks
import logging
import multiprocessing.util
import os
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any

from keepcount.commit import GroupCommit
from keepcount.errors import DefinitionConflict, KeepcountError, RegistryClosed
from keepcount.metrics import MetricFamily
from keepcount.slots import Claimer, Hold, next_epoch
from keepcount.stores import open_store
from keepcount.stores.base import FamilyDef, SeriesValue, Snapshot, Store

__all__ = ["SlotBinding", "registries"]

log = logging.getLogger("keepcount.registry")

CREATED_WAIT_AT_FORK = 10.0
"""Seconds a fork waits for the restored series' created times to load
(a million series load in about a second) before it closes the store."""

registries: weakref.WeakSet[Any] = weakref.WeakSet()
"""Every open registry of this process: closed at exit, carried across forks."""
inherited: list[object] = []
"""Stores a forked child inherited and must never use nor close (the parent's)."""


@atexit.register
def _close_all() -> None:
    # Normal interpreter exit flushes; only a crash loses the last interval.
    for reg in list(registries):
        try:
            reg.close()
        except Exception:  # noqa: S110 - exit must go on
            pass


def _close_at_process_exit() -> None:
    """Also flush where a process ends with ``os._exit`` after its work:
    a ``multiprocessing`` child (``uvicorn --workers`` runs its workers so)
    skips atexit but runs multiprocessing's finalizers first.  A forked
    multiprocessing child clears them, so the fork hook registers again."""
    multiprocessing.util.Finalize(None, _close_all, exitpriority=100)


_close_at_process_exit()


def _before_fork() -> None:
    for reg in list(registries):
        reg._before_fork()


def _after_fork_in_parent() -> None:
    for reg in list(registries):
        reg._after_fork_in_parent()


def _after_fork_in_child() -> None:
    for reg in list(registries):
        reg._after_fork_in_child()
    _close_at_process_exit()


os.register_at_fork(
    before=_before_fork,
    after_in_parent=_after_fork_in_parent,
    after_in_child=_after_fork_in_child,
)


@dataclass(frozen=True, slots=True)
class Slots:
    """Where a host registry finds its slots (``keepcount.slots``)."""

    url: str
    claimer: Claimer


class SlotBinding:
    """The slot-holding part of ``Registry`` (see the module docstring)."""

    host: str
    node: str
    epoch: int
    store: Store
    max_children: int | None
    _lock: threading.Lock
    _bind_lock: threading.Lock
    _slots: Slots | None
    _slot_lock: Hold | None
    _store_open: bool
    _pid: int
    _fork_restart: bool
    _started: bool
    _counted_before_fork: bool
    _group: GroupCommit
    _families: dict[str, MetricFamily[Any]]
    _closed: bool
    _created: threading.Event

    def _family(
        self, definition: FamilyDef, values: dict[str, SeriesValue], limit: int | None
    ) -> MetricFamily[Any]:
        raise NotImplementedError

    def _new_group(self) -> GroupCommit:
        raise NotImplementedError

    def _restored(self, snapshot: Snapshot, started: float) -> None:
        raise NotImplementedError

    def _check_open(self) -> None:
        raise NotImplementedError

    def _bind_slot(self) -> KeepcountError | None:
        """Take the lowest free slot, claim it with the next epoch, add its
        stored values to what was counted since the last unbind (no lock
        held: I/O).  The error, or None once bound."""
        assert self._slots is not None
        with self._bind_lock:  # the flusher and a fork hook may both try
            if self._slot_lock is not None:
                return None
            return self._take_slot()

    def _take_slot(self) -> KeepcountError | None:
        assert self._slots is not None
        started = time.perf_counter()
        try:
            store = self._open_store()
            lock = self._slots.claimer.take(self.host)
            try:
                node = lock.node
                epoch = store.claim(node, lock.epoch or next_epoch(store, node))
                try:
                    lease = lock.lease()
                    if lease is not None:
                        store.vouch(node, epoch, lease)
                    snapshot = store.load(node)
                    with self._lock:
                        self._apply(snapshot)
                        self.node, self.epoch, self._slot_lock = node, epoch, lock
                        self._group.node = node
                except BaseException:
                    store.release(node, epoch)
                    raise
            except BaseException:
                lock.release()
                raise
        except KeepcountError as exc:
            log.warning("node %s: cannot take a slot: %s", self.host, exc)
            return exc
        self._restored(snapshot, started)
        return None

    def _apply(self, snapshot: Snapshot) -> None:
        """Add a slot's stored values to the families (lock held).  Every
        family the slot lacks is written to it with the next flush."""
        for name, definition in snapshot.families.items():
            values = snapshot.values.get(name, {})
            family = self._families.get(name)
            if family is None:
                self._families[name] = self._family(definition, values, self.max_children)
            elif not family.definition.same_shape(definition):
                raise DefinitionConflict(
                    f"{name}: node {self.host!r} stores it as a {definition.kind} with labels "
                    f"{list(definition.labelnames)}, this process declared it otherwise"
                )
            else:
                family._add_stored(values)
        for name, family in self._families.items():
            if name not in snapshot.families and family not in self._group.meta_dirty:
                self._group.meta_dirty.append(family)

    def _read_store(self) -> Store:
        """The store, to read (a parent that gave its slot back at a fork
        opens it again, without taking a slot)."""
        self._check_open()
        with self._bind_lock:
            return self._open_store()

    def _open_store(self) -> Store:
        """The store, opened again if it was closed at a fork (``_bind_lock`` held)."""
        if not self._store_open:
            assert self._slots is not None
            self.store = open_store(self._slots.url)
            self._store_open = True
        return self.store

    def _zero(self) -> None:
        """Every value back to zero (lock held): what a slot holds is added
        when one is taken."""
        for family in self._families.values():
            family._zero()

    def _give_back(self, *, released: bool) -> None:
        """Release the claim (if ``released``) and the slot, close the store."""
        try:
            if released and self._store_open:
                self.store.release(self.node, self.epoch)
        finally:
            if self._slot_lock is not None:
                self._slot_lock.release()
                self._slot_lock = None
            if self._slots is not None:
                self._slots.claimer.close()
            if self._store_open:
                self._store_open = False
                self.store.close()

    # -- forks -------------------------------------------------------------------

    def _before_fork(self) -> None:
        """In the parent, just before ``fork()``: stop the flusher (it flushes
        what is pending), give the slot back and close the store, so nothing
        that cannot cross a fork is there (see the class docstring).  Then
        hold the lock so no thread of the parent is inside an update as the
        child is made."""
        self._fork_restart = False
        self._counted_before_fork = False
        if not self._started:
            pass  # open_lazily, never used: parent and child each start on first use
        elif self._slots is not None and not self._closed and self._group.fatal is None:
            self._counted_before_fork = self._group.counted or bool(self._group.dirty)
            error = self._group.close()
            self._fork_restart = True
            # The restored series' created times may still be loading, on a
            # thread inside the store's client: let it finish first.
            self._created.wait(CREATED_WAIT_AT_FORK)
            bound = self._slot_lock is not None
            if bound and (error is not None or self._group.fatal is not None):
                # Not all durable: keep the slot; the child keeps off it.
                log.warning("node %s: flush before fork failed: %s", self.node, error)
            else:
                self._give_back(released=bound)
                if bound:
                    with self._lock:
                        self._zero()
        self._lock.acquire()

    def _after_fork_in_parent(self) -> None:
        self._lock.release()
        if not self._fork_restart:
            return
        self._restart_group(unbound=self._slot_lock is None)
        if self._group.unbound and self._counted_before_fork:
            self._bind_slot()  # a process that counts keeps a slot

    def _after_fork_in_child(self) -> None:
        self._lock.release()
        if self._closed or not self._started:
            return
        if self._store_open:
            inherited.append(self.store)  # the parent's: never used nor closed here
            if self._slot_lock is not None:
                self._slot_lock.forget()
                self._slot_lock = None
            if self._slots is not None:
                self._slots.claimer.forget()
            self._store_open = False
        if self._slots is None or self._group.fatal is not None:
            fatal = self._group.fatal or RegistryClosed(
                f"the registry of node {self.node!r} was opened in process {self._pid}, "
                "which this process forked from: open it in this process, or use "
                "keepcount.open(url, node), which gives each process a slot"
            )
            self._group = self._new_group()
            self._group._fatal = fatal
            return
        # The parent's counts are the parent's: start from zero, then add the
        # stored values of the slot this process takes.
        with self._lock:
            self._zero()
            for child in self._group.dirty:
                child._dirty = False
            self._group.dirty.clear()
        self._pid = os.getpid()
        self._restart_group(unbound=True)
        self._bind_slot()  # restore before serving

    # A slot taken at once (above) rather than by the next flush leaves the
    # group ``unbound`` until its flusher sees the slot (its ``bind()`` is then
    # a no-op) and clears the flag as it starts that flush: only the flusher
    # may, or a ``commit_sync()`` could start a flush beside it.

    def _restart_group(self, *, unbound: bool) -> None:
        self._group = self._new_group()
        self._group.unbound = unbound
        self._group.start()
