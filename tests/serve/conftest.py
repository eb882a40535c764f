"""Fixtures for the server tests: a real uvicorn server on 127.0.0.1 in a background thread, the tiny
model as a policy (with a chat template, so chat requests go through one), and an instant fake policy for
the batching and failure tests, where a model would only add time."""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qalign.rollout.base import Completion, SamplingConfig
from qalign.server_process import free_port
from tests.needs import require
from tests.threads import one_torch_thread

# The server's stack (pip install ".[serve]") and the client the tests talk to it with.
for module in ("fastapi", "uvicorn", "openai"):
    require(module)

# A template in the usual shape (role markers, generation prompt), written for the byte-level tiny tokenizer.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    with one_torch_thread():
        yield


@contextlib.contextmanager
def running_server(app, log_config: dict | None = None, log_level: str = "warning") -> Iterator[str]:
    """``app`` served by uvicorn on a free loopback port; yields the base URL (``…/v1``), stops on exit."""
    import uvicorn

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level=log_level, log_config=log_config)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        assert not thread.is_alive(), "the test server did not stop"


def client(base_url: str, api_key: str = "unused", **kwargs):
    import openai

    return openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=60, **kwargs)


@pytest.fixture(scope="session")
def chat_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with a chat template in its tokenizer."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tiny-chat")
    for item in tiny_model_dir.iterdir():
        shutil.copy(item, folder / item.name)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


def hf_policy(folder: Path):
    """An ``EnginePolicy`` over ``HFEngine`` of the model in ``folder``, built by hand."""
    from qalign.models import load_model, load_tokenizer
    from qalign.policies import EnginePolicy
    from qalign.rollout.hf import HFEngine

    tokenizer = load_tokenizer(str(folder))
    model = load_model(str(folder)).eval()
    return EnginePolicy(HFEngine(model, tokenizer), tokenizer, {"kind": "model", "model": str(folder)})


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from qalign.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


class EchoPolicy:
    """Answers instantly: completion j of prompt p is ``"<p>|<j>"`` re-encoded, finish "stop".

    ``calls`` holds every call's prompts; a prompt containing ``fail_on`` makes the whole call raise
    (with ``secret`` in the message, if given: the server must not pass it on)."""

    def __init__(self, tokenizer, fail_on: str = "BOOM", secret: str = "", delay: float = 0.0):
        self.tokenizer = tokenizer
        self.fail_on = fail_on
        self.secret = secret
        self.delay = delay
        self.calls: list[list[str]] = []

    def describe(self) -> dict:
        return {"kind": "echo"}

    def sample(self, prompts: list[str], sampling: SamplingConfig) -> list[list[Completion]]:
        self.calls.append(list(prompts))
        time.sleep(self.delay)
        if any(self.fail_on in p for p in prompts):
            raise RuntimeError(f"the policy broke on purpose {self.secret}")
        groups = []
        for prompt in prompts:
            ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            group = []
            for j in range(sampling.n):
                text = f"{prompt}|{j}"
                out = self.tokenizer(text, add_special_tokens=False)["input_ids"][: sampling.max_tokens]
                group.append(Completion(ids, out, self.tokenizer.decode(out), [], "stop"))
            groups.append(group)
        return groups

    def close(self) -> None:
        pass
