"""A mutant of the SQLite store for ``test_verify``: it reads values without
checking their row checksums (and never checks its WAL), as keepcount did
before format 4.  Put on ``PYTHONPATH``, Python imports it at start-up in
``keepcount verify`` and in every node process it starts, so the ``corrupt``
fault's flipped values get served and the run must be judged invalid."""

import keepcount.stores.sqlite.store as _store

_store.CHECKED_VALUE = "value"
_store.checked_value_of = lambda seed: f"coalesce(value, {seed})"  # type: ignore[assignment]
_store.check_wal = lambda path, where: None  # type: ignore[assignment]
