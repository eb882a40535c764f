"""Q# guided decoding vs plain π_ref decoding: time per decoding step on the same prompts.

    python bench/guided_decoding.py --num-prompts 16 --max-tokens 32 --value-layers 4 --top-k 20
    python bench/guided_decoding.py --value-model outputs/qsharp_demo/value_model   # a trained one

Both engines run HF ``generate`` on π_ref with one batch of all prompts; the guided one adds the value
model's forward per step (the k candidates appended to its own KV cache). A batch runs until its longest
completion stops, so the comparison is per decoding step (time / max completion length), the median of
``--repeats`` alternating runs. Both wall time and this process's CPU time are reported: on a machine
shared with other jobs the wall time swings with their load, the CPU time much less (the ratio is taken
on CPU time; one torch thread by default keeps it stable). ``--no-cache`` adds the reference path that
rescores every prefix+candidate from scratch. On a GPU both models run there
(``--dtype`` sets π_ref's weights; the value model is float32, as qalign's engines load it) and the wall time is
the figure to read; ``--json`` writes the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def make_prompts(tokenizer, count: int) -> list[list[int]]:
    from qalign.data import render_prompt
    from qalign.data.arithmetic import generate

    rows = generate("test", size=count)
    texts = [render_prompt(tokenizer, row["question"], "boxed_short") for row in rows]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def per_step(engine, prompts, sampling) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, steps) of one generate call, per decoding step."""
    start, cpu = time.perf_counter(), time.process_time()
    results = engine.generate(prompts, sampling)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    steps = max(len(c.completion_ids) for group in results for c in group)
    return elapsed / steps, cpu / steps, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="π_ref")
    parser.add_argument("--value-model", default=None, help="saved value-model folder (default: cut from --model)")
    parser.add_argument("--value-layers", type=int, default=4, help="trunk layers of a value model cut from --model")
    parser.add_argument("--value-type", default="v", choices=["v", "q"])
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--eta", type=float, default=0.1)
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (as the held-out evaluation)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's choice)")
    parser.add_argument("--no-cache", action="store_true", help="also time the uncached reference path")
    parser.add_argument("--dtype", default="float32", help="π_ref's weights (the value model stays float32)")
    parser.add_argument("--json", help="write the settings and per-engine medians here")
    args = parser.parse_args()

    import torch

    from qalign.decoding.guided import GuidanceConfig, GuidedEngine
    from qalign.models import load_model, load_tokenizer
    from qalign.rollout.base import SamplingConfig
    from qalign.rollout.hf import HFEngine
    from qalign.value_model import QSharpValueModel, ValueHeadConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ref = load_model(args.model, args.dtype).eval().to(device)
    if args.value_model:
        value_model = QSharpValueModel.from_pretrained(args.value_model).eval()
    else:
        config = ValueHeadConfig(value_type=args.value_type, num_layers=args.value_layers)
        value_model = QSharpValueModel.from_reference(args.model, config).eval()
    value_model = value_model.to(device)
    prompts = make_prompts(tokenizer, args.num_prompts)
    sampling = SamplingConfig(temperature=args.temperature, top_p=0.9 if args.temperature else 1.0,
                              max_tokens=args.max_tokens, seed=0)  # fmt: skip
    batch = len(prompts)
    engines = {"unguided": HFEngine(ref, tokenizer, batch_size=batch)}
    guidance = dict(eta=args.eta, top_k=args.top_k)
    engines["guided"] = GuidedEngine(ref, value_model, tokenizer, GuidanceConfig(**guidance), batch_size=batch)
    if args.no_cache:
        uncached = GuidanceConfig(**guidance, use_cache=False)
        engines["guided_no_cache"] = GuidedEngine(ref, value_model, tokenizer, uncached, batch_size=batch)

    for engine in engines.values():  # warm-up
        engine.generate(prompts[:2], SamplingConfig(temperature=0.0, max_tokens=4))
    wall: dict[str, list[float]] = {name: [] for name in engines}
    cpu: dict[str, list[float]] = {name: [] for name in engines}
    steps: dict[str, int] = {}
    for _ in range(args.repeats):
        for name, engine in engines.items():
            seconds, cpu_seconds, steps[name] = per_step(engine, prompts, sampling)
            wall[name].append(seconds)
            cpu[name].append(cpu_seconds)

    trunk_layers = getattr(value_model.trunk.config, "num_hidden_layers", "?")
    print(f"pi_ref: {args.model} ({ref.config.num_hidden_layers} layers); value model: {trunk_layers} layers, "
          f"{args.value_type.upper()}-type; top-k {args.top_k}; {batch} prompts x {args.max_tokens} tokens, "
          f"temperature {args.temperature}; torch threads {torch.get_num_threads()}")  # fmt: skip
    base = statistics.median(cpu["unguided"])
    for name in engines:
        median = statistics.median(cpu[name])
        print(
            f"{name:>16}: {1000 * median:7.1f} ms CPU/step, {1000 * statistics.median(wall[name]):7.1f} ms wall/step "
            f"({steps[name]} steps)  ratio {median / base:.2f}x (CPU)"
        )
    kl = engines["guided"].kl_summary()
    print(f"guided KL to pi_ref: {kl['kl_per_token']:.4f} per token, {kl['kl_per_sequence']:.3f} per sequence")
    if args.json:
        medians = {name: {"wall_seconds_per_step": statistics.median(wall[name]),
                          "cpu_seconds_per_step": statistics.median(cpu[name]), "steps": steps[name]}
                   for name in engines}  # fmt: skip
        settings = {"model": args.model, "ref_layers": ref.config.num_hidden_layers, "value_layers": trunk_layers,
                    "value_type": args.value_type, "top_k": args.top_k, "eta": args.eta, "prompts": batch,
                    "max_tokens": args.max_tokens, "temperature": args.temperature, "repeats": args.repeats,
                    "dtype": args.dtype, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                    "torch_threads": torch.get_num_threads()}  # fmt: skip
        Path(args.json).write_text(json.dumps({"settings": settings, "engines": medians, "kl": kl}, indent=2))


if __name__ == "__main__":
    main()
