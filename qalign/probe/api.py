"""A small client for OpenAI-compatible HTTP APIs: retries with backoff, a concurrency limit, and
an API key that never shows up in logs, errors, reprs or outputs.

Retried: HTTP 408/409/429 and 5xx, timeouts, refused or dropped connections, and a 200 whose body is
not JSON (a connection cut mid-body). Anything else (401, 400 on a too-long input, …) fails at once:
re-sending the same request cannot succeed.
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

import requests

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

RETRY_STATUS = frozenset({408, 409, 429})


class ApiError(RuntimeError):
    """A request to an OpenAI-compatible API failed for good (after retries, or not retryable)."""


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
    """POSTs JSON to ``base_url`` + path (e.g. ``http://127.0.0.1:8000/v1`` + ``/embeddings``).

    Args:
        base_url: the API root including ``/v1``, as OpenAI clients expect it.
        api_key: sent as ``Authorization: Bearer`` when given.
        timeout: seconds one request may take.
        max_retries: re-sends of a failed request before giving up.
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
        self._local = threading.local()  # one requests.Session (connection pool) per thread
        self._lock = threading.Lock()
        self.requests_sent = 0  # attempts, retries included
        self.retries = 0

    def __repr__(self) -> str:
        return f"ApiClient(base_url={self.base_url!r}, api_key={'set' if self._api_key else 'none'})"

    # ------------------------------------------------------------------ one request

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        return session

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

    def post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        """POST ``payload``; the parsed JSON answer. Raises ``ApiError`` (redacted) when it fails for good."""
        url = f"{self.base_url}{path}"
        headers = {"Content-Type": "application/json"}
        if self._api_key is not None:
            headers["Authorization"] = f"Bearer {self._api_key.reveal()}"
        body = json.dumps(payload)
        last = ""
        for attempt in range(self.max_retries + 1):
            with self._lock:
                self.requests_sent += 1
                self.retries += attempt > 0
            retry_after = None
            try:
                response = self._session().post(url, data=body, headers=headers, timeout=self.timeout)
            except (requests.ConnectionError, requests.Timeout) as error:
                # Includes refused and dropped connections (RemoteDisconnected, ChunkedEncodingError).
                last = f"{type(error).__name__}: {self.redact(str(error))[:300]}"
                self._local.session = None  # a broken pooled connection must not be reused
            except Exception as error:
                # E.g. a key with a newline: the library's message quotes the header. Not chained
                # (``from None``): the original exception's text would carry the key.
                raise ApiError(f"{url}: {type(error).__name__}: {self.redact(str(error))[:300]}") from None
            else:
                if response.status_code == 200:
                    try:
                        return response.json()
                    except ValueError:
                        last = "HTTP 200 with a body that is not JSON (connection cut mid-body?)"
                elif response.status_code in RETRY_STATUS or response.status_code >= 500:
                    last = f"HTTP {response.status_code}: {self.redact(response.text)[:300]}"
                    retry_after = response.headers.get("Retry-After")
                else:
                    raise ApiError(
                        f"{url} rejected the request with HTTP {response.status_code}: {self.redact(response.text)[:1000]}"
                    )
            if attempt < self.max_retries:
                delay = self._wait(attempt, retry_after)
                logger.warning("%s failed (%s); retry %d/%d in %.1fs", url, last, attempt + 1, self.max_retries, delay)
                time.sleep(delay)
        raise ApiError(f"{url} failed after {self.max_retries + 1} attempts; last error: {last}")

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
