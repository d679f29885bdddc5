"""Slots taken through a coordinator (etcd, ZooKeeper) rather than local locks.

Real servers (one per session), real holder processes killed with SIGKILL:
the lowest slot whose lease is gone is taken over and restored; a live
holder's never; a holder whose claim is lost acknowledges nothing more; a
registry opened before a fork gives its claim back and each child claims its
own slot.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import coordinators
import pytest

import keepcount
from keepcount import Fenced
from keepcount.coordination import open_coordinator

pytestmark = pytest.mark.g4
etcd_cluster = coordinators.etcd_cluster
zookeeper_server = coordinators.zookeeper_server
backend = coordinators.backend
namespace = coordinators.namespace
coordinator_url = coordinators.coordinator_url

HOLDER = textwrap.dedent(
    """
    import sys, keepcount
    reg = keepcount.open(sys.argv[1], node="web-1", coordinator=sys.argv[2])
    reg.counter("jobs_total").inc(int(sys.argv[3]))
    reg.commit_sync()
    print(reg.node, reg.epoch, flush=True)
    sys.stdin.read()
    """
)


def holder(url: str, coord: str, count: int) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, url, coord, str(count)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    assert line, f"holder exited with {proc.wait()}"
    return proc, line[0]


def test_lowest_free_slot_in_the_coordinator(tmp_path: Path, coordinator_url: str) -> None:
    url = f"sqlite:///{tmp_path}/c.db"
    first = keepcount.open(url, node="web-1", coordinator=coordinator_url)
    second = keepcount.open(url, node="web-1", coordinator=coordinator_url)
    try:
        assert (first.node, second.node) == ("web-1", "web-1@1")
        members = open_coordinator(coordinator_url)
        try:
            held = members.members()
        finally:
            members.close()
        assert held["web-1"].epoch == first.epoch and held["web-1@1"].epoch == second.epoch
        first.counter("jobs_total").inc(2)
        second.counter("jobs_total").inc(3)
        first.commit_sync()
        second.commit_sync()
        assert [t.value for t in first.host_totals("jobs_total")] == [5]
    finally:
        second.close()
        first.close()
    again = keepcount.open(url, node="web-1", coordinator=coordinator_url)
    try:  # both released: the lowest is free again, with its values
        assert again.node == "web-1" and again.counter("jobs_total").value == 2
    finally:
        again.close()


def test_a_dead_holders_slot_is_taken_over_once_its_lease_is_gone(
    tmp_path: Path, coordinator_url: str
) -> None:
    url = f"sqlite:///{tmp_path}/c.db"
    proc, node = holder(url, coordinator_url, 7)
    try:
        assert node == "web-1"
        live = keepcount.open(url, node="web-1", coordinator=coordinator_url)
        assert live.node == "web-1@1"  # a live holder's slot is never taken
        live.close()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 15
        while True:  # the killed holder's lease runs out after its TTL
            reg = keepcount.open(url, node="web-1", coordinator=coordinator_url)
            if reg.node == "web-1":
                break
            reg.close()
            assert time.monotonic() < deadline, "the dead holder's slot was never freed"
            time.sleep(0.2)  # poll the coordinator, not a guess at the TTL
        try:
            assert reg.counter("jobs_total").value == 7  # restored
            reg.counter("jobs_total").inc()
            reg.commit_sync()
        finally:
            reg.close()
    finally:
        proc.kill()
        proc.communicate()


def test_a_holder_whose_claim_is_lost_acknowledges_nothing(
    tmp_path: Path, coordinator_url: str
) -> None:
    url = f"sqlite:///{tmp_path}/c.db"
    reg = keepcount.open(url, node="web-1", coordinator=coordinator_url, flush_interval=None)
    try:
        reg.counter("jobs_total").inc(1)
        reg.commit_sync()
        evictor = open_coordinator(coordinator_url)
        try:
            assert evictor.evict(reg.node, reg.epoch)
        finally:
            evictor.close()
        deadline = time.monotonic() + 10
        while not reg._slot_lock.claim.lost:  # type: ignore[union-attr]
            assert time.monotonic() < deadline
            time.sleep(0.01)  # the client's watch notices the deletion
        reg.counter("jobs_total").inc(1)
        with pytest.raises(Fenced):
            reg.commit_sync()
        assert reg.fenced
    finally:
        reg.close()


FORKER = textwrap.dedent(
    """
    import os, sys, keepcount
    reg = keepcount.open(sys.argv[1], node="web-1", coordinator=sys.argv[2])
    jobs = reg.counter("jobs_total")

    def say(*words):  # one write: lines of several processes never interleave
        os.write(1, (" ".join(map(str, words)) + "\\n").encode())

    hold_r, hold_w = os.pipe()    # children hold their slots until it closes
    said_r, said_w = os.pipe()    # each child says it has its slot
    pids = []
    for i in range(3):
        pid = os.fork()
        if pid == 0:
            os.close(hold_w)
            jobs.inc(10)
            try:
                reg.commit_sync()
                say(reg.node)
            except keepcount.KeepcountError as exc:
                say("error", type(exc).__name__, exc)
            os.write(said_w, b".")
            os.read(hold_r, 1)    # EOF once the parent closes its end
            try:
                reg.close()
            except keepcount.KeepcountError:
                pass              # the same error again: nothing was written
            os._exit(0)
        pids.append(pid)
    got = b""
    while len(got) < 3:
        got += os.read(said_r, 3)
    os.close(hold_w)
    for pid in pids:
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    say("parent-holds", reg._slot_lock is not None)
    say("total", [t.value for t in reg.host_totals("jobs_total")])
    reg.close()
    """
)


def test_forked_children_claim_their_own_slots(
    tmp_path: Path, coordinator_url: str, backend: coordinators.Backend
) -> None:
    """ZooKeeper (kazoo, pure Python) works across a fork.  etcd's gRPC
    asyncio client cannot: a child forked after its parent used it gets a
    clear error saying what to do, never a hang."""
    url = f"sqlite:///{tmp_path}/c.db"
    done = subprocess.run(
        [sys.executable, "-c", FORKER, url, coordinator_url],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout.split("\n")
    if backend.kind == "etcd":
        errors = [line for line in out if line.startswith("error")]
        assert len(errors) == 3 and all("InvalidInput" in e and "fork" in e for e in errors), out
        assert "total [0]" in out or "total []" in out, out
        return
    children = sorted(line for line in out if line.startswith("web-1"))
    assert len(children) == 3 and len(set(children)) == 3, out
    assert "parent-holds False" in out
    assert "total [30]" in out


PROM_HOLDER = textwrap.dedent(
    """
    import sys
    import keepcount.prometheus as kp
    reg = kp.CollectorRegistry(store=sys.argv[1], node="web-1", coordinator=sys.argv[2])
    kp.Gauge("inflight", "In flight", registry=reg, multiprocess_mode="livesum").set(5)
    reg.commit_sync()
    print(reg.keepcount.node, flush=True)
    sys.stdin.read()
    """
)


def test_a_dead_holders_live_gauges_leave_once_its_lease_is_gone(
    tmp_path: Path, coordinator_url: str
) -> None:
    """keepcount.prometheus's live modes through a coordinator: a SIGKILLed
    holder's live gauge counts while its claim is listed, not after."""
    import keepcount.prometheus as kp

    url = f"sqlite:///{tmp_path}/c.db"
    reg = kp.CollectorRegistry(store=url, node="web-1", coordinator=coordinator_url)
    gauge = kp.Gauge("inflight", "In flight", registry=reg, multiprocess_mode="livesum")
    gauge.set(1)
    reg.commit_sync()
    proc = subprocess.Popen(
        [sys.executable, "-c", PROM_HOLDER, url, coordinator_url],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "web-1@1"
        assert reg.get_sample_value("inflight") == 6.0
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 15
        while reg.get_sample_value("inflight") != 1.0:  # the killed holder's lease runs out
            assert time.monotonic() < deadline, "a dead holder's live gauge stayed"
            time.sleep(0.2)  # poll the coordinator, not a guess at the TTL
    finally:
        proc.kill()
        proc.communicate()
        reg.close()
