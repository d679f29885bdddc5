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

Modules: ``client`` (the URL, the client library's clients, gRPC's
shutdown, error translation), ``layout`` (row keys, column families, cell
encodings), ``table`` (the schema at open, filters, conditional writes),
``keys`` (idempotency key owners) and ``store`` (``BigtableStore``).  The
claim bookkeeping, the clock and the fencing checks are
``keepcount.stores.lww``'s, shared with the Cassandra store.
"""

from keepcount.stores.bigtable.client import EMULATOR_ENV, BigtableURL, parse_url
from keepcount.stores.bigtable.layout import (
    FAMILIES,
    FORMAT_VERSION,
    GEN_BITS,
    KEY_GC_AGE,
    MAX_GEN,
    MAX_SEQ,
    SEQ_BITS,
)
from keepcount.stores.bigtable.store import MUTATIONS_PER_REQUEST, REQUEST_TIMEOUT, BigtableStore

__all__ = [
    "EMULATOR_ENV",
    "FAMILIES",
    "FORMAT_VERSION",
    "GEN_BITS",
    "KEY_GC_AGE",
    "MAX_GEN",
    "MAX_SEQ",
    "MUTATIONS_PER_REQUEST",
    "REQUEST_TIMEOUT",
    "SEQ_BITS",
    "BigtableStore",
    "BigtableURL",
    "parse_url",
]
