"""The policy interface the eval loop samples from, and its plain implementation over an engine.

It sits below ``qalign.eval``, ``qalign.decoding``, ``qalign.probe`` and ``qalign.compare`` so that
each can build or accept a policy without importing the others: a guided Q# sampler is an
``EnginePolicy`` over a ``GuidedEngine``, a Q-probe ``BestOfKPolicy`` satisfies ``Policy``
structurally, and the eval runner only ever sees ``Policy``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from qalign.rollout.base import Completion, RolloutEngine, SamplingConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["EnginePolicy", "Policy"]


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
