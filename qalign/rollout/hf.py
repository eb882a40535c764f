"""Rollouts through ``transformers``' ``generate``: slow, but always available.

Sampling log-probs come from ``SampledLogprobs``, the last logits processor: at each step it keeps the
log-softmax of the scores the sampler draws from (temperature, top-k, top-p applied) and, one step later,
gathers the token that was drawn. Asking ``generate`` for ``output_scores`` instead keeps every step's
``[batch, vocab]`` scores until the end (at a 150k vocabulary that made HFEngine ~4x slower than plain
``generate``); this keeps one step's. For the recorder to see the final scores, qalign applies the warpers
itself, after any processor of its own (Q#'s guidance), and passes ``generate`` neutral values so that it
adds none (a model's generation_config may set its own temperature or top-k).
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from qalign.rollout.base import Completion, SamplingConfig


class HFEngine:
    """Samples from the very model being trained, so ``sync_weights`` has nothing to copy.

    Prompts are left-padded into batches of ``batch_size`` prompts (each expanded ``n`` times).
    """

    backend = "hf"  # the rollout.backend name that builds it

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int = 16):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        if tokenizer.pad_token_id is None:
            raise ValueError("HFEngine needs a tokenizer with a pad token (set tokenizer.pad_token)")

    def sync_weights(self, model: torch.nn.Module) -> None:
        self.model = model  # same object in training; a different one (e.g. eval) is just swapped in

    def close(self) -> None:
        pass

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[Completion]]:
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        results: list[list[Completion]] = []
        for start in range(0, len(prompts), self.batch_size):
            results.extend(self._generate_batch(prompts[start : start + self.batch_size], sampling))
        return results

    def _generate_batch(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[Completion]]:
        tokenizer, model = self.tokenizer, self.model
        expanded = [p for p in prompts for _ in range(sampling.n)]
        width = max(len(p) for p in expanded)
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in expanded], device=model.device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in expanded], device=model.device)
        kwargs = self._generate_kwargs(sampling, attention_mask)
        recorder = SampledLogprobs()
        kwargs["logits_processor"] = LogitsProcessorList(
            [*kwargs.pop("logits_processor", []), *sampling_warpers(kwargs), recorder]
        )
        modules = self._generating_modules()
        modes = [m.training for m in modules]
        for m in modules:
            m.eval()
        try:
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        finally:
            for m, mode in zip(modules, modes):
                m.train(mode)
        new_tokens = out.sequences[:, width:]
        token_logprobs = recorder.result(new_tokens)
        eos_ids = eos_token_ids(model, tokenizer)
        completions = []
        for row, prompt in enumerate(expanded):
            ids = new_tokens[row].tolist()
            length, finish = len(ids), "length"
            for t, token in enumerate(ids):
                if token in eos_ids:
                    length, finish = t + 1, "stop"  # keep EOS: it is an action the policy took
                    break
            ids = ids[:length]
            text = tokenizer.decode(ids, skip_special_tokens=True)
            if finish == "length" and sampling.stop and any(s in text for s in sampling.stop):
                finish = "stop"
            self._completed_row(row, length)
            completions.append(Completion(prompt, ids, text, token_logprobs[row, :length].tolist(), finish))
        n = sampling.n
        return [completions[i * n : (i + 1) * n] for i in range(len(prompts))]

    # Hooks for engines that decode differently from the same batches (Q#'s guided engine).

    def _generate_kwargs(self, sampling: SamplingConfig, attention_mask: torch.Tensor) -> dict:
        """Keyword arguments of ``model.generate`` for one batch."""
        kwargs = dict(
            max_new_tokens=sampling.max_tokens,
            do_sample=sampling.temperature != 0,
            pad_token_id=self.tokenizer.pad_token_id,
            return_dict_in_generate=True,
            # transformers turns this on whenever a ZeRO-3 config is active, making every generate wait for
            # all processes at each token. qalign generates with whole (or gathered) weights, often on one
            # process only (collection, evaluation shards): the processes must not wait for each other.
            synced_gpus=False,
        )
        if sampling.temperature != 0:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or None)
        if sampling.stop:
            kwargs.update(stop_strings=sampling.stop, tokenizer=self.tokenizer)
        return kwargs

    def _generating_modules(self) -> tuple[torch.nn.Module, ...]:
        """Modules put in eval mode while generating (and restored after)."""
        return (self.model,)

    def _completed_row(self, row: int, length: int) -> None:
        """Called for each finished row of a batch with its completion length (EOS included)."""


class SampledLogprobs(LogitsProcessor):
    """Last in the processor list: the log-prob, under the distribution sampled from, of each drawn token.

    Called once per step with the sequences so far and that step's final scores; the token drawn from the
    previous step's scores is the last column of ``input_ids``, so only one step's log-softmax is kept."""

    def __init__(self) -> None:
        # The last step's scores (a reference: generate never changes them in place) and their log-sum-exp:
        # ln p(token) = score(token) − LSE, so no (B, V) log-softmax is ever written.
        self._previous: tuple[torch.Tensor, torch.Tensor] | None = None
        self._chosen: list[torch.Tensor] = []  # (B,) per finished step

    def _gather(self, tokens: torch.Tensor) -> torch.Tensor:
        scores, lse = self._previous
        return scores.gather(-1, tokens).squeeze(-1).float() - lse

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._previous is not None:
            self._chosen.append(self._gather(input_ids[:, -1:]))
        self._previous = (scores, torch.logsumexp(scores.float(), dim=-1))
        return scores

    def result(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` log-probs of ``new_tokens`` (the generated columns); the last step's token is in there."""
        steps = list(self._chosen)
        if self._previous is not None and len(steps) < new_tokens.size(1):
            steps.append(self._gather(new_tokens[:, len(steps) : len(steps) + 1]))
        self._previous, self._chosen = None, []
        if not steps:
            return new_tokens.new_zeros(new_tokens.shape, dtype=torch.float32)
        return torch.stack(steps, dim=1)


def sampling_warpers(kwargs: dict) -> list[LogitsProcessor]:
    """Temperature, top-k and top-p as processors (read from, then neutralised in, ``generate``'s kwargs)."""
    if not kwargs.get("do_sample"):
        return []
    temperature = kwargs.pop("temperature", None)
    top_k = kwargs.pop("top_k", None)
    top_p = kwargs.pop("top_p", None)
    kwargs.update(temperature=1.0, top_k=0, top_p=1.0)  # generate adds none of its own (nor the model's defaults)
    warpers: list[LogitsProcessor] = []
    if temperature is not None and temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k=top_k))
    if top_p is not None and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=top_p))
    return warpers


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Every token id that ends a completion: the model's generation config may list several (chat
    models stop on an end-of-turn token as well as EOS), and the tokenizer's own EOS counts too."""
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return set(ids)
