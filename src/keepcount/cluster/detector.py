"""The failure detector of a local cluster: exits awaited, claims watched, nodes probed.

It runs in the supervisor's event loop and reacts to three things:

- **an exit**, awaited per incarnation (``ManagedProcess.exited``: the
  process's pidfd is a reader of the loop; nothing is polled).  A current
  incarnation that exited (killed, crashed, or stopped after losing its
  claim) is reaped; if the coordinator still lists that very process as the
  holder (a killed node's lease outlives it by up to its TTL), its claim is
  evicted at once — safe, because the process is known dead — and a new
  incarnation starts after the launcher's backoff.  An old (replaced)
  incarnation's exit is only recorded.
- **the coordinator's membership**, delivered by its watch.  A current
  incarnation that the coordinator once listed and no longer does for
  ``ABSENT_GRACE`` seconds (paused with SIGSTOP past its TTL, or cut off) is
  alive but no longer the holder: it is left alone — it can acknowledge
  nothing, and stops by itself if it ever runs again — and a new incarnation
  starts on the node's *other* slot (its port is still held).
- **``/readyz``** of each current incarnation, probed every ``PROBE_EVERY``
  seconds (``keepcount.httpclient``), for ``status``, the events and the
  cluster's readiness: ``ready`` is set once every node was ready and the
  load balancer routes to each of them.

Every event goes to the supervisor's ``EventLog``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Coroutine
from typing import Any

import aiohttp

from keepcount import httpclient
from keepcount.cluster.balancer import LoadBalancer
from keepcount.cluster.events import EventLog, signal_name
from keepcount.cluster.launcher import Incarnation, Launcher, NodeState
from keepcount.cluster.spec import slot_name
from keepcount.coordination.base import Coordinator, Member, Watch
from keepcount.errors import KeepcountError
from keepcount.process import apoll_until, process_state

__all__ = ["ABSENT_GRACE", "PROBE_EVERY", "PROBE_TIMEOUT", "FailureDetector"]

log = logging.getLogger("keepcount.cluster")

PROBE_EVERY = 0.1
"""Seconds between two ``/readyz`` probes of a node."""
PROBE_TIMEOUT = 0.5
ABSENT_GRACE = 0.3
"""Seconds a claimed, live node may be missing from the coordinator's
membership before it is replaced (covers a watch event racing a renewal)."""
READY_POLL = 0.02
"""Seconds between two looks at the balancer's view while the cluster starts."""


