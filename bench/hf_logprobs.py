"""What HFEngine's sampling log-probs cost at a large vocabulary: HFEngine against plain ``generate``.

A random 2-layer Llama with a 151,936-token vocabulary (Qwen2.5's size) and a small hidden size, so that the
vocabulary-sized work dominates as it does for a 0.5B model on a GPU. Three variants sample the same batch
with the same seed, alternated round by round so that machine noise hits them alike:

- ``generate``: plain ``model.generate`` (no log-probs), the floor;
- ``hfengine``: qalign's HFEngine (log-probs gathered per step by its last logits processor);
- ``output_scores``: the previous way, ``generate(output_scores=True)`` then a log-softmax of every step.

Prints the median time of each and the ratios to ``generate``; ``--json`` writes them.

    python bench/hf_logprobs.py [--vocab 151936] [--batch 8] [--new-tokens 48] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from qalign.rollout import HFEngine, SamplingConfig


def random_model(vocab: int, hidden: int) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         bos_token_id=0, eos_token_id=1, pad_token_id=2)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    # A word-level tokenizer over the same vocabulary: only its ids and pad token are used here.
    vocab_map = {f"t{i}": i for i in range(vocab)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab_map, unk_token="t3")))
    tokenizer.pad_token, tokenizer.eos_token = "t2", "t1"
    model.generation_config.eos_token_id = None  # run every row to the full length: equal work per variant
    return model, tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = random_model(args.vocab, args.hidden)
    prompts = [[int(t) for t in torch.randint(3, args.vocab, (args.prompt_length,))] for _ in range(args.batch)]
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)
    sampling = SamplingConfig(n=1, temperature=0.7, top_p=0.95, max_tokens=args.new_tokens, seed=0)
    engine = HFEngine(model, tokenizer, batch_size=args.batch)
    common = dict(
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        do_sample=True,
        temperature=0.7,
        top_p=0.95,
        top_k=0,
        pad_token_id=2,
    )  # fmt: skip  (top_k 0: unset would be generate's default 50)

    def plain() -> None:
        torch.manual_seed(0)
        model.generate(input_ids=ids, attention_mask=mask, **common)

    def hfengine() -> None:
        engine.generate(prompts, sampling)

    def output_scores() -> None:
        torch.manual_seed(0)
        out = model.generate(input_ids=ids, attention_mask=mask, output_scores=True, return_dict_in_generate=True,
                             **common)  # fmt: skip
        new = out.sequences[:, ids.size(1) :]
        torch.stack(out.scores, dim=1).float().log_softmax(-1).gather(-1, new.unsqueeze(-1))

    variants = {"generate": plain, "hfengine": hfengine, "output_scores": output_scores}
    with tempfile.TemporaryDirectory():
        for run in variants.values():  # warm-up
            run()
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, run in variants.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in times.items()}
    ratios = {name: median[name] / median["generate"] for name in variants}
    for name in variants:
        print(f"{name:>14}: {median[name]:.3f} s median of {args.rounds}  ({ratios[name]:.2f}x generate)")
    print(f"hf_logprobs: vocab {args.vocab}, batch {args.batch}, {args.new_tokens} new tokens: HFEngine "
          f"{ratios['hfengine']:.2f}x generate, output_scores {ratios['output_scores']:.2f}x")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "median_s": median,
                                         "ratio_to_generate": ratios}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
