"""Keyed increments and settles: the idempotency-key half of the group commit.

``KeyedCommit`` is the base class of ``keepcount.commit.GroupCommit``: what
the group commit does with idempotency keys, under the same lock and by the
same flusher (``commit.py`` composes and writes the records).

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
- fails only that request (not acknowledged) if another live writer is
  recording the key, or if the store could not decide in time who holds it
  (``KeyConflict.undecided``); an undecided delta stays queued with its
  token for the next flush, so one slow key never fails the whole flush;

and writes the rest again.  Only after the write succeeded is the delta added
to the child's value in memory.  A failed write leaves the delta queued (its
token unchanged) for the next flush; its waiters get the error (not
acknowledged), and a retry of the same key on this node joins it rather than
counting again.  So a key is counted at most once per store, whichever nodes
its retries reach, and a delta is counted iff its key record is in the store.

Settling a key (``submit_settle``, see ``keepcount.settle``): a key queued or
in flight here is answered *in flight* at once; otherwise a refusal record
of the key is queued and written by the next flush like a delta's record.
Written: *not applied*, and a delta of that key that flushes later (here or
on another node) meets it in its ``KeyConflict``, is dropped, and its waiters
get ``IdempotencyKeySettled``.  In conflict: *applied* (with the record) if
an increment holds the key, *not applied* if a refusal does, *in flight* if
another live writer is recording it.  A failed write answers the settle
with the error and, like a delta, leaves the refusal queued (same token) for
the next flush: a store that took the key for it before the write failed
(Cassandra, Bigtable) sees a live writer holding the key, and only that
writer's next flush can record it (until then the key is *in flight*).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from keepcount.errors import (
    IdempotencyKeyReused,
    IdempotencyKeySettled,
    InvalidInput,
    KeepcountError,
    OutcomeUnknown,
    StoreUnavailable,
)
from keepcount.metrics import MAX_VALUE
from keepcount.settle import SettleStatus, is_refusal, refusal_record
from keepcount.stores.base import KeyRecord
from keepcount.waiters import Batch, KeyedOutcome

if TYPE_CHECKING:
    from keepcount.commit import LookupFn, _Flush

__all__ = ["Keyed", "KeyedCommit", "Refusal", "SettleOutcome", "receipt_value"]

SettleOutcome = tuple[SettleStatus, KeyRecord | None] | KeepcountError
"""What a settle's waiter gets: the status (with the key's record when
applied) or the error that kept the refusal from being written."""


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


class Refusal:
    """A settle's refusal record, queued until a flush writes it."""

    __slots__ = ("record", "waiters")

    def __init__(self, record: KeyRecord) -> None:
        self.record = record
        self.waiters: list[asyncio.Future[SettleOutcome]] = []


def receipt_value(record: KeyRecord) -> int:
    """The value a key's record answered with."""
    value = json.loads(record.result)["value"]
    assert isinstance(value, int)
    return value


