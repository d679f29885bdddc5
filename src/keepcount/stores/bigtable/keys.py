"""Idempotency keys in the Bigtable store: each key taken store-wide exactly
once (an ``o#<key>`` owner entry, a conditional write), its record in the
writing node's row (written with the values it guards, by the store).
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
from collections.abc import Sequence
from typing import Any

from keepcount.errors import CorruptStore, KeyConflict
from keepcount.stores.base import KeyRecord
from keepcount.stores.bigtable.layout import (
    KEY,
    OWNER,
    OWNER_COL,
    Owner,
    as_int,
    key_timestamp,
    node_key,
    owner_key,
    to_json,
)
from keepcount.stores.bigtable.table import Table
from keepcount.stores.lww import Claim, moved_on, race

__all__ = ["CONCURRENT_KEYS", "KeyOwners"]

CONCURRENT_KEYS = 8
"""Idempotency keys of one flush taken in parallel (one round trip each)."""

OWNER_ATTEMPTS = 5
"""Tries to take one key whose owner entry GC dropped between two reads."""


class KeyOwners:
    """The ``o#<key>`` owner entries of a store's ``table``, taken in parallel."""

    def __init__(self, table: Table) -> None:
        self._t = table
        self._lock = threading.Lock()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False)

    def own(self, node: str, claim: Claim, keys: Sequence[KeyRecord]) -> None:
        """Take ownership of every key or raise ``KeyConflict`` naming the
        ones another live writer recorded (``keys``) or is recording (``pending``)."""
        with self._lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    CONCURRENT_KEYS, thread_name_prefix="keepcount-bigtable-keys"
                )
            pool = self._pool
        verdicts = list(pool.map(lambda k: self._own_key(node, claim, k), keys))
        taken = [k.key for k, v in zip(keys, verdicts, strict=True) if v == "recorded"]
        busy = [k.key for k, v in zip(keys, verdicts, strict=True) if v == "pending"]
        if taken or busy:
            raise KeyConflict(
                f"{self._t.where}: idempotency keys already recorded: {taken}; "
                f"being recorded by another writer: {busy}",
                taken,
                busy,
            )

    def _own_key(self, node: str, claim: Claim, k: KeyRecord) -> str:
        """``"mine"``, ``"recorded"`` (another write counted it) or ``"pending"``."""
        row = owner_key(k.key)
        what = f"take idempotency key {k.key!r}"
        entry = to_json({"node": node, "inc": claim.incarnation, "token": k.token,
                       "expires": k.expires})  # fmt: skip
        ts = key_timestamp(k.expires)
        exists = self._t.f.ColumnRangeFilter(OWNER, OWNER_COL, OWNER_COL)

        def attempt() -> str | None:
            """A verdict, or None: the entry found was gone (dropped by GC)
            before it could be read."""
            if not self._t.mutate_if(
                row, exists, what, false=[self._t.m.SetCell(OWNER, OWNER_COL, entry, ts)]
            ):
                return "mine"
            owner = self._read_owner(k.key)
            if owner is None:
                return None
            if owner.raw == entry:
                return "mine"  # an earlier attempt of this very increment took it
            verdict = self._judge(node, k, owner)
            if verdict is not None:
                return verdict
            # Take over the exact entry read, unless someone else just did.
            take = self._t.replace(OWNER, OWNER_COL, entry, ts)
            if self._t.mutate_if(
                row, self._t.cell_is(OWNER, OWNER_COL, owner.raw), what, true=take
            ):
                return "mine"
            return "pending"

        return race(attempt, OWNER_ATTEMPTS) or "pending"

    def _judge(self, node: str, k: KeyRecord, owner: Owner) -> str | None:
        """What another writer's owner entry means for ``k``: ``"recorded"``,
        ``"pending"``, or None: free to take over."""
        if owner.expires <= time.time() or (owner.node == node and owner.token == k.token):
            return None  # expired, or this increment's own entry (of an older claim)
        record = self._read_record(owner.node, k.key)
        if record is not None and record.get("token") == owner.token:
            return "recorded"  # with its value: the owner counted it
        current = self._t.read_meta(owner.node).get(b"inc")
        if not moved_on(None if current is None else as_int(current), owner.incarnation):
            return "pending"  # the owner's flush may still land
        # The owner's node was claimed again without the record: its flush
        # can never land now (the claim fenced it).
        return None

    def _read_owner(self, key: str) -> Owner | None:
        row = self._t.read_row(owner_key(key), self._t.newest(OWNER), f"look up key {key!r}")
        if row is None:
            return None
        for c in row.cells:
            if c.qualifier == OWNER_COL:
                try:
                    return Owner.parse(c.value)
                except (ValueError, KeyError, TypeError) as exc:
                    raise CorruptStore(
                        f"{self._t.where}: the owner entry of key {key!r} is damaged ({exc})"
                    ) from None
        return None

    def _read_record(self, node: str, key: str) -> dict[str, Any] | None:
        f = self._t.f
        k = key.encode()
        row_filter = f.RowFilterChain([f.ColumnRangeFilter(KEY, k, k), f.CellsColumnLimitFilter(1)])
        row = self._t.read_row(node_key(node), row_filter, f"look up key {key!r}")
        if row is None or not row.cells:
            return None
        try:
            doc = json.loads(row.cells[0].value)
            if not isinstance(doc, dict):
                raise TypeError("not an object")
        except (ValueError, TypeError) as exc:
            raise CorruptStore(
                f"{self._t.where}: the record of key {key!r} in node {node!r} is damaged ({exc})"
            ) from None
        return doc

    def lookup(self, key: str) -> KeyRecord | None:
        owner = self._read_owner(key)
        now = time.time()
        if owner is None or owner.expires <= now:
            return None
        doc = self._read_record(owner.node, key)
        if doc is None or doc.get("token") != owner.token or float(doc["expires"]) <= now:
            return None
        return KeyRecord(
            key, owner.node, doc["fingerprint"], doc["result"], doc["token"], float(doc["expires"])
        )
