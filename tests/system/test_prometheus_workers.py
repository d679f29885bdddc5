"""``keepcount.prometheus`` with real processes: the default ``REGISTRY``
bound by ``KEEPCOUNT_STORE``/``KEEPCOUNT_NODE`` only, as a migrated app uses it.

- A process counting under load (threads, each change followed by
  ``REGISTRY.commit_sync()``) is SIGKILLed at a random moment, three times
  over; after each kill a fresh process restores the slot and collects:
  every counter, histogram and summary lies between what was acknowledged
  and what was attempted, histogram buckets and sums match their counts
  exactly, gauge/info/enum hold the last acknowledged state or a later
  attempted one, and the restoring process's own values equal the host's.
- Gauges of every ``multiprocess_mode`` combined over the slots of
  ``gunicorn -w 3`` workers, through a worker SIGKILLed and replaced (the
  replacement takes the freed slot: still three slots).
- Live-mode exclusion, deterministically, with plain processes: a SIGKILLed
  holder's live gauges vanish from the host's view while its non-live ones
  stay, and the process that takes its slot does not restore them.

Both worker tests also hold the window in which a new process has taken a
dead worker's slot (its lock) but not yet written to it: the slot must not
count as live then, or the dead worker's live gauges would show as live
(``slots.held_slots``: a slot is live once its holder's first write landed).
Both failed before that rule (the gunicorn one when a scrape fell in the
window, about one run in five; the plain-process one always).

The app (metrics, WSGI app, child commands) is ``prometheus_app.py``.
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from keepcount.nodeproc import free_port, http_get
from keepcount.slots import host_of, lock_dir, take_slot
from keepcount.stores import open_store

pytestmark = [pytest.mark.slow]

HERE = Path(__file__).parent
APP = HERE / "prometheus_app.py"
BIN = Path(sys.executable).parent
HOST = "web-1"
MODES = (
    "all", "liveall", "min", "livemin", "max", "livemax", "sum", "livesum",
    "mostrecent", "livemostrecent",
)  # fmt: skip
PHASES = ("a", "b", "c", "d", "e", "f", "g")  # prometheus_app.PHASES


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "KEEPCOUNT_STORE": f"sqlite:///{tmp_path}/counters.db",
        "KEEPCOUNT_NODE": HOST,
        "PYTHONUNBUFFERED": "1",
    }


# -- reading the exposition ------------------------------------------------------------

Samples = dict[str, dict[frozenset[tuple[str, str]], float]]


def parse(text: str) -> Samples:
    """sample name -> labels -> value."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = frozenset(s.labels.items())
            assert labels not in out.setdefault(s.name, {}), f"duplicate sample {s}"
            out[s.name][labels] = s.value
    return out


