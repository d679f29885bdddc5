"""One managed child process: spawn, signal, await its exit, read its log.

Every process the tooling starts is a ``ManagedProcess``: the keepcount nodes
(``keepcount.nodeproc.NodeProcess``), the servers of a local cluster (etcd,
ZooKeeper, Cassandra, the Bigtable emulator: ``keepcount.cluster.processes``),
the load balancers (``keepcount.cluster.haproxy`` / ``nginx``) and the crash
tests' writer.  Modelled on kazoo's test harness and rqlite's
``Node.start(wait=True)`` / ``stop(graceful=False)``.

Example::

    p = ManagedProcess("sleeper", Path("/tmp/sleep.log"))
    p.spawn(["sleep", "60"])
    p.pause()               # SIGSTOP; returns once the kernel shows it stopped
    p.resume()
    p.kill()                # SIGKILL; returns once it is reaped
    assert p.returncode == -9

Contract:

- One ``Popen`` at a time; ``spawn`` refuses while one runs.  Output goes to
  the log file (appended: it collects every incarnation's output, after a
  banner line), to pipes (``capture=True``), or nowhere (no log).
- **Exits are awaited, not polled**: a pidfd (``os.pidfd_open``, Linux 5.3+)
  is opened at spawn; ``wait(timeout)`` blocks in ``poll(2)`` on it and
  ``await exited()`` registers it with the event loop (``add_reader``).
  Without pidfds (another OS) ``wait`` falls back to ``Popen.wait`` and
  ``exited`` to a thread.
- Signals go through the pidfd (``pidfd_send_signal``): a pid reused after the
  process was reaped is never hit.  Signalling a process that has exited is a
  no-op.
- Fault verbs return once their effect is seen: ``kill`` and ``stop`` once the
  process is reaped, ``pause`` / ``resume`` once ``/proc`` shows it stopped /
  running.
- ``new_session=True`` starts it in a session of its own, and ``stop`` then
  also SIGKILLs what is left of that session running the same executable
  (NGINX workers whose master was killed keep serving its port).
- Readiness: ``wait_until(probe, timeout)`` polls ``probe`` against a deadline
  while the process lives (``poll_until``, built on tenacity, does the same
  for any condition), raising ``ProcessExited`` or ``TimeoutError`` with the
  log's tail.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import IO, Any

import tenacity

__all__ = [
    "ManagedProcess",
    "ProcessExited",
    "apoll_until",
    "poll_until",
    "process_state",
    "session_members",
    "wait_exit",
]


class ProcessExited(RuntimeError):
    """The process exited while something waited for it to become ready."""


def process_state(pid: int) -> str | None:
    """The kernel's one-letter state of ``pid`` (R, S, T for stopped, Z, ...);
    None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may contain spaces.
    return stat.rsplit(")", 1)[1].split()[0]


def session_members(sid: int, exe: str) -> list[int]:
    """Processes of session ``sid`` running ``exe`` (by /proc): what is left of
    a process started in a session of its own."""
    out: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            name = os.readlink(entry / "exe")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        # Fields after the ")" closing the command name: state ppid pgrp session ...
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[3]) == sid and Path(name.removesuffix(" (deleted)")).name == exe:
            out.append(int(entry.name))
    return out


def _nothing() -> str:
    return ""


def _polling(timeout: float, interval: float) -> dict[str, Any]:
    """tenacity's arguments of a poll: retry while the condition is false
    (an exception is not retried: it ends the poll), every ``interval`` s, for
    at most ``timeout`` s, then return the last (false) result."""
    return {
        "retry": tenacity.retry_if_result(lambda ok: not ok),
        "wait": tenacity.wait_fixed(interval),
        "stop": tenacity.stop_after_delay(timeout),
        "retry_error_callback": lambda state: False,
    }


def poll_until(
    cond: Callable[[], object],
    timeout: float,
    what: str,
    *,
    interval: float = 0.01,
    detail: Callable[[], str] = _nothing,
) -> None:
    """Call ``cond()`` until it is true, for at most ``timeout`` seconds;
    ``TimeoutError("<what> not ready within ...")`` plus ``detail()`` otherwise.
    An exception from ``cond`` ends the wait (it is how a dead process is
    reported).  ``interval`` is a poll period, not a synchronisation sleep."""
    if not tenacity.Retrying(**_polling(timeout, interval))(lambda: bool(cond())):
        raise TimeoutError(f"{what} not ready within {timeout:g} s{detail()}")


async def apoll_until(
    cond: Callable[[], object | Awaitable[object]],
    timeout: float,
    what: str,
    *,
    interval: float = 0.01,
    detail: Callable[[], str] = _nothing,
) -> None:
    """``poll_until`` in an event loop: ``cond`` may be a coroutine function."""

    async def once() -> bool:
        result = cond()
        if isinstance(result, Awaitable):
            result = await result
        return bool(result)

    if not await tenacity.AsyncRetrying(**_polling(timeout, interval))(once):
        raise TimeoutError(f"{what} not ready within {timeout:g} s{detail()}")


