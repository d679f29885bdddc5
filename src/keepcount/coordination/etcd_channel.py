"""The etcd coordinator's connection: a private event loop and a gRPC channel that fails over.

Client: the generated gRPC stubs of ``aetcd`` 1.0 on a ``grpc.aio`` channel
this module owns.  ``aetcd`` is the one async etcd v3 client that imports with
current grpcio / protobuf (``etcd3`` needs protobuf < 4; ``etcd3aio`` had one
release); its high-level client sets one timeout for every call, so the
stubs are used directly for per-call deadlines, ``wait_for_ready`` and a
keep-alive whose send time is known.

Threads: each coordinator runs a private asyncio loop in a daemon thread.
Renewals, watches and every request run there; the public methods are
blocking and hand their work to that loop (``EtcdChannel.submit``), so
nothing depends on the caller's event loop being responsive (a node's loop
may be saturated by HTTP load).

Failover: the channel's target lists every endpoint
(``ipv4:127.0.0.1:23791,127.0.0.1:23792,...``) under gRPC's ``pick_first``
policy, with reconnect backoff capped at 1 s.  A killed member fails its
connection at once and the channel moves to the next address.  A paused or
cut-off member leaves the connection open but silent, so any request,
renewal or watch probe that fails also rotates the endpoint list and
rebuilds the channel (``EtcdChannel.failover``): the next attempt goes to
another member.  Retries are ``tenacity``'s (``EtcdChannel.retrying``).

Fork: gRPC's asyncio client cannot work across a fork (its channels never
answer in the child), so a process forked from one that used etcd here is
refused with ``InvalidInput`` rather than left to hang (``check_not_forked``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import logging
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import grpc  # type: ignore[import-untyped]
import grpc.aio  # type: ignore[import-untyped]
from aetcd import rpc  # type: ignore[import-untyped]
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_before_delay,
    stop_never,
    wait_fixed,
)
from tenacity.stop import StopBaseT
from tenacity.wait import WaitBaseT

from keepcount.coordination.urls import CoordinatorURL
from keepcount.errors import CoordinatorUnavailable, InvalidInput

__all__ = ["TRANSIENT", "EtcdChannel", "Interrupted", "call", "check_not_forked"]

log = logging.getLogger(__name__)
T = TypeVar("T")

_CHANNEL_OPTIONS = [
    # gRPC's default reconnect backoff grows to 120 s: after an outage the
    # channel would sit idle long after etcd is back.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.lb_policy_name", "pick_first"),
]
_ATTEMPT = 1.0
"""Deadline of one attempt of a request that is retried (claim, members,
evict): a member that hangs is given up on after this, and the next attempt
goes to another member."""
_PAUSE = 0.05
"""Seconds between two attempts of such a request (after the failover)."""
_SHUTDOWN_TIMEOUT = 5.0


class Interrupted(Exception):
    """A request was cut off because its channel was rebuilt (failover)."""


TRANSIENT = (grpc.RpcError, Interrupted, CoordinatorUnavailable)
"""Errors another member or another try may not repeat."""
_FATAL = {
    # Answers that another member or another try would not change.
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.UNIMPLEMENTED,
}


async def call(awaitable: Awaitable[T]) -> T:
    """Await one gRPC call.  grpc.aio reports a call aborted by closing its
    channel as ``asyncio.CancelledError``; unless this task itself is being
    cancelled that is a failover, to be retried like any transient error."""
    try:
        return await awaitable
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is None or task.cancelling():
            raise
        raise Interrupted("request cut off by a channel rebuild") from None


def status_code(exc: BaseException) -> Any:
    """The gRPC status code of an ``RpcError`` (None for any other error)."""
    return exc.code() if isinstance(exc, grpc.RpcError) and hasattr(exc, "code") else None


def _unavailable(what: str, exc: BaseException) -> CoordinatorUnavailable:
    if status_code(exc) is not None:
        detail = f"{status_code(exc).name}: {exc.details()}"  # type: ignore[attr-defined]
    else:
        detail = str(exc) or type(exc).__name__
    return CoordinatorUnavailable(f"etcd {what}: {detail}")


_grpc_pid: int | None = None
"""The process that first used gRPC here (see ``check_not_forked``)."""


def check_not_forked() -> None:
    """Refuse a process forked from one that already used etcd here
    (``InvalidInput``); remember this process as the one using it."""
    global _grpc_pid
    if _grpc_pid is not None and _grpc_pid != os.getpid():
        raise InvalidInput(
            f"cannot use etcd in process {os.getpid()}: it was forked from process "
            f"{_grpc_pid} after that one used etcd, and gRPC's asyncio client cannot "
            "work across a fork (its channels never answer in the child).  Open the "
            "registry in each worker, after the fork (gunicorn without --preload), or "
            "take slots through ZooKeeper or local locks"
        )
    _grpc_pid = os.getpid()


class EtcdChannel:
    """The private loop thread and the failover channel of one coordinator.

    ``kv``, ``lease`` and ``watch`` are the current channel's stubs (loop
    thread only: ``failover`` replaces them); ``generation`` counts the
    channels built, so a failed request fails over only the channel it used.
    ``closed`` is set once the coordinator closes: no failover after it.
    """

    def __init__(self, parsed: CoordinatorURL, url: str) -> None:
        self.url = url
        self._endpoints = list(parsed.endpoints)
        self.closed = False
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._run_loop, name=f"keepcount-etcd-{parsed.namespace}", daemon=True
        )
        self._thread.start()
        # Loop-thread state: the channel and its stubs, rebuilt on failover.
        self._channel: Any = None
        self.kv: Any = None
        self.lease: Any = None
        self.watch: Any = None
        self.generation = 0
        self._failover_lock: asyncio.Lock | None = None
        self.submit(self._connect(), timeout=10.0)

    # -- the private loop -------------------------------------------------

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    def on_loop_thread(self) -> bool:
        """Is the caller the private loop's thread?"""
        return threading.current_thread() is self._thread

    def submit(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run ``coro`` on the private loop and wait for it (never from the loop)."""
        if self.on_loop_thread():
            coro.close()
            raise RuntimeError("a blocking coordinator method was called on its own loop thread")
        try:
            fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        except RuntimeError as exc:  # the loop is closed
            coro.close()
            raise CoordinatorUnavailable(f"coordinator {self.url} is closed") from exc
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError as exc:
            fut.cancel()
            raise CoordinatorUnavailable(
                f"etcd at {self.url} did not answer within {timeout} s"
            ) from exc

    def call_soon(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` on the loop soon (from any thread); nothing once it is closed."""
        try:
            self.loop.call_soon_threadsafe(fn)
        except RuntimeError:  # the loop is closed: what fn would act on is gone with it
            pass

    # -- retries ----------------------------------------------------------

    def retrying(
        self, what: str, *, wait: WaitBaseT, stop: StopBaseT = stop_never, fatal: bool = True
    ) -> AsyncRetrying:
        """Retry ``TRANSIENT`` errors (but a ``fatal`` status code is raised at
        once when ``fatal``), failing over between attempts: the channel the
        failed attempt used is rebuilt on the next endpoint.  The last error
        is re-raised when ``stop`` gives up."""
        generation = self.generation

        def before(_: RetryCallState) -> None:
            nonlocal generation
            generation = self.generation

        async def before_sleep(state: RetryCallState) -> None:
            assert state.outcome is not None
            log.debug("etcd %s: %r; retrying", what, state.outcome.exception())
            await self.failover(generation)

        def retryable(exc: BaseException) -> bool:
            return isinstance(exc, TRANSIENT) and not (fatal and status_code(exc) in _FATAL)

        return AsyncRetrying(
            retry=retry_if_exception(retryable),
            wait=wait,
            stop=stop,
            before=before,
            before_sleep=before_sleep,
            reraise=True,
        )

    async def within(
        self, what: str, attempt: Callable[[float], Awaitable[T]], timeout: float
    ) -> T:
        """``attempt(deadline_of_this_attempt)`` until it succeeds or
        ``timeout`` runs out (no attempt starts after it), failing over to
        another member between attempts; ``CoordinatorUnavailable`` if it
        never succeeds or fails with a fatal status code."""
        deadline = time.monotonic() + timeout

        async def one() -> T:
            return await attempt(max(0.01, min(deadline - time.monotonic(), _ATTEMPT)))

        retrying = self.retrying(what, wait=wait_fixed(_PAUSE), stop=stop_before_delay(timeout))
        try:
            return await retrying(one)
        except TRANSIENT as exc:
            raise _unavailable(f"at {self.url} {what} within {timeout} s", exc) from exc

    # -- the channel ------------------------------------------------------

    async def _target(self) -> str:
        """A gRPC target listing every endpoint (names resolved now)."""
        loop = asyncio.get_running_loop()
        v4: list[str] = []
        v6: list[str] = []
        for host, port in self._endpoints:
            try:
                addr = ipaddress.ip_address(host)
            except ValueError:
                pass
            else:
                (v6 if addr.version == 6 else v4).append(
                    f"[{host}]:{port}" if addr.version == 6 else f"{host}:{port}"
                )
                continue
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as exc:
                log.warning("etcd endpoint %s does not resolve: %s", host, exc)
                continue
            family, _, _, _, sockaddr = sorted(infos, key=lambda i: i[0] != socket.AF_INET)[0]
            if family == socket.AF_INET:
                v4.append(f"{sockaddr[0]}:{port}")
            else:
                v6.append(f"[{sockaddr[0]}]:{port}")
        # A gRPC address list is of one family; IPv4 wins a mixed list.
        if v4:
            return "ipv4:" + ",".join(v4)
        if v6:
            return "ipv6:" + ",".join(v6)
        raise CoordinatorUnavailable(f"no etcd endpoint of {self.url} resolves")

    async def _connect(self) -> None:
        if self._failover_lock is None:
            self._failover_lock = asyncio.Lock()
        try:
            target = await self._target()
        except CoordinatorUnavailable:
            # Nothing resolves now: a channel that fails every call until the
            # next failover tries the names again.
            target = "ipv4:" + ",".join(f"{h}:{p}" for h, p in self._endpoints)
        self._channel = grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS)
        self.kv = rpc.KVStub(self._channel)
        self.lease = rpc.LeaseStub(self._channel)
        self.watch = rpc.WatchStub(self._channel)
        self.generation += 1

    async def failover(self, generation: int) -> None:
        """After a failed request on channel ``generation``: rotate the
        endpoints and rebuild the channel (once per generation)."""
        assert self._failover_lock is not None
        async with self._failover_lock:
            if generation != self.generation or self.closed:
                return
            self._endpoints.append(self._endpoints.pop(0))
            old = self._channel
            await self._connect()
            log.debug("etcd failover: now trying %s first", self._endpoints[0])
        # Closing aborts the calls still stuck on the old channel; their
        # callers see Interrupted and retry on the new one.
        await old.close(None)

    def close(self, last: Coroutine[Any, Any, None]) -> None:
        """Run ``last`` on the loop, cancel every other task, close the
        channel, stop the loop (from another thread; once)."""

        async def shutdown() -> None:
            await last
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._channel.close(None)

        self.closed = True
        try:
            asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(_SHUTDOWN_TIMEOUT)
        except (concurrent.futures.TimeoutError, grpc.RpcError) as exc:
            log.debug("closing %s: %r", self.url, exc)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