def one(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get(name, {}).get(frozenset(labels.items()))


def per_slot(samples: Samples, name: str) -> dict[str, float]:
    """A gauge of mode all/liveall: slot id (label ``pid``) -> value."""
    out = {}
    for labels, value in samples.get(name, {}).items():
        d = dict(labels)
        assert set(d) == {"pid"}, (name, d)
        out[d["pid"]] = value
    return out


def single(samples: Samples, name: str) -> float:
    series = samples.get(name, {})
    assert set(series) == {frozenset()}, (name, series)
    return series[frozenset()]


def modes_of(samples: Samples) -> dict[str, Any]:
    """Every pw_gauge_<mode> as the host shows it."""
    return {
        mode: per_slot(samples, f"pw_gauge_{mode}")
        if mode.endswith("all")
        else single(samples, f"pw_gauge_{mode}")
        for mode in MODES
    }


def expected_modes(every: dict[str, float], live: dict[str, float], recent: float,
                   live_recent: float) -> dict[str, Any]:  # fmt: skip
    """What each mode combines: ``every`` slot's value, the ``live`` ones'."""
    out: dict[str, Any] = {"all": every, "liveall": live, "mostrecent": recent}
    out["livemostrecent"] = live_recent
    for prefix, values in (("", every), ("live", live)):
        out[prefix + "min"] = min(values.values())
        out[prefix + "max"] = max(values.values())
        out[prefix + "sum"] = sum(values.values())
    return out


def host_slots(env: dict[str, str]) -> set[str]:
    """Every slot of HOST the store has a claim for (taken once, dead or alive)."""
    store = open_store(env["KEEPCOUNT_STORE"])
    try:
        return {r.node for r in store.nodes() if host_of(r.node) == HOST}
    finally:
        store.close()


# -- child processes -----------------------------------------------------------------------


class Lines:
    """JSON lines from a child's stdout, read with a deadline (no hang if it stalls)."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.fd = stream.fileno()
        self.buf = b""

    def read(self, timeout: float = 30) -> dict[str, Any] | None:
        """The next line (None at EOF); fails after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            assert left > 0, f"no line from the child in {timeout} s (got {self.buf[-200:]!r})"
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    assert not self.buf, f"a partial last line: {self.buf[-200:]!r}"
                    return None
                self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return json.loads(line)  # type: ignore[no-any-return]


def _wait_gone(pid: int, timeout: float = 10) -> None:
    """Until ``pid`` is reaped by its parent (so every thread of it is gone,
    and every lock it held with it)."""
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists():
        assert time.monotonic() < deadline, f"pid {pid} not reaped"
        time.sleep(0.01)  # poll interval


def _children(pid: int) -> set[int]:
    try:
        return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    except OSError:
        return set()


# -- 1. restore after SIGKILL, under load ------------------------------------------------


@dataclass
class Tally:
    """What a counting child said: its last attempt, its furthest acknowledgement."""

    tried: dict[str, Any] | None = None
    acked: dict[str, Any] | None = None
    acks: int = 0
    nodes: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def follow(self, lines: Lines) -> None:
        while (line := lines.read(60)) is not None:
            with self.lock:
                if "try" in line:
                    assert self.tried is None or line["try"]["n"] == self.tried["n"] + 1, line
                    self.tried = line["try"]
                else:
                    ack = line["ack"]
                    self.acks += 1
                    self.nodes.add(ack.pop("node"))
                    if self.acked is None or ack["n"] > self.acked["n"]:
                        self.acked = ack


@dataclass
class Seen:
    """The host's values of the restore test's metrics, as a collect showed them."""

    ops: dict[str, float]
    buckets: list[float]  # cumulative: le=1, le=2, +Inf
    latency_count: float
    latency_sum: float
    size_count: float
    size_sum: float
    high: float
    build_seq: int
    phase: str

    @classmethod
    def of(cls, s: Samples, threads: list[str]) -> Seen:
        ops = {t: one(s, "pw_ops_total", thread=t) or 0.0 for t in threads}
        assert set(s.get("pw_ops_total", {})) <= {frozenset({("thread", t)}) for t in threads}
        build = list(s.get("pw_build_info", {}))
        assert len(build) <= 1, build
        phases = [dict(k)["pw_phase"] for k, v in s.get("pw_phase", {}).items() if v == 1]
        assert len(phases) == 1, s.get("pw_phase")
        return cls(
            ops=ops,
            buckets=[
                one(s, "pw_latency_seconds_bucket", le=le) or 0.0 for le in ("1.0", "2.0", "+Inf")
            ],
            latency_count=single(s, "pw_latency_seconds_count"),
            latency_sum=single(s, "pw_latency_seconds_sum"),
            size_count=single(s, "pw_size_bytes_count"),
            size_sum=single(s, "pw_size_bytes_sum"),
            high=single(s, "pw_high_water"),
            build_seq=int(dict(build[0])["seq"]) if build else 0,
            phase=phases[0],
        )


def collect(
    env: dict[str, str], threads: list[str], log: Path
) -> tuple[str, dict[str, Any], Samples]:
    """A fresh process takes the slot (restoring it) and collects:
    (its slot, its own values, the host's)."""
    with open(log, "ab") as err:
        out = subprocess.run(
            [sys.executable, str(APP), "collect", *threads],
            env=env, stdout=subprocess.PIPE, stderr=err, timeout=30, check=False,
        )  # fmt: skip
    assert out.returncode == 0, log.read_text()[-3000:]
    answer = json.loads(out.stdout)
    return answer["slot"], answer["local"], parse(answer["text"])


def _latency_dist(n: int) -> tuple[list[float], float]:
    """Cumulative buckets and sum of operations 1..n (prometheus_app.latency_of)."""
    odd, even = (n + 1) // 2, n // 2  # 0.5 each, 1.5 each
    return [float(odd), float(n), float(n)], 0.5 * odd + 1.5 * even


def _size_sum(n: int) -> float:
    return float(sum(i % 3 for i in range(1, n + 1)))  # prometheus_app.size_of


def _local_matches_host(local: dict[str, Any], s: Samples) -> None:
    """The restoring process's own values (after its restore) are the host's."""
    names = ("pw_ops_total", "pw_latency_seconds_bucket", "pw_latency_seconds_count",
             "pw_latency_seconds_sum", "pw_size_bytes_count", "pw_size_bytes_sum",
             "pw_high_water", "pw_build_info", "pw_phase")  # fmt: skip
    host = {}
    for name in names:
        for labels, value in s.get(name, {}).items():
            d = dict(labels)
            host[name + json.dumps(d, sort_keys=True) if d else name] = value
    mine = {k: v for k, v in local.items() if k.split("{")[0] in names}
    assert mine == host


@pytest.mark.g1
@pytest.mark.crash
def test_default_registry_restores_every_acknowledged_value_after_sigkill(
    tmp_path: Path, env: dict[str, str]
) -> None:
    threads = [f"t{i}" for i in range(4)]
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    log = tmp_path / "children.log"
    prev = Seen({t: 0.0 for t in threads}, [0.0, 0.0, 0.0], 0, 0, 0, 0, 0, 0, PHASES[0])
    acked_total = 0
    for incarnation in range(3):
        base = max(int(prev.high), prev.build_seq)  # numbers go on above any restored one
        with open(log, "ab") as err:
            child = subprocess.Popen(
                [sys.executable, str(APP), "count", str(len(threads)), str(base), "20"],
                env=env, stdout=subprocess.PIPE, stderr=err, start_new_session=True,
            )  # fmt: skip
        try:
            assert child.stdout is not None
            tally = Tally()
            reader = threading.Thread(target=tally.follow, args=(Lines(child.stdout),))
            reader.start()
            target = rng.randint(50, 1500)  # acknowledgements before the kill
            deadline = time.monotonic() + 20
            while tally.acks < target:
                assert child.poll() is None, f"child exited:\n{log.read_text()[-3000:]}"
                assert reader.is_alive(), "the reader failed"
                assert time.monotonic() < deadline, (seed, incarnation, tally.acks)
                time.sleep(0.001)  # poll interval; the kill lands anywhere in the load
            os.kill(child.pid, signal.SIGKILL)
            assert child.wait(10) == -signal.SIGKILL
            reader.join(30)
            assert not reader.is_alive()
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            assert child.stdout is not None
            child.stdout.close()
        tried, acked = tally.tried, tally.acked
        assert tried is not None and acked is not None, tally
        assert tally.nodes == {HOST}, tally.nodes  # the dead incarnation's slot taken again
        acked_total += acked["n"]

        slot, local, s = collect(env, threads, log)
        assert slot == HOST
        seen = Seen.of(s, threads)
        why = (seed, incarnation, acked, tried)
        # Counters: acknowledged <= durable <= attempted, per label set.
        for t in threads:
            grew = seen.ops[t] - prev.ops[t]
            assert acked["by"][t] <= grew <= tried["by"][t], (t, prev.ops[t], seen.ops[t], why)
        # Histogram and summary: counts in range, buckets and sums exactly those of the counts.
        grew = int(seen.latency_count - prev.latency_count)
        assert acked["n"] <= grew <= tried["n"], (prev.latency_count, seen.latency_count, why)
        buckets, total = _latency_dist(grew)
        assert seen.buckets == [a + b for a, b in zip(prev.buckets, buckets, strict=True)]
        assert seen.latency_sum == prev.latency_sum + total
        grew = int(seen.size_count - prev.size_count)
        assert acked["n"] <= grew <= tried["n"], (prev.size_count, seen.size_count, why)
        assert seen.size_sum == prev.size_sum + _size_sum(grew)
        # Gauge (max), info, enum: the last acknowledged state or a later attempted one.
        assert acked["seq"] <= seen.high <= tried["seq"], (seen.high, why)
        assert acked["seq"] <= seen.build_seq <= tried["seq"], (seen.build_seq, why)
        phases = {PHASES[n % len(PHASES)] for n in range(acked["seq"], tried["seq"] + 1)}
        assert seen.phase in phases, (seen.phase, why)
        # The restoring process holds exactly the host's values (one slot: its own).
        _local_matches_host(local, s)
        prev = seen

    assert sum(prev.ops.values()) >= acked_total
    assert host_slots(env) == {HOST}  # four processes, one at a time: one slot


# -- 2. gauge modes over gunicorn workers ----------------------------------------------------


def _no_control_socket() -> tuple[str, ...]:
    """gunicorn >= 24 listens on ~/.gunicorn/gunicorn.ctl (one path for every
    gunicorn of the user): keep the test off it (as test_examples.py)."""
    from gunicorn.config import KNOWN_SETTINGS

    flags = {flag for s in KNOWN_SETTINGS for flag in (s.cli or ())}
    return ("--no-control-socket",) if "--no-control-socket" in flags else ()


def scrape(port: int) -> Samples | None:
    """The host's /metrics, or None if no worker answered (one was killed)."""
    try:
        status, body = http_get("127.0.0.1", port, "/metrics", timeout=10)
    except OSError:
        return None
    assert status == 200, body[-2000:]
    return parse(body.decode())


@dataclass
class Gunicorn:
    port: int
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    answered: int = 0
    """/whoami and /touch requests answered 200 (each counted durably first)."""

    def start(self, workers: int) -> None:
        argv = [str(BIN / "gunicorn"), "-w", str(workers), "-b", f"127.0.0.1:{self.port}",
                "--chdir", str(HERE), "--graceful-timeout", "5", *_no_control_socket(),
                "prometheus_app:app"]  # fmt: skip
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                argv, env=self.env, stdout=log, stderr=log, start_new_session=True
            )

    def workers(self) -> set[int]:
        assert self.proc is not None
        return _children(self.proc.pid)

    def request(self, path: str) -> dict[str, Any]:
        status, body = http_get("127.0.0.1", self.port, path, timeout=10)
        assert status == 200, body
        self.answered += 1
        return json.loads(body)  # type: ignore[no-any-return]

    def until(self, what: str, check: Any, timeout: float = 30) -> Samples:
        """Scrape until ``check(samples)`` is true; fails after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()[-3000:]
            s = scrape(self.port)
            if s is not None and check(s):
                return s
            assert time.monotonic() < deadline, f"never {what}:\n{self.log.read_text()[-3000:]}"
            time.sleep(0.02)  # poll interval

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def _touch_last(server: Gunicorn, times: int) -> float:
    """Set the gauges again from whichever worker answers, ``times`` times in a
    row: the last answer's value is the one set last."""
    value = None
    for _ in range(times):
        value = server.request("/touch")["value"]
    assert value is not None
    return float(value)


