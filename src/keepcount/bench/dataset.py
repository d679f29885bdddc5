"""Store files holding N counters of one node, built once per run and shared.

``restore`` and ``flush`` both need a store with up to a million counters.
Building one through a registry would time keepcount's own flush; writing
the rows straight through ``SQLiteStore.write`` in large batches is faster
and produces exactly the rows a registry would have written.

Layout: ``FAMILIES`` counter families ``bench_restore_<i>_total`` with the
label names ``shard`` and ``item``; counter ``j`` (``0 <= j < n``) lives in
family ``j % FAMILIES`` with labels ``(str(j // 1000), str(j))``.  Label keys
are unique across families, so a plain ``{labels: value}`` read of the
``series`` table has exactly ``n`` entries.
"""

from __future__ import annotations

import time
from pathlib import Path

from keepcount.metrics import counter_def, label_key
from keepcount.stores.base import FamilyDef, SeriesRow
from keepcount.stores.sqlite import SQLiteStore

__all__ = ["FAMILIES", "HELP", "LABELNAMES", "NODE", "ensure", "family_name", "labels_of"]

NODE = "bench"
FAMILIES = 10
LABELNAMES = ("shard", "item")
HELP = "restore benchmark"
_BATCH = 100_000  # rows per transaction: bounded memory, few fsyncs


def family_name(i: int) -> str:
    return f"bench_restore_{i}_total"


def labels_of(j: int) -> tuple[str, str]:
    """Label values of counter ``j``; it belongs to family ``j % FAMILIES``."""
    return (str(j // 1000), str(j))


def definitions() -> list[FamilyDef]:
    return [counter_def(family_name(i), HELP, LABELNAMES) for i in range(FAMILIES)]


def ensure(workdir: Path, n: int) -> Path:
    """The path of a store holding ``n`` counters of ``NODE``; built on first use.

    ``workdir`` belongs to one run, so a file there was built whole by it (a
    failed build ends the run).
    """
    path = workdir / f"counters-{n}.db"
    if not path.exists():
        _build(path, n)
    return path


def _build(path: Path, n: int) -> None:
    store = SQLiteStore(path)
    try:
        epoch = store.claim(NODE)
        families = definitions()
        now = time.time()
        for start in range(0, n, _BATCH):
            rows: list[SeriesRow] = [
                (family_name(j % FAMILIES), label_key(labels_of(j)), j % 1000 + 1, now)
                for j in range(start, min(n, start + _BATCH))
            ]
            store.write(NODE, epoch, families if start == 0 else (), rows)
        if n == 0:
            store.write(NODE, epoch, families, ())
        store.release(NODE, epoch)
    finally:
        store.close()  # the last connection checkpoints the WAL into the file
