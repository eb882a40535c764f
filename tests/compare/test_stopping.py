"""The stop-token diagnostic against its closed form: a policy that adds c to the stop token's logit."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from qalign.compare.stopping import StopLogRatio, stop_log_ratio, summarize

EOS = 3


class StopBonus(torch.nn.Module):
    """π_ref's logits with c added to the stop token's: ln ρ(EOS) = c − ln Z, ln ρ(other) = −ln Z,
    Z = 1 − p + p·e^c with p = π_ref(EOS | s)."""

    def __init__(self, ref: torch.nn.Module, bonus: float):
        super().__init__()
        self.ref, self.bonus = ref, bonus

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        logits = self.ref(input_ids=input_ids).logits.clone()
        logits[..., EOS] += self.bonus
        return SimpleNamespace(logits=logits)


@pytest.fixture(scope="module")
def ref_model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def test_reference_against_itself_is_zero(ref_model):
    ratio = stop_log_ratio(ref_model, ref_model, [5, 6, 7], [8, 9, EOS])
    assert ratio == StopLogRatio(stop=0.0, others=0.0)


@pytest.mark.parametrize("bonus", [-2.0, 1.5])
def test_stop_bonus_matches_its_closed_form(ref_model, bonus):
    prompt, completion = [5, 6, 7], [8, 9, 10, EOS]
    with torch.no_grad():
        ids = torch.tensor([prompt + completion[:-1]])
        p_eos = torch.softmax(ref_model(input_ids=ids).logits[0, len(prompt) - 1 :], dim=-1)[:, EOS].double()
    log_z = torch.log(1 - p_eos + p_eos * math.exp(bonus))
    ratio = stop_log_ratio(StopBonus(ref_model, bonus), ref_model, prompt, completion)
    assert ratio.stop == pytest.approx(bonus - log_z[-1].item(), abs=1e-5)
    assert ratio.others == pytest.approx(-log_z[:-1].mean().item(), abs=1e-5)


def test_summary_counts_halved_stops():
    ratios = [StopLogRatio(-2.0, 0.1), StopLogRatio(-0.5, -0.1), StopLogRatio(0.3, 0.0), StopLogRatio(-0.7, 0.0)]
    summary = summarize(ratios)
    assert summary["count"] == 4
    assert summary["stop"] == pytest.approx(-0.725)
    assert summary["others"] == pytest.approx(0.0)
    assert summary["halved"] == 0.5  # −2.0 and −0.7 are below −ln 2 ≈ −0.693
    assert math.isnan(summarize([])["stop"])
