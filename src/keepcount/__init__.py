"""keepcount: counters that survive crashes, restarts and node failures.

>>> import keepcount                                                 # doctest: +SKIP
>>> reg = keepcount.open("sqlite:///counters.db", node="node-1")     # doctest: +SKIP
"""

from __future__ import annotations

from keepcount.errors import (
    CardinalityError,
    ClaimConflict,
    ClaimError,
    ClaimLost,
    CoordinatorUnavailable,
    CorruptStore,
    DefinitionConflict,
    Fenced,
    IdempotencyKeyReused,
    IdempotencyKeySettled,
    InvalidInput,
    KeepcountError,
    OutcomeUnknown,
    RegistryClosed,
    StoreError,
    StoreUnavailable,
)
from keepcount.metrics import (
    DEFAULT_BUCKETS,
    Counter,
    CounterChild,
    Histogram,
    HistogramChild,
    HistogramValue,
)
from keepcount.registry import Receipt, Registry, open
from keepcount.settle import Settlement, SettleStatus
from keepcount.totals import SeriesTotal

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_BUCKETS",
    "CardinalityError",
    "ClaimConflict",
    "ClaimError",
    "ClaimLost",
    "CoordinatorUnavailable",
    "CorruptStore",
    "Counter",
    "CounterChild",
    "DefinitionConflict",
    "Fenced",
    "Histogram",
    "HistogramChild",
    "HistogramValue",
    "IdempotencyKeyReused",
    "IdempotencyKeySettled",
    "InvalidInput",
    "KeepcountError",
    "OutcomeUnknown",
    "Receipt",
    "Registry",
    "RegistryClosed",
    "SettleStatus",
    "Settlement",
    "SeriesTotal",
    "StoreError",
    "StoreUnavailable",
    "open",
]
