# ruff: noqa: S608 - CQL names only the keyspace, which parse_url limits to [a-z0-9_]
"""Opening a Cassandra store: its URL, the driver's session, the keyspace and
its schema, the prepared statements, and driver errors translated at the seam.

The layout and the reasons behind it are in ``keepcount.stores.cassandra``.
"""

from __future__ import annotations

import logging
import re
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

from keepcount.errors import (
    CorruptStore,
    InvalidInput,
    KeepcountError,
    OutcomeUnknown,
    StoreUnavailable,
)
from keepcount.stores.cassandra.driver_clock import use_monotonic_clock
from keepcount.stores.cassandra.fence import FENCE_COLUMNS, ensure_schema

__all__ = [
    "DEFAULT_PORT",
    "DEFAULT_REPLICATION",
    "FORMAT_VERSION",
    "KEYSPACE",
    "REQUEST_TIMEOUT",
    "SCHEMA",
    "Statements",
    "connect",
    "parse_url",
    "paxos_variant",
    "translate",
]

log = logging.getLogger("keepcount.stores.cassandra")

FORMAT_VERSION = 2
"""2: the claim fence (``fence``: static ``fence``/``parts``/``version``, the
checkpoint's ``chunk``).  A store of format 1 is upgraded when opened: its
partitions have no fence, and the read rule counts every cell of those."""
DEFAULT_PORT = 9042
DEFAULT_REPLICATION = 3
SCHEMA_AGREEMENT_WAIT = 10.0
"""Seconds a new store's tables may take to reach every live node (the
driver's default wait, after each change)."""
REQUEST_TIMEOUT = 10.0
"""Client-side seconds per request; the server's own write timeout (2 s by
default) answers first, as a ``WriteTimeout``: outcome unknown."""

_KEYSPACE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,47}")
_INSTALL = "pip install 'keepcount[cassandra]'  (or: scripts/setup.sh)"


def parse_url(url: str) -> tuple[list[tuple[str, int]], str]:
    """``cassandra://h1,h2:9043,h3/keyspace`` -> ([(host, port), ...], keyspace)."""
    parts = urlsplit(url)
    if parts.scheme != "cassandra":
        raise InvalidInput(f"not a Cassandra store URL: {url!r}")
    keyspace = parts.path.strip("/")
    if not _KEYSPACE.fullmatch(keyspace):
        raise InvalidInput(
            f"store URL {url!r} needs a keyspace name (letters, digits, _), "
            "e.g. cassandra://10.0.0.1,10.0.0.2,10.0.0.3/counters"
        )
    if len(keyspace) > 48:
        raise InvalidInput(f"keyspace name {keyspace!r} is longer than 48 characters")
    hosts: list[tuple[str, int]] = []
    for item in parts.netloc.split(","):
        host, sep, port = item.strip().rpartition(":") if ":" in item else (item.strip(), "", "")
        if not host or (sep and not port.isdigit()):
            raise InvalidInput(f"store URL {url!r}: bad host {item!r} (expected host[:port])")
        hosts.append((host, int(port) if sep else DEFAULT_PORT))
    if parts.query:
        raise InvalidInput(f"store URL {url!r}: query options are not supported")
    return hosts, keyspace.lower()


def _driver() -> Any:
    try:
        import cassandra.cluster
    except ImportError:  # pragma: no cover - depends on the installation
        raise InvalidInput(f"the Cassandra store needs cassandra-driver: {_INSTALL}") from None
    return cassandra.cluster


