"""Probe tests: tiny tensor ops run faster on one thread than on a contended thread pool."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_torch_thread():
    from tests.threads import one_torch_thread  # torch is imported only when a probe test runs

    with one_torch_thread():
        yield
