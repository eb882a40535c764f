"""Q# value-model diagnostics: held-out loss vs the best constant, AUROC, KL of a constant value model,
each against hand-computed numbers or a brute-force computation."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from qalign.losses.qsharp_diagnostics import (
    UNINFORMATIVE_AUROC,
    atom_frequencies,
    auroc,
    auroc_labels,
    bernoulli_cross_entropy,
    constant_bernoulli_loss,
    constant_bernoulli_mean,
    constant_head_output,
    constant_histogram_loss,
    constant_value_kl,
    heldout_prompt_indices,
    per_row_value_loss,
    row_weights,
    topk_truncation_kl,
    value_model_uninformative,
    weighted_mean,
)


def entropy(p: float) -> float:
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


# ----------------------------------------------------------------------------- held-out split and weights


def test_heldout_prompts_are_a_fixed_hashed_fraction():
    chosen = heldout_prompt_indices(32, 0.2, seed=0)
    assert len(chosen) == 6  # round(6.4)
    assert chosen == sorted(chosen) and all(0 <= i < 32 for i in chosen)
    assert heldout_prompt_indices(32, 0.2, seed=0) == chosen  # same on every process and every resume
    assert heldout_prompt_indices(32, 0.2, seed=1) != chosen
    assert heldout_prompt_indices(32, 0.0, seed=0) == []
    assert len(heldout_prompt_indices(4, 0.05, seed=0)) == 1  # at least one prompt when the fraction is > 0
    assert len(heldout_prompt_indices(3, 0.9, seed=0)) == 2  # at least one prompt left to train on
    assert heldout_prompt_indices(1, 0.5, seed=0) == []
    with pytest.raises(ValueError):
        heldout_prompt_indices(10, 1.0, seed=0)


def test_row_weights_follow_the_loss_normaliser():
    assert row_weights([3, 0, 1], "token") == [3.0, 0.0, 1.0]
    assert row_weights([3, 0, 1], "sequence") == [1.0, 0.0, 1.0]
    assert weighted_mean([1.0, math.inf, 4.0], [1.0, 0.0, 3.0]) == pytest.approx(13 / 4)  # w = 0 skipped
    assert math.isnan(weighted_mean([1.0], [0.0]))


# ----------------------------------------------------------------------------- loss vs the best constant


def test_bernoulli_constant_is_the_weighted_training_mean_scored_on_heldout_labels():
    # Training rewards 1,0,0,1,0 with 2,1,1,1,5 trained tokens: p̄ = (2 + 1) / 10 = 0.3.
    train_r, train_w = [1, 0, 0, 1, 0], [2, 1, 1, 1, 5]
    assert constant_bernoulli_mean(train_r, train_w) == pytest.approx(0.3, abs=1e-15)
    # Held out: a success with 3 tokens, a failure with 1: −(3 ln 0.3 + ln 0.7) / 4 = 0.99215…
    expected = -(3 * math.log(0.3) + math.log(0.7)) / 4
    assert expected == pytest.approx(0.992148, abs=1e-6)
    assert constant_bernoulli_loss(train_r, train_w, [1, 0], [3, 1]) == pytest.approx(expected, abs=1e-12)
    # On labels with the training mean itself the constant scores the entropy H(p̄): H(0.3) = 0.61086…
    assert constant_bernoulli_loss(train_r, train_w, train_r, train_w) == pytest.approx(entropy(0.3), abs=1e-12)
    assert entropy(0.34) == pytest.approx(0.6410, abs=1e-4)  # the demo's 0.64
    # Soft labels in [0, 1]: −(0.5 ln 0.3 + 0.5 ln 0.7).
    assert bernoulli_cross_entropy(0.3, [0.5], [1]) == pytest.approx(-(0.5 * math.log(0.3) + 0.5 * math.log(0.7)))
    # 0·ln 0 = 0: a constant 0 is free on failures and infinitely wrong on a success.
    assert bernoulli_cross_entropy(0.0, [0, 0], [1, 1]) == 0.0
    assert bernoulli_cross_entropy(0.0, [0, 1], [1, 1]) == math.inf


def test_per_row_bernoulli_loss_matches_hand_computed_bce():
    # Row 0 (reward 1): logits 0 and ln 3 on two trained positions → (ln 2 + ln(4/3)) / 2.
    # Row 1 (reward 0): logit ln 3 on one trained position (the first is the prompt) → ln 4.
    logits = torch.tensor([[0.0, math.log(3.0)], [5.0, math.log(3.0)]], dtype=torch.float64)
    mask = torch.tensor([[1, 1], [0, 1]])
    rewards = torch.tensor([1.0, 0.0], dtype=torch.float64)
    losses = per_row_value_loss(logits, rewards, mask, "bernoulli")
    assert losses[0].item() == pytest.approx((math.log(2) + math.log(4 / 3)) / 2, abs=1e-12)
    assert losses[1].item() == pytest.approx(math.log(4), abs=1e-12)
    # Token weights give the batch's token-mean loss: (ln 2 + ln 4/3 + ln 4) / 3.
    token = weighted_mean(losses, row_weights([2, 1], "token"))
    assert token == pytest.approx((math.log(2) + math.log(4 / 3) + math.log(4)) / 3, abs=1e-12)


def test_histogram_constant_is_the_training_atom_frequencies_scored_on_heldout_labels():
    atoms = torch.tensor([0.0, 0.5, 1.0])
    # Training rewards 0, 0.4, 1, 1 fall on atoms 0, 1, 2, 2: f = (1/4, 1/4, 1/2).
    freq = atom_frequencies([0.0, 0.4, 1.0, 1.0], [1, 1, 1, 1], atoms)
    assert freq.tolist() == pytest.approx([0.25, 0.25, 0.5], abs=1e-15)
    # Weights count: token weights 1, 1, 2, 0 give (1/4, 1/4, 2/4) too, the zero-weight row ignored.
    assert atom_frequencies([0.0, 0.4, 1.0, 0.9], [1, 1, 2, 0], atoms).tolist() == pytest.approx([0.25, 0.25, 0.5])
    # Held out 0.9 (atom 2) and 0.1 (atom 0): −(ln 1/2 + ln 1/4) / 2 = 1.03972…
    expected = (math.log(2) + math.log(4)) / 2
    got = constant_histogram_loss([0.0, 0.4, 1.0, 1.0], [1, 1, 1, 1], [0.9, 0.1], [1, 1], atoms)
    assert got == pytest.approx(expected, abs=1e-12)
    # A held-out atom never seen in training: the best constant gives it probability 0.
    assert constant_histogram_loss([0.0, 1.0], [1, 1], [0.5], [1], atoms) == math.inf


def test_per_row_histogram_loss_matches_hand_computed_nll():
    # Atom logits ln(0.2, 0.3, 0.5): reward 1 → −ln 0.5, reward 0.45 → atom 0.5 → −ln 0.3.
    atoms = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    logits = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64).log().expand(2, 1, 3)
    rewards = torch.tensor([1.0, 0.45], dtype=torch.float64)
    losses = per_row_value_loss(logits, rewards, torch.ones(2, 1), "histogram", atoms)
    assert losses.tolist() == pytest.approx([-math.log(0.5), -math.log(0.3)], abs=1e-12)


def test_constant_head_output_is_the_best_constant():
    assert constant_head_output("bernoulli", [1, 0, 0, 0], [1, 1, 1, 1]).item() == pytest.approx(math.log(1 / 3))
    assert math.isfinite(constant_head_output("bernoulli", [1, 1], [1, 1]).item())  # p̄ = 1 clamped
    atoms = torch.tensor([0.0, 0.5, 1.0])
    out = constant_head_output("histogram", [0.0, 1.0, 1.0], [1, 1, 1], atoms)
    assert out.exp().tolist() == pytest.approx([1 / 3, 0.0, 2 / 3])


# ----------------------------------------------------------------------------- AUROC


def brute_force_auroc(scores, labels) -> float:
    pairs = [(s, t) for (s, y), (t, z) in itertools.product(zip(scores, labels), repeat=2) if y and not z]
    return sum(1.0 if s > t else 0.5 if s == t else 0.0 for s, t in pairs) / len(pairs)


def test_auroc_counts_ties_as_half():
    # Positives 0.4, 0.8, 0.4; negatives 0.1, 0.4. Pairs: 0.4>0.1, 0.4=0.4 (½), 0.8>0.1, 0.8>0.4, 0.4>0.1,
    # 0.4=0.4 (½) → 5 of 6.
    scores, labels = [0.1, 0.4, 0.4, 0.8, 0.4], [0, 0, 1, 1, 1]
    assert auroc(scores, labels) == pytest.approx(5 / 6, abs=1e-15)
    assert auroc([0.3, 0.3, 0.3, 0.3], [1, 0, 1, 0]) == 0.5  # a constant value model
    assert auroc([0.1, 0.2, 0.9], [0, 0, 1]) == 1.0
    assert auroc([0.1, 0.2, 0.9], [1, 1, 0]) == 0.0
    assert math.isnan(auroc([0.1, 0.2], [1, 1]))


def test_auroc_equals_the_pairwise_count_on_random_tied_scores():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        n = int(torch.randint(2, 30, (1,), generator=generator))
        scores = (torch.randint(0, 5, (n,), generator=generator) / 4).tolist()  # many ties
        labels = torch.randint(0, 2, (n,), generator=generator).bool().tolist()
        if all(labels) or not any(labels):
            continue
        assert auroc(scores, labels) == pytest.approx(brute_force_auroc(scores, labels), abs=1e-12)


def test_auroc_labels_binary_or_above_median():
    assert auroc_labels([0.0, 1.0, 1.0, 0.0]) == [False, True, True, False]
    assert auroc_labels([1.0, 1.0, 1.0, 0.0]) == [True, True, True, False]  # binary, even when mostly 1
    assert auroc_labels([0.1, 0.9, 0.5, 0.7]) == [False, True, False, True]  # median 0.6
    assert auroc_labels([0.0, 0.5, 1.0]) == [False, False, True]  # median 0.5
    assert auroc_labels([0.3, 0.3]) == [False, False]


# ----------------------------------------------------------------------------- KL of a constant value model


def brute_force_constant_kl(ref_logits: torch.Tensor, c: float, k: int) -> torch.Tensor:
    """Build π_c by hand (offset c on π_ref's top-k, 0 elsewhere, normalise) and sum p ln(p/q)."""
    log_ref = ref_logits.log_softmax(dim=-1)
    offset = torch.zeros_like(log_ref)
    if 0 < k < ref_logits.size(-1):
        offset.scatter_(-1, log_ref.topk(k, dim=-1).indices, c)
    log_guided = (log_ref + offset).log_softmax(dim=-1)
    return (log_guided.exp() * (log_guided - log_ref)).sum(dim=-1)


def test_constant_value_kl_matches_hand_computed():
    # π_ref = (0.5, 0.3, 0.2), k = 2 (m = 0.8), c = ln 3: Z = 0.8·3 + 0.2 = 2.6, q = 2.4/2.6,
    # KL = q ln 3 − ln 2.6 = 1.014104 − 0.955511 = 0.058592…
    logits = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64).log()
    expected = (2.4 / 2.6) * math.log(3) - math.log(2.6)
    assert expected == pytest.approx(0.058592, abs=1e-6)
    assert constant_value_kl(logits, math.log(3), 2).item() == pytest.approx(expected, abs=1e-12)
    # Truncation alone: −ln 0.8 = 0.22314…; c = 0 (the candidate_min rule) changes nothing: KL = 0.
    assert topk_truncation_kl(logits, 2).item() == pytest.approx(-math.log(0.8), abs=1e-12)
    assert constant_value_kl(logits, 0.0, 2).item() == pytest.approx(0.0, abs=1e-15)
    # Every token a candidate: a constant offset is a per-state constant, the softmax removes it.
    assert constant_value_kl(logits, 5.0, 0).item() == pytest.approx(0.0, abs=1e-15)
    assert constant_value_kl(logits, 5.0, 3).item() == pytest.approx(0.0, abs=1e-15)


