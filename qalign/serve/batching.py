"""Micro-batching: requests that arrive close together, with equal sampling settings, share one ``sample`` call.

Why micro-batching and not continuous batching: a qalign policy takes a whole batch of prompts and returns
whole completions (``Policy.sample``); HF ``generate``, Q#'s guided decoding and best-of-k's pick cannot
admit a new sequence into a batch that is already decoding. What a server can still do is gather the
requests that arrive together into one call, which costs one forward pass per token for the batch
instead of one per request.

How: one dispatcher task takes the oldest waiting request and waits ``window_s`` from its arrival or from
the end of the previous call, whichever is later (or until ``max_batch_size`` prompts with its settings are
waiting). It then sends it, together with every waiting request of the same settings, to the policy in one
worker thread (policies hold models and RNG state and are not thread-safe, so exactly one call runs at a
time). Requests that arrive while a call runs wait for it, so under load batches fill by themselves and
the window costs a few milliseconds per call at most.

Settings must be equal because one call takes one ``SamplingConfig``: ``n``, temperature, top-p, top-k,
max_tokens and stop strings. A request with a ``seed`` always runs alone, see ``batch_key``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import astuple, dataclass

from qalign.rollout.base import Completion, SamplingConfig
from qalign.serve.errors import ServeError

logger = logging.getLogger("qalign.serve")

SampleFn = Callable[[list[str], SamplingConfig], list[list[Completion]]]


def batch_key(sampling: SamplingConfig) -> Hashable | None:
    """What requests must share to be sampled in one call; None: this request runs alone.

    A seeded request runs alone so that the same seed gives the same text whatever else the server is
    doing: in a shared call its prompt would be padded to another prompt's length and its random draws
    would depend on the rows around it (the engines seed one generator per call, not per row).
    """
    if sampling.seed is not None:
        return None
    fields = astuple(sampling)
    return tuple(tuple(f) if isinstance(f, list) else f for f in fields)


@dataclass
class _Job:
    prompts: list[str]
    sampling: SamplingConfig
    key: Hashable | None
    arrived: float
    future: asyncio.Future[list[list[Completion]]]


class MicroBatcher:
    """Runs ``sample(prompts, sampling)`` in one worker thread, merging compatible requests.

    Args:
        sample: the policy's ``sample`` (or anything with its signature).
        window_s: how long the oldest request waits for others to join it; 0 turns batching off (every
            request is its own call, in arrival order).
        max_batch_size: most prompts in one call (a single request with more still runs, alone).
    """

    def __init__(self, sample: SampleFn, window_s: float = 0.005, max_batch_size: int = 32):
        if window_s < 0:
            raise ValueError(f"window_s must be >= 0, got {window_s}")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self._sample = sample
        self.window_s = window_s
        self.max_batch_size = max_batch_size
        self._queue: deque[_Job] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qalign-policy")
        self._closed = False
        self._last_call_end = float("-inf")
        self.calls: list[int] = []  # prompts per policy call, most recent last (bounded; for tests and logs)

    @property
    def batching(self) -> bool:
        return self.window_s > 0

    async def submit(self, prompts: list[str], sampling: SamplingConfig) -> list[list[Completion]]:
        """``sampling.n`` completions per prompt, once the call holding this request has run."""
        if self._closed:
            raise ServeError(503, "the server is shutting down", None, "unavailable")
        loop = asyncio.get_running_loop()
        if self._task is None:  # started here, in the serving loop, rather than at construction
            self._wakeup = asyncio.Event()
            self._task = loop.create_task(self._dispatch(), name="qalign-serve-batcher")
            self._task.add_done_callback(self._dispatcher_ended)
        key = batch_key(sampling) if self.batching else None
        job = _Job(prompts, sampling, key, loop.time(), loop.create_future())
        self._queue.append(job)
        self._wakeup.set()
        return await job.future

    async def aclose(self) -> None:
        """Fail waiting requests with 503, let a running call finish and deliver its answers, then stop
        the dispatcher and the worker thread (so that the policy can be closed safely afterwards)."""
        self._closed = True
        while self._queue:
            job = self._queue.popleft()
            if not job.future.done():
                job.future.set_exception(ServeError(503, "the server is shutting down", None, "unavailable"))
        if self._task is not None:
            self._wakeup.set()
            await asyncio.gather(self._task, return_exceptions=True)  # a crashed one was logged already
        await asyncio.to_thread(self._executor.shutdown, True)

    # ------------------------------------------------------------------------- dispatcher

    def _dispatcher_ended(self, task: asyncio.Task) -> None:
        """A dispatcher that died of a bug would leave every later request waiting forever: log it, fail
        what is waiting, and let the next request start a new one."""
        if task.cancelled() or task.exception() is None:
            return
        logger.error("the batcher stopped", exc_info=task.exception())
        self._task = None
        while self._queue:
            job = self._queue.popleft()
            if not job.future.done():
                job.future.set_exception(task.exception())

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            first = self._queue[0]
            if first.future.done():  # its client went away before it ran
                self._queue.popleft()
                continue
            if first.key is not None:
                # The window runs from the later of the request's arrival and the end of the last call: while
                # the worker ran it held the GIL most of the time, so requests that arrived meanwhile may still
                # be unparsed in this event loop; a few idle milliseconds let them join this call.
                opened = max(first.arrived, self._last_call_end)
                while self._waiting_prompts(first.key) < self.max_batch_size and not self._closed:
                    remaining = opened + self.window_s - loop.time()
                    if remaining <= 0:
                        break
                    self._wakeup.clear()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._wakeup.wait(), remaining)
            if not self._closed:
                await self._run(self._take(first))

    def _waiting_prompts(self, key: Hashable) -> int:
        return sum(len(job.prompts) for job in self._queue if job.key == key and not job.future.done())

    def _take(self, first: _Job) -> list[_Job]:
        """``first`` and, in arrival order, the waiting jobs of its key that fit in the batch."""
        batch, kept, size = [], deque(), 0
        for job in self._queue:
            if job.future.done():
                continue
            fits = size + len(job.prompts) <= self.max_batch_size
            if job is first or (first.key is not None and job.key == first.key and fits):
                batch.append(job)
                size += len(job.prompts)
            else:
                kept.append(job)
        self._queue = kept
        return batch

    async def _run(self, batch: list[_Job]) -> None:
        if not batch:  # the one request of this turn left while it waited
            return
        prompts = [p for job in batch for p in job.prompts]
        self.calls = [*self.calls[-999:], len(prompts)]
        loop = asyncio.get_running_loop()
        waited = loop.time() - min(job.arrived for job in batch)
        logger.debug(
            "policy call: %d request(s), %d prompt(s), the oldest waited %.3f s", len(batch), len(prompts), waited
        )
        try:
            results = await loop.run_in_executor(self._executor, self._sample, prompts, batch[0].sampling)
            if len(results) != len(prompts):
                raise RuntimeError(f"the policy returned {len(results)} groups for {len(prompts)} prompts")
        except Exception as error:
            if len(batch) > 1:
                # Run each request alone: one request the policy cannot take must not fail its neighbours
                # (and a batch too big for memory may fit one request at a time).
                # (Only the type here: the message is reported, redacted, with the request that fails alone.)
                logger.warning(
                    "a call of %d requests failed (%s); retrying them one by one", len(batch), type(error).__name__
                )
                for job in batch:
                    await self._run([job])
                return
            if not batch[0].future.done():
                batch[0].future.set_exception(error)
            return
        finally:
            self._last_call_end = loop.time()
        offset = 0
        for job in batch:
            part = results[offset : offset + len(job.prompts)]
            offset += len(job.prompts)
            if not job.future.done():
                job.future.set_result(part)
