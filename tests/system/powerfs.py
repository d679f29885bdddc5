"""A FUSE filesystem that loses, at a power cut, everything that was not fsynced.

The daemon (``powerfs_daemon.py``, pyfuse3 over libfuse3) serves the mount;
``PowerLossFS`` here starts it, cuts its power and unmounts it.  Test
code, not part of the package.  Modelled on Jepsen's LazyFS.

What is durable
---------------
The daemon serves every file from memory.  Its "disk" is the directory
``DIR``, which holds only what was made durable:

- ``i<ino>``: a regular file's contents as of its last ``fsync`` /
  ``fdatasync`` (both persist the data, the size and the mtime: the pages
  written since the last sync, the file's size, as the file's own mtime);
- ``d<ino>.json``: a directory's entries (name -> [ino, mode, mtime]) as of its last
  ``fsync``, inode 1 being the root.  A create, mkdir, link, unlink or rename
  is durable only once the directory holding the entry is fsynced (a rename
  across directories: each side once its own directory is fsynced).

``--journal`` (``PowerLossFS(journal=True)``) models a filesystem with a
metadata journal instead (ext4, XFS, as they behave in practice): any fsync
also makes every pending entry of every directory durable.  File data stays
per file either way.

A **power cut** (``cut`` on the control socket) ends the daemon at once:
what was not synced (writes, truncations, new or removed entries) is
dropped with its memory, and the kernel's page cache of the mount with the
mount.  The next daemon started on ``DIR`` serves exactly the durable state
(files no durable entry reaches are deleted at start).  ``cut 512`` or
``cut 4096`` first **tears** the last unsynced ``write`` (if it is still
unsynced and crosses such a boundary): a prefix of it, ending at a random
512 B / 4 KiB boundary inside it, reaches the disk, the rest does not.

The "disk" directory itself is never fsynced: the host does not lose power,
only this mount does.

What SQLite needs of it (WAL mode, several processes on one file)
------------------------------------------------------------------
- POSIX (``fcntl``) and ``flock`` locks: not implemented here, so the kernel
  keeps them itself, per mount; processes of one host exclude each other
  as on a local filesystem.
- The ``-shm`` file ``mmap``'ed ``MAP_SHARED``: files are opened with the
  page cache (no ``direct_io``) and ``keep_cache``, so all processes share
  the kernel's pages of an inode and the kernel writes dirty mapped pages
  back to the daemon (on ``msync``, ``fsync``, when the mapping is closed,
  or by writeback).  Every change reaches the daemon through the kernel,
  so its caches (pages, attributes, entries) stay right while one daemon
  lives; a cut unmounts, which drops them.
- truncate, rename (plain and ``RENAME_NOREPLACE``), hard links, unlink of
  open files.  ``fallocate`` is not implemented (ENOSYS: the kernel answers
  EOPNOTSUPP and glibc's ``posix_fallocate`` falls back to writing); SQLite
  does not call it unless asked to (``SQLITE_FCNTL_CHUNK_SIZE``).

Control socket (a Unix stream socket; one request line, one reply line)::

    ping          -> ok
    stats         -> {"writes": N, "fsyncs": N, "dir_fsyncs": N, ...}   (JSON)
    cut [TEAR]    -> {"unsynced_files": N, "unsynced_bytes": N, "unsynced_dirs": N,
                      "torn": [INO, OFFSET, LENGTH, KEPT] or null, ...}
                     then the daemon exits (the mount is left dead:
                     ``PowerLossFS.cut`` unmounts it)
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from powerfs_daemon import TEARS

from keepcount.process import ManagedProcess

__all__ = ["TEARS", "PowerLossFS", "mounted"]


class PowerLossFS:
    """One power-loss mount, its daemon a ``ManagedProcess``, its state under ``root``.

    Example::

        fs = PowerLossFS(tmp_path / "power")
        fs.mount()                      # returns once the mount answers
        (fs.mountpoint / "f").write_bytes(b"lost")
        fs.power_cycle()                # cut + unmount + mount again
        assert not (fs.mountpoint / "f").exists()
        fs.unmount()

    ``unmount`` is idempotent and must run whatever happened (a fixture's
    ``finally``): it leaves no mount behind, dead or alive.
    """

    def __init__(self, root: Path, *, seed: int | None = None, journal: bool = False) -> None:
        self.root = root
        self.disk = root / "disk"
        self.mountpoint = root / "mnt"
        self.control = root / "ctl.sock"
        if len(str(self.control)) > 100:  # sun_path holds 108 bytes
            self.control = Path(f"/tmp/powerfs-{os.getpid()}-{id(self):x}.sock")
        self.seed = seed
        self.journal = journal
        self.process = ManagedProcess("powerfs", root / "powerfs.log")
        self.process.kind = "fuse daemon"
        self.cuts = 0

    def mount(self, timeout: float = 20.0) -> None:
        """Start a daemon on the durable state; returns once the mount and
        its control socket answer."""
        self.disk.mkdir(parents=True, exist_ok=True)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, str(Path(__file__).with_name("powerfs_daemon.py").resolve()), "--disk", str(self.disk),
                "--mountpoint", str(self.mountpoint), "--control", str(self.control)]  # fmt: skip
        if self.seed is not None:
            argv += ["--seed", str(self.seed + self.cuts)]
        if self.journal:
            argv.append("--journal")
        self.process.spawn(argv, f" (after {self.cuts} cuts)")
        self.process.wait_until(self._ready, timeout)

    def _ready(self) -> bool:
        try:
            return os.path.ismount(self.mountpoint) and self.ask("ping") == "ok"
        except OSError:
            return False

    def ask(self, request: str) -> str:
        """One request on the control socket; its reply line."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(str(self.control))
            s.sendall(request.encode() + b"\n")
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                reply += chunk
        return reply.decode().strip()

    def stats(self) -> dict[str, int]:
        result: dict[str, int] = json.loads(self.ask("stats"))
        return result

    def cut(self, tear: int = 0) -> dict[str, Any]:
        """Cut the power: everything unsynced is lost (a torn last write with
        ``tear`` = 512 or 4096); returns once the dead mount is gone, with
        the daemon's report of what it lost."""
        if tear not in TEARS:
            raise ValueError(f"tear must be one of {TEARS}")
        try:
            report: dict[str, Any] = json.loads(self.ask(f"cut {tear}"))
        except OSError as exc:
            self.process.signal(signal.SIGUSR1)
            raise RuntimeError(
                f"{self.process.what} did not cut: {exc!r}{self.process.log_tail()}"
            ) from exc
        self.process.wait(10)
        self._fusermount()
        self.cuts += 1
        return report

    def power_cycle(self, tear: int = 0) -> dict[str, Any]:
        """``cut`` then ``mount``: the mount shows the durable state only."""
        report = self.cut(tear)
        self.mount()
        return report

    def unmount(self) -> None:
        """Unmount (the daemon then exits) and reap the daemon; idempotent."""
        if os.path.ismount(self.mountpoint) or self._dead_mount():
            self._fusermount()
        if self.process.running():
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        with contextlib.suppress(FileNotFoundError):
            self.control.unlink()

    def _dead_mount(self) -> bool:
        """A mount whose daemon is gone ("Transport endpoint is not connected")."""
        try:
            os.stat(self.mountpoint)
        except OSError as exc:
            return exc.errno == errno.ENOTCONN
        return False

    def _fusermount(self) -> None:
        done = subprocess.run(["fusermount3", "-u", str(self.mountpoint)], capture_output=True)
        if done.returncode != 0:  # busy: detach it now, the kernel drops it once unused
            subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], check=True)

    def __enter__(self) -> PowerLossFS:
        self.mount()
        return self

    def __exit__(self, *exc: object) -> None:
        self.unmount()


def mounted(root: Path, seed: int | None = None) -> Iterator[PowerLossFS]:
    """A mounted ``PowerLossFS`` for a pytest fixture: always unmounted after."""
    fs = PowerLossFS(root, seed=seed)
    try:
        fs.mount()
        yield fs
    finally:
        fs.unmount()
