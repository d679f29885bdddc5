"""``/metrics`` on a real SQLite store, read back with prometheus_client's own parsers."""

from __future__ import annotations

import gc
import logging
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from prometheus_client import parser as text_parser
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics import parser as openmetrics_parser

import keepcount
from keepcount import exposition
from keepcount.exposition import (
    NODE_METRIC_NAMES,
    KeepcountCollector,
    collector_registry,
    exposed_names,
    render,
)

OPENMETRICS = "application/openmetrics-text; version=1.0.0"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
Parser = Callable[[str], Iterable[Metric]]
parse_text: Parser = text_parser.text_string_to_metric_families
parse_openmetrics: Parser = openmetrics_parser.text_string_to_metric_families

FORMATS = [
    pytest.param(None, parse_text, id="text-0.0.4"),
    pytest.param(OPENMETRICS, parse_openmetrics, id="openmetrics-1.0"),
]


def scrape(
    reg: keepcount.Registry, accept: str | None, parse: Parser, *, node_metrics: bool = False
) -> tuple[dict[str, Metric], Samples]:
    """Families by name and every sample by (name, labels), as a scraper reads
    them, once everything incremented is durable (what is exposed)."""
    reg.commit_sync()
    body, _ = render(reg, accept, node_metrics=node_metrics)
    families = {f.name: f for f in parse(body.decode("utf-8"))}
    samples: Samples = {}
    for family in families.values():
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = s.value
    return families, samples


def lbl(**labels: str) -> frozenset[tuple[str, str]]:
    return frozenset(labels.items())


def reopen(db_url: str) -> keepcount.Registry:
    return keepcount.open(db_url, node="node-1", flush_interval=None)


# -- counters and histograms ---------------------------------------------------


@pytest.mark.parametrize(("accept", "parse"), FORMATS)
def test_counter_samples_are_the_metric_name_plus_what_the_format_requires(
    reg: keepcount.Registry, accept: str | None, parse: Parser
) -> None:
    hits = reg.counter("http_requests_total", "Requests", ["route", "status"])
    ok = hits.labels(route="/", status="200")
    ok.inc(41)
    err = hits.labels("/", 500)
    err.inc()
    jobs = reg.counter("jobs", "Jobs")  # no _total: the formats add it
    jobs.inc(7)
    reg.commit_sync()

    families, samples = scrape(reg, accept, parse)

    assert samples == {
        ("http_requests_total", lbl(route="/", status="200")): 41,
        ("http_requests_created", lbl(route="/", status="200")): ok.created,
        ("http_requests_total", lbl(route="/", status="500")): 1,
        ("http_requests_created", lbl(route="/", status="500")): err.created,
        ("jobs_total", lbl()): 7,
        ("jobs_created", lbl()): jobs.labels().created,
    }
    assert families["http_requests"].type == "counter"
    assert families["http_requests"].documentation == "Requests"
    assert families["jobs"].type == "counter"


@pytest.mark.parametrize(("accept", "parse"), FORMATS)
def test_histogram_buckets_are_cumulative_with_sum_count_and_created(
    reg: keepcount.Registry, accept: str | None, parse: Parser
) -> None:
    lat = reg.histogram("latency_seconds", "Latency", ["route"], buckets=[0.005, 0.1, 1, 10])
    child = lat.labels(route="/")
    for v in (0.001, 0.05, 0.07, 0.5, 3, 30):
        child.observe(v)
    reg.commit_sync()

    families, samples = scrape(reg, accept, parse)

    route = {"route": "/"}
    assert families["latency_seconds"].type == "histogram"
    assert samples == {
        ("latency_seconds_bucket", lbl(le="0.005", **route)): 1,
        ("latency_seconds_bucket", lbl(le="0.1", **route)): 3,
        ("latency_seconds_bucket", lbl(le="1.0", **route)): 4,
        ("latency_seconds_bucket", lbl(le="10.0", **route)): 5,
        ("latency_seconds_bucket", lbl(le="+Inf", **route)): 6,
        ("latency_seconds_count", lbl(**route)): 6,
        ("latency_seconds_sum", lbl(**route)): pytest.approx(33.621),
        ("latency_seconds_created", lbl(**route)): child.created,
    }
    assert child.value.cumulative() == [1, 3, 4, 5, 6]


def test_histogram_with_negative_bounds_has_no_sum_or_count(reg: keepcount.Registry) -> None:
    temp = reg.histogram("temperature_celsius", "Temperature", buckets=[-10, 0, 10])
    temp.observe(-20)
    temp.observe(5)
    _, samples = scrape(reg, OPENMETRICS, parse_openmetrics)
    assert {name for name, _ in samples} == {
        "temperature_celsius_bucket",
        "temperature_celsius_created",
    }
    assert samples[("temperature_celsius_bucket", lbl(le="+Inf"))] == 2


