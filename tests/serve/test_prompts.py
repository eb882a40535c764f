"""Context length discovery and the completion budget a request gets."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from qalign.serve.errors import ServeError
from qalign.serve.prompts import PromptPreparer, context_length


def test_context_length_comes_from_the_model_then_the_tokenizer():
    hf = SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(max_position_embeddings=512)))
    vllm = SimpleNamespace(
        llm=SimpleNamespace(llm_engine=SimpleNamespace(model_config=SimpleNamespace(max_model_len=2048)))
    )
    unset = SimpleNamespace(model_max_length=int(1e30))  # transformers' placeholder
    assert context_length(SimpleNamespace(engine=hf, tokenizer=SimpleNamespace(model_max_length=8192))) == 512
    assert context_length(SimpleNamespace(engine=vllm, tokenizer=unset)) == 2048
    best_of_k = SimpleNamespace(sampler=SimpleNamespace(engine=hf), tokenizer=unset)  # the sampler's engine
    assert context_length(best_of_k) == 512
    assert context_length(SimpleNamespace(tokenizer=SimpleNamespace(model_max_length=4096))) == 4096
    assert context_length(SimpleNamespace(tokenizer=unset)) is None


def test_default_budgets_and_limits(tiny_tokenizer):
    preparer = PromptPreparer(tiny_tokenizer, context=40, default_chat_max_tokens=30)
    prompt = "What is 3 + 4?"
    count = preparer.count(prompt)
    assert count == len(tiny_tokenizer(prompt)["input_ids"])
    assert preparer.prepare([prompt], None, chat=False, field="prompt").max_tokens == 16  # OpenAI's default
    assert preparer.prepare([prompt], None, chat=True, field="messages").max_tokens == min(30, 40 - count)
    assert preparer.prepare([prompt], 40 - count, chat=False, field="prompt").max_tokens == 40 - count
    with pytest.raises(ServeError) as raised:
        preparer.prepare([prompt], 41 - count, chat=False, field="prompt")
    assert raised.value.code == "context_length_exceeded" and raised.value.param == "max_tokens"
    unbounded = PromptPreparer(tiny_tokenizer, context=None)
    assert unbounded.prepare([prompt], 10**6, chat=False, field="prompt").max_tokens == 10**6
    assert unbounded.prepare([prompt], None, chat=True, field="messages").max_tokens == 512
    assert unbounded.tokenizer is not tiny_tokenizer  # its own copy, for the event loop's thread
