"""The Apache Cassandra store: ``cassandra://host1,host2,host3[:port]/keyspace``.

Layout (keyspace created with RF=3, or RF=1 with a warning on a one-node
development cluster)::

    meta(name PRIMARY KEY, val)                        format, format_version
    nodes(node PRIMARY KEY, epoch, incarnation,        claims (lightweight
          claimed_at, released_at, pid, host)          transactions, rare)
    node_rows(node, name, labels, ...,                 ONE PARTITION PER NODE:
              fence STATIC, parts STATIC,              families, series, keys,
              PRIMARY KEY (node, name, labels))        the claim's checkpoint
    key_owner(idem_key PRIMARY KEY, node,              which node recorded an
              incarnation, key_token)                  idempotency key (LWT)

In ``node_rows`` a family definition is the row ``(node, name, '\\x00')``, a
series ``(node, name, <label key>)`` (label keys are JSON arrays), an
idempotency key's record ``(node, '', <key>)``, a chunk of the last claim's
checkpoint ``(node, name, '\\x01<incarnation>:<chunk>')``.

**Writes are absolute values, last-write-wins by a logical clock** (DESIGN
§5).  Every flush of a node is one single-partition batch — atomic and
isolated in Cassandra — at QUORUM, every cell ``USING TIMESTAMP`` =
``incarnation << 32 | flush sequence``.  The incarnation is the store's own
claim counter (it only grows, one per claim, in the order of the claims'
epochs), so a newer incarnation's cells always win, whatever wall clocks say,
and a retried write (outcome unknown) is harmless.  Never counter columns:
a timed-out ``c = c + 1`` retried is counted twice (the benchmark compares).

**Fencing** (``fence``: the scheme, its read rule and the argument).
``claim`` takes a new incarnation with a lightweight transaction on
``nodes``, reads the partition at QUORUM, writes what it read as a
compressed *checkpoint* (a few rows per family, not one per series) and
then moves the partition's static ``fence`` to the new incarnation.  Every
read counts a cell older than the fence only through the checkpoint, so a
late batch of an older incarnation (a paused process, a write still in
flight, a hint replayed later) can change nothing.  A write that an older
incarnation had acknowledged reached a QUORUM before the claim and is in
the checkpoint (QUORUM reads and writes intersect).  After each batch the
writer reads its ``nodes`` row at QUORUM and raises ``Fenced`` if a newer
incarnation claimed meanwhile (its batch may be below the new fence), so it
is not acknowledged; with a coordinator's lease behind the claim
(``Store.vouch``) that read is skipped while the lease is trusted: one round
trip per flush.

**Idempotency keys** are recorded store-wide exactly once.  A key's record
lives in the writing node's partition, in the same batch as the values (so
it exists iff the counted value does); ``key_owner`` names that node.  A write
first takes ownership of each key with ``INSERT ... IF NOT EXISTS`` (one
lightweight transaction per *keyed* increment — never for plain ones).  A key
owned by another node counts as recorded if its record is in that node's
partition; if it is not, and that node's incarnation has moved on since
(the owner died before its batch, and the fence above means the batch can
never count), ownership is taken over.  A key row below its partition's
fence counts only if the claim wrote it again (live keys are rows, so a
lookup reads one row).  Keys expire with Cassandra TTLs.

Driver errors are translated at this seam: a write timeout is
``OutcomeUnknown`` (not acknowledged; the values stay dirty and are written
again), unavailable replicas or no host are ``StoreUnavailable``.

Modules: ``session`` (the URL, the driver's session, the keyspace and its
schema, prepared statements, error translation), ``fence`` (the claim's
checkpoint and the read rule) and ``store`` (``CassandraStore``).  The claim bookkeeping, the clock and the fencing
checks are ``keepcount.stores.lww``'s, shared with the Bigtable store.
"""

from keepcount.stores.cassandra.session import FORMAT_VERSION, parse_url
from keepcount.stores.cassandra.store import CassandraStore

__all__ = ["FORMAT_VERSION", "CassandraStore", "parse_url"]
