"""The README's first command runs `keepcount demo`; it must pass and write its report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_demo_kills_restores_and_reports(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "keepcount.cli", "demo", "--kills", "3", "--writers", "8",
         "--dir", str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "OK: after 3 kills" in out.stdout
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert report["violations"] == []
    assert [r["ended_by"] for r in report["runs"]] == ["SIGKILL"] * 3 + ["SIGTERM (clean stop)"]
    assert [r["epoch"] for r in report["runs"]] == [1, 2, 3, 4]
    for w in report["writers"].values():
        assert 0 < w["acknowledged"] <= w["stored"] <= w["attempted"]
    assert (tmp_path / "demo" / "report.md").read_text().endswith("verdict: OK\n")
