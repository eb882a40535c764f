"""``push_to_hub`` of every trainer against a fake Hub (``tests/hub_server.py``), reached over real HTTP by the
installed ``huggingface_hub``. Each kind trains a step on the tiny model and pushes. The repo then holds the
method's own card and every file ``save_model`` writes, tensor for tensor (DQO's value function apart from the
weights; for Q#, the guided policy and value model only). The downloaded folder loads with
``qalign.policies.load_policy`` and samples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from qalign.models import load_model, load_tokenizer
from tests.hub_server import FakeHub
from tests.threads import one_torch_thread

# What each card must name: the method, its arXiv id and one of its own hyperparameters (spelled out here, not
# read from qalign.trainers.model_card).
CARDS = {"grpo": ("GRPO", "2402.03300", "num_generations"),
         "qae": ("QAE (GRPO with a K-quantile baseline)", "2509.22611", "quantile_k"),
         "shiq": ("ShiQ", "2505.11081", "shiq_residual"), "shiq_online": ("ShiQ", "2505.11081", "shiq_residual"),
         "dqo": ("DQO", "2410.09302", "lam"), "rft": ("RFT (rejection-sampling fine-tuning)", "2308.01825",
         "reward_threshold"), "qsharp": ("Q#", "2502.20548", "eta")}  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with one_torch_thread():
        yield


@pytest.fixture
def hub(monkeypatch):
    """A fresh fake Hub that ``huggingface_hub`` (and so every Trainer) talks to, with a fake token."""
    import huggingface_hub.constants as hub_constants
    import transformers.utils.hub as transformers_hub

    server = FakeHub()
    # huggingface_hub read HF_ENDPOINT and HF_HUB_OFFLINE (which conftest sets) when it was imported, so the
    # constants are patched instead. Trainer's shared HfApi is rebuilt on the fake endpoint.
    monkeypatch.setattr(hub_constants, "ENDPOINT", server.url)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(transformers_hub, "_hf_api", None)
    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    yield server
    server.close()
    assert server.unknown == []  # the client sent only requests a real push sends


def build(algorithm: str, model_dir: Path, rollouts: Path, output_dir: Path, **hub_args):
    """A tiny trainer of ``algorithm``, built as its own tests build it, with ``hub_args`` in its config and
    the card's base model and dataset set as ``qalign.train`` sets them."""
    from qalign.data.rollouts import load_rollouts

    if algorithm == "dqo":
        from tests.trainers.test_dqo import make_trainer

        trainer = make_trainer(model_dir, rollouts, output_dir, max_steps=1, **hub_args)
    elif algorithm == "shiq":
        from qalign.trainers.shiq import ShiQConfig, ShiQTrainer
        from tests.trainers.test_shiq import tiny_kwargs

        trainer = ShiQTrainer(model=load_model(str(model_dir)), args=ShiQConfig(**tiny_kwargs(output_dir, max_steps=1,
                              **hub_args)), train_dataset=load_rollouts(str(rollouts)),
                              processing_class=load_tokenizer(str(model_dir)))  # fmt: skip
    elif algorithm == "rft":
        from tests.trainers.test_rft import make_trainer

        trainer = make_trainer(model_dir, load_rollouts(str(rollouts)), output_dir, **hub_args)
    elif algorithm == "qsharp":
        from qalign.trainers.qsharp import QSharpTrainer
        from tests.trainers.helpers import tiny_prompt_dataset
        from tests.trainers.test_qsharp import even_first_token_reward, tiny_args

        args = tiny_args(output_dir, num_iterations=1, num_train_epochs=1, **hub_args)
        trainer = QSharpTrainer(str(model_dir), args, load_model(str(model_dir)), load_tokenizer(str(model_dir)),
                                tiny_prompt_dataset(4), [even_first_token_reward])  # fmt: skip
    else:  # grpo, qae, shiq_online
        from qalign.trainers.registry import config_class, trainer_class
        from tests.trainers.helpers import tiny_grpo_kwargs
        from tests.trainers.test_grpo import make_trainer

        config = config_class(algorithm)(**tiny_grpo_kwargs(output_dir, max_steps=1, **hub_args))
        trainer = make_trainer(trainer_class(algorithm), config, model_dir)
    trainer.card_base_model, trainer.card_dataset = str(model_dir), "arithmetic"
    return trainer


