"""Slots: the worker processes of one host share its node id.

A *host* is what a node id names when a service runs as several worker
processes (``gunicorn -w 4``, ``uvicorn --workers 4``): every process that
opens a registry with ``node="web-1"`` takes a *slot* of that host by
itself.  A slot is a node id of the store: slot 0 is the host id itself
(``web-1``, so a single-process service keeps the node id and the rows it
always had), slot *i* is ``web-1@i``.

Choosing a slot
---------------
Liveness comes from a lock the kernel drops when its holder dies (even on
SIGKILL): an exclusive ``flock`` on ``<lock dir>/<slot>.lock``.  A process
tries the slots in order and keeps the first lock it gets, so it takes the
**lowest free slot**; a slot whose holder died is free again at once, and
one whose holder lives (or is stopped with SIGSTOP) is never taken.  So the
number of slots is the most processes alive at once, not the number ever
started: rows, disk and scrape cost stay flat however often workers recycle.

The lock directory is the one the SQLite store uses for its own claims
(``<file>-locks/``), so a slot and an exclusive claim of the same id (a
``keepcount node --id web-1``) exclude each other.  For a network store
(Cassandra, Bigtable) it is a local directory per store URL
(``KEEPCOUNT_LOCK_DIR``, default under the temp dir): locks only see the
processes of one machine, so one host id must be used by one machine at a
time.  Two machines with the same id do not corrupt anything — each claim
fences the previous holder, which then stops acknowledging — but they keep
fencing each other: give every host its own ``KEEPCOUNT_NODE``.

With a coordinator
------------------
``keepcount.open(url, node, coordinator="etcd://...")`` takes slots in the
coordinator instead: the lowest slot id it can claim (an etcd lease, a
ZooKeeper ephemeral node), whose epoch the store claim carries.  A slot is
free once its holder's lease expired or was evicted, so this works across
machines too.  A holder acknowledges nothing unless its claim is *trusted*
(``keepcount.coordination``: renewed recently enough that the coordinator
cannot have let it expire); once the claim is lost, the registry is fenced
for good.

One writer per slot
-------------------
Holding the lock, the process claims the slot in the store with the next
epoch (one more than the stored one): every write checks it, so a process
that held the slot before can never overwrite the new holder's values
(DESIGN G4, per slot).  The lock is what makes "next epoch" race-free: only
its holder reads and bumps the slot's epoch.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from keepcount.errors import (
    ClaimConflict,
    Fenced,
    InvalidInput,
    KeepcountError,
    OutcomeUnknown,
    StoreUnavailable,
)
from keepcount.naming import check_host_id

if TYPE_CHECKING:
    from keepcount.coordination.base import Claim, Coordinator
    from keepcount.stores.base import Store

__all__ = [
    "DEFAULT_MAX_SLOTS",
    "SLOT_SEPARATOR",
    "Claimer",
    "CoordinatorClaimer",
    "Hold",
    "LockClaimer",
    "SlotLock",
    "host_of",
    "lock_dir",
    "slot_id",
    "slot_index",
    "take_slot",
    "try_lock",
]

SLOT_SEPARATOR = "@"

DEFAULT_MAX_SLOTS = 64
"""Slots a host may have.  More workers than this alive at once get
``ClaimConflict``; far above what one machine runs, it only stops a runaway
(processes that never exit) from growing the store without bound."""

_SLOT = re.compile(r"(.+)@([1-9][0-9]*)")


def slot_id(host: str, index: int) -> str:
    """The store node id of slot ``index`` of ``host``: ``host``, ``host@1``, ..."""
    return host if index == 0 else f"{host}{SLOT_SEPARATOR}{index}"


def slot_index(node: str) -> int:
    """The slot number of a store node id (0 for a bare host id)."""
    m = _SLOT.fullmatch(node)
    return int(m.group(2)) if m else 0


def host_of(node: str) -> str:
    """The host a store node id belongs to (itself for slot 0)."""
    m = _SLOT.fullmatch(node)
    return m.group(1) if m else node


def lock_dir(url: str) -> Path:
    """Where the slot locks of the store at ``url`` live on this machine."""
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        return path.with_name(path.name + "-locks")
    base = os.environ.get("KEEPCOUNT_LOCK_DIR") or os.path.join(
        tempfile.gettempdir(), f"keepcount-locks-{os.getuid()}"
    )
    digest = hashlib.sha256(_canonical(url).encode()).hexdigest()[:16]
    return Path(base) / digest


def _canonical(url: str) -> str:
    """One spelling per store: the scheme lowercased and a host list sorted
    (``cassandra://b,a/ks`` and ``cassandra://a,b/ks`` name one store, and
    must share one lock directory or two live processes could share a slot)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    hosts, slash, tail = rest.partition("/")
    return f"{scheme.lower()}://{','.join(sorted(hosts.lower().split(',')))}{slash}{tail}"


