"""A writer process to kill: concurrent writers that log every attempt and ack.

``python tests/system/writer.py --store URL --node ID`` opens a registry, reports
what it restored, then runs concurrent writers (asyncio tasks or threads).
Each writer, in a loop, logs ``try``, increments its counter by a random
amount and observes that amount in its histogram, commits, and logs ``ack``.
The crash tests (``test_crash.py``) SIGKILL it at random moments and hold
the restored values against the log:

    acknowledged  <=  restored  <=  attempted        (per series, cumulative)

Every line is one ``os.write`` to an unbuffered pipe (atomic below
``PIPE_BUF``), and ``try`` is written *before* the increment, so a parent that
reads the pipe to EOF after the kill has seen every attempt, and every ack
the writer could report.  Lines:

    opening PID
    restored WRITER COUNTER_VALUE HISTOGRAM_COUNT     (one per writer)
    ready EPOCH
    try WRITER AMOUNT | ack WRITER AMOUNT | fail WRITER AMOUNT CODE
    done

``--mutant`` breaks the store on purpose, inside this process only, so that
the power-loss tests (``test_power_loss.py``) prove they catch a store that
loses acknowledged increments: ``sync-normal`` commits with ``PRAGMA
synchronous=NORMAL`` (the WAL is not fsynced at commit), ``no-dir-fsync``
creates the store file without fsyncing its directory.

The parent side (``WriterProcess``, ``Tally``) lives here too.  Test code,
not part of the package (it was ``keepcount.writer``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import keepcount
from keepcount.process import ManagedProcess

__all__ = ["COUNTER", "HISTOGRAM", "MUTANTS", "Tally", "WriterProcess", "main"]

COUNTER = "writer_increments_total"
HISTOGRAM = "writer_increment_size"
_BUCKETS = (1, 2, 3, 4, 5)


def _out(line: str) -> None:
    os.write(1, line.encode())


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


MUTANTS = ("sync-normal", "no-dir-fsync")


def _apply_mutant(name: str) -> None:
    """Break this process's SQLite store as ``name`` says (see the docstring)."""
    from keepcount.stores.sqlite import schema, store

    if name == "sync-normal":
        connect = store.connect

        def connect_normal(path: Path, busy_timeout: float) -> object:
            conn = connect(path, busy_timeout)
            conn.execute("PRAGMA synchronous=NORMAL")
            return conn

        store.connect = connect_normal  # type: ignore[assignment]
    elif name == "no-dir-fsync":
        schema._fsync_dir = lambda path: None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python writer.py")
    p.add_argument("--store", required=True)
    p.add_argument("--node", required=True)
    p.add_argument("--writers", type=int, default=8)
    p.add_argument("--mode", choices=["async", "threads"], default="async")
    p.add_argument("--seconds", type=float, default=30.0, help="stop after this long")
    p.add_argument("--max-ops", type=int, default=200_000, help="stop after this many ops")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--pause", type=float, default=0.0, help="seconds between one writer's ops")
    p.add_argument("--mutant", choices=MUTANTS, default=None, help="break the store on purpose")
    args = p.parse_args(argv)
    if args.mutant:
        _apply_mutant(args.mutant)

    signal.signal(signal.SIGTERM, _interrupt)
    _out(f"opening {os.getpid()}\n")
    reg = keepcount.open(args.store, node=args.node)
    counter = reg.counter(COUNTER, "Increments made by the writer process", ["writer"])
    hist = reg.histogram(HISTOGRAM, "Sizes of the increments", ["writer"], buckets=_BUCKETS)
    names = [f"w{i}" for i in range(args.writers)]
    for w in names:
        _out(f"restored {w} {counter.labels(w).value} {hist.labels(w).value.count}\n")
    _out(f"ready {reg.epoch}\n")

    deadline = time.monotonic() + args.seconds
    budget = [args.max_ops]
    rnd = random.Random(args.seed)

    def one(w: str) -> tuple[int, bool]:
        if time.monotonic() > deadline or budget[0] <= 0:
            return 0, False
        budget[0] -= 1
        amount = rnd.randint(1, 5)
        _out(f"try {w} {amount}\n")
        counter.labels(w).inc(amount)
        hist.labels(w).observe(amount)
        return amount, True

    async def writer(w: str) -> None:
        while True:
            amount, go = one(w)
            if not go:
                return
            try:
                await reg.commit()
            except keepcount.KeepcountError as exc:
                _out(f"fail {w} {amount} {exc.code}\n")
            else:
                _out(f"ack {w} {amount}\n")
            if args.pause:
                await asyncio.sleep(args.pause)

    def thread_writer(w: str) -> None:
        while True:
            amount, go = one(w)
            if not go:
                return
            try:
                reg.commit_sync()
            except keepcount.KeepcountError as exc:
                _out(f"fail {w} {amount} {exc.code}\n")
            else:
                _out(f"ack {w} {amount}\n")
            if args.pause:
                time.sleep(args.pause)

    async def run_async() -> None:
        await asyncio.gather(*(writer(w) for w in names))

    threads = [threading.Thread(target=thread_writer, args=(w,)) for w in names]
    try:
        if args.mode == "async":
            asyncio.run(run_async())
        else:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    except KeyboardInterrupt:  # SIGTERM: stop writing, flush, release the claim
        budget[0] = 0
        for t in threads:
            if t.is_alive():
                t.join()
    reg.close()
    _out("done\n")
    return 0


