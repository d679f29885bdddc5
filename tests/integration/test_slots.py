"""Slots (keepcount.slots): the worker processes of one host share its node id.

Every process that opens ``node="web-1"`` takes the lowest free slot
(``web-1``, ``web-1@1``, ...): liveness is a local flock, the store claim is
the slot's stored epoch + 1.  Where liveness matters the holders are real
processes (``WORKER`` below), killed with SIGKILL (or stopped with SIGSTOP);
each per-store test runs on SQLite, the 3-node Cassandra cluster and the
Bigtable emulator, with its own ``KEEPCOUNT_LOCK_DIR``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import keepcount
from keepcount import ClaimConflict, Fenced, InvalidInput
from keepcount.registry import Registry
from keepcount.slots import (
    DEFAULT_MAX_SLOTS,
    host_of,
    lock_dir,
    slot_id,
    slot_index,
    take_slot,
)
from keepcount.stores import open_store
from keepcount.totals import SeriesTotal

OPEN_TIMEOUT = 120.0
"""Seconds a worker may take to start and open its registry (a Cassandra
driver connects to 3 nodes; the machine has 2 cores)."""
REPLY_TIMEOUT = 60.0
EXIT_TIMEOUT = 60.0

WORKER = textwrap.dedent(
    """
    import json, os, sys
    import keepcount
    from keepcount.errors import KeepcountError

    url, host = sys.argv[1], sys.argv[2]
    reg = keepcount.open(url, node=host, flush_interval=None)
    jobs = reg.counter("jobs_total", "Jobs done", labelnames=["kind"]).labels(kind="a")

    def say(**doc):  # one write: lines of several processes never interleave
        os.write(1, (json.dumps(doc) + "\\n").encode())

    say(node=reg.node, host=reg.host, epoch=reg.epoch, restored=jobs.value)
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "inc":
            try:
                jobs.inc(int(args[0]))
                reg.commit_sync(30)
            except KeepcountError as exc:
                say(error=type(exc).__name__, message=str(exc), fenced=reg.fenced)
            else:
                say(value=jobs.value)
        elif cmd == "close":
            reg.close()
            say(closed=True)
            break
    """
)


class Worker:
    """A worker process of ``host``: opens the registry (taking a slot),
    tells which one, then counts ``inc N`` commands from stdin."""

    def __init__(self, url: str, host: str = "web-1") -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER, url, host],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            hello = self.reply(OPEN_TIMEOUT)
        except BaseException:
            self.close()
            raise
        self.node: str = hello["node"]
        self.epoch: int = hello["epoch"]
        self.restored: int = hello["restored"]
        assert hello["host"] == host

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def reply(self, timeout: float = REPLY_TIMEOUT) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"worker {self.pid}: no answer within {timeout} s") from None
        if line is None:
            raise AssertionError(f"worker {self.pid} exited: {self.proc.wait(EXIT_TIMEOUT)}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def inc(self, by: int) -> dict[str, Any]:
        """Count ``by`` and commit; the answer (``value`` or ``error``)."""
        self.send(f"inc {by}")
        return self.reply()

    def stop(self) -> None:
        """A clean exit: flush, release the claim, free the slot."""
        self.send("close")
        assert self.reply() == {"closed": True}
        assert self.proc.wait(EXIT_TIMEOUT) == 0
        self.close()

    def kill(self) -> None:
        """SIGKILL: the claim is never released, the kernel drops the flock."""
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(EXIT_TIMEOUT) == -signal.SIGKILL
        self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(EXIT_TIMEOUT)
        self._reader.join(EXIT_TIMEOUT)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    """Workers started by a test; whichever are still alive die at teardown."""
    started: list[Worker] = []
    yield started
    for w in started:
        w.close()


def start(workers: list[Worker], url: str, host: str = "web-1") -> Worker:
    w = Worker(url, host)
    workers.append(w)
    return w


@pytest.fixture(params=["sqlite", "cassandra", "bigtable"])
def url(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh store of each kind, with slot locks of this test's own (the
    environment is inherited by the workers)."""
    monkeypatch.setenv("KEEPCOUNT_LOCK_DIR", str(tmp_path / "locks"))
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/counters.db"
    fresh: str = request.getfixturevalue(f"{request.param}_url")
    return fresh