def connect(
    url: str, hosts: list[tuple[str, int]], ks: str, replication: int | None
) -> tuple[Any, Any, Statements]:
    """(the driver's ``Cluster``, a session, its ``Statements``) for a
    keepcount keyspace ``ks`` on ``hosts``, ``setup`` first: QUORUM reads and
    writes, SERIAL for lightweight transactions, and no driver retries
    (errors are ``translate``d by the store) but one: an idempotent request
    whose coordinator's connection broke goes to the next host
    (``_retry_policy``).  The cluster is shut down again if anything fails."""
    driver = _driver()
    from cassandra import ConsistencyLevel
    from cassandra.policies import RoundRobinPolicy

    retry = _retry_policy()
    profile = driver.ExecutionProfile(
        load_balancing_policy=RoundRobinPolicy(),
        retry_policy=retry,
        consistency_level=ConsistencyLevel.QUORUM,
        serial_consistency_level=ConsistencyLevel.SERIAL,
        request_timeout=REQUEST_TIMEOUT,
    )
    ports = {p for _, p in hosts}
    kwargs: dict[str, Any] = {
        "contact_points": [h for h, _ in hosts],
        "port": ports.pop() if len(ports) == 1 else DEFAULT_PORT,
        "execution_profiles": {driver.EXEC_PROFILE_DEFAULT: profile},
        "protocol_version": 5,
        "connect_timeout": 5,
        "control_connection_timeout": 5,
    }
    if len(ports) > 0:  # several ports: one (host, port) pair each
        kwargs["contact_points"] = hosts
        del kwargs["port"]
    connection_class = _connection_class()
    if connection_class is not None:
        kwargs["connection_class"] = connection_class
    use_monotonic_clock()  # a wall clock step must not change the driver's timeouts
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        cluster = driver.Cluster(**kwargs)
    try:
        session = cluster.connect()
        setup(session, url, ks, replication)
        if paxos_variant(session) == "v1":
            log.warning(
                "store %s: this Cassandra runs Paxos v1 (paxos_variant: v1). Set "
                "paxos_variant: v2 in cassandra.yaml (Cassandra 4.1+): with v1, keyed "
                "increments can stall for seconds while a dead replica is not yet "
                "convicted (docs/stores.md, 'Paxos v2')",
                url,
            )
        return cluster, session, Statements(session, ks)
    except BaseException as exc:
        cluster.shutdown()
        if isinstance(exc, KeepcountError):
            raise
        raise translate(exc, f"store {url}: cannot open") from exc


def setup(session: Any, url: str, ks: str, replication: int | None) -> None:
    """Create keyspace ``ks`` and its tables if missing (``replication``
    None: RF=3, or the cluster's size if smaller) and check that it is a
    keepcount store of this ``FORMAT_VERSION`` (``CorruptStore`` if not)."""
    with _on_schema_node(session, ks) as run:
        _create(run, ks, replication)
    _check_format(session, url, ks)


Run = Callable[..., Any]
"""``run(statement, parameters=None)``: its result, from the schema node."""


@contextmanager
def _on_schema_node(session: Any, ks: str) -> Iterator[Run]:
    """A ``Run`` for schema changes and the reads they depend on: all on one
    node, and one wait for every live node to agree on the changes, at the
    end.  The driver waits after each change (~1 s on a local cluster: the
    nodes tell each other their schema versions by gossip), and a new store
    makes five: it took 10-11 s to open, now ~2 s.  Each change finds the
    ones before it on that node, which pushes them to the others
    (``_wait_for_schema`` waits until every node has them).  The node:
    the lowest address the session has connections to (right after connecting
    it may not have them to all), so processes opening a new store at once
    mostly send their ``IF NOT EXISTS`` changes to one node, which applies
    them one at a time."""
    cluster = session.cluster
    pooled = [h for h in session.get_pool_state() if h.is_up]
    host = min(pooled, key=lambda h: str(h.endpoint)) if pooled else None
    waited, cluster.max_schema_agreement_wait = cluster.max_schema_agreement_wait, 0

    def run(statement: str, parameters: Any = None) -> Any:
        return session.execute(statement, parameters, host=host)

    try:
        yield run
    finally:
        cluster.max_schema_agreement_wait = waited
    _wait_for_schema(session, ks, _columns(run, ks), host)


def _columns(run: Run, ks: str) -> set[tuple[str, str]]:
    """(table, column) of every column of keyspace ``ks``, as one node has them."""
    rows = run(
        "SELECT table_name, column_name FROM system_schema.columns WHERE keyspace_name = %s",
        (ks,),
    )
    return {(r.table_name, r.column_name) for r in rows}


