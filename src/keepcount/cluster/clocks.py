"""Per-node wall clocks that a fault can jump: libfaketime, one offset file per node id.

A cluster whose spec asks for it (``ClusterSpec.extra["clocks"]``, set by
``keepcount verify`` when its faults include ``clock``) starts every
``keepcount node`` process with Debian's libfaketime preloaded (``env``):

- ``LD_PRELOAD`` = ``LIBFAKETIME`` (the multi-threaded build: the node's
  event loop, its flusher thread, the coordinator's and the Cassandra
  driver's threads all read the clock);
- ``FAKETIME_TIMESTAMP_FILE`` = ``<cluster>/clocks/<node id>.offset``, which
  holds the offset as libfaketime spells a relative time (``+7200``,
  ``-3600``, ``+0``: seconds from the real time); it is shared by every
  incarnation of the node id, so a node restarted while its clock is off
  starts with the same offset;
- ``FAKETIME_CACHE_DURATION`` = ``CACHE_SECONDS``: libfaketime re-reads the
  file at most that often (not at every ``time()`` call, which would be a
  file read per call);
- ``FAKETIME_DONT_FAKE_MONOTONIC=1``: only ``CLOCK_REALTIME`` (``time.time()``,
  ``datetime.now()``) jumps; ``CLOCK_MONOTONIC`` (``time.monotonic()``,
  asyncio's ``loop.time()``) runs on, as the kernel's does when an operator
  or NTP steps the wall clock.

``Clocks.set`` writes a node's offset (atomically: a temporary file renamed
over it, so libfaketime never reads half of one); ``jump`` also waits until
the node's own answers show it: the ``Date`` header that uvicorn stamps on
every response from the process's wall clock, compared with this process's
(``observed_offset``).  A jump that the node never shows is an error
(``ClockNotApplied``), never counted as injected.

What a node reads the wall clock for (the audit behind the ``clock`` fault):
only values it records or shows (``claimed_at``, ``released_at``, series'
``created`` times, ``ready_at``) and idempotency keys' expiry (``expires``,
a unix time; Cassandra TTLs and Bigtable owner entries count from it: a
jump larger than the keys' TTL forgets keys, as any TTL would).  Claims,
leases and fencing never do: the coordinators' local deadlines
(``keepcount.coordination.base.ClaimState``), their renewals and the
lifecycle's retry deadlines run on ``time.monotonic()``; etcd and ZooKeeper
expire leases and sessions on their servers' clocks; the stores fence with
counters (SQLite: the epoch inside every write transaction; Cassandra and
Bigtable: the incarnation and the generation of ``keepcount.stores.lww.Clock``,
a stored claim counter, never a time).  Libraries: gRPC (etcd) turns a
timeout into a deadline on the same faked clock and then keeps it on its
monotonic one; kazoo (ZooKeeper) uses ``time.monotonic()``; the Cassandra
driver used ``time.time()`` for every wait, now rebound to the monotonic
clock (``keepcount.stores.cassandra.driver_clock``).

Example::

    clocks = Clocks(spec.directory / "clocks")
    env = clocks.env("node-1")               # NodeProcess(..., env=env)
    await jump(clocks, "node-1", lambda: url, +7200)   # two hours ahead
    await jump(clocks, "node-1", lambda: url, 0)       # back to real time
"""

from __future__ import annotations

import email.utils
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from keepcount.process import apoll_until

__all__ = [
    "CACHE_SECONDS",
    "LIBFAKETIME",
    "TOLERANCE",
    "ClockNotApplied",
    "Clocks",
    "jump",
    "observed_offset",
    "unavailable",
]

LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1")
"""Debian's ``libfaketime`` package (``scripts/setup.sh`` installs ``faketime``)."""
CACHE_SECONDS = 1
"""How long libfaketime keeps an offset before it reads the file again."""
TOLERANCE = 5.0
"""Seconds an observed offset may differ from the one set: the ``Date``
header has whole seconds and uvicorn renews it once a second, libfaketime
re-reads the file every ``CACHE_SECONDS``, and the answer takes its time."""
APPLY_TIMEOUT = 30.0
"""Seconds a node has to show a new offset (a node being restarted meanwhile
has to start first)."""


class ClockNotApplied(RuntimeError):
    """The node did not show the offset it was given within ``APPLY_TIMEOUT``."""


def unavailable() -> str | None:
    """Why clock faults cannot run on this host, or None."""
    if not LIBFAKETIME.exists():
        return f"{LIBFAKETIME} is missing (install Debian's faketime package)"
    return None


@dataclass(frozen=True, slots=True)
class Clocks:
    """The offset files of one cluster's node ids, in ``directory``."""

    directory: Path

    def file(self, node: str) -> Path:
        return self.directory / f"{node}.offset"

    def env(self, node: str) -> dict[str, str]:
        """The environment variables that put ``node``'s processes on its
        offset file (created at offset 0 if it does not exist yet)."""
        if not self.file(node).exists():
            self.set(node, 0)
        return {
            "LD_PRELOAD": str(LIBFAKETIME),
            "FAKETIME_TIMESTAMP_FILE": str(self.file(node)),
            "FAKETIME_CACHE_DURATION": str(CACHE_SECONDS),
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        }

    def set(self, node: str, offset: float) -> None:
        """Put ``node``'s wall clock ``offset`` seconds from the real time (0:
        the real time again).  Its processes see it within ``CACHE_SECONDS``."""
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f".{node}.offset.tmp"
        tmp.write_text(f"{round(offset):+d}\n")
        os.replace(tmp, self.file(node))

    def offset(self, node: str) -> float:
        """The offset ``node`` was given last (0 if none)."""
        try:
            return float(self.file(node).read_text())
        except FileNotFoundError:
            return 0.0


async def observed_offset(url: str, timeout: float = 2.0) -> float | None:
    """The node at ``url``'s wall clock minus this process's, from the
    ``Date`` header of its ``/healthz``; None if it does not answer."""
    import aiohttp

    from keepcount.httpclient import new_session

    try:
        async with (
            new_session(connections=1, timeout=timeout, keepalive=False) as session,
            session.get(f"{url}/healthz") as response,
        ):
            date = response.headers.get("Date")
            now = time.time()
    except (OSError, aiohttp.ClientError):
        return None
    if date is None:
        return None
    return email.utils.parsedate_to_datetime(date).timestamp() - now


async def jump(clocks: Clocks, node: str, url: Callable[[], str | None], offset: float) -> float:
    """Set ``node``'s offset and wait until its process at ``url()`` (None:
    no process yet) shows it, within ``TOLERANCE``; the offset observed.
    ``ClockNotApplied`` if it does not within ``APPLY_TIMEOUT`` seconds."""
    clocks.set(node, offset)
    seen: list[float | None] = [None]

    async def shown() -> bool:
        where = url()
        seen[0] = None if where is None else await observed_offset(where)
        return seen[0] is not None and abs(seen[0] - offset) <= TOLERANCE

    try:
        await apoll_until(shown, APPLY_TIMEOUT, f"{node}'s clock at {offset:+.0f} s", interval=0.2)
    except TimeoutError:
        raise ClockNotApplied(
            f"{node}: its wall clock was set {offset:+.0f} s off, but its answers show "
            f"{'nothing' if seen[0] is None else f'{seen[0]:+.0f} s'} after {APPLY_TIMEOUT:g} s"
        ) from None
    assert seen[0] is not None
    return seen[0]
