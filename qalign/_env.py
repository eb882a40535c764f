"""Environment variables set for the duration of a block (libraries that read their options there)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def env_flag(name: str, value: str) -> Iterator[None]:
    """Inside: environment variable ``name`` is ``value`` (put back as it was on exit)."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous
