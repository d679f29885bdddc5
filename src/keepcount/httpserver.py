"""How a node is served: uvicorn's httptools protocol, writing each response whole.

uvicorn writes a response's head (at ``http.response.start``) and its body
in two ``write()`` calls.  A node SIGKILLed between the two leaves its client
with a head that promises a body and no body: a 200 that is neither a
success nor a clean failure, which no load balancer can retry (it already
forwarded the head).  ``WholeResponseProtocol`` gives uvicorn a transport
that gathers every write made in one event-loop step and hands them to the
real transport together, after the step: head and body reach the socket in
one syscall, so a kill leaves the client either the whole answer or none.
It also halves the syscalls per response.

Nothing is delayed: the gathered bytes go out before the loop next waits
for I/O.  ``close()`` sends what is gathered first.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["WholeResponseProtocol"]


class _GatheringTransport:
    """Delegates to ``transport``; ``write()`` calls of one loop step become one."""

    __slots__ = ("_loop", "_parts", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._parts: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._parts:
            self._loop.call_soon(self.flush)
        self._parts.append(bytes(data))

    def flush(self) -> None:
        parts = self._parts
        if parts:
            self._parts = []
            if not self._transport.is_closing():
                self._transport.write(parts[0] if len(parts) == 1 else b"".join(parts))

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class WholeResponseProtocol(HttpToolsProtocol):
    """uvicorn's ``httptools`` protocol over a ``_GatheringTransport``
    (``uvicorn.Config(http=WholeResponseProtocol)``)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        gathering: Any = _GatheringTransport(transport, asyncio.get_running_loop())
        super().connection_made(gathering)
