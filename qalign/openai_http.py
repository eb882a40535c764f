"""The one HTTP client qalign uses for OpenAI-compatible servers (OpenAI, vLLM, TEI, …).

Every request, whatever the endpoint (``/v1/completions``, ``/v1/embeddings``, vLLM's ``/health``,
``/collective_rpc``, ``/reset_prefix_cache``, ``/v1/load_lora_adapter``), goes through
``ApiClient.request``, so all of them share one classification of failures, one retry policy and one
redaction of the API key:

* transient (re-sending, here or to another server, may succeed): timeouts, refused or dropped
  connections, HTTP 408/409/429 and 5xx, a success whose JSON body is cut short. Retried with backoff
  up to ``max_retries`` times, then raised as ``TransientError``.
* rejected (any other status, e.g. 401, 400 on a too-long input): raised at once as ``ApiError``, since
  the same request cannot succeed.

Errors name the endpoint's URL; the key never appears in a log line, error, repr or pickle.
httpx is the transport: it pools connections and is safe to share between threads.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, TypeVar

import httpx

logger = logging.getLogger(__name__)

# httpx logs every request at INFO: under the CLIs' INFO logging a rollout or an embedding job would
# print one line per request. A level the user set themselves is left alone.
if logging.getLogger("httpx").level == logging.NOTSET:
    logging.getLogger("httpx").setLevel(logging.WARNING)

T = TypeVar("T")
R = TypeVar("R")

RETRY_STATUS = frozenset({408, 409, 429})
# Failures before or during the exchange that a fresh attempt can cure. Other transport errors (an
# invalid header, an unsupported URL scheme) would fail the same way again.
TRANSIENT_ERRORS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)


class ApiError(RuntimeError):
    """A request to an OpenAI-compatible server failed for good. ``status``: the HTTP status, if one came."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class TransientError(ApiError):
    """The server did not answer usably and retries ran out; another server (or a later try) may answer."""


