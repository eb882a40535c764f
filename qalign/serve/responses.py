"""Policy completions → OpenAI response bodies and server-sent-event streams.

Streaming: a qalign policy returns whole completions (a best-of-k policy can only choose once all k
candidates are finished), so a streamed answer starts when its completion is ready and then sends that
completion's tokens as chunks, one per token, in OpenAI's chunk format, ending with ``data: [DONE]``. A
client gets the same text, the same way, as from a server that streams while decoding, only later.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qalign.rollout.base import Completion

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class Choice:
    """One returned answer: its text (cut at a stop string), finish reason and token ids."""

    index: int
    text: str
    finish_reason: str
    completion_ids: list[int]


def cut_at_stop(text: str, stop: list[str] | None) -> tuple[str, bool]:
    """``text`` up to the first stop string (excluded, as OpenAI returns it), and whether one was found.

    Engines stop *after* the token that completes a stop string, so the raw text ends with it (and a
    token may run past it)."""
    if not stop:
        return text, False
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def make_choices(
    groups: list[list[Completion | str]], stop: list[str] | None, tokenizer: PreTrainedTokenizerBase
) -> list[Choice]:
    """Choices in OpenAI's order: prompt i's j-th completion is choice ``i * n + j``.

    ``Policy.sample`` may return plain strings (a text-only policy): their ids are the text re-encoded."""
    choices = []
    for group in groups:
        for item in group:
            if isinstance(item, str):
                item = Completion([], tokenizer(item, add_special_tokens=False)["input_ids"], item, [], "stop")
            text, stopped = cut_at_stop(item.text, stop)
            finish = "stop" if stopped or item.finish_reason == "stop" else "length"
            choices.append(Choice(len(choices), text, finish, list(item.completion_ids)))
    return choices


def usage(prompt_tokens: list[int], choices: list[Choice]) -> dict[str, int]:
    """OpenAI's usage: each prompt counted once (not once per sample), every returned completion's tokens
    (those the model generated, EOS and a stop string's tokens included)."""
    prompt = sum(prompt_tokens)
    completion = sum(len(c.completion_ids) for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


@dataclass
class ResponseHead:
    """What every body and chunk of one response repeats."""

    id: str
    created: int
    model: str

    @classmethod
    def new(cls, prefix: str, model: str) -> ResponseHead:
        return cls(new_id(prefix), int(time.time()), model)


def completion_body(head: ResponseHead, choices: list[Choice], used: dict[str, int]) -> dict[str, Any]:
    return {
        "id": head.id,
        "object": "text_completion",
        "created": head.created,
        "model": head.model,
        "choices": [
            {"index": c.index, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason} for c in choices
        ],
        "usage": used,
    }


def chat_body(head: ResponseHead, choices: list[Choice], used: dict[str, int]) -> dict[str, Any]:
    return {
        "id": head.id,
        "object": "chat.completion",
        "created": head.created,
        "model": head.model,
        "choices": [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": None,
                "finish_reason": c.finish_reason,
            }
            for c in choices
        ],
        "usage": used,
    }


# ----------------------------------------------------------------------------- streaming


def text_pieces(tokenizer: PreTrainedTokenizerBase, ids: list[int], text: str) -> list[str]:
    """``text`` split at token boundaries: piece t is what token t adds to the decoded text.

    Decoding token by token is wrong for tokens that hold part of a character (byte-level BPE) and for
    tokenizers that drop a leading space (SentencePiece), so each token's text is the difference between
    decoding a short window of ids with and without it, held back while it ends in an incomplete
    character. The pieces always join to exactly ``text`` (which may have been cut at a stop string):
    a piece that would not continue ``text`` ends the token-wise split, and the rest goes as one piece.
    """
    pieces: list[str] = []
    emitted = 0
    prefix_start, read_start = 0, 0
    for t in range(len(ids)):
        before = tokenizer.decode(ids[prefix_start:read_start], skip_special_tokens=True)
        after = tokenizer.decode(ids[prefix_start : t + 1], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith("\ufffd") or not after.startswith(before):
            continue  # a special token, or part of a character: wait for the next token
        delta = after[len(before) :]
        if not text.startswith(delta, emitted):
            break
        pieces.append(delta)
        emitted += len(delta)
        prefix_start, read_start = read_start, t + 1
    if emitted < len(text):
        pieces.append(text[emitted:])
    return pieces


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


def completion_stream(
    head: ResponseHead,
    choices: list[Choice],
    used: dict[str, int],
    tokenizer: PreTrainedTokenizerBase,
    include_usage: bool,
) -> Iterator[str]:
    """Chunks of ``/v1/completions`` (``object: text_completion``), choice after choice."""
    base = {"id": head.id, "object": "text_completion", "created": head.created, "model": head.model}
    extra = {"usage": None} if include_usage else {}
    for choice in choices:
        for piece in text_pieces(tokenizer, choice.completion_ids, choice.text):
            row = {"index": choice.index, "text": piece, "logprobs": None, "finish_reason": None}
            yield sse({**base, "choices": [row], **extra})
        row = {"index": choice.index, "text": "", "logprobs": None, "finish_reason": choice.finish_reason}
        yield sse({**base, "choices": [row], **extra})
    if include_usage:
        yield sse({**base, "choices": [], "usage": used})
    yield sse("[DONE]")


def chat_stream(
    head: ResponseHead,
    choices: list[Choice],
    used: dict[str, int],
    tokenizer: PreTrainedTokenizerBase,
    include_usage: bool,
) -> Iterator[str]:
    """Chunks of ``/v1/chat/completions`` (``object: chat.completion.chunk``): per choice a first delta
    with the role, one delta per token, and an empty delta with the finish reason."""
    base = {"id": head.id, "object": "chat.completion.chunk", "created": head.created, "model": head.model}
    extra = {"usage": None} if include_usage else {}

    def chunk(index: int, delta: dict[str, str], finish: str | None = None) -> str:
        row = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        return sse({**base, "choices": [row], **extra})

    for choice in choices:
        yield chunk(choice.index, {"role": "assistant", "content": ""})
        for piece in text_pieces(tokenizer, choice.completion_ids, choice.text):
            yield chunk(choice.index, {"content": piece})
        yield chunk(choice.index, {}, choice.finish_reason)
    if include_usage:
        yield sse({**base, "choices": [], "usage": used})
    yield sse("[DONE]")
