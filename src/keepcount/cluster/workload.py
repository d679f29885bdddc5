"""A client workload that tallies every acknowledged increment.

``KeyedLoad`` runs N asyncio clients against a URL (the load balancer):
each sends ``POST /v1/counters/{name}/increment`` with a unique
``Idempotency-Key`` and, until it is acknowledged (200), sends it again with
the same key and body (a connection error, a timeout or a 5xx leaves its
outcome unknown; the key makes the retry count once).  Every answer is
recorded, so at the end the tally of acknowledged increments per label set
can be held against the cluster's totals: with keys they must be *equal*.

Each client sends through an ``httpx.AsyncClient`` of its own holding one
keep-alive connection (``load_client``), and resends with ``tenacity``.

Example::

    load = KeyedLoad("http://127.0.0.1:8100", "orders_total", [{"shop": "a"}], clients=8)
    stop = asyncio.Event()
    task = asyncio.create_task(load.run(stop))
    ...; stop.set(); await task
    load.tally()   # {'{"shop": "a"}': 1234}
"""

from __future__ import annotations

import asyncio
import functools
import json
import random
import ssl
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import overload

import httpx
from tenacity import (
    AsyncRetrying,
    RetryError,
    retry_if_result,
    stop_after_attempt,
    wait_exponential,
)

__all__ = ["KeyedLoad", "LoadError", "labels_key", "load_client"]

MAX_TRIES = 200
"""Sends of one increment before the workload gives up (a cluster that does
not recover in that many tries, ~10 s with the backoff, is a failure)."""
REQUEST_TIMEOUT = 5.0
"""Seconds before a send is given up as unknown (the whole exchange)."""
RETRY_BACKOFF = (0.01, 0.2)
"""Pause before the first resend, doubling up to the second figure."""


def load_client(connections: int = 1, timeout: float = REQUEST_TIMEOUT) -> httpx.AsyncClient:
    """An HTTP client for a load generator: up to ``connections`` connections,
    each kept alive between requests; ``timeout`` seconds per phase (connect,
    write, read, pool); no proxy taken from the environment (the targets are
    local).

    Give each client process of a load one of its own (``connections=1``)
    rather than sharing a pool: httpx's pool looks at every connection on
    each request, and shared by 16 clients it took twice the CPU per request
    (the load generator, not the cluster, then bounds the rate)."""
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False, verify=_tls())


@functools.cache
def _tls() -> ssl.SSLContext:
    """One TLS context for every client (each would load the CA bundle: ~20 ms)."""
    return ssl.create_default_context()


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

    @overload
    async def run(self, stop: asyncio.Event, /) -> None: ...
    @overload
    async def run(self, session: object, stop: asyncio.Event, /) -> None: ...
    async def run(self, *args: object) -> None:
        """``run(stop)``: until ``stop`` is set; then each client settles its
        increment in flight.  Each client has a connection of its own.
        ``run(session, stop)``, the aiohttp-era form, is still accepted (the
        session is not used)."""
        *given, stop = args
        if not isinstance(stop, asyncio.Event) or len(given) > 1:
            raise TypeError("KeyedLoad.run(stop)")
        rnd = random.Random(self.seed)
        seeds = [rnd.randrange(2**32) for _ in range(self.clients)]
        await asyncio.gather(*(self._client(stop, random.Random(s)) for s in seeds))

    async def _client(self, stop: asyncio.Event, rnd: random.Random) -> None:
        async with load_client() as client:
            await self._send_until(client, stop, rnd)

    async def _send_until(
        self, client: httpx.AsyncClient, stop: asyncio.Event, rnd: random.Random
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
            body = json.dumps({"labels": labels, "by": by}).encode()
            headers = {"Content-Type": "application/json", "Idempotency-Key": key}
            self.ops += 1
            try:
                await retrying(self._send, client, path, body, headers, labels, by)
            except RetryError:
                raise LoadError(
                    f"increment {key} was not acknowledged after {MAX_TRIES} tries"
                ) from None

    async def _send(
        self, client: httpx.AsyncClient, path: str, body: bytes, headers: dict[str, str],
        labels: dict[str, str], by: int,
    ) -> bool:  # fmt: skip
        """One send of an increment, recorded; True if it was acknowledged."""
        started = time.monotonic()
        status, node, replayed = 0, None, False
        try:
            async with (
                asyncio.timeout(REQUEST_TIMEOUT),
                client.stream("POST", path, content=body, headers=headers) as r,
            ):
                status = r.status_code
                if status == 200:
                    try:
                        answer = json.loads(await r.aread())
                    except httpx.TimeoutException:
                        raise
                    except (httpx.RequestError, ValueError):
                        # Headers came, the body did not: the node died
                        # between its two writes (uvicorn sends them apart).
                        self.errors["truncated_200"] += 1
                        status = -1
                    else:
                        node = answer.get("node")
                        replayed = r.headers.get("Idempotency-Replayed") == "true"
                else:
                    await r.aread()
        except (TimeoutError, httpx.TimeoutException):
            self.errors["timeout"] += 1
        except (httpx.RequestError, ValueError):
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
