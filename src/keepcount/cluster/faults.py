"""Faults injected into a supervised cluster, timed from outside.

``kill`` and ``pause`` signal a node through the supervisor and measure what
an operator cares about: when the load balancer stopped routing to it
(``lb_down``), when the supervisor saw it (``detected``), when its new
incarnation was ready (``ready``).  Shared by ``keepcount demo`` and
``keepcount bench failover``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from keepcount.cluster.launcher import Incarnation, NodeState
from keepcount.cluster.spec import slot_name
from keepcount.process import apoll_until

if TYPE_CHECKING:
    from keepcount.cluster.supervisor import Supervisor

__all__ = ["Fault", "FaultError", "kill", "partition", "pause", "until"]

RECOVER_TIMEOUT = 60.0


class FaultError(Exception):
    """The cluster did not recover from a fault in time (or the supervisor died)."""


@dataclass
class Fault:
    kind: str
    """``kill`` (SIGKILL), ``pause`` (SIGSTOP past the claim TTL, then SIGCONT)
    or ``partition`` (cut off the network, see ``partition()``)."""
    node: str
    t0: float = 0.0
    """time.time() of the signal."""
    lb_down: float | None = None
    """Seconds until the balancer no longer routed to the node (None: it did not say)."""
    detected: float | None = None
    """Seconds until the supervisor saw the exit (kill) or the lapsed claim (pause)."""
    ready: float | None = None
    """Seconds until the node's new incarnation was ready."""
    zombie_exit: int | None = None
    """pause, partition: the exit status of the old process once continued or
    healed (3: lost its claim)."""
    end: float = 0.0
    """time.time() once the fault was over (the node ready again)."""


async def until(
    cond: Callable[[], object], sup_task: asyncio.Task[None] | None, timeout: float, what: str
) -> float:
    """Await ``cond()``; the seconds it took.  Raises ``FaultError`` on time out
    or when the supervisor's task ended."""
    started = time.monotonic()

    def done() -> bool:
        if sup_task is not None and sup_task.done():
            sup_task.result()
            raise FaultError(f"{what}: the supervisor stopped")
        return bool(cond())

    try:
        await apoll_until(done, timeout, what, interval=0.01)
    except TimeoutError:
        raise FaultError(f"{what} within {timeout:g} s") from None
    return time.monotonic() - started


def _back(ns: NodeState, before: int) -> Callable[[], bool]:
    return lambda: ns.incarnations > before and ns.current is not None and ns.current.ready


async def kill(sup: Supervisor, node: str, sup_task: asyncio.Task[None] | None = None) -> Fault:
    """SIGKILL ``node``; returns once its new incarnation is ready."""
    fault = Fault("kill", node)
    ns = sup.nodes[node]
    before, slot = ns.incarnations, _slot(ns)
    fault.t0, t0 = time.time(), time.monotonic()
    await sup.signal(node, "KILL")
    fault.detected = round(time.monotonic() - t0, 3)
    lb_wait = asyncio.create_task(_lb_down(sup, slot, t0))
    await until(_back(ns, before), sup_task, RECOVER_TIMEOUT, f"{node} was not ready again")
    fault.ready = round(time.monotonic() - t0, 3)
    fault.lb_down = await lb_wait
    fault.end = time.time()
    return fault


