"""Q-probe (Li et al., ICML 2024): a probe Q_θ on embeddings of (prompt, completion) of a frozen
model, and best-of-k decoding π_{θ,k} by softmax(Q_θ/β) over k samples. Works on models reachable
only through an API: sampling and embeddings can both come from OpenAI-compatible endpoints.

    python -m qalign.probe --config configs/probe_demo.yaml

Imports are lazy so that ``qalign.probe.config`` stays cheap (no torch) for config validation.
"""

from __future__ import annotations

from qalign._lazy import lazy_exports

_EXPORTS = {
    "ProbeArguments": "qalign.probe.config",
    "parse_probe_args": "qalign.probe.config",
    "ApiClient": "qalign.openai_http",
    "ApiError": "qalign.openai_http",
    "Secret": "qalign.openai_http",
    "Embedder": "qalign.probe.embedders",
    "HiddenStateEmbedder": "qalign.probe.embed_local",
    "SentenceTransformerEmbedder": "qalign.probe.embed_local",
    "OpenAIEmbedder": "qalign.probe.embed_api",
    "EmbeddingServer": "qalign.probe.embed_api",
    "EmbeddingCache": "qalign.probe.embed_cache",
    "Candidate": "qalign.probe.sampling",
    "EngineSampler": "qalign.probe.sampling",
    "OpenAISampler": "qalign.probe.sampling",
    "Probe": "qalign.probe.models",
    "ProbeData": "qalign.probe.train",
    "ProbeTrainConfig": "qalign.probe.train",
    "train_probe": "qalign.probe.train",
    "best_of_k_curve": "qalign.probe.evaluate",
    "mean_reward": "qalign.probe.evaluate",
    "BestOfKPolicy": "qalign.probe.policy",
    "run": "qalign.probe.pipeline",
}

__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
