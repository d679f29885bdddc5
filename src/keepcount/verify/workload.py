"""The verifier's clients: increments, reads and scrapes, every one recorded.

Through the load balancer, ``clients`` asyncio processes each loop over one
increment at a time of a counter (``verify_total``) on one of a few label
sets.  A share ``keyed`` of them carries an ``Idempotency-Key``: keyed and
plain increments use different label sets (``mode=keyed`` / ``mode=plain``),
so that exactly-once can be checked on the keyed ones.  Each attempt is
recorded as an ``invoke`` then its completion:

- ``ok``: HTTP 200 (acknowledged: durable);
- ``fail``: a 4xx (refused: nothing counted);
- ``info``: anything else — a 5xx (a 503 may still be counted by a later
  flush of that node), a timeout, a reset connection.  A keyed increment that
  ended ``info`` is sent again with the same key until it is ``ok`` or
  ``fail`` (a plain one is left unknown).

Abandoned increments: a share ``abandon`` of the keyed increments is sent by
an *impatient* client: one attempt with a deadline of ``ABANDON_DEADLINE``
(shorter than a flush under load, so many end in doubt while their delta is
still queued on a node, to land a moment later or never).  If it ends
``info``, the client does not send it again: it gives it up and settles its
key (``GET /v1/idempotency/{key}`` through the load balancer, so on any
node), asking again while the answer is ``in_flight`` or the request fails.
Each ask is an op ``settle`` (``keepcount.verify.history``): ``ok`` with
``applied`` true (counted: it now counts as acknowledged) or false (never
counted, for good: it counts as failed), else ``info``.

A reader process reads the cluster totals through the load balancer every
``read_every`` seconds; a scraper reads each node's own ``/metrics`` directly
(the verifier finds the nodes through the cluster's supervisor).  After the
run, ``settle`` resolves every keyed increment left unknown, then one final
read is taken: the checkers (``keepcount.verify.checker``) judge it all.

Every request goes through one ``aiohttp`` session
(``keepcount.httpclient``) with a deadline on the whole exchange; every
resend is ``tenacity``'s.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_result,
    stop_before_delay,
    wait_exponential,
    wait_fixed,
)

from keepcount.httpclient import exchange, failure_name, new_session
from keepcount.verify.history import HistoryWriter, Op

__all__ = ["COUNTER", "Workload"]

COUNTER = "verify_total"
SHARDS = 3
SCRAPE_TIMEOUT = 1.0
REQUEST_TIMEOUT = 3.0
"""Seconds before an attempt is given up as unknown (``info``): longer than
the load balancer's own retries of a dead or paused node take."""
RESEND_BACKOFF = (0.02, 0.5)
"""Pause before a keyed increment left unknown is sent again, doubling up to
the second figure."""
SETTLE_PAUSE = 0.2
"""Pause between two sends of an increment (or reads) while settling."""
ABANDON_DEADLINE = 0.02
"""Seconds an impatient client waits for its one attempt of an increment it
will abandon if in doubt: about a group commit under load, so that a good
share of them end in doubt with their delta queued or in flight."""
DEFAULT_ABANDON = 0.25
"""Share of keyed increments sent by impatient clients (``--abandon``)."""
_ERRORS = OSError
"""What leaves a request's outcome unknown (``keepcount.httpclient``): no
answer within the deadline (``TimeoutError``), a connection refused, reset or
cut short (the request may have been sent)."""
T = TypeVar("T")


