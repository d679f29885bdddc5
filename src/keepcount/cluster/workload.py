"""A client workload that tallies every acknowledged increment.

``KeyedLoad`` runs N asyncio clients against a URL (the load balancer):
each sends ``POST /v1/counters/{name}/increment`` with a unique
``Idempotency-Key`` and, until it is acknowledged (200), sends it again with
the same key and body (a connection error, a timeout or a 5xx leaves its
outcome unknown; the key makes the retry count once).  Every answer is
recorded, so at the end the tally of acknowledged increments per label set
can be held against the cluster's totals: with keys they must be *equal*.

Every client sends through the one ``aiohttp.ClientSession`` it is given
(``keepcount.httpclient.new_session``), and resends with ``tenacity``.

Example::

    load = KeyedLoad("http://127.0.0.1:8100", "orders_total", [{"shop": "a"}], clients=8)
    async with new_session() as session:
        stop = asyncio.Event()
        task = asyncio.create_task(load.run(session, stop))
        ...; stop.set(); await task
    load.tally()   # {'{"shop": "a"}': 1234}
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp
from tenacity import (
    AsyncRetrying,
    RetryError,
    retry_if_result,
    stop_after_attempt,
    wait_exponential,
)

__all__ = ["KeyedLoad", "LoadError", "labels_key"]

MAX_TRIES = 200
"""Sends of one increment before the workload gives up (a cluster that does
not recover in that many tries, ~10 s with the backoff, is a failure)."""
REQUEST_TIMEOUT = 5.0
"""Seconds before a send is given up as unknown (the whole exchange)."""
RETRY_BACKOFF = (0.01, 0.2)
"""Pause before the first resend, doubling up to the second figure."""
_TIMEOUT = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)


def labels_key(labels: dict[str, str]) -> str:
    """One label set as a string: JSON with sorted keys."""
    return json.dumps(labels, sort_keys=True)


class LoadError(Exception):
    """An increment was never acknowledged (the cluster did not recover)."""


@dataclass(slots=True)
class Answer:
    t: float
    """time.time() of the answer."""
    status: int
    """HTTP status; 0 for a connection error / timeout, -1 for a 200 cut short."""
    node: str | None
    latency: float


@dataclass
class KeyedLoad:
    url: str
    name: str
    label_sets: Sequence[dict[str, str]]
    clients: int = 16
    seed: int = 0
    max_by: int = 3
    acked: Counter[str] = field(default_factory=Counter)
    """``labels_key(labels)`` -> sum of acknowledged ``by``."""
    answers: list[Answer] = field(default_factory=list)
    ops: int = 0
    retries: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    """Client-visible failures by kind ("503", "connection", "timeout", ...):
    each was retried with its key."""
    replayed: int = 0

    def tally(self) -> dict[str, int]:
        return dict(self.acked)

    async def run(self, session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        """Until ``stop`` is set; then each client settles its increment in flight."""
        rnd = random.Random(self.seed)
        seeds = [rnd.randrange(2**32) for _ in range(self.clients)]
        await asyncio.gather(*(self._client(session, stop, random.Random(s)) for s in seeds))

    async def _client(
        self, session: aiohttp.ClientSession, stop: asyncio.Event, rnd: random.Random
    ) -> None:
        path = f"{self.url}/v1/counters/{self.name}/increment"
        # One per client coroutine: a Retrying object is reused, never shared.
        retrying = AsyncRetrying(
            retry=retry_if_result(lambda acknowledged: not acknowledged),
            stop=stop_after_attempt(MAX_TRIES),
            wait=wait_exponential(multiplier=RETRY_BACKOFF[0], max=RETRY_BACKOFF[1]),
        )
        while not stop.is_set():
            labels = rnd.choice(self.label_sets)
            by = rnd.randint(1, self.max_by)
            key = uuid.UUID(int=rnd.getrandbits(128)).hex
            body = json.dumps({"labels": labels, "by": by})
            headers = {"Content-Type": "application/json", "Idempotency-Key": key}
            self.ops += 1
            try:
                await retrying(self._send, session, path, body, headers, labels, by)
            except RetryError:
                raise LoadError(
                    f"increment {key} was not acknowledged after {MAX_TRIES} tries"
                ) from None

    async def _send(
        self, session: aiohttp.ClientSession, path: str, body: str, headers: dict[str, str],
        labels: dict[str, str], by: int,
    ) -> bool:  # fmt: skip
        """One send of an increment, recorded; True if it was acknowledged."""
        started = time.monotonic()
        status, node, replayed = 0, None, False
        try:
            async with session.post(path, data=body, headers=headers, timeout=_TIMEOUT) as r:
                status = r.status
                if status == 200:
                    try:
                        answer = await r.json(content_type=None)
                    except (aiohttp.ClientError, ValueError):
                        # Headers came, the body did not: the node died
                        # between its two writes (uvicorn sends them apart).
                        self.errors["truncated_200"] += 1
                        status = -1
                    else:
                        node = answer.get("node")
                        replayed = r.headers.get("Idempotency-Replayed") == "true"
                else:
                    await r.read()
        except TimeoutError:
            self.errors["timeout"] += 1
        except (aiohttp.ClientError, ValueError):
            self.errors["connection"] += 1
        self.answers.append(Answer(time.time(), status, node, time.monotonic() - started))
        if status == 200:
            self.acked[labels_key(labels)] += by
            self.replayed += replayed
            return True
        if status > 0:
            self.errors[str(status)] += 1
        self.retries += 1
        return False

    def throughput(self, start: float, end: float, step: float = 1.0) -> list[tuple[float, int]]:
        """(bucket start, acknowledged answers in it) over [start, end)."""
        buckets: Counter[int] = Counter()
        for a in self.answers:
            if a.status == 200 and start <= a.t < end:
                buckets[int((a.t - start) // step)] += 1
        n = int((end - start) // step) + 1
        return [(start + i * step, buckets.get(i, 0)) for i in range(n)]
