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
    non_candidate_baseline,
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
    # p̂ → 0 gives offset 0 (what non-candidates get under the z_min rule); p̂ → 1 gives 1/η = 100 at η = 0.01.
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
    guided = guided_logits(ref, offset, candidates=torch.tensor([[1]]), non_candidate="z_min").exp()
    # Non-candidates at offset 0: token 1 doubled, (0.5, 0.6, 0.2) / 1.3.
    torch.testing.assert_close(guided, torch.tensor([[0.5, 0.6, 0.2]], dtype=torch.float64) / 1.3)
    # A single candidate is its own worst candidate: with the default rule nothing changes.
    torch.testing.assert_close(guided_logits(ref, offset, candidates=torch.tensor([[1]])), ref)


# Vocabulary 5, top-2 candidates, two states with different worst offsets (ln 2 and ln 3), so a
# batch-wide instead of per-state minimum would give other numbers.
RULE_REF = torch.tensor([[0.4, 0.3, 0.1, 0.1, 0.1], [0.2, 0.2, 0.2, 0.2, 0.2]], dtype=torch.float64).log()
RULE_CANDIDATES = torch.tensor([[0, 1], [3, 1]])
RULE_OFFSETS = torch.tensor([[3.0, 2.0], [3.0, 6.0]], dtype=torch.float64).log()


def test_guided_logits_non_candidates_at_z_min():
    # Candidates × e^offset, the rest × 1:
    #   row 0: (0.4·3, 0.3·2, 0.1, 0.1, 0.1) = (1.2, 0.6, 0.1, 0.1, 0.1) / 2.1
    #   row 1: (0.2, 0.2·6, 0.2, 0.2·3, 0.2) = (0.2, 1.2, 0.2, 0.6, 0.2) / 2.4
    got = guided_logits(RULE_REF, RULE_OFFSETS, RULE_CANDIDATES, non_candidate="z_min")
    expected = torch.tensor([[1.2, 0.6, 0.1, 0.1, 0.1], [0.2, 1.2, 0.2, 0.6, 0.2]], dtype=torch.float64)
    torch.testing.assert_close(got, (expected / expected.sum(dim=1, keepdim=True)).log(), rtol=0, atol=1e-12)
    torch.testing.assert_close(got[0].exp(), torch.tensor([1.2, 0.6, 0.1, 0.1, 0.1], dtype=torch.float64) / 2.1)


def test_guided_logits_non_candidates_at_worst_candidate_is_the_default():
    # The worst candidate's offset (row 0: ln 2, row 1: ln 3) is subtracted, so it gets the non-candidates' 0:
    #   row 0: (0.4·1.5, 0.3, 0.1, 0.1, 0.1) = (0.6, 0.3, 0.1, 0.1, 0.1) / 1.2 = (1/2, 1/4, 1/12, 1/12, 1/12)
    #   row 1: (0.2, 0.2·2, 0.2, 0.2, 0.2) / 1.2 = (1/6, 1/3, 1/6, 1/6, 1/6)
    expected = torch.tensor(
        [[1 / 2, 1 / 4, 1 / 12, 1 / 12, 1 / 12], [1 / 6, 1 / 3, 1 / 6, 1 / 6, 1 / 6]], dtype=torch.float64
    ).log()
    for got in (
        guided_logits(RULE_REF, RULE_OFFSETS, RULE_CANDIDATES, non_candidate="candidate_min"),
        guided_logits(RULE_REF, RULE_OFFSETS, RULE_CANDIDATES),  # the default
    ):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    baseline = non_candidate_baseline(RULE_OFFSETS, "candidate_min")
    torch.testing.assert_close(baseline, torch.tensor([[2.0], [3.0]], dtype=torch.float64).log())
    assert non_candidate_baseline(RULE_OFFSETS, "z_min").tolist() == [[0.0], [0.0]]


def test_rule_changes_nothing_with_the_whole_vocabulary_as_candidates():
    # Softmax is shift-invariant: with every token a candidate, subtracting min offset(s, ·) is a no-op.
    offsets = torch.tensor([[0.3, 2.0, 1.1, 0.7, 4.0], [1.0, 1.5, 0.2, 3.0, 0.9]], dtype=torch.float64)
    everything = torch.arange(5).expand(2, -1)
    unshifted = (RULE_REF + offsets).log_softmax(dim=-1)
    for candidates in (None, everything, everything.flip(-1)):
        shuffled = offsets if candidates is None or candidates[0, 0] == 0 else offsets.flip(-1)
        for rule in ("candidate_min", "z_min"):
            got = guided_logits(RULE_REF, shuffled, candidates, non_candidate=rule)
            torch.testing.assert_close(got, unshifted, rtol=0, atol=1e-12)


def test_small_eta_with_binary_rewards_is_the_reference_conditioned_on_success():
    # With z ∈ {0, 1}, π^{Z,η}(a) ∝ π_ref(a)·(1 − p̂ + p̂·e^{1/η}) → π_ref(a)·p̂(a) = π_ref(a | success) as η → 0:
    # the weights differ from p̂'s by a factor within 1 + (1 − p̂)e^{−1/η}/p̂, so η below 0.1 cannot guide harder.
    # π_ref = (0.5, 0.3, 0.2), p̂ = (0.2, 0.5, 0.8): π_ref·p̂ = (0.10, 0.15, 0.16) / 0.41.
    ref = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64).log()
    value_logits = torch.tensor([[logit(0.2), logit(0.5), logit(0.8)]], dtype=torch.float64)
    conditioned = torch.tensor([[0.10, 0.15, 0.16]], dtype=torch.float64) / 0.41
    for eta, tolerance in ((0.1, 1e-4), (0.05, 1e-8), (0.02, 1e-12)):
        guided = guided_logits(ref, bernoulli_guidance_offset(value_logits, eta)).exp()
        torch.testing.assert_close(guided, conditioned, rtol=0, atol=tolerance)
    # η = 1 weighs by 1 − p̂ + p̂·e: (0.5·1.3437, 0.3·1.8591, 0.2·2.3746) / 1.7045 = (0.3942, 0.3272, 0.2786).
    guided = guided_logits(ref, bernoulli_guidance_offset(value_logits, 1.0)).exp()
    torch.testing.assert_close(guided, torch.tensor([[0.3942, 0.3272, 0.2786]], dtype=torch.float64), rtol=0, atol=1e-4)


def test_unknown_non_candidate_rule_is_refused():
    message = r"non_candidate_offset must be one of \('candidate_min', 'z_min'\), got 'zmin'"
    with pytest.raises(ValueError, match=message):
        guided_logits(RULE_REF, RULE_OFFSETS, RULE_CANDIDATES, non_candidate="zmin")


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
