"""The exceptions keepcount raises.

One root, a shallow tree; every class carries a stable ``code`` that the HTTP
layer puts in its ``{"error": {"code", "message"}}`` bodies::

    KeepcountError
    ├── InvalidInput            bad name, labels, amount, URL; nothing was changed
    │   ├── CardinalityError    a family reached its child limit
    │   ├── DefinitionConflict  a metric re-declared with another shape
    │   └── IdempotencyKeyReused  a key came back with another request
    ├── IdempotencyKeySettled   the key was settled as not applied: nothing counted
    ├── StoreError
    │   ├── StoreUnavailable    retryable: busy, I/O error, disk full; not written
    │   │   └── OutcomeUnknown  the write may or may not have landed (timeouts)
    │   └── CorruptStore        fatal: corrupt, truncated, foreign, wrong version
    ├── ClaimError
    │   ├── ClaimConflict       another live process holds this node id
    │   ├── ClaimLost           the coordinator no longer vouches for this claim
    │   └── Fenced              a newer incarnation (higher epoch) took over
    ├── CoordinatorUnavailable  etcd / ZooKeeper cannot be reached (retryable)
    ├── KeyConflict             (internal) a write's idempotency key is already recorded
    └── RegistryClosed          the registry was closed

Driver errors are translated at the store seam with ``raise X from exc``.  A
caller that records histories (Jepsen style) treats ``OutcomeUnknown`` as
*info* (maybe counted) and every other ``KeepcountError`` from ``commit()`` as
*fail* (not counted; the increments stay in memory and are retried by the
next flush).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any

__all__ = [
    "CardinalityError",
    "ClaimConflict",
    "ClaimError",
    "ClaimLost",
    "CoordinatorUnavailable",
    "CorruptStore",
    "DefinitionConflict",
    "ErrorCode",
    "Fenced",
    "IdempotencyKeyReused",
    "IdempotencyKeySettled",
    "InvalidInput",
    "KeepcountError",
    "KeyConflict",
    "OutcomeUnknown",
    "RegistryClosed",
    "StoreError",
    "StoreUnavailable",
]


class ErrorCode(enum.StrEnum):
    """Every stable ``code`` of an error: each class below has one, and the
    HTTP node answers ``{"error": {"code", "message"}}`` with one of these
    and nothing else (its own codes are the second group)."""

    KEEPCOUNT_ERROR = "keepcount_error"
    INVALID_INPUT = "invalid_input"
    TOO_MANY_LABEL_SETS = "too_many_label_sets"
    DEFINITION_CONFLICT = "definition_conflict"
    IDEMPOTENCY_KEY_REUSED = "idempotency_key_reused"
    IDEMPOTENCY_KEY_CONFLICT = "idempotency_key_conflict"
    IDEMPOTENCY_KEY_SETTLED = "idempotency_key_settled"
    STORE_ERROR = "store_error"
    STORE_UNAVAILABLE = "store_unavailable"
    OUTCOME_UNKNOWN = "outcome_unknown"
    CORRUPT_STORE = "corrupt_store"
    CLAIM_ERROR = "claim_error"
    CLAIM_CONFLICT = "claim_conflict"
    CLAIM_LOST = "claim_lost"
    FENCED = "fenced"
    COORDINATOR_UNAVAILABLE = "coordinator_unavailable"
    REGISTRY_CLOSED = "registry_closed"
    # The HTTP node's own (keepcount.node):
    MALFORMED_JSON = "malformed_json"
    INVALID_AMOUNT = "invalid_amount"
    INVALID_IDEMPOTENCY_KEY = "invalid_idempotency_key"
    UNAUTHORIZED = "unauthorized"
    BODY_TOO_LARGE = "body_too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    NOT_READY = "not_ready"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    HTTP_ERROR = "http_error"
    CLIENT_DISCONNECTED = "client_disconnected"
    INTERNAL_ERROR = "internal_error"


class KeepcountError(Exception):
    """Root of every error keepcount raises on purpose."""

    code: str = ErrorCode.KEEPCOUNT_ERROR
    """Stable; an ``ErrorCode`` for every error the node can answer with."""


class InvalidInput(KeepcountError, ValueError):
    """A name, label, amount, URL or option was rejected; nothing changed."""

    code = ErrorCode.INVALID_INPUT


class CardinalityError(InvalidInput):
    """A metric family already holds its maximum number of label sets."""

    code = ErrorCode.TOO_MANY_LABEL_SETS


class DefinitionConflict(InvalidInput):
    """A metric was declared again with another kind, label names or buckets."""

    code = ErrorCode.DEFINITION_CONFLICT


class IdempotencyKeyReused(InvalidInput):
    """An ``Idempotency-Key`` came back with a different request than the one
    first recorded under it; nothing was counted."""

    code = ErrorCode.IDEMPOTENCY_KEY_REUSED


class IdempotencyKeySettled(KeepcountError):
    """The increment's ``Idempotency-Key`` was settled as *not applied*
    (``Registry.settle_key``, ``GET /v1/idempotency/{key}``): a refusal is
    recorded under it, so this increment was dropped and nothing was
    counted, now or ever (until the key expires).  Not retryable with that
    key; the node answers 409."""

    code = ErrorCode.IDEMPOTENCY_KEY_SETTLED


class KeyConflict(KeepcountError):
    """A store write carried idempotency keys that are already recorded (and
    not expired) — ``keys`` — or that another live writer is recording right
    now — ``pending`` (a store without transactions across partitions, such
    as Cassandra, can see a key taken before its record lands) — or whose
    owner the store could not decide in time — ``undecided`` (Cassandra: the
    key's lightweight transaction or its owner's record timed out; this
    writer may hold the key); the store wrote nothing.  Internal to the group
    commit, which resolves it: it never reaches an application."""

    code = ErrorCode.IDEMPOTENCY_KEY_CONFLICT

    def __init__(
        self,
        message: str,
        keys: Sequence[str] = (),
        pending: Sequence[str] = (),
        undecided: Sequence[str] = (),
    ) -> None:
        super().__init__(message)
        self.keys = list(keys)
        self.pending = list(pending)
        self.undecided = list(undecided)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.args[0], self.keys, self.pending, self.undecided))


class StoreError(KeepcountError):
    """The store failed; see the subclasses for what the caller may assume."""

    code = ErrorCode.STORE_ERROR


class StoreUnavailable(StoreError):
    """The store could not be written or read now (busy, I/O error, disk full).

    Nothing of the failed operation was made durable; retrying is safe.
    """

    code = ErrorCode.STORE_UNAVAILABLE


class OutcomeUnknown(StoreUnavailable):
    """A write was sent but its outcome is unknown (e.g. a timeout).

    Writes of absolute values are idempotent, so the values stay dirty and the
    next flush writes them again; the waiters were not acknowledged.
    """

    code = ErrorCode.OUTCOME_UNKNOWN


class CorruptStore(StoreError):
    """The store is corrupt, truncated, foreign or of an unknown format.

    keepcount refuses it rather than starting from zero; the message names the
    file (or keyspace) and the problem.
    """

    code = ErrorCode.CORRUPT_STORE


class ClaimError(KeepcountError):
    """The node id could not be claimed or the claim was lost."""

    code = ErrorCode.CLAIM_ERROR


class ClaimConflict(ClaimError):
    """Another live process holds the claim on this node id."""

    code = ErrorCode.CLAIM_CONFLICT


class ClaimLost(ClaimError):
    """The claim's lease / session ran out, or may have: the coordinator could
    not be reached before the local deadline (grant time + TTL - margin).
    Nothing more is acknowledged under it."""

    code = ErrorCode.CLAIM_LOST


class Fenced(ClaimError):
    """A newer incarnation of this node id (higher epoch) holds the claim.

    The registry stops acknowledging for good: every later ``commit()`` raises
    this error, and no write of this incarnation reaches the store any more.
    """

    code = ErrorCode.FENCED


class CoordinatorUnavailable(KeepcountError):
    """The coordinator (etcd, ZooKeeper) did not answer in time; retry later."""

    code = ErrorCode.COORDINATOR_UNAVAILABLE


class RegistryClosed(KeepcountError):
    """The registry was closed; open a new one."""

    code = ErrorCode.REGISTRY_CLOSED
