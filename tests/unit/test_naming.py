from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keepcount import InvalidInput
from keepcount.naming import (
    MAX_LABEL_VALUE_LENGTH,
    check_label_names,
    check_metric_name,
    check_node_id,
    label_value,
)

pytestmark = pytest.mark.g6
PROM_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


@pytest.mark.parametrize("name", ["a", "http_requests_total", "ns:sub_name", "_x", "A9"])
def test_valid_metric_names(name: str) -> None:
    assert check_metric_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "9lives", "has space", "dash-ed", "é", "x_bucket", "x_count", "x_sum", "x_created",
             None, 3, "a" * 201],
)  # fmt: skip
def test_invalid_metric_names_are_refused_with_the_name(name: object) -> None:
    with pytest.raises(InvalidInput) as e:
        check_metric_name(name)
    if isinstance(name, str) and len(name) < 50:
        assert repr(name)[:20] in str(e.value) or "longer" in str(e.value)


@given(st.text(max_size=30))
def test_metric_names_follow_prometheus(name: str) -> None:
    ok = bool(PROM_NAME.fullmatch(name)) and not name.endswith(
        ("_bucket", "_count", "_sum", "_created")
    )
    if ok:
        assert check_metric_name(name) == name
    else:
        with pytest.raises(InvalidInput):
            check_metric_name(name)


def test_label_names() -> None:
    assert check_label_names(["route", "status"]) == ("route", "status")
    for bad in (["__reserved"], ["a", "a"], ["9x"], ["a-b"], "route", [1]):
        with pytest.raises(InvalidInput):
            check_label_names(bad)
    with pytest.raises(InvalidInput, match="reserved"):
        check_label_names(["le"], reserved=("le",))


def test_label_values() -> None:
    assert label_value("status", "200") == "200"
    assert label_value("status", 200) == "200"
    assert label_value("route", "") == ""
    assert label_value("route", "ünï\ncode") == "ünï\ncode"
    for bad in (None, 1.5, True, b"x", object()):
        with pytest.raises(InvalidInput, match="status"):
            label_value("status", bad)
    with pytest.raises(InvalidInput, match="longer"):
        label_value("route", "x" * (MAX_LABEL_VALUE_LENGTH + 1))
    # A lone surrogate cannot be stored as UTF-8: refused up front, not at every flush.
    with pytest.raises(InvalidInput, match="surrogate"):
        label_value("route", "a\ud800b")


@pytest.mark.parametrize("node", ["node-1", "n", "web.3", "A_b-9"])
def test_valid_node_ids(node: str) -> None:
    assert check_node_id(node) == node


@pytest.mark.parametrize("node", ["", "-x", "../etc", "a/b", "a b", "x" * 64, None])
def test_invalid_node_ids(node: object) -> None:
    with pytest.raises(InvalidInput, match="node id"):
        check_node_id(node)
