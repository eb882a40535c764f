"""Q# math: guidance offsets and value losses against hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch

from qalign.losses.qsharp import (
    bernoulli_guidance_offset,
    bernoulli_value_loss,
    cd_guidance_offset,
    guidance_offset,
    guided_logits,
    histogram_guidance_offset,
    histogram_value_loss,
    kl_divergence,
    nearest_atom,
)


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_bernoulli_offset_matches_hand_computed():
    # η = 0.1 (the authors' --eta 10): offset = ln(1 − p + p·e^{10}).
    p = 0.3
    expected = math.log(0.7 + 0.3 * math.exp(10.0))  # = 8.7960...
    got = bernoulli_guidance_offset(torch.tensor([logit(p)], dtype=torch.float64), eta=0.1)
    assert got.item() == pytest.approx(expected, abs=1e-10)
    # η = 1, p = 0.5: ln(0.5 + 0.5·e) = ln(1.8591409…) = 0.6201145…
    got = bernoulli_guidance_offset(torch.tensor([0.0], dtype=torch.float64), eta=1.0)
    assert got.item() == pytest.approx(0.6201145069582775, abs=1e-12)


def test_bernoulli_offset_limits_and_no_overflow():
    # p̂ → 0 gives offset 0 (what non-candidates get); p̂ → 1 gives 1/η = 100 for η = 0.01.
    out = bernoulli_guidance_offset(torch.tensor([-200.0, 200.0], dtype=torch.float64), eta=0.01)
    assert out[0].item() == pytest.approx(0.0, abs=1e-12)
    assert out[1].item() == pytest.approx(100.0, abs=1e-9)
    # e^{1/η} = e^{1000} overflows float64; the softplus form gives ln(0.5 + 0.5·e^{1000}) = 1000 − ln 2.
    out = bernoulli_guidance_offset(torch.tensor([0.0]), eta=1e-3)
    assert out.item() == pytest.approx(1000.0 - math.log(2.0), rel=1e-6)


def test_histogram_offset_matches_hand_computed():
    # Atoms {0, 0.5, 1}, p̂ = (0.2, 0.3, 0.5), η = 0.5: ln(0.2 + 0.3·e^1 + 0.5·e^2).
    atoms = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    probs = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    expected = math.log(0.2 + 0.3 * math.e + 0.5 * math.e**2)  # = 1.6479...
    got = histogram_guidance_offset(probs.log(), atoms, eta=0.5)
    assert got.item() == pytest.approx(expected, abs=1e-12)
    # Shifted atoms {−1, 0, 1}: the offset is relative to z_min, so the same number comes out.
    got = histogram_guidance_offset(probs.log() + 3.0, atoms * 2 - 1, eta=1.0)
    assert got.item() == pytest.approx(expected, abs=1e-12)


def test_histogram_with_two_atoms_equals_bernoulli():
    p = torch.tensor([0.05, 0.4, 0.9], dtype=torch.float64)
    atom_logits = torch.stack([(1 - p).log(), p.log()], dim=-1)
    hist = histogram_guidance_offset(atom_logits, torch.tensor([0.0, 1.0], dtype=torch.float64), eta=0.2)
    bern = bernoulli_guidance_offset((p / (1 - p)).log(), eta=0.2)
    torch.testing.assert_close(hist, bern)


def test_cd_offset_is_mean_over_eta():
    # CD: exp(E[z]/η). Bernoulli p = 0.3, η = 0.1 → 3.0; histogram mean 0.65, η = 0.5 → 1.3.
    got = guidance_offset(torch.tensor([logit(0.3)], dtype=torch.float64), eta=0.1, mode="cd")
    assert got.item() == pytest.approx(3.0, abs=1e-12)
    atoms = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    probs = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    got = guidance_offset(probs.log(), eta=0.5, head="histogram", mode="cd", atoms=atoms)
    assert got.item() == pytest.approx((0.3 * 0.5 + 0.5 * 1.0) / 0.5, abs=1e-12)
    assert cd_guidance_offset(torch.tensor(0.7), eta=0.5, v_min=0.2).item() == pytest.approx(1.0)


def test_qsharp_offset_dominates_cd():
    # Jensen: ln E[exp(z/η)] ≥ E[z]/η, with equality only for a deterministic z.
    logits = torch.linspace(-5, 5, 11, dtype=torch.float64)
    assert (guidance_offset(logits, 0.1) >= guidance_offset(logits, 0.1, mode="cd") - 1e-12).all()


def test_guided_logits_on_candidates_only():
    ref = torch.log(torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64))
    offset = torch.tensor([[math.log(2.0)]], dtype=torch.float64)
    guided = guided_logits(ref, offset, candidates=torch.tensor([[1]])).exp()
    # Token 1 doubled: (0.5, 0.6, 0.2) / 1.3.
    torch.testing.assert_close(guided, torch.tensor([[0.5, 0.6, 0.2]], dtype=torch.float64) / 1.3)


def test_kl_divergence_hand_computed():
    p = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)
    q = torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64)
    assert kl_divergence(p.log(), q.log()).item() == pytest.approx(math.log(2.0), abs=1e-12)


def test_bernoulli_loss_token_and_sequence_weighting():
    # Sequence 1: two trained positions with p̂ = 0.8, r = 1 → −ln 0.8 each. Sequence 2: one position,
    # p̂ = 0.5, r = 0 → ln 2. Per token: (−2 ln 0.8 + ln 2) / 3. Per sequence: (−ln 0.8 + ln 2) / 2.
    logits = torch.tensor([[9.0, logit(0.8), logit(0.8)], [logit(0.5), -3.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[0, 1, 1], [1, 0, 0]])
    rewards = torch.tensor([1.0, 0.0], dtype=torch.float64)
    loss = bernoulli_value_loss(logits, rewards, mask, normalizer="token")
    assert loss.item() == pytest.approx((-2 * math.log(0.8) + math.log(2.0)) / 3, abs=1e-12)
    loss = bernoulli_value_loss(logits, rewards, mask, normalizer="sequence")
    assert loss.item() == pytest.approx((-math.log(0.8) + math.log(2.0)) / 2, abs=1e-12)


def test_histogram_loss_nearest_atom():
    atoms = torch.tensor([0.0, 0.5, 1.0])
    assert nearest_atom(torch.tensor([0.1, 0.3, 0.8, 2.0, -1.0]), atoms).tolist() == [0, 1, 2, 2, 0]
    probs = torch.tensor([[[0.2, 0.3, 0.5], [0.1, 0.1, 0.8]]], dtype=torch.float64)
    # r = 0.45 → atom 1: −ln 0.3 at position 0, −ln 0.1 at position 1, averaged.
    loss = histogram_value_loss(probs.log(), torch.tensor([0.45]), torch.tensor([[1, 1]]), atoms)
    assert loss.item() == pytest.approx((-math.log(0.3) - math.log(0.1)) / 2, abs=1e-6)