@pytest.mark.parametrize(("accept", "parse"), FORMATS)
def test_label_values_and_help_round_trip_through_escaping(
    reg: keepcount.Registry, accept: str | None, parse: Parser
) -> None:
    tricky = ['say "hi"', "back\\slash", "new\nline", "ünïcødé ✓ 日本", "\\n not a newline", ""]
    help_text = 'Help with "quotes", a \\ backslash\nand a newline'
    fam = reg.counter("tricky_total", help_text, ["v"])
    for i, value in enumerate(tricky, start=1):
        fam.labels(v=value).inc(i)

    families, samples = scrape(reg, accept, parse)

    assert families["tricky"].documentation == help_text
    totals = {
        dict(labels)["v"]: v for (name, labels), v in samples.items() if name.endswith("_total")
    }
    assert totals == {value: i for i, value in enumerate(tricky, start=1)}


@pytest.mark.parametrize(("accept", "parse"), FORMATS)
def test_colon_names_are_exposed_unchanged(
    reg: keepcount.Registry, accept: str | None, parse: Parser
) -> None:
    # prometheus_client 0.26 alone would write "job_hits_total" in OpenMetrics.
    reg.counter("job:hits_total", "Recording-rule style name").inc(2)
    _, samples = scrape(reg, accept, parse)
    assert samples[("job:hits_total", lbl())] == 2
    assert ("job:hits_created", lbl()) in samples


# -- restarts ------------------------------------------------------------------


@pytest.mark.g3
def test_restored_untouched_series_appear_with_value_and_created(db_url: str) -> None:
    with reopen(db_url) as reg:
        hits = reg.counter("http_requests_total", "Requests", ["route"])
        hits.labels("/a").inc(5)
        hits.labels("/b").inc(2)
        lat = reg.histogram("latency_seconds", "Latency", buckets=[0.1, 1])
        lat.observe(0.5)
        created = {c.labelvalues: c.created for c in (hits.labels("/a"), hits.labels("/b"))}
        lat_created = lat.labels().created

    with reopen(db_url) as reg:  # nothing declared, nothing touched
        for accept, parse in ((None, parse_text), (OPENMETRICS, parse_openmetrics)):
            families, samples = scrape(reg, accept, parse)
            assert samples[("http_requests_total", lbl(route="/a"))] == 5
            assert samples[("http_requests_total", lbl(route="/b"))] == 2
            assert samples[("http_requests_created", lbl(route="/a"))] == created[("/a",)]
            assert samples[("http_requests_created", lbl(route="/b"))] == created[("/b",)]
            assert samples[("latency_seconds_bucket", lbl(le="1.0"))] == 1
            assert samples[("latency_seconds_count", lbl())] == 1
            assert samples[("latency_seconds_sum", lbl())] == 0.5
            assert samples[("latency_seconds_created", lbl())] == lat_created
            assert families["http_requests"].documentation == "Requests"


@pytest.mark.g3
def test_children_touched_before_created_times_load_get_them(db_url: str) -> None:
    """Created times load in the background after open(); a child made from a
    restored series before (or after) they arrive ends up with its own."""
    with reopen(db_url) as reg:
        fam = reg.counter("jobs_total", "", ["q"])
        first = {q: fam.labels(q).inc() or fam.labels(q).created for q in ("a", "b", "c")}
    with reopen(db_url) as reg:
        fam = reg.counter("jobs_total", "", ["q"])
        early = fam.labels("a")  # most likely before the background read ended
        assert reg.wait_created(30)
        assert early.created == first["a"]
        assert fam.labels("b").created == first["b"]
        assert {v: c for v, _, c in fam.series()} == {(q,): t for q, t in first.items()}


@pytest.mark.g3
@pytest.mark.parametrize(("accept", "parse"), FORMATS)
def test_created_is_the_same_across_a_restart_and_values_never_reset(
    db_url: str, accept: str | None, parse: Parser
) -> None:
    with reopen(db_url) as reg:
        hits = reg.counter("http_requests_total", "Requests", ["route"])
        hits.labels("/").inc(3)
        reg.histogram("latency_seconds", "Latency", buckets=[0.1, 1]).observe(0.2)
        reg.commit_sync()
        _, before = scrape(reg, accept, parse)
        body_before, _ = render(reg, accept, node_metrics=False)

    with reopen(db_url) as reg:
        # Restored and untouched: byte for byte what the last incarnation showed.
        assert render(reg, accept, node_metrics=False)[0] == body_before
        child = reg.counter("http_requests_total", "Requests", ["route"]).labels("/")
        hist = reg.histogram("latency_seconds", "Latency", buckets=[0.1, 1]).labels()
        child.inc()
        hist.observe(2)
        reg.commit_sync()
        _, after = scrape(reg, accept, parse)
        assert after[("http_requests_created", lbl(route="/"))] == child.created
        assert after[("latency_seconds_created", lbl())] == hist.created

    assert after.keys() == before.keys()
    for key, value in before.items():
        if key[0].endswith("_created"):
            assert after[key] == value, key
        else:
            assert after[key] >= value, key
    assert after[("http_requests_total", lbl(route="/"))] == 4
    assert after[("latency_seconds_count", lbl())] == 2


