"""Stores: where each node's absolute values live, chosen by URL.

``sqlite:///rel.db`` and ``sqlite:////abs/path.db`` follow SQLAlchemy's
convention (three slashes then a relative path, four for an absolute one);
``cassandra://host1,host2,host3[:port]/keyspace`` is Apache Cassandra;
``bigtable://project/instance/table[?app_profile=ID&emulator=HOST:PORT]`` is
Google Cloud Bigtable (or its emulator).

Flipped bits on disk (issue 18): the SQLite store checksums every row and
checks its WAL before SQLite recovers it (``stores.sqlite``); Cassandra's
compressed chunks carry CRCs that every read checks, and a replica that
refuses a chunk is outvoted (``stores.cassandra.session``); the Bigtable
emulator keeps its data in memory, so it has nothing on disk to flip (Cloud
Bigtable's own storage checks are Google's).
"""

from __future__ import annotations

from keepcount.errors import InvalidInput
from keepcount.stores.base import Store

__all__ = ["Store", "open_store", "sqlite_path"]


def sqlite_path(url: str) -> str:
    """The file path of a ``sqlite:///`` URL."""
    if not url.startswith("sqlite:///"):
        raise InvalidInput(
            f"not an SQLite store URL: {url!r} (use sqlite:///rel.db or sqlite:////abs.db)"
        )
    path = url[len("sqlite:///") :]
    if not path or path == ":memory:":
        raise InvalidInput(f"store URL {url!r} names no file (an in-memory store is not durable)")
    if "?" in path:
        raise InvalidInput(f"store URL {url!r}: query options are not supported")
    return path


def open_store(url: str) -> Store:
    """Open the store a URL names; ``InvalidInput`` for an unknown or malformed URL."""
    if not isinstance(url, str) or "://" not in url:
        raise InvalidInput(
            f"invalid store URL {url!r}: expected scheme://..., e.g. sqlite:///counters.db"
        )
    scheme = url.split("://", 1)[0]
    if scheme == "sqlite":
        from keepcount.stores.sqlite import SQLiteStore

        return SQLiteStore(sqlite_path(url))
    if scheme == "cassandra":
        from keepcount.stores.cassandra import CassandraStore

        return CassandraStore(url)
    if scheme == "bigtable":
        from keepcount.stores.bigtable import BigtableStore

        return BigtableStore(url)
    raise InvalidInput(
        f"unknown store scheme {scheme!r} in {url!r}; known: sqlite, cassandra, bigtable"
    )
