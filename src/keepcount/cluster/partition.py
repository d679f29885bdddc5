"""Network partitions on one machine: each node process a "host" of its own.

Every process of a local cluster listens on loopback in one network
namespace, so a partition cannot be a cable pulled between machines.  It is
made of two kernel features instead, and touches nothing but loopback:

- each node incarnation's process is put, the moment it is spawned, into a
  cgroup (v2) of its own slot (``keepcount-<pid>-<n>/node-1.a``): the slot is
  the "host" (a node id's replacement starts on its other slot, as it would
  on another machine);
- an nftables table (``inet keepcount_<pid>_<n>``) drops, on the output hook,
  the packets of that cgroup's sockets to the endpoints it is cut from
  (``socket cgroupv2``), and everyone's packets to the slot's own port.

So a partitioned node keeps running, keeps its memory and its open
connections, and simply stops hearing from (and being heard by) what it is
cut off from — a half-open TCP connection, not a refused one — until
``heal()``.  Modes (``MODES``):

- ``isolate``: the slot reaches neither the coordinator nor the store, and
  nobody (load balancer, supervisor, clients) reaches it;
- ``coordinator``: only the slot's packets to the coordinator are dropped:
  the load balancer still reaches a node that can no longer renew its claim;
- ``store``: only its packets to the store (a networked store: Cassandra).

Needs root, the ``nft`` command (Debian: ``apt-get install nftables``) and a
cgroup v2 hierarchy (``/sys/fs/cgroup`` itself, or ``/sys/fs/cgroup/unified``
on a hybrid host, where a symlink in ``/sys/fs/cgroup`` lets ``nft`` resolve
the cgroup's path); ``unavailable()`` says what is missing.

Example::

    parts = Partitions.create()
    parts.adopt("node-1.a", pid)                 # at spawn
    parts.cut("node-1.a", "coordinator", coordinator=["127.0.0.1:2379"],
              store=[], port=8101)
    ...
    parts.heal()
    parts.close()
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from keepcount.errors import KeepcountError

__all__ = ["INSTALL", "MODES", "PartitionError", "Partitions", "endpoints_of", "unavailable"]

log = logging.getLogger(__name__)

MODES = ("isolate", "coordinator", "store")
INSTALL = "apt-get install -y nftables"
CGROUP_ROOT = Path("/sys/fs/cgroup")
_SLOT = re.compile(r"[A-Za-z0-9_.-]{1,100}")
_SEQ = itertools.count(1)


class PartitionError(KeepcountError):
    """A partition could not be made or undone (nft or the cgroup refused)."""


def _cgroup2_mount() -> Path | None:
    """Where the cgroup v2 hierarchy is mounted (None: nowhere)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) > 2 and parts[2] == "cgroup2":
                return Path(parts[1])
    return None


def unavailable() -> str | None:
    """Why partitions cannot be made on this machine; None if they can."""
    if os.geteuid() != 0:
        return "network partitions need root (cgroups and nftables)"
    if shutil.which("nft") is None:
        return f"network partitions need the nft command: {INSTALL}"
    if _cgroup2_mount() is None:
        return "network partitions need a cgroup v2 hierarchy (none is mounted)"
    probe = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"nft cannot list tables here: {probe.stderr.strip()}"
    return None


