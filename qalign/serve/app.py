"""``build_app``: an OpenAI-compatible FastAPI app in front of any qalign ``Policy``.

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (behind the API key
when one is set) and ``GET /health`` (open, for load balancers and start-up checks). Each request is
checked completely (fields, values, context length) before it reaches the policy, so a bad request costs
no model time and never fails a batch it would have joined.

    app = build_app(load_policy("outputs/qsharp_demo"), "qsharp_demo")
    uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import contextlib
import logging
import time
import traceback
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from qalign.serve.auth import key_checker
from qalign.serve.batching import MicroBatcher
from qalign.serve.errors import Redactor, ServeError, install_error_handlers
from qalign.serve.prompts import PreparedPrompts, PromptPreparer, context_length
from qalign.serve.protocol import ChatCompletionRequest, CompletionRequest, parse_request
from qalign.serve.responses import (
    ResponseHead,
    chat_body,
    chat_stream,
    completion_body,
    completion_stream,
    make_choices,
    usage,
)
from qalign.serve.sampling import check_sampling, requested_max_tokens, sampling_config

if TYPE_CHECKING:
    from qalign.policies import Policy

logger = logging.getLogger("qalign.serve")


def build_app(
    policy: Policy,
    model_name: str,
    api_key: str | None = None,
    *,
    batch_window_ms: float = 5.0,
    max_batch_size: int = 32,
    context: int | None = None,
    default_chat_max_tokens: int = 512,
) -> FastAPI:
    """The server's app; the caller keeps ownership of ``policy`` (closes it after the server stops).

    Args:
        policy: any ``qalign.policies.Policy`` with a tokenizer (chat rendering and token counts need one).
        model_name: the id clients send as ``model`` and ``/v1/models`` lists.
        api_key: when set, ``/v1`` routes need ``Authorization: Bearer <api_key>``.
        batch_window_ms: how long a request waits for others to share its policy call; 0: no batching
            (see ``qalign.serve.batching``).
        max_batch_size: most prompts in one policy call.
        context: the model's context length; None: found from the policy (``prompts.context_length``).
        default_chat_max_tokens: cap on a chat request's completion when it sends no max_tokens.
    """
    tokenizer = getattr(policy, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("qalign serve needs a policy with a tokenizer (to render chats and count tokens)")
    if not model_name:
        raise ValueError("model_name must not be empty")
    preparer = PromptPreparer(tokenizer, context or context_length(policy), default_chat_max_tokens)
    batcher = MicroBatcher(policy.sample, batch_window_ms / 1000.0, max_batch_size)
    redact = Redactor(api_key)
    started = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await batcher.aclose()

    app = FastAPI(title="qalign serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = batcher
    app.state.preparer = preparer
    install_error_handlers(app, redact)
    authorized = [Depends(key_checker(api_key))]

    def check_model(requested: str | None) -> None:
        if requested is not None and requested != model_name:
            raise ServeError(
                404, f"The model {requested!r} does not exist; this server serves {model_name!r}", "model",
                "model_not_found",
            )  # fmt: skip

    async def answer(
        request: CompletionRequest | ChatCompletionRequest, prepared: PreparedPrompts, chat: bool
    ) -> Response:
        sampling = sampling_config(request, prepared.max_tokens)
        try:
            groups = await batcher.submit(prepared.texts, sampling)
        except ServeError:
            raise
        except Exception as error:
            # The traceback goes to the log (redacted), the one-line reason to the client.
            logger.error("the policy failed on a request:\n%s", redact("".join(traceback.format_exception(error))))
            raise ServeError(500, f"the policy failed: {type(error).__name__}: {error}", None, "policy_error") from None
        choices = make_choices(groups, sampling.stop, preparer.tokenizer)
        prompt_tokens = [
            len(group[0].prompt_ids) if group and getattr(group[0], "prompt_ids", None) else counted
            for group, counted in zip(groups, prepared.token_counts)
        ]
        used = usage(prompt_tokens, choices)
        head = ResponseHead.new("chatcmpl" if chat else "cmpl", model_name)
        if not request.stream:
            return JSONResponse((chat_body if chat else completion_body)(head, choices, used))
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        stream = chat_stream if chat else completion_stream
        # Built here, in the event loop: the pieces need the tokenizer, which is not for several threads.
        chunks = list(stream(head, choices, used, preparer.tokenizer, include_usage))
        return StreamingResponse(_send(chunks), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models", dependencies=authorized)
    async def models() -> dict:
        return {"object": "list", "data": [_model_card(model_name, started)]}

    @app.get("/v1/models/{model:path}", dependencies=authorized)
    async def model(model: str) -> dict:
        check_model(model)
        return _model_card(model_name, started)

    @app.post("/v1/completions", dependencies=authorized)
    async def completions(http: Request) -> Response:
        request = parse_request(await http.body(), CompletionRequest)
        check_model(request.model)
        check_sampling(request)
        prepared = preparer.prepare(request.prompts(), request.max_tokens, chat=False, field="prompt")
        return await answer(request, prepared, chat=False)

    @app.post("/v1/chat/completions", dependencies=authorized)
    async def chat_completions(http: Request) -> Response:
        request = parse_request(await http.body(), ChatCompletionRequest)
        check_model(request.model)
        check_sampling(request)
        max_tokens = requested_max_tokens(request)
        prompt = preparer.render_chat(request.turns())
        prepared = preparer.prepare([prompt], max_tokens, chat=True, field="messages")
        return await answer(request, prepared, chat=True)

    return app


def _model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "qalign"}


async def _send(chunks: list[str]) -> AsyncIterator[str]:
    for chunk in chunks:
        yield chunk
