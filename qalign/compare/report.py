"""The comparison's report: one row per method, paired differences, and two plots.

``report.json`` holds everything; ``report.md`` the table a person reads; ``frontier.png`` held-out
accuracy against KL(π ‖ π_ref) per token; ``curves.png`` held-out accuracy against training samples.
"""

from __future__ import annotations

import json
import platform
import re
import time
from pathlib import Path
from typing import Any

from qalign.compare.config import OFFLINE, CompareConfig, MethodPlan
from qalign.compare.stats import PairedComparison, accuracy_interval, paired_comparison
from qalign.reporting import write_atomic

# Every method is compared, paired, against each baseline present; RFT only with the methods trained on its
# offline data (the comparison goal c is about), since against the others it would be one more arbitrary pair.
BASELINES = {"reference": None, "grpo": None, "rft": OFFLINE}


# A list of numbers laid out one element per line by json.dumps(indent=...); the newline after "[" means a
# JSON string (which holds no raw newline) never matches.
_NUMBER_LIST = re.compile(r"\[\n\s*(-?[0-9][-+0-9.eE]*(?:,\s*-?[0-9][-+0-9.eE]*)*)\s*\]")


def json_text(record: dict[str, Any]) -> str:
    """``record`` as indented JSON with every list of numbers on one line: per-problem scores stay readable."""

    def one_line(match: re.Match) -> str:
        return "[" + ", ".join(number.strip() for number in match.group(1).split(",")) + "]"

    return _NUMBER_LIST.sub(one_line, json.dumps(record, indent=2)) + "\n"


def method_row(result: dict[str, Any], confidence: float, seed: int | None = None) -> dict[str, Any]:
    """One method's report row. Each mode keeps its per-problem scores beside the interval, so a report alone
    can be re-analysed or pooled over training seeds (``qalign.compare.seeds``) once the method folders are gone.
    """
    row = {"name": result["name"], "method": result["method"], "seed": seed, "samples": result["samples"],
           "training_tokens": result["training_tokens"], "kl_per_token": result["kl"]["kl_per_token"],
           "kl_per_sequence_bound": result["kl"].get("kl_per_sequence_bound"),
           "test_time_samples": result.get("test_time_samples"),
           "train_seconds": result["train_seconds"], "eval_seconds": result["eval_seconds"],
           "note": result["note"], "config": result["config"],
           "value_diagnostics": result.get("value_diagnostics")}  # fmt: skip
    for mode in ("greedy", "sampled"):
        if result[mode] is None:  # best-of-k has no greedy decoding
            row[mode] = None
            continue
        interval = accuracy_interval(result[mode]["scores"], confidence)
        row[mode] = {**interval.as_dict(), "truncated": result[mode]["truncated"],
                     "scores": list(result[mode]["scores"])}  # fmt: skip
    if "best_of_1" in result:  # qprobe: best-of-k against its own samples taken one at a time
        row["gain_over_best_of_1"] = paired_comparison(result["sampled"]["scores"], result["best_of_1"]["scores"],
                                                       confidence).as_dict()  # fmt: skip
    return row


