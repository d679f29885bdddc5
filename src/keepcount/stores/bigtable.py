"""The Google Cloud Bigtable store: ``bigtable://project/instance/table``.

Optional query options: ``?app_profile=ID`` (an app profile with
single-cluster routing: Bigtable refuses conditional writes through
multi-cluster routing) and ``?emulator=HOST:PORT`` (the Bigtable emulator;
``BIGTABLE_EMULATOR_HOST``, the client library's own convention, is honoured
as well).  Credentials for real Bigtable come from the environment
(Application Default Credentials), never from the URL or the code.

Layout (one table; the store creates it and its column families if missing)::

    row key        family  qualifier              value
    meta           m       format                 "keepcount"
                   m       format_version         "1"
    n#<node>       m       inc, gen, epoch,       the node's claim (8-byte
                           claimed_at, released_at,  big-endian ints, 8-byte
                           pid, host              doubles, UTF-8)
                   f       <name>                 family definition (JSON)
                   v       <name>\\0<label key>    series value: b"i" + int64
                                                  (counter) or b"s" + UTF-8
                                                  (any other kind)
                   t       <name>\\0<label key>    created time (double)
                   k       <idempotency key>      key record (JSON)
    o#<key>        o       owner                  which node records the key (JSON)

ONE ROW PER NODE: a node's counters are one row, so a flush is one atomic
single-row mutation and a restore reads one row; cluster totals are one
prefix scan of ``n#``.  Label keys are JSON arrays, so they never hold a raw
NUL byte, and metric names cannot: ``<name>\\0`` is an exact prefix.

**Writes are absolute values with explicit cell timestamps** from a per-node
logical clock, as in the Cassandra store (DESIGN §5), and every family keeps
one version (GC rule ``max_versions=1``; reads also ask for the newest cell
only, since garbage collection is lazy).  Bigtable stores timestamps in
microseconds but a table's granularity is milliseconds (the emulator refuses
other values: "Timestamp granularity mismatch"), so a cell's timestamp is
``((gen << 28) | seq) * 1000``.  That leaves 53 bits: 28 for the flush
sequence, 25 for the *generation*, which grows by one at every claim and
whenever a claim's sequence runs out (a "renewal": one conditional write per
268 million flushes).  So the newest incarnation's newest value always
carries the highest timestamp, and a flush that timed out and landed after
a later one of the same incarnation changes nothing.

**Fencing: every flush is a CheckAndMutateRow on the node's row** whose
predicate is "the row's ``m:inc`` cell equals our incarnation".  A claim
raises ``m:inc`` with a CheckAndMutateRow of its own (predicate: ``m:inc``
is still what it read), and Bigtable applies both atomically on the one row,
so once a claim returned no write of an older incarnation can land: not an
overwrite, not a new cell.  A refused flush raises ``Fenced``: it is not
acknowledged.  The Cassandra store instead re-asserts the partition at a
claim, shadows older cells with a tombstone and reads its claim again after
every batch; that cannot work here: Bigtable has no tombstones that shadow
older timestamps arriving later (a delete removes what is there now), so a
late write of a series the new incarnation never heard of would stay.  The
price is that every flush is a read-modify-write of one cell of its row
(conditional writes are not batched and cost more than plain ones), once
per flush, not per increment, and with no read after it.  The incarnation
is the fencing identity (it changes only at a claim); the generation only
orders timestamps.

**Idempotency keys** are recorded store-wide exactly once, as in the
Cassandra store.  A key's record lives in the writing node's row, in the
same atomic mutation as the value it guards (so it exists iff the counted
value does); its ``o#<key>`` row names the owner (node, incarnation, token,
expiry).  A write first takes each key with a CheckAndMutateRow that creates
the owner entry only if there is none.  An existing entry of another
writer means: *recorded* if the record is in that node's row; *pending*
(``KeyConflict.pending``) if not and that node is still the same
incarnation (its flush may still land); free to take over (a conditional
write on the exact entry read) if the entry expired, or if that node's
incarnation moved on (its flush can never land now: fencing above).
Records and owner entries expire natively: their cells carry the timestamp
``expires - KEY_GC_AGE`` and their families a ``max_age=KEY_GC_AGE`` GC
rule, so Bigtable drops them once expired; reads check ``expires`` too (GC
runs lazily, on Cloud Bigtable within about a week).

A flush too big for one request (``MUTATIONS_PER_REQUEST``; Bigtable's hard
limit is 100,000 mutations) is split into several fenced mutations when it
carries no idempotency keys: values are absolute, so a part that landed is
harmless.  A keyed one cannot be split (a key's record and its value must
land together) and its keys are answered as ``KeyConflict.pending``: those
requests are not acknowledged and their retries are counted in a later,
smaller flush.

Driver errors are translated at this seam: a deadline exceeded (or a broken
connection) on a write is ``OutcomeUnknown``; an unreachable server,
refused or timed-out reads, missing permissions are ``StoreUnavailable``;
a table that is missing, or not keepcount's, is ``CorruptStore``.

Limits: one row holds all of a node's series (Bigtable caps a row at 256 MB,
about a million series with their created times), and the app profile must
use single-cluster routing (with replication, a failover to another cluster
may lose writes not yet replicated: DESIGN G1 holds per cluster).
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import re
import socket
import struct
import threading
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from keepcount.errors import (
    ClaimConflict,
    CorruptStore,
    Fenced,
    InvalidInput,
    KeepcountError,
    KeyConflict,
    OutcomeUnknown,
    StoreUnavailable,
)
from keepcount.naming import check_node_id
from keepcount.stores.base import (
    ClusterSnapshot,
    FamilyDef,
    KeyRecord,
    NodeRecord,
    SeriesRow,
    SeriesValue,
    Snapshot,
    check_kind,
    has_buckets,
)

__all__ = ["EMULATOR_ENV", "FORMAT_VERSION", "BigtableStore", "BigtableURL", "parse_url"]

log = logging.getLogger("keepcount.stores.bigtable")

FORMAT_VERSION = 1
EMULATOR_ENV = "BIGTABLE_EMULATOR_HOST"
"""The Google client libraries' variable naming an emulator (``host:port``)."""

