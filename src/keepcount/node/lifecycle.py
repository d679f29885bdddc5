"""A node's life as one value: ``NodeState``, owned by ``Lifecycle``.

::

    STARTING ─> CLAIMING ─> RESTORING ─> READY <─> UNREADY
                   │  ^          │         │          │
                   └──┘ retry    │         └────┬─────┘
                   │             │              v
                   v             v           FENCED (exit 3)
                 FAILED <────────┘
    any state ─> STOPPING ─> STOPPED   (the lifespan ends)

- **CLAIMING**: with a coordinator the node claims its id there (a lease /
  an ephemeral node) and gets an epoch that only grows.  A claim held by
  another live process (``ClaimConflict``), an unreachable coordinator or
  store is retried with a backoff (``tenacity``) for up to
  ``claim_timeout`` seconds; ``waiting`` says why.
- **RESTORING**: the store records the epoch (fencing every older
  incarnation) and the values are restored (``keepcount.open``, in a
  thread).  Without a coordinator the store issues the epoch and holds a
  lock (SQLite: a ``flock``): claim and restore are one step, retried as
  above.
- **READY** while the claim is *trusted*: with a coordinator, until the local
  deadline of its last renewal (its send time + TTL - a margin), which
  passes before the coordinator can let the lease expire.  Past it the node
  is **UNREADY** (it acknowledges nothing) until a renewal succeeds in time.
- **FENCED**: the coordinator says the claim is lost, or the store holds a
  newer incarnation: the node never serves again and stops with
  ``EXIT_CLAIM_LOST`` so that a supervisor starts a new incarnation.
- **FAILED**: it can never serve (a corrupt store, an invalid URL, a newer
  epoch already in the store, a claim still held after ``claim_timeout``,
  a bug); ``fatal`` says why, ``on_fatal`` is called, ``exit_code`` is 1.

Whoever asks (``/readyz``, every 503 ``not_ready``, the live page) reads
``Lifecycle.state``; the observations that move READY, UNREADY and FENCED
(the registry fenced, the claim lost or not confirmed in time) are folded
into it there, at the moment of asking, and by a watch every 50 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential

import keepcount
from keepcount.errors import (
    ClaimConflict,
    CoordinatorUnavailable,
    ErrorCode,
    KeepcountError,
    StoreUnavailable,
)
from keepcount.node.config import NodeConfig
from keepcount.node.errors import HTTPError
from keepcount.ui import Transitions

if TYPE_CHECKING:
    from keepcount.coordination.base import Claim, Coordinator
    from keepcount.registry import Registry

__all__ = ["EXIT_CLAIM_LOST", "Lifecycle", "NodeState"]

log = logging.getLogger("keepcount.node")

EXIT_CLAIM_LOST = 3
"""Exit status of a node that lost its claim (or was fenced) while serving: a
supervisor should start a new incarnation."""

_WATCH_INTERVAL = 0.05  # seconds between checks for a lost claim while serving
_CLAIM_BACKOFF = (0.05, 1.0)  # first and largest wait between claim attempts, seconds
_RETRIED = (ClaimConflict, StoreUnavailable, CoordinatorUnavailable)


class _Stopped(Exception):
    """The lifespan ended while the claim was being retried."""


class NodeState(enum.Enum):
    """Where a node is in its life (see the module docstring)."""

    STARTING = "starting"
    CLAIMING = "claiming"
    RESTORING = "restoring"
    READY = "ready"
    UNREADY = "unready"
    FENCED = "fenced"
    FAILED = "failed"
    STOPPING = "stopping"
    STOPPED = "stopped"

    @property
    def page_state(self) -> str:
        """The state as the live page names it (``keepcount.ui.NODE_STATES``)."""
        return _PAGE_STATES[self]


_PAGE_STATES = {
    NodeState.STARTING: "restoring",
    NodeState.CLAIMING: "restoring",
    NodeState.RESTORING: "restoring",
    NodeState.READY: "ready",
    NodeState.UNREADY: "unconfirmed",
    NodeState.FENCED: "fenced",
    NodeState.FAILED: "down",
    NodeState.STOPPING: "down",
    NodeState.STOPPED: "down",
}
_SERVING = (NodeState.READY, NodeState.UNREADY)


class Lifecycle:
    """One node's claim, restore, readiness and shutdown; ``state`` is the one value.

    ``registry`` is set once restored (None before).  ``fatal`` says why the
    node will never serve (the process should exit ``exit_code``);
    ``close_error`` why its final flush failed.  ``run()`` is the ASGI
    lifespan: each run is a new incarnation (a new claim, a higher epoch).
    """

    def __init__(
        self,
        config: NodeConfig,
        *,
        on_ready: Callable[[Any], None] | None = None,
        on_fatal: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.on_ready = on_ready
        """Called with this object when it turns ready (once per incarnation)."""
        self.on_fatal = on_fatal
        self.registry: Registry | None = None
        self.claim: Claim | None = None
        self.fatal: str | None = None
        self.close_error: str | None = None
        self.waiting: str | None = None
        """Why the claim is still being retried, if it is."""
        self.restoring_since: float | None = None
        """Wall-clock time this node began claiming its id and restoring."""
        self.ready_at: float | None = None
        """Wall-clock time it was restored and began serving."""
        self.exit_code = 1
        """With ``fatal``: 1 if the node never served, ``EXIT_CLAIM_LOST`` if it lost its claim."""
        self.transitions = Transitions()
        """This node's state changes, as the live page names them."""
        self._coordinator: Coordinator | None = None
        self._stop: asyncio.Event | None = None
        self._state = NodeState.STARTING

    # -- the one value -------------------------------------------------------------

    @property
    def state(self) -> NodeState:
        """The node's state now (READY, UNREADY and FENCED folded in as observed)."""
        state = self._state
        if state is NodeState.READY or state is NodeState.UNREADY:
            return self._observe()
        return state

    def serving(self) -> Registry | None:
        """The registry if the node may acknowledge now (``state`` is READY)."""
        return self.registry if self.state is NodeState.READY else None

    def not_ready(self) -> HTTPError:
        """The 503 ``not_ready`` answer for the current state, saying why."""
        return HTTPError(503, ErrorCode.NOT_READY, self.why_not_ready() or "")

    def why_not_ready(self) -> str | None:
        """Why the node does not serve now, in words (None while READY)."""
        state, node = self.state, self.config.node
        if state is NodeState.READY:
            return None
        if state is NodeState.FAILED:
            return f"node {node} cannot serve: {self.fatal}"
        if state is NodeState.FENCED:
            return f"node {node} lost its claim: {self.fatal}"
        if state is NodeState.UNREADY:
            return (
                f"node {node} cannot vouch for its claim: the coordinator has not "
                "confirmed it in time (unreachable, or this process was paused)"
            )
        if state is NodeState.STOPPING or state is NodeState.STOPPED:
            return f"node {node} is shutting down"
        why = f"node {node} is claiming its id and restoring its counters"
        return why if self.waiting is None else f"{why} (waiting: {self.waiting})"

    def _set(self, state: NodeState) -> None:
        if self._state is NodeState.STOPPING and state is not NodeState.STOPPED:
            return  # stopping is final for this incarnation
        if state is not self._state:
            self._state = state
            self.transitions.observe(self.config.node, state.page_state, time.time())

    def _observe(self) -> NodeState:
        reg, claim = self.registry, self.claim
        assert reg is not None
        if reg.fenced:
            self._end("the store holds a newer incarnation of this node id (fenced)")
        elif claim is not None and claim.lost:
            self._end("the coordinator no longer holds its claim (lease or session expired)")
        else:
            trusted = claim is None or claim.trusted()
            self._set(NodeState.READY if trusted else NodeState.UNREADY)
        return self._state

    # -- the lifespan --------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def run(self, app: object = None) -> AsyncIterator[None]:
        """The lifespan: serve at once, claim and restore in the background,
        flush and release at the end (not cancelled: a claim taken in the
        thread must be seen and released)."""
        self._reset()
        self._stop = asyncio.Event()
        opener = asyncio.create_task(self._open(), name=f"keepcount-open-{self.config.node}")
        try:
            yield
        finally:
            self._set(NodeState.STOPPING)
            self._stop.set()
            await opener
            if self.registry is not None:
                try:
                    await self.registry.aclose()
                except KeepcountError as exc:
                    if not self.registry.fenced:
                        self.close_error = str(exc)
                        log.error("node %s: final flush failed: %s", self.config.node, exc)
            await asyncio.to_thread(self._release_claim)
            self._set(NodeState.STOPPED)

    def _reset(self) -> None:
        self.registry = self.claim = None
        self.fatal = self.close_error = self.waiting = None
        self.exit_code = 1
        self._state = NodeState.STOPPED  # a new incarnation: leave STOPPING for good
        self._set(NodeState.STARTING)

    @property
    def _stopping(self) -> bool:
        return self._state is NodeState.STOPPING

    async def _open(self) -> None:
        cfg = self.config
        self.restoring_since = time.time()
        deadline = time.monotonic() + cfg.claim_timeout
        backoff = wait_exponential(multiplier=_CLAIM_BACKOFF[0], max=_CLAIM_BACKOFF[1])

        def wait(state: RetryCallState) -> float:  # the last wait ends at the deadline
            return min(backoff(state), max(deadline - time.monotonic(), 0.0))

        def give_up(state: RetryCallState) -> bool:
            return self._stopping or time.monotonic() >= deadline

        retrying = AsyncRetrying(
            retry=retry_if_exception_type(_RETRIED),
            wait=wait,
            stop=give_up,
            sleep=self._sleep,
            before_sleep=self._waiting,
            reraise=True,
        )
        try:
            registry: Registry = await retrying(self._claim_and_restore)
        except _Stopped:
            return
        except _RETRIED as exc:
            if not self._stopping:
                self._fail(f"gave up after {cfg.claim_timeout:g} s: {exc}")
            return
        except Exception as exc:  # CorruptStore, a bad URL, Fenced, a bug: never serve
            if not isinstance(exc, KeepcountError):
                log.exception("node %s: cannot open the store", cfg.node)
            self._fail(str(exc))
            return
        self.registry = registry
        self.waiting = None
        self.ready_at = time.time()
        if self._stopping:
            return
        self._set(NodeState.READY)
        if self.on_ready is not None:
            self.on_ready(self)
        await self._watch()

    async def _claim_and_restore(self) -> Registry:
        cfg = self.config
        epoch: int | None = None
        if cfg.coordinator is not None:
            self._set(NodeState.CLAIMING)
            epoch = await asyncio.to_thread(self._claim_id)
        self._set(NodeState.RESTORING)
        registry = await asyncio.to_thread(
            keepcount.open,
            cfg.store,
            cfg.node,
            flush_interval=cfg.flush_interval,
            max_children=cfg.max_children,
            idempotency_ttl=cfg.idempotency_ttl,
            epoch=epoch,
            max_slots=1,  # a node process serves its id itself, never a slot of it
        )
        if self.claim is not None:  # the lease backs the store's fence (Store.vouch)
            registry.store.vouch(registry.node, registry.epoch, self.claim.trusted)
        return registry

    def _claim_id(self) -> int:
        """Claim the id in the coordinator (in a thread: it blocks); the epoch.
        A claim still held from an earlier attempt is kept."""
        from keepcount.coordination import open_coordinator

        cfg = self.config
        if self.claim is not None and not self.claim.lost:
            return self.claim.epoch
        if self._coordinator is None:
            self._coordinator = open_coordinator(cfg.coordinator or "")
        info = {"pid": str(os.getpid()), "host": socket.gethostname()}
        if cfg.advertise is not None:
            info["url"] = cfg.advertise
        claim = self._coordinator.claim(cfg.node, info, ttl=cfg.claim_ttl)
        if cfg.unsafe_wall_clock_lease:  # the clock fault's mutation test only
            from keepcount.coordination.wallclock import WallClockLease

            claim = WallClockLease(claim)
        self.claim = claim
        return claim.epoch

    def _waiting(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        if self.waiting is None:
            log.warning(
                "node %s: %s; retrying for up to %g s",
                self.config.node, exc, self.config.claim_timeout,
            )  # fmt: skip
        self.waiting = str(exc)
        self._set(NodeState.CLAIMING)

    async def _sleep(self, seconds: float) -> None:
        """Wait between attempts; a stop ends the wait, and the retries, at once."""
        assert self._stop is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)
        if self._stopping:
            raise _Stopped

    async def _watch(self) -> None:
        """While serving: notice a lost claim or a fenced store within 50 ms
        even when nobody asks (``state`` moves to FENCED and stops the node)."""
        assert self._stop is not None
        while self.state in _SERVING:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), _WATCH_INTERVAL)

    def _end(self, why: str) -> None:
        """Lost the claim for good: FENCED, exit ``EXIT_CLAIM_LOST``."""
        self.exit_code = EXIT_CLAIM_LOST
        self._fail(why, NodeState.FENCED)

    def _fail(self, message: str, state: NodeState = NodeState.FAILED) -> None:
        self.fatal = message
        log.error("node %s: cannot serve: %s", self.config.node, message)
        self._set(state)
        if self.on_fatal is not None:
            self.on_fatal(message)

    def _release_claim(self) -> None:
        claim, coordinator = self.claim, self._coordinator
        self._coordinator = None
        try:
            if claim is not None:
                claim.release()
        except KeepcountError as exc:  # it runs out by itself: the TTL
            log.warning("node %s: releasing the claim failed: %s", self.config.node, exc)
        finally:
            if coordinator is not None:
                coordinator.close()
