"""``qalign serve``: any qalign policy behind an OpenAI-compatible HTTP API.

    python -m qalign.serve --policy outputs/qsharp_demo --port 8000
    # then any OpenAI client: base_url="http://127.0.0.1:8000/v1", model="outputs/qsharp_demo"

A plain model, a LoRA adapter, a Q# guided policy and a Q-probe best-of-k policy are all served the same
way: ``qalign.policies.load_policy`` loads them, ``build_app`` puts them behind ``/v1/completions`` and
``/v1/chat/completions``. See docs/serve.md. Imports are lazy so that ``python -m qalign.serve`` can
check its arguments before FastAPI or torch are imported.
"""

from __future__ import annotations

from qalign._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(
    __name__,
    {
        "build_app": "qalign.serve.app",
        "MicroBatcher": "qalign.serve.batching",
        "ServeError": "qalign.serve.errors",
    },
)
