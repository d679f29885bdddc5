"""The check of an SQLite store's WAL before SQLite recovers it.

Why: when the first connection opens a database whose ``-wal`` file holds a
frame with a bad checksum, SQLite takes that frame for the torn end of an
interrupted write and treats it *and every later frame* as absent.  A bit
flipped on disk in an early frame would so make acknowledged commits vanish
without any error, and row checksums cannot see that: the rows left are
consistent, only older.  So ``check_wal`` reads the WAL first.

The WAL (https://www.sqlite.org/fileformat2.html#walformat): a 32-byte
header (magic ``0x377f0682``/``0x377f0683``, whose low bit says the
checksums' word order, version, page size, checkpoint sequence, two salts,
a checksum of the first 24 bytes), then frames of a 24-byte header (page
number, database size in pages for a commit frame else 0, the two salts, a
checksum) and one page.  Each frame's checksum is cumulative: it is seeded
with the previous frame's (the header's for the first) and covers the first
8 bytes of its header and its page.

The rule: a frame whose checksum fails but which is followed by a frame of
the header's salts whose checksum chains from it (seeded with the bad
frame's stored checksum, or with the one it should have had when the flip
hit the stored checksum itself) was written whole and changed afterwards:
a flip, not a torn tail; the WAL header likewise.  That is refused with
``CorruptStore``, naming the frame and page and, when the rows of a
scratch copy with the chain's checksums recomputed show it, the node and
series whose value the flip changed.

What it cannot tell: a bad *last* frame (or a bad frame followed only by
frames of an older WAL generation) is indistinguishable from the torn,
unsynced tail a power cut leaves, which SQLite rightly drops; nothing
acknowledged is lost there, since ``synchronous=FULL`` fsyncs the WAL
before a commit is acknowledged.  Conversely, a disk that persists
unsynced writes out of order could leave an unacknowledged transaction's
early frame torn and its later frames whole; that looks like a flip and is
refused (a false alarm, never a silent loss).

Only the first opener is at risk: while any connection has the database
open, the WAL index in ``-shm`` is valid and SQLite reads WAL frames
without checking their checksums (the row checksums catch a flip there).
``check_wal`` therefore skips the scan while another connection holds the
``-shm`` file's lock (``/proc/locks``; the file is never opened here, since
closing a descriptor would drop this process's own SQLite locks on it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

from keepcount.errors import CorruptStore, StoreUnavailable
from keepcount.stores.sqlite.checksums import verify_rows

__all__ = ["WalFlip", "check_wal", "find_flip"]

_MAGIC = (0x377F0682, 0x377F0683)
_HEADER = 32
_FRAME_HEADER = 24
_MASK = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class WalFlip:
    """A frame (or the header: ``frame`` -1) changed after it was written."""

    frame: int
    page: int
    """The database page the frame holds (0 for the header)."""
    offset: int
    """Where the frame starts in the ``-wal`` file."""
    later_frames: int
    """Valid frames after it that SQLite would drop."""


def _checksum(data: bytes, s0: int, s1: int, big_endian: bool) -> tuple[int, int]:
    words = struct.unpack(f"{'>' if big_endian else '<'}{len(data) // 4}I", data)
    for i in range(0, len(words), 2):
        s0 = (s0 + words[i] + s1) & _MASK
        s1 = (s1 + words[i + 1] + s0) & _MASK
    return s0, s1


def find_flip(wal: bytes) -> WalFlip | None:
    """The first frame of ``wal`` (the whole ``-wal`` file) that was changed
    after it was written, per the rule in this module's docstring; None if
    every frame checks, or the first bad one may be a torn tail."""
    if len(wal) < _HEADER:
        return None
    magic, _version, page_size, _seq, salt1, salt2, c1, c2 = struct.unpack(">8I", wal[:_HEADER])
    if magic not in _MAGIC or page_size < 512 or page_size & (page_size - 1):
        return None  # not a WAL SQLite would read: it ignores the file
    big = bool(magic & 1)
    frame_size = _FRAME_HEADER + page_size
    frames = (len(wal) - _HEADER) // frame_size

    def frame(i: int) -> tuple[int, int, int, int, int, int, bytes]:
        at = _HEADER + i * frame_size
        fields = struct.unpack(">6I", wal[at : at + _FRAME_HEADER])
        return (*fields, wal[at : at + 8] + wal[at + _FRAME_HEADER : at + frame_size])

    def chains(i: int, seed: tuple[int, int]) -> bool:
        """Frame ``i`` is of this generation and checks when seeded with ``seed``."""
        if i >= frames:
            return False
        _page, _size, s1, s2, f1, f2, covered = frame(i)
        return (s1, s2) == (salt1, salt2) and _checksum(covered, *seed, big) == (f1, f2)

    def run(i: int, seed: tuple[int, int]) -> int:
        """How many frames from ``i`` on chain on from ``seed``."""
        count = 0
        while chains(i, seed):
            seed = frame(i)[4:6]
            i, count = i + 1, count + 1
        return count

    computed = _checksum(wal[:24], 0, 0, big)
    if computed != (c1, c2):
        later = max(run(0, (c1, c2)), run(0, computed))
        return WalFlip(-1, 0, 0, later) if later else None
    prev = computed
    for i in range(frames):
        page, _size, s1, s2, f1, f2, covered = frame(i)
        if (s1, s2) == (salt1, salt2):
            now = _checksum(covered, *prev, big)
            if now == (f1, f2):
                prev = now
                continue
        else:
            now = (f1, f2)
        later = max(run(i + 1, (f1, f2)), run(i + 1, now))
        return WalFlip(i, page, _HEADER + i * frame_size, later) if later else None
    return None


def _repaired(wal: bytes, flip: WalFlip) -> bytes:
    """``wal`` with every frame's checksum (and the header's) recomputed along
    the chain and cut after the transaction of the flipped frame: what it
    held then, but for the flipped byte itself (its page's latest version)."""
    out = bytearray(wal)
    magic, _v, page_size, _seq, salt1, salt2 = struct.unpack(">6I", wal[:24])
    big = bool(magic & 1)
    prev = _checksum(wal[:24], 0, 0, big)
    out[24:32] = struct.pack(">2I", *prev)
    frame_size = _FRAME_HEADER + page_size
    for at in range(_HEADER, len(wal) - frame_size + 1, frame_size):
        s1, s2 = struct.unpack(">2I", wal[at + 8 : at + 16])
        if (s1, s2) != (salt1, salt2):
            break
        prev = _checksum(wal[at : at + 8] + wal[at + _FRAME_HEADER : at + frame_size], *prev, big)
        out[at + 16 : at + 24] = struct.pack(">2I", *prev)
        (commit,) = struct.unpack(">I", wal[at + 4 : at + 8])
        if commit and at >= flip.offset:
            return bytes(out[: at + frame_size])
    return bytes(out)


def in_use(path: Path) -> bool:
    """True while any connection (of any process, this one included) has the
    database at ``path`` open in WAL mode: it holds a lock on ``-shm``."""
    try:
        st = os.stat(f"{path}-shm")
    except FileNotFoundError:
        return False
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            return any(dev in line.split() for line in f)
    except OSError:
        return False  # no /proc: scan anyway (a false alarm at worst, never a loss)


def check_wal(path: Path, where: str) -> None:
    """``CorruptStore`` if the WAL of the store at ``path`` has a frame that
    was changed after it was written (see the module docstring); nothing
    while another connection has the store open."""
    wal_path = Path(f"{path}-wal")
    if in_use(path):
        return
    try:
        wal = wal_path.read_bytes()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StoreUnavailable(f"cannot read {wal_path}: {exc}") from exc
    flip = find_flip(wal)
    if flip is None:
        return
    what = (
        "its header"
        if flip.frame < 0
        else f"frame {flip.frame} (page {flip.page}, offset {flip.offset})"
    )
    detail = _rows_hit(path, _repaired(wal, flip))
    raise CorruptStore(
        f"{where}: the write-ahead log {wal_path} is corrupt: {what} fails its checksum "
        f"although {flip.later_frames} later frame(s) chain from it, so it was changed after "
        "it was written (a flipped bit, not a torn write); SQLite would drop it and every "
        f"later commit, acknowledged ones included; refusing the store.{detail}"
    )


def _rows_hit(path: Path, wal: bytes) -> str:
    """What the rows of a scratch copy of the store with ``wal`` (repaired)
    show about the flip: the node and series it changed, if a row checksum
    sees it."""
    scratch = Path(tempfile.mkdtemp(prefix="keepcount-wal-"))
    try:
        copy = scratch / path.name
        shutil.copyfile(path, copy)
        Path(f"{copy}-wal").write_bytes(wal)
        conn = sqlite3.connect(copy, isolation_level=None)
        try:
            verify_rows(conn, path)
        finally:
            conn.close()
    except CorruptStore as exc:
        return f" The flipped frame holds this: {exc}"
    except (OSError, sqlite3.Error) as exc:
        return f" (Its rows could not be read: {exc}.)"
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(scratch)
    return (
        " No row checksum sees the flip: it hit the b-tree's structure, a created time "
        "or a help text."
    )
