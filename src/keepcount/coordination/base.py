"""The Coordinator seam: what every coordination backend (etcd, ZooKeeper) provides.

A coordinator hands out *claims* on node ids.  A claim is held by one live
process at a time, carries a fencing *epoch* that only grows per node id, and
lives as long as its holder keeps renewing it: an etcd key bound to a lease,
or a ZooKeeper ephemeral znode bound to a session, both at
``/keepcount/<namespace>/nodes/<node>``.  The value published with a claim
(``Member.info``) tells others where the holder serves.

Contract of each method (the conformance suite in
``tests/integration/test_coordinator_conformance.py`` holds every backend to it):

``Coordinator.claim(node, info=None, *, ttl=DEFAULT_TTL, timeout=5.0) -> Claim``
    Take the node id and publish ``info``.  Raises ``InvalidInput`` for a bad
    node id, info or ttl, ``ClaimConflict`` (naming the holder's info) while
    a live holder has it, ``CoordinatorUnavailable`` if the coordinator did
    not answer within ``timeout`` seconds; nothing is left behind in either
    case (at worst a lease / session that runs out after ``ttl``).  The
    returned claim is already being renewed on a thread the coordinator
    owns.  The TTL actually granted (``Claim.ttl``) may be longer than asked:
    etcd grants whole seconds, ZooKeeper clamps to its session bounds.

``Coordinator.members(timeout=5.0) -> dict[str, Member]``
    Every node id claimed in the namespace right now, as one up-to-date read.
    ``CoordinatorUnavailable`` if unreachable within ``timeout`` seconds.

``Coordinator.watch(callback) -> Watch``
    Calls ``callback`` with the whole membership once at the start and again
    after every change; never concurrently with itself, always on a
    background thread of the coordinator's (never the caller's event loop),
    so a slow callback delays later calls but never a renewal.  Changes that
    arrive together may be delivered as one snapshot; a snapshot equal to
    the last one delivered is not delivered again.  While the coordinator is
    unreachable nothing is delivered; the watch reads the whole membership
    again when it is back.  An exception from the callback is logged and the
    watch goes on.  ``Watch.cancel()`` is idempotent; once it returns no
    further call starts (called from inside the callback, the running call
    finishes).

``Coordinator.evict(node, epoch, timeout=5.0) -> bool``
    Delete the node's claim iff it is still held at exactly ``epoch``
    (compare-and-delete, atomic in the coordinator); True if this call
    deleted it.  Meant for the failure detector once it has reaped that
    incarnation's process, so its successor need not wait out the TTL.  A
    holder that is in fact alive sees its claim lost.  False also when the
    claim was already on its way out (ZooKeeper: its session had expired) or
    when a retried attempt finds that its lost first attempt deleted it.
    ``CoordinatorUnavailable`` if unreachable within ``timeout``.

``Coordinator.close()``
    Release every claim made through it, cancel its watches and stop its
    threads; idempotent.  Other methods raise ``CoordinatorUnavailable``
    afterwards.

Every ``Coordinator`` method is thread-safe and blocking (at most its
timeout): call it from a thread (``asyncio.to_thread``), not from an event
loop that must stay responsive.

``Claim`` (thread-safe; everything is cheap and non-blocking except
``wait_lost`` and ``release``):

``deadline() -> float``
    The ``time.monotonic()`` instant until which the claim is surely still
    held in the coordinator: the *send* time of the last renewal that
    succeeded, plus the TTL, minus ``margin(ttl)``.  The coordinator cannot
    have let the claim expire before the request that renewed it arrived, so
    counting from the send time is safe whatever the network delay was.
    ``float("-inf")`` once lost or released.
``trusted() -> bool``
    ``not lost and time.monotonic() < deadline()``.  A node acknowledges
    nothing unless this is True (DESIGN G4).  It is computed from the clock,
    not by a renewal thread, so a process that was SIGSTOPped past its TTL
    sees False the moment it runs again, before any renewal ran.  It may
    turn True again after a coordinator outage if a renewal then succeeds:
    the lease / session and the key still existing at the same epoch prove
    nobody else held the node id meanwhile.
``lost``
    True once the coordinator said the claim is gone (lease expired, session
    expired, key deleted e.g. by ``evict``) or ``release()`` was called.
    Final: a lost claim never comes back; claim again for a new epoch.
    ``reason`` says which.
``wait_lost(timeout=None) -> bool``
    Block until ``lost`` (True) or the timeout (False).
``release()``
    Stop renewing and delete the claim in the coordinator (etcd: revoke the
    lease; ZooKeeper: close the session).  Idempotent; ``trusted()`` is False
    as soon as it is called.  Best effort when the coordinator is
    unreachable: the claim then runs out by itself after its TTL.

Time: every deadline is in ``time.monotonic()`` (``CLOCK_MONOTONIC``) terms,
which keeps counting while a process is stopped and does not move when the
wall clock is stepped (NTP, an operator: ``keepcount verify``'s ``clock``
fault jumps it hours either way and checks that no claim changes).  It does not count while
the host is suspended (a suspended holder's deadline would then be too
late), so keepcount nodes are not meant to run on hosts that suspend.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from keepcount.errors import InvalidInput

__all__ = [
    "DEFAULT_TTL",
    "MIN_MARGIN",
    "Claim",
    "ClaimState",
    "Coordinator",
    "Member",
    "Watch",
    "check_info",
    "check_ttl",
    "decode_info",
    "describe_holder",
    "encode_info",
    "margin",
    "renew_interval",
]

DEFAULT_TTL = 3.0
"""Seconds a claim outlives its holder's last renewal.

