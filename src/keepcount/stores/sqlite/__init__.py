"""The embedded store: one SQLite file, shared by any number of node ids on one host.

File format (``FORMAT_VERSION`` 4)
----------------------------------
An SQLite 3 database in WAL mode, identified by ``PRAGMA application_id =
0x6B636E74`` ("kcnt") and ``PRAGMA user_version = 4``, with these tables
(all ``STRICT``; all but ``meta`` and ``nodes`` ``WITHOUT ROWID``)::

    meta(key PRIMARY KEY, value)          format = keepcount, format_version = 4
    nodes(node PRIMARY KEY, epoch, claimed_at, released_at, pid, host)
    families(node, name, kind, help, labelnames, buckets, crc)   PRIMARY KEY (node, name)
    series(node, name, labels, value, created, crc)              PRIMARY KEY (node, name, labels)
    idempotency(key PRIMARY KEY, node, fingerprint, result, token, expires, crc)

``kind`` is ``counter``, ``histogram`` or a prometheus kind (``CHECK (kind IN
('counter', 'histogram') OR kind GLOB 'prometheus.*')``; ``stores.base``
says which prometheus kinds are valid); ``labels`` is the JSON array of label
values (``metrics.label_key``); ``buckets`` the JSON array of a histogram's
(or a ``prometheus.histogram``'s) finite upper bounds (+Inf implied), ``[]``
for other kinds; ``value`` is an INTEGER for a counter, the histogram
encoding (TEXT) for a histogram and the writer's JSON text, kept as it is,
for a prometheus kind; each row holds the node's *absolute* value, upserted
by flushes.  ``crc`` is the row's CRC-32 (``checksums``: what it covers
and why ``created`` and ``help`` are left out), written with the row and
checked by every read that returns it.

Older versions are upgraded in place on open, in one transaction, once the
file has passed every check below: version 1 lacks the ``idempotency`` table;
versions 1 and 2 allow only ``counter`` and ``histogram`` in
``families.kind``, and since SQLite cannot alter a ``CHECK`` the upgrade
rebuilds ``families`` (a new table, the rows copied, the old one dropped,
the new one renamed); versions 1 to 3 lack the ``crc`` columns, which the
upgrade adds and fills.  The upgrade is one way: an older keepcount refuses
a version-4 file (``CorruptStore``, format version).

Durability and safety
---------------------
- Every write is one ``BEGIN IMMEDIATE`` transaction committed with
  ``synchronous=FULL``: the WAL is fsynced before ``write()`` returns.
- The file is created whole or not at all: it is built under a temporary
  name, fsynced, hard-linked into place (never over an existing file) and its
  directory fsynced.  So an empty or headerless file at the path was never a
  keepcount store, and it is refused rather than reinitialised.
- On open the header, ``application_id``, ``user_version``, schema and
  ``PRAGMA quick_check`` are verified; any mismatch raises ``CorruptStore``
  naming the file.
- Flipped bits: a value changed on disk fails its row's checksum and is
  refused with ``CorruptStore`` naming the node and the series, by the
  load that restores a node and by the cluster-total and key reads, never
  served and never reset.  Before the first connection opens the file, the
  WAL is checked (``wal``): SQLite's own recovery would take a flipped
  frame for a torn tail and silently drop it and every later commit.  SQLite errors later on are translated: corruption ->
  ``CorruptStore``; busy, full, I/O -> ``StoreUnavailable`` (nothing written).
- A claim first checks every row of the node (types, definitions, histogram
  shapes, a prometheus kind's value being valid JSON text) and refuses a
  damaged node before it writes anything.
- A claim is an exclusive ``flock`` on ``<file>-locks/<node>.lock`` held for
  the claim's lifetime (the kernel drops it when the process dies, even on
  SIGKILL), plus an epoch in ``nodes`` that only grows.  Each write checks the
  epoch inside its transaction, so a stale handle can never overwrite a newer
  incarnation's values.  A claim with an epoch from a coordinator takes no
  lock: the coordinator keeps one holder per id, and the epoch fences a
  paused old incarnation that still runs.

Example::

    >>> store = SQLiteStore("/tmp/counters.db")            # doctest: +SKIP
    >>> epoch = store.claim("node-1")                      # doctest: +SKIP

Modules: ``schema`` (the file format: schema, checks at open, creation,
upgrades), ``checksums`` (the rows' checksums), ``wal`` (the WAL's check
before recovery), ``statements`` (the SQL run on a node's rows), ``locks``
(the claim and writer lock files) and ``store`` (``SQLiteStore``).
"""

from keepcount.stores.sqlite.schema import APPLICATION_ID, FORMAT_VERSION
from keepcount.stores.sqlite.store import DEFAULT_BUSY_TIMEOUT, SQLiteStore

__all__ = ["APPLICATION_ID", "DEFAULT_BUSY_TIMEOUT", "FORMAT_VERSION", "SQLiteStore"]
