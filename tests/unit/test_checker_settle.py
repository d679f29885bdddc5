"""The checkers on histories with abandoned keyed adds settled by their key.

An ok ``settle`` is final: applied makes the add acknowledged (at the
settle's completion), not applied makes it failed (never counted).  Tiny
hand-written histories, as for the other checkers (``test_checker.py``).
"""

from __future__ import annotations

import pytest
from test_checker import KA, LA, H

from keepcount.verify.checker import check, counter, exactly_once, logical_adds


def settle(h: H, key: str, applied: bool | None, by: int = 1, p: int = 0) -> None:
    """Process ``p`` settles ``key``: ok applied / not applied, or info (None)."""
    value = {"labels": dict(LA), "by": by}
    h.op(p, "invoke", "settle", value, key=key)
    if applied is None:
        h.op(p, "info", "settle", value, key=key, error="200 in_flight")
    else:
        h.op(p, "ok", "settle", {**value, "applied": applied}, key=key)


def test_settled_applied_counts_as_acknowledged() -> None:
    h = H()
    h.add(key="k1", by=2)
    h.add(key="k2", by=3, outcome="info")  # abandoned
    settle(h, "k2", None, by=3)  # in flight: ask again
    settle(h, "k2", True, by=3)
    h.read({KA: 5})
    r = exactly_once(h.ops)
    assert r.valid is True, r.errors
    ls = r.details["label_sets"][KA]
    assert (ls["acknowledged"], ls["unresolved"], ls["status"]) == (5, 0, "exact")
    assert r.details["settled"] == {"applied": 1, "not_applied": 0}
    assert "1 applied, 0 not applied" in r.summary
    assert counter(h.ops).valid is True
    assert [la.outcome for la in logical_adds(h.ops)] == ["ok", "ok"]


def test_settled_applied_but_missing_from_the_final_read_is_lost() -> None:
    h = H()
    h.add(key="k1", by=2, outcome="info")
    settle(h, "k1", True, by=2)
    h.read({KA: 0})
    assert exactly_once(h.ops).details["label_sets"][KA]["status"] == "lost"
    assert counter(h.ops).valid is False


def test_settled_not_applied_counts_as_failed() -> None:
    h = H()
    h.add(key="k1")
    h.add(key="k2", by=3, outcome="info")
    settle(h, "k2", False, by=3)
    h.read({KA: 1})
    r = exactly_once(h.ops)
    assert r.valid is True, r.errors
    assert r.details["settled"] == {"applied": 0, "not_applied": 1}
    assert check(h.ops)["valid"].valid is True


@pytest.mark.parametrize("read_before_final", [False, True])
def test_an_add_landing_after_it_was_settled_not_applied_is_caught(
    read_before_final: bool,
) -> None:
    """The mutant's trace: settled not applied, counted all the same."""
    h = H()
    h.add(key="k1")
    h.add(key="k2", by=3, outcome="info")
    settle(h, "k2", False, by=3)
    if read_before_final:
        h.read({KA: 4})  # it landed after the settle: above every possible add
    h.read({KA: 4})
    r = exactly_once(h.ops)
    assert r.valid is False
    assert r.details["label_sets"][KA]["status"] == "double_count"
    c = counter(h.ops)
    assert c.valid is False and c.details["violations"][0]["kind"] == "phantom"


def test_settled_not_applied_after_an_acknowledgement_is_a_contradiction() -> None:
    h = H()
    h.add(key="k1", by=2, outcome="info")
    h.add(key="k1", by=2)  # the retry was acknowledged...
    settle(h, "k1", False, by=2)  # ... yet the key settles as never applied
    h.read({KA: 2})
    r = exactly_once(h.ops)
    assert r.valid is False and r.details["contradictions"] == 1
    assert r.errors[0].startswith("contradiction: key 'k1'")


def test_a_settle_of_no_known_add_is_a_malformed_history() -> None:
    h = H()
    h.add(key="k1")
    settle(h, "k-other", True)
    h.read({KA: 1})
    r = exactly_once(h.ops)
    assert r.valid is None and "no keyed add of key 'k-other'" in r.summary
