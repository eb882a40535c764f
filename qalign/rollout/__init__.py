"""Rollout engines: one interface (``RolloutEngine``), several backends.

Imports are lazy so that ``qalign.rollout.config`` stays cheap for config validation and importing
``qalign.rollout`` never imports vLLM.
"""

from __future__ import annotations

from qalign._lazy import lazy_exports

_EXPORTS = {
    "Completion": "qalign.rollout.base",
    "RolloutEngine": "qalign.rollout.base",
    "RolloutUnavailable": "qalign.rollout.base",
    "SamplingConfig": "qalign.rollout.base",
    "HFEngine": "qalign.rollout.hf",
    "eos_token_ids": "qalign.rollout.hf",
    "VLLMEngine": "qalign.rollout.vllm_engine",
    "VLLMServerEngine": "qalign.rollout.vllm_server",
    "build_engine": "qalign.rollout.factory",
    "logprob_gap": "qalign.rollout.weight_sync",
    "RolloutArguments": "qalign.rollout.config",
    "SamplingRolloutArguments": "qalign.rollout.config",
    "resolve_backend": "qalign.rollout.backend",
}

__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
