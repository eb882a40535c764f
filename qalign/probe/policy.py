"""π_{θ,k}: draw k candidates from p0, score them with the probe, pick one by softmax(Q_θ/β).

``BestOfKPolicy`` is both a ``RolloutEngine`` (``generate(prompt_ids, sampling)``) and a
``qalign.policies.Policy`` (``sample(prompts, sampling)``, ``describe``, ``tokenizer``), so the eval loop
and anything that takes an engine can run it unchanged. Each of the ``sampling.n`` answers per
prompt is an independent draw of π_{θ,k}: k fresh candidates each.

Example::

    policy = BestOfKPolicy(EngineSampler(HFEngine(model, tok), tok), HiddenStateEmbedder(model, tok),
                           Probe.load("outputs/probe/probe_pg.pt"), k=8, beta=0.0)
    best = policy.generate([tok("What is 2 + 3?")["input_ids"]], SamplingConfig(max_tokens=32))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from qalign.losses.qprobe import best_of_k_weights
from qalign.probe.sampling import Candidate, CandidateSampler, Prompt
from qalign.rollout.base import Completion, SamplingConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from qalign.probe.embedders import Embedder
    from qalign.probe.models import Probe


@dataclass
class Selection:
    """One draw of π_{θ,k}: the k candidates, their probe values, and the index picked."""

    candidates: list[Candidate]
    q: torch.Tensor
    chosen: int


def select(q: torch.Tensor, beta: float, generator: torch.Generator | None = None) -> int:
    """Sample i ~ softmax(q/β) over ``(k,)`` probe values; β = 0 → argmax."""
    weights = best_of_k_weights(q.unsqueeze(0), beta)[0]
    if beta == 0:
        return int(weights.argmax())
    return int(torch.multinomial(weights, 1, generator=generator))


class BestOfKPolicy:
    """Best-of-k decoding with a Q-probe (Li et al. 2024, §4.1).

    Args:
        sampler: draws candidates from p0 (``EngineSampler`` or ``OpenAISampler``).
        embedder: φ(x, a) for the probe (the one it was trained on).
        probe: Q_θ.
        k: candidates per answer.
        beta: selection temperature β (0 = argmax: best-of-k by the probe).
        tokenizer: for ``qalign.eval`` (it renders prompts with it); None for text-only APIs.
        seed: seeds the softmax pick when ``sampling.seed`` is None.
        candidate_temperature: the temperature the candidates are drawn at, whatever the request's
            ``sampling.temperature`` (the probe was trained on samples of p0 at one temperature, and
            greedy candidates would all be the same one); None: the request's.
        server: an embedding server started for this policy (``EmbeddingServer``), stopped by ``close``.
    """

    def __init__(
        self,
        sampler: CandidateSampler,
        embedder: Embedder,
        probe: Probe,
        k: int,
        beta: float = 0.0,
        tokenizer: PreTrainedTokenizerBase | None = None,
        seed: int = 0,
        description: dict[str, Any] | None = None,
        candidate_temperature: float | None = None,
        server: Any = None,
    ):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.sampler = sampler
        self.embedder = embedder
        self.probe = probe.eval()
        self.k = k
        self.beta = beta
        self.tokenizer = tokenizer
        self.seed = seed
        if candidate_temperature is not None and candidate_temperature < 0:
            raise ValueError(f"candidate_temperature must be >= 0, got {candidate_temperature}")
        self.candidate_temperature = candidate_temperature
        self.server = server
        self._description = dict(description or {})
        self.last_selections: list[list[Selection]] = []  # per prompt, per answer: for inspection

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "qprobe_best_of_k", "k": self.k, "beta": self.beta,
            "candidate_temperature": self.candidate_temperature,
            "sampler": self.sampler.describe(), "embedder": self.embedder.describe(), **self._description,
        }  # fmt: skip

    @torch.no_grad()
    def choose(self, prompts: Sequence[Prompt], sampling: SamplingConfig) -> list[list[Selection]]:
        """``sampling.n`` draws of π_{θ,k} per prompt, with their candidates and scores."""
        inner = replace(sampling, n=sampling.n * self.k)
        if self.candidate_temperature is not None:
            inner = replace(inner, temperature=self.candidate_temperature)
        groups = self.sampler.sample(list(prompts), inner)
        flat = [c for group in groups for c in group]
        q = self.probe(self.embedder.embed(flat)) if flat else torch.empty(0)
        seed = self.seed if sampling.seed is None else sampling.seed
        generator = torch.Generator().manual_seed(seed)
        selections, offset = [], 0
        for group in groups:
            per_prompt = []
            for draw in range(sampling.n):
                candidates = group[draw * self.k : (draw + 1) * self.k]
                scores = q[offset + draw * self.k : offset + (draw + 1) * self.k]
                per_prompt.append(Selection(candidates, scores, select(scores, self.beta, generator)))
            selections.append(per_prompt)
            offset += len(group)
        self.last_selections = selections
        return selections

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[Completion]]:
        """``RolloutEngine.generate``: token-id prompts → ``sampling.n`` chosen completions each."""
        return [[s.candidates[s.chosen].completion for s in row] for row in self.choose(prompts, sampling)]

    def sample(self, prompts: list[str], sampling: SamplingConfig) -> list[list[Completion]]:
        """``qalign.policies.Policy``: rendered prompt texts → ``sampling.n`` chosen completions each."""
        return [[s.candidates[s.chosen].completion for s in row] for row in self.choose(prompts, sampling)]

    def sync_weights(self, model: torch.nn.Module) -> None:
        raise NotImplementedError("a Q-probe policy has a frozen base model: there are no weights to sync")

    def close(self) -> None:
        self.sampler.close()
        self.embedder.close()
        if self.server is not None:
            self.server.close()
