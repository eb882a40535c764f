"""The comparison config: how the budget sizes every kind of method, and the one-line errors."""

from __future__ import annotations

import re

import pytest
import yaml

from qalign.compare.config import collect_config, load_compare_config, parse_compare_args, plan_method
from qalign.config import ConfigError

SHARED = {"model_name_or_path": "smollm2-135m-instruct", "dataset_name": "arithmetic", "max_completion_length": 32,
          "prompt_template": "boxed_short", "reward_funcs": ["accuracy_last_number"], "seed": 0}  # fmt: skip


def write(tmp_path, **overrides):
    config = {"output_dir": str(tmp_path / "out"), "budget": 96, "shared": SHARED,
              "methods": {"reference": {}, "grpo": {"per_device_train_batch_size": 16, "num_generations": 4}},
              "offline": {"num_samples": 4}}  # fmt: skip
    config.update(overrides)
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_every_kind_of_method_is_sized_to_the_same_budget(tmp_path):
    methods = {
        "reference": {},
        "grpo": {"per_device_train_batch_size": 16, "num_generations": 4},
        "qae": {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 2, "num_generations": 4},
        "shiq": {"beta": 0.1},
        "dqo": {},
        "qsharp": {"num_iterations": 2, "num_samples_per_prompt": 4},
        "cd_eta": {"method": "cd", "num_iterations": 3, "num_samples_per_prompt": 4, "eta": 0.5},
    }
    config = load_compare_config(write(tmp_path, methods=methods))
    plans = {name: plan_method(config, name) for name in methods}
    assert plans["reference"].train_config is None and plans["reference"].samples == 0
    assert plans["grpo"].train_config["max_steps"] == 6  # 96 completions / 16 per step
    assert plans["qae"].train_config["max_steps"] == 6  # 8 x 2 accumulation steps per optimizer step
    assert plans["shiq"].train_config["rollouts_path"] == plans["dqo"].train_config["rollouts_path"]
    assert collect_config(config)["max_prompts"] * collect_config(config)["num_samples"] == 96
    assert plans["qsharp"].train_config["max_train_samples"] == 12  # 2 iterations x 12 prompts x 4 samples
    assert plans["cd_eta"].train_config["max_train_samples"] == 8 and plans["cd_eta"].train_config["guidance"] == "cd"
    assert plans["cd_eta"].train_config["algorithm"] == "qsharp" and plans["cd_eta"].train_config["eta"] == 0.5
    assert {p.samples for name, p in plans.items() if name != "reference"} == {96}
    for plan in plans.values():
        if plan.train_config is not None:  # each trains into its own folder, evaluated by the comparison
            assert plan.train_config["output_dir"].endswith(f"out/{plan.name}/model")
            assert plan.train_config["eval_samples"] == 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"budget": 100}, "budget 100 does not divide into whole training steps of 16 completions for 'grpo'"),
        ({"methods": {"gpro": {}}}, "unknown method 'gpro'.*Did you mean 'grpo'"),
        ({"methods": {"x": {"method": "shiqq"}}}, "unknown method 'shiqq' of section 'x'"),
        (
            {"methods": {"grpo": {"lerning_rate": 1}}},
            r"unknown grpo config key 'lerning_rate' \(in method 'grpo' or shared\).*learning_rate",
        ),
        ({"methods": {"grpo": {"max_steps": 3}}}, "method 'grpo' sets 'max_steps', which the comparison sets itself"),
        ({"methods": {"reference": {"learning_rate": 1}}}, "'reference' trains nothing"),
        ({"heldout": {"problem": 3}}, "unknown compare config key 'heldout_problem'.*Did you mean 'heldout_problems'"),
        ({"heldout": {"temperature": 0}}, "heldout.temperature must be > 0"),
        ({"budgt": 3}, "unknown compare config key 'budgt'.*Did you mean 'budget'"),
        ({"only": "grpo,shiq"}, "only: shiq not among the config's methods \\(grpo, reference\\)"),
    ],
)
def test_bad_configs_fail_in_one_line_naming_the_key(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message) as error:
        load_compare_config(write(tmp_path, **overrides))
    assert "\n" not in str(error.value)


def test_the_command_line_reports_a_config_error_without_a_traceback(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "qalign.compare", "--config", write(tmp_path, budget=100)],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "qalign: budget 100 does not divide into whole training steps of 16 completions for "
        "'grpo'; choose a budget that is a multiple of 16"
    ]


