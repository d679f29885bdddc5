"""How a flush's outcome reaches its waiters (``keepcount.commit``).

A flush is awaited by threads (``commit_sync()``) and by tasks of any number
of event loops (``commit()``, keyed increments).  ``Batch`` holds one
flush's waiters: a ``threading.Event`` for the threads and one ``Outcome``
future per event loop, shared by all of that loop's waiters, so settling a
flush costs one ``call_soon_threadsafe`` per loop, not one per waiter.
"""

from __future__ import annotations

import asyncio
import threading

from keepcount.errors import KeepcountError
from keepcount.stores.base import KeyRecord

__all__ = ["Batch", "KeyedOutcome", "Outcome", "copy_error", "resolve", "resolve_keyed"]

KeyedOutcome = tuple[int, bool, KeyRecord | None] | KeepcountError
"""What a keyed waiter gets: (value, replayed, record) or the error."""


class Outcome(asyncio.Future[KeepcountError | None]):
    """One future per (flush, event loop), awaited by all of that loop's waiters.

    Its result is the flush's error or None; each waiter raises its own copy.
    It refuses cancellation: one waiter's cancel must not cancel the others'
    wait, so a cancelled ``commit()`` takes effect when the flush it waits
    for ends (one store write at most).
    """

    def cancel(self, msg: object = None) -> bool:
        return False


class Batch:
    """The waiters of one flush."""

    __slots__ = ("error", "event", "outcomes", "wanted")

    def __init__(self) -> None:
        self.wanted = False
        self.error: KeepcountError | None = None
        self.event: threading.Event | None = None
        self.outcomes: dict[asyncio.AbstractEventLoop, Outcome] = {}


def copy_error(err: KeepcountError) -> KeepcountError:
    """A fresh exception per waiter: one instance raised in many threads or
    tasks would collect all their tracebacks."""
    new = type(err)(*err.args)
    new.__cause__ = err
    return new


def resolve(outcome: Outcome, error: KeepcountError | None) -> None:
    if not outcome.done():
        outcome.set_result(error)


def resolve_keyed(answers: list[tuple[asyncio.Future[KeyedOutcome], KeyedOutcome]]) -> None:
    for fut, outcome in answers:
        if not fut.done():  # a cancelled request is not waiting any more
            fut.set_result(outcome)