# -- node gauges ---------------------------------------------------------------


@pytest.mark.parametrize(("accept", "parse"), FORMATS)
def test_node_gauges_describe_this_process(db_url: str, accept: str | None, parse: Parser) -> None:
    with reopen(db_url) as reg:
        reg.counter("hits_total").inc()
        reg.commit_sync()
        epoch = reg.epoch
    with reopen(db_url) as reg:
        reg.counter("other_total", "", ["x"]).labels("1").inc()
        reg.commit_sync()
        families, samples = scrape(reg, accept, parse, node_metrics=True)
        assert samples[("keepcount_node_info", lbl(node="node-1"))] == 1
        assert samples[("keepcount_epoch", lbl())] == epoch + 1 == reg.epoch
        assert samples[("keepcount_restored_series", lbl())] == 1
        assert samples[("keepcount_restore_seconds", lbl())] == reg.restore_seconds > 0
        assert samples[("keepcount_process_flushes", lbl())] == reg.flushes >= 1
        assert samples[("keepcount_fenced", lbl())] == 0
        assert samples[("keepcount_series", lbl())] == 2
    for name in ("keepcount_epoch", "keepcount_process_flushes", "keepcount_series"):
        assert families[name].type == "gauge"  # process-local: may go down, so never a counter
    assert not any(f.type == "counter" for n, f in families.items() if n.startswith("keepcount_"))


def test_node_gauges_can_be_left_out(reg: keepcount.Registry) -> None:
    reg.counter("hits_total").inc()
    for accept, parse in ((None, parse_text), (OPENMETRICS, parse_openmetrics)):
        families, _ = scrape(reg, accept, parse, node_metrics=False)
        assert set(families) <= {"hits", "hits_created"}


def test_a_user_family_wins_over_a_node_gauge_of_the_same_name(
    reg: keepcount.Registry, caplog: pytest.LogCaptureFixture
) -> None:
    reg.counter("keepcount_epoch", "Mine", ["k"]).labels("v").inc(9)
    with caplog.at_level(logging.WARNING, logger="keepcount.exposition"):
        families, samples = scrape(reg, OPENMETRICS, parse_openmetrics, node_metrics=True)
    assert families["keepcount_epoch"].documentation == "Mine"
    assert samples[("keepcount_epoch_total", lbl(k="v"))] == 9
    assert ("keepcount_epoch", lbl()) not in samples
    assert ("keepcount_process_flushes", lbl()) in samples  # the other gauges stay
    assert "not exposing keepcount_epoch" in caplog.text


@pytest.mark.parametrize(("accept", "parse"), FORMATS)
def test_families_that_would_share_sample_names_are_not_both_exposed(
    reg: keepcount.Registry, caplog: pytest.LogCaptureFixture, accept: str | None, parse: Parser
) -> None:
    reg.counter("foo", "bare").inc(1)
    reg.counter("foo_total", "suffixed").inc(2)
    reg.histogram("bar", "histogram", buckets=[1]).observe(0.5)
    reg.counter("bar_total", "counter").inc(3)
    with caplog.at_level(logging.WARNING, logger="keepcount.exposition"):
        families, samples = scrape(reg, accept, parse)  # parses: no clash in the text
        scrape(reg, accept, parse)
    assert samples[("foo_total", lbl())] == 1  # first in name order
    assert families["foo"].documentation == "bare"
    assert families["bar"].type == "histogram"
    assert caplog.text.count("not exposing foo_total") == 1  # once, not every scrape
    assert caplog.text.count("not exposing bar_total") == 1


def test_exposed_names() -> None:
    assert exposed_names("counter", "a_total") == {"a", "a_total", "a_created"}
    assert exposed_names("counter", "a") == {"a", "a_total", "a_created"}
    assert exposed_names("histogram", "h") == {"h", "h_bucket", "h_count", "h_sum", "h_created"}
    assert exposed_names("gauge", "g") == {"g"}
    assert "keepcount_epoch" in NODE_METRIC_NAMES


# -- negotiation -----------------------------------------------------------------

