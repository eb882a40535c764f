"""The k-table (markdown + JSON) and the reward-vs-k plot of a ``python -m qalign.probe`` run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qalign.reporting import style_k_axis, write_atomic

RESULTS_JSON, RESULTS_MD, PLOT_PNG = "results.json", "results.md", "reward_vs_k.png"


def table_markdown(table: dict[int, dict[str, float]], title: str) -> str:
    """One k-table: rows k, columns p0 (one sample), each probe's π_{θ,k}, and the oracle best-of-k."""
    ks = sorted(table)
    columns = list(table[ks[0]])
    lines = [f"**{title}**", "", "| k | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {k} | " + " | ".join(f"{table[k][c]:.3f}" for c in columns) + " |" for k in ks]
    return "\n".join(lines)


def results_markdown(results: dict[str, Any]) -> str:
    config, data = results["config"], results["data"]
    lines = [
        "# Q-probe: expected reward of best-of-k by the probe",
        "",
        f"- base model: `{config['model_name_or_path']}`, sampler `{config['sampler_backend']}`, "
        f"T={config['temperature']}, {config['samples_per_prompt']} samples × {config['max_tokens']} tokens per prompt",
        f"- embedder: `{json.dumps(results['embedder'])}` (d = {data['train']['dim']})",
        f"- data: {config['dataset_name']} — train {data['train']['prompts']} prompts, "
        f"test {data['test']['prompts']} prompts; mean reward train {data['train']['mean_reward']:.3f}, "
        f"test {data['test']['mean_reward']:.3f}",
        "- columns: `p0` = one sample of the base model; a loss name = π_{θ,k} with that loss's probe "
        "(exact expectation over chunks of k); `oracle` = best-of-k by the true reward (pass@k)",
        "- timings: " + ", ".join(f"{name} {seconds:.1f}s" for name, seconds in results["timings"].items()),
        "",
    ]
    for beta, splits in results["tables"].items():
        for split in ("test", "train"):
            table = {int(k): v for k, v in splits[split].items()}
            lines += [table_markdown(table, f"{split} split, β = {beta}"), ""]
    return "\n".join(lines)


def plot_reward_vs_k(results: dict[str, Any], path: Path) -> Path:
    """Held-out expected reward against k (log2 axis), one line per column, one panel per β."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on training machines
    import matplotlib.pyplot as plt

    betas = list(results["tables"])
    figure, axes = plt.subplots(1, len(betas), figsize=(5.5 * len(betas), 4), squeeze=False)
    for axis, beta in zip(axes[0], betas):
        table = {int(k): v for k, v in results["tables"][beta]["test"].items()}
        ks = sorted(table)
        markers = iter("osD^vP*X")  # distinct markers: curves of different losses often coincide
        for column in table[ks[0]]:
            style = {"p0": dict(linestyle=":", color="gray"), "oracle": dict(linestyle="--", color="black")}
            marker = "." if column in style else next(markers, "o")
            axis.plot(ks, [table[k][column] for k in ks], marker=marker, markerfacecolor="none", label=column,
                      **style.get(column, {}))  # fmt: skip
        style_k_axis(axis, ks, "expected reward (test)", f"Q-probe best-of-k, β = {beta}", ymax=1.02)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def write_reports(out_dir: Path, results: dict[str, Any]) -> dict[str, Path]:
    paths = {"json": out_dir / RESULTS_JSON, "markdown": out_dir / RESULTS_MD, "plot": out_dir / PLOT_PNG}
    write_atomic(paths["json"], json.dumps(results, indent=2) + "\n")
    write_atomic(paths["markdown"], results_markdown(results))
    plot_reward_vs_k(results, paths["plot"])
    return paths
