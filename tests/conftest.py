"""Shared fixtures: stores in per-test temp dirs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import keepcount
from bigtable_fixtures import (  # noqa: F401 - one Bigtable emulator per session, for every module
    bigtable_emulator,
    bigtable_table,
    bigtable_up,
    bigtable_url,
)
from cassandra_fixtures import (  # noqa: F401 - one Cassandra cluster per session, for every module
    cassandra_cluster,
    cassandra_keyspace,
    cassandra_up,
    cassandra_url,
)


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """A fresh SQLite store URL (four slashes: absolute path)."""
    return f"sqlite:///{tmp_path}/counters.db"


@pytest.fixture
def reg(db_url: str) -> Iterator[keepcount.Registry]:
    r = keepcount.open(db_url, node="node-1", flush_interval=None)
    yield r
    if not r.closed:
        r.close()