def jobs(totals: list[SeriesTotal]) -> SeriesTotal:
    """The one ``jobs_total{kind="a"}`` total."""
    (total,) = [t for t in totals if t.name == "jobs_total" and t.labels == {"kind": "a"}]
    return total


def stored_jobs(url: str, node: str) -> int:
    """``jobs_total{kind="a"}`` as stored for ``node`` (a fresh handle, no claim)."""
    store = open_store(url)
    try:
        value = store.load(node).values.get("jobs_total", {}).get('["a"]', 0)
    finally:
        store.close()
    assert isinstance(value, int)
    return value


def slot_nodes(url: str, host: str = "web-1") -> dict[str, Any]:
    """The store's node records of ``host``'s slots, by node id."""
    store = open_store(url)
    try:
        return {n.node: n for n in store.nodes() if host_of(n.node) == host}
    finally:
        store.close()


def is_locked(path: Path) -> bool:
    """True if a live process holds the flock on ``path``."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the lock if we got it
    return False


# -- slot ids ------------------------------------------------------------------


@pytest.mark.parametrize("host", ["web-1", "a", "A.b_c-9", "x" * 63, "10.0.0.7"])
@pytest.mark.parametrize("index", [0, 1, 2, 9, 10, 63, 9999])
def test_slot_ids_round_trip(host: str, index: int) -> None:
    node = slot_id(host, index)
    assert node == (host if index == 0 else f"{host}@{index}")
    assert host_of(node) == host
    assert slot_index(node) == index
    keepcount.naming.check_node_id(node)  # every slot id is a valid store node id


def test_a_bare_host_id_is_its_own_slot_0() -> None:
    assert host_of("web-1") == "web-1" and slot_index("web-1") == 0
    # Not slot ids: the suffix must be a positive decimal without leading zeros.
    for odd in ("web-1@0", "web-1@01", "web-1@", "web-1@x"):
        assert slot_index(odd) == 0 and host_of(odd) == odd


@pytest.mark.g6
@pytest.mark.parametrize("host", ["web-1@1", "web-1@0", "@1", "", "../x", "a b", "-web", "x" * 64])
def test_invalid_host_ids_are_refused(host: str, tmp_path: Path, db_url: str) -> None:
    with pytest.raises(InvalidInput):
        take_slot(tmp_path / "locks", host)
    with pytest.raises(InvalidInput):
        keepcount.open(db_url, node=host)
    assert not (tmp_path / "locks").exists() or not any((tmp_path / "locks").iterdir())


def test_a_slot_id_is_a_valid_exact_node_id_but_not_a_host(db_url: str) -> None:
    """A coordinator's claim (``epoch=``) names an exact node id, which may be
    a slot; ``node=`` without an epoch is a host and may not."""
    with keepcount.open(db_url, node="web-1@1", epoch=5) as reg:
        assert (reg.node, reg.host, reg.epoch) == ("web-1@1", "web-1@1", 5)
    with pytest.raises(InvalidInput, match="web-1@1"):
        keepcount.open(db_url, node="web-1@1")


@pytest.mark.g6
def test_max_slots_must_be_positive(tmp_path: Path, db_url: str) -> None:
    with pytest.raises(InvalidInput, match="max_slots"):
        take_slot(tmp_path / "locks", "web-1", max_slots=0)
    with pytest.raises(InvalidInput, match="max_slots"):
        keepcount.open(db_url, node="web-1", max_slots=0)


# -- choosing a slot (in one process: each take_slot / open is a lock of its own) --


@pytest.mark.g4
def test_the_lowest_free_slot_is_taken(tmp_path: Path) -> None:
    d = tmp_path / "locks"
    held = [take_slot(d, "web-1") for _ in range(4)]
    try:
        assert [s.index for s in held] == [0, 1, 2, 3]
        assert [s.node for s in held] == ["web-1", "web-1@1", "web-1@2", "web-1@3"]
        assert sorted(p.name for p in d.iterdir()) == [
            "web-1.lock", "web-1@1.lock", "web-1@2.lock", "web-1@3.lock",
        ]  # fmt: skip
        held[2].release()
        held[1].release()
        again = take_slot(d, "web-1")
        assert again.index == 1, "the lowest free one, not the last freed"
        held[1] = again
        held[2] = take_slot(d, "web-1")
        assert held[2].index == 2
        held.append(take_slot(d, "web-1"))
        assert held[-1].index == 4
        other = take_slot(d, "web-2")  # another host's slots are its own
        assert other.node == "web-2"
        other.release()
    finally:
        for s in held:
            s.release()
    again = take_slot(d, "web-1")
    assert again.index == 0
    again.release()


def test_release_is_idempotent_and_frees_the_slot(tmp_path: Path) -> None:
    d = tmp_path / "locks"
    s = take_slot(d, "web-1")
    assert is_locked(s.path)
    s.release()
    s.release()
    assert not is_locked(s.path)
    again = take_slot(d, "web-1")
    assert again.index == 0
    again.release()


@pytest.mark.g4
def test_opens_in_one_process_take_one_slot_each(db_url: str) -> None:
    regs = [keepcount.open(db_url, node="web-1", flush_interval=None) for _ in range(3)]
    try:
        assert [r.node for r in regs] == ["web-1", "web-1@1", "web-1@2"]
        assert all(r.host == "web-1" for r in regs)
        for i, r in enumerate(regs):
            r.counter("jobs_total", "Jobs", ["kind"]).labels("a").inc(10**i)
            r.commit_sync()
        assert jobs(regs[0].host_totals()).value == 111
        assert jobs(regs[0].host_totals()).nodes == {"web-1": 1, "web-1@1": 10, "web-1@2": 100}
        regs[1].close()
        with keepcount.open(db_url, node="web-1") as again:
            assert again.node == "web-1@1", "a closed registry gives its slot back"
            assert again.counter("jobs_total", "Jobs", ["kind"]).labels("a").value == 10
    finally:
        for r in regs:
            r.close()


@pytest.mark.g4
def test_max_slots_exhausted_names_the_holders(tmp_path: Path, db_url: str) -> None:
    d = tmp_path / "locks"
    held = [take_slot(d, "web-1", max_slots=3) for _ in range(3)]
    try:
        with pytest.raises(ClaimConflict) as info:
            take_slot(d, "web-1", max_slots=3)
        message = str(info.value)
        assert "all 3 slots are held" in message
        for node in ("web-1", "web-1@1", "web-1@2"):
            assert f"{node} by pid {os.getpid()}" in message
        assert "web-1@3" not in message and not (d / "web-1@3.lock").exists()
        held.append(take_slot(d, "web-1", max_slots=4))  # a higher limit has room
        assert held[-1].index == 3
    finally:
        for s in held:
            s.release()

    regs = [keepcount.open(db_url, node="web-1", max_slots=2) for _ in range(2)]
    try:
        with pytest.raises(ClaimConflict, match=f"all 2 slots .*web-1@1 by pid {os.getpid()}"):
            keepcount.open(db_url, node="web-1", max_slots=2)
        with pytest.raises(ClaimConflict, match="'web-1' is already claimed: web-1 by pid"):
            keepcount.open(db_url, node="web-1", max_slots=1)
        # A failed open left nothing claimed behind: the store knows two slots.
        assert set(slot_nodes(db_url)) == {"web-1", "web-1@1"}
    finally:
        for r in regs:
            r.close()


def test_the_default_limit_shows_a_few_holders(tmp_path: Path) -> None:
    d = tmp_path / "locks"
    held = [take_slot(d, "web-1") for _ in range(DEFAULT_MAX_SLOTS)]
    try:
        assert held[-1].node == f"web-1@{DEFAULT_MAX_SLOTS - 1}"
        with pytest.raises(ClaimConflict) as info:
            take_slot(d, "web-1")
        message = str(info.value)
        assert f"all {DEFAULT_MAX_SLOTS} slots are held" in message
        assert f"web-1@3 by pid {os.getpid()} on " in message and message.count(" by pid ") == 4
        assert "web-1@4 " not in message and " ...); raise max_slots" in message
    finally:
        for s in held:
            s.release()


@pytest.mark.g4
def test_a_deleted_lock_file_lets_a_second_taker_in(tmp_path: Path) -> None:
    """A temp-dir cleaner deletes a held lock file: the next taker makes a new
    file and gets the slot (the store's epoch then fences the old holder,
    see test_a_slot_taken_over_behind_its_holder_fences_it)."""
    d = tmp_path / "locks"
    first = take_slot(d, "web-1")
    first.path.unlink()
    second = take_slot(d, "web-1")
    try:
        assert second.index == 0 and second.path.exists()
        assert is_locked(second.path)
    finally:
        first.release()
        second.release()


# -- liveness: real processes ------------------------------------------------------


@pytest.mark.g4
def test_a_live_holder_keeps_its_slot_even_when_stopped(db_url: str, workers: list[Worker]) -> None:
    holder = start(workers, db_url)
    assert holder.node == "web-1"
    assert holder.inc(5) == {"value": 5}
    with keepcount.open(db_url, node="web-1") as reg:
        assert reg.node == "web-1@1", "a live holder's slot is never taken"
    os.kill(holder.pid, signal.SIGSTOP)
    try:
        with keepcount.open(db_url, node="web-1") as reg:
            assert reg.node == "web-1@1", "a stopped holder still holds its slot"
        with pytest.raises(ClaimConflict, match=f"web-1 by pid {holder.pid}"):
            keepcount.open(db_url, node="web-1", max_slots=1)
    finally:
        os.kill(holder.pid, signal.SIGCONT)
    assert holder.inc(1) == {"value": 6}, "the holder was never fenced: nobody took its slot"
    assert stored_jobs(db_url, "web-1") == 6
    holder.kill()
    with keepcount.open(db_url, node="web-1") as reg:
        assert reg.node == "web-1", "a dead holder's slot is the next one given"
        assert reg.counter("jobs_total", "Jobs done", ["kind"]).labels("a").value == 6


@pytest.mark.g3
def test_a_dead_holders_slot_is_taken_over_with_its_values(
    db_url: str, workers: list[Worker]
) -> None:
    a, b, c = (start(workers, db_url) for _ in range(3))
    assert [a.node, b.node, c.node] == ["web-1", "web-1@1", "web-1@2"]
    for w, by in ((a, 1), (b, 20), (c, 300)):
        assert w.inc(by) == {"value": by}
    b.kill()
    d = start(workers, db_url)
    assert d.node == "web-1@1", "the dead holder's slot, the lowest free one"
    assert d.epoch == b.epoch + 1, "claimed with the next epoch over a never-released claim"
    assert d.restored == 20
    assert d.inc(2) == {"value": 22}
    e = start(workers, db_url)
    assert e.node == "web-1@3"


# -- per store: processes of one host ------------------------------------------------


@pytest.mark.g3
def test_processes_of_one_host_get_different_slots_and_restore_their_own(
    url: str, workers: list[Worker]
) -> None:
    a = start(workers, url)
    b = start(workers, url)
    assert (a.node, b.node) == ("web-1", "web-1@1")
    assert a.restored == b.restored == 0
    assert a.inc(1) == {"value": 1}
    assert b.inc(10) == {"value": 10}
    assert a.inc(2) == {"value": 3}
    by_node = {"web-1": 3, "web-1@1": 10}
    a.stop()
    b.stop()
    assert {n: r.released_at is not None for n, r in slot_nodes(url).items()} == {
        "web-1": True, "web-1@1": True,
    }  # fmt: skip
    # Restarted: each slot comes back with its own values, whichever process takes it.
    a2 = start(workers, url)
    b2 = start(workers, url)
    assert (a2.node, b2.node) == ("web-1", "web-1@1")
    assert a2.restored == by_node["web-1"]
    assert b2.restored == by_node["web-1@1"]
    assert (a2.epoch, b2.epoch) == (a.epoch + 1, b.epoch + 1)
    assert a2.inc(100) == {"value": by_node["web-1"] + 100}
    assert b2.inc(1000) == {"value": by_node["web-1@1"] + 1000}
    a2.kill()
    b2.kill()
    a3 = start(workers, url)  # after a crash as well
    assert (a3.node, a3.restored) == ("web-1", by_node["web-1"] + 100)
    with keepcount.open(url, node="web-1") as reg:
        assert reg.node == "web-1@1"
        assert reg.counter("jobs_total", "Jobs done", ["kind"]).labels("a").value == (
            by_node["web-1@1"] + 1000
        )
        total = jobs(reg.host_totals("jobs_total"))
        assert total.value == 3 + 10 + 100 + 1000
        assert total.nodes == {
            "web-1": by_node["web-1"] + 100,
            "web-1@1": by_node["web-1@1"] + 1000,
        }


@pytest.mark.g5
def test_a_dead_slots_counts_stay_in_the_host_and_cluster_totals(
    url: str, workers: list[Worker]
) -> None:
    a, b, c = (start(workers, url) for _ in range(3))
    assert [a.node, b.node, c.node] == ["web-1", "web-1@1", "web-1@2"]
    other = start(workers, url, host="web-2")
    assert other.node == "web-2"
    for w, by in ((a, 1), (b, 20), (c, 300), (other, 5000)):
        assert w.inc(by) == {"value": by}
    b.kill()
    c.kill()
    records = slot_nodes(url)
    assert records["web-1@1"].released_at is None and records["web-1@2"].released_at is None
    # The dead slots' counts stay: the host total is everything its processes committed.
    with keepcount.open(url, node="web-1", flush_interval=None) as reg:
        assert reg.node == "web-1@1", "the lowest dead slot is taken over"
        assert reg.epoch == b.epoch + 1
        mine = reg.counter("jobs_total", "Jobs done", ["kind"]).labels("a")
        assert mine.value == 20
        host = jobs(reg.host_totals())
        assert host.value == 1 + 20 + 300
        assert host.nodes == {"web-1": 1, "web-1@1": 20, "web-1@2": 300}
        cluster = jobs(reg.cluster("jobs_total"))
        assert cluster.value == 1 + 20 + 300 + 5000
        assert cluster.nodes == {"web-1": 1, "web-1@1": 20, "web-1@2": 300, "web-2": 5000}
        mine.inc(4)
        reg.commit_sync()
        assert jobs(reg.host_totals("jobs_total")).value == 1 + 24 + 300
    a.kill()
    other.stop()
    with keepcount.open(url, node="web-2") as reg:  # another host sees only its own
        assert jobs(reg.host_totals()).nodes == {"web-2": 5000}
        assert jobs(reg.cluster()).value == 1 + 24 + 300 + 5000


def test_slots_stay_flat_while_processes_recycle(url: str, workers: list[Worker]) -> None:
    """10 processes one after the other, at most 2 alive at once, half of them
    SIGKILLed: 2 slots in the store, and the host's total is all they committed."""
    committed = 0
    expected = {"web-1": 0, "web-1@1": 0}
    alive = [start(workers, url)]
    for i in range(1, 11):
        w = alive[-1]
        assert w.node in expected, w.node
        assert w.restored == expected[w.node], f"process {i} restored its slot's values"
        assert w.inc(i) == {"value": expected[w.node] + i}
        expected[w.node] += i
        committed += i
        if i == 10:
            break
        alive.append(start(workers, url))
        old = alive.pop(0)
        if i % 2:
            old.kill()
        else:
            old.stop()
    assert set(slot_nodes(url)) == {"web-1", "web-1@1"}
    with keepcount.open(url, node="web-1") as reg:
        assert reg.node in expected
        total = jobs(reg.host_totals("jobs_total"))
        assert total.value == committed == sum(expected.values())
        assert total.nodes == {n: v for n, v in expected.items() if v}
    assert set(slot_nodes(url)) == {"web-1", "web-1@1"}


