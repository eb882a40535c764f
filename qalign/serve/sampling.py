"""A request's sampling fields, checked, as the ``SamplingConfig`` every qalign policy takes.

Ranges are checked here, with a 400 naming the field, rather than left to ``SamplingConfig``'s own
checks or to the engine: a ``ValueError`` raised in the worker thread would reach the client as a 500,
and a bad request must never look like a server failure.
"""

from __future__ import annotations

import math

from qalign.rollout.base import SamplingConfig
from qalign.serve.errors import bad_request
from qalign.serve.protocol import MAX_N, SEED_RANGE, ChatCompletionRequest, CompletionRequest


def requested_max_tokens(request: CompletionRequest | ChatCompletionRequest) -> int | None:
    """``max_tokens``, or chat's newer ``max_completion_tokens`` (the same limit; both must agree)."""
    if isinstance(request, ChatCompletionRequest) and request.max_completion_tokens is not None:
        if request.max_tokens is not None and request.max_tokens != request.max_completion_tokens:
            raise bad_request(
                f"max_tokens ({request.max_tokens}) and max_completion_tokens ({request.max_completion_tokens}) "
                "disagree; send one of them",
                "max_completion_tokens",
            )
        if request.max_completion_tokens < 1:
            raise bad_request(
                f"max_completion_tokens must be at least 1, got {request.max_completion_tokens}",
                "max_completion_tokens",
            )
        return request.max_completion_tokens
    return request.max_tokens


def check_sampling(request: CompletionRequest | ChatCompletionRequest) -> None:
    """400 for a value no policy can sample with: n < 1 (or above OpenAI's 128), temperature < 0,
    top_p outside (0, 1], top_k < -1, a seed torch cannot take."""
    if not 1 <= request.n <= MAX_N:
        raise bad_request(f"n must be between 1 and {MAX_N}, got {request.n}", "n")
    if not math.isfinite(request.temperature) or request.temperature < 0:
        raise bad_request(f"temperature must be >= 0, got {request.temperature}", "temperature")
    if not (math.isfinite(request.top_p) and 0 < request.top_p <= 1):
        raise bad_request(f"top_p must be in (0, 1], got {request.top_p}", "top_p")
    if request.top_k is not None and request.top_k < -1:
        raise bad_request(f"top_k must be >= 1, or 0 / -1 for no top-k, got {request.top_k}", "top_k")
    if request.seed is not None and not SEED_RANGE[0] <= request.seed <= SEED_RANGE[1]:
        raise bad_request(f"seed must be in [{SEED_RANGE[0]}, {SEED_RANGE[1]}], got {request.seed}", "seed")


def sampling_config(request: CompletionRequest | ChatCompletionRequest, max_tokens: int) -> SamplingConfig:
    """The checked request as a ``SamplingConfig`` (vLLM's top_k = -1 is qalign's 0: no top-k)."""
    return SamplingConfig(
        n=request.n,
        temperature=request.temperature,
        top_p=request.top_p,
        top_k=max(request.top_k or 0, 0),
        max_tokens=max_tokens,
        seed=request.seed,
        stop=request.stop_list(),
    )
