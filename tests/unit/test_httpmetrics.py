"""The middleware's shared pieces: bounded labels and the pending bound."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keepcount import InvalidInput
from keepcount.httpmetrics import PendingBound, method_label


def test_methods_outside_the_standard_set_are_other() -> None:
    assert [method_label(m) for m in ("GET", "PATCH", "get", "BREW", "")] == [
        "GET", "PATCH", "OTHER", "OTHER", "OTHER",
    ]  # fmt: skip


@pytest.mark.g1
def test_durable_mode_always_waits() -> None:
    bound = PendingBound(0)
    marks = [bound.counted() for _ in range(3)]
    assert marks == [1, 2, 3]


@pytest.mark.g6
@pytest.mark.parametrize("bad", [-1, 1.5, "3", None])
def test_max_pending_is_a_non_negative_int(bad: object) -> None:
    with pytest.raises(InvalidInput):
        PendingBound(bad)  # type: ignore[arg-type]


@given(
    max_pending=st.integers(0, 4),
    ops=st.lists(st.one_of(st.just("count"), st.integers(0, 50)), max_size=80),
)
def test_never_more_than_max_pending_started_undurable(max_pending: int, ops: list[object]) -> None:
    """Responses arrive ("count") and waiting commits finish in any order (an int
    picks one); at every step, the responses that started while not yet
    covered by a finished commit number at most ``max_pending``."""
    bound = PendingBound(max_pending)
    started: list[int] = []  # responses that started without waiting
    waiting: list[int] = []  # marks of responses waiting for their commit
    durable = 0  # highest mark whose commit finished
    n = 0
    for op in ops:
        if op == "count":
            n += 1
            mark = bound.counted()
            if mark is None:
                started.append(n)
            else:
                assert mark == n
                waiting.append(mark)
        elif waiting:
            assert isinstance(op, int)
            mark = waiting.pop(op % len(waiting))
            bound.committed(mark)
            durable = max(durable, mark)
        assert sum(1 for i in started if i > durable) <= max_pending
        assert bound.pending == n - durable
