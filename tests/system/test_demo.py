"""The README's first command runs `keepcount demo`: it must pass and write its report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def test_demo_kills_and_pauses_nodes_and_the_tally_equals_the_totals(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "keepcount.cli", "demo", "--steady", "1", "--seed", "3",
         "--dir", str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "OK: every acknowledged increment is in the cluster's totals" in out.stdout
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert report["equal"] is True
    assert report["tally"] == report["totals"] and sum(report["tally"].values()) > 0
    assert [f["kind"] for f in report["faults"]] == ["kill", "pause", "kill", "kill"]
    for fault in report["faults"]:
        assert fault["ready"] is not None, fault
    (pause,) = [f for f in report["faults"] if f["kind"] == "pause"]
    assert pause["zombie_exit"] == 3, "the continued old process stopped by itself"
    assert sum(report["client_errors"].values()) == 0, report["client_errors"]
    assert (tmp_path / "demo" / "node_counters.png").stat().st_size > 10_000
    assert (tmp_path / "demo" / "report.md").read_text().endswith("verdict: OK\n")
