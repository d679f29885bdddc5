"""The power-loss filesystem's daemon: the mount's state over its durable
"disk", and the FUSE operations serving it (pyfuse3, one trio task).

``python tests/system/powerfs_daemon.py --disk DIR --mountpoint MNT --control SOCK``
mounts it.  What it keeps, what a cut loses and the control socket are
described in ``powerfs``, whose ``PowerLossFS`` starts and cuts it.  Test
code, not part of the package.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import faulthandler
import json
import os
import random
import signal
import socket
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["PAGE", "TEARS", "Disk", "Inode", "PowerLossState", "main"]

PAGE = 4096
ROOT = 1
TEARS = (0, 512, 4096)
_TIMEOUT = 3600.0  # kernel cache lifetime of entries and attributes: every change goes through it


@dataclass
class Inode:
    """One file or directory as the mount shows it now (not as it is durable)."""

    ino: int
    mode: int
    nlink: int = 0
    data: bytearray = field(default_factory=bytearray)  # a file's contents
    entries: dict[bytes, int] = field(default_factory=dict)  # a directory's
    dirty: set[int] = field(default_factory=set)  # pages written since the last fsync
    low: int | None = None  # the smallest size since the last fsync (truncations)
    mtime_ns: int = field(default_factory=time.time_ns)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


class Disk:
    """The durable state: the ``--disk`` directory (layout in the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)

    def load(self) -> dict[int, Inode]:
        """Every inode a durable entry reaches, from the root; the rest is deleted."""
        inodes = {ROOT: Inode(ROOT, stat.S_IFDIR | 0o755, nlink=2)}
        todo = [ROOT]
        while todo:
            parent = inodes[todo.pop()]
            for name, (ino, mode, mtime) in self._entries(parent.ino).items():
                child = inodes.get(ino)
                if child is None:
                    child = inodes[ino] = Inode(ino, mode, mtime_ns=mtime)
                    if child.is_dir:
                        child.nlink = 1
                        todo.append(ino)
                    else:
                        with contextlib.suppress(FileNotFoundError):
                            f = self.path / f"i{ino}"
                            child.data = bytearray(f.read_bytes())
                            child.mtime_ns = f.stat().st_mtime_ns  # as of its fsync
                child.nlink += 1
                if child.is_dir:
                    parent.nlink += 1
                parent.entries[os.fsencode(name)] = ino
        for f in self.path.iterdir():
            kind, num = f.name[:1], f.name[1:].split(".")[0]
            if kind not in "id" or not num.isdigit() or int(num) not in inodes:
                f.unlink()
        return inodes

    def _entries(self, ino: int) -> dict[str, list[int]]:
        try:
            return dict(json.loads((self.path / f"d{ino}.json").read_text()))
        except FileNotFoundError:
            return {}

    def sync_file(self, node: Inode) -> None:
        fd = os.open(self.path / f"i{node.ino}", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if node.low is not None:
                os.ftruncate(fd, node.low)
            for page in sorted(node.dirty):
                chunk = node.data[page * PAGE : (page + 1) * PAGE]
                if chunk:
                    os.pwrite(fd, chunk, page * PAGE)
            os.ftruncate(fd, len(node.data))
            # fsync persists the inode too: programs compare mtimes after a
            # restart (Cassandra's transaction logs refuse files newer than
            # their records).
            os.utime(fd, ns=(node.mtime_ns, node.mtime_ns))
        finally:
            os.close(fd)
        node.dirty.clear()
        node.low = None

    def sync_dir(self, node: Inode, inodes: dict[int, Inode]) -> None:
        entries = {
            os.fsdecode(n): [i, inodes[i].mode, inodes[i].mtime_ns] for n, i in node.entries.items()
        }
        tmp = self.path / f"d{node.ino}.json.tmp"
        tmp.write_text(json.dumps(entries))
        os.replace(tmp, self.path / f"d{node.ino}.json")

    def tear(self, ino: int, offset: int, data: bytes, keep: int) -> None:
        """The first ``keep`` bytes of an unsynced write reach the disk."""
        fd = os.open(self.path / f"i{ino}", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            before = os.fstat(fd)
            os.pwrite(fd, data[:keep], offset)
            os.utime(fd, ns=(before.st_atime_ns, before.st_mtime_ns))  # no inode update
        finally:
            os.close(fd)


class PowerLossState:
    """The mount's state in memory, over a ``Disk``: every operation the
    daemon serves, without FUSE (``Operations`` translates)."""

    def __init__(self, disk: Disk, seed: int | None = None, *, journal: bool = False) -> None:
        self.disk = disk
        self.inodes = disk.load()
        self.next_ino = max(self.inodes) + 1
        self.durable_dirs = {i: dict(n.entries) for i, n in self.inodes.items() if n.is_dir}
        self.last_write: tuple[int, int, bytes] | None = None  # (ino, offset, data), unsynced
        self.rnd = random.Random(seed)
        self.journal = journal  # see ``fsync``
        self.counts = {"writes": 0, "fsyncs": 0, "dir_fsyncs": 0, "withdrawn": 0}

    def get(self, ino: int) -> Inode:
        try:
            return self.inodes[ino]
        except KeyError:
            raise OSError(errno.ENOENT, "no such inode") from None

    def child(self, parent: int, name: bytes) -> Inode:
        ino = self.get(parent).entries.get(name)
        if ino is None:
            raise OSError(errno.ENOENT, "no such entry")
        return self.get(ino)

    def make(self, parent: int, name: bytes, mode: int) -> Inode:
        p = self.get(parent)
        if name in p.entries:
            raise OSError(errno.EEXIST, "exists")
        node = Inode(self.next_ino, mode, nlink=2 if stat.S_ISDIR(mode) else 1)
        self.next_ino += 1
        self.inodes[node.ino] = node
        p.entries[name] = node.ino
        if node.is_dir:
            p.nlink += 1
        return node

    def link(self, ino: int, parent: int, name: bytes) -> Inode:
        p, node = self.get(parent), self.get(ino)
        if name in p.entries:
            raise OSError(errno.EEXIST, "exists")
        p.entries[name] = ino
        node.nlink += 1
        return node

    def remove(self, parent: int, name: bytes, *, directory: bool) -> None:
        p, node = self.get(parent), self.child(parent, name)
        if directory != node.is_dir:
            raise OSError(errno.ENOTDIR if directory else errno.EISDIR, "wrong kind")
        if directory and node.entries:
            raise OSError(errno.ENOTEMPTY, "not empty")
        del p.entries[name]
        node.nlink -= 2 if directory else 1
        if directory:
            p.nlink -= 1

    def rename(self, old: int, name: bytes, new: int, new_name: bytes, noreplace: bool) -> None:
        node = self.child(old, name)
        target = self.get(new).entries.get(new_name)
        if target == node.ino:
            return
        if target is not None:
            if noreplace:
                raise OSError(errno.EEXIST, "exists")
            self.remove(new, new_name, directory=self.inodes[target].is_dir)
        del self.get(old).entries[name]
        self.get(new).entries[new_name] = node.ino
        if node.is_dir:
            self.get(old).nlink -= 1
            self.get(new).nlink += 1

    def write(self, ino: int, offset: int, buf: bytes) -> int:
        node = self.get(ino)
        end = offset + len(buf)
        if end > len(node.data):
            node.data.extend(bytes(end - len(node.data)))
        node.data[offset:end] = buf
        node.dirty.update(range(offset // PAGE, (end - 1) // PAGE + 1))
        node.mtime_ns = time.time_ns()
        self.last_write = (ino, offset, bytes(buf))
        self.counts["writes"] += 1
        return len(buf)

    def truncate(self, ino: int, size: int) -> None:
        node = self.get(ino)
        node.low = min(size, len(node.data) if node.low is None else node.low)
        if size < len(node.data):
            del node.data[size:]
        else:
            node.data.extend(bytes(size - len(node.data)))
        node.mtime_ns = time.time_ns()

    def fsync(self, ino: int) -> None:
        """Make ``ino`` durable: a file's data and size, a directory's entries.
        With ``journal``, any fsync also makes every directory's entries
        durable, as ext4's and XFS's metadata journals do in practice (one
        commit carries all earlier namespace changes); without it, only
        the fsynced directory's, as POSIX promises."""
        node = self.get(ino)
        if self.journal:
            dirs = [
                n
                for i, n in self.inodes.items()
                if n.is_dir and n.entries != self.durable_dirs.get(i)
            ]
        else:
            dirs = [node] if node.is_dir else []
        for d in dirs:
            self.disk.sync_dir(d, self.inodes)
            self.durable_dirs[d.ino] = dict(d.entries)
        if node.is_dir:
            self.counts["dir_fsyncs"] += 1
            return
        self.disk.sync_file(node)
        if self.last_write is not None and self.last_write[0] == ino:
            self.last_write = None
        self.counts["fsyncs"] += 1

    def cut(self, tear: int) -> dict[str, Any]:
        """What a power cut now loses (and, with ``tear``, tears): a report.
        The caller ends the process: memory is the unsynced state."""
        files = [n for n in self.inodes.values() if n.dirty or n.low is not None]
        dirs = [
            i for i, n in self.inodes.items() if n.is_dir and n.entries != self.durable_dirs.get(i)
        ]
        report: dict[str, Any] = {
            **self.counts,
            "unsynced_files": len(files),
            "unsynced_bytes": sum(min(len(n.dirty) * PAGE, len(n.data)) for n in files),
            "unsynced_dirs": len(dirs),
            "torn": None,
        }
        if tear and self.last_write is not None:
            ino, offset, data = self.last_write
            bounds = range((offset // tear + 1) * tear, offset + len(data), tear)
            if bounds:
                keep = self.rnd.choice(bounds) - offset
                self.disk.tear(ino, offset, data, keep)
                report["torn"] = [ino, offset, len(data), keep]
        return report


# -- the FUSE side ---------------------------------------------------------------------


def _operations(state: PowerLossState) -> Any:
    """A ``pyfuse3.Operations`` serving ``state`` (imported here: the parent
    side of this module needs no pyfuse3)."""
    import pyfuse3

    def attrs(node: Inode) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        a.generation = 0
        a.entry_timeout = a.attr_timeout = _TIMEOUT
        a.st_mode = node.mode
        a.st_nlink = node.nlink
        a.st_uid, a.st_gid = os.getuid(), os.getgid()
        a.st_size = len(node.data) if not node.is_dir else PAGE
        a.st_blksize = PAGE
        a.st_blocks = (a.st_size + 511) // 512
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = node.mtime_ns
        return a

    def fuse(fn: Any) -> Any:
        """OSError -> FUSEError: the state's errors reach the caller as errno."""

        async def wrapper(self: Any, *args: Any) -> Any:
            try:
                return fn(self, *args)
            except OSError as exc:
                raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None

        return wrapper

    def info(ino: int) -> pyfuse3.FileInfo:
        return pyfuse3.FileInfo(fh=ino, keep_cache=True)

    class Operations(pyfuse3.Operations):  # type: ignore[misc]
        supports_dot_lookup = True
        enable_writeback_cache = False  # every write() reaches the daemon before it returns

        @fuse
        def lookup(self, parent: int, name: bytes, ctx: Any) -> Any:
            if name == b".":
                return attrs(state.get(parent))
            if name == b"..":
                parents = [n for n in state.inodes.values() if parent in n.entries.values()]
                return attrs(parents[0] if parents else state.get(ROOT))
            return attrs(state.child(parent, name))

        @fuse
        def getattr(self, ino: int, ctx: Any) -> Any:
            return attrs(state.get(ino))

        @fuse
        def setattr(self, ino: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> Any:
            node = state.get(ino)
            if fields.update_size:
                state.truncate(ino, attr.st_size)
            if fields.update_mode:
                node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(attr.st_mode)
            if fields.update_mtime:
                node.mtime_ns = attr.st_mtime_ns
            return attrs(node)

        @fuse
        def mknod(self, parent: int, name: bytes, mode: int, rdev: int, ctx: Any) -> Any:
            if not stat.S_ISREG(mode):
                raise OSError(errno.EPERM, "only regular files")
            return attrs(state.make(parent, name, mode))

        @fuse
        def mkdir(self, parent: int, name: bytes, mode: int, ctx: Any) -> Any:
            return attrs(state.make(parent, name, stat.S_IFDIR | stat.S_IMODE(mode)))

        @fuse
        def create(self, parent: int, name: bytes, mode: int, flags: int, ctx: Any) -> Any:
            node = state.make(parent, name, stat.S_IFREG | stat.S_IMODE(mode))
            return info(node.ino), attrs(node)

        @fuse
        def link(self, ino: int, parent: int, name: bytes, ctx: Any) -> Any:
            return attrs(state.link(ino, parent, name))

        @fuse
        def unlink(self, parent: int, name: bytes, ctx: Any) -> None:
            state.remove(parent, name, directory=False)

        @fuse
        def rmdir(self, parent: int, name: bytes, ctx: Any) -> None:
            state.remove(parent, name, directory=True)

        @fuse
        def rename(
            self, old: int, name: bytes, new: int, new_name: bytes, flags: int, ctx: Any
        ) -> None:
            if flags & pyfuse3.RENAME_EXCHANGE:
                raise OSError(errno.EINVAL, "RENAME_EXCHANGE is not supported")
            state.rename(old, name, new, new_name, bool(flags & pyfuse3.RENAME_NOREPLACE))

        @fuse
        def open(self, ino: int, flags: int, ctx: Any) -> Any:
            state.get(ino)
            return info(ino)

        @fuse
        def read(self, fh: int, offset: int, size: int) -> bytes:
            return bytes(state.get(fh).data[offset : offset + size])

        @fuse
        def write(self, fh: int, offset: int, buf: bytes) -> int:
            return state.write(fh, offset, buf)

        @fuse
        def fsync(self, fh: int, datasync: bool) -> None:
            state.fsync(fh)

        @fuse
        def opendir(self, ino: int, ctx: Any) -> int:
            if not state.get(ino).is_dir:
                raise OSError(errno.ENOTDIR, "not a directory")
            return ino

        @fuse
        def readdir(self, fh: int, start: int, token: Any) -> None:
            names = sorted(state.get(fh).entries.items())
            for i, (name, ino) in enumerate(names[start:], start + 1):
                if not pyfuse3.readdir_reply(token, name, attrs(state.get(ino)), i):
                    return

        @fuse
        def fsyncdir(self, fh: int, datasync: bool) -> None:
            state.fsync(fh)

        @fuse
        def flush(self, fh: int) -> None:
            pass

        @fuse
        def release(self, fh: int) -> None:
            pass

        @fuse
        def releasedir(self, fh: int) -> None:
            pass

        @fuse
        def access(self, ino: int, mode: int, ctx: Any) -> bool:
            return True

        @fuse
        def statfs(self, ctx: Any) -> Any:
            s = pyfuse3.StatvfsData()
            s.f_bsize = s.f_frsize = PAGE
            s.f_blocks = s.f_bfree = s.f_bavail = 1 << 20
            s.f_files = s.f_ffree = s.f_favail = 1 << 20
            s.f_namemax = 255
            return s

    return Operations()


async def _serve(state: PowerLossState, control: Path) -> None:
    import pyfuse3
    import trio

    async def answer(conn: Any) -> None:
        with conn, contextlib.suppress(OSError):  # a client gone meanwhile
            request = (await conn.recv(256)).decode().split() or ["?"]
            if request[0] == "cut":
                tear = int(request[1]) if len(request) > 1 else 0
                await conn.send(json.dumps(state.cut(tear)).encode() + b"\n")
                os._exit(0)  # the power is off: nothing else runs, nothing is flushed
            reply = "ok" if request[0] == "ping" else json.dumps(state.counts)
            await conn.send(reply.encode() + b"\n")

    async def control_loop() -> None:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            control.unlink()
        await sock.bind(str(control))
        sock.listen(8)
        while True:
            conn, _ = await sock.accept()
            await answer(conn)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(control_loop)
        # One request task: with more, two can race from one "readable" to
        # the read of /dev/fuse.  Handlers never await, so one task loses
        # nothing.  Even one task can find nothing to read: a request whose
        # process is SIGKILLed before the read is withdrawn by the kernel.
        # A blocking read would then stall the whole event loop (the control
        # socket too: a cut timed out in CI) until the next request, so the
        # descriptor is non-blocking and that read fails with EAGAIN, which
        # ends pyfuse3's loop: it is simply started again.
        withdrawn = True
        while withdrawn:
            withdrawn = False
            try:
                await pyfuse3.main(min_tasks=1, max_tasks=1)  # returns once unmounted
            except* BlockingIOError:
                withdrawn = True
                state.counts["withdrawn"] += 1  # reported by "stats" and "cut"
        nursery.cancel_scope.cancel()


def _fuse_descriptor() -> int:
    """This mount's /dev/fuse descriptor (pyfuse3 keeps it private)."""
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                return int(name)
    raise RuntimeError("no /dev/fuse descriptor after pyfuse3.init")


def main(argv: list[str] | None = None) -> int:
    import pyfuse3
    import trio

    p = argparse.ArgumentParser(prog="python powerfs_daemon.py")
    p.add_argument("--disk", type=Path, required=True)
    p.add_argument("--mountpoint", type=Path, required=True)
    p.add_argument("--control", type=Path, required=True)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--journal", action="store_true", help="any fsync commits every entry")
    args = p.parse_args(argv)
    faulthandler.register(signal.SIGUSR1)  # a stuck daemon's stacks, into its log
    state = PowerLossState(Disk(args.disk), args.seed, journal=args.journal)
    options = set(pyfuse3.default_options) | {"fsname=powerfs", "subtype=powerfs"}
    pyfuse3.init(_operations(state), str(args.mountpoint), options)
    os.set_blocking(_fuse_descriptor(), False)  # see _serve
    try:
        trio.run(_serve, state, args.control)
    except BaseException:
        pyfuse3.close(unmount=True)
        raise
    pyfuse3.close(unmount=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