# -- fencing, per slot ---------------------------------------------------------------


@pytest.mark.g4
def test_a_slot_taken_over_with_a_newer_epoch_fences_its_holder(url: str) -> None:
    """The holder of web-1@1 is paused while another incarnation claims the
    slot (a coordinator's epoch here): its next commit is refused and changes
    nothing in the store."""
    with (
        keepcount.open(url, node="web-1", flush_interval=None) as first,
        keepcount.open(url, node="web-1", flush_interval=None) as old,
    ):
        assert (first.node, old.node) == ("web-1", "web-1@1")
        old_jobs = old.counter("jobs_total", "Jobs done", ["kind"]).labels("a")
        old_jobs.inc(3)
        old.commit_sync()
        new = Registry(open_store(url), "web-1@1", epoch=old.epoch + 1, flush_interval=None)
        try:
            new_jobs = new.counter("jobs_total", "Jobs done", ["kind"]).labels("a")
            assert new_jobs.value == 3
            old_jobs.inc(100)
            with pytest.raises(Fenced):
                old.commit_sync()
            assert old.fenced
            assert stored_jobs(url, "web-1@1") == 3, "the fenced commit changed nothing"
            with pytest.raises(Fenced):  # for good
                old.commit_sync()
            new_jobs.inc(1)
            new.commit_sync()
            assert stored_jobs(url, "web-1@1") == 4
            assert not first.fenced
            first.counter("jobs_total", "Jobs done", ["kind"]).labels("a").inc(7)
            first.commit_sync()
            assert jobs(first.host_totals()).nodes == {"web-1": 7, "web-1@1": 4}
        finally:
            new.close()
    assert stored_jobs(url, "web-1@1") == 4, "closing the fenced registry wrote nothing either"


