"""Candidates a_1..a_k ~ p0(·|x): through a qalign rollout engine, or an OpenAI-compatible API.

Q-probe needs only samples and embeddings of the base model, so the API path (``/v1/completions``
or ``/v1/chat/completions`` of any OpenAI-compatible server) is as good a sampler as a local engine.
Both return ``Candidate``s: the prompt text the embedder sees, and the ``Completion``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from qalign.openai_http import ApiClient, ApiError, secret_from_env
from qalign.rollout.base import Completion, RolloutEngine, SamplingConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Prompt = str | list[int]  # rendered prompt text, or its token ids


@dataclass
class Candidate:
    """One sample a of one prompt x, as the probe sees it.

    ``prompt`` is the text the embedder joins with the completion: the rendered prompt (engine and
    completions API) or the user message (chat API, where the server applies the template).
    ``completion.prompt_ids``/``completion_ids`` are filled when the sampler knows them (local engine);
    text-only APIs leave them empty and local embedders tokenize the text.
    """

    prompt: str
    completion: Completion

    @property
    def text(self) -> str:
        return self.completion.text


class CandidateSampler(Protocol):
    """Draws ``sampling.n`` candidates per prompt; result[i] belongs to prompts[i]."""

    def sample(self, prompts: Sequence[Prompt], sampling: SamplingConfig) -> list[list[Candidate]]: ...

    def describe(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Token ids of a rendered prompt. A chat-templated prompt already holds its special tokens;
    plain text gets the BOS a base model was trained with (as ``qalign.eval`` does)."""
    add_special = not getattr(tokenizer, "chat_template", None)
    return tokenizer(prompt, add_special_tokens=add_special)["input_ids"]


class EngineSampler:
    """Candidates from any ``RolloutEngine`` (HF generate, vLLM in-process, vLLM servers)."""

    def __init__(self, engine: RolloutEngine, tokenizer: PreTrainedTokenizerBase, description: dict | None = None):
        self.engine = engine
        self.tokenizer = tokenizer
        self._description = {"kind": "engine", "engine": type(engine).__name__, **(description or {})}

    def sample(self, prompts: Sequence[Prompt], sampling: SamplingConfig) -> list[list[Candidate]]:
        ids = [list(p) if not isinstance(p, str) else encode_prompt(self.tokenizer, p) for p in prompts]
        texts = [p if isinstance(p, str) else self.tokenizer.decode(p, skip_special_tokens=False) for p in prompts]
        groups = self.engine.generate(ids, sampling)
        return [[Candidate(text, c) for c in group] for text, group in zip(texts, groups)]

    def describe(self) -> dict[str, Any]:
        return dict(self._description)

    def close(self) -> None:
        self.engine.close()


class OpenAISampler:
    """Candidates from an OpenAI-compatible ``/v1/completions`` or ``/v1/chat/completions`` endpoint.

    One request per prompt asks for all ``sampling.n`` samples; up to ``max_concurrency`` requests
    run at once, each retried with backoff (see ``ApiClient``). With a seed, prompt i is sent
    ``seed + i`` so that equal prompts still get different samples.

    Args:
        endpoint: ``"completions"`` (the prompt is sent as rendered; token ids are accepted too) or
            ``"chat"`` (each prompt is the user message; the server applies its chat template).
        api_key_env: name of the environment variable holding the key (None: no key).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        endpoint: Literal["completions", "chat"] = "completions",
        api_key_env: str | None = None,
        *,
        max_concurrency: int = 4,
        max_retries: int = 6,
        timeout: float = 120.0,
        backoff_base: float = 0.5,
        system_prompt: str | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ):
        if endpoint not in ("completions", "chat"):
            raise ValueError(f"endpoint must be 'completions' or 'chat', got {endpoint!r}")
        self.model = model
        self.endpoint = endpoint
        self.system_prompt = system_prompt
        self.tokenizer = tokenizer  # only to decode token-id prompts for the embedder
        self.client = ApiClient(
            base_url, secret_from_env(api_key_env, "sampler"), timeout=timeout, max_retries=max_retries,
            backoff_base=backoff_base, max_concurrency=max_concurrency,
        )  # fmt: skip

    def describe(self) -> dict[str, Any]:
        return {"kind": f"openai_{self.endpoint}", "base_url": self.client.base_url, "model": self.model}

    def _body(self, prompt: Prompt, sampling: SamplingConfig, seed: int | None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model, "n": sampling.n, "temperature": sampling.temperature,
            "top_p": sampling.top_p, "max_tokens": sampling.max_tokens,
        }  # fmt: skip
        if self.endpoint == "chat":
            messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
            body["messages"] = [*messages, {"role": "user", "content": self._text(prompt)}]
        else:
            body["prompt"] = prompt
        if sampling.top_k > 0:
            body["top_k"] = sampling.top_k  # an extension (vLLM and others); OpenAI itself has no top_k
        if seed is not None:
            body["seed"] = seed
        if sampling.stop:
            body["stop"] = list(sampling.stop)
        return body

    def _text(self, prompt: Prompt) -> str:
        if isinstance(prompt, str):
            return prompt
        if self.tokenizer is None:
            raise ValueError("token-id prompts need a tokenizer to be decoded for the embedder")
        return self.tokenizer.decode(prompt, skip_special_tokens=False)

    def sample(self, prompts: Sequence[Prompt], sampling: SamplingConfig) -> list[list[Candidate]]:
        path = "/chat/completions" if self.endpoint == "chat" else "/completions"
        bodies = [
            self._body(p, sampling, None if sampling.seed is None else sampling.seed + i) for i, p in enumerate(prompts)
        ]
        results: list[list[Candidate] | None] = [None] * len(prompts)
        for index, response in self.client.map(lambda body: self.client.post(path, body), bodies):
            choices = sorted(response.get("choices", []), key=lambda c: c.get("index", 0))
            if len(choices) != sampling.n:
                raise ApiError(f"{path} returned {len(choices)} choices for n={sampling.n}")
            prompt = prompts[index]
            prompt_ids = [] if isinstance(prompt, str) else list(prompt)
            results[index] = [
                Candidate(self._text(prompt), Completion(prompt_ids, [], _choice_text(c), [], _finish(c)))
                for c in choices
            ]
        return results  # type: ignore[return-value]

    def close(self) -> None:
        self.client.close()


def _choice_text(choice: dict[str, Any]) -> str:
    if "message" in choice:
        return (choice["message"] or {}).get("content") or ""
    return choice.get("text") or ""


def _finish(choice: dict[str, Any]) -> str:
    # qalign's Completion knows "stop" and "length"; others (tool_calls, content_filter) end the text too.
    reason = choice.get("finish_reason") or "length"
    return "length" if reason == "length" else "stop"
