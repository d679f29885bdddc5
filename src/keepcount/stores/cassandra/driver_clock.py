"""The Cassandra driver's waits on the monotonic clock, not the wall clock.

cassandra-driver (3.x; read for 3.30.1) times everything it waits for with
``time.time()``: each request's timeout (``connection.Timer`` /
``TimerManager``, and the libev loop's wake-up computed from them),
``ResponseFuture``'s deadline, its scheduler (reconnecting to a replica that
came back, ``cluster._Scheduler``), pool waits, the control connection's
event debouncing.  A wall clock step therefore changes how long it waits: a
step forwards fires every pending request timer at once (requests in flight
fail with ``OperationTimedOut``: outcome unknown, not acknowledged, retried
with their keys), and a step backwards of an hour postpones them by an hour
(a request in flight to a replica that dies then hangs the node's flusher
for an hour, and a reconnection waits as long).

``use_monotonic_clock()`` rebinds the name ``time`` in those modules (and
``ControlConnection._time``) to ``MONOTONIC``: the ``time`` module with
``time()`` replaced by ``time.monotonic()``.  In those modules every
``time.time()`` is compared with, or subtracted from, another one of the
same modules (checked by reading each of them), so only the clock changes.
What must stay wall-clock time is elsewhere and untouched: the client
write timestamps (``cassandra.timestamps``; keepcount sets its own with
``USING TIMESTAMP``, see ``keepcount.stores.lww``) and time UUIDs
(``cassandra.util``).  Idempotent; ``connect`` calls it before it
builds a ``Cluster``.
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

__all__ = ["MONOTONIC", "use_monotonic_clock"]

MONOTONIC: Any = SimpleNamespace(**{k: v for k, v in vars(time).items() if not k.startswith("_")})
MONOTONIC.time = time.monotonic

_MODULES = ("cassandra.connection", "cassandra.cluster", "cassandra.pool",
            "cassandra.io.libevreactor")  # fmt: skip


def use_monotonic_clock() -> None:
    """Put the driver's waits on ``time.monotonic()`` (see the module docstring)."""
    import importlib

    for name in _MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # libev not built: the asyncio reactor uses loop.time()
            continue
        module.time = MONOTONIC  # type: ignore[attr-defined]
    from cassandra.cluster import ControlConnection

    ControlConnection._time = MONOTONIC