PROMETHEUS_2_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)
PROMETHEUS_3_ACCEPT = (
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.5,"
    "application/openmetrics-text;version=0.0.1;q=0.4,"
    "text/plain;version=1.0.0;escaping=allow-utf-8;q=0.3,text/plain;version=0.0.4;q=0.2,*/*;q=0.1"
)


@pytest.mark.parametrize(
    ("accept", "content_type"),
    [
        (OPENMETRICS, "application/openmetrics-text; version=1.0.0; charset=utf-8"),
        (
            "application/openmetrics-text",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
        (PROMETHEUS_2_ACCEPT, "application/openmetrics-text; version=1.0.0; charset=utf-8"),
        (PROMETHEUS_3_ACCEPT, "application/openmetrics-text; version=1.0.0; charset=utf-8"),
        (None, "text/plain; version=0.0.4; charset=utf-8"),
        ("", "text/plain; version=0.0.4; charset=utf-8"),
        ("*/*", "text/plain; version=0.0.4; charset=utf-8"),
        ("text/plain", "text/plain; version=0.0.4; charset=utf-8"),
        ("text/plain; version=0.0.4", "text/plain; version=0.0.4; charset=utf-8"),
        ("application/json", "text/plain; version=0.0.4; charset=utf-8"),
        ("application/openmetrics-text; version=0.0.1", "text/plain; version=0.0.4; charset=utf-8"),
    ],
)
def test_negotiation(reg: keepcount.Registry, accept: str | None, content_type: str) -> None:
    reg.counter("job:hits_total", "Hits", ["route"]).labels("/").inc(3)
    reg.commit_sync()
    body, got = render(reg, accept)
    assert got.startswith(content_type)
    text = body.decode("utf-8")
    if content_type.startswith("application/openmetrics-text"):
        assert text.endswith("# EOF\n")
        families = {f.name: f for f in parse_openmetrics(text)}
    else:
        assert "# EOF" not in text
        families = {f.name: f for f in parse_text(text)}
    assert families["job:hits"].samples[0].name == "job:hits_total"
    assert families["job:hits"].samples[0].value == 3


# -- the prometheus_client registry ----------------------------------------------


def test_collector_registry_is_cached_per_registry_and_never_the_global_one(
    db_url: str, tmp_path: Path
) -> None:
    with reopen(db_url) as reg, keepcount.open(f"sqlite:///{tmp_path}/b.db", node="n2") as other:
        cr = collector_registry(reg)
        assert collector_registry(reg) is cr
        assert collector_registry(reg, node_metrics=False) is not cr
        assert collector_registry(other) is not cr
        assert cr is not REGISTRY
        before = list(REGISTRY.collect())
        render(reg, None)
        assert [m.name for m in REGISTRY.collect()] == [m.name for m in before]


def test_the_cache_does_not_keep_a_closed_registry_alive(db_url: str) -> None:
    reg = reopen(db_url)
    reg.counter("hits_total").inc()
    render(reg, OPENMETRICS)
    reg.close()
    assert reg in exposition._cache
    gone = weakref.ref(reg)
    del reg
    gc.collect()
    assert gone() is None


def test_the_collector_works_in_any_prometheus_client_registry(reg: keepcount.Registry) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    reg.counter("hits_total", "Hits").inc(4)
    reg.commit_sync()
    cr = CollectorRegistry(auto_describe=False)
    cr.register(KeepcountCollector(reg, node_metrics=False))
    families = {f.name: f for f in parse_text(generate_latest(cr).decode())}
    assert families["hits"].samples[0].value == 4


@pytest.mark.g3
def test_only_durable_values_are_exposed(reg: keepcount.Registry) -> None:
    """DESIGN G3: an exposed value never goes backwards across a restart, so
    what is exposed is what the store holds for sure — not an increment still
    in memory, which a kill -9 would take back."""
    hits = reg.counter("hits_total", "Hits", ["route"])
    lat = reg.histogram("latency_seconds", "Latency", buckets=[1])
    hits.labels("/").inc(2)
    lat.observe(0.5)
    reg.commit_sync()
    hits.labels("/").inc(5)  # in memory only
    lat.observe(0.7)
    body, _ = render(reg, None, node_metrics=False)
    families = {f.name: f for f in parse_text(body.decode())}
    assert families["hits"].samples[0].value == 2
    assert {s.name: s.value for s in families["latency_seconds"].samples}[
        "latency_seconds_count"
    ] == 1
    assert hits.labels("/").value == 7, "the in-memory value is still there for the application"
    reg.commit_sync()
    body, _ = render(reg, None, node_metrics=False)
    families = {f.name: f for f in parse_text(body.decode())}
    assert families["hits"].samples[0].value == 7
