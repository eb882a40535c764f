"""The policy interface the eval loop and the server sample from, and the one loader of saved policies.

``Policy`` sits below ``qalign.eval``, ``qalign.decoding``, ``qalign.probe``, ``qalign.compare`` and
``qalign.serve`` so that each can build or accept a policy without importing the others: a guided Q#
sampler is an ``EnginePolicy`` over a ``GuidedEngine``, a Q-probe ``BestOfKPolicy`` satisfies ``Policy``
structurally, and the eval runner only ever sees ``Policy``.

``load_policy(source)`` turns anything qalign writes (or a hub id) into a ``Policy``. What a folder is
comes from the file that describes it, checked without importing torch (``policy_kind``):

* ``model``: ``config.json``, a full model (GRPO/ShiQ/RFT output; DQO's value function sits in
  ``value_function/``, outside the weights transformers and vLLM read);
* ``lora``: ``adapter_config.json``, a LoRA adapter; its base from the adapter's config;
* ``qsharp`` / ``cd``: ``guided_policy.json``, π_ref guided by a Q# value model (``qalign.decoding``);
* ``qprobe_best_of_k``: ``best_of_k_policy.json``, best-of-k by a Q-probe (``qalign.probe.saved_policy``).

The heavy loaders are imported inside the functions: config checks import this module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from qalign.rollout.base import Completion, RolloutEngine, SamplingConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from qalign.rollout.config import RolloutArguments

__all__ = ["EnginePolicy", "Policy", "PolicyError", "load_model_policy", "load_policy", "policy_kind"]

GUIDED_POLICY_FILE = "guided_policy.json"  # qalign.decoding.guided.POLICY_FILE
BEST_OF_K_POLICY_FILE = "best_of_k_policy.json"  # qalign.probe.saved_policy.POLICY_FILE
# Checked in this order: a Q# or probe folder may also hold a config.json of its own.
POLICY_FILES = {GUIDED_POLICY_FILE: "guided", BEST_OF_K_POLICY_FILE: "qprobe_best_of_k",
                "adapter_config.json": "lora", "config.json": "model"}  # fmt: skip


class PolicyError(ValueError):
    """A policy source that cannot be loaded: the message names it and what was expected."""


@runtime_checkable
class Policy(Protocol):
    """Anything that answers prompts: a plain model through a rollout engine, a Q# guided sampler
    or a Q-probe best-of-k sampler. The eval loop only needs these four members."""

    tokenizer: PreTrainedTokenizerBase | None  # renders prompts (chat template); None → plain text

    def describe(self) -> dict[str, Any]:
        """JSON-able identity of the policy: recorded in the results, and compared on resume."""
        ...

    def sample(self, prompts: list[str], sampling: SamplingConfig) -> list[list[Completion | str]]:
        """``sampling.n`` completions of each rendered prompt; result[i] belongs to prompts[i]."""
        ...

    def close(self) -> None:
        """Release engines and memory."""
        ...


class EnginePolicy:
    """A model sampled through any ``RolloutEngine`` (HF generate, vLLM, guided decoding, …)."""

    def __init__(self, engine: RolloutEngine, tokenizer: PreTrainedTokenizerBase, description: dict[str, Any]):
        self.engine = engine
        self.tokenizer = tokenizer
        self._description = dict(description)

    def describe(self) -> dict[str, Any]:
        return dict(self._description)

    def sample(self, prompts: list[str], sampling: SamplingConfig) -> list[list[Completion]]:
        # A chat-templated prompt already holds its special tokens; plain text needs the BOS a
        # base model was trained with.
        add_special = not getattr(self.tokenizer, "chat_template", None)
        ids = [self.tokenizer(p, add_special_tokens=add_special)["input_ids"] for p in prompts]
        return self.engine.generate(ids, sampling)

    def close(self) -> None:
        self.engine.close()


# ----------------------------------------------------------------------------- loading saved policies


def policy_kind(source: str) -> str:
    """``"model"``, ``"lora"``, ``"qsharp"``, ``"cd"`` or ``"qprobe_best_of_k"`` for a folder (or its
    description file); ``"model"`` for a hub id or the embedded default. No heavy imports."""
    from qalign.preflight import looks_local

    path = Path(source).expanduser()
    if not path.exists():
        if looks_local(source):
            raise PolicyError(f"policy {source!r}: no such folder")
        return "model"  # a hub id or the embedded default: transformers / vLLM resolve it
    if path.is_file():
        path, files = path.parent, [path.name]
    else:
        files = list(POLICY_FILES)
    for name in files:
        if name in POLICY_FILES and (path / name).is_file():
            kind = POLICY_FILES[name]
            if kind != "guided":
                return kind
            try:
                record = json.loads((path / name).read_text())
            except (OSError, json.JSONDecodeError) as error:
                raise PolicyError(f"policy {source!r}: {name} is not readable JSON ({error})") from None
            return "cd" if record.get("mode") == "cd" else "qsharp"
    raise PolicyError(f"policy {source!r} is none of the folders qalign loads: expected one of "
                      f"{', '.join(POLICY_FILES)} in it")  # fmt: skip


def load_policy(
    source: str,
    *,
    backend: str = "hf",
    dtype: str = "float32",
    batch_size: int = 16,
    seed: int = 0,
    base_model: str | None = None,
    work_dir: str | Path | None = None,
    rollout: RolloutArguments | None = None,
    **overrides: Any,
) -> Policy:
    """Any policy qalign saves, ready to ``sample``.

    Args:
        source: hub id, model folder, LoRA adapter folder, Q# output folder or Q-probe output folder.
        backend: the engine ("hf" or "vllm") of plain models and LoRA adapters, of a best-of-k policy's
            sampler, and of Q#'s guided decoding (HF ``generate``, or vLLM with the value model inside its
            sampler; ``vllm_server`` cannot guide).
        dtype, batch_size, seed: weights dtype, prompts per HF batch, engine seed.
        base_model: a LoRA adapter's base (default: the one its config names).
        work_dir: where a LoRA adapter is merged for vLLM (default: beside nothing; a temporary folder).
        rollout: full ``rollout_*`` settings for the engine (``backend`` is then taken from it).
        overrides: Q#: ``eta``, ``top_k``, ``mode``, ``use_cache``, ``non_candidate_offset``;
            best-of-k: ``k``, ``beta``, ``probe`` (a loss name or file).
    """
    kind = policy_kind(source)
    if kind in ("qsharp", "cd"):
        from qalign.decoding.guided import load_guided_policy

        guided_backend = rollout.rollout_backend if rollout is not None else backend
        return load_guided_policy(source, batch_size=batch_size, dtype=dtype, backend=guided_backend, seed=seed,
                                  **overrides)  # fmt: skip
    if kind == "qprobe_best_of_k":
        from qalign.probe.saved_policy import load_best_of_k_policy

        return load_best_of_k_policy(source, backend=backend, dtype=dtype, batch_size=batch_size, seed=seed,
                                     **overrides)  # fmt: skip
    if overrides:
        raise PolicyError(f"policy {source!r} is a plain {kind}: {sorted(overrides)} apply to Q# or best-of-k only")
    if rollout is None:
        from qalign.rollout.config import RolloutArguments

        rollout = RolloutArguments(rollout_backend=backend)
    return load_model_policy(source, rollout, dtype=dtype, batch_size=batch_size, seed=seed, base_model=base_model,
                             work_dir=work_dir)  # fmt: skip


def load_model_policy(
    source: str,
    rollout: RolloutArguments,
    *,
    dtype: str = "float32",
    batch_size: int = 16,
    seed: int = 0,
    base_model: str | None = None,
    work_dir: str | Path | None = None,
    description: dict[str, Any] | None = None,
) -> EnginePolicy:
    """A full model (folder, hub id) or a LoRA adapter folder behind ``rollout``'s engine."""
    from qalign.models import load_model, load_tokenizer, resolve_model_path
    from qalign.rollout.factory import build_engine

    path = Path(resolve_model_path(source))
    base = adapter_base(path, base_model)
    # An adapter folder saved without its tokenizer uses the base model's.
    tokenizer = load_tokenizer(str(path) if base is None or (path / "tokenizer_config.json").is_file() else base)
    if description is None:
        description = {"kind": "lora" if base is not None else "model", "model": source, "base_model": base,
                       "dtype": dtype, "backend": rollout.rollout_backend}  # fmt: skip
    if rollout.rollout_backend == "hf":
        model = load_model(base or str(path), dtype)
        if base is not None:
            from peft import PeftModel

            # Merged weights generate as fast as the base model; the adapter folder is untouched.
            model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
        model.eval()
        engine = build_engine(rollout, model, tokenizer, seed=seed, batch_size=batch_size)
    else:
        # vLLM loads weights from a folder: an adapter is merged into one first.
        model_path = str(path) if base is None else str(merged_adapter(path, base, dtype, work_dir))
        engine = build_engine(rollout, model_path, tokenizer, seed=seed)
    return EnginePolicy(engine, tokenizer, description)


def adapter_base(path: Path, override: str | None) -> str | None:
    """The base model of a LoRA adapter folder, or None when ``path`` is a full model."""
    config = path / "adapter_config.json"
    if not config.is_file():
        return None
    base = override or json.loads(config.read_text()).get("base_model_name_or_path")
    if not base:
        raise PolicyError(f"{path} is a LoRA adapter without base_model_name_or_path: set base_model_name_or_path")
    return base


def merged_adapter(path: Path, base: str, dtype: str, work_dir: str | Path | None) -> Path:
    """Engines that load weights from disk (vLLM) get the adapter merged into a full folder, once."""
    import tempfile

    target = Path(work_dir) / "merged_model" if work_dir is not None else Path(tempfile.mkdtemp()) / "merged_model"
    if not (target / "config.json").is_file():
        from peft import PeftModel

        from qalign.models import load_model, load_tokenizer

        model = PeftModel.from_pretrained(load_model(base, dtype), str(path)).merge_and_unload()
        model.save_pretrained(target, safe_serialization=True)
        load_tokenizer(str(path) if (path / "tokenizer_config.json").is_file() else base).save_pretrained(target)
    return target
