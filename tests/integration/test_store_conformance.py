"""The Store contract (stores/base.py), run against every backend on a real server."""

from __future__ import annotations

import pytest

from keepcount import ClaimConflict, Fenced, InvalidInput
from keepcount.stores.base import FamilyDef, Store

C = FamilyDef("c_total", "counter", "a counter", ("k",))
H = FamilyDef("h_seconds", "histogram", "a histogram", (), (0.5, float("inf")))


def test_claim_issues_growing_epochs(store: Store, other: Store) -> None:
    e1 = store.claim("node-1")
    store.release("node-1", e1)
    e2 = other.claim("node-1")
    assert e2 > e1
    other.release("node-1", e2)
    assert store.claim("node-1") > e2


def test_a_held_claim_is_exclusive(store: Store, other: Store) -> None:
    store.claim("node-1")
    with pytest.raises(ClaimConflict, match="node-1"):
        other.claim("node-1")
    other.claim("node-2")  # other ids are free


def test_an_older_coordinator_epoch_is_fenced(store: Store) -> None:
    assert store.claim("node-1", epoch=7) == 7
    store.release("node-1", 7)
    with pytest.raises(Fenced, match="epoch 3"):
        store.claim("node-1", epoch=3)


def test_invalid_node_ids_are_refused(store: Store) -> None:
    with pytest.raises(InvalidInput):
        store.claim("../x")


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


def test_writes_are_idempotent_absolute_values(store: Store) -> None:
    e = store.claim("node-1")
    for _ in range(3):
        store.write("node-1", e, [C], [("c_total", '["a"]', 5, 1.0)])
    store.write("node-1", e, [], [("c_total", '["a"]', 9, 2.0)])
    assert store.load("node-1").values["c_total"] == {'["a"]': 9}


def test_a_stale_epoch_cannot_overwrite_a_newer_one(store: Store, other: Store) -> None:
    old = store.claim("node-1", epoch=1)
    store.write("node-1", old, [C], [("c_total", '["a"]', 10, 1.0)])
    store.release("node-1", old)
    new = other.claim("node-1", epoch=2)
    other.write("node-1", new, [], [("c_total", '["a"]', 11, 1.0)])
    with pytest.raises(Fenced):
        store.write("node-1", old, [], [("c_total", '["a"]', 99, 1.0)])
    assert other.load("node-1").values["c_total"] == {'["a"]': 11}


def test_write_without_a_claim_is_refused(store: Store) -> None:
    with pytest.raises(Fenced):
        store.write("ghost", 1, [C], [("c_total", '["a"]', 1, 1.0)])
    assert store.load("ghost").series_count() == 0


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


def test_values_up_to_int64_max_survive(store: Store) -> None:
    e = store.claim("node-1")
    store.write("node-1", e, [C], [("c_total", '["max"]', 2**63 - 1, 1.0)])
    assert store.load("node-1").values["c_total"]['["max"]'] == 2**63 - 1