Short, because it bounds how long a crashed node's id stays blocked when the
failure detector cannot evict it, and how long a node cut off from the
coordinator may go on acknowledging (``ttl - margin``).  Long enough that a
loaded 2-core host and an etcd leader election (about 1 s with the loopback
settings of ``keepcount.cluster.etcd``, more under load) do not cost a
healthy node its trust: renewals run every ``ttl / 4`` and trust lasts
``0.75 * ttl`` after the last one that succeeded.  With 2 s, killing the etcd
leader under load made every node distrust its claim for a few hundred
milliseconds (60 client-visible 503s in one system test run); 3 s covers the
election.  etcd must
allow 2 s leases (its minimum is 1.5 election timeouts) and ZooKeeper 2 s
sessions (``minSessionTimeout`` = 2 ticks: ``tickTime`` <= 1 s).
"""

MIN_MARGIN = 0.2
"""Smallest safety margin in seconds; see ``margin``."""


def margin(ttl: float) -> float:
    """How much earlier than the coordinator a holder stops trusting its claim.

    ``max(0.25 * ttl, MIN_MARGIN)``.  Counting from the send time already
    covers network delay; the margin covers what happens after a caller
    checked ``trusted()``: the acknowledgement it then sends may go out late
    (a GC pause, a busy event loop, a loaded host), clocks on two hosts tick
    at slightly different rates, and a ZooKeeper follower reports session
    touches to its leader up to half a tick late.  A quarter of the TTL
    tolerates a stall of that size after the check and leaves three
    quarters of the TTL for renewals to get through.
    """
    return max(0.25 * ttl, MIN_MARGIN)


def renew_interval(ttl: float) -> float:
    """Seconds between renewals: ``ttl / 4``.

    The trust window after a successful renewal is ``ttl - margin`` (0.75 ttl
    for ttl >= 0.8 s), so two renewals in a row may fail (a leader
    election, a slow round trip) before the claim turns untrusted.
    """
    return ttl / 4


@dataclass(frozen=True, slots=True)
class Member:
    """A node id as the coordinator lists it."""

    node: str
    epoch: int
    """The claim's fencing epoch (etcd: create_revision; ZooKeeper: czxid)."""
    info: dict[str, str] = field(default_factory=dict)
    """What the holder published, e.g. ``{"url": ..., "pid": ..., "host": ...}``."""


@runtime_checkable
class Claim(Protocol):
    """A held node id; see the module docstring for the contract."""

    node: str
    epoch: int
    ttl: float

    def deadline(self) -> float: ...

    def trusted(self) -> bool: ...

    @property
    def lost(self) -> bool: ...

    def wait_lost(self, timeout: float | None = None) -> bool: ...

    def release(self) -> None: ...


@runtime_checkable
class Watch(Protocol):
    """A running membership watch."""

    def cancel(self) -> None: ...


