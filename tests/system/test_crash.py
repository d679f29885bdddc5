"""SIGKILL a process full of concurrent writers at random moments, many times.

After every restart, each counter must lie between what the writers were
acknowledged and what they attempted (cumulatively across all runs), and no
value may go backwards.  ``KEEPCOUNT_CRASH_KILLS`` sets the kills per test
(CI runs the default; soaks run thousands).
"""

from __future__ import annotations

import os
import queue
import random
import signal
import threading
from pathlib import Path

import pytest
from writer import COUNTER, HISTOGRAM, Tally, WriterProcess

import keepcount

KILLS = int(os.environ.get("KEEPCOUNT_CRASH_KILLS", "80"))
pytestmark = [pytest.mark.crash, pytest.mark.g1]


def stored(url: str, node: str) -> dict[str, tuple[int, int]]:
    """The node's values as a fresh process of the test reads them from the store."""
    with keepcount.open(url, node=node) as reg:
        c, h = reg.get(COUNTER), reg.get(HISTOGRAM)
        counts = dict(c.items()) if c else {}
        hists = dict(h.items()) if h else {}
    return {k[0]: (v, hists[k].count) for k, v in counts.items()}


def run_once(url: str, node: str, tally: Tally, rnd: random.Random, mode: str,
             last: dict[str, tuple[int, int]]) -> tuple[str, dict[str, tuple[int, int]]]:  # fmt: skip
    """One incarnation, killed at a random point; checks what it restored."""
    w = WriterProcess(url, node, writers=8, mode=mode, seed=rnd.randrange(2**32))
    point = rnd.choices(["opening", "ready", "acks"], weights=[1, 1, 8])[0]
    target = rnd.randint(0, 3000)
    acks = 0
    restored: dict[str, tuple[int, int]] = last
    for line in w.lines():
        kind = line.split()[0]
        if kind == "ready":
            restored = dict(w.restored)
            bad = tally.violations(restored)
            assert not bad, f"pid {w.pid} restored values outside the bounds: {bad}"
            for writer, (value, count) in last.items():
                now = restored.get(writer, (0, 0))
                assert now[0] >= value and now[1] >= count, (
                    f"{writer} went backwards across a restart: {(value, count)} -> {now}"
                )
        tally.feed(line)
        if kind == "ack":
            acks += 1
        if (kind == point) or (point == "acks" and kind == "ack" and acks >= target):
            w.kill(signal.SIGKILL)
    code = w.wait()
    assert code in (0, -signal.SIGKILL), f"writer failed ({code}):\n{w.stderr}"
    return point, restored


@pytest.mark.parametrize("mode", ["async", "threads"])
def test_sigkill_never_loses_an_acknowledged_increment(tmp_path: Path, mode: str) -> None:
    url = f"sqlite:///{tmp_path}/counters.db"
    seed = random.randrange(2**32)
    rnd = random.Random(seed)
    tally = Tally()
    last: dict[str, tuple[int, int]] = {}
    points: dict[str, int] = {}
    for _ in range(KILLS):
        point, last = run_once(url, "node-1", tally, rnd, mode, last)
        points[point] = points.get(point, 0) + 1
    final = stored(url, "node-1")
    assert not tally.violations(final), f"seed {seed}: {tally.violations(final)}"
    # The run did real work: most increments were acknowledged and kept.
    assert sum(tally.acked.values()) > 0
    assert sum(v for v, _ in final.values()) >= sum(tally.acked.values())
    print(f"seed {seed}: {KILLS} kills at {points}; acked {sum(tally.acked.values())}, "
          f"attempted {sum(tally.tried.values())}, stored {sum(v for v, _ in final.values())}")  # fmt: skip


@pytest.mark.g5
def test_kills_of_one_node_leave_another_node_in_the_same_file_whole(tmp_path: Path) -> None:
    """Two node ids share one file; one is killed again and again while the other writes."""
    url = f"sqlite:///{tmp_path}/shared.db"
    rnd = random.Random()
    steady, steady_tally, lines = (
        WriterProcess(url, "steady", writers=4, seconds=120, pause=0.001), Tally(), queue.Queue[str]()
    )  # fmt: skip

    def drain() -> None:
        for line in steady.lines():
            steady_tally.feed(line)
            lines.put(line)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        tally, last = Tally(), {}
        for _ in range(max(10, KILLS // 4)):
            _, last = run_once(url, "victim", tally, rnd, "async", last)
        assert steady.proc.poll() is None, "the steady node died while the other was killed"
    finally:
        steady.kill(signal.SIGKILL)
        reader.join()
        steady.wait()
    victim, kept = stored(url, "victim"), stored(url, "steady")
    assert not tally.violations(victim)
    assert not steady_tally.violations(kept)
    assert sum(steady_tally.acked.values()) > 0
    # Cluster totals are the sum over both nodes.
    with keepcount.open(url, node="reader") as reg:
        totals = {tuple(t.labels.values()): t for t in reg.cluster(COUNTER)}
    for writer, total in totals.items():
        parts = {n: v for n, v in total.nodes.items()}
        assert total.value == sum(parts.values())
        assert parts.get("victim", 0) == victim.get(writer[0], (0, 0))[0]
        assert parts.get("steady", 0) == kept.get(writer[0], (0, 0))[0]
