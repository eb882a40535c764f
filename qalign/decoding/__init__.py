"""Decoding-time alignment: Q# value-guided sampling (``guided``) and its data collection
(``collect_qsharp``, Algorithm 1 of the Q# paper).

Imports are lazy: ``qalign.decoding.guided`` pulls in torch and transformers.
"""

from __future__ import annotations

from qalign._lazy import lazy_exports

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

__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