def test_constant_value_kl_matches_brute_force_and_tends_to_truncation():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=generator, dtype=torch.float64) * 2
    for k in (1, 5, 20):
        for c in (0.3, 2.0, 8.92):
            got = constant_value_kl(logits, c, k)
            assert torch.allclose(got, brute_force_constant_kl(logits, c, k), atol=1e-12), (k, c)
        # Monotone in c ≥ 0 and bounded by −ln m, reached as c → ∞.
        values = torch.stack([constant_value_kl(logits, c, k) for c in (0.0, 1.0, 4.0, 60.0)])
        assert bool((values[1:] >= values[:-1] - 1e-12).all())
        assert torch.allclose(values[-1], topk_truncation_kl(logits, k), atol=1e-12)
    # A per-state offset tensor broadcasts state by state.
    c = torch.tensor([0.5, 1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    expected = torch.stack([brute_force_constant_kl(logits[i : i + 1], float(c[i]), 5)[0] for i in range(6)])
    assert torch.allclose(constant_value_kl(logits, c, 5), expected, atol=1e-12)


# ----------------------------------------------------------------------------- verdict


def test_uninformative_when_no_better_than_the_constant():
    assert value_model_uninformative(0.64, 0.64, 0.9)  # loss equal to the constant's
    assert value_model_uninformative(0.50, 0.64, UNINFORMATIVE_AUROC)  # chance ranking
    assert not value_model_uninformative(0.50, 0.64, 0.56)
    assert not value_model_uninformative(0.50, 0.64, math.nan)  # one reward class: the loss decides
    assert value_model_uninformative(0.70, 0.64, math.nan)
    assert not value_model_uninformative(math.nan, math.nan, math.nan)