@pytest.mark.g5
@pytest.mark.crash
def test_gauge_modes_combine_gunicorn_workers_through_a_sigkill(
    tmp_path: Path, env: dict[str, str]
) -> None:
    rng = random.Random()
    server = Gunicorn(free_port(), env, tmp_path / "gunicorn.log")
    every = {HOST: 10.0, f"{HOST}@1": 11.0, f"{HOST}@2": 12.0}  # 10 + slot index
    try:
        server.start(3)

        def all_set(s: Samples) -> bool:  # every worker took its slot and set its values
            pids = per_slot(s, "pw_worker_pid")
            return set(pids) == set(every) and {int(p) for p in pids.values()} == server.workers()

        s = server.until("three workers with their slots", all_set)
        slot_pid = {slot: int(pid) for slot, pid in per_slot(s, "pw_worker_pid").items()}
        for _ in range(6):  # /whoami answers as the slot's holder
            me = server.request("/whoami")
            assert slot_pid[me["slot"]] == me["pid"] and me["value"] == every[me["slot"]], me
        last = _touch_last(server, 5)
        s = scrape(server.port)
        assert s is not None
        assert modes_of(s) == expected_modes(every, every, last, last)

        # SIGKILL one worker; gunicorn starts a replacement, which takes the freed slot.
        victim_slot = rng.choice(sorted(every))
        victim = slot_pid[victim_slot]
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        _wait_gone(victim)  # reaped by the master: no lock of it left
        others = {k: v for k, v in every.items() if k != victim_slot}
        stale: list[Any] = []  # scrapes showing the dead worker's live gauges (see the end)

        def replaced(s: Samples) -> bool:
            # Non-live modes keep the dead slot's values all along (the
            # replacement restores them, then sets the same ones).
            got = modes_of(s)
            assert got["all"] == every, got
            assert (got["min"], got["max"], got["sum"]) == (10, 12, 33), got
            assert got["mostrecent"] in (last, every[victim_slot]), got
            # Live modes: the other slots as they were; the freed one absent
            # until the replacement holds it (at 0 until that one sets its value).
            assert {k: v for k, v in got["liveall"].items() if k != victim_slot} == others, got
            assert got["liveall"].get(victim_slot) in (None, 0.0, every[victim_slot]), got
            pids = per_slot(s, "pw_worker_pid")
            if victim in {int(p) for p in pids.values()}:
                stale.append((round(time.monotonic() - killed, 3), pids, got["liveall"]))
            new = pids.get(victim_slot)
            return new is not None and int(new) in server.workers()

        s = server.until("a replacement worker in the freed slot", replaced)
        slot_pid[victim_slot] = int(per_slot(s, "pw_worker_pid")[victim_slot])
        assert set(slot_pid.values()) == server.workers()
        # The replacement set its values last: it is the most recent in both modes.
        assert modes_of(s) == expected_modes(every, every, every[victim_slot], every[victim_slot])
        last = _touch_last(server, 5)
        for _ in range(6):
            me = server.request("/whoami")
            assert slot_pid[me["slot"]] == me["pid"], (me, slot_pid)
        s = scrape(server.port)
        assert s is not None
        assert modes_of(s) == expected_modes(every, every, last, last)
        # Every answered request counted, the dead worker's included; still three slots.
        assert sum(s.get("pw_requests_total", {}).values()) == server.answered
        assert host_slots(env) == set(every)

        # No scrape, in the window between the replacement taking the freed
        # slot's lock and its first flush, showed the dead worker's live gauges.
        assert not stale, f"a live-mode gauge showed the dead worker {victim}: {stale}"
    finally:
        server.stop()


