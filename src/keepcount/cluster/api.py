"""The supervisor's control API, for ``keepcount cluster status|kill|restart|down``.

Served on ``spec.api_port`` (127.0.0.1) by uvicorn inside the supervisor's
event loop.  Every answer is JSON; errors are ``{"error": {"code",
"message"}}`` like the node's.

- ``GET /api/status`` — nodes (state, pid, slot, epoch, incarnation,
  restarts, uptime), the load balancer's view of its backends, the
  coordinator's members; ``?counters=1`` adds the cluster totals.
- ``GET /api/events?since=SEQ`` — the supervisor's events after ``SEQ``.
- ``POST /api/nodes/{node}/signal`` ``{"signal": "KILL"|"STOP"|"CONT"|"TERM"}``
  — answers once the effect is seen.
- ``POST /api/nodes/{node}/restart`` — graceful stop, answers once the new
  incarnation is ready.
- ``POST /api/down`` — tear the whole cluster down (answers at once).
"""

from __future__ import annotations

import json
import socket
from typing import TYPE_CHECKING, Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from keepcount.errors import InvalidInput

if TYPE_CHECKING:
    from keepcount.cluster.supervisor import Supervisor

__all__ = ["create_api", "serve_api"]


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status)


def create_api(sup: Supervisor) -> Starlette:
    async def status(request: Request) -> JSONResponse:
        body = sup.status()
        if request.query_params.get("counters"):
            body["counters"] = await sup.counters()
        return JSONResponse(body)

    async def events(request: Request) -> JSONResponse:
        try:
            since = int(request.query_params.get("since", "0"))
        except ValueError:
            return _error(400, "invalid_input", "since must be an integer")
        return JSONResponse({"events": [e for e in sup.events if e["seq"] > since]})

    async def send_signal(request: Request) -> JSONResponse:
        try:
            body: Any = json.loads(await request.body() or b"{}")
            name = body["signal"] if isinstance(body, dict) else None
            if not isinstance(name, str):
                raise InvalidInput('the body must be {"signal": "KILL"|"STOP"|"CONT"|"TERM"}')
            return JSONResponse(await sup.signal(request.path_params["node"], name))
        except (ValueError, KeyError) as exc:  # InvalidInput is a ValueError
            return _error(422, "invalid_input", str(exc))
        except TimeoutError as exc:
            return _error(504, "timeout", str(exc))

    async def restart(request: Request) -> JSONResponse:
        try:
            return JSONResponse(await sup.restart(request.path_params["node"]))
        except InvalidInput as exc:
            return _error(422, "invalid_input", str(exc))
        except TimeoutError as exc:
            return _error(504, "timeout", str(exc))

    async def down(request: Request) -> JSONResponse:
        sup.stop()
        return JSONResponse({"status": "stopping"}, 202)

    return Starlette(
        routes=[
            Route("/api/status", status, methods=["GET"]),
            Route("/api/events", events, methods=["GET"]),
            Route("/api/nodes/{node}/signal", send_signal, methods=["POST"]),
            Route("/api/nodes/{node}/restart", restart, methods=["POST"]),
            Route("/api/down", down, methods=["POST"]),
        ]
    )


class _Server(uvicorn.Server):
    # The supervisor owns SIGTERM/SIGINT (they tear the cluster down).
    def capture_signals(self) -> Any:
        import contextlib

        return contextlib.nullcontext()


async def serve_api(sup: Supervisor) -> None:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((sup.spec.host, sup.spec.api_port))
    config = uvicorn.Config(
        create_api(sup), lifespan="off", access_log=False, log_level="warning", loop="none"
    )
    server = _Server(config)
    try:
        await server.serve(sockets=[sock])
    finally:
        sock.close()
