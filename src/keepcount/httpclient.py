"""The package's one way to make an HTTP call: aiohttp, from async and sync code.

Async, inside an event loop (load generators, probes, samplers)::

    async with new_session(connections=16, timeout=3.0) as session:
        status, body = await exchange(session, "GET", f"{url}/readyz", timeout=0.5)

Sync, anywhere else (readiness polls, CLI calls, etcd and NGINX health)::

    status, body = request("POST", url, body=b"{}", headers=JSON, timeout=2.0)
    status, body = get(url, timeout=1.0)

Contract:

- ``exchange`` and ``request`` send one request and return ``(status, body)``
  whatever the status: a 4xx or 5xx is an answer, not an error, and a
  redirect is returned, not followed.
- Every failure to get a whole answer is an ``OSError``: ``TimeoutError``
  (itself an ``OSError``) when the whole exchange (connect, send, the answer
  to its last byte) did not finish within ``timeout`` seconds; otherwise the
  connection was refused or reset (aiohttp's ``ClientConnectorError`` /
  ``ClientOSError``, both ``OSError``), or closed, cut short or answered with
  something that is not HTTP (``ExchangeFailed``, a ``ConnectionError``,
  with aiohttp's error as its ``__cause__``).  ``except OSError`` catches
  them all; ``isinstance(exc, TimeoutError)`` tells a timeout apart, and
  ``failure_name(exc)`` names what went wrong.
- ``new_session``: keep-alive connections (``connections`` at most, or a
  fresh one per request with ``keepalive=False``), ``timeout`` seconds for a
  whole exchange unless a call gives its own, no proxy taken from the
  environment.  It must be made inside a running event loop, and closed
  (``async with``).  The load generators that tell aiohttp's own errors apart
  (``keepcount.cluster.workload``, ``keepcount.verify.workload``) use the
  session directly and catch ``(TimeoutError, aiohttp.ClientError)``.
- The sync calls run on ONE private event-loop thread per process (a daemon,
  started on first use, with one session kept open, a fresh connection per
  request: a killed server leaves no stale connection behind).  They are
  thread-safe.  After ``os.fork()`` the child starts a thread of its own on
  first use (the parent's did not survive the fork); at exit the session is
  closed.

aiohttp is imported on first use: importing this module costs nothing, so a
``keepcount`` command that makes no HTTP call does not load it.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import threading
from collections.abc import Coroutine, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import aiohttp

__all__ = [
    "DEFAULT_TIMEOUT",
    "ExchangeFailed",
    "exchange",
    "failure_name",
    "get",
    "new_session",
    "request",
]

DEFAULT_TIMEOUT = 5.0
"""Seconds for a whole exchange when the caller gives none."""
DEFAULT_CONNECTIONS = 100
"""aiohttp's own default pool size."""
SYNC_TIMEOUT = 2.0
"""The sync calls' default: they talk to loopback servers."""
_SYNC_GRACE = 1.0
"""Beyond a sync call's own deadline, how long its thread waits for the loop
(only if that loop is stuck: the exchange's deadline fires first)."""
T = TypeVar("T")


class ExchangeFailed(ConnectionError):
    """The connection was closed or cut short before the whole answer came,
    or the answer was not HTTP (aiohttp's error is the ``__cause__``)."""


def new_session(
    *, connections: int = DEFAULT_CONNECTIONS, timeout: float | None = DEFAULT_TIMEOUT,
    keepalive: bool = True,
) -> aiohttp.ClientSession:  # fmt: skip
    """A session with the package's defaults (see the module docstring);
    ``timeout`` None: no deadline but each call's own.  Call it inside a
    running event loop, close it with ``async with``."""
    import aiohttp

    connector = aiohttp.TCPConnector(limit=connections, force_close=not keepalive)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=timeout),
        skip_auto_headers=("Content-Type",),  # a body without one is sent without one
    )


async def exchange(
    session: aiohttp.ClientSession, method: str, url: str, *, body: bytes | None = None,
    headers: Mapping[str, str] | None = None, timeout: float | None = None,
) -> tuple[int, bytes]:  # fmt: skip
    """One request and its whole answer within ``timeout`` seconds (instead
    of the session's deadline; the session's if None): ``(status, body)``.
    ``TimeoutError`` or another ``OSError`` if not (see the module docstring)."""
    import aiohttp

    deadline = session.timeout if timeout is None else aiohttp.ClientTimeout(total=timeout)
    try:
        async with session.request(
            method, url, data=body, headers=headers, allow_redirects=False, timeout=deadline
        ) as response:
            return response.status, await response.read()
    except aiohttp.ClientError as exc:
        if isinstance(exc, OSError):  # refused, reset; aiohttp's own timeouts
            raise
        raise ExchangeFailed(f"{method} {url}: {exc!r}") from exc


def failure_name(exc: BaseException) -> str:
    """What went wrong, for a record: the class name of ``exc`` (of aiohttp's
    error behind an ``ExchangeFailed``), e.g. ``ServerDisconnectedError``."""
    if isinstance(exc, ExchangeFailed) and exc.__cause__ is not None:
        exc = exc.__cause__
    return type(exc).__name__


# -- sync calls ----------------------------------------------------------------------


def request(
    method: str, url: str, *, body: bytes | None = None,
    headers: Mapping[str, str] | None = None, timeout: float = SYNC_TIMEOUT,
) -> tuple[int, bytes]:  # fmt: skip
    """``exchange`` from sync code, on the process's HTTP thread: ``(status,
    body)``; ``TimeoutError`` or another ``OSError`` if no whole answer came
    within ``timeout`` seconds."""
    runner = _runner()
    work = exchange(runner.session, method, url, body=body, headers=headers, timeout=timeout)
    return runner.call(work, timeout + _SYNC_GRACE)


def get(url: str, *, timeout: float = SYNC_TIMEOUT) -> tuple[int, bytes]:
    """One GET: ``request("GET", url, timeout=timeout)``."""
    return request("GET", url, timeout=timeout)


class _Runner:
    """The event-loop thread of the sync calls and the session it keeps open."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="keepcount-http", daemon=True
        )
        self.thread.start()
        self.session = self.call(_sync_session(), SYNC_TIMEOUT)

    def call(self, work: Coroutine[Any, Any, T], timeout: float) -> T:
        future = asyncio.run_coroutine_threadsafe(work, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    def close(self) -> None:
        try:
            self.call(self.session.close(), SYNC_TIMEOUT)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(SYNC_TIMEOUT)
            if not self.loop.is_running():
                self.loop.close()


async def _sync_session() -> aiohttp.ClientSession:
    return new_session(timeout=None, keepalive=False)  # each call gives its deadline


_lock = threading.Lock()
_current: _Runner | None = None
_forked_away: list[_Runner] = []
"""In a forked child: the parent's runner, kept so that it is never collected
(its thread is gone; collecting its session would report it unclosed)."""


def _runner() -> _Runner:
    global _current
    runner = _current
    if runner is None:
        with _lock:
            if _current is None:
                _current = _Runner()
            runner = _current
    return runner


def _after_fork_in_child() -> None:
    global _current, _lock
    if _current is not None:
        _forked_away.append(_current)
    _current = None
    _lock = threading.Lock()  # the parent's may have been held by another thread


@atexit.register
def _close_at_exit() -> None:
    global _current
    runner, _current = _current, None
    if runner is not None:
        try:
            runner.close()
        except (OSError, RuntimeError):
            pass  # exiting anyway


os.register_at_fork(after_in_child=_after_fork_in_child)