@runtime_checkable
class Coordinator(Protocol):
    """Claims on node ids with fencing epochs; see the module docstring."""

    url: str

    def claim(
        self,
        node: str,
        info: Mapping[str, str] | None = None,
        *,
        ttl: float = DEFAULT_TTL,
        timeout: float = 5.0,
    ) -> Claim: ...

    def members(self, timeout: float = 5.0) -> dict[str, Member]: ...

    def watch(self, callback: Callable[[dict[str, Member]], None]) -> Watch: ...

    def evict(self, node: str, epoch: int, timeout: float = 5.0) -> bool: ...

    def close(self) -> None: ...


class ClaimState:
    """The local half of a claim, shared by the backends: deadline and loss.

    A backend calls ``renewed(sent, ttl)`` after each successful renewal and
    ``mark_lost(reason)`` when the coordinator says the claim is gone, and
    overrides ``_release_remote`` to give the claim back.  ``trusted()``
    reads the clock and two fields, no lock: it is called on every
    acknowledgement.
    """

    def __init__(self, node: str, epoch: int, ttl: float, sent: float) -> None:
        self.node = node
        self.epoch = epoch
        self.ttl = ttl
        self.reason: str | None = None
        """Why the claim was lost (None while it is not)."""
        self._lock = threading.Lock()
        self._lost = threading.Event()
        self._released = False
        self._deadline = sent + ttl - margin(ttl)

    def deadline(self) -> float:
        if self._lost.is_set():
            return float("-inf")
        return self._deadline

    def trusted(self) -> bool:
        return not self._lost.is_set() and time.monotonic() < self._deadline

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    def wait_lost(self, timeout: float | None = None) -> bool:
        return self._lost.wait(timeout)

    def renewed(self, sent: float, ttl: float) -> None:
        """A renewal sent at ``sent`` (monotonic) succeeded with ``ttl``."""
        with self._lock:
            if not self._lost.is_set():
                self._deadline = max(self._deadline, sent + ttl - margin(ttl))

    def mark_lost(self, reason: str) -> bool:
        """Record the loss; True if this call was the one that recorded it."""
        with self._lock:
            if self._lost.is_set():
                return False
            self.reason = reason
            self._lost.set()
            return True

    def release(self) -> None:
        with self._lock:
            first = not self._released
            self._released = True
        self.mark_lost("released")
        if first:
            self._release_remote()

    def _release_remote(self) -> None:
        """Give the claim back in the coordinator (best effort)."""

    def __repr__(self) -> str:
        state = (
            f"lost: {self.reason}" if self.lost else ("trusted" if self.trusted() else "untrusted")
        )
        return f"<{type(self).__name__} {self.node} epoch={self.epoch} ttl={self.ttl} {state}>"


# -- helpers shared by the backends -------------------------------------------


def check_info(info: Mapping[str, str] | None) -> dict[str, str]:
    """A copy of ``info`` as a plain str -> str dict; ``InvalidInput`` otherwise."""
    if info is None:
        return {}
    out: dict[str, str] = {}
    for k, v in info.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise InvalidInput(f"claim info must map str to str, got {k!r}: {v!r}")
        out[k] = v
    return out


def check_ttl(ttl: float) -> float:
    """The ttl as a float; ``InvalidInput`` unless it is in (0, 3600] seconds."""
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl <= 3600:
        raise InvalidInput(f"claim ttl must be a number of seconds in (0, 3600], got {ttl!r}")
    return float(ttl)


def encode_info(info: Mapping[str, str], **extra: str) -> bytes:
    """The value stored with a claim: ``{"info": {...}, **extra}`` as JSON."""
    return json.dumps({"info": dict(info), **extra}, sort_keys=True).encode()


def decode_value(raw: bytes | None) -> dict[str, object]:
    """The JSON object stored with a claim; ``{}`` for a foreign or damaged
    value (membership must not fail because one holder wrote something odd)."""
    if not raw:
        return {}
    try:
        doc = json.loads(raw)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def decode_info(raw: bytes | None) -> dict[str, str]:
    """The ``info`` part of ``encode_info``'s value."""
    info = decode_value(raw).get("info")
    if not isinstance(info, dict):
        return {}
    return {str(k): str(v) for k, v in info.items()}


def describe_holder(node: str, member: Member | None) -> str:
    """A ClaimConflict message naming the holder."""
    if member is None:
        return f"node id {node!r} is held by another process"
    details = ", ".join(f"{k}={v}" for k, v in sorted(member.info.items())) or "no info published"
    return f"node id {node!r} is held by another live process (epoch {member.epoch}: {details})"
