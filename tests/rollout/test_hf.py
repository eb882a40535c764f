"""HFEngine's sampling log-probs, gathered step by step, equal the ones of generate's full output_scores."""

from __future__ import annotations

import pytest
import torch

from qalign.models import load_model, load_tokenizer
from qalign.rollout import HFEngine, SamplingConfig


def old_path(model, tokenizer, prompt_ids, sampling):
    """The previous implementation: generate with output_scores, log-softmax of the stacked scores."""
    torch.manual_seed(sampling.seed)
    expanded = [p for p in prompt_ids for _ in range(sampling.n)]
    width = max(len(p) for p in expanded)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in expanded])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in expanded])
    kwargs = dict(max_new_tokens=sampling.max_tokens, do_sample=sampling.temperature != 0, pad_token_id=pad,
                  output_scores=True, return_dict_in_generate=True)  # fmt: skip
    if sampling.temperature != 0:
        kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or None)
    out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    new = out.sequences[:, width:]
    logprobs = torch.stack(out.scores, dim=1).float().log_softmax(-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
    return new, logprobs


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingConfig(n=2, temperature=0.7, top_p=0.9, top_k=5, max_tokens=12, seed=3),
        SamplingConfig(n=2, temperature=1.0, max_tokens=12, seed=4),
        SamplingConfig(n=1, temperature=0.0, max_tokens=12, seed=5),
    ],
    ids=["T0.7-topk5-topp0.9", "T1", "greedy"],
)
def test_sampling_logprobs_equal_the_output_scores_path(tiny_model_dir, sampling):
    model, tokenizer = load_model(str(tiny_model_dir)).eval(), load_tokenizer(str(tiny_model_dir))
    prompts = [tokenizer("What is 2 + 3?")["input_ids"], tokenizer("7 - 1 =")["input_ids"]]
    old_tokens, old_logprobs = old_path(model, tokenizer, prompts, sampling)
    groups = HFEngine(model, tokenizer, batch_size=8).generate(prompts, sampling)
    rows = [c for group in groups for c in group]
    for row, completion in enumerate(rows):
        length = len(completion.completion_ids)
        assert completion.completion_ids == old_tokens[row, :length].tolist()  # same warpers, same draws
        assert completion.logprobs == pytest.approx(old_logprobs[row, :length].tolist(), abs=1e-5)