def wait_exit(pid: int, timeout: float) -> bool:
    """Whether the process ``pid`` (any process, not only a child) is gone or
    a zombie within ``timeout`` seconds: poll(2) on a pidfd of it, or, without
    pidfds, ``/proc`` every 50 ms."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except (AttributeError, OSError):
        try:
            poll_until(
                lambda: process_state(pid) in (None, "Z"), timeout, f"pid {pid}", interval=0.05
            )
        except TimeoutError:
            return False
        return True
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(max(0, int(timeout * 1000))))
    finally:
        os.close(fd)


class ManagedProcess:
    """One child process at a time; its name, log and settings outlive it.

    Subclasses add what their program needs (an argv, a readiness probe);
    the verbs below are the same for all of them (see the module docstring).
    """

    kind = "process"
    """How messages name it ("etcd member", "node", "haproxy")."""

    def __init__(self, name: str, log: Path | None = None, *, new_session: bool = False) -> None:
        self.name = name
        self.log = log
        self.new_session = new_session
        self.proc: subprocess.Popen[Any] | None = None
        self._exe = ""
        self._pidfd: int | None = None
        self._exit: asyncio.Future[None] | None = None

    @property
    def what(self) -> str:
        """``"<kind> <name>"``, for messages."""
        return f"{self.kind} {self.name}".strip()

    # -- state -----------------------------------------------------------------

    def _require(self) -> subprocess.Popen[Any]:
        if self.proc is None:
            raise RuntimeError(f"{self.what} was never started")
        return self.proc

    @property
    def pid(self) -> int:
        return self._require().pid

    @property
    def returncode(self) -> int | None:
        """The exit status (negative: killed by that signal); None while it
        runs or before it was started.  Reaps it if it has exited."""
        if self.proc is None:
            return None
        if self.proc.returncode is None and self._exit_seen(0):
            self._reap()
        return self.proc.returncode

    def running(self) -> bool:
        """Started and not exited (a paused process runs)."""
        return self.proc is not None and self.returncode is None

    def stopped(self) -> bool:
        """Running but stopped (SIGSTOP)."""
        return self.running() and process_state(self.pid) in ("T", "t")

    # -- start -----------------------------------------------------------------

    def spawn(
        self,
        argv: Sequence[str],
        note: str = "",
        *,
        capture: bool = False,
        env: dict[str, str] | None = None,
    ) -> None:
        """Start ``argv``.  Its output is appended to the log after a banner
        (``note`` is added to it), or read from ``proc.stdout`` /
        ``proc.stderr`` (text, line-buffered) with ``capture``."""
        if self.running():
            raise RuntimeError(f"{self.what} is already running (pid {self.pid})")
        self._close()
        self._exe = Path(argv[0]).name
        out: IO[bytes] | int
        if capture:
            out = subprocess.PIPE
        elif self.log is None:
            out = subprocess.DEVNULL
        else:
            out = open(self.log, "ab")  # noqa: SIM115 - closed below, once the child has it
            out.write(f"=== {time.strftime('%H:%M:%S')} start{note} ===\n".encode())
            out.flush()
        try:
            self.proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.PIPE if capture else subprocess.STDOUT,
                start_new_session=self.new_session,
                env=env,
                text=capture,
                bufsize=1 if capture else -1,
            )
        finally:
            if not isinstance(out, int):
                out.close()
        with contextlib.suppress(AttributeError, OSError):  # no pidfds: see wait()
            self._pidfd = os.pidfd_open(self.proc.pid)

    # -- exits -----------------------------------------------------------------

    def _exit_seen(self, timeout: float | None) -> bool:
        """Whether the process exited, waiting up to ``timeout`` seconds
        (None: no limit) in poll(2) on its pidfd."""
        proc = self._require()
        if proc.returncode is not None:
            return True
        if self._pidfd is None:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                return False
            return True
        poller = select.poll()
        poller.register(self._pidfd, select.POLLIN)
        return bool(poller.poll(None if timeout is None else max(0, int(timeout * 1000))))

    def _reap(self) -> int:
        code = self._require().wait()  # it exited (or was reaped): returns at once
        self._close()
        return code

    def _close(self) -> None:
        """Close the pidfd, unless an event loop still watches it (its
        callback closes it: a closed fd's number could be reused under it)."""
        if self._pidfd is None or (self._exit is not None and not self._exit.done()):
            return
        os.close(self._pidfd)
        self._pidfd = None
        self._exit = None

    def wait(self, timeout: float | None = 30.0) -> int:
        """Block until the process exits (at most ``timeout`` seconds:
        ``subprocess.TimeoutExpired``); reap it; its exit status."""
        proc = self._require()
        if proc.returncode is not None:
            return proc.returncode
        if not self._exit_seen(timeout):
            raise subprocess.TimeoutExpired(proc.args, timeout or 0)
        return self._reap()

    async def exited(self) -> int:
        """Await the exit in the running event loop (the pidfd is one of its
        readers, no thread, no poll loop); reap it; its exit status.  Several
        tasks may await it at once."""
        proc = self._require()
        if proc.returncode is not None:
            return proc.returncode
        if self._pidfd is None:
            return await asyncio.to_thread(self.wait, None)
        if self._exit is None:
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[None] = loop.create_future()
            fd = self._pidfd

            def ready() -> None:
                loop.remove_reader(fd)
                if not fut.done():
                    fut.set_result(None)
                if proc.returncode is not None:  # reaped meanwhile: nobody else closes it
                    self._close()

            loop.add_reader(fd, ready)
            self._exit = fut
        await asyncio.shield(self._exit)
        return self._reap()

    # -- signals ---------------------------------------------------------------

    def signal(self, sig: int) -> None:
        """Send ``sig`` if the process still runs (through its pidfd)."""
        if not self.running():
            return
        if self._pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, sig)
        else:
            self._require().send_signal(sig)

    def terminate(self) -> None:
        """SIGTERM (after SIGCONT: a stopped process would not act on it);
        returns at once (see ``wait``, ``exited``, ``stop``)."""
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)

    def kill(self, timeout: float = 10.0) -> int | None:
        """SIGKILL; returns once reaped (its ports are then free to reuse) with
        its exit status; None if it was never started."""
        return self.stop(timeout, graceful=False)

    def stop(
        self, timeout: float = 10.0, *, graceful: bool = False, sig: int | None = None
    ) -> int | None:
        """Stop it and reap it; idempotent.  ``graceful``: ``sig`` (default
        SIGTERM) first, SIGKILL if it has not exited within ``timeout``;
        otherwise SIGKILL at once.  A new-session process's leftovers are
        killed too.  Its exit status; None if it was never started."""
        if self.proc is None:
            return None
        if self.running():
            if graceful:
                self.signal(sig if sig is not None else signal.SIGTERM)
                self.signal(signal.SIGCONT)
                if not self._exit_seen(timeout):
                    self.signal(signal.SIGKILL)
            else:
                self.signal(signal.SIGCONT)  # a stopped process dies on SIGKILL anyway
                self.signal(signal.SIGKILL)
        code = self.wait(timeout)
        if self.new_session:
            for pid in session_members(self.proc.pid, self._exe):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        return code

    def pause(self, timeout: float = 5.0) -> None:
        """SIGSTOP; returns once the kernel shows it stopped."""
        self._signal_until(signal.SIGSTOP, lambda s: s in ("T", "t"), "stopped", timeout)

    def resume(self, timeout: float = 5.0) -> None:
        """SIGCONT; returns once it runs again."""
        self._signal_until(signal.SIGCONT, lambda s: s not in ("T", "t", None), "running", timeout)

    def _signal_until(
        self, sig: int, done: Callable[[str | None], bool], what: str, timeout: float
    ) -> None:
        if not self.running():
            raise RuntimeError(f"{self.what} is not running")
        self.signal(sig)
        try:
            poll_until(lambda: done(process_state(self.pid)), timeout, self.what, interval=0.002)
        except TimeoutError:
            raise TimeoutError(f"{self.what} not {what} within {timeout} s") from None

    # -- readiness and logs ----------------------------------------------------

    def check_alive(self) -> None:
        """``ProcessExited`` with the log's tail if the process has exited."""
        code = self.returncode
        if self.proc is None:
            raise ProcessExited(f"{self.what} was not started")
        if code is not None:
            raise ProcessExited(f"{self.what} exited with {code}{self.log_tail()}")

    def wait_until(
        self, probe: Callable[[], object], timeout: float, *, interval: float = 0.01
    ) -> None:
        """Poll ``probe()`` until it is true while the process lives:
        ``ProcessExited`` if it exits, ``TimeoutError`` after ``timeout``
        seconds (both with the log's tail)."""

        def alive_and_ready() -> bool:
            self.check_alive()
            return bool(probe())

        poll_until(alive_and_ready, timeout, self.what, interval=interval, detail=self.log_tail)

    def log_text(self, chars: int = 3000) -> str:
        """The last ``chars`` characters of the log ("" if there is none)."""
        if self.log is None or not self.log.exists():
            return ""
        return self.log.read_text(errors="replace")[-chars:]

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the log after a line naming it, for error messages
        ("" if there is none)."""
        text = self.log_text(chars)
        return f"\n--- {self.log} ---\n{text}" if text else ""
