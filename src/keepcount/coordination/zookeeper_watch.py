"""A ZooKeeper membership watch: the namespace's children, read again on every change.

A thread of its own reads the members (``read``, a ``sync`` then the
children and their data) with a child watch set, then waits until ZooKeeper
fires that watch, a reconnection fires it, or ``_RESYNC`` seconds pass, and
reads again; the callback gets each membership that differs from the last
one it got.  A read that fails is retried (``tenacity``) every
``_RETRY_PAUSE`` seconds, or at once when the watch fires.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from tenacity import Retrying, before_sleep_log, retry_if_exception_type, wait_fixed

from keepcount.coordination.base import Member
from keepcount.errors import CoordinatorUnavailable

__all__ = ["ZooKeeperWatch"]

log = logging.getLogger(__name__)

_RESYNC = 5.0
"""A watch re-reads the membership at least this often, even without events."""
_RETRY_PAUSE = 0.5
"""Pause after a failed read (cut short when the watch fires)."""


class ZooKeeperWatch:
    """A membership watch: a thread that reads the children of the namespace
    whenever ZooKeeper says they changed (and every few seconds regardless)
    and calls the callback.  ``read(watch)`` lists the members, setting
    ``watch`` on the children (``CoordinatorUnavailable`` if it cannot);
    ``forget(watch)`` is called once, when it is cancelled."""

    def __init__(
        self,
        read: Callable[[Callable[..., None]], dict[str, Member]],
        callback: Callable[[dict[str, Member]], None],
        forget: Callable[[ZooKeeperWatch], None],
    ) -> None:
        self._read = read
        self._callback = callback
        self._forget = forget
        self._trigger = threading.Event()
        self._cancelled = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="keepcount-zk-watch", daemon=True)
        self._thread.start()

    def fire(self, *_: object) -> None:
        """Something may have changed (a child watch, a reconnection)."""
        self._trigger.set()

    def _pause(self, seconds: float) -> None:
        self._trigger.wait(seconds)

    def _read_once(self) -> dict[str, Member] | None:
        """The members now, the child watch set again (None: cancelled)."""
        if self._cancelled.is_set():
            return None
        self._trigger.clear()
        return self._read(self.fire)

    def _run(self) -> None:
        retrying = Retrying(
            retry=retry_if_exception_type(CoordinatorUnavailable),
            wait=wait_fixed(_RETRY_PAUSE),
            sleep=self._pause,
            before_sleep=before_sleep_log(log, logging.DEBUG),
        )
        last: dict[str, Member] | None = None
        while (members := retrying(self._read_once)) is not None:
            with self._lock:
                if self._cancelled.is_set():
                    return
                deliver = members != last
            if deliver:
                last = members
                try:
                    self._callback(dict(members))
                except Exception:
                    log.exception("membership watch callback failed")
            self._trigger.wait(_RESYNC)

    def cancel(self) -> None:
        """Stop the watch; idempotent.  No call starts after it returns."""
        with self._lock:
            if self._cancelled.is_set():
                return
            self._cancelled.set()
        self._trigger.set()
        self._forget(self)
        if threading.current_thread() is not self._thread:
            self._thread.join(10)
