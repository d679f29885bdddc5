"""The Store contract (stores/base.py), run against every backend on a real server."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from keepcount import ClaimConflict, Fenced, InvalidInput
from keepcount.errors import KeyConflict
from keepcount.stores import open_store
from keepcount.stores.base import FamilyDef, KeyRecord, SeriesRow, Store, check_kind

C = FamilyDef("c_total", "counter", "a counter", ("k",))
H = FamilyDef("h_seconds", "histogram", "a histogram", (), (0.5, float("inf")))
G = FamilyDef("g_live", "prometheus.gauge.livesum", "a prometheus gauge", ("k",))
PH = FamilyDef(
    "ph_seconds", "prometheus.histogram", "a prometheus histogram", ("k",), (0.1, 1.0, float("inf"))
)


@pytest.mark.g4
def test_claim_issues_growing_epochs(store: Store, other: Store) -> None:
    e1 = store.claim("node-1")
    store.release("node-1", e1)
    e2 = other.claim("node-1")
    assert e2 > e1
    other.release("node-1", e2)
    assert store.claim("node-1") > e2


@pytest.mark.g4
def test_a_held_claim_is_exclusive(store: Store, other: Store) -> None:
    store.claim("node-1")
    with pytest.raises(ClaimConflict, match="node-1"):
        other.claim("node-1")
    other.claim("node-2")  # other ids are free


@pytest.mark.g4
def test_an_older_coordinator_epoch_is_fenced(store: Store) -> None:
    assert store.claim("node-1", epoch=7) == 7
    store.release("node-1", 7)
    with pytest.raises(Fenced, match="epoch 3"):
        store.claim("node-1", epoch=3)


@pytest.mark.g6
def test_invalid_node_ids_are_refused(store: Store) -> None:
    with pytest.raises(InvalidInput):
        store.claim("../x")


@pytest.mark.g1
def test_write_then_load_round_trips(store: Store) -> None:
    e = store.claim("node-1")
    assert store.load("node-1").series_count() == 0
    store.write(
        "node-1",
        e,
        [C, H],
        [("c_total", '["a"]', 5, 100.0), ("h_seconds", "[]", "[1,0,0.25]", 100.0)],
    )
    snap = store.load("node-1")
    assert snap.families == {"c_total": C, "h_seconds": H}
    assert snap.values == {"c_total": {'["a"]': 5}, "h_seconds": {"[]": "[1,0,0.25]"}}


@pytest.mark.g2
def test_writes_are_idempotent_absolute_values(store: Store) -> None:
    e = store.claim("node-1")
    for _ in range(3):
        store.write("node-1", e, [C], [("c_total", '["a"]', 5, 1.0)])
    store.write("node-1", e, [], [("c_total", '["a"]', 9, 2.0)])
    assert store.load("node-1").values["c_total"] == {'["a"]': 9}


@pytest.mark.g4
def test_a_stale_epoch_cannot_overwrite_a_newer_one(store: Store, other: Store) -> None:
    old = store.claim("node-1", epoch=1)
    store.write("node-1", old, [C], [("c_total", '["a"]', 10, 1.0)])
    store.release("node-1", old)
    new = other.claim("node-1", epoch=2)
    other.write("node-1", new, [], [("c_total", '["a"]', 11, 1.0)])
    with pytest.raises(Fenced):
        store.write("node-1", old, [], [("c_total", '["a"]', 99, 1.0)])
    assert other.load("node-1").values["c_total"] == {'["a"]': 11}


@pytest.mark.g4
def test_a_newer_coordinator_epoch_takes_over_from_a_holder_that_never_released(
    store: Store, other: Store
) -> None:
    """A zombie: the old incarnation is paused, the coordinator gave its id to
    a new one; the store lets the new one in and fences the old one's writes."""
    old = store.claim("node-1", epoch=5)
    store.write("node-1", old, [C], [("c_total", '["a"]', 10, 1.0)])
    new = other.claim("node-1", epoch=9)
    assert other.load("node-1").values["c_total"] == {'["a"]': 10}
    other.write("node-1", new, [], [("c_total", '["a"]', 12, 1.0)])
    with pytest.raises(Fenced):
        store.write("node-1", old, [], [("c_total", '["a"]', 11, 1.0)])
    assert other.load("node-1").values["c_total"] == {'["a"]': 12}