@pytest.mark.parametrize("name", ["compare_demo.yaml", "compare_gsm8k.yaml"])
def test_shipped_comparisons_load_and_size_every_method(name):
    """Each method's merged qalign.train config passes the same key check `qalign.train` runs."""
    from pathlib import Path

    config = load_compare_config(str(Path(__file__).resolve().parents[2] / "configs" / name))
    plans = [plan_method(config, method) for method in config.methods]
    assert {plan.method for plan in plans} >= {"reference", "grpo", "qae", "shiq_online", "shiq", "dqo", "rft",
                                               "qsharp", "cd"}  # fmt: skip
    assert {plan.samples for plan in plans if plan.method != "reference"} == {config.budget}
    assert config.heldout.problems >= 256
    # The anchored recipes that won on compare_demo, and GRPO with the same anchor as their control.
    anchored = {plan.name: plan for plan in plans if plan.train_config and plan.train_config.get("sft_coef")}
    assert {(name, plan.method) for name, plan in anchored.items()} >= {
        ("grpo_sft", "grpo"), ("shiq_online_sft", "shiq_online"), ("shiq_sft", "shiq"), ("dqo_sft_meaninit", "dqo")
    }  # fmt: skip
    assert anchored["dqo_sft_meaninit"].train_config["value_init"] == "mean_return"


