"""`keepcount verify` end to end: a short run that must pass, and a mutant that must fail.

The long soaks (VERIFY.md) run outside CI; these keep the verifier honest:
the first shows a healthy cluster judged valid under kills and pauses, the
second that the checkers really catch data loss — nodes that acknowledge an
increment before it is durable lose acknowledged increments when killed,
and the run must be judged invalid.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def verify(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess[str], dict]:
    out = subprocess.run(
        [sys.executable, "-m", "keepcount.cli", "verify", "--dir", str(tmp_path / "v"), *args],
        capture_output=True, text=True, timeout=600, env=env,
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


def settled(doc: dict) -> dict[str, int]:
    """How the abandoned keys were settled, as the exactly-once checker counted them."""
    counts: dict[str, int] = doc["results"]["exactly_once"]["details"]["settled"]
    return counts


@pytest.mark.g2
def test_abandoned_increments_settle_for_sure_and_the_run_is_valid(tmp_path: Path) -> None:
    """Impatient clients give up half of their keyed increments when in doubt
    and settle the keys instead of resending; under kills and pauses, some
    land (applied) and some never do (not applied, for good), and the final
    read equals the acknowledged plus the settled-applied, label set by label
    set.  A 2 ms deadline leaves most abandoned increments in doubt even on
    an idle machine (thousands settled applied, tens not applied in 15 s): at
    the default 20 ms, an idle machine answers nearly all of them in time."""
    out, doc = verify(tmp_path, "--duration", "15", "--faults", "kill,pause", "--seed", "11",
                      "--quiet", "2", "--abandon", "0.5",
                      "--abandon-deadline", "0.002")  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert doc["valid"] is True
    counts = settled(doc)
    assert counts["applied"] > 0 and counts["not_applied"] > 0, counts
    assert doc["results"]["exactly_once"]["valid"] is True
    for ls in doc["results"]["exactly_once"]["details"]["label_sets"].values():
        assert ls["status"] == "exact" and ls["final"] == ls["acknowledged"], ls


@pytest.mark.g2
def test_nodes_that_settle_without_refusing_are_caught(tmp_path: Path) -> None:
    """The mutation test of settling: nodes answer ``not_applied`` without
    recording the refusal, so an abandoned increment still queued lands after
    it was reported not applied; the verdict must be INVALID."""
    out, doc = verify(tmp_path, "--duration", "15", "--faults", "kill", "--seed", "11",
                      "--quiet", "2", "--abandon", "0.5", "--abandon-deadline", "0.002",
                      "--mutant", "settle-without-refusal")  # fmt: skip
    assert out.returncode == 1, out.stdout + out.stderr
    assert doc["valid"] is False
    assert settled(doc)["not_applied"] > 0
    once = doc["results"]["exactly_once"]
    assert once["valid"] is False, once
    statuses = {ls["status"] for ls in once["details"]["label_sets"].values()}
    assert "double_count" in statuses, once["details"]["label_sets"]


@pytest.mark.g4
def test_wall_clock_jumps_and_kills_are_survived(tmp_path: Path) -> None:
    """Nodes' wall clocks jumped hours ahead and behind (libfaketime, only
    CLOCK_REALTIME; ``keepcount.cluster.clocks``) between SIGKILLs: every
    jump is seen in the node's answers, changes neither its process nor its
    claim's epoch, and the history is valid.  (The mutant whose lease runs on
    the wall clock is caught in ``test_clocks``.)  Seed 7 draws two kills, then
    the clock fault; 30 s leave room for slow kills on a loaded host."""
    out, doc = verify(tmp_path, "--duration", "30", "--faults", "clock,kill", "--seed", "7",
                      "--quiet", "2")  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert doc["valid"] is True
    assert {f["kind"] for f in doc["faults"]} == {"clock", "kill"}, doc["faults"]
    clock = doc["results"]["clock"]
    assert clock["valid"] is True and clock["details"]["jumps"] >= 3, clock
    assert doc["settings"]["clock_jumps"] == clock["details"]["jumps"]
    for name in ("counter", "exactly_once", "monotonic"):
        assert doc["results"][name]["valid"] is True, (name, doc["results"][name])


CHECKSUMLESS = Path(__file__).parent / "mutants" / "skip_checksums"
"""A ``sitecustomize`` that makes the SQLite store read values unchecked."""


@pytest.mark.g3
def test_flipped_bits_are_refused_and_the_node_comes_back(tmp_path: Path) -> None:
    """A stopped node's stored value is flipped (in the copies SQLite reads
    while the other nodes write); its new incarnations must refuse the store
    and never turn ready, then the byte is put back and it serves again."""
    out, doc = verify(tmp_path, "--duration", "15", "--faults", "corrupt,kill", "--seed", "5",
                      "--quiet", "2")  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert doc["valid"] is True
    corrupt = doc["results"]["corrupt"]
    assert corrupt["valid"] is True, corrupt
    assert corrupt["details"]["refused"] >= 1, corrupt
    assert corrupt["details"]["refused"] == corrupt["details"]["flips"], corrupt
    assert doc["settings"]["flips"] == corrupt["details"]["flips"]
    for name in ("counter", "exactly_once", "monotonic"):
        assert doc["results"][name]["valid"] is True, (name, doc["results"][name])
    logs = "".join(p.read_text() for p in (tmp_path / "v" / "cluster" / "nodes").glob("*.log"))
    assert "fails its checksum (a flipped bit on disk" in logs


@pytest.mark.g3
def test_nodes_that_serve_a_flipped_value_are_caught(tmp_path: Path) -> None:
    """The mutation test of the corrupt fault: nodes whose store reads values
    without their checksums serve the flipped one; the run must be INVALID."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(CHECKSUMLESS), *filter(None, [os.environ.get("PYTHONPATH")])])}  # fmt: skip
    out, doc = verify(tmp_path, "--duration", "10", "--faults", "corrupt", "--seed", "5",
                      "--quiet", "2", env=env)  # fmt: skip
    assert out.returncode == 1, out.stdout + out.stderr
    assert doc["valid"] is False
    corrupt = doc["results"]["corrupt"]
    assert corrupt["valid"] is False and corrupt["details"]["served"] >= 1, corrupt