@pytest.mark.g4
def test_a_stale_late_batch_changes_nothing_not_even_cells_the_new_one_left_alone(
    store: Store, other: Store
) -> None:
    """The old incarnation's batch arrives after the new one's claim: it must
    not overwrite the values the new one restored (though it has not written
    them since) nor add series the new one does not know."""
    old = store.claim("node-1", epoch=1)
    store.write("node-1", old, [C], [("c_total", '["a"]', 10, 1.0), ("c_total", '["b"]', 3, 1.0)])
    other.claim("node-1", epoch=2)
    with pytest.raises(Fenced):
        store.write(
            "node-1", old, [], [("c_total", '["a"]', 99, 1.0), ("c_total", '["z"]', 5, 1.0)]
        )
    assert other.load("node-1").values["c_total"] == {'["a"]': 10, '["b"]': 3}


@pytest.mark.g4
def test_a_third_claim_restores_what_the_second_restored_and_wrote_not_the_late_batch(
    store: Store, other: Store, store_url: str
) -> None:
    """A late batch of the first incarnation lands after the second's claim,
    before its first write (one series it rewrites, one it never does, one
    it does not know): the third claim restores the second's state exactly.
    (The Cassandra store's own interleavings, at every step of a claim, are
    in ``test_cassandra_fence.py``.)"""
    old = store.claim("node-1", epoch=1)
    store.write("node-1", old, [C], [("c_total", '["a"]', 10, 1.0), ("c_total", '["b"]', 3, 1.0)])
    new = other.claim("node-1", epoch=2)
    with pytest.raises(Fenced):
        store.write(
            "node-1",
            old,
            [],
            [
                ("c_total", '["a"]', 99, 1.0),
                ("c_total", '["b"]', 99, 1.0),
                ("c_total", '["z"]', 5, 1.0),
            ],
        )
    other.write("node-1", new, [], [("c_total", '["b"]', 4, 1.0)])
    other.release("node-1", new)
    third = open_store(store_url)
    try:
        assert third.claim("node-1", epoch=3) == 3
        assert third.load("node-1").values["c_total"] == {'["a"]': 10, '["b"]': 4}
    finally:
        third.close()


@pytest.mark.g4
def test_write_without_a_claim_is_refused(store: Store) -> None:
    with pytest.raises(Fenced):
        store.write("ghost", 1, [C], [("c_total", '["a"]', 1, 1.0)])
    assert store.load("ghost").series_count() == 0
    with pytest.raises(Fenced):  # values alone (a flush's usual shape) as well
        store.write("ghost", 1, [], [("c_total", '["a"]', 1, 1.0)])
    assert store.load("ghost").series_count() == 0


@pytest.mark.g5
def test_cluster_read_covers_every_node_even_released_ones(store: Store, other: Store) -> None:
    e1 = store.claim("node-1")
    e2 = other.claim("node-2")
    store.write("node-1", e1, [C], [("c_total", '["a"]', 1, 1.0), ("c_total", '["b"]', 2, 1.0)])
    other.write("node-2", e2, [C], [("c_total", '["a"]', 10, 1.0)])
    store.release("node-1", e1)
    snap = other.read_cluster()
    assert sorted(snap.rows) == [
        ("node-1", "c_total", '["a"]', 1), ("node-1", "c_total", '["b"]', 2),
        ("node-2", "c_total", '["a"]', 10),
    ]  # fmt: skip
    assert snap.families == {"node-1": {"c_total": C}, "node-2": {"c_total": C}}
    assert other.read_cluster("nothing").rows == []
    nodes = {n.node: n for n in other.nodes()}
    assert nodes["node-1"].released_at is not None and nodes["node-2"].released_at is None


@pytest.mark.g3
def test_help_updates_but_created_is_kept(store: Store) -> None:
    e = store.claim("node-1")
    store.write("node-1", e, [C], [("c_total", "[]", 1, 100.0)])
    store.write(
        "node-1",
        e,
        [FamilyDef("c_total", "counter", "new help", ("k",))],
        [("c_total", "[]", 2, 200.0)],
    )
    assert store.load("node-1").families["c_total"].help == "new help"
    assert store.load_created("node-1") == {"c_total": {"[]": 100.0}}
    assert store.load_created("nobody") == {}


