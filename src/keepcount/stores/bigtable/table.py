"""One Bigtable table as the store uses it: its schema checked or created at
open, the filters and conditional mutations of every operation, and reads
with client errors translated (``client.translate``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from keepcount.errors import CorruptStore
from keepcount.stores.bigtable.client import BigtableURL, admin_client, translate
from keepcount.stores.bigtable.layout import (
    FAMILIES,
    FORMAT_VERSION,
    KEY_FAMILIES,
    KEY_GC_AGE,
    META,
    META_ROW,
    NODE_END,
    NODE_PREFIX,
    i64,
    node_key,
)

__all__ = ["Table"]

log = logging.getLogger("keepcount.stores.bigtable")


class Table:
    """The store's table: ``table`` (the library's) with its ``data`` package.

    Every operation first calls ``check_open`` (``StoreUnavailable`` once
    the store is closed); reads and conditional writes translate client
    errors into keepcount's, naming ``where`` (the store).
    """

    def __init__(
        self, data: Any, table: Any, where: str, timeout: float, check_open: Callable[[], None]
    ) -> None:
        self.f = data.row_filters
        self.m = data.mutations
        self._query = data.ReadRowsQuery
        self._range = data.RowRange
        self.table = table
        self.where = where
        self.timeout = timeout
        self.check_open = check_open
        self.admin: Any = None
        """The admin client made by ``setup`` (closed with the store)."""

    # -- opening -----------------------------------------------------------------

    def setup(self, loc: BigtableURL, emulator: str | None) -> None:
        """Create the table and its families if missing; refuse a table that
        is not keepcount's; write or check the format row."""
        from google.api_core import exceptions as gexc
        from google.cloud.bigtable_admin_v2 import types

        parent = f"projects/{loc.project}/instances/{loc.instance}"
        name = f"{parent}/tables/{loc.table}"
        one = {"max_num_versions": 1}
        aged = {"union": {"rules": [one, {"max_age": {"seconds": KEY_GC_AGE}}]}}
        wanted = {f: {"gc_rule": aged if f in KEY_FAMILIES else one} for f in FAMILIES}
        get = {"name": name, "view": types.Table.View.SCHEMA_VIEW}
        self.admin = admin_client(emulator)
        admin = self.admin
        families: set[str] | None
        try:
            table = admin.get_table(request=get, retry=None, timeout=self.timeout)
            families = set(table.column_families)
        except gexc.NotFound:
            try:
                admin.create_table(
                    request={
                        "parent": parent,
                        "table_id": loc.table,
                        "table": {"column_families": wanted},
                    }
                )
                log.info("%s: created table %s", self.where, name)
                families = set(FAMILIES)
            except gexc.AlreadyExists:  # another process created it meanwhile
                table = admin.get_table(request=get, retry=None, timeout=self.timeout)
                families = set(table.column_families)
        except gexc.PermissionDenied as exc:
            # Data access without admin rights: the format row below still
            # tells a keepcount table from another one.
            log.warning(
                "%s: cannot read the table's schema (%s); checking its format row", self.where, exc
            )
            families = None
        meta = self._read_format()
        if families is not None and not set(FAMILIES) <= families:
            if meta is not None or families - set(FAMILIES) or self._has_rows():
                raise CorruptStore(
                    f"{self.where}: table {loc.table!r} is not a keepcount store "
                    f"(column families {sorted(families)}, keepcount's are {list(FAMILIES)})"
                )
            admin.modify_column_families(
                request={
                    "name": name,
                    "modifications": [
                        {"id": f, "create": wanted[f]} for f in FAMILIES if f not in families
                    ],
                }
            )
        if meta is None:
            if self._has_rows():
                raise CorruptStore(
                    f"{self.where}: table {loc.table!r} holds data but no keepcount format "
                    "row: not a keepcount store; refusing it"
                )
            m = self.m
            self.table.check_and_mutate_row(
                META_ROW,
                self.f.ColumnRangeFilter(META, b"format", b"format"),
                false_case_mutations=[
                    m.SetCell(META, b"format", b"keepcount", 0),
                    m.SetCell(META, b"format_version", str(FORMAT_VERSION).encode(), 0),
                ],
            )
            meta = self._read_format()
        if meta is None or meta.get(b"format") != b"keepcount":
            raise CorruptStore(f"{self.where}: table {loc.table!r} is not a keepcount store")
        version = meta.get(b"format_version", b"?").decode(errors="replace")
        if version != str(FORMAT_VERSION):
            raise CorruptStore(
                f"{self.where}: format version {version}; this keepcount reads version "
                f"{FORMAT_VERSION}"
            )

    def _read_format(self) -> dict[bytes, bytes] | None:
        row = self.table.read_row(META_ROW, row_filter=self.newest(META))
        if row is None:
            return None
        return {c.qualifier: c.value for c in row.cells}

    def _has_rows(self) -> bool:
        f = self.f
        strip = f.RowFilterChain([f.CellsRowLimitFilter(1), f.StripValueTransformerFilter(True)])
        return bool(self.table.read_rows(self._query(limit=1, row_filter=strip)))

    # -- filters and mutations -----------------------------------------------------

    def newest(self, families: str) -> Any:
        """Only the newest cell of each column of ``families`` (a regex: "f|v")."""
        f = self.f
        return f.RowFilterChain([f.FamilyNameRegexFilter(families), f.CellsColumnLimitFilter(1)])

    def cell_is(self, family: str, qualifier: bytes, value: bytes) -> Any:
        """Predicate: the newest cell of ``family:qualifier`` holds exactly ``value``."""
        f = self.f
        return f.RowFilterChain([
            f.ColumnRangeFilter(family, qualifier, qualifier),
            f.CellsColumnLimitFilter(1),
            f.ValueRangeFilter(value, value),
        ])  # fmt: skip

    def fence(self, incarnation: int) -> Any:
        """Predicate: the node row's claim (``m:inc``) is still ``incarnation``."""
        return self.cell_is(META, b"inc", i64(incarnation))

    def replace(self, family: str, qualifier: bytes, value: bytes, ts: int) -> list[Any]:
        """Mutations leaving exactly one cell (``value``) in a column, whatever
        the timestamps of the cells there before (claim and owner cells)."""
        m = self.m
        return [m.DeleteRangeFromColumn(family, qualifier), m.SetCell(family, qualifier, value, ts)]

    def mutate_if(
        self,
        row: bytes,
        predicate: Any,
        what: str,
        *,
        true: list[Any] | None = None,
        false: list[Any] | None = None,
    ) -> bool:
        """One CheckAndMutateRow; True if the predicate matched."""
        self.check_open()
        try:
            return bool(
                self.table.check_and_mutate_row(
                    row, predicate, true_case_mutations=true, false_case_mutations=false
                )
            )
        except Exception as exc:
            raise translate(exc, f"{self.where}: {what} failed", write=True) from exc

    def read_row(self, row: bytes, row_filter: Any, what: str) -> Any:
        self.check_open()
        try:
            return self.table.read_row(row, row_filter=row_filter)
        except Exception as exc:
            raise translate(exc, f"{self.where}: {what} failed") from exc

    def scan_nodes(self, row_filter: Any, what: str) -> list[Any]:
        """One prefix scan of every node row (``n#``)."""
        self.check_open()
        query = self._query(row_ranges=self._range(NODE_PREFIX, NODE_END), row_filter=row_filter)
        try:
            return list(self.table.read_rows(query))
        except Exception as exc:
            raise translate(exc, f"{self.where}: {what} failed") from exc

    def read_meta(self, node: str) -> dict[bytes, bytes]:
        """The newest ``m`` cells of a node's row (its claim): qualifier -> value."""
        row = self.read_row(node_key(node), self.newest(META), f"read the claim of node {node!r}")
        return {} if row is None else {c.qualifier: c.value for c in row.cells}
