"""The server's error envelope (docs/protocol.md §6.1) and request ids."""

from __future__ import annotations

import re
import secrets
from typing import Any

from aiohttp import web

_STATUS_FOR_HTTP = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    402: "PAYMENT_REQUIRED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ALREADY_EXISTS",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}
_DEFAULT_REASON = {
    400: "INVALID_ARGUMENT",
    401: "INVALID_CREDENTIALS",
    402: "PAYMENT_REQUIRED",
    403: "PERMISSION_DENIED",
    404: "RESOURCE_NOT_FOUND",
    409: "STATE_INVALID",
    429: "RATE_LIMIT_EXCEEDED",
    500: "INTERNAL",
    503: "SERVICE_UNAVAILABLE",
}
_MESSAGES = {
    "AUTHENTICATION_REQUIRED": "Authentication is required.",
    "INVALID_CREDENTIALS": "The provided credentials are invalid.",
    "RATE_LIMIT_EXCEEDED": "Too many requests. Please try again later.",
    "ROUTE_NOT_FOUND": "The requested route was not found.",
    "CALL_NOT_FOUND": "The call was not found.",
    "TRANSCRIBE_NOT_FOUND": "The transcribe was not found.",
    "TRANSCRIBE_ALREADY_PROGRESSING": "A transcribe is already progressing for this reference.",
    "RESOURCE_NOT_FOUND": "The requested resource was not found.",
    "INVALID_ID": "The given id is not a valid UUID.",
    "INVALID_JSON_BODY": "The request body is not valid JSON.",
    "INTERNAL": "An internal error occurred.",
}
_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"


def status_for(http_status: int) -> str:
    """Envelope ``status`` for an HTTP status code."""
    return _STATUS_FOR_HTTP.get(http_status, "INTERNAL" if http_status >= 500 else "UNKNOWN")


def default_reason(http_status: int) -> str:
    """The generic reason a bare upstream status maps to."""
    return _DEFAULT_REASON.get(http_status, "INTERNAL")


def request_id_for(request: web.Request) -> str:
    """Echo a safe client ``X-Request-Id``, else generate ``req_`` + 26 base32 characters."""
    given = request.headers.get("X-Request-Id", "")
    if _SAFE_REQUEST_ID.match(given):
        return given
    return "req_" + "".join(secrets.choice(_B32) for _ in range(26))


class ApiError(Exception):
    """Raised by handlers; rendered as the error envelope."""

    def __init__(
        self,
        http_status: int,
        reason: str | None = None,
        message: str | None = None,
        *,
        status: str | None = None,
        details: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.http_status = http_status
        self.reason = reason or default_reason(http_status)
        self.status = status or status_for(http_status)
        self.message = message or _MESSAGES.get(self.reason, self.reason.replace("_", " ").lower())
        self.details = details or []
        self.headers = headers or {}
        super().__init__(f"{http_status} {self.reason}")


def error_response(err: ApiError, request_id: str) -> web.Response:
    """The JSON envelope for ``err`` with ``X-Request-Id``."""
    body: dict[str, Any] = {
        "status": err.status,
        "reason": err.reason,
        "message": err.message,
        "request_id": request_id,
    }
    if err.details:
        body["details"] = err.details
    headers = {"X-Request-Id": request_id, **err.headers}
    return web.json_response({"error": body}, status=err.http_status, headers=headers)