@pytest.mark.g4
def test_a_slot_taken_over_behind_its_holder_fences_it(url: str, workers: list[Worker]) -> None:
    """A live holder's lock file is deleted (a temp-dir cleaner): a new process
    gets the same slot; the store's epoch fences the old holder."""
    first = start(workers, url)
    holder = start(workers, url)
    assert (first.node, holder.node) == ("web-1", "web-1@1")
    assert holder.inc(3) == {"value": 3}
    (lock_dir(url) / "web-1@1.lock").unlink()
    with keepcount.open(url, node="web-1", flush_interval=None) as reg:
        assert reg.node == "web-1@1"
        assert reg.epoch == holder.epoch + 1
        mine = reg.counter("jobs_total", "Jobs done", ["kind"]).labels("a")
        assert mine.value == 3
        answer = holder.inc(100)
        assert answer["error"] == "Fenced" and answer["fenced"], answer
        assert stored_jobs(url, "web-1@1") == 3, "the fenced commit changed nothing"
        mine.inc(1)
        reg.commit_sync()
        assert stored_jobs(url, "web-1@1") == 4
        assert first.inc(1) == {"value": 1}, "the other slot is untouched"
        holder.kill()
        assert jobs(reg.host_totals()).value == 5


# -- forks -------------------------------------------------------------------------------

