"""The SQLite store's lock files, in ``<file>-locks/`` beside the store file.

``<node>.lock``
    A claim without a coordinator: an exclusive ``flock`` held for the
    claim's lifetime (the kernel drops it when the process dies, even on
    SIGKILL).  The same file as slot 0 of a host (``keepcount.slots``).
``.writer.lock``
    The queue of this host's writers (``WriterTurn``); no node id starts
    with a dot, so it never names a node.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from keepcount.errors import ClaimConflict, StoreUnavailable
from keepcount.slots import try_lock

__all__ = ["WriterTurn", "lock_node"]


def _lock_dir(store: Path) -> Path:
    return store.with_name(store.name + "-locks")


def lock_node(store: Path, node: str) -> int:
    """The descriptor holding ``node``'s lock of ``store`` (closing it drops
    the lock); ``ClaimConflict`` naming the holder if another process has it."""
    lockdir = _lock_dir(store)
    path = lockdir / f"{node}.lock"  # the same file as slot 0 of a host (keepcount.slots)
    try:
        lockdir.mkdir(exist_ok=True)
    except OSError as exc:
        raise StoreUnavailable(f"cannot make lock directory {lockdir}: {exc}") from exc
    fd = try_lock(path)
    if isinstance(fd, str):
        raise ClaimConflict(f"node {node!r} is already claimed on {store} by {fd} (lock {path})")
    return fd


class WriterTurn:
    """This host's writers of one store file, queued in the kernel.

    Writers of one file queue on SQLite's write lock, whose busy handler
    *sleeps* (1, 2, 5, 10 ms ...) between tries: with several worker
    processes committing at once, most of a commit's time went to those
    sleeps.  A blocking ``flock`` on ``<file>-locks/.writer.lock`` queues
    them in the kernel instead, which wakes the next writer the moment the
    previous one is done.  SQLite's own lock still decides; this only
    orders who asks for it.  Not thread-safe: the store's lock is held.
    """

    def __init__(self, store: Path) -> None:
        self._store = store
        self._fd: int | None = None

    @contextlib.contextmanager
    def turn(self) -> Iterator[None]:
        """Wait for this host's turn to write (the lock held), without polling."""
        fd = self._fd
        if fd is None:
            lockdir = _lock_dir(self._store)
            try:
                lockdir.mkdir(exist_ok=True)
                fd = os.open(lockdir / ".writer.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError:
                yield  # a read-only directory: SQLite's busy handler alone orders writers
                return
            self._fd = fd
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