def _wait_for_schema(
    session: Any, ks: str, columns: set[tuple[str, str]], schema_node: Any
) -> None:
    """Return once every other node up has ``columns`` (``schema_node``'s,
    with every change), asking each node itself: the driver's own check compares
    the schema versions one node has heard by gossip, which can agree on the
    version before the last change (a CI run then found a table missing on
    one node).  A warning after ``SCHEMA_AGREEMENT_WAIT`` seconds, and the
    store opens anyway, as after the driver's check."""
    deadline = time.monotonic() + SCHEMA_AGREEMENT_WAIT
    for host in [h for h in session.cluster.metadata.all_hosts() if h.is_up and h != schema_node]:

        def ask(statement: str, parameters: Any = None, host: Any = host) -> Any:
            return session.execute(statement, parameters, host=host, timeout=1.0)

        while True:
            try:
                if _columns(ask, ks) >= columns:
                    break
            except Exception:  # noqa: S110 - no connection to it yet, or slow: ask again
                pass
            if time.monotonic() > deadline:
                log.warning(
                    "node %s does not have keepcount's tables of %s after %.0f s",
                    host.endpoint, ks, SCHEMA_AGREEMENT_WAIT,
                )  # fmt: skip
                return
            time.sleep(0.05)


def _create(run: Run, ks: str, replication: int | None) -> None:
    existing = run(
        "SELECT keyspace_name FROM system_schema.keyspaces WHERE keyspace_name = %s", (ks,)
    ).one()
    if existing is None:
        if replication is None:
            peers = len(list(run("SELECT peer FROM system.peers")))
            replication = min(DEFAULT_REPLICATION, peers + 1)
        if replication < DEFAULT_REPLICATION:
            log.warning(
                "keyspace %s: replication factor %d (a %d-node cluster); "
                "acknowledged increments survive the loss of a node only with RF=3",
                ks, replication, replication,
            )  # fmt: skip
        run(KEYSPACE.format(ks=ks, rf=replication))
    for stmt in SCHEMA:
        run(stmt.format(ks=ks))
    ensure_schema(run, ks)


def _check_format(session: Any, url: str, ks: str) -> None:
    s = session
    meta = dict(s.execute(f"SELECT name, val FROM {ks}.meta"))
    if "format" not in meta or "format_version" not in meta:
        # A new store: marked with lightweight transactions, so concurrent
        # first opens agree.  Not at every open: processes opening at once
        # (a host's workers starting) contend on them, and some would fail
        # ("CAS operation result is unknown").
        s.execute(f"INSERT INTO {ks}.meta (name, val) VALUES ('format', 'keepcount') IF NOT EXISTS")
        s.execute(
            f"INSERT INTO {ks}.meta (name, val) VALUES ('format_version', %s) IF NOT EXISTS",
            (str(FORMAT_VERSION),),
        )
        meta = dict(s.execute(f"SELECT name, val FROM {ks}.meta"))
    if meta.get("format") == "keepcount" and meta.get("format_version") == "1":
        # Format 1 wrote no fence: its columns exist now (ensure_schema), and
        # from here on a keepcount that reads format 1 only must refuse it.
        s.execute(
            f"UPDATE {ks}.meta SET val = %s WHERE name = 'format_version' IF val = '1'",
            (str(FORMAT_VERSION),),
        )
        meta = dict(s.execute(f"SELECT name, val FROM {ks}.meta"))
    if meta.get("format") != "keepcount":
        raise CorruptStore(f"store {url}: keyspace {ks} is not a keepcount store")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise CorruptStore(
            f"store {url}: format version {meta.get('format_version')}; "
            f"this keepcount reads version {FORMAT_VERSION}"
        )


def paxos_variant(session: Any) -> str | None:
    """The ``paxos_variant`` of the node answering (``v1``/``v2``), or None
    if it does not say (a Cassandra before 4.1, or no access to
    ``system_views``)."""
    try:
        row = session.execute(
            "SELECT value FROM system_views.settings WHERE name = 'paxos_variant'"
        ).one()
    except Exception:  # only a hint: an old or locked-down server
        return None
    return None if row is None else str(row.value)