class Hold(Protocol):
    """A slot held by this process."""

    @property
    def node(self) -> str:
        """The slot's store node id."""
        ...

    @property
    def epoch(self) -> int | None:
        """The epoch the store claim must carry; None: the next stored one."""
        ...

    def check(self) -> KeepcountError | None:
        """Before a write is acknowledged: None if the slot is surely still
        held, else the error (``Fenced`` when lost for good)."""
        ...

    def lease(self) -> Callable[[], bool] | None:
        """A coordinator lease's ``trusted`` (for ``Store.vouch``); None for a
        local lock, which says nothing about other machines."""
        ...

    def release(self) -> None:
        """Give the slot back (idempotent)."""
        ...

    def forget(self) -> None:
        """In a forked child: let go of what was inherited, without
        releasing the parent's hold."""
        ...


class Claimer(Protocol):
    """Takes the lowest free slot of a host (see the module docstring)."""

    def take(self, host: str) -> Hold: ...

    def live(self, host: str) -> set[str] | None:
        """The slots of ``host`` a live process holds now, without taking
        any; None if this claimer cannot tell."""
        ...

    def close(self) -> None:
        """Release what the claimer holds open (a coordinator client)."""
        ...

    def forget(self) -> None:
        """In a forked child: drop what was inherited, without using it."""
        ...


@dataclass
class SlotLock:
    """The held lock of one slot; ``release()`` (or the process's death) frees it."""

    host: str
    index: int
    path: Path
    fd: int | None

    epoch: int | None = None
    serving: bool = False
    """Set by the first write acknowledged in the slot (``check``), and
    recorded in the lock file for ``held_slots``."""

    @property
    def node(self) -> str:
        return slot_id(self.host, self.index)

    def lease(self) -> Callable[[], bool] | None:
        return None

    def check(self) -> KeepcountError | None:
        if not self.serving and self.fd is not None:
            # The first write since the slot was taken has landed, and with
            # it whatever the slot's new holder had to overwrite first (the
            # dead holder's live gauges): from now on the slot is live.
            with contextlib.suppress(OSError):
                os.pwrite(self.fd, _holder(SERVING).encode(), 0)
            self.serving = True
        return None  # held until this process dies: the kernel keeps it

    def release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)  # closing the last descriptor drops the flock

    def forget(self) -> None:
        """In a forked child: close the inherited descriptor.  The parent's
        copy still holds the lock (a flock belongs to the open file, which
        both share), so this frees nothing for others."""
        self.release()


def take_slot(directory: Path, host: str, max_slots: int = DEFAULT_MAX_SLOTS) -> SlotLock:
    """Lock the lowest free slot of ``host`` in ``directory``.

    Raises ``ClaimConflict`` naming the holders when all ``max_slots`` are
    held by live processes, ``StoreUnavailable`` if the directory cannot be
    used.
    """
    check_host_id(host)
    if max_slots < 1:
        raise InvalidInput(f"max_slots must be at least 1, got {max_slots}")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreUnavailable(f"cannot create the slot lock directory {directory}: {exc}") from exc
    holders = []
    for index in range(max_slots):
        path = directory / f"{slot_id(host, index)}.lock"
        fd = try_lock(path)
        if isinstance(fd, int):
            return SlotLock(host, index, path, fd)
        holders.append(f"{path.stem} by {fd}")
    if max_slots == 1:
        raise ClaimConflict(f"node {host!r} is already claimed: {holders[0]} (lock {path})")
    shown = "; ".join(holders[:4]) + (" ..." if len(holders) > 4 else "")
    raise ClaimConflict(
        f"node {host!r}: all {max_slots} slots are held by live processes ({shown}); "
        "raise max_slots or stop some"
    )


SERVING = "serving"


def _holder(state: str = "", pid: object = None) -> str:
    """What a lock file says of its holder (``ClaimConflict`` quotes it)."""
    pid = os.getpid() if pid is None else pid
    return f"pid {pid} on {socket.gethostname()}{' ' + state if state else ''}\n"


def held_slots(directory: Path, host: str) -> set[str] | None:
    """The slots of ``host`` a live process holds *and serves* now: locked,
    and its holder's first write in the slot landed (``SlotLock.check``).

    Until then the slot still shows its dead holder's rows, which its new
    holder has not overwritten yet; counting the slot as live then would
    show a dead process's live gauges.  Locks are read from ``/proc/locks``
    (Linux): trying them instead would take a free slot for a moment, and a
    worker starting then would skip it.  None where it cannot be read.
    """
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            table = f.read()
    except OSError:
        return None
    locked = {}
    for line in table.splitlines():
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF" (" -> " lines are waiters)
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[2] != "->":
            major, minor, inode = fields[5].split(":")
            locked[(int(major, 16), int(minor, 16), int(inode))] = fields[4]
    held = set()
    with contextlib.suppress(OSError):
        for path in directory.iterdir():
            node = path.name.removesuffix(".lock")
            if path.suffix != ".lock" or host_of(node) != host:
                continue
            with contextlib.suppress(OSError):
                st = path.stat()
                pid = locked.get((os.major(st.st_dev), os.minor(st.st_dev), st.st_ino))
                # The file names the holder that wrote it: until a new holder
                # rewrites it, it still names the dead one, who was serving.
                if pid is not None and path.read_text(errors="replace") == _holder(SERVING, pid):
                    held.add(node)
    return held


