"""Last-write-wins claims and clocks: the fencing (G4) shared by the Cassandra
and Bigtable stores.

G4 says one writer per node id: a stale incarnation's late writes can never
overwrite a newer one's.  Neither database has a transaction spanning a
node's claim and its writes, so both stores keep it with the same pieces:

``Claim``
    What one store handle holds for a node id after ``claim()``: the epoch
    (the coordinator's, or issued by the store), the *incarnation* (the
    store's own claim counter for the node; it grows by one at every claim,
    in the order of the claims' epochs, and is the fencing identity), the
    *generation* (the high bits of the claim's timestamps: the incarnation
    itself in Cassandra; in Bigtable it also grows at a renewal) and the
    flush sequence.

``Clock``
    Every cell's write timestamp: ``((generation << seq_bits) | seq) *
    scale``.  A newer claim starts a higher generation, so its cells win
    over anything an older incarnation wrote or will write, whatever wall
    clocks say; within a claim the sequence only grows, so a retried write
    (outcome unknown) or one that lands late changes nothing.

``Claims``
    The claims of one handle, by node id, and whether it is closed.
    ``held(node, epoch)`` refuses (``Fenced``) a write whose epoch is not
    this handle's claim; ``check(node, claim, current, ...)`` refuses one
    whose incarnation is no longer the node's stored one, and ``fenced``
    forgets such a claim for good.

Why that fences: a claim raises the stored incarnation before it returns
(``claim_race``: a compare-and-set, retried while concurrent claims win
it).  A write of an older incarnation then either loses (its timestamps are
below the new claim's fence, which every read applies: Cassandra) or is refused by a
condition on the stored incarnation (Bigtable), and it is never
acknowledged: the store checks the incarnation after (Cassandra) or as part
of (Bigtable) every write.  ``claim_epoch`` is the epoch a claim records
(``next_epoch``), refusing a node whose last claim was never released unless
a coordinator vouches for the new one (these stores have no leases: they
cannot tell a live holder from a dead one).  ``moved_on`` tells an
idempotency key's owner whose write can no longer land.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import tenacity

from keepcount.errors import ClaimConflict, Fenced, StoreUnavailable
from keepcount.stores.base import Snapshot, next_epoch

__all__ = [
    "CLAIM_ATTEMPTS",
    "Claim",
    "Claims",
    "Clock",
    "claim_epoch",
    "claim_race",
    "moved_on",
    "race",
]

CLAIM_ATTEMPTS = 20
"""Compare-and-sets of one claim before giving up (``StoreUnavailable``):
each lost attempt means another claim of the same node id won just now."""

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Clock:
    """A per-node logical clock: ``((generation << seq_bits) | seq) * scale``.

    Example (Cassandra's: microsecond timestamps, 32 sequence bits)::

        >>> Clock(seq_bits=32).at(3, 1)
        12884901889
    """

    seq_bits: int
    scale: int = 1
    """1 where a timestamp is the logical clock itself (Cassandra), 1000 where
    the table's granularity is milliseconds of a microsecond timestamp (Bigtable)."""

    @property
    def max_seq(self) -> int:
        """The last sequence number of a generation."""
        return (1 << self.seq_bits) - 1

    def at(self, generation: int, seq: int = 0) -> int:
        """The timestamp of flush ``seq`` of ``generation`` (0: the generation's base)."""
        return ((generation << self.seq_bits) | seq) * self.scale


@dataclass(eq=False)
class Claim:
    """One node id as held by one store handle (see the module docstring)."""

    epoch: int
    incarnation: int
    """The fencing identity: the store's claim counter while this claim holds."""
    generation: int
    """High bits of this claim's timestamps."""
    seq: int = 0
    known: set[tuple[str, str]] = field(default_factory=set)
    """Series written (or restored) under this claim: ``created`` is sent
    only with a series' first write, so it is kept from then on."""
    snapshot: Snapshot | None = None
    """What the claim read, handed to the ``load`` that follows it."""
    trusted: Callable[[], bool] | None = None
    """A coordinator's lease backing the claim (``Store.vouch``)."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    """Guards ``seq`` and ``known``; the Bigtable store holds it for a whole
    write (a renewal of the generation never interleaves with a write)."""

    def restored(self, snapshot: Snapshot) -> None:
        """Record what the claim read: handed to ``load``, and every series known."""
        self.snapshot = snapshot
        self.known = {(n, k) for n, series in snapshot.values.items() for k in series}

    def exhausted(self, max_seq: int) -> bool:
        """True once the sequence reached ``max_seq`` (at most ``Clock.max_seq``):
        one more ``tick`` would spill into the generation's bits."""
        return self.seq >= max_seq

    def tick(self, clock: Clock) -> int:
        """The next timestamp of this claim (its lock held; check ``exhausted`` first)."""
        self.seq += 1
        return clock.at(self.generation, self.seq)


class Claims:
    """The claims one store handle holds, by node id; thread-safe.

    Also the handle's open/closed state: a closed handle refuses every
    operation with ``StoreUnavailable`` and holds no claims.
    """

    def __init__(self, where: str) -> None:
        self._where = where
        self._lock = threading.Lock()
        self._held: dict[str, Claim] = {}
        self._closed = False

    def check_open(self) -> None:
        if self._closed:
            raise StoreUnavailable(f"{self._where} is closed")

    def begin(self, node: str) -> None:
        """Before a claim: ``ClaimConflict`` if this handle holds ``node`` already."""
        with self._lock:
            self.check_open()
            if node in self._held:
                raise ClaimConflict(f"node {node!r} is already claimed through this handle")

    def add(self, node: str, claim: Claim) -> None:
        with self._lock:
            self._held[node] = claim

    def held(self, node: str, epoch: int) -> Claim:
        """The claim a write of ``epoch`` is made under; ``Fenced`` if there is none."""
        with self._lock:
            self.check_open()
            claim = self._held.get(node)
        if claim is None or claim.epoch != epoch:
            raise Fenced(
                f"node {node!r}: epoch {epoch} is not the claim of this store handle; write refused"
            )
        return claim

    def take_snapshot(self, node: str) -> Snapshot | None:
        """What the claim of ``node`` read, once: the ``load`` right after a claim."""
        with self._lock:
            claim = self._held.get(node)
            if claim is None:
                return None
            cached, claim.snapshot = claim.snapshot, None
        return cached

    def fenced(self, node: str, claim: Claim, message: str) -> Fenced:
        """Forget ``claim`` (a newer incarnation took the node over): ``Fenced(message)``."""
        with self._lock:
            if self._held.get(node) is claim:
                del self._held[node]
        return Fenced(message)

    def check(self, node: str, claim: Claim, current: int | None, message: str) -> None:
        """``fenced`` unless ``current``, the node's incarnation as stored now,
        is still the claim's: a write may have lost to a newer claim."""
        if current is None or current != claim.incarnation:
            raise self.fenced(node, claim, message)

    def vouch(self, node: str, epoch: int, trusted: Callable[[], bool]) -> None:
        """Back the claim ``epoch`` of ``node`` with a coordinator's lease (``Store.vouch``)."""
        self.held(node, epoch).trusted = trusted

    def release(self, node: str) -> tuple[Claim | None, bool]:
        """Forget ``node``'s claim: (the claim, or None; whether the handle is open)."""
        with self._lock:
            return self._held.pop(node, None), not self._closed

    def close(self) -> bool:
        """Mark the handle closed and forget every claim; False if it was already."""
        with self._lock:
            if self._closed:
                return False
            self._closed = True
            self._held.clear()
            return True


def race(attempt: Callable[[], _T | None], attempts: int) -> _T | None:
    """Run ``attempt`` (a compare-and-set and the reads it depends on) until it
    returns a value, at most ``attempts`` times and at once: None means it
    lost a race to a concurrent writer and should look again.  None if every
    attempt lost; an exception of ``attempt`` propagates at once."""
    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(attempts),
        retry=tenacity.retry_if_result(lambda won: won is None),
        retry_error_callback=lambda state: None,
        reraise=True,
    )
    result: _T | None = retrying(attempt)
    return result


