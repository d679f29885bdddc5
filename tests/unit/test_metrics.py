from __future__ import annotations

import math
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keepcount import CardinalityError, Counter, InvalidInput
from keepcount.metrics import MAX_VALUE, HistogramValue, check_buckets, label_key


def counter(labelnames: list[str] | tuple[str, ...] = ("route", "status"), **kw: object) -> Counter:
    return Counter.standalone("http_requests_total", "Requests", labelnames, **kw)


@pytest.mark.g2
def test_inc_defaults_to_one_and_adds_integers() -> None:
    c = counter().labels("/", "200")
    c.inc()
    c.inc(41)
    assert c.value == 42


@pytest.mark.g6
@pytest.mark.parametrize("amount", [-1, 1.5, 1.0, "1", None, True, float("nan"), [1]])
def test_inc_refuses_bad_amounts_and_changes_nothing(amount: object) -> None:
    c = counter().labels("/", "200")
    c.inc(5)
    with pytest.raises(InvalidInput, match="amount"):
        c.inc(amount)  # type: ignore[arg-type]
    assert c.value == 5


def test_inc_accepts_integral_types() -> None:
    class Index:
        def __index__(self) -> int:
            return 7

    c = counter().labels("/", "200")
    c.inc(Index())  # type: ignore[arg-type]
    assert c.value == 7


@pytest.mark.g6
def test_overflow_past_int64_is_refused_and_changes_nothing() -> None:
    c = counter().labels("/", "200")
    c.inc(MAX_VALUE - 1)
    c.inc(1)
    with pytest.raises(InvalidInput, match="2\\*\\*63"):
        c.inc(1)
    assert c.value == MAX_VALUE


def test_labels_by_position_or_name_give_the_same_cached_child() -> None:
    fam = counter()
    a = fam.labels("/", "200")
    assert fam.labels(route="/", status="200") is a
    assert fam.labels(status="200", route="/") is a
    assert fam.labels("/", 200) is a  # ints are written in decimal, as prometheus_client does
    assert len(fam) == 1


@pytest.mark.g6
@pytest.mark.parametrize(
    ("args", "kwargs"),
    [(("/",), {}), (("/", "200", "x"), {}), ((), {"route": "/"}), ((), {"route": "/", "code": "2"}),
     (("/",), {"status": "200"}), (("/", None), {}), (("/", 2.5), {})],
)  # fmt: skip
def test_bad_label_sets_are_refused(args: tuple[object, ...], kwargs: dict[str, object]) -> None:
    fam = counter()
    with pytest.raises(InvalidInput):
        fam.labels(*args, **kwargs)
    assert len(fam) == 0


def test_family_without_labels_counts_directly() -> None:
    fam = counter(labelnames=())
    fam.inc(3)
    assert fam.value == 3
    with pytest.raises(InvalidInput, match="labels"):
        counter().inc()


@pytest.mark.g6
def test_child_limit_stops_label_explosions_with_a_clear_error() -> None:
    fam = counter(max_children=3)
    for i in range(3):
        fam.labels(f"/{i}", "200").inc()
    with pytest.raises(CardinalityError, match="3 label sets"):
        fam.labels("/new", "200")
    fam.labels("/1", "200").inc()  # existing label sets keep working
    assert len(fam) == 3


@pytest.mark.g2
def test_inc_is_thread_safe() -> None:
    child = counter().labels("/", "200")
    threads = [
        threading.Thread(target=lambda: [child.inc(3) for _ in range(20_000)]) for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert child.value == 8 * 20_000 * 3


@pytest.mark.g2
@given(st.lists(st.integers(min_value=0, max_value=2**40), max_size=50))
def test_value_is_the_sum_of_increments(amounts: list[int]) -> None:
    child = counter().labels("/", "200")
    for a in amounts:
        child.inc(a)
    assert child.value == sum(amounts)


@given(st.lists(st.text(max_size=20), min_size=0, max_size=4))
def test_label_keys_round_trip(values: list[str]) -> None:
    from keepcount.metrics import decode_label_key

    assert decode_label_key(label_key(tuple(values))) == tuple(values)


@pytest.mark.g6
def test_bucket_validation() -> None:
    assert check_buckets([1, 2]) == (1.0, 2.0, math.inf)
    assert check_buckets([0.5, math.inf]) == (0.5, math.inf)
    for bad in ([2, 1], [1, 1], ["x"], [], [math.nan]):
        with pytest.raises(InvalidInput):
            check_buckets(bad)


def test_histogram_counts_observations_into_le_buckets() -> None:
    from keepcount.metrics import Histogram, _Shared, histogram_def

    fam = Histogram(
        _Shared(threading.Lock(), [], []), histogram_def("lat_seconds", "", ["r"], [0.1, 1]),
        max_children=None,
    )  # fmt: skip
    h = fam.labels("/")
    for v in (0.05, 0.1, 0.5, 1, 7, -1):
        h.observe(v)
    assert h.value.counts == [3, 2, 1]  # le=0.1 holds 0.05, 0.1 and -1
    assert h.value.cumulative() == [3, 5, 6]
    assert h.value.count == 6
    assert h.value.sum == pytest.approx(7.65)
    for bad in (math.nan, math.inf, "x", None, True):
        with pytest.raises(InvalidInput, match="observation"):
            h.observe(bad)  # type: ignore[arg-type]
    assert h.value.count == 6
    h.observe(1e308)
    with pytest.raises(InvalidInput, match="overflows the sum"):
        h.observe(1e308)
    assert h.value.count == 7


@given(st.lists(st.integers(0, 1000), max_size=20), st.floats(-1e9, 1e9))
def test_histogram_value_encoding_round_trips(counts: list[int], total: float) -> None:
    v = HistogramValue(counts, total)
    assert HistogramValue.decode(v.encode(), len(counts)) == v
