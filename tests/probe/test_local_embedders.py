"""Hidden-state embeddings of a tiny Llama (incl. the reference code's out-of-range trap), and the
MiniLM sentence-transformers embedder loaded offline."""

from __future__ import annotations

import pytest
import torch

from qalign.probe.embed_local import HiddenStateEmbedder
from qalign.probe.sampling import Candidate, EngineSampler
from qalign.rollout.base import Completion, SamplingConfig
from tests.needs import require


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return model, tokenizer


def reference_state(model, ids: list[int], layer: int, position: int) -> torch.Tensor:
    """The hidden state of one unpadded sequence, computed alone."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states[layer][0, position]


def test_last_token_state_matches_single_sequence_forward_even_at_max_length(tiny):
    from qalign.rollout.hf import HFEngine

    model, tokenizer = tiny
    sampler = EngineSampler(HFEngine(model, tokenizer), tokenizer)
    prompts = ["What is 3 + 4?", "Ana has 5 apples and gets 2 more. How many apples does Ana have now?"]
    groups = sampler.sample(prompts, SamplingConfig(n=3, max_tokens=5, seed=0, temperature=1.0))
    candidates = [c for g in groups for c in g]
    # The random tiny model almost never stops: its completions hit max_tokens, the case where the
    # reference code's index (number of generated tokens) is out of range of generate's states.
    assert any(c.completion.finish_reason == "length" and len(c.completion.completion_ids) == 5 for c in candidates)
    embedder = HiddenStateEmbedder(model, tokenizer, layer=-2, batch_size=4)  # batches mix lengths: padding is tested
    features = embedder.embed(candidates)
    assert features.shape == (6, model.config.hidden_size)
    for candidate, row in zip(candidates, features):
        ids = candidate.completion.prompt_ids + candidate.completion.completion_ids
        assert torch.allclose(row, reference_state(model, ids, -2, len(ids) - 1), atol=1e-4)


def test_positions_layers_empty_completion_and_text_path(tiny):
    model, tokenizer = tiny
    prompt_ids = tokenizer("What is 6 times 7?")["input_ids"]
    completion_ids = tokenizer(" 42", add_special_tokens=False)["input_ids"]
    with_ids = Candidate("What is 6 times 7?", Completion(prompt_ids, completion_ids, " 42"))
    text_only = Candidate("What is 6 times 7?", Completion([], [], " 42"))
    empty = Candidate("What is 6 times 7?", Completion(prompt_ids, [], ""))
    full = prompt_ids + completion_ids

    last = HiddenStateEmbedder(model, tokenizer, layer=1).embed([with_ids, text_only, empty])
    assert torch.allclose(last[0], reference_state(model, full, 1, len(full) - 1), atol=1e-4)
    assert torch.allclose(last[1], last[0], atol=1e-5)  # text is tokenized the same way as the ids
    assert torch.allclose(last[2], reference_state(model, prompt_ids, 1, len(prompt_ids) - 1), atol=1e-4)

    mean = HiddenStateEmbedder(model, tokenizer, layer=0, position="mean_completion").embed([with_ids, empty])
    states = reference_state(model, full, 0, slice(len(prompt_ids), len(full)))
    assert torch.allclose(mean[0], states.mean(0), atol=1e-5)
    assert torch.allclose(mean[1], reference_state(model, prompt_ids, 0, -1), atol=1e-5)  # falls back to the prompt
    assert HiddenStateEmbedder(model, tokenizer, layer=2).describe() == {
        "kind": "hidden_state", "model": str(HiddenStateEmbedder(model, tokenizer).name), "layer": 2, "position": "last"
    }  # fmt: skip
    with pytest.raises(ValueError, match="out of range"):
        HiddenStateEmbedder(model, tokenizer, layer=3)  # 2 layers: hidden_states[0..2]


@pytest.mark.slow
def test_sentence_transformers_minilm_offline(monkeypatch):
    require("sentence_transformers")
    from qalign.probe.embed_local import SentenceTransformerEmbedder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    embedder = SentenceTransformerEmbedder("minilm", batch_size=2)
    candidates = [
        Candidate("What is 2 + 2?", Completion([], [], "The answer is \\boxed{4}.")),
        Candidate("What is 2 + 2?", Completion([], [], "The answer is \\boxed{4}.")),
        Candidate("What is 2 + 2?", Completion([], [], "Bananas are yellow.")),
    ]
    features = embedder.embed(candidates)
    assert features.shape == (3, 384)
    assert torch.allclose(features.norm(dim=1), torch.ones(3), atol=1e-4)  # MiniLM's Normalize module
    assert torch.allclose(features[0], features[1])
    assert features[0] @ features[1] > features[0] @ features[2]
