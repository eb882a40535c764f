"""One torch thread for tiny tensor work: on the shared 2-core CPU an intra-op thread pool makes each small
op several times slower (and two test processes would fight over the cores)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(1)`` and restore the previous count after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