@dataclass
class Tally:
    """Client-side bookkeeping of one node's writers, across restarts."""

    tried: dict[str, int] = field(default_factory=dict)
    acked: dict[str, int] = field(default_factory=dict)
    tried_ops: dict[str, int] = field(default_factory=dict)
    acked_ops: dict[str, int] = field(default_factory=dict)
    failed_ops: int = 0

    def feed(self, line: str) -> None:
        parts = line.split()
        if not parts:
            return
        if parts[0] == "try":
            w, n = parts[1], int(parts[2])
            self.tried[w] = self.tried.get(w, 0) + n
            self.tried_ops[w] = self.tried_ops.get(w, 0) + 1
        elif parts[0] == "ack":
            w, n = parts[1], int(parts[2])
            self.acked[w] = self.acked.get(w, 0) + n
            self.acked_ops[w] = self.acked_ops.get(w, 0) + 1
        elif parts[0] == "fail":
            self.failed_ops += 1

    def violations(self, restored: dict[str, tuple[int, int]]) -> list[str]:
        """Why ``restored`` (writer -> (counter, histogram count)) breaks the bounds."""
        out = []
        for w in sorted(set(self.tried) | set(restored)):
            value, count = restored.get(w, (0, 0))
            lo, hi = self.acked.get(w, 0), self.tried.get(w, 0)
            if not lo <= value <= hi:
                out.append(f"{w}: counter {value} outside [acked {lo}, attempted {hi}]")
            lo, hi = self.acked_ops.get(w, 0), self.tried_ops.get(w, 0)
            if not lo <= count <= hi:
                out.append(f"{w}: histogram count {count} outside [acked {lo}, attempted {hi}]")
        return out


class WriterProcess:
    """One run of this file as a child process (a ``ManagedProcess``) and its
    log, read line by line from its stdout."""

    def __init__(self, store: str, node: str, *, writers: int = 8, mode: str = "async",
                 seconds: float = 30.0, seed: int | None = None, pause: float = 0.0,
                 mutant: str | None = None) -> None:  # fmt: skip
        cmd = [sys.executable, str(Path(__file__).resolve()), "--store", store, "--node", node,
               "--writers", str(writers), "--mode", mode, "--seconds", str(seconds),
               "--pause", str(pause)]  # fmt: skip
        if seed is not None:
            cmd += ["--seed", str(seed)]
        if mutant is not None:
            cmd += ["--mutant", mutant]
        self.process = ManagedProcess(f"writer {node}")
        self.process.spawn(cmd, capture=True)
        self.proc = self.process.proc
        self.restored: dict[str, tuple[int, int]] = {}
        self.epoch: int | None = None
        self.stderr = ""

    @property
    def pid(self) -> int:
        return self.process.pid

    def lines(self) -> Iterator[str]:
        """Every line until EOF (the process exited or was killed)."""
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            parts = line.split()
            if parts and parts[0] == "restored":
                self.restored[parts[1]] = (int(parts[2]), int(parts[3]))
            elif parts and parts[0] == "ready":
                self.epoch = int(parts[1])
            yield line

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` if it still runs; returns at once (see ``wait``)."""
        self.process.signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        """Its exit status, once it exited; its stderr is then in ``stderr``."""
        code = self.process.wait(timeout)
        assert self.proc is not None and self.proc.stderr is not None
        self.stderr = self.proc.stderr.read()
        self.proc.stderr.close()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return code


if __name__ == "__main__":
    sys.exit(main())