class Secret:
    """An API key. ``str``/``repr``/f-strings show ``***``; only ``reveal()`` gives the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __reduce__(self):
        # Pickling would write the key to disk or send it to a subprocess unredacted.
        raise TypeError("an API key Secret cannot be pickled")


def secret_from_env(variable: str | None, what: str) -> Secret | None:
    """The key held by the environment variable named ``variable`` (None: no key is sent).

    The error names the variable, never a value.
    """
    if not variable:
        return None
    value = (os.environ.get(variable) or "").strip()  # a trailing newline from `cat keyfile` is common
    if not value:
        raise ApiError(f"{what}: environment variable {variable} is not set (it should hold the API key)")
    if any(ch.isspace() or not ch.isprintable() for ch in value):
        # HTTP libraries reject such a header and quote it in their error: refuse it here, unquoted.
        raise ApiError(f"{what}: the key in environment variable {variable} contains whitespace or control characters")
    return Secret(value)


class ApiClient:
    """Requests to ``base_url`` + path (e.g. ``http://127.0.0.1:8000/v1`` + ``/embeddings``).

    Args:
        base_url: the root the paths are relative to (OpenAI clients expect it to include ``/v1``).
        api_key: sent as ``Authorization: Bearer`` when given.
        timeout: seconds one request may take (connecting, or waiting for each part of the answer).
        max_retries: re-sends of a transiently failed request before giving up (0: one attempt).
        backoff_base, backoff_max: the wait before retry i is uniform in [½, 1] × min(max, base · 2^i)
            seconds (jitter keeps concurrent clients from retrying in lock-step), or the server's
            ``Retry-After`` when it sends one (capped at ``backoff_max``).
        max_concurrency: requests in flight at once (``map``).
    """

    def __init__(
        self,
        base_url: str,
        api_key: Secret | None = None,
        *,
        timeout: float = 60.0,
        max_retries: int = 6,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        max_concurrency: int = 4,
        seed: int | None = None,
    ):
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.max_concurrency = max_concurrency
        self._random = random.Random(seed)
        self._http = httpx.Client()  # one connection pool, shared by the threads of ``map`` and callers
        self._lock = threading.Lock()
        self.requests_sent = 0  # attempts, retries included
        self.retries = 0

    def __repr__(self) -> str:
        return f"ApiClient(base_url={self.base_url!r}, api_key={'set' if self._api_key else 'none'})"

    def redact(self, text: str) -> str:
        """``text`` with the key (if any) replaced by ``***``: servers may echo request headers."""
        if self._api_key and self._api_key.reveal():
            key = self._api_key.reveal()
            for form in (key, repr(key)[1:-1], json.dumps(key)[1:-1]):  # as sent, and as messages escape it
                text = text.replace(form, "***")
        return text

    def _wait(self, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(self.backoff_max, max(0.0, float(retry_after)))
            except ValueError:
                pass  # an HTTP date: fall back to our own backoff
        with self._lock:
            jitter = self._random.uniform(0.5, 1.0)
        return jitter * min(self.backoff_max, self.backoff_base * 2**attempt)

    # ------------------------------------------------------------------ one request

    def post(self, path: str, payload: dict[str, Any] | None = None, **options: Any) -> Any:
        """POST ``payload`` as JSON (None: an empty body); see ``request`` for ``options`` and the answer."""
        return self.request("POST", path, payload, **options)

    def get(self, path: str, **options: Any) -> Any:
        """GET ``path``; see ``request``."""
        return self.request("GET", path, None, **options)

    def request(
        self,
        method: str,
        path: str,
        payload: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        expect_json: bool = True,
    ) -> Any:
        """Send one request, retried while it fails transiently; the answer's parsed JSON.

        With ``expect_json=False`` a body that is not declared JSON comes back as text (None if empty):
        some vLLM endpoints (``/v1/load_lora_adapter``, ``/health``) answer in plain text or with nothing.
        Raises ``TransientError`` when retries run out and ``ApiError`` when the server rejects the
        request; both redacted and naming the URL.
        """
        url = f"{self.base_url}{path}"
        headers = {}
        body = None
        if payload is not None:
            headers["Content-Type"] = "application/json"
            body = json.dumps(payload)
        if self._api_key is not None:
            headers["Authorization"] = f"Bearer {self._api_key.reveal()}"
        last = ""
        for attempt in range(self.max_retries + 1):
            with self._lock:
                self.requests_sent += 1
                self.retries += attempt > 0
            retry_after = None
            try:
                response = self._http.request(
                    method, url, content=body, headers=headers, timeout=timeout or self.timeout
                )
            except TRANSIENT_ERRORS as error:
                # Includes refused and dropped connections; httpx discards the broken pooled connection.
                last = f"{type(error).__name__}: {self.redact(str(error))[:300]}"
            except Exception as error:
                # Not chained (``from None``): the original exception's text may carry the key.
                raise ApiError(f"{url}: {type(error).__name__}: {self.redact(str(error))[:300]}") from None
            else:
                status = response.status_code
                if 200 <= status < 300:
                    if not expect_json and "json" not in response.headers.get("content-type", ""):
                        return response.text or None
                    try:
                        return response.json()
                    except ValueError:
                        last = f"HTTP {status} with a body that is not JSON (connection cut mid-body?)"
                elif status in RETRY_STATUS or status >= 500:
                    last = f"HTTP {status}: {self.redact(response.text)[:300]}"
                    retry_after = response.headers.get("Retry-After")
                else:
                    raise ApiError(
                        f"{url} rejected the request with HTTP {status}: {self.redact(response.text)[:1000]}", status
                    )
            if attempt < self.max_retries:
                delay = self._wait(attempt, retry_after)
                logger.warning("%s failed (%s); retry %d/%d in %.1fs", url, last, attempt + 1, self.max_retries, delay)
                time.sleep(delay)
        attempts = self.max_retries + 1
        raise TransientError(f"{url} failed after {attempts} attempt{'s' * (attempts > 1)}; last error: {last}")

    # ------------------------------------------------------------------ many requests

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[tuple[int, R]]:
        """Run ``fn`` on every item with at most ``max_concurrency`` in flight.

        Yields ``(index, result)`` in completion order, so callers can save each result (e.g. to a
        cache) as soon as it arrives. The first failure stops submitting new work and is raised
        once the requests already in flight have finished.
        """
        items = list(items)
        if not items:
            return
        with ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="qalign-api") as pool:
            pending: dict[Future, int] = {}
            next_item = 0
            error: BaseException | None = None
            while pending or (next_item < len(items) and error is None):
                while error is None and next_item < len(items) and len(pending) < self.max_concurrency:
                    pending[pool.submit(fn, items[next_item])] = next_item
                    next_item += 1
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    index = pending.pop(future)
                    if future.exception() is not None:
                        error = error or future.exception()
                    else:  # still yielded after a failure: the caller may save it
                        yield index, future.result()
            if error is not None:
                raise error

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Close the pooled connections."""
        self._http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