def endpoints_of(url: str) -> list[tuple[str, int]]:
    """The ``host:port`` endpoints of a coordinator or store URL
    (``etcd://h:p,h:p/ns``, ``cassandra://h:p,.../ks``); [] for a file."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme == "sqlite":
        return []
    out = []
    for part in rest.split("/", 1)[0].split(","):
        host, _, port = part.rpartition(":")
        if host and port.isdigit():
            out.append((host.strip("[]"), int(port)))
    return out


@dataclass
class Partitions:
    """One cluster's partitions: its cgroups and its nftables table."""

    name: str
    """``keepcount-<pid>-<n>``: the cgroup directory and (with ``_``) the table."""
    mount: Path
    cuts: dict[str, str] = field(default_factory=dict)
    """slot -> mode, for the partitions in place."""

    @classmethod
    def create(cls) -> Partitions:
        """Make the cgroup root and the (empty) table; raises ``PartitionError``
        with what is missing if partitions cannot be made here."""
        why = unavailable()
        if why is not None:
            raise PartitionError(why)
        mount = _cgroup2_mount()
        assert mount is not None
        _clean_stale(mount)
        self = cls(f"keepcount-{os.getpid()}-{next(_SEQ)}", mount)
        (mount / self.name).mkdir(exist_ok=True)
        if mount != CGROUP_ROOT:
            # nft resolves "socket cgroupv2" paths under /sys/fs/cgroup only.
            link = CGROUP_ROOT / self.name
            if not link.exists():
                link.symlink_to(mount / self.name)
        self._nft(
            f"add table inet {self.table}\n"
            f"add chain inet {self.table} out {{ type filter hook output priority 0; }}\n"
        )
        return self

    @property
    def table(self) -> str:
        return self.name.replace("-", "_")

    def _cgroup(self, slot: str) -> Path:
        if not _SLOT.fullmatch(slot):
            raise ValueError(f"bad slot name {slot!r}")
        return self.mount / self.name / slot

    def adopt(self, slot: str, pid: int) -> None:
        """Put process ``pid`` (just spawned: before it opens a socket) into
        ``slot``'s cgroup.  A socket belongs to the cgroup its process was in
        when it was made."""
        path = self._cgroup(slot)
        path.mkdir(exist_ok=True)
        try:
            (path / "cgroup.procs").write_text(f"{pid}\n")
        except ProcessLookupError:  # it died already: nothing to partition
            pass
        except OSError as exc:
            raise PartitionError(f"cannot put pid {pid} in {path}: {exc}") from exc

    def cut(
        self,
        slot: str,
        mode: str,
        *,
        coordinator: Iterable[tuple[str, int]] = (),
        store: Iterable[tuple[str, int]] = (),
        port: int,
    ) -> None:
        """Partition ``slot`` (``MODES``) until ``heal()``."""
        if mode not in MODES:
            raise ValueError(f"unknown partition mode {mode!r}: choose from {MODES}")
        self._cgroup(slot).mkdir(exist_ok=True)
        cgroup = f'socket cgroupv2 level 2 "{self.name}/{slot}"'
        if mode == "isolate":
            # Everything its sockets send (requests and answers), and
            # everything sent to its port (new connections, old ones).
            rules = [
                f"add rule inet {self.table} out {cgroup} drop",
                f"add rule inet {self.table} out tcp dport {port} drop",
            ]
        else:
            targets = list(coordinator if mode == "coordinator" else store)
            if not targets:
                raise PartitionError(f"no {mode} endpoints to cut (a local file has no network)")
            rules = [
                f"add rule inet {self.table} out {cgroup} {_family(h)} daddr {h} tcp dport {p} drop"
                for h, p in targets
            ]
        self._nft("\n".join(rules) + "\n")
        self.cuts[slot] = mode

    def heal(self) -> None:
        """Undo every partition (established connections resume where they stalled)."""
        self._nft(f"flush chain inet {self.table} out\n")
        self.cuts.clear()

    def close(self) -> None:
        """Remove the table and the cgroups (after the cluster's processes are gone)."""
        with contextlib.suppress(PartitionError):
            self._nft(f"delete table inet {self.table}\n")
        _remove_cgroups(self.mount, self.name)

    def _nft(self, script: str) -> None:
        done = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True)
        if done.returncode != 0:
            raise PartitionError(f"nft refused {script.strip()!r}: {done.stderr.strip()}")


def _family(host: str) -> str:
    return "ip6" if ":" in host else "ip"


def _remove_cgroups(mount: Path, name: str) -> None:
    root = mount / name
    if root.is_dir():
        for child in root.iterdir():
            if child.is_dir():
                try:
                    child.rmdir()
                except OSError as exc:  # a process still in it: leave it, say so
                    log.warning("cannot remove cgroup %s: %s", child, exc)
        with contextlib.suppress(OSError):
            root.rmdir()
    link = CGROUP_ROOT / name
    if link.is_symlink():
        link.unlink()


def _clean_stale(mount: Path) -> None:
    """Tables and cgroups left by a run that died (its pid is gone)."""
    listing = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    for table, pid in re.findall(r"table inet (keepcount_(\d+)_\d+)", listing):
        if not Path(f"/proc/{pid}").exists():
            subprocess.run(["nft", "delete", "table", "inet", table], capture_output=True)
    for path in [*mount.glob("keepcount-*"), *CGROUP_ROOT.glob("keepcount-*")]:
        found = re.fullmatch(r"keepcount-(\d+)-\d+", path.name)
        if found and not Path(f"/proc/{found[1]}").exists():
            _remove_cgroups(mount, path.name)