class KeyedCommit:
    """The keyed increments and settles of a ``GroupCommit`` (its subclass).

    State (all under ``_lock``): ``keyed``, the deltas queued or in flight
    by key, ``_queued`` those for the next flush; ``refusals`` and
    ``_queued_refusals`` likewise for settles.  Answers are queued in
    ``_replies`` and delivered by ``GroupCommit._reply``.
    """

    _lock: threading.Lock
    _lookup: LookupFn | None
    _replies: dict[asyncio.AbstractEventLoop, list[tuple[Any, Any]]]
    node: str

    def __init__(self) -> None:
        self.keyed: dict[str, Keyed] = {}
        """Keyed deltas queued or in flight, by key."""
        self._queued: list[Keyed] = []  # keyed deltas for the next flush
        self.refusals: dict[str, Refusal] = {}
        """Refusals (settles) queued or in flight, by key."""
        self._queued_refusals: list[Refusal] = []

    # Provided by GroupCommit.
    def _check(self) -> None:
        raise NotImplementedError

    def _want(self) -> Batch:
        raise NotImplementedError

    def _compose(self, f: _Flush) -> None:
        raise NotImplementedError

    def _reply(self) -> None:
        raise NotImplementedError

    def submit_keyed(
        self, child: Any, by: int, key: str, fingerprint: str, ttl: float
    ) -> asyncio.Future[KeyedOutcome]:
        """Queue ``by`` for ``child`` under ``key``; the future answers once it is
        settled (see the module docstring).  A key already queued or in
        flight on this registry is joined, not counted again."""
        fut: asyncio.Future[KeyedOutcome] = asyncio.get_running_loop().create_future()
        with self._lock:
            self._check()
            if key in self.refusals:
                # Its fate is being decided here (applied or refused): this
                # request counts nothing now; its retry gets the decision.
                raise OutcomeUnknown(
                    f"idempotency key {key!r} is being settled on this node; not counted now "
                    "(retry with the same key, or settle it)"
                )
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

    def submit_settle(self, key: str, ttl: float) -> asyncio.Future[SettleOutcome]:
        """Settle ``key`` (see the module docstring); the future answers at once
        for a key queued or in flight here, else once the refusal's flush ends.
        A settle of a key whose refusal is already queued joins it."""
        fut: asyncio.Future[SettleOutcome] = asyncio.get_running_loop().create_future()
        with self._lock:
            self._check()
            if key in self.keyed:
                fut.set_result((SettleStatus.IN_FLIGHT, None))
                return fut
            refusal = self.refusals.get(key)
            if refusal is None:
                refusal = Refusal(refusal_record(key, self.node, time.time() + ttl))
                self.refusals[key] = refusal
                self._queued_refusals.append(refusal)
            refusal.waiters.append(fut)
            self._want()
        return fut

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

    def _settled(self, r: Refusal, outcome: SettleOutcome, *, keep: bool = False) -> None:
        """Queue the answer to a refusal's waiters (lock held); forget the
        refusal unless it stays queued."""
        if not keep:
            self.refusals.pop(r.record.key, None)
        waiters, r.waiters = r.waiters, []
        for fut in waiters:
            self._replies.setdefault(fut.get_loop(), []).append((fut, outcome))

    def _resolve_conflict(
        self,
        f: _Flush,
        keys: list[str],
        pending: Sequence[str] = (),
        undecided: Sequence[str] = (),
    ) -> KeepcountError | None:
        if self._lookup is None:
            return StoreUnavailable("idempotency key conflict without a lookup")
        try:
            found = self._lookup(keys) if keys else {}
        except KeepcountError as exc:
            return exc
        busy = set(pending)
        later = set(undecided)
        with self._lock:
            keep = []
            for k in f.keyed:
                record = found.get(k.key)
                if k.key in later:
                    # The store could not tell in time who holds this key (this
                    # node may): only this request fails, and the delta stays
                    # queued with its token for the next flush, which finds
                    # the key its own or learns who recorded it.
                    self._answer(
                        k,
                        OutcomeUnknown(
                            f"idempotency key {k.key!r}: the store could not decide in time who "
                            "records it; not acknowledged yet (retry with the same key)"
                        ),
                        keep=True,
                    )
                    self._queued.append(k)
                elif k.key in busy:
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
                    self._answer(k, (receipt_value(record), False, record))
                elif is_refusal(record):  # settled as not applied: never counted
                    self._answer(
                        k,
                        IdempotencyKeySettled(
                            f"idempotency key {k.key!r} was settled as not applied (by node "
                            f"{record.node!r}); nothing counted"
                        ),
                    )
                elif record.fingerprint == k.fingerprint:  # a retry: answer as recorded
                    self._answer(k, (receipt_value(record), True, record))
                else:
                    self._answer(
                        k,
                        IdempotencyKeyReused(
                            f"idempotency key {k.key!r} was first used for a different request "
                            f"(on node {record.node!r}); nothing counted"
                        ),
                    )
            f.keyed = keep
            refusals = []
            for r in f.refusals:
                record = found.get(r.record.key)
                if r.record.key in later:  # queued again, as an undecided delta
                    self._settled(r, (SettleStatus.IN_FLIGHT, None), keep=True)
                    self._queued_refusals.append(r)
                elif r.record.key in busy:
                    self._settled(r, (SettleStatus.IN_FLIGHT, None))
                elif record is None:
                    refusals.append(r)
                elif is_refusal(record):  # refused before (maybe by an earlier attempt)
                    self._settled(r, (SettleStatus.NOT_APPLIED, None))
                else:
                    self._settled(r, (SettleStatus.APPLIED, record))
            f.refusals = refusals
            self._compose(f)
            self._reply()
        return None
