"""``rollout.async_steps`` K > 0 for the online trainers: the generation batches of the next K optimizer steps
are sampled while the current step trains.

TRL learns a generation batch's prompts only when the Trainer's loop pulls it from the dataloader, once per
optimizer step (``Trainer.get_batch_samples``, the narrow hook this mixin overrides). Here that pull reads
K optimizer steps further: the batches TRL will generate for (every ``steps_per_generation × num_iterations``
micro-batches) are tokenized exactly as TRL's ``_generate`` will tokenize them and queued on the engine's
background thread (``qalign.rollout.async_rollout``), after the weights of the current step were pushed to
the engine. When TRL then reaches such a batch, ``_generate_single_turn`` takes the queued result for those
very prompt ids: completions, the sampler's own log-probs (which TRL's importance-sampling correction divides
by) and the policy version that sampled them. The rest of TRL's step is untouched.

With K = 0 none of this exists: no thread, no look-ahead, TRL's loop as it was.
"""

from __future__ import annotations

import copy
import logging
from collections import deque
from typing import Any

from qalign.rollout.async_rollout import AsyncRollouts, SampledBatch

logger = logging.getLogger(__name__)


class AsyncRolloutsMixin:
    """The trainer's half of asynchronous rollouts; needs GRPOTrainer's engine attributes (``rollout_args``,
    ``rollout_engine``, ``sync_rollout_weights``, ``_reattach_rollout_engine``, ``_rollout_sampling``), so it
    comes before TRL's GRPOTrainer in the bases."""

    _async_rollouts: AsyncRollouts | None = None
    # Micro-batches read from the current epoch's iterator and not yet handed to the Trainer's loop, the
    # iterator they came from, and the micro-step index up to which their generation was decided.
    _lookahead: deque | None = None
    _lookahead_source: Any = None
    _lookahead_decided: int = 0

    @property
    def async_steps(self) -> int:
        return self.rollout_args.rollout_async_steps

    def _check_async_rollouts(self) -> None:
        """Refuse, in one line, what cannot sample ahead; called once the engine is attached."""
        steps = self.async_steps
        if not steps:
            return
        where = f"rollout.async_steps {steps}"
        if self.rollout_engine is None:
            raise ValueError(f"{where} needs an engine apart from the model being trained: rollout.backend vllm "
                             "or vllm_server (or async_steps 0)")  # fmt: skip
        if self.rollout_func is not None:
            raise ValueError(f"{where} queues TRL's own generation, and a custom rollout_func samples by itself: "
                             "use async_steps 0 with it")  # fmt: skip
        if self.tools or self.environment_factories:
            raise ValueError(f"{where}: a tool-calling turn's prompt depends on the previous turn's output, so it "
                             "cannot be sampled ahead: use async_steps 0 with tools or environments")  # fmt: skip
        if not self.vllm_importance_sampling_correction:
            logger.warning("%s with vllm_importance_sampling_correction off: completions sampled by weights up to "
                           "%d steps old are trained on without correction", where, steps)  # fmt: skip

    def _rollout_pipeline(self) -> AsyncRollouts | None:
        """The background sampler (started on first use); None with async_steps 0 or without an engine."""
        if not self.async_steps or self.rollout_engine is None:
            return None
        if self._async_rollouts is None:
            self._async_rollouts = AsyncRollouts(
                self.rollout_engine, max_lag=self.max_rollout_lag, version=self._rollout_synced_step
            )
        return self._async_rollouts

    @property
    def max_rollout_lag(self) -> int:
        """The most optimizer steps a trained batch's sampling weights may be behind the trained ones: the
        batch of step t + K is queued at step t with the weights last pushed, at most sync_every − 1 steps old."""
        return self.async_steps + self.rollout_args.rollout_sync_every - 1

    def _close_async_rollouts(self) -> None:
        """Stop the background sampler (waiting for a running generation, so the engine can be closed)."""
        if self._async_rollouts is not None:
            self._async_rollouts.close()
            self._async_rollouts = None
        self._lookahead, self._lookahead_source = None, None

    # ------------------------------------------------------------------ read ahead, queue generation

    def get_batch_samples(self, epoch_iterator, num_batches: int, device):
        # Only the Trainer's training loop calls this (the model may still be in eval mode on the first call:
        # training_step switches it), so it needs no check of the mode.
        rollouts = None
        if self.async_steps:
            self._reattach_rollout_engine()  # a second train() after the first closed the engine it built
            rollouts = self._rollout_pipeline()
        if rollouts is None:
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        if epoch_iterator is not self._lookahead_source:
            # A new epoch (its first steps are sampled on demand), or a new train() after one stopped early:
            # whatever was queued for the old iterator is never trained on.
            rollouts.discard()
            self._lookahead, self._lookahead_source = deque(), epoch_iterator
            self._lookahead_decided = self._step
        wanted = num_batches + self._lookahead_micro_batches()
        while len(self._lookahead) < wanted:
            try:
                self._lookahead.append(next(epoch_iterator))
            except StopIteration:
                break
        self._queue_generations(rollouts)
        batches = [self._lookahead.popleft() for _ in range(min(num_batches, len(self._lookahead)))]
        return batches, self._get_num_items_in_batch(batches, device)

    def _lookahead_micro_batches(self) -> int:
        """Micro-batches of the next ``async_steps`` optimizer steps, none past ``max_steps``."""
        steps = self.async_steps
        if self.args.max_steps > 0:
            steps = max(0, min(steps, self.args.max_steps - self.state.global_step - 1))
        return steps * self.args.gradient_accumulation_steps

    def _queue_generations(self, rollouts: AsyncRollouts) -> None:
        """Queue the look-ahead's generation batches not queued yet, sampled by this step's weights.

        Micro-batch ``i`` of the look-ahead is the one TRL's ``training_step`` will see as ``_step + i``; TRL
        generates on it when that index starts a generation cycle (or nothing is buffered yet, e.g. after a
        resume), and reuses the buffered completions otherwise (see ``GRPOTrainer._prepare_inputs``)."""
        generate_every = self.args.steps_per_generation * self.num_iterations
        synced = False
        for offset, batch in enumerate(self._lookahead):
            index = self._step + offset
            if index < self._lookahead_decided:
                continue
            if index % generate_every == 0 or (offset == 0 and self._buffered_inputs is None):
                if not synced:  # the push waits for the running generation; queued ones then get these weights
                    self.sync_rollout_weights()
                    synced = True
                rollouts.submit(self._generation_prompt_ids(batch), self._rollout_sampling())
        self._lookahead_decided = max(self._lookahead_decided, self._step + len(self._lookahead))

    def _generation_prompt_ids(self, batch: list[dict]) -> list[list[int]]:
        """The prompt ids TRL's ``_generate`` will pass to ``_generate_single_turn`` for this micro-batch."""
        prompt_ids, images, _ = self._tokenize_prompts(copy.deepcopy([row["prompt"] for row in batch]))
        if images is not None:
            raise NotImplementedError("qalign rollout engines take text prompts only")
        return [list(ids) for ids in prompt_ids]

    # ------------------------------------------------------------------ take the queued batch

    def _take_async_rollouts(self, rollouts: AsyncRollouts, prompt_ids) -> SampledBatch:
        """The batch queued for ``prompt_ids``, or (none queued: evaluation, dynamic sampling's refill rounds;
        or too old) one sampled now with the current weights; in training its staleness is logged."""
        current = self.state.global_step
        batch = rollouts.take(prompt_ids, current) if self.model.training else None
        if batch is None:
            self.sync_rollout_weights()
            batch = rollouts.sample_now(prompt_ids, self._rollout_sampling())
        if self.model.training:
            lags = batch.lags(current)
            metrics = self._metrics["train"]
            metrics["rollout/staleness/mean"].append(sum(lags) / max(len(lags), 1))
            metrics["rollout/staleness/max"].append(float(max(lags, default=0)))
        return batch
