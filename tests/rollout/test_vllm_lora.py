"""LoRA sync into an in-process vLLM engine: only the adapter moves, log-probs agree with HF+PEFT."""

from __future__ import annotations

import pytest

from qalign.rollout import logprob_gap
from tests.rollout.conftest import load_hf, load_tokenizer, prompts_for

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

TOLERANCE = 1e-3


def make_peft_model(folder):
    import torch
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        load_hf(folder), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])
    )
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a "trained" adapter: B is zero at init, which would change nothing
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model


def test_lora_adapter_sync(vllm_model_dir):
    from qalign.rollout import VLLMEngine

    model, tokenizer = make_peft_model(vllm_model_dir), load_tokenizer(vllm_model_dir)
    prompts = prompts_for(tokenizer, ["2 + 2 =", "9 - 1 =", "6 * 7 ="])
    with VLLMEngine(model, tokenizer, max_model_len=256, max_lora_rank=8) as engine:
        assert logprob_gap(engine, model, prompts) > 10 * TOLERANCE  # base weights only, adapter not yet sent
        engine.sync_weights(model)
        assert sorted(p.name for p in engine._workdir.iterdir() if p.name.startswith("adapter")) == ["adapter-1"]
        assert logprob_gap(engine, model, prompts) < TOLERANCE
        with __import__("torch").no_grad():
            for name, param in model.named_parameters():
                if "lora_A" in name:
                    param.mul_(1.5)
        engine.sync_weights(model)  # a second version replaces the first
        assert logprob_gap(engine, model, prompts) < TOLERANCE


def test_lora_adapter_sync_to_a_server(vllm_model_dir):
    from qalign.rollout import VLLMServerEngine

    model, tokenizer = make_peft_model(vllm_model_dir), load_tokenizer(vllm_model_dir)
    prompts = prompts_for(tokenizer, ["2 + 2 =", "9 - 1 ="])
    with VLLMServerEngine(
        model, tokenizer, num_servers=1, max_model_len=256, max_lora_rank=8, start_timeout=600
    ) as engine:
        assert logprob_gap(engine, model, prompts) > 10 * TOLERANCE
        engine.sync_weights(model)
        assert logprob_gap(engine, model, prompts) < TOLERANCE
        with __import__("torch").no_grad():
            for name, param in model.named_parameters():
                if "lora_A" in name:
                    param.mul_(1.5)
        engine.sync_weights(model)  # loads qalign-2, unloads qalign-1
        assert engine._lora_name == "qalign-2"
        assert logprob_gap(engine, model, prompts) < TOLERANCE
