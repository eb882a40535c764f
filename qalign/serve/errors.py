"""Errors in OpenAI's JSON shape, so that OpenAI clients raise their usual exceptions with our message.

Every failure the server reports, whatever raised it (our own checks, FastAPI's body parsing, an unknown
route, the policy itself), leaves as ``{"error": {"message", "type", "param", "code"}}`` with a 4xx or 5xx
status: clients such as the ``openai`` package read ``error.message`` and map the status to an exception
class (400 → ``BadRequestError``, 401 → ``AuthenticationError``, 404 → ``NotFoundError``, …).
"""

from __future__ import annotations

import logging
import traceback
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("qalign.serve")


class ServeError(Exception):
    """A request the server answers with an error; raised anywhere below a route.

    Args:
        status: the HTTP status (400 bad request, 401 key, 404 model, 500 policy failure, 503 closing).
        message: what went wrong and, where it helps, what to send instead.
        param: the request field at fault (``"temperature"``, ``"messages.0.role"``), if any.
        code: OpenAI-style machine-readable code (``"model_not_found"``, ``"context_length_exceeded"``).
    """

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    @property
    def type(self) -> str:
        if self.status == 401:
            return "authentication_error"
        return "invalid_request_error" if self.status < 500 else "server_error"


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> ServeError:
    return ServeError(400, message, param, code)


def error_body(error: ServeError) -> dict[str, Any]:
    return {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}


class Redactor:
    """Replaces the API key with ``***`` in every error message that leaves the server.

    No message is built from the key or the Authorization header; this is the second lock, for a message
    quoted from somewhere we do not control (an exception raised inside the policy, a library's text).
    """

    def __init__(self, secret: str | None):
        self.secret = secret or None

    def __call__(self, text: str) -> str:
        return text.replace(self.secret, "***") if self.secret else text


def error_response(error: ServeError, redact: Redactor) -> JSONResponse:
    error.message = redact(error.message)
    return JSONResponse(error_body(error), status_code=error.status)


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """(message, param) for pydantic's errors: the most specific error (a union's members each add
    one; the deepest says what was wrong inside the member that came closest), its field as a dotted path
    without pydantic's union-member tags (``messages.0.content``, not ``messages.0.content.str``)."""
    first = max(errors, key=lambda e: len(e.get("loc", ())))
    loc = [str(part) for part in first.get("loc", ()) if part != "body" and not _is_member_tag(part)]
    param = ".".join(loc) or None
    text = first.get("msg", "invalid value")
    return (f"{param}: {text}" if param else text), param


def _is_member_tag(part: Any) -> bool:
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part)


def install_error_handlers(app: FastAPI, redact: Redactor) -> None:
    """Route every exception to the OpenAI error shape: pydantic errors as 400 (not FastAPI's 422),
    unknown routes as 404, anything unexpected as 500 (logged with its traceback; the server stays up)."""

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, error: ServeError) -> JSONResponse:
        return error_response(error, redact)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        message, param = validation_message(list(error.errors()))
        return error_response(bad_request(message, param), redact)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        detail = error.detail if isinstance(error.detail, str) else str(error.detail)
        if error.status_code == 404:
            detail = f"no route {request.method} {request.url.path}; this server has /v1/models, /v1/completions, /v1/chat/completions and /health"
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        return error_response(ServeError(error.status_code, detail, None, code), redact)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        trace = redact("".join(traceback.format_exception(error)))
        logger.error("internal error on %s %s:\n%s", request.method, request.url.path, trace)
        message = f"internal server error: {type(error).__name__}: {error}"
        return error_response(ServeError(500, message, None, "internal_error"), redact)
