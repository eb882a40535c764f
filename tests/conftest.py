"""Shared fixtures: a tiny causal LM (built from a config) with a tokenizer trained here.

Nothing is downloaded: the tokenizer is a byte-level BPE trained on the bundled arithmetic task,
the model a 2-layer Llama (head_dim 32, which vLLM's CPU attention also accepts).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.needs import missing

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def build_tiny_model(folder: Path, hidden_size: int = 64, num_layers: int = 2, seed: int = 0) -> Path:
    """Train a small BPE tokenizer and save a random tiny Llama next to it; returns ``folder``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from qalign.data.arithmetic import generate

    corpus = [f"{row['question']} {row['answer']}" for row in generate("train", size=500)]
    corpus += ["\\boxed{12} The answer is 7. #### 42 " + " ".join(str(i) for i in range(100))]
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<pad>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>")
    fast.save_pretrained(folder)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // 32,
        num_key_value_heads=hidden_size // 32,
        head_dim=32,
        max_position_embeddings=512,
        pad_token_id=fast.pad_token_id,
        eos_token_id=fast.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def gsm8k_dir() -> Path:
    folder = SHARED_DATA / "gsm8k"
    if not (folder / "test.jsonl").is_file():
        missing(f"real GSM8K not found at {folder} (it lives in ../shared/data/gsm8k beside the repo)")
    return folder


@pytest.fixture(scope="session")
def tiny_rollouts(tiny_model_dir, tmp_path_factory) -> Path:
    """8 rollouts (4 prompts x 2) of the tiny model, with reference statistics."""
    from qalign.collect import collect_from_yaml
    from tests.trainers.helpers import write_collect_yaml

    folder = tmp_path_factory.mktemp("tiny-rollouts")
    config = write_collect_yaml(folder / "collect.yaml", tiny_model_dir, folder / "data")
    return collect_from_yaml(str(config))