def try_lock(path: Path) -> int | str:
    """Lock ``path`` (an exclusive ``flock``, made if missing): the locked
    descriptor, or a description of the live holder ("pid N on host")."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StoreUnavailable(f"cannot open lock file {path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "a live process"
            os.close(fd)
            return holder
        # The file may have been unlinked and made again between open and
        # flock (a cleaner of the temp dir): a lock on an unlinked file
        # excludes nobody, so lock the file that is there now.
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                os.ftruncate(fd, 0)
                os.pwrite(fd, _holder().encode(), 0)
                return fd
        os.close(fd)


class LockClaimer:
    """Slots by local locks (``take_slot``) in the store's lock directory."""

    def __init__(self, url: str, max_slots: int = DEFAULT_MAX_SLOTS) -> None:
        self.directory = lock_dir(url)
        self.max_slots = max_slots

    def take(self, host: str) -> SlotLock:
        return take_slot(self.directory, host, self.max_slots)

    def live(self, host: str) -> set[str] | None:
        return held_slots(self.directory, host)

    def close(self) -> None:
        pass

    def forget(self) -> None:
        pass


@dataclass
class _CoordinatorHold:
    node: str
    claim: Claim

    @property
    def epoch(self) -> int:
        return self.claim.epoch

    def lease(self) -> Callable[[], bool] | None:
        return self.claim.trusted

    def check(self) -> KeepcountError | None:
        if self.claim.lost:
            return Fenced(f"slot {self.node!r}: the coordinator no longer holds its claim")
        if not self.claim.trusted():
            return OutcomeUnknown(
                f"slot {self.node!r}: the claim was not renewed in time to vouch for this "
                "write; not acknowledged"
            )
        return None

    def release(self) -> None:
        self.claim.release()

    def forget(self) -> None:
        pass  # the renewal runs on the parent's threads, which the child lacks


class CoordinatorClaimer:
    """Slots claimed in a coordinator (etcd, ZooKeeper): the lowest slot id
    no live holder has; its epoch fences the store.  The coordinator client
    is opened on first use and closed by ``close()`` (before a fork)."""

    def __init__(self, url: str, max_slots: int = DEFAULT_MAX_SLOTS, ttl: float | None = None):
        self.url = url
        self.max_slots = max_slots
        self.ttl = ttl
        self._coordinator: Coordinator | None = None

    def take(self, host: str) -> _CoordinatorHold:
        from keepcount.coordination import open_coordinator
        from keepcount.coordination.base import DEFAULT_TTL

        check_host_id(host)
        if self._coordinator is None:
            self._coordinator = open_coordinator(self.url)
        info = {"pid": str(os.getpid()), "host": socket.gethostname()}
        held = []
        for index in range(self.max_slots):
            node = slot_id(host, index)
            try:
                claim = self._coordinator.claim(node, info, ttl=self.ttl or DEFAULT_TTL)
            except ClaimConflict as exc:
                held.append(str(exc))
                continue
            return _CoordinatorHold(node, claim)
        raise ClaimConflict(
            f"node {host!r}: all {self.max_slots} slots are claimed in {self.url} by live "
            f"holders ({'; '.join(held[:3])}{' ...' if len(held) > 3 else ''})"
        )

    def live(self, host: str) -> set[str] | None:
        """The slots whose claim the coordinator lists now: a SIGKILLed
        holder's drops out once its lease ran out.  (Unlike local locks, a
        new holder counts from its claim, a few milliseconds before its first
        write.)  None if this process has no client open, or it fails."""
        if self._coordinator is None:
            return None  # not opened here: a scrape does not open one
        try:
            members = self._coordinator.members()
        except KeepcountError:
            return None
        return {node for node in members if host_of(node) == host}

    def close(self) -> None:
        coordinator, self._coordinator = self._coordinator, None
        if coordinator is not None:
            coordinator.close()

    def forget(self) -> None:
        if self._coordinator is not None:
            _inherited.append(self._coordinator)  # its threads are the parent's
            self._coordinator = None


_inherited: list[object] = []
"""Clients a forked child inherited and must never use nor close."""


def next_epoch(store: Store, node: str) -> int:
    """One more than ``node``'s stored epoch: only the holder of the slot's
    lock reads and bumps it, so no other claim can take the same one."""
    for record in store.nodes():
        if record.node == node:
            return record.epoch + 1
    return 1