REQUEST_TIMEOUT = 10.0
"""Default seconds per operation (``BigtableStore(timeout=...)``), the client's
retries of a read included.  A write is never retried by the client (a
conditional write is not idempotent to it): one that runs out of time is
``OutcomeUnknown``, and the next flush writes the same absolute values
again.  The schema checks at open are single attempts: the node retries
opening a store it cannot reach."""

MUTATIONS_PER_REQUEST = 50_000
"""Mutations per conditional write.  Bigtable refuses more than 100,000 in
one request; half of that leaves room and keeps one request well under its
size limits (a mutation of a series is ~50-100 bytes)."""

KEY_GC_AGE = 86_400
"""Seconds of the ``max_age`` GC rule of the key families (``k``, ``o``).
A key cell's timestamp is ``expires - KEY_GC_AGE``, so Bigtable's garbage
collection drops it once it expired, whatever the key's own TTL."""

CONCURRENT_KEYS = 8
"""Idempotency keys of one flush taken in parallel (one round trip each)."""

SEQ_BITS = 28
GEN_BITS = 25
"""28 + 25 = 53 bits: the logical clock times 1000 (milliseconds as
microseconds) stays below 2**63."""
MAX_SEQ = (1 << SEQ_BITS) - 1
MAX_GEN = (1 << GEN_BITS) - 1

# Column families and their GC rules (see the module docstring).
META, FAMILY, VALUE, CREATED, KEY, OWNER = "m", "f", "v", "t", "k", "o"
FAMILIES = (META, FAMILY, VALUE, CREATED, KEY, OWNER)
_KEY_FAMILIES = (KEY, OWNER)

_META_ROW = b"meta"
_NODE_PREFIX = b"n#"
_NODE_END = b"n$"  # the first key after every "n#..." key
_OWNER_PREFIX = b"o#"
_OWNER_COL = b"owner"
_SEP = b"\x00"
_INT, _STR = b"i", b"s"
_DOUBLE = struct.Struct(">d")

_PROJECT = re.compile(r"[a-z][a-z0-9.:-]{0,62}")  # also domain-scoped "example.com:proj"
_INSTANCE = re.compile(r"[a-z][a-z0-9-]{0,32}")
_TABLE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,49}")
_HOSTPORT = re.compile(r"[A-Za-z0-9.-]+:\d{1,5}|\[[0-9A-Fa-f:]+\]:\d{1,5}")
_INSTALL = "pip install 'keepcount[bigtable]'  (or: scripts/setup.sh)"
_ENV_LOCK = threading.Lock()  # the client library reads EMULATOR_ENV when built

GRPC_SHUTDOWN_WAIT = 2.0
"""Seconds ``close()`` of the process's last store waits at most for gRPC
to stop its threads (``_await_grpc_shutdown``)."""
_GRPC_THREADS = ("grpc", "event_engine", "lifeguard")  # names gRPC core gives its threads
_open_clients = 0  # data clients of this module open in the process (under _ENV_LOCK)


def _grpc_threads() -> list[str] | None:
    """The names of gRPC core's own threads in this process, or None where
    ``/proc`` cannot tell."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    names = []
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                name = f.read().strip()
        except OSError:  # that thread just ended
            continue
        if name.startswith(_GRPC_THREADS):
            names.append(name)
    return sorted(names)


def _await_grpc_shutdown(timeout: float = GRPC_SHUTDOWN_WAIT) -> None:
    """Wait until gRPC has stopped its threads after its last channel closed.

    gRPC shuts its core down on threads of its own, a few milliseconds after
    the last ``close()`` returned.  A ``fork()`` in that moment deadlocks:
    the parent in gRPC's own pre-fork handler, or the child on its first
    channel.  And the registry closes its store just before a fork, for the
    child to open one of its own (``keepcount.registry``).  Returns early
    when the threads stay up with no shutdown under way: another gRPC user
    in the process keeps the core running.
    """
    deadline = time.monotonic() + timeout
    last: list[str] | None = None
    since = time.monotonic()
    while True:
        names = _grpc_threads()
        if not names:  # gone (or no /proc to tell)
            return
        now = time.monotonic()
        if names != last or "grpc_shutdown" in names:
            last, since = names, now
        elif now - since >= 0.1:
            return  # steady: the core stays up for someone else
        if now >= deadline:
            log.debug("gRPC threads still running %.1f s after the last close: %s", timeout, names)
            return
        time.sleep(0.001)


@dataclass(frozen=True)
class BigtableURL:
    """A parsed ``bigtable://project/instance/table[?options]``."""

    project: str
    instance: str
    table: str
    app_profile: str | None = None
    emulator: str | None = None
    """``host:port`` of a Bigtable emulator, or None for Cloud Bigtable."""


