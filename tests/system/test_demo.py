"""The README's first command runs `keepcount demo`: it must pass and write its
report, and the live page whose address it prints first must follow the
cluster while the demo kills nodes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.g1]

PAGE = re.compile(r"live page: (http://\S+/ui)\b")


def _get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=2) as resp:
        return resp.status, resp.read()


def test_demo_kills_and_pauses_nodes_and_the_tally_equals_the_totals(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "keepcount.cli", "demo", "--steady", "1", "--seed", "3",
         "--linger", "3", "--dir", str(tmp_path / "demo")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines: list[str] = []
    found = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if PAGE.search(line):
                found.set()
        found.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    docs: list[dict[str, Any]] = []
    after_verdict = 0  # answers from the page once the verdict was printed (--linger)
    page = b""
    try:
        assert found.wait(120), "the demo printed no live page address"
        match = next((m for line in lines if (m := PAGE.search(line))), None)
        assert match is not None, "".join(lines)
        url = match.group(1)
        # Watch the page's state while the demo runs (its cluster is up from
        # a few seconds after the address is printed until the demo ends).
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:
            verdict_shown = any(line.startswith("OK:") for line in lines)
            try:
                status, body = _get(f"{url}/state.json")
                if status == 200:
                    docs.append(json.loads(body))
                    after_verdict += verdict_shown
                if not page:
                    page = _get(url)[1]
            except OSError:  # not up yet, or already down
                pass
            time.sleep(0.5)  # the page's own poll is once a second
        proc.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(10)
    assert proc.stderr is not None and proc.stdout is not None
    proc.stdout.close()
    stderr = proc.stderr.read()
    proc.stderr.close()
    stdout = "".join(lines)
    assert proc.returncode == 0, stdout + stderr
    assert "OK: every acknowledged increment is in the cluster's totals" in stdout
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

    # The live page was served and followed the demo's faults.
    assert b"<title>keepcount</title>" in page
    assert len(docs) >= 10, f"only {len(docs)} answers from the live page"
    assert after_verdict >= 2, "the page stays up after the verdict with --linger"
    last = docs[-1]
    assert last["source"] == "cluster" and len(last["nodes"]) == 3
    assert any(d["counters"] for d in docs), "the page showed the demo's counters"
    seen = {h["state"] for n in last["nodes"] for h in n["history"]}
    assert {"down", "restoring", "ready"} <= seen, seen
    restarts = sum(n["restarts"] or 0 for n in last["nodes"])
    assert restarts >= len(report["faults"]), last["nodes"]