def files_in(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def tensors(content: bytes) -> dict:
    from safetensors.torch import load

    return load(content)


def check_pushed(algorithm: str, hub: FakeHub, repo: str, saved: dict[str, bytes], model_dir: Path, tmp_path: Path):
    """The repo holds the method's card and what the final ``save_model`` wrote (``saved``); it loads as a policy."""
    import torch

    from qalign.policies import load_policy
    from qalign.rollout.base import SamplingConfig

    pushed = hub.files(repo)
    card = pushed["README.md"].decode()
    front = yaml.safe_load(card.split("---\n")[1])
    assert algorithm in front["tags"]
    assert front["library_name"] == ("qalign" if algorithm == "qsharp" else "transformers")
    name, arxiv, key = CARDS[algorithm]
    assert f"# {repo}\n" in card and f"from `{model_dir}` on `arithmetic`." in card
    assert f"Trained with **{name}** ([arXiv {arxiv}](https://arxiv.org/abs/{arxiv}))" in card
    assert f"eprint  = {{arXiv:{arxiv}}}" in card and f"| `{key}` |" in card
    assert set(saved) <= set(pushed), sorted(set(saved) - set(pushed))
    for path, content in saved.items():
        if path.endswith(".safetensors"):
            expected, got = tensors(content), tensors(pushed[path])
            assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected), path
        elif path.endswith(".json"):
            assert json.loads(pushed[path]) == json.loads(content), path
    if algorithm == "dqo":  # V_φ apart: the weights are a plain causal LM's (vLLM refuses extra parameters)
        assert not any("value_head" in name for name in tensors(pushed["model.safetensors"]))
        value = tensors(pushed["value_function/model.safetensors"])
        assert set(value) == {"value_head.summary.weight", "value_head.summary.bias"}
    if algorithm == "qsharp":  # the guided policy and its card only: no roll-outs, no per-iteration copy
        assert set(pushed) == set(saved) | {"README.md"}
        assert json.loads(pushed["guided_policy.json"])["value_model"] == "value_model"
        assert f'load_guided_policy(snapshot_download("{repo}"))' in card
    policy = load_policy(str(hub.download(repo, tmp_path / "downloaded")))
    try:
        completions = policy.sample(["What is 2 + 3?\n"], SamplingConfig(n=1, temperature=0.0, max_tokens=3))
    finally:
        policy.close()
    assert len(completions) == 1 and len(completions[0][0].completion_ids) >= 1


@pytest.mark.parametrize("algorithm", sorted(CARDS))
def test_push_to_hub_uploads_the_card_and_what_save_model_writes(
    algorithm, hub, tiny_model_dir, tiny_rollouts, tmp_path
):
    repo = f"qalign-tester/{algorithm}-tiny"
    trainer = build(algorithm, tiny_model_dir, tiny_rollouts, tmp_path / "out", hub_model_id=repo)
    trainer.train()
    trainer.push_to_hub()
    assert hub.commits[repo] == ["End of training"]
    trainer.save_model(str(tmp_path / "saved"))  # the final save, into a folder of its own
    check_pushed(algorithm, hub, repo, files_in(tmp_path / "saved"), tiny_model_dir, tmp_path)


@pytest.mark.parametrize("algorithm", ["dqo", "qsharp"])
def test_save_model_pushes_when_push_to_hub_is_set(algorithm, hub, tiny_model_dir, tiny_rollouts, tmp_path):
    """``qalign.train`` ends with ``save_model(output_dir)``: with ``push_to_hub: true`` that save is pushed, as
    transformers does. Checkpoint saves push too (transformers' ``hub_strategy``), except Q#'s: a Q# checkpoint
    is one fit of the value model, not a policy."""
    repo = f"qalign-tester/{algorithm}-pushed-on-save"
    out = tmp_path / "out"
    trainer = build(algorithm, tiny_model_dir, tiny_rollouts, out, push_to_hub=True, hub_model_id=repo,
                    save_strategy="steps", save_steps=1)  # fmt: skip
    assert hub.commits[repo] == []  # created when the trainer is built, as transformers does
    trainer.train()
    assert any(out.glob("checkpoint-*"))
    checkpoint_pushes = ["Training in progress, step 1"] if algorithm == "dqo" else []
    assert hub.commits[repo] == checkpoint_pushes
    trainer.save_model(str(out))
    assert hub.commits[repo] == [*checkpoint_pushes, "Model save"]
    trainer.args.push_to_hub = False  # the same final save again, into a folder of its own, not pushed
    trainer.save_model(str(tmp_path / "saved"))
    check_pushed(algorithm, hub, repo, files_in(tmp_path / "saved"), tiny_model_dir, tmp_path)
