"""``qalign.policies``: one loader for every policy qalign saves, and ``qalign eval --policy`` over each.

Every folder kind is made for real on the tiny model (a trained-looking Q# value model, a LoRA adapter,
a probe saved by the probe pipeline's own writer), loaded through ``load_policy``, and compared with
the same policy built by hand: same seed, same tokens.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qalign.policies import PolicyError, load_policy, policy_kind
from qalign.rollout.base import SamplingConfig
from tests.threads import one_torch_thread

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["What is 3 + 4?", "Ana has 5 apples and eats 2. How many are left?"]
SAMPLING = SamplingConfig(n=2, temperature=1.0, max_tokens=6, seed=11)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with one_torch_thread():
        yield


def texts(policy, prompts=PROMPTS, sampling=SAMPLING) -> list[list[str]]:
    try:
        return [[c.text for c in group] for group in policy.sample(prompts, sampling)]
    finally:
        policy.close()


@pytest.fixture(scope="module")
def guided_dir(tiny_model_dir, tmp_path_factory) -> Path:
    from qalign.decoding.guided import GuidanceConfig, save_guided_policy
    from qalign.value_model import QSharpValueModel, ValueHeadConfig

    folder = tmp_path_factory.mktemp("qsharp_out")
    torch.manual_seed(0)
    value_model = QSharpValueModel.from_reference(str(tiny_model_dir), ValueHeadConfig(head="bernoulli", num_layers=1))
    with torch.no_grad():
        value_model.score.weight.normal_(0.0, 1.0)  # strong enough to change which tokens are sampled
    value_model.save_pretrained(folder / "value_model")
    save_guided_policy(folder, str(tiny_model_dir), "value_model", GuidanceConfig(eta=0.3, top_k=6))
    return folder


@pytest.fixture(scope="module")
def probe_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """What ``qalign probe`` leaves behind: probe weights and the best-of-k description."""
    from qalign.probe.config import ProbeArguments
    from qalign.probe.models import Probe
    from qalign.probe.saved_policy import save_best_of_k_policy

    folder = tmp_path_factory.mktemp("probe_out")
    args = ProbeArguments(model_name_or_path=str(tiny_model_dir), sampler_backend="hf", embedder_kind="hidden_state",
                          samples_per_prompt=4, temperature=1.0, max_tokens=6, output_dir=str(folder))  # fmt: skip
    torch.manual_seed(0)
    hidden = json.loads((tiny_model_dir / "config.json").read_text())["hidden_size"]
    Probe(hidden).save(folder / "probe_pg.pt", extra={"loss": "pg"})
    save_best_of_k_policy(args, "pg")
    return folder


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("lora_out")
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))  # fmt: skip
    model.save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------- what a folder is


def test_policy_kind_of_every_folder(tiny_model_dir, guided_dir, probe_dir, adapter_dir, tmp_path):
    assert policy_kind(str(tiny_model_dir)) == "model"
    assert policy_kind(str(adapter_dir)) == "lora"
    assert policy_kind(str(guided_dir)) == "qsharp"
    assert policy_kind(str(guided_dir / "guided_policy.json")) == "qsharp"  # the file itself
    assert policy_kind(str(probe_dir)) == "qprobe_best_of_k"
    assert policy_kind("HuggingFaceTB/SmolLM2-135M-Instruct") == "model"  # a hub id: resolved when it loads
    cd = tmp_path / "cd"
    cd.mkdir()
    record = json.loads((guided_dir / "guided_policy.json").read_text()) | {"mode": "cd"}
    (cd / "guided_policy.json").write_text(json.dumps(record))
    assert policy_kind(str(cd)) == "cd"


def test_unknown_and_missing_folders_name_what_was_expected(tmp_path):
    with pytest.raises(PolicyError, match="no such folder"):
        policy_kind(str(tmp_path / "nope"))
    with pytest.raises(
        PolicyError, match=re.escape("guided_policy.json, best_of_k_policy.json, adapter_config.json, config.json")
    ):
        policy_kind(str(tmp_path))
    (tmp_path / "guided_policy.json").write_text("{not json")
    with pytest.raises(PolicyError, match="not readable JSON"):
        policy_kind(str(tmp_path))


def test_best_of_k_description_is_checked(probe_dir, tmp_path):
    from qalign.probe.saved_policy import read_best_of_k_policy

    record = json.loads((probe_dir / "best_of_k_policy.json").read_text())
    assert record["kind"] == "qprobe_best_of_k" and record["probe"] == "probe_pg.pt" and record["k"] == 4
    assert record["candidate_temperature"] == 1.0 and record["settings"]["sampler_backend"] == "hf"
    (tmp_path / "best_of_k_policy.json").write_text(json.dumps(record))  # the probe weights are not there
    with pytest.raises(ValueError, match=re.escape("probe weights 'probe_pg.pt' are not in")):
        read_best_of_k_policy(tmp_path)


def test_plain_model_refuses_guidance_overrides(tiny_model_dir):
    with pytest.raises(PolicyError, match="apply to Q# or best-of-k only"):
        load_policy(str(tiny_model_dir), eta=0.5)


# ----------------------------------------------------------------------------- loaded = built by hand


def test_guided_folder_loads_the_guided_policy(guided_dir):
    from qalign.decoding.guided import load_guided_policy

    policy = load_policy(str(guided_dir))
    assert policy.describe()["kind"] == "qsharp" and policy.describe()["eta"] == 0.3
    assert texts(policy) == texts(load_guided_policy(guided_dir))
    changed = load_policy(str(guided_dir), eta=5.0)  # an override takes effect
    assert changed.describe()["eta"] == 5.0
    changed.close()


@pytest.mark.vllm
def test_guided_policy_decodes_the_same_in_vllm(guided_dir):
    """``backend="vllm"``: π_ref in vLLM, the value model inside its sampler; greedy completions are HF's."""
    from tests.needs import require

    require("vllm")
    greedy = SamplingConfig(n=1, temperature=0.0, max_tokens=6, seed=11)
    policy = load_policy(str(guided_dir), backend="vllm", eta=0.5)
    description = policy.describe()
    assert (description["backend"], description["eta"]) == ("vllm", 0.5)
    assert texts(policy, sampling=greedy) == texts(load_policy(str(guided_dir), eta=0.5), sampling=greedy)
    with pytest.raises(ValueError, match="backend hf or vllm, not 'vllm_server'"):
        load_policy(str(guided_dir), backend="vllm_server")


