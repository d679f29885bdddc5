"""Family kinds: which ones a store holds, and the native views that skip the others."""

from __future__ import annotations

import math

import pytest

from keepcount.errors import InvalidInput
from keepcount.metrics import HistogramValue
from keepcount.stores.base import (
    ClusterSnapshot,
    FamilyDef,
    check_kind,
    has_buckets,
    is_native_kind,
)
from keepcount.totals import cluster_totals

VALID = (
    "counter", "histogram", "prometheus.counter", "prometheus.gauge.livesum",
    "prometheus.gauge.mostrecent", "prometheus.histogram", "prometheus.summary",
    "prometheus.info", "prometheus.stateset",
)  # fmt: skip


@pytest.mark.parametrize("kind", VALID)
def test_valid_kinds(kind: str) -> None:
    assert check_kind(kind) == kind
    assert is_native_kind(kind) == (kind in ("counter", "histogram"))
    assert has_buckets(kind) == (kind in ("histogram", "prometheus.histogram"))


@pytest.mark.g6
@pytest.mark.parametrize(
    "kind",
    ["", "gauge", "Counter", "counter ", "prometheus", "prometheus.", "prometheus..x",
     "prometheus.Gauge", "prometheus.gauge.", "prometheus.gauge.live.sum", "prometheus.gauge_sum",
     "prometheus.gauge1", "prometheus.gauge.live-sum", "xprometheus.gauge", " prometheus.counter",
     "prometheus.counter\n", "prometheus.é", None, 1],
)  # fmt: skip
def test_invalid_kinds_are_refused(kind: object) -> None:
    with pytest.raises(InvalidInput, match="unknown family kind") as e:
        check_kind(kind)
    assert isinstance(e.value, ValueError)
    assert not is_native_kind(kind)  # type: ignore[arg-type]


C = FamilyDef("c_total", "counter", "", ("k",))
H = FamilyDef("h_seconds", "histogram", "", (), (1.0, math.inf))
PC = FamilyDef("pc_total", "prometheus.counter", "", ("k",))
PH = FamilyDef("ph_seconds", "prometheus.histogram", "", (), (1.0, math.inf))


@pytest.mark.g5
def test_cluster_totals_skip_families_of_prometheus_kinds() -> None:
    snap = ClusterSnapshot(
        families={
            "node-1": {"c_total": C, "h_seconds": H, "pc_total": PC, "ph_seconds": PH},
            "node-2": {"c_total": C, "pc_total": PC},
            # the same name as node-1's counter, of a prometheus kind here
            "node-3": {"c_total": FamilyDef("c_total", "prometheus.counter", "", ("k",))},
        },
        rows=[
            ("node-1", "c_total", '["a"]', 2),
            ("node-1", "h_seconds", "[]", "[1,2,3.5]"),
            ("node-1", "pc_total", '["a"]', "[5.5,1700000000.0]"),
            ("node-1", "ph_seconds", "[]", '[1,0,"+Inf",1.0]'),
            ("node-2", "c_total", '["a"]', 3),
            ("node-2", "pc_total", '["a"]', "null"),
            ("node-3", "c_total", '["a"]', "[7.0,1.0]"),
        ],
    )
    totals = cluster_totals(snap)
    assert [(t.name, t.kind, t.labels, t.value, t.nodes) for t in totals] == [
        ("c_total", "counter", {"k": "a"}, 5, {"node-1": 2, "node-2": 3}),
        ("h_seconds", "histogram", {}, HistogramValue([1, 2], 3.5), {
            "node-1": HistogramValue([1, 2], 3.5)
        }),
    ]  # fmt: skip
    assert cluster_totals(ClusterSnapshot({"node-1": {"pc_total": PC}}, snap.rows[2:3])) == []