def _retry_policy() -> Any:
    """The driver's retry policy: ``FallthroughRetryPolicy`` (a timeout, an
    unavailable or overloaded replica is the store's to ``translate``), except
    for a request whose connection to its coordinator broke (the coordinator
    died: SIGKILL, crash, reset): an idempotent one is sent to the next host
    in the plan, up to twice.

    Issue 17: without it every request in flight to a killed node failed
    at once (``ConnectionShutdown``), so every node's flush failed and its
    keyed requests were answered 503; HAProxy resent them to other nodes
    while their first nodes wrote the same keys again, and the two
    ``INSERT ... IF NOT EXISTS`` of one key contended.  Until the failure
    detector convicts the dead replica (~10 s), Paxos still counts it as a
    participant, and a proposer that lost a round waits for *every*
    participant's answer (CASSANDRA-6013): 2 s (``write_request_timeout``)
    per contended key, the whole flush with it, and more 503s resent to
    other nodes: acknowledgements stopped for 5 s.

    Idempotent: a statement whose ``is_idempotent`` is set (the driver's own
    flag; a bound statement takes it from its prepared one): ``Statements``
    and ``FenceStatements`` set it, and the store on every batch it sends
    (absolute values at explicit timestamps)."""
    from cassandra.connection import ConnectionException
    from cassandra.policies import FallthroughRetryPolicy

    class RetryOnAnotherCoordinator(FallthroughRetryPolicy):  # type: ignore[misc]
        max_retries = 2

        def on_request_error(
            self, query: Any, consistency: Any, error: Any, retry_num: int
        ) -> tuple[Any, Any]:
            if (
                isinstance(error, ConnectionException)
                and retry_num < self.max_retries
                and getattr(query, "is_idempotent", False)
            ):
                return self.RETRY_NEXT_HOST, None
            return self.RETHROW, None

    return RetryOnAnotherCoordinator()


class Statements:
    """Every statement the store runs, prepared once on keyspace ``ks``.

    Every one is marked ``is_idempotent`` (the driver may send it to another
    coordinator when the connection to its own broke, ``_retry_policy``):
    reads, writes at explicit timestamps, and two lightweight transactions,
    ``own`` (run twice, the second finds its own node and token, which the
    store counts as taken) and ``release`` — but the claims and ``take``
    (run twice, one that applied looks lost).  No speculative execution for
    any: two coordinators running one ``own`` at once contend with each
    other, the stall of issue 17.  ``rows`` is the plain read of a
    partition, the benchmarks' peer (the store reads through ``fence``)."""

    _ONCE = frozenset({"claim_new", "claim", "take"})

    def __init__(self, session: Any, ks: str) -> None:
        p = session.prepare
        self.node = p(
            f"SELECT epoch, incarnation, released_at, pid, host FROM {ks}.nodes WHERE node = ?"
        )
        self.claim_new = p(
            f"INSERT INTO {ks}.nodes (node, epoch, incarnation, claimed_at, released_at, pid, host) "
            "VALUES (?, ?, ?, ?, null, ?, ?) IF NOT EXISTS"
        )
        self.claim = p(
            f"UPDATE {ks}.nodes SET epoch = ?, incarnation = ?, claimed_at = ?, released_at = null, "
            "pid = ?, host = ? WHERE node = ? IF incarnation = ?"
        )
        self.release = p(f"UPDATE {ks}.nodes SET released_at = ? WHERE node = ? IF epoch = ?")
        self.rows = p(
            "SELECT name, labels, ival, sval, created, kind, help, labelnames, buckets, "
            f"fingerprint, result, key_token, expires FROM {ks}.node_rows WHERE node = ?"
        )
        self.series_i = p(
            f"INSERT INTO {ks}.node_rows (node, name, labels, ival) VALUES (?, ?, ?, ?) USING TIMESTAMP ?"
        )
        self.series_s = p(
            f"INSERT INTO {ks}.node_rows (node, name, labels, sval) VALUES (?, ?, ?, ?) USING TIMESTAMP ?"
        )
        self.created_w = p(
            f"UPDATE {ks}.node_rows USING TIMESTAMP ? SET created = ? "
            "WHERE node = ? AND name = ? AND labels = ?"
        )
        self.family = p(
            f"INSERT INTO {ks}.node_rows (node, name, labels, kind, help, labelnames, buckets) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
        )
        self.key = p(
            f"INSERT INTO {ks}.node_rows (node, name, labels, fingerprint, result, key_token, expires) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) USING TTL ? AND TIMESTAMP ?"
        )
        self.own = p(
            f"INSERT INTO {ks}.key_owner (idem_key, node, incarnation, key_token) VALUES (?, ?, ?, ?) "
            "IF NOT EXISTS USING TTL ?"
        )
        self.take = p(
            f"UPDATE {ks}.key_owner USING TTL ? SET node = ?, incarnation = ?, key_token = ? "
            "WHERE idem_key = ? IF key_token = ?"
        )
        self.owner = p(
            f"SELECT node, incarnation, key_token FROM {ks}.key_owner WHERE idem_key = ?"
        )
        self.nodes = p(f"SELECT node, epoch, claimed_at, released_at FROM {ks}.nodes")
        for name, statement in vars(self).items():
            statement.is_idempotent = name not in self._ONCE