# -- 3. live modes exclude a dead holder (plain processes, deterministic) ---------------------


class Holder:
    """``prometheus_app.py hold``: a process holding a slot, driven by commands."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        with open(log, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(APP), "hold"], env=env, stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=err, start_new_session=True,
            )  # fmt: skip
        assert self.proc.stdout is not None
        self.lines = Lines(self.proc.stdout)
        self.ready = self._read()
        self.slot: str = self.ready["slot"]

    def _read(self) -> dict[str, Any]:
        line = self.lines.read()
        assert line is not None, "the holder exited"
        return line

    def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()
        return self._read()

    def collect(self) -> Samples:
        return parse(self.ask("collect")["text"])

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def close(self) -> None:
        """EOF on stdin: the holder exits (flushing, giving its slot back)."""
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None and not stream.closed:
                stream.close()


@pytest.mark.crash
def test_live_modes_drop_a_sigkilled_holder_and_never_restore_its_gauges(
    tmp_path: Path, env: dict[str, str]
) -> None:
    log = tmp_path / "holders.log"
    holders: list[Holder] = []
    try:
        a = Holder(env, log)
        holders.append(a)
        assert a.slot == HOST
        assert a.ask("set")["value"] == 10
        b = Holder(env, log)
        holders.append(b)
        assert b.slot == f"{HOST}@1"
        assert b.ask("set")["value"] == 11  # set after a's: the most recent
        both = {HOST: 10.0, f"{HOST}@1": 11.0}
        s = a.collect()
        assert modes_of(s) == expected_modes(both, both, 11, 11)
        assert per_slot(s, "pw_worker_pid") == {HOST: a.proc.pid, f"{HOST}@1": b.proc.pid}

        b.kill()  # SIGKILL: no flush, no release; its lock dies with it
        s = a.collect()
        # Non-live modes keep what the dead holder set; live modes drop it.
        assert modes_of(s) == expected_modes(both, {HOST: 10.0}, 11, 10)
        assert per_slot(s, "pw_worker_pid") == {HOST: a.proc.pid}

        # A new process takes the freed slot: non-live gauges restored, live ones not.
        c = Holder(env, log)
        holders.append(c)
        assert c.slot == f"{HOST}@1"
        local = c.ask("local")["local"]
        assert {m: local[f"pw_gauge_{m}"] for m in MODES} == {
            m: 0.0 if m.startswith("live") else 11.0 for m in MODES
        }
        got = modes_of(a.collect())
        assert got["all"] == both and (got["min"], got["max"], got["sum"]) == (10, 11, 21), got
        assert got["mostrecent"] == 11, got
        # c's live gauges are 0 (or not shown), never b's 11.
        assert got["liveall"].get(f"{HOST}@1") in (None, 0.0), got
        assert got["liveall"][HOST] == 10, got
        assert (got["livemax"], got["livesum"], got["livemostrecent"]) == (10, 10, 10), got
        assert got["livemin"] == min(got["liveall"].values()), got

        assert c.ask("set")["value"] == 11  # c sets its values: set last
        s = a.collect()
        assert modes_of(s) == expected_modes(both, both, 11, 11)
        assert per_slot(s, "pw_worker_pid") == {HOST: a.proc.pid, f"{HOST}@1": c.proc.pid}
        assert host_slots(env) == set(both)  # three processes, two at a time: two slots

        # c dies and a new worker takes its slot: between taking the slot's
        # lock (the first thing binding does) and its first flush, the slot's
        # stored live gauges are still c's, so it must not count as live.
        # Here the lock is taken as a starting worker takes it, and held.
        c.kill()
        lock = take_slot(lock_dir(env["KEEPCOUNT_STORE"]), HOST)
        try:
            assert lock.node == f"{HOST}@1"
            s = a.collect()
            got = modes_of(s)
            assert got["all"] == both and got["mostrecent"] == 11, got  # non-live: kept
            # Nothing of c's in the live modes (the new holder has set nothing).
            assert per_slot(s, "pw_worker_pid") == {HOST: a.proc.pid}, "dead holder shown"
            assert got["liveall"].get(f"{HOST}@1") in (None, 0.0), got
            assert (got["livesum"], got["livemax"], got["livemostrecent"]) == (10, 10, 10), got
        finally:
            lock.release()
    finally:
        for h in holders:
            h.close()