@pytest.mark.g1
def test_values_up_to_int64_max_survive(store: Store) -> None:
    e = store.claim("node-1")
    store.write("node-1", e, [C], [("c_total", '["max"]', 2**63 - 1, 1.0)])
    assert store.load("node-1").values["c_total"]['["max"]'] == 2**63 - 1


# -- prometheus kinds (opaque JSON text) -------------------------------------------

# Exact text, whatever JSON it holds: a tombstone, a bare number (text, never
# turned into one), spacing and escapes as the writer chose them, non-finite
# values as strings.
PROMETHEUS_VALUES = {
    "g_live": {
        '["a"]': "[2.5,1700000000.25]",
        '["gone"]': "null",
        '["n"]': "5",
        '["s"]': '[ -0.0 , 1e300, "NaN", "-Inf" ]',
        '["u"]': '{"info": {"caf\\u00e9": "caf\u00e9"}, "at": 1.0}',
    },
    "ph_seconds": {
        '["x"]': '[1,0,2,"+Inf",1700000000.5]',
        '["gone"]': "null",
    },
}


def prometheus_rows() -> list[SeriesRow]:
    return [
        (name, labels, value, 100.0 + i)
        for name, series in PROMETHEUS_VALUES.items()
        for i, (labels, value) in enumerate(series.items())
    ]


@pytest.mark.g1
def test_prometheus_kinds_round_trip_as_exact_text(store: Store, other: Store) -> None:
    e = store.claim("node-1")
    store.write("node-1", e, [C, G, PH], [("c_total", '["a"]', 5, 1.0), *prometheus_rows()])
    for handle in (store, other):
        snap = handle.load("node-1")
        assert snap.families == {"c_total": C, "g_live": G, "ph_seconds": PH}
        assert snap.families["ph_seconds"].buckets == (0.1, 1.0, float("inf"))
        assert snap.families["g_live"].buckets == ()
        assert snap.values == {"c_total": {'["a"]': 5}, **PROMETHEUS_VALUES}
        assert all(type(v) is str for n in PROMETHEUS_VALUES for v in snap.values[n].values())
    created = other.load_created("node-1")
    assert created["g_live"] == {'["a"]': 100.0, '["gone"]': 101.0, '["n"]': 102.0,
                                 '["s"]': 103.0, '["u"]': 104.0}  # fmt: skip
    assert created["ph_seconds"] == {'["x"]': 100.0, '["gone"]': 101.0}
    cluster = other.read_cluster()
    assert cluster.families == {"node-1": {"c_total": C, "g_live": G, "ph_seconds": PH}}
    assert sorted(cluster.rows) == sorted(
        [("node-1", "c_total", '["a"]', 5)]
        + [
            ("node-1", n, k, v)
            for n, series in PROMETHEUS_VALUES.items()
            for k, v in series.items()
        ]
    )
    assert sorted(other.read_cluster("ph_seconds").rows) == sorted(
        ("node-1", "ph_seconds", k, v) for k, v in PROMETHEUS_VALUES["ph_seconds"].items()
    )


@pytest.mark.g3
def test_prometheus_values_are_restored_by_a_new_claim_and_overwritten_as_text(
    store: Store, other: Store
) -> None:
    e = store.claim("node-1", epoch=1)
    store.write("node-1", e, [G, PH], prometheus_rows())
    store.release("node-1", e)
    e2 = other.claim("node-1", epoch=2)  # checks every stored row of the node first
    assert other.load("node-1").values == PROMETHEUS_VALUES
    other.write("node-1", e2, [], [("g_live", '["a"]', "[3.5,1700000001.0]", 1.0),
                                   ("g_live", '["n"]', "null", 1.0)])  # fmt: skip
    values = store.load("node-1").values["g_live"]
    assert values['["a"]'] == "[3.5,1700000001.0]" and values['["n"]'] == "null"
    assert other.load_created("node-1")["g_live"]['["a"]'] == 100.0, "created is kept"