def parse_url(url: str) -> BigtableURL:
    """``bigtable://project/instance/table[?app_profile=ID&emulator=HOST:PORT]``;
    ``InvalidInput`` naming what is wrong."""
    parts = urlsplit(url)
    example = "e.g. bigtable://my-project/my-instance/counters"
    if parts.scheme != "bigtable":
        raise InvalidInput(f"not a Bigtable store URL: {url!r} ({example})")
    path = parts.path.strip("/").split("/") if parts.path.strip("/") else []
    if len(path) != 2 or not parts.netloc:
        raise InvalidInput(
            f"store URL {url!r} must name a project, an instance and a table ({example})"
        )
    project, (instance, table) = parts.netloc, path
    for what, value, pattern in (
        ("project id", project, _PROJECT),
        ("instance id", instance, _INSTANCE),
        ("table id", table, _TABLE),
    ):
        if not pattern.fullmatch(value):
            raise InvalidInput(f"store URL {url!r}: {value!r} is not a valid Bigtable {what}")
    options: dict[str, str] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name not in ("app_profile", "emulator") or name in options:
            raise InvalidInput(
                f"store URL {url!r}: unknown or repeated option {name!r} "
                "(known: app_profile=ID, emulator=HOST:PORT)"
            )
        options[name] = value
    emulator = options.get("emulator")
    if emulator is not None and not _HOSTPORT.fullmatch(emulator):
        raise InvalidInput(f"store URL {url!r}: emulator must be HOST:PORT, not {emulator!r}")
    profile = options.get("app_profile")
    if profile is not None and not re.fullmatch(r"[_a-zA-Z0-9][-_.a-zA-Z0-9]{0,49}", profile):
        raise InvalidInput(f"store URL {url!r}: {profile!r} is not a valid app profile id")
    return BigtableURL(project, instance, table, profile, emulator)


def _library() -> Any:
    """The client library's data package; ``InvalidInput`` naming the extra if missing."""
    try:
        import google.cloud.bigtable.data.mutations
        import google.cloud.bigtable.data.row_filters  # noqa: F401 - used as data.row_filters
        from google.cloud.bigtable import data
    except ImportError:  # pragma: no cover - depends on the installation
        raise InvalidInput(f"the Bigtable store needs google-cloud-bigtable: {_INSTALL}") from None
    return data


# -- encodings ---------------------------------------------------------------------


def _i64(n: int) -> bytes:
    return n.to_bytes(8, "big", signed=True)


def _int(raw: bytes) -> int:
    if len(raw) != 8:
        raise ValueError(f"{len(raw)}-byte integer")
    return int.from_bytes(raw, "big", signed=True)


def _column(name: str, labels: str) -> bytes:
    return name.encode() + _SEP + labels.encode()


def _split_column(qualifier: bytes) -> tuple[str, str]:
    name, sep, labels = qualifier.partition(_SEP)
    if not sep:
        raise ValueError(f"column {qualifier!r} has no separator")
    return name.decode(), labels.decode()


def _encode_value(value: SeriesValue) -> bytes:
    if isinstance(value, int):
        return _INT + _i64(value)
    return _STR + value.encode()


def _decode_value(raw: bytes) -> SeriesValue:
    tag, body = raw[:1], raw[1:]
    if tag == _INT:
        return _int(body)
    if tag == _STR:
        return body.decode()
    raise ValueError(f"value tag {tag!r}")


def _encode_family(f: FamilyDef) -> bytes:
    finite = [b for b in f.buckets[:-1]]  # +Inf is implied: strict JSON has no Infinity
    doc = {"kind": f.kind, "help": f.help, "labelnames": list(f.labelnames), "buckets": finite}
    return json.dumps(doc, separators=(",", ":")).encode()


def _decode_family(name: str, raw: bytes) -> FamilyDef:
    doc = json.loads(raw)
    kind = check_kind(doc["kind"])
    labelnames = tuple(str(n) for n in doc["labelnames"])
    buckets: tuple[float, ...] = ()
    if has_buckets(kind):
        buckets = (*(float(b) for b in doc["buckets"]), float("inf"))
    return FamilyDef(name, kind, str(doc["help"]), labelnames, buckets)


def _key_timestamp(expires: float) -> int:
    """A key cell's timestamp (µs, millisecond-aligned): its ``max_age`` GC
    rule drops it ``KEY_GC_AGE`` seconds after this, i.e. once it expired."""
    ms = max(0, int(expires * 1000) - KEY_GC_AGE * 1000)
    return ms * 1000


