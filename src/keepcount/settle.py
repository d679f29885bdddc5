"""Settling an idempotency key: the fate of an in-doubt keyed increment, for sure.

A client whose keyed increment ended in doubt (a timeout, a reset, a 503)
usually retries it with the same key.  A client that cannot (it crashed, or
gave up) settles the key instead (``Registry.settle_key``, the node's
``GET /v1/idempotency/{key}``), and gets one of three answers:

``applied``
    The key is recorded with an increment: it was counted, once; the answer
    carries the receipt the first answer to that key carried.
``not_applied`` (final)
    No increment was recorded under the key, and now none ever will be: the
    settle wrote a *refusal record* under the key, in the registry's own
    flush (fenced by the node's epoch like any write, durable before the
    answer; if that write fails, the settle answers the error and the
    refusal stays queued for the next flush, as a delta does).  An increment of that key still queued anywhere (on this node
    or another node of the store) that flushes later meets the record
    (``KeyConflict``), is dropped, and its waiters get
    ``IdempotencyKeySettled``; so does any later request with that key,
    until the record expires with the key's TTL.
``in_flight``
    The key's increment is queued or being flushed on this node, or another
    live writer holds the key in the store (``KeyConflict.pending``): its
    outcome is not decided yet; ask again later.

Invariant (DESIGN §G2): once a settle answered ``applied`` or
``not_applied`` for a key, every later answer about that key (settles,
retries of the increment) agrees, for as long as the key is remembered.

A refusal record is an ordinary ``KeyRecord``: stores keep ``result``
opaque, so they need nothing new.  It is told apart by its ``result``, a
JSON object ``{"refused": true, "node": ..., "at": ...}`` (a receipt never
holds ``"refused"``), and carries ``REFUSAL_FINGERPRINT``, which no request
digest equals.
"""

from __future__ import annotations

import enum
import json
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from keepcount.stores.base import KeyRecord

if TYPE_CHECKING:
    from keepcount.registry import Receipt

__all__ = [
    "REFUSAL_FINGERPRINT",
    "SettleStatus",
    "Settlement",
    "is_refusal",
    "refusal_record",
]

REFUSAL_FINGERPRINT = "refused"
"""The fingerprint of a refusal record (a request's is a hex digest)."""


class SettleStatus(enum.StrEnum):
    """What a settle answers (see the module docstring)."""

    APPLIED = "applied"
    NOT_APPLIED = "not_applied"
    IN_FLIGHT = "in_flight"


@dataclass(frozen=True, slots=True)
class Settlement:
    """The answer to settling ``key``: ``receipt`` only when ``applied``."""

    key: str
    status: SettleStatus
    receipt: Receipt | None = None

    @property
    def final(self) -> bool:
        """True for ``applied`` and ``not_applied``: the key's fate never changes."""
        return self.status is not SettleStatus.IN_FLIGHT


def refusal_record(key: str, node: str, expires: float) -> KeyRecord:
    """A fresh refusal record of ``key`` written by ``node``."""
    result = json.dumps({"refused": True, "node": node, "at": round(time.time(), 3)})
    return KeyRecord(key, node, REFUSAL_FINGERPRINT, result, uuid.uuid4().hex, expires)


def is_refusal(record: KeyRecord) -> bool:
    """True if ``record`` refuses its key rather than records an increment."""
    if record.fingerprint != REFUSAL_FINGERPRINT:
        return False
    try:
        answer = json.loads(record.result)
    except ValueError:
        return False
    return isinstance(answer, dict) and answer.get("refused") is True