class Workload:
    """See the module docstring.  ``nodes()`` returns the nodes to scrape now
    as ``{node: (url, pid)}``."""

    def __init__(
        self,
        lb_url: str,
        history: HistoryWriter,
        nodes: Callable[[], dict[str, tuple[str, int]]],
        *,
        clients: int = 8,
        keyed: float = 0.5,
        abandon: float = DEFAULT_ABANDON,
        abandon_deadline: float = ABANDON_DEADLINE,
        seed: int = 0,
        read_every: float = 0.5,
    ) -> None:
        self.lb_url = lb_url
        self.history = history
        self.nodes = nodes
        self.clients = clients
        self.keyed = keyed
        self.abandon = abandon
        self.abandon_deadline = abandon_deadline
        self.seed = seed
        self.read_every = read_every
        self.started = time.monotonic()
        self._index = 0
        self._scrape_process: dict[str, int] = {}
        """node -> the history process that scrapes it (one each, after the clients')."""
        self._pending: list[tuple[int, dict[str, Any], str]] = []
        """Keyed increments still unknown when their client stopped: (process, value, key)."""
        self._abandoned: list[tuple[int, dict[str, Any], str]] = []
        """Abandoned increments not settled when their client stopped: (process, value, key)."""
        self.acked = 0
        self.attempts = 0
        self.settled = {"applied": 0, "not_applied": 0}
        """Abandoned increments by how their key was settled."""

    # -- recording -------------------------------------------------------------

    def record(self, process: int, type: str, f: str, value: Any = None, *, key: str | None = None,
               node: str | None = None, error: str | None = None) -> Op:  # fmt: skip
        op = Op(self._index, process, type, f, round(time.monotonic() - self.started, 6), value,
                key, node, error)  # fmt: skip
        self._index += 1
        self.history.write(op)
        return op

    # -- running ---------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Clients, the reader and the scraper, until ``stop`` is set."""
        rnd = random.Random(self.seed)
        async with new_session(timeout=REQUEST_TIMEOUT) as session:
            tasks = [
                self._add_until(session, p, random.Random(rnd.randrange(2**32)), stop)
                for p in range(self.clients)
            ]
            tasks.append(self._reader(session, self.clients, stop))
            tasks.append(self._scraper(session, self.clients + 2, stop))
            await asyncio.gather(*tasks)

    async def _add_until(
        self, session: aiohttp.ClientSession, process: int, rnd: random.Random,
        stop: asyncio.Event,
    ) -> None:  # fmt: skip
        # A keyed increment left unknown is sent again with its key until it
        # is ok or fail; once stop is set, settle() takes over.
        resend = AsyncRetrying(
            retry=retry_if_result(_unknown),
            wait=wait_exponential(multiplier=RESEND_BACKOFF[0], max=RESEND_BACKOFF[1]),
            stop=lambda _: stop.is_set(),
            retry_error_callback=_last_outcome,
        )
        while not stop.is_set():
            keyed = rnd.random() < self.keyed
            labels = {"mode": "keyed" if keyed else "plain", "shard": str(rnd.randrange(SHARDS))}
            value = {"labels": labels, "by": rnd.randint(1, 3)}
            key = uuid.UUID(int=rnd.getrandbits(128)).hex if keyed else None
            if key is None:
                await self._add(session, process, value, None)  # unknown stays unknown
            elif rnd.random() < self.abandon:
                outcome = await self._add(session, process, value, key, self.abandon_deadline)
                if _unknown(outcome) and not await self._settle_until(
                    session, process, value, key, stop
                ):
                    self._abandoned.append((process, value, key))
            elif _unknown(await resend(self._add, session, process, value, key)):
                self._pending.append((process, value, key))

    async def _add(
        self, session: aiohttp.ClientSession, process: int, value: dict[str, Any],
        key: str | None, timeout: float | None = None,
    ) -> str:  # fmt: skip
        self.record(process, "invoke", "add", value, key=key)
        self.attempts += 1
        headers = {"Content-Type": "application/json"}
        if key is not None:
            headers["Idempotency-Key"] = key
        try:
            status, body = await exchange(
                session, "POST", f"{self.lb_url}/v1/counters/{COUNTER}/increment",
                body=json.dumps(value).encode(), headers=headers, timeout=timeout,
            )  # fmt: skip
        except _ERRORS as exc:
            self.record(process, "info", "add", value, key=key, error=failure_name(exc))
            return "info"
        answer = _json(body)
        if status == 200 and isinstance(answer, dict) and "value" in answer:
            self.acked += 1
            self.record(process, "ok", "add", value, key=key, node=answer.get("node"))
            return "ok"
        error = f"{status} {_code(answer)}"
        kind = "fail" if 400 <= status < 500 else "info"
        self.record(process, kind, "add", value, key=key, error=error)
        return kind

    async def _settle(
        self, session: aiohttp.ClientSession, process: int, value: dict[str, Any], key: str
    ) -> str:
        """Ask once how ``key`` settles: ``ok`` (final: applied or not) or ``info``."""
        self.record(process, "invoke", "settle", value, key=key)
        try:
            status, body = await exchange(
                session, "GET", f"{self.lb_url}/v1/idempotency/{quote(key, safe='')}"
            )
        except _ERRORS as exc:
            self.record(process, "info", "settle", value, key=key, error=failure_name(exc))
            return "info"
        answer = _json(body)
        fate = answer.get("status") if status == 200 and isinstance(answer, dict) else None
        if fate in self.settled:
            assert isinstance(fate, str)
            self.settled[fate] += 1
            receipt = answer.get("receipt") or {}
            self.record(process, "ok", "settle", {**value, "applied": fate == "applied"},
                        key=key, node=receipt.get("node"))  # fmt: skip
            return "ok"
        error = f"{status} {fate or _code(answer)}"
        self.record(process, "info", "settle", value, key=key, error=error)
        return "info"

    async def _settle_until(
        self, session: aiohttp.ClientSession, process: int, value: dict[str, Any], key: str,
        stop: asyncio.Event,
    ) -> bool:  # fmt: skip
        """Settle ``key`` until its fate is final; False if ``stop`` came first."""
        asking = AsyncRetrying(
            retry=retry_if_result(_unknown), wait=wait_fixed(SETTLE_PAUSE),
            stop=lambda _: stop.is_set(), retry_error_callback=_last_outcome,
        )  # fmt: skip
        outcome: str = await asking(self._settle, session, process, value, key)
        return not _unknown(outcome)

    async def read(self, session: aiohttp.ClientSession, process: int) -> Op:
        """One read of the cluster totals through the load balancer."""
        self.record(process, "invoke", "read")
        try:
            status, body = await exchange(
                session, "GET", f"{self.lb_url}/v1/cluster/counters/{COUNTER}"
            )
        except _ERRORS as exc:
            return self.record(process, "info", "read", error=failure_name(exc))
        answer = _json(body)
        if status == 404:  # nothing counted yet
            return self.record(process, "ok", "read", {"totals": {}})
        if status != 200 or not isinstance(answer, dict):
            return self.record(process, "info", "read", error=f"{status} {_code(answer)}")
        totals = {_label_key(c["labels"]): int(c["value"]) for c in answer["counters"]}
        return self.record(process, "ok", "read", {"totals": totals})

    async def _reader(
        self, session: aiohttp.ClientSession, process: int, stop: asyncio.Event
    ) -> None:
        while not stop.is_set():
            await self.read(session, process)
            await _wait(stop, self.read_every)

    async def _scraper(
        self, session: aiohttp.ClientSession, process: int, stop: asyncio.Event
    ) -> None:
        """Each node's own values, one process per node (a paused node must not
        hold up the others' scrapes)."""
        running: dict[str, asyncio.Task[None]] = {}
        nodes = 0
        while not stop.is_set():
            for node, (url, pid) in sorted(self.nodes().items()):
                task = running.get(node)
                if task is None or task.done():
                    if node not in self._scrape_process:
                        self._scrape_process[node] = process + nodes
                        nodes += 1
                    running[node] = asyncio.create_task(
                        self._scrape(session, self._scrape_process[node], node, url, pid)
                    )
            await _wait(stop, self.read_every)
        await asyncio.gather(*running.values())

    async def _scrape(
        self, session: aiohttp.ClientSession, process: int, node: str, url: str, pid: int
    ) -> None:
        self.record(process, "invoke", "scrape", {"node": node, "pid": pid})
        try:
            status, body = await exchange(session, "GET", f"{url}/metrics", timeout=SCRAPE_TIMEOUT)
            text = body.decode()
        except (_ERRORS, UnicodeDecodeError) as exc:
            self.record(process, "info", "scrape", {"node": node, "pid": pid},
                        error=failure_name(exc))  # fmt: skip
            return
        if status != 200:
            self.record(process, "info", "scrape", {"node": node, "pid": pid}, error=str(status))
            return
        values = _scraped(text)
        self.record(process, "ok", "scrape", {"node": node, "pid": pid, "values": values},
                    node=node)  # fmt: skip

    async def settle(self, deadline: float) -> int:
        """Send every keyed increment left unknown again (same key) until it
        is ok or fail, and settle every abandoned one not settled yet, or
        ``deadline`` (monotonic) passes; the number still unknown.  Then a
        final read, retried until it answers."""
        async with new_session(timeout=REQUEST_TIMEOUT) as session:
            pending, self._pending = self._pending, []
            abandoned, self._abandoned = self._abandoned, []
            left = 0
            for process, value, key in pending:
                outcome = await _until(deadline, _unknown, self._add, session, process, value, key)
                left += outcome is None or _unknown(outcome)
            for process, value, key in abandoned:
                outcome = await _until(
                    deadline, _unknown, self._settle, session, process, value, key
                )
                left += outcome is None or _unknown(outcome)
            await _until(deadline, _not_ok, self.read, session, self.clients)
        return left


