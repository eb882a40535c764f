"""Generation ahead of training: a rollout engine driven by one background thread, every batch stamped with
the policy version that sampled it.

Why a thread and not a process: the engine already lives outside the trainer where it can (vLLM server
workers are other processes, possibly on other machines; the in-process vLLM engine runs its kernels with
the GIL released), so one thread that calls ``engine.generate`` while the trainer's thread trains is all the
overlap needs, and the engine's own weight-sync path stays the one the lock-step trainer uses.

Three rules make the overlap safe:

* **The engine is used by one caller at a time.** A generation holds it for its whole call; a weight push
  (``sync``) or a generation the trainer needs at once (``take`` of prompts nothing was queued for) waits for
  the running generation and goes before the queued ones, so the trainer never waits behind more than one.
  vLLM must not reload weights in the middle of a generation: the completion would mix two policies.
* **Versions.** A policy version is the number of optimizer steps behind a set of weights; ``version`` is
  the one the engine holds (set by each push). A batch records the version the engine held when its
  generation started (read with the engine held, so no push can come between), which may be newer than the
  one current when the batch was queued — never older.
* **Staleness bound.** ``take`` never returns a batch more than ``max_lag`` versions behind the trainer's:
  such a batch is dropped, with a warning, and the caller samples again with the current weights (it cannot
  happen when the trainer queues within the bound, so one that does is a bug worth seeing).

Example::

    rollouts = AsyncRollouts(engine, max_lag=1)
    rollouts.submit(prompts_of_step_1, sampling)           # runs while step 0 trains
    ...                                                    # optimizer step
    rollouts.sync(lambda: engine.sync_weights(model), 1)   # once the running generation is done
    batch = rollouts.take(prompts_of_step_1, current=1)    # batch.versions: [0, 0, …], lag 1 <= max_lag
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from qalign.rollout.base import RolloutEngine, SamplingConfig

logger = logging.getLogger(__name__)


@dataclass
class SampledBatch:
    """One completion per prompt of a generation batch, with what the importance-sampling correction needs.

    ``logprobs[i][t]``: the sampler's own log-probability of ``completion_ids[i][t]``; ``versions[i]``: the
    policy version (optimizer steps) of the weights that sampled completion ``i``."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    logprobs: list[list[float]]
    versions: list[int]

    def lags(self, current: int) -> list[int]:
        """How many versions each completion is behind ``current``."""
        return [current - version for version in self.versions]


class AsyncRollouts:
    """Queues generation batches on a background thread and hands them to the trainer in order.

    Args:
        engine: any ``RolloutEngine``; only this object calls it from now on (``generate`` and, through
            ``sync``, the caller's weight push).
        max_lag: the most versions a batch returned by ``take`` may be behind the trainer's weights.
        version: the version of the weights the engine holds now.
    """

    def __init__(self, engine: RolloutEngine, max_lag: int, version: int = 0):
        if max_lag < 0:
            raise ValueError(f"max_lag must be >= 0, got {max_lag}")
        self.engine = engine
        self.max_lag = max_lag
        self.version = version
        self.dropped_stale = 0  # batches refused by take for being older than max_lag
        self._pending: deque[tuple[list[list[int]], Future]] = deque()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qalign-rollout")
        # The engine's owner: ``_busy`` while someone calls it; ``_urgent`` counts callers on the trainer's
        # side waiting for it, which the worker lets go first.
        self._state = threading.Condition()
        self._busy = False
        self._urgent = 0

    # ------------------------------------------------------------------ engine ownership

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """The engine to the caller alone: waits for the running generation only; queued ones wait for it."""
        with self._state:
            self._urgent += 1
            try:
                self._state.wait_for(lambda: not self._busy)
            finally:
                self._urgent -= 1
            self._busy = True
        try:
            yield
        finally:
            with self._state:
                self._busy = False
                self._state.notify_all()

    @contextlib.contextmanager
    def _queued_turn(self) -> Iterator[None]:
        with self._state:
            self._state.wait_for(lambda: not self._busy and not self._urgent)
            self._busy = True
        try:
            yield
        finally:
            with self._state:
                self._busy = False
                self._state.notify_all()

    def _sample(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> SampledBatch:
        """One generation with the engine held (the caller holds it): every completion gets today's version."""
        version = self.version
        groups = self.engine.generate([list(p) for p in prompt_ids], sampling)
        return SampledBatch(
            prompt_ids=[list(p) for p in prompt_ids],
            completion_ids=[group[0].completion_ids for group in groups],
            logprobs=[group[0].logprobs for group in groups],
            versions=[version] * len(groups),
        )

    def _queued_sample(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> SampledBatch:
        with self._queued_turn():
            return self._sample(prompt_ids, sampling)

    # ------------------------------------------------------------------ the trainer's side

    def submit(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> None:
        """Queue the generation of one batch (one completion per entry of ``prompt_ids``)."""
        key = [list(p) for p in prompt_ids]
        self._pending.append((key, self._worker.submit(self._queued_sample, key, sampling)))

    def sync(self, push: Callable[[], None], version: int) -> None:
        """Run ``push`` (the weight push) with the engine idle; the engine then holds ``version``.

        If ``push`` raises, the version is left as it was (the engine may hold the old weights)."""
        with self.exclusive():
            push()
            self.version = version

    def take(self, prompt_ids: list[list[int]], current: int) -> SampledBatch | None:
        """The queued batch for exactly these prompts (waiting for it); None if none was queued, or if it is
        more than ``max_lag`` versions behind ``current`` (the trainer's version): the caller samples now.

        Batches queued before the match were not asked for in order (the trainer's plan changed, e.g. training
        stopped early and restarted): they are dropped."""
        key = [list(p) for p in prompt_ids]
        match = next((i for i, (queued, _) in enumerate(self._pending) if queued == key), None)
        if match is None:
            return None
        for _ in range(match):
            self._pending.popleft()[1].cancel()  # a running one finishes, unread
        batch = self._pending.popleft()[1].result()
        lag = max(batch.lags(current), default=0)
        if lag > self.max_lag:
            self.dropped_stale += 1
            logger.warning("a rollout batch %d versions behind the trained weights reached the trainer (at most "
                           "%d allowed): dropped, to be sampled again", lag, self.max_lag)  # fmt: skip
            return None
        return batch

    def sample_now(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> SampledBatch:
        """Sample with the current weights in the calling thread, ahead of every queued batch."""
        with self.exclusive():
            return self._sample(prompt_ids, sampling)

    @property
    def queued(self) -> int:
        """Batches queued and not yet taken."""
        return len(self._pending)

    def discard(self) -> None:
        """Drop every queued batch (those not started never run)."""
        while self._pending:
            self._pending.popleft()[1].cancel()

    def close(self) -> None:
        """Drop the queue and wait for a running generation to end (the engine can then be closed)."""
        self.discard()
        self._worker.shutdown(wait=True, cancel_futures=True)