def comparisons(results: dict[str, dict[str, Any]], confidence: float) -> dict[str, dict[str, dict[str, Any]]]:
    """``{baseline: {method: {mode: PairedComparison}}}`` for every baseline among the methods."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for baseline, methods in BASELINES.items():
        base = next((r for r in results.values() if r["name"] == baseline), None)
        if base is None:
            continue
        compared = {name: r for name, r in results.items()
                    if name != baseline and (methods is None or r["method"] in methods)}  # fmt: skip
        if not compared:
            continue
        out[baseline] = {
            name: {mode: paired_comparison(r[mode]["scores"], base[mode]["scores"], confidence).as_dict()
                   if r[mode] is not None and base[mode] is not None else None for mode in ("greedy", "sampled")}
            for name, r in compared.items()
        }  # fmt: skip
    return out


def format_interval(cell: dict[str, Any] | None, signed: bool = False) -> str:
    """``0.586 [0.525, 0.645]`` for an accuracy; a difference (``signed``) as ``+0.031 [-0.012, +0.074]``,
    marked `` *`` when its interval excludes 0."""
    if cell is None:
        return "n/a"
    number = "{:+.3f}" if signed else "{:.3f}"
    mark = " *" if signed and (cell["low"] > 0 or cell["high"] < 0) else ""
    return f"{number.format(cell['estimate'])} [{number.format(cell['low'])}, {number.format(cell['high'])}]{mark}"


def _rate(cell: dict[str, Any] | None) -> str:
    return "n/a" if cell is None or cell["truncated"] is None else f"{cell['truncated']:.2f}"


def _diff(comparison: dict[str, Any] | None) -> str:
    if comparison is None:
        return ""
    c = PairedComparison(**comparison)
    mark = " *" if c.excludes_zero() else ""
    return f"{c.difference:+.3f} [{c.low:+.3f}, {c.high:+.3f}] p={c.p_value:.3g}{mark}"


def report_markdown(record: dict[str, Any]) -> str:
    confidence = record["confidence"]
    held = record["heldout"]
    lines = [
        f"# Method comparison: {record['source']}",
        "",
        f"{record['date']}, {record['machine']}; wall time {record['wall_seconds'] / 60:.1f} min.",
        f"Held-out: {held['graded']} problems ({held['split']} split) of {held['benchmark']}; greedy accuracy and "
        f"mean@{held['n']} at "
        f"T = {held['temperature']} ({held['max_tokens']} tokens), {confidence:.0%} intervals over problems "
        "(Wilson for greedy, bootstrap for mean@n). Training budget: "
        f"{record['budget']} sampled completions per method.",
        "",
        "| method | greedy | mean@n | truncated (greedy / sampled) | KL/token | samples | tokens | train min |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in record["rows"]:
        g, s = row["greedy"], row["sampled"]
        kl = (
            f"{row['kl_per_token']:.4f}"
            if row["kl_per_token"] is not None
            else f"≤ {row['kl_per_sequence_bound']:.3f}/seq"
        )
        lines.append(
            f"| {row['name']} | {format_interval(g)} | {format_interval(s)} | {_rate(g)} / {_rate(s)} | {kl} | {row['samples']}"
            + (f" (+{row['test_time_samples']} at test time)" if row.get("test_time_samples") else "")
            + f" | {row['training_tokens'] if row['training_tokens'] is not None else 'n/a'} "
            f"| {row['train_seconds'] / 60:.1f} |"
        )
    gains = [row for row in record["rows"] if row.get("gain_over_best_of_1")]
    if gains:
        lines += ["", "## Best-of-k against best-of-1 on the same samples", "", "| method | Δ [CI] p |", "|---|---|"]
        lines += [f"| {row['name']} | {_diff(row['gain_over_best_of_1'])} |" for row in gains]
    for baseline, by_method in record["comparisons"].items():
        lines += ["", f"## Paired differences against `{baseline}` (same problems; * = interval excludes 0)", "",
                  "| method | Δ greedy [CI] p | Δ mean@n [CI] p |", "|---|---|---|"]  # fmt: skip
        for name, modes in by_method.items():
            lines.append(f"| {name} | {_diff(modes['greedy'])} | {_diff(modes['sampled'])} |")
    lines += _value_model_lines(record["rows"])
    lines += ["", "p-values: exact McNemar for greedy (0/1 per problem), sign-flip permutation for mean@n.",
              "KL(π ‖ π_ref) per token at the states of one T = 1 sample per prompt on the first "
              f"{held['kl_problems']} held-out prompts; best-of-k has no per-token distribution: its row shows the "
              "bound ln k − (k−1)/k on its KL per sequence.", "", "## What each method ran", ""]  # fmt: skip
    for row in record["rows"]:
        lines.append(
            f"- `{row['name']}` ({row['method']}): {row['note']}"
            + (f"; config `{row['config']}`" if row["config"] else "")
        )
    return "\n".join(lines) + "\n"


def _value_model_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Q#/CD: was each iteration's value model better than a constant predictor? (docs/qsharp.md)"""
    diagnosed = [(row["name"], d) for row in rows for d in row.get("value_diagnostics") or []]
    if not diagnosed:
        return []
    lines = ["", "## Guided policies' value models, on held-out roll-outs of training prompts kept out of every fit",
             "", "A value model no better than a constant predictor moves π_ref by noise: the policy's accuracy and KL "
             "are then no evidence that guidance works. In brackets, what a constant predictor scores.", "",
             "| method | iteration | held-out loss (constant) | AUROC | KL/token (constant value) | roll-outs | |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    number = lambda value, digits: "n/a" if value is None else f"{value:.{digits}f}"
    for name, d in diagnosed:
        flag = "**no better than a constant**" if d["uninformative"] else ""
        lines.append(f"| {name} | {d['iteration']} | {number(d['heldout_value_loss'], 3)} "
                     f"({number(d['constant_value_loss'], 3)}) | {number(d['heldout_auroc'], 2)} | "
                     f"{number(d['heldout_kl_per_token'], 4)} ({number(d['constant_value_kl_per_token'], 4)}) | "
                     f"{number(d['heldout_rows'], 0)} | {flag} |")  # fmt: skip
    return lines


def plot_frontier(record: dict[str, Any], path: Path) -> Path:
    """Held-out mean@n (with its interval) against KL(π ‖ π_ref) per token, one point per method."""
    figure, axis = _figure()
    rows = [r for r in record["rows"] if r["kl_per_token"] is not None]  # best-of-k has only a bound
    for index, row in enumerate(rows):
        s = row["sampled"]
        axis.errorbar(row["kl_per_token"], s["estimate"], yerr=[[s["estimate"] - s["low"]], [s["high"] - s["estimate"]]],
                      fmt=_marker(index), capsize=3, label=row["name"])  # fmt: skip
    return _finish(figure, axis, "KL(π ‖ π_ref) per token", f"held-out mean@{record['heldout']['n']}",
                   "accuracy vs KL to the reference", path)  # fmt: skip


def plot_curves(record: dict[str, Any], results: dict[str, dict[str, Any]], path: Path) -> Path:
    """Greedy held-out accuracy vs training samples: checkpoints of online methods, end points of all."""
    figure, axis = _figure()
    start = next((r for r in record["rows"] if r["name"] == "reference"), None)
    rows = [r for r in record["rows"] if r["name"] != "reference" and r["greedy"] is not None]
    for index, row in enumerate(rows):
        points = [list(p) for p in results[row["name"]].get("curve") or []]
        if start is not None:
            points.insert(0, [0.0, start["greedy"]["estimate"]])
        points.append([float(row["samples"]), row["greedy"]["estimate"]])
        xs, ys = zip(*points)
        axis.plot(xs, ys, marker=_marker(index), label=row["name"])
    return _finish(figure, axis, "training samples (completions)", "held-out greedy accuracy", "learning curves", path)


def _marker(index: int) -> str:
    """The default colour cycle repeats after ten methods; the marker changes with each repeat, so that no two
    methods of one plot look alike."""
    return "osD^v<>P"[index // 10 % 8]


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6, 4.5))


