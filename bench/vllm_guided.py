"""Q# guided decoding in vLLM (``QSharpLogitsProcessor``) vs HF ``GuidedEngine``: tokens/s, same prompts.

    OMP_NUM_THREADS=1 VLLM_CPU_KVCACHE_SPACE=1 python bench/vllm_guided.py --model tiny
    OMP_NUM_THREADS=1 VLLM_CPU_KVCACHE_SPACE=1 python bench/vllm_guided.py --model smollm2-135m-instruct

Engines, run alternately ``--repeats`` times on one batch of ``--num-prompts`` held-out arithmetic prompts
(greedy by default, so both guided engines decode the same tokens and the counts are comparable):

- ``hf_guided``: HF ``generate`` + ``GuidedLogitsProcessor`` with the value model's KV cache (qalign's
  default guided sampler);
- ``hf_guided_nocache``: the same, rescoring prefix + candidates each step (the work vLLM's processor does);
- ``vllm_guided``: an in-process ``vllm.LLM`` (float32) with ``QSharpLogitsProcessor``, the requests' value
  caches kept by the processor in one ``RaggedValueCache`` (one batched value-model forward per step);
- ``vllm_guided_nocache``: the same engine, requests asking ``use_cache: False`` (all guided rows rescored
  in one batched forward per step);
- ``vllm_plain`` / ``hf_plain``: π_ref alone, for scale.

``--model tiny`` builds the tests' 2-layer Llama (hidden 64) in a temp folder. The value model is cut from
the reference (``--value-layers``) with a random head of std 1 (strong enough to change the tokens); speed
does not depend on the head's training. Reported: generated tokens / wall second and / CPU second of this
process (vLLM's CPU engine runs in it), medians over the repeats, and the vLLM/HF ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def make_prompts(tokenizer, count: int) -> list[list[int]]:
    from qalign.data import render_prompt
    from qalign.data.arithmetic import generate

    rows = generate("test", size=count)
    texts = [render_prompt(tokenizer, row["question"], "boxed_short") for row in rows]
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


def timed(generate, prompts, sampling) -> tuple[float, float, list[list[int]]]:
    """(wall seconds, CPU seconds, completions) of one call."""
    start, cpu = time.perf_counter(), time.process_time()
    results = generate(prompts, sampling)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    return elapsed, cpu, [c.completion_ids for group in results for c in group]


def vllm_with(engine, overrides: dict, prompts, sampling):
    """``engine.generate`` with every request's guidance settings overridden."""
    saved = engine.guidance
    engine.guidance = {**saved, **overrides}
    try:
        return engine.generate(prompts, sampling)
    finally:
        engine.guidance = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="π_ref: 'tiny', a folder or a qalign.models alias")
    parser.add_argument("--value-layers", type=int, default=1, help="trunk layers of the value model")
    parser.add_argument("--value-type", default="v", choices=["v", "q"])
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--eta", type=float, default=0.1)
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", nargs="*", default=[], help="engines to leave out")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    sys.path.insert(0, str(REPO))  # this checkout's qalign (and tests/, for the tiny model)

    import torch

    from qalign.decoding.guided import GuidanceConfig, GuidedEngine, save_guided_policy
    from qalign.decoding.vllm_guided import VLLMGuidedEngine
    from qalign.models import load_model, load_tokenizer, resolve_model_path
    from qalign.rollout import VLLMEngine
    from qalign.rollout.base import SamplingConfig
    from qalign.rollout.hf import HFEngine
    from qalign.value_model import QSharpValueModel, ValueHeadConfig

    workdir = Path(tempfile.mkdtemp(prefix="qalign-bench-vllm-guided-"))
    if args.model == "tiny":
        from tests.conftest import build_tiny_model

        model_dir = str(build_tiny_model(workdir / "tiny"))
    else:
        model_dir = resolve_model_path(args.model)
    tokenizer = load_tokenizer(model_dir)
    ref = load_model(model_dir).eval()
    torch.manual_seed(0)
    config = ValueHeadConfig(value_type=args.value_type, num_layers=args.value_layers)
    value_model = QSharpValueModel.from_reference(model_dir, config)
    with torch.no_grad():
        value_model.score.weight.normal_(0.0, 1.0)
    value_model.eval().save_pretrained(workdir / "value_model")
    guidance = GuidanceConfig(eta=args.eta, top_k=args.top_k)
    save_guided_policy(workdir, model_dir, "value_model", guidance)

    prompts = make_prompts(tokenizer, args.num_prompts)
    sampling = SamplingConfig(temperature=args.temperature, max_tokens=args.max_tokens, seed=0)
    batch = len(prompts)
    vllm = VLLMGuidedEngine(model_dir, policy=workdir, dtype="float32", max_model_len=512, seed=0)
    uncached = GuidanceConfig(eta=args.eta, top_k=args.top_k, use_cache=False)
    engines = {
        "hf_guided": GuidedEngine(ref, value_model, tokenizer, guidance, batch_size=batch).generate,
        "hf_guided_nocache": GuidedEngine(ref, value_model, tokenizer, uncached, batch_size=batch).generate,
        "vllm_guided": vllm.generate,
        "vllm_guided_nocache": lambda p, s: vllm_with(vllm, {"use_cache": False}, p, s),
        "hf_plain": HFEngine(ref, tokenizer, batch_size=batch).generate,
        "vllm_plain": lambda p, s: VLLMEngine.generate(vllm, p, s),  # the same engine, requests unguided
    }
    engines = {name: run for name, run in engines.items() if name not in args.skip}

    for run in engines.values():  # warm-up
        run(prompts[:2], SamplingConfig(temperature=0.0, max_tokens=4))
    wall: dict[str, list[float]] = {name: [] for name in engines}
    cpu: dict[str, list[float]] = {name: [] for name in engines}
    tokens: dict[str, int] = {}
    completions: dict[str, list[list[int]]] = {}
    for _ in range(args.repeats):
        for name, run in engines.items():
            seconds, cpu_seconds, completions[name] = timed(run, prompts, sampling)
            tokens[name] = sum(map(len, completions[name]))
            wall[name].append(seconds)
            cpu[name].append(cpu_seconds)
    vllm.close()

    print(
        f"pi_ref: {args.model} ({ref.config.num_hidden_layers} layers); value model: {args.value_layers} layers, "
        f"{args.value_type.upper()}-type; top-k {args.top_k}, eta {args.eta}; {batch} prompts x <= {args.max_tokens} "
        f"tokens, temperature {args.temperature}; {args.repeats} alternating repeats; torch threads "
        f"{torch.get_num_threads()}"
    )
    rates = {}
    for name in engines:
        rates[name] = (tokens[name] / statistics.median(wall[name]), tokens[name] / statistics.median(cpu[name]))
        print(f"{name:>18}: {rates[name][0]:8.1f} tok/s wall  {rates[name][1]:8.1f} tok/s CPU  ({tokens[name]} tokens)")
    for ours, theirs in [
        ("vllm_guided", "hf_guided"),
        ("vllm_guided_nocache", "hf_guided_nocache"),
        ("vllm_plain", "hf_plain"),
    ]:
        if ours in rates and theirs in rates:
            print(
                f"{ours} / {theirs}: {rates[ours][0] / rates[theirs][0]:.2f}x wall, "
                f"{rates[ours][1] / rates[theirs][1]:.2f}x CPU"
            )
    if "vllm_guided" in completions and "hf_guided" in completions and args.temperature == 0:
        same = sum(a == b for a, b in zip(completions["vllm_guided"], completions["hf_guided"]))
        print(f"greedy completions identical (vLLM vs HF guided): {same}/{batch}")


if __name__ == "__main__":
    main()
