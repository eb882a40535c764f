"""Each trainer's model card names its own method, paper and settings."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import yaml

from qalign.trainers.model_card import PAPERS, model_card
from qalign.trainers.registry import TRAINERS, trainer_class


@pytest.mark.parametrize("algorithm", sorted(TRAINERS))
def test_every_trainer_writes_the_card_of_its_own_method(algorithm):
    cls = trainer_class(algorithm)
    assert cls._method == algorithm and algorithm in PAPERS
    assert any(base.__name__ == "ModelCardMixin" for base in cls.__mro__)


def test_card_content_for_qae_from_the_embedded_default():
    args = SimpleNamespace(quantile_k=0.4, num_generations=4, temperature=0.7, beta=0.0, learning_rate=2e-5,
                           max_steps=16, seed=0, epsilon=0.2, epsilon_high=0.28)  # fmt: skip
    card = model_card("qae", args, "smollm2-135m-instruct", "openai/gsm8k", "qae-demo")
    front = yaml.safe_load(card.split("---\n")[1])
    assert front == {"library_name": "transformers", "tags": ["qalign", "qae", "reinforcement-learning"],
                     "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "datasets": ["openai/gsm8k"]}  # fmt: skip
    assert "# qae-demo\n" in card
    assert (
        "Trained with **QAE (GRPO with a K-quantile baseline)** ([arXiv 2509.22611](https://arxiv.org/abs/2509.22611))"
        in card
    )
    rows = [line for line in card.splitlines() if line.startswith("| `")]
    assert rows[:3] == ["| `quantile_k` | `0.4` |", "| `num_generations` | `4` |", "| `temperature` | `0.7` |"]
    assert "@article{wu2025quantile," in card and "eprint  = {arXiv:2509.22611}," in card
    assert "DeepSeekMath" not in card


def test_q_sharp_card_says_how_to_load_the_guided_policy_and_keeps_local_paths_out_of_hub_metadata(tmp_path):
    args = SimpleNamespace(eta=0.1, guidance_top_k=20, num_iterations=2, guidance="qsharp")
    card = model_card("qsharp", args, str(tmp_path), "arithmetic", "qsharp-demo")
    front = yaml.safe_load(card.split("---\n")[1])
    assert front == {"library_name": "qalign", "tags": ["qalign", "qsharp", "value-based-rl"]}
    assert "load_guided_policy(" in card and "| `eta` | `0.1` |" in card and "arXiv 2502.20548" in card
