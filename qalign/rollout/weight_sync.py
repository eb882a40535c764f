"""Moving a trained model's weights to vLLM, and checking that vLLM really samples from them.

Two kinds of payload:

* full weights (full fine-tuning): ``(name, tensor)`` pairs under the Hugging Face checkpoint names,
  which vLLM's own in-place reload (``Worker.reload_weights``) maps onto its fused layers;
* a LoRA adapter (PEFT model): only the adapter is written (``save_pretrained`` of a PEFT model
  writes adapter weights and config), never the merged model.

``logprob_gap`` is the verification: it samples with an engine, re-scores the same tokens with an
HF forward of the trained model and returns the largest absolute log-prob difference.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from qalign.distributed import full_state_dict

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from qalign.rollout.base import RolloutEngine

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def is_peft_model(model: torch.nn.Module) -> bool:
    """True for a PEFT-wrapped model (then only its adapter is synced)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def dtype_name(model: torch.nn.Module) -> str:
    """vLLM's name for the dtype of ``model``'s floating-point parameters."""
    for param in model.parameters():
        if param.is_floating_point():
            return _DTYPE_NAMES.get(param.dtype, "float32")
    return "float32"


def base_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The base model's weights under their checkpoint names (adapter tensors left out).

    For a PEFT model, the wrapped layers store the frozen weight as ``<layer>.base_layer.weight``;
    the checkpoint name is ``<layer>.weight``. Tied tensors are yielded once (the first name), since
    vLLM ties them itself and safetensors refuses shared storage.
    """
    source = model.get_base_model() if is_peft_model(model) else model
    seen: set[int] = set()
    # The parameter objects themselves, so tied ones are recognised by identity (storage pointers fail
    # for FSDP2: a shard of a small tensor can be empty and point nowhere).
    for name, tensor in full_state_dict(source, keep_vars=True).items():
        if "lora_" in name or "modules_to_save" in name:
            continue
        name = name.replace(".base_layer.", ".").replace(".original_module.", ".")
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        yield name, tensor.detach()


def save_base_model(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase | None, directory: str | Path) -> Path:
    """Write a loadable HF folder (config, generation config, safetensors, tokenizer) of the base weights.

    vLLM loads models from folders; writing the in-memory model (rather than reusing
    ``name_or_path``) guarantees vLLM starts from exactly the weights being trained.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    source = model.get_base_model() if is_peft_model(model) else model
    source.config.save_pretrained(directory)
    if getattr(source, "generation_config", None) is not None:
        source.generation_config.save_pretrained(directory)
    save_file({name: t.contiguous().cpu() for name, t in base_weights(model)}, str(directory / "model.safetensors"))
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def save_adapter(model: torch.nn.Module, directory: str | Path) -> Path:
    """Write only the LoRA adapter (weights + adapter_config.json) of a PEFT model."""
    peft_config = model.peft_config[getattr(model, "active_adapter", "default")]
    if getattr(peft_config, "modules_to_save", None):
        # vLLM's LoRA loader has no notion of fully trained extra modules: they would silently be lost.
        raise ValueError("LoRA sync to vLLM does not support peft modules_to_save; train them without vLLM")
    directory = Path(directory)
    if directory.exists():
        shutil.rmtree(directory)
    model.save_pretrained(str(directory), state_dict=full_state_dict(model))  # whole tensors under FSDP2
    # PEFT may record a hub id or a temp path as base model; vLLM checks nothing there, but keep it tidy.
    config_path = directory / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config.pop("base_model_name_or_path", None)
    config_path.write_text(json.dumps(config, indent=2))
    return directory


def full_weights(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs to push for a full-weight sync (a non-PEFT model)."""
    if is_peft_model(model):
        raise ValueError("full_weights is for full fine-tuning; a PEFT model syncs its adapter")
    return list(base_weights(model))


@torch.no_grad()
def sequence_logprobs(
    model: PreTrainedModel, prompt_ids: list[int], completion_ids: list[int], temperature: float = 1.0
) -> list[float]:
    """Log-probabilities an HF forward of ``model`` gives each completion token (after temperature)."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        ids = torch.tensor([prompt_ids + completion_ids], device=device)
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()
    finally:
        model.train(was_training)
    if temperature > 0:
        logits = logits / temperature
    logprobs = logits.log_softmax(-1)
    targets = torch.tensor(completion_ids, device=logprobs.device).unsqueeze(-1)
    return logprobs.gather(-1, targets).squeeze(-1).tolist()


def logprob_gap(
    engine: RolloutEngine,
    model: PreTrainedModel,
    prompts: list[list[int]],
    max_tokens: int = 16,
    seed: int = 0,
) -> float:
    """Largest |vLLM log-prob − HF log-prob| over tokens that ``engine`` samples (temperature 1, no top-p/k).

    After a correct sync both sides compute the same distribution, so in float32 the gap is at the
    level of kernel rounding (about 1e-5); a stale or wrongly mapped weight gives gaps of order 1.
    """
    from qalign.rollout.base import SamplingConfig

    sampling = SamplingConfig(n=1, temperature=1.0, top_p=1.0, top_k=0, max_tokens=max_tokens, seed=seed)
    gap = 0.0
    for prompt, (completion, *_) in zip(prompts, engine.generate(prompts, sampling)):
        reference = sequence_logprobs(model, prompt, completion.completion_ids)
        if len(reference) != len(completion.logprobs):
            raise ValueError("engine returned a log-prob count that differs from its token count")
        gap = max([gap, *(abs(a - b) for a, b in zip(completion.logprobs, reference))])
    return gap