def _finish(figure, axis, xlabel: str, ylabel: str, title: str, path: Path) -> Path:
    import matplotlib.pyplot as plt

    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def write_report(config: CompareConfig, plans: list[MethodPlan], results: dict[str, dict[str, Any]],
                 offline_seconds: float | None) -> dict[str, Any]:  # fmt: skip
    """report.json, report.md, frontier.png and curves.png in ``config.output_dir``; returns the record."""
    from dataclasses import asdict

    record = {
        "source": config.source,
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {_cpu_count()} CPU cores" + (", CUDA" if _has_cuda() else ""),
        "wall_seconds": sum(r["train_seconds"] + r["eval_seconds"] for r in results.values()) + (offline_seconds or 0),
        "offline_data_seconds": offline_seconds,
        "budget": config.budget,
        "confidence": config.confidence,
        "heldout": {
            **asdict(config.heldout),
            "max_tokens": config.max_tokens,
            "graded": len(next(iter(results.values()))["sampled"]["scores"]) if results else 0,
        },
        "rows": [
            method_row(results[plan.name], config.confidence, (plan.train_config or {}).get("seed")) for plan in plans
        ],
        "comparisons": comparisons(results, config.confidence),
    }
    root = config.root
    write_atomic(root / "report.json", json_text(record))
    write_atomic(root / "report.md", report_markdown(record))
    plot_frontier(record, root / "frontier.png")
    plot_curves(record, results, root / "curves.png")
    return record


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
