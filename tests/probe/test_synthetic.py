"""Synthetic tasks with a known reward: every loss must learn a probe whose best-of-k reward
approaches the oracle's as k grows (the oracle picks by the true expected reward)."""

from __future__ import annotations

import pytest
import torch

from qalign.probe.evaluate import best_of_k_curve, mean_reward
from qalign.probe.models import Probe
from qalign.probe.train import ProbeData, ProbeTrainConfig, pg_chunks, preference_pairs, train_probe

KS = [1, 2, 4, 8, 16]
DIM, SAMPLES = 16, 16


def make_task(prompts: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """φ = prompt part + sample part (so rewards differ between prompts as well as within them); the
    true score is s = w*ᵀφ with a fixed w*."""
    generator = torch.Generator().manual_seed(seed)
    w_star = torch.linspace(-1.0, 1.0, DIM) / DIM**0.5
    prompt_part = torch.randn(prompts, 1, DIM, generator=generator)
    features = (prompt_part + torch.randn(prompts, SAMPLES, DIM, generator=generator)).reshape(-1, DIM)
    groups = torch.arange(prompts).repeat_interleave(SAMPLES)
    return features, features @ w_star, groups


def fit(loss: str, data: ProbeData) -> Probe:
    config = ProbeTrainConfig(loss=loss, epochs=60, lr=1e-2, batch_prompts=50, chunk_size=8, seed=0)
    probe, history = train_probe(data, config)
    assert history[-1] < history[0], f"{loss}: the training loss did not go down ({history[0]} → {history[-1]})"
    return probe


def assert_approaches_oracle(curve: dict[int, float], oracle: dict[int, float], p0: float, min_ratio: float) -> None:
    values = [curve[k] for k in KS]
    assert values == sorted(values), f"best-of-k reward should rise with k: {curve}"
    for k in KS[1:]:
        ratio = (curve[k] - p0) / (oracle[k] - p0)  # share of the oracle's gain over one sample
        assert ratio >= min_ratio, f"k={k}: probe {curve[k]:.3f}, oracle {oracle[k]:.3f}, p0 {p0:.3f}"
    assert oracle[KS[-1]] - curve[KS[-1]] < 0.1 * (oracle[KS[-1]] - p0) + 1e-3


@pytest.mark.parametrize("loss", ["mse", "pg", "bt"])
def test_linear_reward_is_recovered(loss):
    """r(x, a) = w*ᵀφ(x, a) exactly."""
    features, score, groups = make_task(200, seed=0)
    probe = fit(loss, ProbeData(features, score, groups))
    test_features, test_score, test_groups = make_task(200, seed=1)
    q = probe(test_features).detach()
    curve = best_of_k_curve(q, test_score, test_groups, KS, beta=0.0, shuffles=4)
    oracle = best_of_k_curve(test_score, test_score, test_groups, KS, beta=0.0, shuffles=4)
    p0 = mean_reward(test_score, test_groups)
    assert abs(curve[1] - p0) < 1e-5  # π_{θ,1} is p0
    assert_approaches_oracle(curve, oracle, p0, min_ratio=0.95)
    # Within-prompt ranking is what matters; its correlation with the truth must be near 1.
    assert torch.corrcoef(torch.stack([q, test_score]))[0, 1] > 0.95 or loss != "mse"


@pytest.mark.parametrize("loss", ["ce", "mse", "pg", "bt"])
def test_binary_reward_with_linear_logit(loss):
    """r ~ Bernoulli(σ(w*ᵀφ)) at training; evaluated on the expected reward σ(w*ᵀφ)."""
    features, score, groups = make_task(300, seed=2)
    labels = torch.bernoulli(torch.sigmoid(4 * score), generator=torch.Generator().manual_seed(3))
    probe = fit(loss, ProbeData(features, labels, groups))
    test_features, test_score, test_groups = make_task(200, seed=4)
    expected = torch.sigmoid(4 * test_score)
    curve = best_of_k_curve(probe(test_features).detach(), expected, test_groups, KS, beta=0.0, shuffles=4)
    oracle = best_of_k_curve(expected, expected, test_groups, KS, beta=0.0, shuffles=4)
    assert_approaches_oracle(curve, oracle, mean_reward(expected, test_groups), min_ratio=0.9)


def test_an_untrained_probe_does_not_pass():
    """The assertion above can fail: a random linear probe gets little of the oracle's gain."""
    torch.manual_seed(0)
    test_features, test_score, test_groups = make_task(200, seed=1)
    curve = best_of_k_curve(Probe(DIM)(test_features).detach(), test_score, test_groups, KS, beta=0.0, shuffles=4)
    oracle = best_of_k_curve(test_score, test_score, test_groups, KS, beta=0.0, shuffles=4)
    with pytest.raises(AssertionError):
        assert_approaches_oracle(curve, oracle, mean_reward(test_score, test_groups), min_ratio=0.9)


def test_softmax_selection_interpolates_between_p0_and_argmax():
    features, score, groups = make_task(100, seed=5)
    probe = Probe(DIM)
    with torch.no_grad():  # the exact probe: Q = w*ᵀφ
        probe.net[0].weight.copy_(torch.linspace(-1.0, 1.0, DIM).unsqueeze(0) / DIM**0.5)
        probe.net[0].bias.zero_()
    q = probe(features).detach()
    hard = best_of_k_curve(q, score, groups, [8], beta=0.0)[8]
    soft = best_of_k_curve(q, score, groups, [8], beta=0.3)[8]
    flat = best_of_k_curve(q, score, groups, [8], beta=1e6)[8]
    assert hard == pytest.approx(best_of_k_curve(score, score, groups, [8], beta=0.0)[8])
    assert mean_reward(score, groups) == pytest.approx(flat, abs=1e-3) and flat < soft < hard


def test_chunking_and_pairs():
    rewards = torch.tensor([0.0, 1.0, 1.0, 0.5, 0.2])
    prompts = [torch.tensor([0, 1, 2]), torch.tensor([3, 4])]
    pairs = preference_pairs(prompts, rewards)
    assert sorted(map(tuple, pairs.tolist())) == [(1, 0), (2, 0), (3, 4)]  # ties (1, 2) are not pairs
    index, mask = pg_chunks([torch.arange(8), torch.arange(8, 12)], 3, torch.Generator().manual_seed(0))
    # 8 → chunks of 3, 3, 2 (padded); 4 → 3 and a 1-sample leftover, dropped (no gradient).
    assert index.shape == (4, 3) and mask.sum().item() == 11
    assert sorted(index[mask].tolist())[:8] == list(range(8)) and len(set(index[mask].tolist())) == 11


def test_probe_save_load_roundtrip(tmp_path):
    features, score, groups = make_task(20, seed=6)
    probe, _ = train_probe(
        ProbeData(features, score, groups), ProbeTrainConfig(loss="mse", depth=2, hidden=8, epochs=2)
    )
    loaded = Probe.load(probe.save(tmp_path / "p.pt", extra={"loss": "mse"}))
    assert torch.allclose(loaded(features), probe(features)) and loaded.extra == {"loss": "mse"}
    assert loaded.config == {"dim": DIM, "depth": 2, "hidden": 8}


def test_best_of_k_per_prompt_keeps_prompt_order_and_averages_to_the_curve():
    """Prompt 0 has 4 samples (rewards 1, 1, 1, 0; the probe ranks the right ones first), prompt 1 has 2
    (rewards 1, 0; the probe prefers the wrong one). Prompts of different sizes are evaluated in another
    order internally; the per-prompt numbers must come back in prompt order."""
    from qalign.probe.evaluate import best_of_k_curve, best_of_k_per_prompt

    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    q = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 1.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1])
    per_prompt = best_of_k_per_prompt(q, rewards, groups, [1, 2], beta=0.0, shuffles=5)
    assert per_prompt[1] == pytest.approx([0.75, 0.5])  # one sample: the mean reward
    assert per_prompt[2] == pytest.approx([1.0, 0.0])  # any pair of prompt 0 holds a right answer the probe picks
    curve = best_of_k_curve(q, rewards, groups, [1, 2], beta=0.0, shuffles=5)
    assert curve == {k: pytest.approx(sum(v) / len(v)) for k, v in per_prompt.items()}