FORKER = textwrap.dedent(
    """
    import json, os, select, sys, time
    import keepcount

    url, host, counted = sys.argv[1], sys.argv[2], sys.argv[3] == "counted"
    reg = keepcount.open(url, node=host)
    jobs = reg.counter("forked_total", "Jobs of forked workers", labelnames=["kind"]).labels("a")

    def say(**doc):  # one write: lines of several processes never interleave
        os.write(1, (json.dumps(doc) + "\\n").encode())

    say(parent=os.getpid(), node=reg.node)
    if counted:
        jobs.inc(100)
        reg.commit_sync(30)
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pids = []
    for i in range(3):
        pid = os.fork()
        if pid == 0:  # a worker: counts on a slot of its own, until all three did
            os.close(go_w)
            jobs.inc(10 ** i)
            reg.commit_sync(30)
            say(child=i, pid=os.getpid(), node=reg.node, epoch=reg.epoch, value=jobs.value)
            os.write(ready_w, b"+")
            os.read(go_r, 1)  # EOF once every worker holds its slot
            sys.exit(0)  # a normal exit: atexit closes the registry (and its store)
        pids.append(pid)
    deadline = time.monotonic() + 90
    ready = 0
    while ready < len(pids) and time.monotonic() < deadline:
        if select.select([ready_r], [], [], 1)[0]:
            ready += len(os.read(ready_r, 16))
    os.close(go_w)
    codes = {}
    while len(codes) < len(pids) and time.monotonic() < deadline:
        for pid in pids:
            if pid not in codes:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    codes[pid] = os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    for pid in pids:
        if pid not in codes:
            os.kill(pid, 9)
            codes[pid] = "hung"
    if counted:
        jobs.inc(1000)
        reg.commit_sync(30)
    say(codes=list(codes.values()), node=reg.node, holds_slot=reg._slot_lock is not None,
        store_open=reg._store_open, value=jobs.value)
    total = [t for t in reg.host_totals("forked_total") if t.labels == {"kind": "a"}]
    say(total=total[0].value, nodes=total[0].nodes)
    sys.stdin.read()
    reg.close()
    say(closed=True)
    """
)


