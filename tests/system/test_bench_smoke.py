"""`keepcount bench all --quick` runs end to end and reports every benchmark.

Speed is not asserted here (benchmarks measure it, on a quiet machine);
this only checks that every benchmark ran against its peer and produced
positive figures, so the benchmarks cannot rot unnoticed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = ("inc", "durable", "restore", "flush", "http", "failover", "cassandra")
INSTALL = "run scripts/setup.sh (apt-get install redis-server redis-tools wrk)"


def _keepcount() -> list[str]:
    script = Path(sys.executable).with_name("keepcount")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from keepcount.cli import main; main()"]


def test_bench_all_quick_reports_every_benchmark(tmp_path: Path) -> None:
    for tool in ("redis-server", "redis-cli", "redis-benchmark", "wrk"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} not found: {INSTALL}")
    out = tmp_path / "b.json"
    proc = subprocess.run(
        [*_keepcount(), "bench", "all", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"

    doc = json.loads(out.read_text())
    assert doc["settings"]["quick"] is True
    assert doc["machine"]["nproc"] >= 1
    assert sorted(doc["benchmarks"]) == sorted(BENCHMARKS)
    for name in BENCHMARKS:
        result = doc["benchmarks"][name]
        assert result["comparisons"], name
        for c in result["comparisons"]:
            where = f"{name}: {c['measure']}"
            counted = c["unit"] == "errors"  # a count that may well be 0
            assert c["keepcount"] > 0 or (counted and c["keepcount"] == 0), where
            assert c["peer"] > 0, where
            assert c["ratio"] > 0 or (counted and c["ratio"] == 0), where
            assert c["peer_name"], where
            assert c["met"] in (True, False, None), where
    cassandra = {c["measure"]: c for c in doc["benchmarks"]["cassandra"]["comparisons"]}
    assert len(cassandra["open a new store"]["detail"]["ours"]) == 2  # --quick: 2 each


def test_bench_durable_reports_group_commit(tmp_path: Path) -> None:
    """The durable figure is backed by flushes that each acknowledged increments."""
    out = tmp_path / "d.json"
    proc = subprocess.run(
        [*_keepcount(), "bench", "durable", "--quick", "--duration", "0.2", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    notes = json.loads(out.read_text())["benchmarks"]["durable"]["notes"]
    assert notes["flushes"] > 0
    assert notes["increments"] >= notes["flushes"]
    assert notes["writers"] == 64


def test_bench_cassandra_scale_quick_measures_every_part(tmp_path: Path) -> None:
    """`keepcount bench cassandra-scale --quick`: restore of 1k and 10k series, flush,
    HTTP at 8 and 64 clients (keyed and not), kill -> ready and cluster totals,
    each against its peer, on a 1-node Cassandra cluster."""
    if shutil.which("wrk") is None:
        pytest.fail(f"wrk not found: {INSTALL}")
    out = tmp_path / "c.json"
    proc = subprocess.run(
        [*_keepcount(), "bench", "cassandra-scale", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    result = json.loads(out.read_text())["benchmarks"]["cassandra-scale"]
    comparisons = {c["measure"]: c for c in result["comparisons"]}
    for c in comparisons.values():
        assert c["keepcount"] > 0 and c["peer"] > 0 and c["ratio"] > 0, c["measure"]
        assert c["peer_name"], c["measure"]
    assert {"restore 1,000 series (open)", "restore 10,000 series (open)"} <= set(comparisons)
    http = [m for m in comparisons if m.startswith("HTTP increment p50")]
    assert len(http) == 4, http
    assert any(m.startswith("kill -> ready") for m in comparisons)
    assert sum(m.startswith("cluster totals") for m in comparisons) == 4
    targeted = [c for c in comparisons.values() if c["target"]]
    assert len(targeted) == 2 + 1 + 4, [c["measure"] for c in targeted]
    assert all(c["met"] in (True, False) for c in targeted)
    notes = result["notes"]
    assert notes["cassandra_nodes"] == 1 and notes["flushes"] > 0
    for point in notes["http"]:
        assert point["ok"] > 0 and point["flushes"] > 0, point


def test_bench_prometheus_quick_times_every_case_against_both_peers(tmp_path: Path) -> None:
    """`keepcount bench prometheus --quick`: every case timed against prometheus_client
    in memory (the targets) and in multiprocess mode (its child process answered)."""
    out = tmp_path / "p.json"
    proc = subprocess.run(
        [*_keepcount(), "bench", "prometheus", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    comparisons = json.loads(out.read_text())["benchmarks"]["prometheus"]["comparisons"]
    peers = {c["peer_name"] for c in comparisons}
    assert len(peers) == 2 and any("multiprocess" in p for p in peers), peers
    assert len(comparisons) == 3 * 8
    for c in comparisons:
        assert c["keepcount"] > 0 and c["peer"] > 0 and c["ratio"] > 0, c["measure"]
    targeted = [c["measure"] for c in comparisons if c["target"]]
    assert len(targeted) == 5, targeted
    assert all(c["met"] in (True, False) for c in comparisons if c["target"])


def test_bench_workers_quick_keeps_every_durable_count(tmp_path: Path) -> None:
    """`keepcount bench workers --quick`: gunicorn -w 2, sane figures, and keepcount
    durable still shows every acknowledged request after a SIGKILL of the whole server."""
    if shutil.which("wrk") is None:
        pytest.fail(f"wrk not found: {INSTALL}")
    if not Path(sys.executable).with_name("gunicorn").exists():
        pytest.fail("gunicorn not found next to the interpreter: run scripts/setup.sh")
    out = tmp_path / "w.json"
    proc = subprocess.run(
        [*_keepcount(), "bench", "workers", "--quick", "--backends",
         "multiprocess,keepcount-durable", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    result = json.loads(out.read_text())["benchmarks"]["workers"]
    assert result["notes"]["workers"] == 2
    rows = {r["backend"]: r for r in result["notes"]["rows"]}
    assert sorted(rows) == ["keepcount-durable", "multiprocess"]
    for backend, row in rows.items():
        assert row["req_s"] > 0, backend
        assert row["p50_ms"] > 0 and row["p99_ms"] >= row["p50_ms"], backend
        assert row["non_2xx"] == 0 and row["socket_errors"] == 0, backend
    durable = rows["keepcount-durable"]["crash"]
    assert durable["acknowledged"] == durable["sent"] > 0
    assert durable["after_restart"] == durable["acknowledged"], durable
    # prometheus_client's directory is wiped on restart, as its docs require.
    assert rows["multiprocess"]["crash"]["after_restart"] == 0
    assert any(c["target"] for c in result["comparisons"])
