"""The ``store`` fixture: every backend the conformance suite holds to the Store contract.

Each backend runs on a real server started once per test session (SQLite:
a file; Bigtable: Google's emulator); each test gets its own namespace (a
file / a keyspace / a table).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from keepcount.stores import open_store
from keepcount.stores.base import Store


@pytest.fixture(params=["sqlite", "cassandra", "bigtable"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/conformance.db"
    if request.param == "bigtable":
        emulated: str = request.getfixturevalue("bigtable_url")  # the emulator, a fresh table
        return emulated
    url: str = request.getfixturevalue("cassandra_url")  # 3 nodes, a fresh keyspace
    return url


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    s = open_store(store_url)
    yield s
    s.close()


@pytest.fixture
def other(store_url: str) -> Iterator[Store]:
    """A second, independent handle on the same store (another process's view)."""
    s = open_store(store_url)
    yield s
    s.close()