@pytest.mark.g3
@pytest.mark.parametrize("counted", [False, True], ids=["idle-parent", "counting-parent"])
def test_forked_workers_take_slots_of_their_own(url: str, counted: bool) -> None:
    """A registry opened before fork (gunicorn --preload): the parent gives its
    slot back and closes its store at the fork; every child takes a slot of
    its own; a parent that never counted holds no slot, one that counts
    takes one again.  The host's total is all that was counted."""
    with subprocess.Popen(
        [sys.executable, "-c", FORKER, url, "web-1", "counted" if counted else "idle"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            lines = queue.Queue[str | None]()

            def read() -> None:
                assert proc.stdout is not None
                for line in proc.stdout:
                    lines.put(line)
                lines.put(None)

            reader = threading.Thread(target=read, daemon=True)
            reader.start()

            def reply() -> dict[str, Any]:
                line = lines.get(timeout=OPEN_TIMEOUT)
                assert line is not None, f"the forking process exited: {proc.wait(EXIT_TIMEOUT)}"
                answer: dict[str, Any] = json.loads(line)
                return answer

            hello = reply()
            assert hello["node"] == "web-1"
            children = [reply() for _ in range(3)]
            assert sorted(c["child"] for c in children) == [0, 1, 2]
            nodes = {c["node"] for c in children}
            assert len(nodes) == 3, f"three workers alive at once, three slots: {children}"
            assert all(host_of(n) == "web-1" for n in nodes)
            assert all(c["pid"] != hello["parent"] for c in children)
            # Each child counts from its slot's stored values, never the parent's memory.
            for c in children:
                own = 10 ** c["child"]
                assert c["value"] in ((own, own + 100) if counted else (own,)), c
            after = reply()
            assert after["codes"] == [0, 0, 0], f"children exited (no hang): {after}"
            assert not after["store_open"] or counted
            if counted:
                assert after["holds_slot"], "a parent that counts takes a slot again"
                parent_slot = after["node"]
            else:
                assert not after["holds_slot"], "a parent that never counted holds no slot"
                # Every slot lock is free: the children are gone, the parent holds none.
                locks = list(lock_dir(url).glob("web-1*.lock"))
                assert locks and not any(is_locked(p) for p in locks)
                parent_slot = None
            total = reply()
            expected = 1 + 10 + 100 + (100 + 1000 if counted else 0)
            assert total["total"] == expected, total
            assert sum(total["nodes"].values()) == expected
            if counted:
                # The parent's 100 stay in the slot it had (which a child may have
                # taken over, adding to it); its 1000 are in the slot it holds now.
                assert total["nodes"][parent_slot] >= 1000
            proc.stdin.close()  # type: ignore[union-attr]
            assert reply() == {"closed": True}
            assert proc.wait(EXIT_TIMEOUT) == 0
            reader.join(EXIT_TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
    with keepcount.open(url, node="web-1") as reg:  # every slot is free again
        assert reg.node == "web-1"
        assert jobs_total(reg) == expected
        assert len(slot_nodes(url)) <= 4


def jobs_total(reg: Registry) -> int:
    (total,) = [t for t in reg.host_totals("forked_total") if t.labels == {"kind": "a"}]
    assert isinstance(total.value, int)
    return total.value


REFORKER = textwrap.dedent(
    """
    import json, os, sys, time
    import keepcount

    url, host, forks = sys.argv[1], sys.argv[2], int(sys.argv[3])
    reg = keepcount.open(url, node=host)
    jobs = reg.counter("forked_total", "Jobs of forked workers", labelnames=["kind"]).labels("a")

    def say(**doc):  # one write: lines of several processes never interleave
        os.write(1, (json.dumps(doc) + "\\n").encode())

    for i in range(forks):
        jobs.inc(1)
        reg.commit_sync(30)  # the parent counts: it takes a slot again after each fork
        pid = os.fork()
        if pid == 0:
            jobs.inc(10)
            reg.commit_sync(30)
            say(child=i, node=reg.node)
            reg.close()
            os._exit(0)
        deadline = time.monotonic() + 60
        while not os.waitpid(pid, os.WNOHANG)[0]:
            if time.monotonic() > deadline:
                say(hung=i)
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                sys.exit(1)
            time.sleep(0.01)
    total = [t for t in reg.host_totals("forked_total") if t.labels == {"kind": "a"}]
    say(node=reg.node, total=total[0].value, nodes=total[0].nodes)
    reg.close()
    """
)


@pytest.mark.g1
def test_a_counting_parent_forks_again_and_again(url: str) -> None:
    """A master that counts and forks a new worker each time (a worker
    recycled): every fork closes the parent's store right after it was used
    and reopens it, and a child opens one of its own at once.  None may hang,
    and nothing counted is lost."""
    forks = 12
    done = subprocess.run(
        [sys.executable, "-c", REFORKER, url, "web-1", str(forks)],
        capture_output=True,
        text=True,
        timeout=forks * 60,
    )
    answers = [json.loads(line) for line in done.stdout.splitlines()]
    assert done.returncode == 0, (answers, done.stderr[-3000:])
    children = [a for a in answers if "child" in a]
    assert [c["child"] for c in children] == list(range(forks))
    (end,) = [a for a in answers if "total" in a]
    assert end["total"] == forks * 11, end
    assert len(slot_nodes(url)) <= 2, "one worker at a time beside the parent: two slots"


@pytest.mark.g4
def test_one_lock_directory_per_store_however_its_url_is_spelled(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("KEEPCOUNT_LOCK_DIR", str(tmp_path))
    assert lock_dir("cassandra://b,a/ks") == lock_dir("CASSANDRA://a,B/ks")
    assert lock_dir("cassandra://a,b/ks") != lock_dir("cassandra://a,b/other")
    assert lock_dir("sqlite:////x/c.db") == Path("/x/c.db-locks")
