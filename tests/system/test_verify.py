"""`keepcount verify` end to end: a short run that must pass, and a mutant that must fail.

The long soaks (VERIFY.md) run outside CI; these keep the verifier honest:
the first shows a healthy cluster judged valid under kills and pauses, the
second that the checkers really catch data loss — nodes that acknowledge an
increment before it is durable lose acknowledged increments when killed,
and the run must be judged invalid.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def verify(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    out = subprocess.run(
        [sys.executable, "-m", "keepcount.cli", "verify", "--dir", str(tmp_path / "v"), *args],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    results = tmp_path / "v" / "results.json"
    doc = json.loads(results.read_text()) if results.exists() else {}
    return out, doc


@pytest.mark.g1
def test_a_short_run_with_kills_and_pauses_is_valid(tmp_path: Path) -> None:
    out, doc = verify(tmp_path, "--duration", "40", "--faults", "kill,pause", "--seed", "7",
                      "--quiet", "3")  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "verdict: VALID" in out.stdout
    assert doc["valid"] is True
    assert len(doc["faults"]) >= 3, doc["faults"]
    kinds = {f["kind"] for f in doc["faults"]}
    assert kinds == {"kill", "pause"}, kinds
    for name in ("counter", "exactly_once", "monotonic", "availability"):
        assert doc["results"][name]["valid"] is True, (name, doc["results"][name])
    report = (tmp_path / "v" / "report.html").read_text()
    assert "throughput.png" in report and "nodes.png" in report
    assert (tmp_path / "v" / "history.jsonl").stat().st_size > 10_000


@pytest.mark.g1
def test_nodes_that_acknowledge_before_durable_are_caught(tmp_path: Path) -> None:
    """The mutation test: same run, broken nodes; the verdict must be INVALID."""
    out, doc = verify(tmp_path, "--duration", "25", "--faults", "kill", "--seed", "7",
                      "--quiet", "2", "--mutant", "ack-before-durable")  # fmt: skip
    assert out.returncode == 1, out.stdout + out.stderr
    assert "verdict: INVALID" in out.stdout
    assert doc["valid"] is False
    assert doc["results"]["counter"]["valid"] is False, "acknowledged increments were lost"


@pytest.mark.g4
def test_network_partitions_are_survived(tmp_path: Path) -> None:
    """Node processes cut off the coordinator (still reached by the load
    balancer) or isolated, past their claim's TTL: each is replaced, every
    old one stops by itself with exit status 3 once healed, and the history
    is valid (nothing acknowledged lost, nothing counted twice)."""
    out, doc = verify(tmp_path, "--duration", "30", "--faults", "partition", "--seed", "3",
                      "--quiet", "2")  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert doc["valid"] is True
    assert "partition" not in doc["settings"]["unavailable_faults"]
    modes = {f["target"].rsplit(", ", 1)[1].rstrip(")") for f in doc["faults"]}
    assert modes == {"isolate", "coordinator"}, doc["faults"]
    events = [json.loads(line) for line in
              (tmp_path / "v" / "cluster" / "events.jsonl").read_text().splitlines()]  # fmt: skip
    lost = [e for e in events if e["event"] == "claim_lost"]
    exits = {e["pid"]: e["code"] for e in events if e["event"] == "stale_exited"}
    assert len(lost) == len(doc["faults"]), lost
    assert all(exits.get(e["pid"]) == 3 for e in lost), (lost, exits)
    per_fault = doc["results"]["availability"]["details"]["faults"]
    assert all(f["target_is_node"] for f in per_fault)