async def pause(
    sup: Supervisor,
    node: str,
    sup_task: asyncio.Task[None] | None = None,
    on_replaced: Callable[[Incarnation], Awaitable[None]] | None = None,
) -> Fault:
    """SIGSTOP ``node`` until the supervisor replaced it (its claim lapsed), then
    SIGCONT the old process and wait for it to stop by itself.

    The node is stopped outside a store write (``Supervisor.signal(clean=True)``):
    this fault shows fencing, not the SQLite file's single-writer stall.
    ``on_replaced(old)`` runs once the new incarnation is ready, before the
    old one is continued."""
    fault = Fault("pause", node)
    ns = sup.nodes[node]
    old = ns.current
    if old is None:
        raise FaultError(f"{node} has no process to pause")
    before, slot = ns.incarnations, _slot(ns)
    fault.t0, t0 = time.time(), time.monotonic()
    await sup.signal(node, "STOP", clean=True)
    lb_wait = asyncio.create_task(_lb_down(sup, slot, t0))
    await until(lambda: old in ns.stale, sup_task, RECOVER_TIMEOUT, f"{node}'s claim did not lapse")
    fault.detected = round(time.monotonic() - t0, 3)
    await until(_back(ns, before), sup_task, RECOVER_TIMEOUT, f"{node} was not replaced")
    fault.ready = round(time.monotonic() - t0, 3)
    fault.lb_down = await lb_wait
    fault.end = time.time()
    if on_replaced is not None:
        await on_replaced(old)
    await sup.signal(node, "CONT")
    with contextlib.suppress(FaultError):
        await until(lambda: old.exit_code is not None, sup_task, 30, "the old process stopped")
    fault.zombie_exit = old.exit_code
    return fault


async def partition(
    sup: Supervisor,
    node: str,
    mode: str,
    hold: float,
    sup_task: asyncio.Task[None] | None = None,
) -> Fault:
    """Cut ``node``'s process off the network (``Supervisor.partitions``, in a
    mode of ``keepcount.cluster.partition.MODES``), then heal.

    ``store`` holds ``hold`` seconds; ``isolate`` and ``coordinator`` hold
    until the supervisor replaced the node (its claim lapsed), then heal and
    wait for the old process to find its claim lost and stop by itself."""
    from keepcount.cluster.partition import endpoints_of

    parts = sup.partitions
    if parts is None:
        raise FaultError("the supervisor was started without partitions (Supervisor.partitions)")
    fault = Fault("partition", node)
    ns = sup.nodes[node]
    old = ns.current
    if old is None:
        raise FaultError(f"{node} has no process to partition")
    before, slot = ns.incarnations, slot_name(node, old.slot)
    fault.t0, t0 = time.time(), time.monotonic()
    parts.cut(
        slot, mode, coordinator=endpoints_of(sup.coordinator_url),
        store=endpoints_of(sup.store_url), port=ns.spec.ports[old.slot],
    )  # fmt: skip
    try:
        if mode == "store":
            await asyncio.sleep(hold)
        else:
            lapsed = lambda: old in ns.stale or old.exit_code is not None  # noqa: E731
            await until(lapsed, sup_task, RECOVER_TIMEOUT, f"{node}'s claim did not lapse")
            fault.detected = round(time.monotonic() - t0, 3)
            await until(_back(ns, before), sup_task, RECOVER_TIMEOUT, f"{node} was not replaced")
            fault.ready = round(time.monotonic() - t0, 3)
    finally:
        parts.heal()
    fault.end = time.time()
    if mode != "store":
        with contextlib.suppress(FaultError):
            await until(lambda: old.exit_code is not None, sup_task, 30, "the old process stopped")
        fault.zombie_exit = old.exit_code
    return fault


def _slot(ns: NodeState) -> str | None:
    cur = ns.current
    return None if cur is None else slot_name(ns.spec.id, cur.slot)


async def _lb_down(sup: Supervisor, slot: str | None, t0: float) -> float | None:
    """Seconds from ``t0`` until the balancer stops routing to ``slot``
    (HAProxy: its checks or live traffic marked it DOWN; NGINX: its error log
    says it took the server out); None if it did not say so in time."""
    if slot is None:
        return None

    async def down() -> bool:
        state = (await asyncio.to_thread(sup.balancer.backend_states)).get(slot, "")
        return not str(state).upper().startswith("UP")

    try:
        await apoll_until(down, max(0.0, t0 + 15 - time.monotonic()), f"{slot} DOWN")
    except Exception:  # not in time, or a balancer that cannot tell
        return None
    return round(time.monotonic() - t0, 3)
