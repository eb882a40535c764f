"""Decoding-time alignment: Q# value-guided sampling (``guided``) and its data collection
(``collect_qsharp``, Algorithm 1 of the Q# paper).

Imports are lazy: ``qalign.decoding.guided`` pulls in torch and transformers.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "GuidanceConfig": "qalign.decoding.guided",
    "GuidedLogitsProcessor": "qalign.decoding.guided",
    "GuidedEngine": "qalign.decoding.guided",
    "save_guided_policy": "qalign.decoding.guided",
    "load_guided_engine": "qalign.decoding.guided",
    "load_guided_policy": "qalign.decoding.guided",
    "CollectionSettings": "qalign.decoding.collect_qsharp",
    "collect_iteration": "qalign.decoding.collect_qsharp",
    "load_examples": "qalign.decoding.collect_qsharp",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'qalign.decoding' has no attribute {name!r}")