class FailureDetector:
    """See the module docstring.  ``watch`` the coordinator, then ``await
    run(coordinator, balancer)`` until cancelled (set ``stopping`` first: an
    exit is then recorded, not restarted)."""

    def __init__(
        self,
        nodes: dict[str, NodeState],
        launcher: Launcher,
        events: EventLog,
        ready: asyncio.Event,
    ) -> None:
        self.nodes = nodes
        self.launcher = launcher
        self.events = events
        self.ready = ready
        """Set once every node was ready at least once after start-up."""
        self.members: dict[str, Member] = {}
        """The coordinator's membership as last seen by its watch."""
        self.members_at: float | None = None
        self.stopping = False
        self.started = time.time()
        self._coordinator: Coordinator | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # -- the coordinator's membership -----------------------------------------------

    def watch(self, coordinator: Coordinator, loop: asyncio.AbstractEventLoop) -> Watch:
        """Follow ``coordinator``'s membership (blocking: call it in a thread)."""
        self._coordinator = coordinator
        self._loop = loop
        return coordinator.watch(self._on_members)

    def _on_members(self, members: dict[str, Member]) -> None:
        # The coordinator's watch thread: hand the snapshot to the loop.
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._set_members, dict(members))

    def _set_members(self, members: dict[str, Member]) -> None:
        self.members = members
        self.members_at = time.monotonic()
        self._check_claims()

    def _check_claims(self) -> None:
        if self.stopping:
            return
        now = time.monotonic()
        for ns in self.nodes.values():
            cur = ns.current
            if cur is not None and cur.exit_code is None:
                self._check_claim(ns, cur, now)

    def _check_claim(self, ns: NodeState, inc: Incarnation, now: float) -> None:
        member = self.members.get(ns.spec.id)
        if member is not None and member.info.get("pid") == str(inc.pid):
            if not inc.claimed:
                inc.claimed = True
                inc.epoch = member.epoch
                self.events.append("claimed", ns.spec.id, pid=inc.pid, epoch=member.epoch)
            inc.absent_since = None
            return
        if not inc.claimed or self.members_at is None:
            return
        if inc.absent_since is None:
            inc.absent_since = now
            assert self._loop is not None
            self._loop.call_later(ABSENT_GRACE, self._check_claims)
        elif now - inc.absent_since >= ABSENT_GRACE and inc.process.returncode is None:
            # Alive, but no longer the holder: paused past its TTL, or cut off.
            inc.stale = True
            inc.ready = False
            ns.stale.append(inc)
            ns.current = None
            ns.next_start = now
            holder = member.info.get("pid") if member is not None else None
            self.events.append(
                "claim_lost", ns.spec.id, pid=inc.pid, epoch=inc.epoch,
                state=process_state(inc.pid), holder_pid=holder,
            )  # fmt: skip
            self._launch(ns)

    # -- exits -----------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _launch(self, ns: NodeState) -> None:
        """Start ``ns``'s next incarnation (a fork and exec: milliseconds) and
        await its exit."""
        inc = self.launcher.start(ns)
        self._spawn(self._await_exit(ns, inc), f"keepcount-exit-{ns.spec.id}-{inc.number}")

    async def _await_exit(self, ns: NodeState, inc: Incarnation) -> None:
        code = await inc.process.exited()
        if inc.stale:
            inc.exit_code = code
            if inc in ns.stale:
                ns.stale.remove(inc)
            self.events.append("stale_exited", ns.spec.id, pid=inc.pid, code=code)
            return
        inc.exit_code = code
        inc.ready = False
        if ns.current is inc:
            ns.current = None
        ran = time.monotonic() - inc.started_mono
        self.events.append(
            "exited", ns.spec.id, pid=inc.pid, code=code, incarnation=inc.number,
            ran=round(ran, 3), signal=signal_name(code),
        )  # fmt: skip
        if self.stopping:
            return
        evicted = await asyncio.to_thread(self._evict, ns.spec.id, inc)
        if evicted is not None:
            self.events.append("evicted", ns.spec.id, pid=inc.pid, epoch=evicted)
        delay = self.launcher.backoff(ns, ran)
        if delay:
            self.events.append("restart_scheduled", ns.spec.id, delay=delay)
            await asyncio.sleep(delay)
        if not self.stopping and ns.current is None:
            self._launch(ns)

    def _evict(self, node: str, inc: Incarnation) -> int | None:
        """Remove a dead incarnation's claim if the coordinator still lists it
        (by pid): the process is reaped, so nobody can be acknowledging under it."""
        if self._coordinator is None:
            return None
        try:
            member = self._coordinator.members().get(node)
            if member is None or member.info.get("pid") != str(inc.pid):
                return None
            if self._coordinator.evict(node, member.epoch):
                return int(member.epoch)
        except KeepcountError as exc:  # its TTL removes it anyway
            log.warning("evicting %s: %s", node, exc)
        return None

    # -- running ---------------------------------------------------------------------

    async def run(self, balancer: LoadBalancer) -> None:
        """Start every node, set ``ready`` once the cluster is, and keep
        probing until cancelled."""
        self._loop = asyncio.get_running_loop()
        session = httpclient.new_session(timeout=PROBE_TIMEOUT)
        try:
            for ns in self.nodes.values():
                self._launch(ns)
            for ns in self.nodes.values():
                self._spawn(self._probe(session, ns), f"keepcount-probe-{ns.spec.id}")
            await apoll_until(
                lambda: self._cluster_ready(balancer), math.inf, "cluster", interval=READY_POLL
            )
            self.ready.set()
            self.events.append("cluster_ready", seconds=round(time.time() - self.started, 3))
            await asyncio.Event().wait()  # until cancelled
        finally:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await session.close()

    async def _cluster_ready(self, balancer: LoadBalancer) -> bool:
        """Every node was ready, and the balancer routes to each one's
        current slot (HAProxy marks a server UP only after ``rise`` good
        checks; NGINX has no such state and routes at once)."""
        if not all(
            ns.current is not None and ns.current.ready_at is not None for ns in self.nodes.values()
        ):
            return False
        states = await asyncio.to_thread(balancer.backend_states)
        for ns in self.nodes.values():
            cur = ns.current
            if cur is None:
                return False
            state = str(states.get(slot_name(ns.spec.id, cur.slot), "UP")).upper()
            if not state.startswith("UP"):
                return False
        return True

    async def _probe(self, session: aiohttp.ClientSession, ns: NodeState) -> None:
        while not self.stopping:
            inc = ns.current
            if inc is not None and inc.exit_code is None:
                await self._probe_once(session, ns, inc)
            await asyncio.sleep(PROBE_EVERY)

    async def _probe_once(
        self, session: aiohttp.ClientSession, ns: NodeState, inc: Incarnation
    ) -> None:
        url = f"{inc.process.url}/readyz"
        try:
            status, raw = await httpclient.exchange(session, "GET", url)
            body = json.loads(raw)
            ok = status == 200
        except (OSError, ValueError) as exc:  # OSError: TimeoutError too (httpclient)
            ok, body = False, {}
            timed_out = isinstance(exc, TimeoutError)
            inc.probe = "unresponsive" if timed_out or inc.probe != "starting" else "starting"
        else:
            inc.probe = "ready" if ok else "restoring"
        if ok:
            inc.readyz = body
            if not inc.ready:
                inc.ready = True
                first = inc.ready_at is None
                inc.ready_at = time.monotonic()
                self.events.append(
                    "ready", ns.spec.id, pid=inc.pid, epoch=body.get("epoch"),
                    incarnation=inc.number, first=first,
                    after=round(inc.ready_at - inc.started_mono, 3),
                    restored_series=body.get("restored_series"),
                    restore_seconds=body.get("restore_seconds"),
                    restoring_since=body.get("restoring_since"),
                    ready_at=body.get("ready_at"),
                )  # fmt: skip
        elif inc.ready and inc is ns.current:
            inc.ready = False
            self.events.append("unready", ns.spec.id, pid=inc.pid, probe=inc.probe)
