"""The node's error answers: ``{"error": {"code", "message"}}``, everywhere.

Any error, anywhere (Starlette's own 404/405 and unexpected exceptions
included), is answered with a stable ``code`` (``keepcount.errors.ErrorCode``)
and a message for people; an error answer never changes anything.  A 503
carries ``Retry-After``.  ``ANSWERS`` says which codes each status carries
and what they mean: the OpenAPI document lists them from it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

import msgspec
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from keepcount.errors import (
    ClaimError,
    ErrorCode,
    IdempotencyKeySettled,
    InvalidInput,
    KeepcountError,
    RegistryClosed,
    StoreError,
)

__all__ = [
    "ANSWERS",
    "RETRY_AFTER",
    "HTTPError",
    "error_response",
    "exception_handlers",
]

RETRY_AFTER = "1"
"""Seconds a client should wait before retrying a 503 (sent as Retry-After)."""

E = ErrorCode
ANSWERS: dict[ErrorCode, tuple[int, str]] = {
    E.MALFORMED_JSON: (400, "the body is not a JSON object"),
    E.INVALID_IDEMPOTENCY_KEY: (
        400, "the Idempotency-Key header (or the key of /v1/idempotency/{key}) is not 1-255 "
        "printable ASCII characters"),
    E.UNAUTHORIZED: (
        401, "the node requires a bearer token for writes and the request carried none "
        "or a wrong one"),
    E.NOT_FOUND: (404, "no such endpoint, or no counter or histogram of that name"),
    E.METHOD_NOT_ALLOWED: (405, "the endpoint does not serve that method"),
    E.BODY_TOO_LARGE: (413, "the body is larger than the node's limit (64 KiB unless configured)"),
    E.UNSUPPORTED_MEDIA_TYPE: (415, "a body was sent with a Content-Type other than application/json"),
    E.INVALID_INPUT: (
        422, "unknown field, labels not an object of strings, `help` not a short string "
        "without control characters, invalid metric name, label name or label value"),
    E.INVALID_AMOUNT: (
        422, "`by` not an integer in [0, 2^63-1], or the value would pass 2^63-1"),
    E.DEFINITION_CONFLICT: (
        422, "labels that differ from the existing family's, or a histogram of that name"),
    E.TOO_MANY_LABEL_SETS: (
        422, "the family already holds its maximum of label sets (the message names the limit)"),
    E.IDEMPOTENCY_KEY_REUSED: (422, "an Idempotency-Key reused with another request"),
    E.IDEMPOTENCY_KEY_SETTLED: (
        409, "the Idempotency-Key was settled as not applied (GET /v1/idempotency/{key}): "
        "this increment was dropped, nothing counted, and never will be under that key"),
    E.INTERNAL_ERROR: (500, "a bug in the node; nothing was acknowledged"),
    E.NOT_READY: (
        503, "the node is not ready: claiming or restoring, shutting down, or its claim "
        "was lost"),
    E.CLAIM_LOST: (
        503, "the node could no longer vouch for its claim when the increment became "
        "durable: maybe counted, not acknowledged"),
    E.STORE_UNAVAILABLE: (503, "the store failed; nothing was written"),
    E.OUTCOME_UNKNOWN: (503, "the store write timed out: maybe written, not acknowledged"),
    E.FENCED: (503, "a newer incarnation of this node id holds the claim"),
    E.STORE_ERROR: (503, "the store failed"),
    E.CORRUPT_STORE: (503, "the store is corrupt or foreign"),
    E.CLAIM_ERROR: (503, "the claim failed"),
    E.COORDINATOR_UNAVAILABLE: (503, "the coordinator cannot be reached"),
    E.KEEPCOUNT_ERROR: (503, "another keepcount error"),
}  # fmt: skip
"""Each code the node answers with: (HTTP status, what it means)."""

_RETRY = {"retry-after": RETRY_AFTER}
_encode = msgspec.json.Encoder().encode


class HTTPError(Exception):
    """An error answer: ``{"error": {"code", "message"}}`` with ``status``."""

    def __init__(
        self, status: int, code: ErrorCode, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def error_response(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> Response:
    """The answer to an error; a 503 says when to retry (Retry-After)."""
    body = _encode({"error": {"code": code, "message": message}})
    if status == 503:
        headers = {**_RETRY, **(headers or {})}
    return Response(body, status, headers, "application/json")


Handler = Callable[[Request, Exception], Awaitable[Response]]


def exception_handlers(not_ready: Callable[[], HTTPError]) -> dict[type[Exception], Handler]:
    """Starlette's ``exception_handlers`` of a node: every exception becomes an
    error answer with a code; ``not_ready()`` is the node's 503 for its state."""

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPError)
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    async def on_keepcount_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, KeepcountError)
        if isinstance(exc, InvalidInput):
            return error_response(422, exc.code, str(exc))
        if isinstance(exc, IdempotencyKeySettled):
            return error_response(409, exc.code, str(exc))
        if isinstance(exc, RegistryClosed):  # closing: the node is shutting down
            return await on_http_error(request, not_ready())
        if isinstance(exc, StoreError | ClaimError):
            return error_response(503, exc.code, f"not acknowledged: {exc}")
        return error_response(503, exc.code, str(exc))

    async def on_starlette_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: E.NOT_FOUND, 405: E.METHOD_NOT_ALLOWED}.get(exc.status_code, E.HTTP_ERROR)
        message = exc.detail
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return error_response(exc.status_code, code, message, exc.headers)

    async def on_disconnect(request: Request, exc: Exception) -> Response:
        # The client left while sending its body: nothing was counted, nobody reads this.
        return error_response(400, E.CLIENT_DISCONNECTED, "the client closed the connection")

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        # Starlette's ServerErrorMiddleware logs the exception after this answer.
        return error_response(500, E.INTERNAL_ERROR, f"internal error ({type(exc).__name__})")

    return {
        HTTPError: on_http_error,
        KeepcountError: on_keepcount_error,
        HTTPException: on_starlette_error,
        ClientDisconnect: on_disconnect,
        Exception: on_unexpected,
    }
