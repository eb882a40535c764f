"""Rollout throughput: HF generate vs vLLM in-process vs vLLM server, and qalign's engine overhead.

    VLLM_CPU_KVCACHE_SPACE=1 python bench/rollout.py --num-prompts 8 --n 4 --max-tokens 32

Every backend samples the same prompts (arithmetic questions through the chat template) with the
same settings; tokens/s counts generated tokens. The overhead rows time qalign's engine against the
same vLLM called directly (in-process: ``LLM.generate`` with identical per-request seeds, so both
produce the same tokens; server: one raw ``/v1/completions`` request with all prompts), alternating
the two ``--repeats`` times and comparing medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

DEFAULT_MODEL = Path.home() / ".cache" / "qalign" / "models" / "SmolLM2-135M-Instruct"


def make_prompts(tokenizer, count: int) -> list[list[int]]:
    questions = [
        f"What is {a} + {b}? Answer with a number." for a, b in zip(range(3, 3 + count), range(17, 17 + 3 * count, 3))
    ]
    if getattr(tokenizer, "chat_template", None):
        return [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False) for q in questions]  # fmt: skip
    return [tokenizer(q)["input_ids"] for q in questions]


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def count_tokens(results) -> int:
    return sum(len(c.completion_ids) for group in results for c in group)


def synchronized(fn):
    """``fn`` followed by a CUDA synchronize (when CUDA is in use), so timings include queued GPU work."""
    import torch

    def run():
        result = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return result

    return run


def bench_hf(model_dir, prompts, sampling, dtype: str = "float32") -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qalign.rollout import HFEngine

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    if torch.cuda.is_available():
        model = model.to("cuda")
    engine = HFEngine(model, tokenizer, batch_size=len(prompts))
    engine.generate(prompts[:1], sampling)  # warm-up
    seconds, results = timed(synchronized(lambda: engine.generate(prompts, sampling)))  # noqa: F821 (ruff reads the later `del engine` as unbinding it for the lambda, which runs first)
    del engine, model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # leave the GPU memory to vLLM
    return {"backend": "hf", "seconds": seconds, "tokens": count_tokens(results)}


def bench_vllm(
    model_dir, prompts, sampling, repeats: int, max_model_len: int, dtype: str = "float32", enforce_eager: bool = True
) -> list[dict]:
    from qalign.rollout import VLLMEngine
    from qalign.rollout.vllm_engine import request_seeds, sampling_params

    start, engine = timed(lambda: VLLMEngine(str(model_dir), dtype=dtype, max_model_len=max_model_len,
                                             enforce_eager=enforce_eager))  # fmt: skip
    print(f"vLLM in-process engine start: {start:.1f}s", flush=True)
    try:
        engine.generate(prompts, sampling)  # warm-up (first forward passes are slow on CPU)
        inputs = [{"prompt_token_ids": p} for p in prompts]
        params = [sampling_params(sampling, s) for s in request_seeds(sampling, len(prompts))]
        ours, direct, tokens = [], [], 0
        for _ in range(repeats):
            seconds, results = timed(lambda: engine.generate(prompts, sampling))
            ours.append(seconds)
            tokens = count_tokens(results)
            seconds, outputs = timed(lambda: engine.llm.generate(inputs, params, use_tqdm=False))
            direct.append(seconds)
            assert sum(len(o.token_ids) for out in outputs for o in out.outputs) == tokens, "same seeds, same tokens"
    finally:
        engine.close()
    return [
        {"backend": "vllm (qalign engine)", "seconds": statistics.median(ours), "tokens": tokens},
        {"backend": "vllm (LLM.generate direct)", "seconds": statistics.median(direct), "tokens": tokens},
    ]


def bench_server(
    model_dir,
    prompts,
    sampling,
    repeats: int,
    max_model_len: int,
    num_servers: int,
    dtype: str = "float32",
    enforce_eager: bool = True,
) -> list[dict]:
    import requests

    from qalign.rollout import VLLMServerEngine

    start, engine = timed(lambda: VLLMServerEngine(str(model_dir), dtype=dtype, max_model_len=max_model_len,
                                                   num_servers=num_servers, enforce_eager=enforce_eager))  # fmt: skip
    print(f"vLLM server start ({num_servers} worker(s)): {start:.1f}s", flush=True)
    try:
        engine.generate(prompts, sampling)  # warm-up
        worker = engine.workers[0]
        body = {**engine._completion_body(prompts, sampling, None), "model": worker.model_name}
        ours, direct, ours_tokens, direct_tokens = [], [], 0, 0
        for _ in range(repeats):
            seconds, results = timed(lambda: engine.generate(prompts, sampling))
            ours.append(seconds / count_tokens(results))
            ours_tokens += count_tokens(results)
            seconds, response = timed(
                lambda: requests.post(f"{worker.url}/v1/completions", json=body, timeout=900).json()
            )
            tokens = sum(len(c["token_ids"]) for c in response["choices"])
            direct.append(seconds / tokens)
            direct_tokens += tokens
    finally:
        engine.close()
    # Sampling without a seed gives different lengths per call: compare seconds per token.
    return [
        {"backend": f"vllm_server x{num_servers} (qalign engine)", "sec_per_token": statistics.median(ours)},
        {"backend": f"vllm_server x{num_servers} (raw HTTP, 1 request)", "sec_per_token": statistics.median(direct)},
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="HF model folder")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-servers", type=int, default=1)
    parser.add_argument("--backends", default="hf,vllm,vllm_server")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="dtype of every backend (HF runs on CUDA when available)",
    )
    parser.add_argument(
        "--enforce-eager",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="vLLM without CUDA graphs / torch.compile (qalign's default)",
    )
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    from transformers import AutoTokenizer

    from qalign.rollout import SamplingConfig

    prompts = make_prompts(AutoTokenizer.from_pretrained(args.model), args.num_prompts)
    sampling = SamplingConfig(n=args.n, temperature=1.0, max_tokens=args.max_tokens, seed=0)
    backends = args.backends.split(",")
    rows: list[dict] = []
    if "hf" in backends:
        rows.append(bench_hf(args.model, prompts, sampling, args.dtype))
    if "vllm" in backends:
        rows += bench_vllm(
            args.model, prompts, sampling, args.repeats, args.max_model_len, args.dtype, args.enforce_eager
        )
    if "vllm_server" in backends:
        unseeded = SamplingConfig(n=args.n, temperature=1.0, max_tokens=args.max_tokens)
        rows += bench_server(args.model, prompts, unseeded, args.repeats, args.max_model_len, args.num_servers,
                             args.dtype, args.enforce_eager)  # fmt: skip

    print(f"\n{args.num_prompts} prompts x n={args.n}, max_tokens={args.max_tokens}, model={args.model}")
    for row in rows:
        if "sec_per_token" in row:
            print(f"{row['backend']:<42} {1 / row['sec_per_token']:9.1f} tok/s")
        else:
            print(
                f"{row['backend']:<42} {row['tokens'] / row['seconds']:9.1f} tok/s  ({row['tokens']} tokens in {row['seconds']:.2f}s)"
            )
    by_name = {row["backend"]: row for row in rows}
    if "vllm (qalign engine)" in by_name:
        ours, direct = by_name["vllm (qalign engine)"]["seconds"], by_name["vllm (LLM.generate direct)"]["seconds"]
        print(f"qalign overhead over LLM.generate: {100 * (ours - direct) / direct:+.1f}%")
    server = [row for row in rows if "sec_per_token" in row]
    if server:
        ours, direct = server[0]["sec_per_token"], server[1]["sec_per_token"]
        print(
            f"qalign overhead over one raw /v1/completions request: {100 * (ours - direct) / direct:+.1f}% (per token)"
        )


if __name__ == "__main__":
    main()