# Cassandra 5.0's defaults, stated: SSTables compressed in 16 KiB chunks,
# each with a CRC that every read checks, so a replica refuses a flipped
# byte rather than serving what it decodes (issue 18; an uncompressed table
# has no per-read check of its data).  A QUORUM read asks two replicas and
# fails if one of them fails, so a replica that refuses a corrupt chunk
# would make every restore of the nodes in it fail; node_rows reads ask
# all three at once (speculative_retry ALWAYS) and any two answers suffice
# (tests/integration/test_cassandra_corruption.py).
_CHECKED = (
    " WITH compression = {{'class': 'LZ4Compressor', 'chunk_length_in_kb': 16}}"
    " AND crc_check_chance = 1.0"
)
KEYSPACE = (
    "CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = "
    "{{'class': 'SimpleStrategy', 'replication_factor': {rf}}}"
)
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS {ks}.meta (name text PRIMARY KEY, val text)" + _CHECKED,
    "CREATE TABLE IF NOT EXISTS {ks}.nodes (node text PRIMARY KEY, epoch bigint, "
    "incarnation bigint, claimed_at double, released_at double, pid int, host text)" + _CHECKED,
    "CREATE TABLE IF NOT EXISTS {ks}.node_rows (node text, name text, labels text, ival bigint, "
    "sval text, created double, kind text, help text, labelnames text, buckets text, "
    "fingerprint text, result text, key_token text, expires double, "
    + "".join(f"{column} {kind}, " for column, kind in FENCE_COLUMNS.items())
    + "PRIMARY KEY (node, name, labels))"
    + _CHECKED
    + " AND speculative_retry = 'ALWAYS'",
    "CREATE TABLE IF NOT EXISTS {ks}.key_owner (idem_key text PRIMARY KEY, node text, "
    "incarnation bigint, key_token text)" + _CHECKED,
)


def _connection_class() -> Any:
    """The driver's reactor: libev when its extension is built (no warnings),
    else asyncio (asyncore, the driver's fallback, is deprecated in 3.11)."""
    try:
        from cassandra.io.libevreactor import LibevConnection

        return LibevConnection
    except ImportError:
        pass
    try:
        from cassandra.io.asyncioreactor import AsyncioConnection

        return AsyncioConnection
    except ImportError:  # pragma: no cover
        return None


def translate(exc: BaseException, context: str, *, write: bool = False) -> KeepcountError:
    """Driver errors -> keepcount errors (DESIGN: translated at the seam)."""
    import cassandra
    from cassandra.cluster import NoHostAvailable

    name = type(exc).__name__
    if isinstance(
        exc, cassandra.WriteTimeout | cassandra.WriteFailure | cassandra.OperationTimedOut
    ):
        if write or isinstance(exc, cassandra.WriteTimeout | cassandra.WriteFailure):
            return OutcomeUnknown(f"{context}: {name} ({exc}); outcome unknown, not acknowledged")
        return StoreUnavailable(f"{context}: {name} ({exc})")
    if isinstance(exc, cassandra.Unavailable | NoHostAvailable | cassandra.ReadTimeout
                  | cassandra.ReadFailure | cassandra.CoordinationFailure | OSError):  # fmt: skip
        return StoreUnavailable(f"{context}: {name} ({exc})")
    if isinstance(exc, cassandra.InvalidRequest):
        return CorruptStore(f"{context}: the keyspace does not match keepcount's schema ({exc})")
    return StoreUnavailable(f"{context}: {name} ({exc})")