def _unknown(outcome: str) -> bool:
    return outcome == "info"


def _not_ok(op: Op) -> bool:
    return op.type != "ok"


def _last_outcome(state: RetryCallState) -> Any:
    """What the last attempt returned (the retries gave up on it)."""
    assert state.outcome is not None
    return state.outcome.result()


async def _until(
    deadline: float, again: Callable[[T], bool], attempt: Callable[..., Awaitable[T]],
    *args: Any,
) -> T | None:  # fmt: skip
    """``attempt(*args)`` every ``SETTLE_PAUSE`` s while ``again(result)``, no
    attempt starting after ``deadline`` (monotonic); the last result (None:
    the deadline had passed, nothing was attempted)."""
    left = deadline - time.monotonic()
    if left <= 0:
        return None
    retrying = AsyncRetrying(
        retry=retry_if_result(again), wait=wait_fixed(SETTLE_PAUSE),
        stop=stop_before_delay(left), retry_error_callback=_last_outcome,
    )  # fmt: skip
    result: T = await retrying(attempt, *args)
    return result


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


def _code(answer: Any) -> str:
    if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
        return str(answer["error"].get("code"))
    return ""


def _label_key(labels: dict[str, str]) -> str:
    return json.dumps(labels, sort_keys=True)


def _scraped(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == COUNTER:
                out[_label_key(dict(sample.labels))] = int(sample.value)
    return out


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass


def history_path(directory: Path) -> Path:
    return directory / "history.jsonl"