def test_probe_folder_loads_the_best_of_k_policy(probe_dir, tiny_model_dir):
    from qalign.models import load_model, load_tokenizer
    from qalign.probe.embed_local import HiddenStateEmbedder
    from qalign.probe.models import Probe
    from qalign.probe.policy import BestOfKPolicy
    from qalign.probe.sampling import EngineSampler
    from qalign.rollout.hf import HFEngine

    policy = load_policy(str(probe_dir))
    description = policy.describe()
    assert description["kind"] == "qprobe_best_of_k" and description["k"] == 4 and description["beta"] == 0.0
    assert description["probe"] == "probe_pg.pt" and description["candidate_temperature"] == 1.0
    loaded = texts(policy, sampling=SamplingConfig(n=2, temperature=0.0, max_tokens=6, seed=11))

    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir)).eval()
    by_hand = BestOfKPolicy(EngineSampler(HFEngine(model, tokenizer), tokenizer), HiddenStateEmbedder(model, tokenizer),
                            Probe.load(probe_dir / "probe_pg.pt"), k=4, tokenizer=tokenizer,
                            candidate_temperature=1.0)  # fmt: skip
    # The request asked for greedy; the saved policy draws its candidates at its own temperature 1.
    expected = texts(by_hand, sampling=SamplingConfig(n=2, temperature=0.0, max_tokens=6, seed=11))
    assert loaded == expected
    assert len({t for group in loaded for t in group}) > 1  # sampled candidates, not k copies of greedy


def test_adapter_folder_loads_the_merged_adapter(adapter_dir, tiny_model_dir):
    from peft import PeftModel

    from qalign.models import load_model, load_tokenizer
    from qalign.policies import EnginePolicy
    from qalign.rollout.hf import HFEngine

    policy = load_policy(str(adapter_dir))
    assert policy.describe()["kind"] == "lora" and policy.describe()["base_model"] == str(tiny_model_dir)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    merged = PeftModel.from_pretrained(load_model(str(tiny_model_dir)), str(adapter_dir)).merge_and_unload().eval()
    base = EnginePolicy(HFEngine(load_model(str(tiny_model_dir)).eval(), tokenizer), tokenizer, {})
    by_hand = EnginePolicy(HFEngine(merged, tokenizer), tokenizer, {})
    assert texts(policy) == texts(by_hand) != texts(base)


# ----------------------------------------------------------------------------- qalign eval --policy


@pytest.mark.parametrize("kind", ["qsharp", "qprobe_best_of_k"])
def test_eval_cli_takes_a_policy_folder(kind, guided_dir, probe_dir, tmp_path):
    folder = guided_dir if kind == "qsharp" else probe_dir
    out = tmp_path / "eval"
    command = [sys.executable, "-m", "qalign.cli", "eval", "--config", str(REPO / "configs" / "eval_demo.yaml"),
               "--policy", str(folder), "--limit", "2", "--n", "1", "--temperature", "0", "--max_tokens", "6",
               "--show_progress", "false", "--output_dir", str(out)]  # fmt: skip
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["policy"]["kind"] == kind
    if kind == "qsharp":  # eval_demo.yaml's rollout.backend hf decodes the guided policy too
        assert summary["policy"]["backend"] == "hf"
    assert summary["benchmarks"]["arithmetic"]["problems"] == 2
    assert "arithmetic" in result.stdout
    # The report names the policy kind and its settings.
    report = (out / "summary.md").read_text()
    expected = "(eta=0.3, top_k=6)" if kind == "qsharp" else "best of k=4 samples of"
    assert f"**policy** {kind}: " in report and expected in report


def test_eval_cli_refuses_a_folder_that_is_no_policy(tmp_path):
    command = [sys.executable, "-m", "qalign.cli", "eval", "--policy", str(tmp_path)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "none of the folders qalign loads" in lines[0], result.stderr