def test_the_validation_sweep_loads_and_sizes_every_setting():
    """Every lever in the shipped sweep passes `qalign.train`'s key check and is graded on the validation split."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "configs" / "sweeps" / "compare_demo_validation.yaml"
    config = load_compare_config(str(path))
    assert config.heldout.split == "validation"
    plans = [plan_method(config, name) for name in config.methods]
    assert {plan.samples for plan in plans if plan.method != "reference"} == {config.budget}
    assert next(p for p in plans if p.name == "dqo_sft1_meaninit").train_config["value_init"] == "mean_return"


def test_a_shared_key_from_the_command_line_reaches_every_trained_method_and_nothing_else():
    """``--shared.seed 1`` trains compare_demo's recipes again with another seed: the seed is the one difference
    in every method's training config, a section's dots flatten as in the YAML, and a bad key, a bad value or
    a bare ``--shared`` (which would replace the whole mapping) fail before anything runs."""
    from pathlib import Path

    config_file = str(Path(__file__).resolve().parents[2] / "configs" / "compare_demo.yaml")
    demo = parse_compare_args(["--config", config_file])
    seed1 = parse_compare_args(["--config", config_file, "--shared.seed", "1", "--shared.rollout.backend=hf"])
    assert seed1.shared == {**demo.shared, "seed": 1, "rollout_backend": "hf"}
    assert seed1.heldout == demo.heldout and seed1.methods == demo.methods
    assert seed1.source == f"{config_file} --shared.seed 1 --shared.rollout_backend hf"  # the report's title
    for name in demo.methods:
        ours, theirs = plan_method(seed1, name).train_config, plan_method(demo, name).train_config
        if theirs is None:  # reference trains nothing
            continue
        differing = {key for key in ours.keys() | theirs.keys() if ours.get(key) != theirs.get(key)}
        # qalign.probe samples through its own `sampler` section, not the trainers' rollout keys
        assert differing == ({"seed"} if name == "qprobe" else {"seed", "rollout_backend"}), name
        assert ours["seed"] == 1, name
    for argv, message in ((["--shared.sed", "1"], "'sed'"), (["--shared.seed", "x"], "seed: 'x' is not a number"),
                          (["--shared", "seed=1"], "--shared.KEY value")):  # fmt: skip
        with pytest.raises(ConfigError, match=re.escape(message)):
            parse_compare_args(["--config", config_file, *argv])


def test_a_validation_split_is_carved_from_train_and_kept_out_of_every_method(tmp_path):
    import json

    from qalign.compare.runner import heldout_data_file
    from qalign.data.arithmetic import SPLIT_SIZES, generate

    methods = {"reference": {}, "grpo": {"per_device_train_batch_size": 16, "num_generations": 4}, "shiq": {},
               "qsharp": {"num_iterations": 2, "num_samples_per_prompt": 4}, "qprobe": {"samples_per_prompt": 8}}  # fmt: skip
    config = load_compare_config(write(tmp_path, methods=methods, heldout={"split": "validation", "problems": 300}))
    allowed = SPLIT_SIZES["train"] - 300
    assert plan_method(config, "grpo").train_config["max_train_samples"] == allowed  # online: the first 1700 only
    # Offline data (the first 24 prompts) and Q#'s prompts (the first 12) lie before the validation problems.
    assert (
        collect_config(config)["max_prompts"] == 24
        and plan_method(config, "qsharp").train_config["max_train_samples"] == 12
    )
    rows = [json.loads(line) for line in open(heldout_data_file(config))]
    train = generate("train")
    trained_on = {r["question"] for r in train[:allowed]}
    # The last 300 training problems, less those whose question the methods also train on (the bundled task
    # repeats its bare "What is a + b?" questions) or that repeat an earlier validation question.
    expected, seen = [], set(trained_on)
    for row in train[allowed:]:
        if row["question"] not in seen:
            seen.add(row["question"])
            expected.append(row)
    assert rows == expected and 150 < len(rows) < 300
    assert not {r["question"] for r in rows} & trained_on
    # Q-probe trains on the first 12 prompts and grades the same validation file as every other method.
    probe = plan_method(config, "qprobe").train_config
    assert probe["num_train_prompts"] == 12 and probe["test_data_file"] == heldout_data_file(config)


def test_a_budget_that_would_reach_into_the_validation_split_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="'shiq' would train on 1900 prompts, but only the first 1700"):
        load_compare_config(write(tmp_path, budget=7600, heldout={"split": "validation", "problems": 300},
                                  methods={"shiq": {}}))  # fmt: skip
    with pytest.raises(ConfigError, match="'qprobe' would train on 1900 prompts, but only the first 1700"):
        load_compare_config(write(tmp_path, budget=15200, heldout={"split": "validation", "problems": 300},
                                  methods={"qprobe": {"samples_per_prompt": 8}}))  # fmt: skip
    with pytest.raises(ConfigError, match=r"heldout\.split must be 'test' or 'validation'"):
        load_compare_config(write(tmp_path, heldout={"split": "dev"}))


def test_command_line_overrides_reach_the_sections(tmp_path):
    config = load_compare_config(write(tmp_path), {"heldout_split": "validation", "heldout_problems": "300",
                                                   "budget": 48})  # fmt: skip
    assert config.heldout.split == "validation" and config.heldout.problems == 300 and config.budget == 48
    assert load_compare_config(write(tmp_path), {"only": "grpo, reference"}).only == ["grpo", "reference"]
    with pytest.raises(ConfigError, match="heldout_problems: expected int, got 'many'"):
        load_compare_config(write(tmp_path), {"heldout_problems": "many"})


def test_qprobe_is_sized_by_its_samples_per_prompt_and_graded_on_the_methods_problems(tmp_path):
    methods = {"qprobe": {"samples_per_prompt": 8, "loss": "bt", "embedder": {"kind": "hidden_state", "layer": 20}}}
    config = load_compare_config(write(tmp_path, methods=methods))
    plan = plan_method(config, "qprobe")
    probe = plan.train_config
    assert plan.entry == "qalign.probe" and plan.samples == 96
    assert probe["num_train_prompts"] == 12 and probe["num_test_prompts"] == config.heldout.problems
    assert probe["losses"] == ["bt"] and probe["k_values"] == [1, 8] and probe["embedder_layer"] == 20
    assert probe["temperature"] == config.heldout.temperature and probe["fallback_last_number"] is True
    with pytest.raises(ConfigError, match=r"unknown probe config key 'embeder_kind' \(in method 'qprobe'\)"):
        load_compare_config(write(tmp_path, methods={"qprobe": {"embeder_kind": "openai"}}))
    assert probe["test_split"] == "test" and "test_data_file" not in probe  # the training dataset's test split
    local = tmp_path / "arithmetic_test.jsonl"
    local.write_text('{"question": "What is 1 + 1?", "answer": "2"}\n')
    with_file = load_compare_config(write(tmp_path, methods=methods, heldout={"data_file": str(local)}))
    assert plan_method(with_file, "qprobe").train_config["test_data_file"] == str(local)
    with pytest.raises(ConfigError, match="budget 96 does not divide into whole prompts of 5"):
        load_compare_config(write(tmp_path, methods={"qprobe": {"samples_per_prompt": 5}}))
