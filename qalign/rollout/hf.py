"""Rollouts through ``transformers``' ``generate``: slow, but always available."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from qalign.rollout.base import Completion, SamplingConfig


class HFEngine:
    """Samples from the very model being trained, so ``sync_weights`` has nothing to copy.

    Prompts are left-padded into batches of ``batch_size`` prompts (each expanded ``n`` times).
    """

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
        # Scores are the processed logits the sampler drew from (temperature, top-p applied).
        logprobs = torch.stack(out.scores, dim=1).float().log_softmax(-1)
        token_logprobs = logprobs.gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
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
            output_scores=True,
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


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Every token id that ends a completion: the model's generation config may list several (chat
    models stop on an end-of-turn token as well as EOS), and the tokenizer's own EOS counts too."""
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return set(ids)
