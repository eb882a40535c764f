"""Does a trained policy still stop where π_ref stops? The stop token's log-ratio at π_ref's stopping states.

A value-based loss can raise the truncation rate without any sign in the accuracy of the samples that
do stop. This diagnostic looks at the mechanism directly. For completions of π_ref that ended with the
stop token (EOS), at the final state s_T (prompt + everything before the stop token):

    Δ_stop = ln π_θ(EOS | s_T) − ln π_ref(EOS | s_T)

and, for comparison, the mean log-ratio ln ρ_t of the tokens before it. Δ_stop ≪ 0 while the other
tokens' ln ρ stay near 0 says the training moved probability away from stopping and nowhere else.
Split by the completion's reward, it also says whether the model tells a right answer's stop from a
wrong one's (a model that cannot is expected to move both the same way).

    python -m qalign.compare.stopping outputs/compare_demo_validation

reads the comparison's offline collection (π_ref's training samples, with their rewards) and every
method's trained ``model`` folder, and prints one line per method.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass(frozen=True)
class StopLogRatio:
    """Δ_stop at the final state and the mean ln ρ of the completion's other tokens."""

    stop: float
    others: float


@torch.no_grad()
def stop_log_ratio(model: PreTrainedModel, ref_model: PreTrainedModel, prompt_ids: list[int],
                   completion_ids: list[int]) -> StopLogRatio:  # fmt: skip
    """Δ_stop = ln π_θ(a_T|s_T) − ln π_ref(a_T|s_T) for the completion's last token a_T (its stop token)
    and the mean of ln π_θ(a_t|s_t) − ln π_ref(a_t|s_t) over t < T (0.0 for a one-token completion)."""
    if not completion_ids:
        raise ValueError("a completion needs at least its stop token")
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids + completion_ids[:-1]], device=device)
    start = len(prompt_ids) - 1  # logits at position i predict token i + 1
    targets = torch.tensor(completion_ids, device=device).unsqueeze(-1)

    def logprobs(m: PreTrainedModel) -> torch.Tensor:
        logits = m(input_ids=ids.to(next(m.parameters()).device)).logits[0, start:].float().to(device)
        return torch.log_softmax(logits, dim=-1).gather(-1, targets).squeeze(-1)

    log_ratio = logprobs(model) - logprobs(ref_model)
    others = log_ratio[:-1].mean().item() if len(completion_ids) > 1 else 0.0
    return StopLogRatio(stop=log_ratio[-1].item(), others=others)


def summarize(ratios: list[StopLogRatio]) -> dict[str, float]:
    """Means over completions, and the fraction whose stop became less than half as likely (Δ_stop < −ln 2)."""
    if not ratios:
        return {"count": 0, "stop": math.nan, "others": math.nan, "halved": math.nan}
    count = len(ratios)
    return {
        "count": count,
        "stop": sum(r.stop for r in ratios) / count,
        "others": sum(r.others for r in ratios) / count,
        "halved": sum(r.stop < -math.log(2) for r in ratios) / count,
    }


def _stopped_samples(collection: Path, eos_token_id: int, limit: int) -> list[tuple[list[int], list[int], float]]:
    import pyarrow.parquet as pq

    rows = []
    for shard in sorted(collection.glob("shard-*.parquet")):
        table = pq.read_table(shard, columns=["prompt_ids", "completion_ids", "reward", "finish_reason"])
        for row in table.to_pylist():
            if row["finish_reason"] == "stop" and row["completion_ids"] and row["completion_ids"][-1] == eos_token_id:
                rows.append((row["prompt_ids"], row["completion_ids"], float(row["reward"])))
    return rows[:limit]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m qalign.compare.stopping", description=__doc__.split("\n")[0])
    parser.add_argument("output_dir", type=Path, help="a qalign.compare output folder")
    parser.add_argument("--limit", type=int, default=256, help="stopped samples to read (default 256)")
    parser.add_argument("--methods", nargs="*", help="only these methods (default: every trained model folder)")
    args = parser.parse_args(argv)

    from qalign.models import load_model, load_tokenizer

    collection = args.output_dir / "offline_data"
    if not collection.is_dir():
        raise SystemExit(f"qalign: {collection}: no offline collection; run qalign.compare with an offline method")
    methods = sorted(p.parent.parent.name for p in args.output_dir.glob("*/model/config.json"))
    if args.methods:
        unknown = sorted(set(args.methods) - set(methods))
        if unknown:
            raise SystemExit(f"qalign: --methods {', '.join(unknown)}: no trained model; have {', '.join(methods)}")
        methods = [m for m in methods if m in args.methods]
    if not methods:
        raise SystemExit(f"qalign: {args.output_dir}: no trained model folder (<method>/model/config.json)")
    meta = json.loads((collection / "meta.json").read_text())
    reference = meta.get("ref_model_name_or_path") or meta["model_name_or_path"]
    tokenizer = load_tokenizer(reference)
    ref_model = load_model(reference).eval()
    samples = _stopped_samples(collection, tokenizer.eos_token_id, args.limit)
    saved = args.output_dir / "stopping.json"
    results = json.loads(saved.read_text()) if saved.is_file() else {}
    for method in methods:
        model = load_model(str(args.output_dir / method / "model")).eval()
        by_outcome: dict[str, list[StopLogRatio]] = {"correct": [], "wrong": []}
        for prompt_ids, completion_ids, reward in samples:
            ratio = stop_log_ratio(model, ref_model, prompt_ids, completion_ids)
            by_outcome["correct" if reward > 0 else "wrong"].append(ratio)
        results[method] = {outcome: summarize(ratios) for outcome, ratios in by_outcome.items()}
        line = "  ".join(
            f"{o} ({s['count']}): Δ_stop {s['stop']:+.2f}, others {s['others']:+.3f}, halved {s['halved']:.0%}"
            for o, s in results[method].items()
        )
        print(f"{method}: {line}", flush=True)
        saved.write_text(json.dumps(results, indent=2) + "\n")  # after each method: a long run keeps its part


if __name__ == "__main__":
    main()
