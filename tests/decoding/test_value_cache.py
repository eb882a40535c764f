"""The value model's cache: the candidate mask, and a batched cache over sequences that come and go."""

from __future__ import annotations

import pytest
import torch

from qalign.decoding.value_cache import RaggedValueCache, candidate_attention_mask
from qalign.value_model import QSharpValueModel, ValueHeadConfig


def test_candidate_attention_mask_layout():
    cache_mask = torch.tensor([[0, 1]])  # one cached pad, one cached token
    pending_mask = torch.tensor([[1]])
    allowed = candidate_attention_mask(cache_mask, pending_mask, 2, torch.float32)[0, 0] == 0
    # columns: cached pad, cached token, pending, cand 0, cand 1
    assert allowed.tolist() == [
        [False, True, True, False, False],  # pending token: the real past and itself
        [False, True, True, True, False],  # candidate 0: the prefix and itself only
        [False, True, True, False, True],  # candidate 1
    ]


def _from_scratch(model: QSharpValueModel, prefix: list[int], candidates: torch.Tensor) -> torch.Tensor:
    """Head outputs of prefix + each candidate, no cache: the reference."""
    with torch.no_grad():
        if model.value_type == "q":
            ids = torch.tensor([prefix])
            return model.q_values(model.hidden(ids, torch.ones_like(ids))[:, -1], candidates[None])[0]
        ids = torch.tensor([prefix + [int(c)] for c in candidates])
        return model.v_values(model.hidden(ids, torch.ones_like(ids))[:, -1])


@pytest.mark.parametrize(("value_type", "head"), [("v", "bernoulli"), ("v", "histogram"), ("q", "bernoulli")])
def test_ragged_cache_matches_scoring_from_scratch(tiny_model_dir, value_type, head):
    """Sequences join at different steps, advance by one or several tokens, have tokens taken back, leave
    and come back: every step's outputs equal scoring each prefix + candidate from scratch."""
    torch.manual_seed(0)
    model = QSharpValueModel.from_reference(str(tiny_model_dir), ValueHeadConfig(head=head, value_type=value_type,
                                                                                   num_layers=1))  # fmt: skip
    with torch.no_grad():
        model.score.weight.normal_(0.0, 1.0)
    model.eval()
    vocab = model.trunk.config.vocab_size
    generator = torch.Generator().manual_seed(1)

    def tokens(count: int) -> list[int]:
        return torch.randint(2, vocab, (count,), generator=generator).tolist()

    sequences = {"a": tokens(5), "b": tokens(9)}
    cache = RaggedValueCache(model)
    steps = [
        {"a": 1, "b": 1},
        {"a": 1, "b": 1, "c": None},  # c joins with a 3-token prompt
        {"b": 1, "c": 2, "a": 1},  # another order; c advances by two tokens
        {"c": 1, "a": 1},  # b leaves
        {"a": "back", "c": 1},  # a's last token is replaced: a starts again
        {"a": 1, "c": 1, "b": 1},  # b comes back under its old key, with its old tokens + one
    ]
    sequences["c"] = tokens(3)
    widths = []
    for step in steps:
        for key, change in step.items():
            if change == "back":
                sequences[key][-1] = (sequences[key][-1] + 1) % vocab
            elif change:
                sequences[key] += tokens(change)
        keys = list(step)
        candidates = torch.stack([torch.randperm(vocab, generator=generator)[:4] for _ in keys])
        got = cache.values(keys, [sequences[k] for k in keys], candidates)
        for row, key in enumerate(keys):
            expected = _from_scratch(model, sequences[key], candidates[row])
            torch.testing.assert_close(got[row], expected, atol=1e-5, rtol=0)
        assert sorted(cache.keys) == sorted(keys)  # what left was dropped
        assert bool(cache.cache_mask[:, 0].bool().any())  # no column that every row masks is kept at the left
        widths.append(cache.cache_mask.size(1))
    # a: 5 tokens + 1; b: 9 + 1 → width 10 (b's prefix). c's 3-token prompt joins beside them without widening
    # their step: one column more, not four. Once b leaves, the columns only b used are cut.
    assert widths[:2] == [10, 11]
    assert widths[3] < widths[2]


def test_ragged_cache_refuses_repeated_keys(tiny_model_dir):
    model = QSharpValueModel.from_reference(str(tiny_model_dir), ValueHeadConfig(num_layers=1)).eval()
    with pytest.raises(ValueError, match="unique"):
        RaggedValueCache(model).values(["a", "a"], [[3, 4], [3, 4]], torch.tensor([[5], [6]]))