def _json(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


@dataclass(frozen=True)
class _Owner:
    """An ``o#<key>`` entry as read, with its exact bytes (the compare-and-set operand)."""

    raw: bytes
    node: str
    incarnation: int
    token: str
    expires: float

    @classmethod
    def parse(cls, raw: bytes) -> _Owner:
        doc = json.loads(raw)
        return cls(raw, doc["node"], int(doc["inc"]), doc["token"], float(doc["expires"]))


@dataclass
class _Claim:
    epoch: int
    incarnation: int
    """The fencing identity: ``m:inc`` of the node's row while this claim holds."""
    generation: int
    """High bits of this claim's timestamps (see the module docstring)."""
    seq: int = 0
    known: set[tuple[str, str]] = field(default_factory=set)
    """Series written (or restored) under this claim: ``created`` is sent
    only with a series' first write, so it is kept from then on."""
    snapshot: Snapshot | None = None
    """What the claim read, handed to the ``load`` that follows it."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    """Held for a whole write: a renewal of the generation never interleaves
    with a write of the same node."""


class BigtableStore:
    """A ``Store`` on Google Cloud Bigtable (or its emulator); see the module docstring.

    Example::

        store = BigtableStore("bigtable://my-project/my-instance/counters")
        epoch = store.claim("node-1", epoch=42)      # 42: from the coordinator
        store.write("node-1", epoch, [family], [("hits_total", '["/"]', 7, now)])
        store.close()

    Thread-safe (the client library's data client is); writes of one node
    id are serialised (the group commit issues one at a time anyway).
    """

    native_key_expiry = True
    """Key cells expire through their families' ``max_age`` GC rule:
    ``expire_keys`` has nothing to do."""

    def __init__(self, url: str, *, timeout: float = REQUEST_TIMEOUT) -> None:
        self.url = url
        self.timeout = timeout
        self.location = parse_url(url)
        self.emulator = self.location.emulator or os.environ.get(EMULATOR_ENV) or None
        self.mutations_per_request = MUTATIONS_PER_REQUEST
        """Mutations per conditional write (``MUTATIONS_PER_REQUEST``; tests lower it)."""
        self.max_seq = MAX_SEQ
        """Flushes per generation before a renewal (``MAX_SEQ``; tests lower it)."""
        data = _library()
        self._f = data.row_filters
        self._m = data.mutations
        self._query = data.ReadRowsQuery
        self._range = data.RowRange
        self._lock = threading.Lock()
        self._claims: dict[str, _Claim] = {}
        self._closed = False
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._admin: Any = None
        loc = self.location
        self._where = f"store {url}"
        try:
            self._client = self._data_client(data)
        except Exception as exc:
            raise _translate(exc, f"{self._where}: cannot open") from exc
        global _open_clients
        with _ENV_LOCK:
            _open_clients += 1
        try:
            self._table = self._client.get_table(
                loc.instance,
                loc.table,
                app_profile_id=loc.app_profile,
                default_read_rows_operation_timeout=timeout,
                default_read_rows_attempt_timeout=timeout,
                default_mutate_rows_operation_timeout=timeout,
                default_mutate_rows_attempt_timeout=timeout,
                default_operation_timeout=timeout,
                default_attempt_timeout=timeout,
            )
            self._setup()
        except BaseException as exc:
            self._shutdown()
            if isinstance(exc, KeepcountError):
                raise
            raise _translate(exc, f"{self._where}: cannot open") from exc

    # -- opening -----------------------------------------------------------------

    def _data_client(self, data: Any) -> Any:
        """The library's data client, pointed at the emulator if there is one.

        The library takes an emulator only from ``EMULATOR_ENV``, read when
        the client is built: it is set for that moment only (under a lock),
        so the URL decides, not whatever the process environment says."""
        with _ENV_LOCK, warnings.catch_warnings():
            # "Connecting to Bigtable emulator at ...": expected, not a problem.
            warnings.filterwarnings("ignore", "Connecting to Bigtable emulator", RuntimeWarning)
            saved = os.environ.get(EMULATOR_ENV)
            try:
                if self.emulator is not None:
                    os.environ[EMULATOR_ENV] = self.emulator
                return data.BigtableDataClient(project=self.location.project)
            finally:
                if saved is None:
                    os.environ.pop(EMULATOR_ENV, None)
                else:
                    os.environ[EMULATOR_ENV] = saved

    def _admin_client(self) -> Any:
        from google.cloud.bigtable_admin_v2 import BigtableTableAdminClient

        if self.emulator is None:
            return BigtableTableAdminClient()  # Application Default Credentials
        import grpc  # type: ignore[import-untyped]
        from google.cloud.bigtable_admin_v2.services.bigtable_table_admin.transports import (
            BigtableTableAdminGrpcTransport,
        )

        channel = grpc.insecure_channel(self.emulator)
        return BigtableTableAdminClient(transport=BigtableTableAdminGrpcTransport(channel=channel))

    def _setup(self) -> None:
        """Create the table and its families if missing; refuse a table that
        is not keepcount's; write or check the format row."""
        from google.api_core import exceptions as gexc
        from google.cloud.bigtable_admin_v2 import types

        loc = self.location
        parent = f"projects/{loc.project}/instances/{loc.instance}"
        name = f"{parent}/tables/{loc.table}"
        one = {"max_num_versions": 1}
        aged = {"union": {"rules": [one, {"max_age": {"seconds": KEY_GC_AGE}}]}}
        wanted = {f: {"gc_rule": aged if f in _KEY_FAMILIES else one} for f in FAMILIES}
        get = {"name": name, "view": types.Table.View.SCHEMA_VIEW}
        self._admin = self._admin_client()
        admin = self._admin
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
                log.info("%s: created table %s", self._where, name)
                families = set(FAMILIES)
            except gexc.AlreadyExists:  # another process created it meanwhile
                table = admin.get_table(request=get, retry=None, timeout=self.timeout)
                families = set(table.column_families)
        except gexc.PermissionDenied as exc:
            # Data access without admin rights: the format row below still
            # tells a keepcount table from another one.
            log.warning(
                "%s: cannot read the table's schema (%s); checking its format row", self._where, exc
            )
            families = None
        meta = self._read_format()
        if families is not None and not set(FAMILIES) <= families:
            if meta is not None or families - set(FAMILIES) or self._has_rows():
                raise CorruptStore(
                    f"{self._where}: table {loc.table!r} is not a keepcount store "
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
                    f"{self._where}: table {loc.table!r} holds data but no keepcount format "
                    "row: not a keepcount store; refusing it"
                )
            m = self._m
            self._table.check_and_mutate_row(
                _META_ROW,
                self._f.ColumnRangeFilter(META, b"format", b"format"),
                false_case_mutations=[
                    m.SetCell(META, b"format", b"keepcount", 0),
                    m.SetCell(META, b"format_version", str(FORMAT_VERSION).encode(), 0),
                ],
            )
            meta = self._read_format()
        if meta is None or meta.get(b"format") != b"keepcount":
            raise CorruptStore(f"{self._where}: table {loc.table!r} is not a keepcount store")
        version = meta.get(b"format_version", b"?").decode(errors="replace")
        if version != str(FORMAT_VERSION):
            raise CorruptStore(
                f"{self._where}: format version {version}; this keepcount reads version "
                f"{FORMAT_VERSION}"
            )

    def _read_format(self) -> dict[bytes, bytes] | None:
        row = self._table.read_row(_META_ROW, row_filter=self._newest(META))
        if row is None:
            return None
        return {c.qualifier: c.value for c in row.cells}

    def _has_rows(self) -> bool:
        f = self._f
        strip = f.RowFilterChain([f.CellsRowLimitFilter(1), f.StripValueTransformerFilter(True)])
        return bool(self._table.read_rows(self._query(limit=1, row_filter=strip)))

    # -- filters and mutations -----------------------------------------------------

    def _newest(self, families: str) -> Any:
        """Only the newest cell of each column of ``families`` (a regex: "f|v")."""
        f = self._f
        return f.RowFilterChain([f.FamilyNameRegexFilter(families), f.CellsColumnLimitFilter(1)])

    def _cell_is(self, family: str, qualifier: bytes, value: bytes) -> Any:
        """Predicate: the newest cell of ``family:qualifier`` holds exactly ``value``."""
        f = self._f
        return f.RowFilterChain([
            f.ColumnRangeFilter(family, qualifier, qualifier),
            f.CellsColumnLimitFilter(1),
            f.ValueRangeFilter(value, value),
        ])  # fmt: skip

    def _fence(self, claim: _Claim) -> Any:
        return self._cell_is(META, b"inc", _i64(claim.incarnation))

    def _replace(self, family: str, qualifier: bytes, value: bytes, ts: int) -> list[Any]:
        """Mutations leaving exactly one cell (``value``) in a column, whatever
        the timestamps of the cells there before (claim and owner cells)."""
        m = self._m
        return [m.DeleteRangeFromColumn(family, qualifier), m.SetCell(family, qualifier, value, ts)]

    def _mutate_if(
        self,
        row: bytes,
        predicate: Any,
        what: str,
        *,
        true: list[Any] | None = None,
        false: list[Any] | None = None,
    ) -> bool:
        """One CheckAndMutateRow; True if the predicate matched."""
        self._check_open()
        try:
            return bool(
                self._table.check_and_mutate_row(
                    row, predicate, true_case_mutations=true, false_case_mutations=false
                )
            )
        except Exception as exc:
            raise _translate(exc, f"{self._where}: {what} failed", write=True) from exc

    def _read_row(self, row: bytes, row_filter: Any, what: str) -> Any:
        self._check_open()
        try:
            return self._table.read_row(row, row_filter=row_filter)
        except Exception as exc:
            raise _translate(exc, f"{self._where}: {what} failed") from exc

    def _scan_nodes(self, row_filter: Any, what: str) -> list[Any]:
        """One prefix scan of every node row (``n#``)."""
        self._check_open()
        query = self._query(row_ranges=self._range(_NODE_PREFIX, _NODE_END), row_filter=row_filter)
        try:
            return list(self._table.read_rows(query))
        except Exception as exc:
            raise _translate(exc, f"{self._where}: {what} failed") from exc

    # -- claims --------------------------------------------------------------------

    def _read_meta(self, node: str) -> dict[bytes, bytes]:
        row = self._read_row(
            _node_key(node), self._newest(META), f"read the claim of node {node!r}"
        )
        return {} if row is None else {c.qualifier: c.value for c in row.cells}

    def claim(self, node: str, epoch: int | None = None) -> int:
        check_node_id(node)
        with self._lock:
            self._check_open()
            if node in self._claims:
                raise ClaimConflict(f"node {node!r} is already claimed through this handle")
        key = _node_key(node)
        for _ in range(20):  # a concurrent claim made ours lose: look again
            meta = self._read_meta(node)
            try:
                stored_epoch = _int(meta[b"epoch"]) if b"epoch" in meta else 0
                stored_inc = _int(meta[b"inc"]) if b"inc" in meta else None
                stored_gen = _int(meta[b"gen"]) if b"gen" in meta else 0
            except ValueError as exc:
                raise CorruptStore(
                    f"{self._where}: the claim of node {node!r} is damaged ({exc})"
                ) from None
            if epoch is None:
                # Without a coordinator this store cannot tell a live holder
                # from a dead one (it has no leases): a claim never released
                # stays held.  A coordinator's epoch takes over.
                if stored_inc is not None and b"released_at" not in meta:
                    pid = meta.get(b"pid", b"?").decode(errors="replace")
                    host = meta.get(b"host", b"?").decode(errors="replace")
                    raise ClaimConflict(
                        f"node {node!r} is claimed in {self.url} by pid {pid} on {host} and "
                        "was never released; if that process is gone, claim it with a "
                        "coordinator's epoch (keepcount node --coordinator)"
                    )
                new_epoch = stored_epoch + 1
            elif epoch < stored_epoch:
                raise Fenced(
                    f"node {node!r}: epoch {epoch} is older than the stored epoch {stored_epoch}"
                )
            else:
                new_epoch = epoch
            inc, gen = (stored_inc or 0) + 1, stored_gen + 1
            if gen > MAX_GEN:
                raise StoreUnavailable(
                    f"{self._where}: node {node!r} used up its logical clock "
                    f"({MAX_GEN} claims and renewals); use a new node id"
                )
            ts = (gen << SEQ_BITS) * 1000
            mutations = [self._m.DeleteRangeFromColumn(META, b"released_at")]
            for q, v in (
                (b"inc", _i64(inc)), (b"gen", _i64(gen)), (b"epoch", _i64(new_epoch)),
                (b"claimed_at", _DOUBLE.pack(time.time())), (b"pid", str(os.getpid()).encode()),
                (b"host", socket.gethostname().encode()),
            ):  # fmt: skip
                mutations += self._replace(META, q, v, ts)
            what = f"claim node {node!r}"
            if stored_inc is None:  # a new node id: create its row's claim if still absent
                f = self._f
                exists = f.ColumnRangeFilter(META, b"inc", b"inc")
                won = not self._mutate_if(key, exists, what, false=mutations)
            else:
                won = self._mutate_if(
                    key, self._cell_is(META, b"inc", _i64(stored_inc)), what, true=mutations
                )
            if won:
                break
        else:
            raise StoreUnavailable(f"{self._where}: claims of node {node!r} kept racing")
        claim = _Claim(new_epoch, inc, gen)
        claim.snapshot = self._read_node(node)
        claim.known = {(n, k) for n, series in claim.snapshot.values.items() for k in series}
        with self._lock:
            self._claims[node] = claim
        return new_epoch

    def release(self, node: str, epoch: int) -> None:
        with self._lock:
            claim = self._claims.pop(node, None)
            if self._closed:
                return
        if claim is not None and claim.epoch == epoch:
            predicate = self._fence(claim)
        else:
            predicate = self._cell_is(META, b"epoch", _i64(epoch))
        mutations = self._replace(META, b"released_at", _DOUBLE.pack(time.time()), 0)
        self._mutate_if(_node_key(node), predicate, f"release node {node!r}", true=mutations)

    def nodes(self) -> list[NodeRecord]:
        out = []
        for row in self._scan_nodes(self._newest(META), "list nodes"):
            meta = {c.qualifier: c.value for c in row.cells}
            if b"inc" not in meta:
                continue
            try:
                claimed = _DOUBLE.unpack(meta[b"claimed_at"])[0] if b"claimed_at" in meta else None
                released = (
                    _DOUBLE.unpack(meta[b"released_at"])[0] if b"released_at" in meta else None
                )
                record = NodeRecord(
                    row.row_key[len(_NODE_PREFIX) :].decode(),
                    _int(meta.get(b"epoch", _i64(0))),
                    claimed,
                    released,
                )
            except (ValueError, struct.error) as exc:
                raise CorruptStore(f"{self._where}: a node's claim is damaged ({exc})") from None
            out.append(record)
        return sorted(out, key=lambda n: n.node)

    # -- reading -------------------------------------------------------------------

    def _read_node(self, node: str) -> Snapshot:
        row = self._read_row(
            _node_key(node), self._newest(f"{FAMILY}|{VALUE}"), f"load node {node!r}"
        )
        return _snapshot(self._where, node, [] if row is None else row.cells)

    def load(self, node: str) -> Snapshot:
        with self._lock:
            claim = self._claims.get(node)
            cached = claim.snapshot if claim is not None else None
            if claim is not None:
                claim.snapshot = None
        if cached is not None:
            return cached
        return self._read_node(node)

    def load_created(self, node: str) -> dict[str, dict[str, float]]:
        row = self._read_row(
            _node_key(node), self._newest(CREATED), f"load created times of {node!r}"
        )
        out: dict[str, dict[str, float]] = {}
        for c in [] if row is None else row.cells:
            try:
                name, labels = _split_column(c.qualifier)
                out.setdefault(name, {})[labels] = _DOUBLE.unpack(c.value)[0]
            except (ValueError, struct.error) as exc:
                raise CorruptStore(
                    f"{self._where}: a created time of node {node!r} is damaged ({exc})"
                ) from None
        return out

    def read_cluster(self, name: str | None = None) -> ClusterSnapshot:
        f = self._f
        if name is None:
            row_filter = self._newest(f"{FAMILY}|{VALUE}")
        else:
            n = name.encode()
            row_filter = f.RowFilterChain([
                f.RowFilterUnion([
                    f.ColumnRangeFilter(FAMILY, n, n),
                    f.ColumnRangeFilter(VALUE, n + _SEP, n + b"\x01", inclusive_end=False),
                ]),
                f.CellsColumnLimitFilter(1),
            ])  # fmt: skip
        snap = ClusterSnapshot()
        for row in self._scan_nodes(row_filter, "read cluster totals"):
            node = row.row_key[len(_NODE_PREFIX) :].decode()
            for c in row.cells:
                try:
                    if c.family == FAMILY:
                        fname = c.qualifier.decode()
                        snap.families.setdefault(node, {})[fname] = _decode_family(fname, c.value)
                    else:
                        sname, labels = _split_column(c.qualifier)
                        snap.rows.append((node, sname, labels, _decode_value(c.value)))
                except (ValueError, KeyError, TypeError) as exc:
                    raise CorruptStore(
                        f"{self._where}: node {node!r} holds a damaged cell "
                        f"{c.family}:{c.qualifier!r} ({exc}); refusing it"
                    ) from None
        snap.rows.sort()
        return snap

    # -- writing -------------------------------------------------------------------

    def _held(self, node: str, epoch: int) -> _Claim:
        with self._lock:
            self._check_open()
            claim = self._claims.get(node)
        if claim is None or claim.epoch != epoch:
            raise Fenced(
                f"node {node!r}: epoch {epoch} is not the claim of this store handle; write refused"
            )
        return claim

    def _drop(self, node: str, claim: _Claim) -> Fenced:
        with self._lock:
            if self._claims.get(node) is claim:
                del self._claims[node]
        return Fenced(
            f"node {node!r}: a newer incarnation claimed it; this one "
            f"({claim.incarnation}) is fenced and its write refused"
        )

    def _timestamp(self, node: str, claim: _Claim) -> int:
        """The next cell timestamp of ``claim`` (its lock held); renews the
        generation when the sequence ran out."""
        if claim.seq >= self.max_seq:
            gen = claim.generation + 1
            if gen > MAX_GEN:
                raise StoreUnavailable(
                    f"{self._where}: node {node!r} used up its logical clock; re-claim it"
                )
            mutations = self._replace(META, b"gen", _i64(gen), (gen << SEQ_BITS) * 1000)
            if not self._mutate_if(
                _node_key(node), self._fence(claim), f"renew node {node!r}", true=mutations
            ):
                raise self._drop(node, claim)
            claim.generation, claim.seq = gen, 0
        claim.seq += 1
        return ((claim.generation << SEQ_BITS) | claim.seq) * 1000

    def write(
        self,
        node: str,
        epoch: int,
        families: Sequence[FamilyDef],
        series: Sequence[SeriesRow],
        keys: Sequence[KeyRecord] = (),
    ) -> None:
        for f in families:
            check_kind(f.kind)
        claim = self._held(node, epoch)
        with claim.lock:
            claim.snapshot = None  # the claim's read is stale from now on
            size = len(families) + len(keys)
            size += sum(1 if (n, lk) in claim.known else 2 for n, lk, _, _ in series)
            if keys and size > self.mutations_per_request:
                busy = [k.key for k in keys]
                raise KeyConflict(
                    f"{self._where}: a flush of {size} mutations with idempotency keys is too "
                    "big for one atomic Bigtable mutation; its keyed increments are not "
                    "acknowledged (retry them)",
                    (),
                    busy,
                )
            ts = self._timestamp(node, claim)
            if keys:
                self._own_keys(node, claim, keys)
            self._write(node, claim, ts, families, series, keys)

    def _write(
        self,
        node: str,
        claim: _Claim,
        ts: int,
        families: Sequence[FamilyDef],
        series: Sequence[SeriesRow],
        keys: Sequence[KeyRecord],
    ) -> None:
        set_cell = self._m.SetCell
        # Families first: a series never lands before its definition.
        chunk = [set_cell(FAMILY, f.name.encode(), _encode_family(f), ts) for f in families]
        chunks = [chunk]
        fresh: list[list[tuple[str, str]]] = [[]]
        limit = self.mutations_per_request
        for name, labels, value, created in series:
            first = (name, labels) not in claim.known
            if len(chunk) + 1 + first > limit:
                chunk = []
                chunks.append(chunk)
                fresh.append([])
            column = _column(name, labels)
            chunk.append(set_cell(VALUE, column, _encode_value(value), ts))
            if first:
                chunk.append(set_cell(CREATED, column, _DOUBLE.pack(created), ts))
                fresh[-1].append((name, labels))
        for k in keys:  # only ever with one chunk (see write())
            doc = {"fingerprint": k.fingerprint, "result": k.result, "token": k.token,
                   "expires": k.expires}  # fmt: skip
            chunk.append(set_cell(KEY, k.key.encode(), _json(doc), _key_timestamp(k.expires)))
        if not any(chunks):  # nothing to write: still refuse a fenced handle
            current = self._read_meta(node).get(b"inc")
            if current is None or _int(current) != claim.incarnation:
                raise self._drop(node, claim)
            return
        for part, new in zip(chunks, fresh, strict=True):
            if not part:
                continue
            if not self._mutate_if(
                _node_key(node), self._fence(claim), f"write node {node!r}", true=part
            ):
                raise self._drop(node, claim)
            claim.known.update(new)

    # -- idempotency keys ------------------------------------------------------------

    def _own_keys(self, node: str, claim: _Claim, keys: Sequence[KeyRecord]) -> None:
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
                f"{self._where}: idempotency keys already recorded: {taken}; "
                f"being recorded by another writer: {busy}",
                taken,
                busy,
            )

    def _own_key(self, node: str, claim: _Claim, k: KeyRecord) -> str:
        """``"mine"``, ``"recorded"`` (another write counted it) or ``"pending"``."""
        row = _owner_key(k.key)
        what = f"take idempotency key {k.key!r}"
        entry = _json({"node": node, "inc": claim.incarnation, "token": k.token,
                       "expires": k.expires})  # fmt: skip
        ts = _key_timestamp(k.expires)
        exists = self._f.ColumnRangeFilter(OWNER, _OWNER_COL, _OWNER_COL)
        for _ in range(5):  # an entry dropped by GC between two reads: try again
            if not self._mutate_if(
                row, exists, what, false=[self._m.SetCell(OWNER, _OWNER_COL, entry, ts)]
            ):
                return "mine"
            owner = self._read_owner(k.key)
            if owner is None:
                continue
            if owner.raw == entry:
                return "mine"  # an earlier attempt of this very increment took it
            verdict = self._judge(node, k, owner)
            if verdict is not None:
                return verdict
            # Take over the exact entry read, unless someone else just did.
            take = self._replace(OWNER, _OWNER_COL, entry, ts)
            if self._mutate_if(row, self._cell_is(OWNER, _OWNER_COL, owner.raw), what, true=take):
                return "mine"
            return "pending"
        return "pending"

    def _judge(self, node: str, k: KeyRecord, owner: _Owner) -> str | None:
        """What another writer's owner entry means for ``k``: ``"recorded"``,
        ``"pending"``, or None: free to take over."""
        if owner.expires <= time.time() or (owner.node == node and owner.token == k.token):
            return None  # expired, or this increment's own entry (of an older claim)
        record = self._read_record(owner.node, k.key)
        if record is not None and record.get("token") == owner.token:
            return "recorded"  # with its value: the owner counted it
        current = self._read_meta(owner.node).get(b"inc")
        if current is None or _int(current) <= owner.incarnation:
            return "pending"  # the owner's flush may still land
        # The owner's node was claimed again without the record: its flush
        # can never land now (the claim fenced it).
        return None

    def _read_owner(self, key: str) -> _Owner | None:
        row = self._read_row(_owner_key(key), self._newest(OWNER), f"look up key {key!r}")
        if row is None:
            return None
        for c in row.cells:
            if c.qualifier == _OWNER_COL:
                try:
                    return _Owner.parse(c.value)
                except (ValueError, KeyError, TypeError) as exc:
                    raise CorruptStore(
                        f"{self._where}: the owner entry of key {key!r} is damaged ({exc})"
                    ) from None
        return None

    def _read_record(self, node: str, key: str) -> dict[str, Any] | None:
        f = self._f
        k = key.encode()
        row_filter = f.RowFilterChain([f.ColumnRangeFilter(KEY, k, k), f.CellsColumnLimitFilter(1)])
        row = self._read_row(_node_key(node), row_filter, f"look up key {key!r}")
        if row is None or not row.cells:
            return None
        try:
            doc = json.loads(row.cells[0].value)
            if not isinstance(doc, dict):
                raise TypeError("not an object")
        except (ValueError, TypeError) as exc:
            raise CorruptStore(
                f"{self._where}: the record of key {key!r} in node {node!r} is damaged ({exc})"
            ) from None
        return doc

    def lookup_key(self, key: str) -> KeyRecord | None:
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

    def expire_keys(self, now: float, limit: int = 1000) -> int:
        return 0

    # -- plumbing --------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StoreUnavailable(f"{self._where} is closed")

    def _shutdown(self) -> None:
        global _open_clients
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        try:
            self._client.close()
        except Exception as exc:  # closing must not fail the caller's own error path
            log.debug("%s: closing the data client: %r", self._where, exc)
        if self._admin is not None:
            try:
                self._admin.transport.close()
            except Exception as exc:
                log.debug("%s: closing the admin client: %r", self._where, exc)
        with _ENV_LOCK:
            _open_clients -= 1
            last = _open_clients == 0
        if last:
            _await_grpc_shutdown()  # the process may fork next (keepcount.registry)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._claims.clear()
        self._shutdown()

    def __repr__(self) -> str:
        return f"<BigtableStore {self.url}>"


def _node_key(node: str) -> bytes:
    return _NODE_PREFIX + node.encode()


def _owner_key(key: str) -> bytes:
    return _OWNER_PREFIX + key.encode()


def _snapshot(where: str, node: str, cells: Iterable[Any]) -> Snapshot:
    snap = Snapshot()
    series = []
    try:
        for c in cells:
            if c.family == FAMILY:
                name = c.qualifier.decode()
                snap.families[name] = _decode_family(name, c.value)
            else:
                series.append((*_split_column(c.qualifier), c.value))
        for name, labels, raw in series:
            family = snap.families.get(name)
            value = _decode_value(raw)
            if family is None or isinstance(value, int) != (family.kind == "counter"):
                raise CorruptStore(
                    f"{where}: node {node!r} holds a series {name}{labels} that keepcount "
                    "cannot have written (no family, or a value of the wrong kind); refusing it"
                )
            snap.values.setdefault(name, {})[labels] = value
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptStore(
            f"{where}: node {node!r} holds a damaged cell ({exc}); refusing it"
        ) from None
    return snap


def _translate(exc: BaseException, context: str, *, write: bool = False) -> KeepcountError:
    """Client library and gRPC errors -> keepcount errors (translated at the seam)."""
    if isinstance(exc, KeepcountError):
        return exc
    from google.api_core import exceptions as gexc

    name = type(exc).__name__
    text = str(exc)
    if isinstance(exc, gexc.NotFound):
        return CorruptStore(
            f"{context}: the table or one of keepcount's column families is missing ({exc}); "
            "keepcount refuses to start from zero"
        )
    if isinstance(exc, gexc.PermissionDenied | gexc.Unauthenticated):
        return StoreUnavailable(
            f"{context}: not permitted ({exc}); check the credentials the environment "
            "provides (GOOGLE_APPLICATION_CREDENTIALS, the VM's service account)"
        )
    if isinstance(exc, gexc.InvalidArgument | gexc.FailedPrecondition | gexc.ResourceExhausted):
        return StoreUnavailable(f"{context}: Bigtable refused it: {name} ({exc})")
    if write and not _never_sent(text):
        return OutcomeUnknown(f"{context}: {name} ({exc}); outcome unknown, not acknowledged")
    return StoreUnavailable(f"{context}: {name} ({exc})")


def _never_sent(text: str) -> bool:
    """gRPC's words for a call that never reached a server (no connection)."""
    text = text.lower()
    return (
        "failed to connect" in text
        or "connection refused" in text
        or "dns resolution failed" in text
    )
