"""A deliberately broken claim, for the mutation test of the clock fault only.

``WallClockLease`` wraps a real ``Claim`` and keeps its local deadline on the
**wall clock**, as a lease written with ``time.time()`` instead of
``time.monotonic()`` would: at each renewal it notes ``time.time()`` plus
the time left, and it calls the claim expired (``lost``) once the wall clock
passes that instant.  Without clock jumps it behaves as the claim it wraps
(except that a deadline passing, e.g. in a coordinator outage, ends the
claim instead of leaving it untrusted).  With one it does not: a jump forwards makes it give up a claim the
coordinator still holds (the node stops with exit 3 and a new incarnation
takes the id: "changes nothing" is broken), a jump backwards makes it trust
a claim for as long as the jump after the coordinator let it go.

``keepcount node --unsafe-wall-clock-lease`` (hidden; ``keepcount verify
--mutant wall-clock-lease``) runs a node on it; the clock fault of ``keepcount
verify`` must find it (``keepcount.verify.nemesis``).  Never use it otherwise.
"""

from __future__ import annotations

import threading
import time

from keepcount.coordination.base import Claim

__all__ = ["WallClockLease"]


class WallClockLease:
    """``claim`` with its deadline on the wall clock: **broken on purpose**
    (see the module docstring)."""

    def __init__(self, claim: Claim) -> None:
        self._claim = claim
        self.node = claim.node
        self.epoch = claim.epoch
        self.ttl = claim.ttl
        self._lock = threading.Lock()
        self._renewed = claim.deadline()
        self._wall = time.time() + (self._renewed - time.monotonic())

    def _wall_deadline(self) -> float:
        """The deadline in wall-clock terms, taken again after each renewal."""
        with self._lock:
            deadline = self._claim.deadline()
            if deadline != self._renewed:
                self._renewed = deadline
                self._wall = time.time() + (deadline - time.monotonic())
            return self._wall

    def deadline(self) -> float:
        return self._claim.deadline()

    def trusted(self) -> bool:
        return not self.lost and time.time() < self._wall_deadline()

    @property
    def lost(self) -> bool:
        # The bug: "expired" by the wall clock, whatever the coordinator holds.
        return self._claim.lost or time.time() >= self._wall

    def wait_lost(self, timeout: float | None = None) -> bool:
        return self._claim.wait_lost(timeout)

    def release(self) -> None:
        self._claim.release()
