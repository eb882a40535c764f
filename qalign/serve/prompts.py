"""From a request to the prompt texts a policy samples, with their lengths checked against the context.

Chat messages are rendered by ``qalign.data.prompts.render_prompt``, the one path that renders training,
collection and evaluation prompts: a Q# value model or a Q-probe was fitted on prompts rendered there, so a
served chat request reaches the policy as the very text it was trained on (the tokenizer's chat template
with ``add_generation_prompt=True``; qalign's plain rendering for a tokenizer without a template).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qalign.data.prompts import render_prompt
from qalign.serve.errors import ServeError, bad_request

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from qalign.policies import Policy

# transformers sets model_max_length to int(1e30) when a tokenizer does not know its model's context.
_UNKNOWN_LENGTH = 10**9


def context_length(policy: Policy) -> int | None:
    """The longest prompt + completion the policy's model takes, or None when it cannot be found.

    The model's own limit comes first: ``max_position_embeddings`` of an HF model (plain, guided, or a
    best-of-k sampler's engine), vLLM's ``max_model_len``. ``tokenizer.model_max_length`` is only a
    fallback: it is often unset (a 1e30 placeholder) or copied from another model.
    """
    holders: list[Any] = [policy]  # the policy, its engine or sampler, the sampler's engine, …
    for holder in holders:
        for name in ("engine", "sampler"):
            child = getattr(holder, name, None)
            if child is not None and all(child is not h for h in holders):
                holders.append(child)
    for holder in holders:
        length = _engine_length(holder)
        if length:
            return length
    tokenizer_length = getattr(getattr(policy, "tokenizer", None), "model_max_length", None)
    if isinstance(tokenizer_length, int) and 0 < tokenizer_length < _UNKNOWN_LENGTH:
        return tokenizer_length
    return None


def _engine_length(holder: Any) -> int | None:
    config = getattr(getattr(holder, "model", None), "config", None)
    if config is not None:
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        length = getattr(text_config, "max_position_embeddings", None)
        if isinstance(length, int) and length > 0:
            return length
    llm_engine = getattr(getattr(holder, "llm", None), "llm_engine", None)  # qalign.rollout.vllm_engine
    length = getattr(getattr(llm_engine, "model_config", None), "max_model_len", None)
    return length if isinstance(length, int) and length > 0 else None


@dataclass
class PreparedPrompts:
    """Rendered prompts, their token counts, and the completion budget every one of them fits."""

    texts: list[str]
    token_counts: list[int]
    max_tokens: int


class PromptPreparer:
    """Renders, counts and checks prompts in the event loop, with its own copy of the policy's tokenizer.

    A Rust-backed fast tokenizer may refuse (``Already borrowed``) to be used by two threads at once, and
    the policy tokenizes in the worker thread while requests are prepared here: hence the copy.

    Args:
        tokenizer: the policy's tokenizer (copied).
        context: the model's context length (prompt + completion), None when unknown (only max_tokens ≥ 1 is
            checked then).
        default_chat_max_tokens: a chat request without ``max_tokens`` gets the rest of the context, at most
            this (OpenAI's chat default is the rest of the context; a cap keeps one request from holding
            the policy for minutes). Completions default to 16 tokens, OpenAI's default.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, context: int | None, default_chat_max_tokens: int = 512):
        self.tokenizer = copy.deepcopy(tokenizer)
        self.context = context
        self.default_chat_max_tokens = default_chat_max_tokens

    def count(self, text: str) -> int:
        """Tokens of a rendered prompt, with the rule ``EnginePolicy.sample`` encodes by: a chat-templated
        prompt holds its special tokens; plain text gets the tokenizer's BOS, if it adds one."""
        add_special = not getattr(self.tokenizer, "chat_template", None)
        return len(self.tokenizer(text, add_special_tokens=add_special)["input_ids"])

    def render_chat(self, turns: list[dict[str, str]]) -> str:
        try:
            return render_prompt(self.tokenizer, "", messages=turns)
        except Exception as error:  # a template may refuse an order of roles (e.g. two user turns in a row)
            raise bad_request(f"messages: the chat template refused them: {error}", "messages") from None

    def prepare(self, texts: list[str], max_tokens: int | None, chat: bool, field: str) -> PreparedPrompts:
        """Count ``texts`` and settle ``max_tokens``; 400 when a prompt is empty or prompt + completion
        exceeds the context. ``field`` names the prompt in errors (``prompt`` or ``messages``)."""
        if max_tokens is not None and max_tokens < 1:
            raise bad_request(f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
        counts = [self.count(text) for text in texts]
        if min(counts) == 0:
            raise bad_request(f"{field}: the prompt is empty (0 tokens); the model needs at least one token", field)
        longest = max(counts)
        context = self.context
        if context is not None and longest >= context:
            raise ServeError(
                400,
                f"This model's maximum context length is {context} tokens; the prompt alone has {longest}, "
                "which leaves no room for a completion. Shorten the prompt.",
                field,
                "context_length_exceeded",
            )
        if max_tokens is None:
            max_tokens = 16 if not chat else self.default_chat_max_tokens
            if context is not None:
                max_tokens = min(max_tokens, context - longest)
        elif context is not None and longest + max_tokens > context:
            raise ServeError(
                400,
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{longest + max_tokens} tokens ({longest} in the prompt, {max_tokens} in the completion). "
                f"Reduce the prompt or max_tokens (at most {context - longest} here).",
                "max_tokens",
                "context_length_exceeded",
            )
        return PreparedPrompts(texts, counts, max_tokens)
