"""The supervisor's event log: what happened to a local cluster, and when.

Every event (``started``, ``ready``, ``exited``, ``claim_lost``, ``evicted``,
...) is a JSON object with wall and monotonic times (``t``, ``mono``), its
name (``event``), the node it concerns (``node``, or None) and a sequence
number (``seq``), plus fields of its own.  It is kept in memory (the latest
``KEEP``: the control API's ``/api/events`` and the live page read them),
appended to ``<dir>/events.jsonl`` (the demo's report and the failover
measurements read the file: ``read_events``) and handed to an optional
callback (the CLI prints it).

Example::

    log = EventLog(Path("/tmp/c/events.jsonl"))
    log.reset()
    log.append("started", "node-1", pid=1234)
    assert read_events(Path("/tmp/c"))[0]["pid"] == 1234
"""

from __future__ import annotations

import json
import signal
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["EVENTS_FILE", "KEEP", "Event", "EventLog", "read_events", "signal_name"]

EVENTS_FILE = "events.jsonl"
KEEP = 2000
"""Events kept in memory; the file keeps them all."""

Event = dict[str, Any]


class EventLog:
    """The events of one supervisor run (see the module docstring).

    ``append`` is called from the supervisor's event loop only; readers in
    other threads copy ``events`` before they iterate it.
    """

    def __init__(self, path: Path, on_event: Callable[[Event], None] | None = None) -> None:
        self.path = path
        self.on_event = on_event
        self.events: deque[Event] = deque(maxlen=KEEP)
        self.count = 0
        """Events appended so far (the last one's ``seq``)."""

    def reset(self) -> None:
        """Start the file afresh (a new run of the supervisor)."""
        self.path.write_text("")

    def append(self, what: str, node: str | None = None, **data: Any) -> Event:
        """Record one event; returns it."""
        ev: Event = {"t": time.time(), "mono": time.monotonic(), "event": what, "node": node}
        ev.update(data)
        self.count += 1
        ev["seq"] = self.count
        self.events.append(ev)
        with open(self.path, "a") as f:
            f.write(json.dumps(ev) + "\n")
        if self.on_event is not None:
            self.on_event(ev)
        return ev


def read_events(directory: Path) -> list[Event]:
    """Every event a supervisor of ``directory`` recorded, in order."""
    path = directory / EVENTS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def signal_name(code: int) -> str | None:
    """``"SIGKILL"`` for an exit status of -9; None for a normal exit."""
    if code >= 0:
        return None
    try:
        return signal.Signals(-code).name
    except ValueError:
        return None
