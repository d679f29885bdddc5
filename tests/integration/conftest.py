"""The ``store`` fixture: every backend the conformance suite holds to the Store contract.

Later backends (Cassandra, Bigtable) join the parameter list with a
session-scoped server; each test gets its own namespace (file / keyspace).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from keepcount.stores import open_store
from keepcount.stores.base import Store


@pytest.fixture(params=["sqlite"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/conformance.db"
    raise AssertionError(request.param)


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