def claim_race(attempt: Callable[[], _T | None], where: str, node: str) -> _T:
    """``race`` of one claim's compare-and-set against concurrent claims of the
    same node id; ``StoreUnavailable`` after ``CLAIM_ATTEMPTS`` lost races."""
    won = race(attempt, CLAIM_ATTEMPTS)
    if won is None:
        raise StoreUnavailable(f"{where}: claims of node {node!r} kept racing")
    return won


def claim_epoch(
    url: str, node: str, requested: int | None, stored: int, holder: tuple[object, object] | None
) -> int:
    """The epoch a claim of ``node`` records (``next_epoch``).  Without a
    coordinator's epoch, ``ClaimConflict`` while ``holder`` (the pid and host
    of a claim never released) holds it; a coordinator's epoch takes over."""
    if requested is None and holder is not None:
        pid, host = holder
        raise ClaimConflict(
            f"node {node!r} is claimed in {url} by pid {pid} on {host} and was never "
            "released; if that process is gone, claim it with a coordinator's epoch "
            "(keepcount node --coordinator)"
        )
    return next_epoch(node, requested, stored)


def moved_on(current: int | None, incarnation: int) -> bool:
    """True if the node's stored incarnation ``current`` is past ``incarnation``:
    a write of that incarnation not landed yet can never land now (fenced)."""
    return current is not None and current > incarnation
