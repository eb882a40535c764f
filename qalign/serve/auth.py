"""The optional API key: ``Authorization: Bearer <key>`` on every ``/v1`` route.

The key is compared in constant time and never written anywhere: not in logs, not in error messages
(a wrong key is not echoed back, not even masked), not in the process's command line (the CLI reads it
from an environment variable).
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from fastapi import Request

from qalign.serve.errors import ServeError


def key_checker(api_key: str | None) -> Callable[[Request], Awaitable[None]]:
    """A FastAPI dependency that lets a request through when it carries ``api_key`` (always, when None)."""
    expected = api_key.encode() if api_key else None

    async def check(request: Request) -> None:
        if expected is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ServeError(401, "missing API key: send it as 'Authorization: Bearer <key>'", None, "invalid_api_key")
        if not hmac.compare_digest(token.strip().encode(), expected):
            raise ServeError(401, "incorrect API key", None, "invalid_api_key")

    return check