@pytest.mark.g6
def test_a_definition_of_an_invalid_kind_is_refused_and_nothing_is_written(store: Store) -> None:
    e = store.claim("node-1")
    for kind in ("gauge", "prometheus.Gauge", "prometheus.gauge.live.sum", "prometheus."):
        bad = FamilyDef("bad_total", kind, "", ())
        with pytest.raises(ValueError, match="kind"):
            check_kind(bad.kind)
        with pytest.raises(InvalidInput, match=f"kind '{kind}'"):
            store.write("node-1", e, [C, bad],
                        [("c_total", '["a"]', 1, 1.0), ("bad_total", "[]", "1", 1.0)])  # fmt: skip
    snap = store.load("node-1")
    assert snap.families == {} and snap.series_count() == 0
    assert store.read_cluster().rows == []


# -- idempotency keys -----------------------------------------------------------


def key(
    name: str, node: str = "node-1", *, expires: float | None = None, fp: str = "fp"
) -> KeyRecord:
    return KeyRecord(
        name, node, fp, f'{{"value":1,"key":"{name}"}}', f"token-{name}-{node}",
        time.time() + 3600 if expires is None else expires,
    )  # fmt: skip


@pytest.mark.g2
def test_keys_are_recorded_with_the_values_and_seen_store_wide(store: Store, other: Store) -> None:
    e = store.claim("node-1")
    k = key("k1")
    store.write("node-1", e, [C], [("c_total", '["a"]', 1, 1.0)], [k])
    assert store.lookup_key("k1") == k
    assert other.lookup_key("k1") == k, "keys are store-wide: any handle, any node sees them"
    assert store.lookup_key("k2") is None


@pytest.mark.g2
def test_a_recorded_key_refuses_the_whole_write(store: Store, other: Store) -> None:
    e1 = store.claim("node-1")
    e2 = other.claim("node-2")
    first = key("k1")
    store.write("node-1", e1, [C], [("c_total", '["a"]', 1, 1.0)], [first])
    with pytest.raises(KeyConflict) as conflict:
        other.write(
            "node-2",
            e2,
            [C],
            [("c_total", '["a"]', 7, 1.0)],
            [key("k0", "node-2"), key("k1", "node-2"), key("k2", "node-2")],
        )
    assert conflict.value.keys == ["k1"], "exactly the keys already recorded"
    assert store.load("node-2").series_count() == 0, "nothing of the refused write landed"
    assert store.lookup_key("k0") is None
    assert store.lookup_key("k2") is None
    assert store.lookup_key("k1") == first, "the first record stays"


@pytest.mark.g2
def test_an_expired_key_is_forgotten_and_replaced(store: Store) -> None:
    e = store.claim("node-1")
    old = key("k1", expires=time.time() - 1)
    store.write("node-1", e, [C], [("c_total", '["a"]', 1, 1.0)], [old])
    assert store.lookup_key("k1") is None, "an expired key is not returned"
    # A new increment under the expired key: a new delta, so a new token.
    # (With the old token, Cassandra's owner entry kept the old record's 1 s
    # TTL, and the lookup found no owner when the test took over 1 s.)
    new = replace(key("k1", fp="fp2"), token="token-k1-again")
    store.write("node-1", e, [C], [("c_total", '["a"]', 2, 1.0)], [new])
    assert store.lookup_key("k1") == new


@pytest.mark.g2
def test_expire_keys_deletes_only_expired_ones_up_to_the_limit(store: Store) -> None:
    e = store.claim("node-1")
    now = time.time()
    past = [key(f"old{i}", expires=now - 10) for i in range(5)]
    live = [key(f"new{i}", expires=now + 3600) for i in range(3)]
    store.write("node-1", e, [C], [("c_total", '["a"]', 1, 1.0)], past + live)
    if store.native_key_expiry:  # TTLs: nothing to sweep, and expired ones are gone
        assert store.expire_keys(now) == 0
    else:
        assert store.expire_keys(now, limit=3) == 3
        assert store.expire_keys(now) == 2
        assert store.expire_keys(now) == 0
    assert all(store.lookup_key(k.key) is None for k in past)
    assert all(store.lookup_key(k.key) == k for k in live)


@pytest.mark.g4
def test_a_fenced_write_records_no_keys(store: Store, other: Store) -> None:
    e1 = store.claim("node-1", epoch=1)
    store.release("node-1", e1)
    other.claim("node-1", epoch=2)  # a newer incarnation; the old handle writes late
    with pytest.raises(Fenced):
        store.write("node-1", e1, [C], [("c_total", '["a"]', 1, 1.0)], [key("k1")])
    assert other.lookup_key("k1") is None
