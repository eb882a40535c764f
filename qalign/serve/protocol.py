"""The request bodies of ``/v1/completions`` and ``/v1/chat/completions``, and which OpenAI fields are served.

A field the server cannot honour must not be dropped silently: a client asking for ``logprobs`` or a
``presence_penalty`` would get an answer that looks right and is not what it asked for. So every field of
OpenAI's API is in one of three groups:

* served: ``model``, ``prompt``/``messages``, ``n``, ``max_tokens`` (``max_completion_tokens`` for chat),
  ``temperature``, ``top_p``, ``top_k`` (vLLM's extension), ``seed``, ``stop``, ``stream``;
* harmless, accepted and ignored: ``user``, ``metadata``, ``store``, ``service_tier``, … and
  ``stream_options`` (its ``include_usage`` is honoured);
* result-changing, refused with 400 naming the field unless left at its neutral value (``logprobs``,
  ``echo``, ``best_of``, ``suffix``, ``logit_bias``, penalties, ``tools``, ``response_format``, …).

Anything else is refused as an unrecognised argument, as OpenAI does.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from qalign.serve.errors import ServeError, bad_request, validation_message

# torch.manual_seed (HF engines) and torch.Generator.manual_seed (best-of-k) accept this range.
SEED_RANGE = (-(2**63), 2**64 - 1)
MAX_N = 128  # OpenAI's own limit: n samples cost n times the compute of one


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class _SamplingFields(BaseModel):
    """Fields both endpoints share. Extra keys are kept (``model_extra``) for ``check_fields``."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = None  # None: the served model (vLLM's leniency; OpenAI requires it)
    n: int = 1
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    def stop_list(self) -> list[str] | None:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s] or None  # an empty stop string would end every completion at once


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]

    def prompts(self) -> list[str]:
        """The prompt texts; token-id prompts (lists of ints) are refused: policies take rendered text."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise bad_request("prompt: an empty list has no prompt to complete", "prompt")
        if not all(isinstance(p, str) for p in prompt):
            raise bad_request(
                "prompt: token-id prompts are not supported; send the prompt as text (a string or a list of strings)",
                "prompt",
                "unsupported_parameter",
            )
        return list(prompt)  # type: ignore[arg-type]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    """One chat turn. Tool calls, images and audio are not served: their fields are refused (extra=forbid)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[Message]
    max_completion_tokens: int | None = None

    def turns(self) -> list[dict[str, str]]:
        """The messages as qalign renders them; OpenAI's ``developer`` role is a system message to a chat
        template (templates know ``system``, few know ``developer``)."""
        if not self.messages:
            raise bad_request("messages: at least one message is needed", "messages")
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


R = TypeVar("R", bound=_SamplingFields)

# ----------------------------------------------------------------------------- fields outside the served set

_neutral = lambda *values: lambda v, body: any(v is x or (type(v) is type(x) and v == x) for x in values)

# Accepted and ignored: they change nothing about the sampled text.
HARMLESS = {
    "user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier",
    "parallel_tool_calls",  # only meaningful with tools, which are refused
}  # fmt: skip

# Refused unless the value is the neutral one (what sending nothing means).
RESULT_CHANGING: dict[str, Callable[[Any, dict[str, Any]], bool]] = {
    "logprobs": _neutral(None, False),  # completions' logprobs=0 still returns log-probs: only null passes
    "top_logprobs": _neutral(None, 0),
    "echo": _neutral(None, False),
    "best_of": lambda v, body: v is None or v == body.get("n", 1),  # best_of == n picks nothing
    "suffix": _neutral(None, ""),
    "logit_bias": _neutral(None, {}),
    "presence_penalty": _neutral(None, 0, 0.0),
    "frequency_penalty": _neutral(None, 0, 0.0),
    "repetition_penalty": _neutral(None, 1, 1.0),
    "tools": _neutral(None, []),
    "functions": _neutral(None, []),
    "tool_choice": _neutral(None, "none", "auto"),  # no tools: neither makes the model call one
    "function_call": _neutral(None, "none", "auto"),
    "response_format": lambda v, body: v is None or v == {"type": "text"},
    "modalities": lambda v, body: v is None or v == ["text"],
    "audio": _neutral(None),
    "prediction": _neutral(None),
    "reasoning_effort": _neutral(None),
    "verbosity": _neutral(None),
    "web_search_options": _neutral(None),
    "min_tokens": _neutral(None, 0),
}


def check_fields(request: _SamplingFields, body: dict[str, Any]) -> None:
    """Refuse extra fields that would change the result, and fields this server does not know."""
    for name, value in (request.model_extra or {}).items():
        if name in HARMLESS:
            continue
        if name in RESULT_CHANGING:
            if not RESULT_CHANGING[name](value, body):
                raise ServeError(
                    400,
                    f"{name}={json.dumps(value)[:80]} is not supported by this server (qalign serve returns "
                    f"sampled text only); omit {name!r} or send its default",
                    name,
                    "unsupported_parameter",
                )
            continue
        raise ServeError(400, f"Unrecognized request argument supplied: {name}", name, "unknown_parameter")


def parse_request(raw: bytes, cls: type[R]) -> R:
    """The validated request in ``raw``, or a 400 ``ServeError`` saying which field is wrong and why."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ServeError(400, f"the request body is not valid JSON: {error}", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise ServeError(400, "the request body must be a JSON object", None, "invalid_json")
    try:
        request = cls.model_validate(body)
    except ValidationError as error:
        message, param = validation_message(error.errors(include_url=False))
        raise bad_request(message, param, "invalid_type") from None
    check_fields(request, body)
    return request
