"""Run reports: ``summary.json`` + ``summary.md`` tables, a pass@k-vs-k plot, one-line summaries,
and a side-by-side comparison of two runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qalign.reporting import style_k_axis, write_atomic

__all__ = ["compare_runs", "load_run", "one_line", "plot_pass_at_k", "summary_markdown", "write_reports"]

SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
PLOT_PNG = "pass_at_k.png"


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def one_line(name: str, result: dict[str, Any]) -> str:
    """``gsm8k: pass@1 0.410 pass@8 0.730 maj@8 0.650 (n=8, 1319 problems)``: pass@1, pass@n, maj@n."""
    n = result["n"]
    parts = [f"pass@1 {_fmt(result['pass@k'].get('1'))}"]
    if n > 1:
        parts.append(f"pass@{n} {_fmt(result['pass@k'].get(str(n)))}")
        parts.append(f"maj@{n} {_fmt(result['maj@k'].get(str(n)))}")
    return f"{name}: {' '.join(parts)} (n={n}, {result['problems']} problems)"


def policy_label(policy: dict[str, Any]) -> str:
    """A plain model by its name; a guided or best-of-k policy by its kind and the settings that make it."""
    kind = policy.get("kind", "engine")
    if kind == "engine":
        return str(policy.get("model", policy))
    if kind in ("qsharp", "cd"):
        return (f"{kind}: {policy.get('reference')} guided by {policy.get('value_model')} "
                f"(eta={policy.get('eta')}, top_k={policy.get('top_k')})")  # fmt: skip
    if kind == "qprobe_best_of_k":
        return (f"{kind}: best of k={policy.get('k')} samples of {policy.get('sampler_model')} by "
                f"{policy.get('probe')} (beta={policy.get('beta')}, T={policy.get('candidate_temperature')})")  # fmt: skip
    return f"{kind}: {policy}"


def summary_markdown(summary: dict[str, Any]) -> str:
    """A markdown table, one row per benchmark, with the settings the numbers depend on above it."""
    ks = [str(k) for k in summary["k_values"]]
    sampling = summary["sampling"]
    policy = summary["policy"]
    lines = [
        f"**policy** {policy_label(policy)}  ",
        "**sampling** " + ", ".join(f"{key}={sampling[key]}" for key in sampling) + "  ",
        f"**prompt** {summary['prompt_template']}",
        "",
    ]
    header = [
        "benchmark",
        "problems",
        "n",
        *(f"pass@{k}" for k in ks),
        *(f"maj@{k}" for k in ks),
        "mean@n",
        "answered",
        "truncated",
    ]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    for name, result in summary["benchmarks"].items():
        cells = [name, str(result["problems"]), str(result["n"])]
        cells += [_fmt(result["pass@k"].get(k)) for k in ks]
        cells += [_fmt(result["maj@k"].get(k)) for k in ks]
        cells += [_fmt(result["mean@n"]), _fmt(result["answered"]), _fmt(result["truncated"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_pass_at_k(summary: dict[str, Any], path: Path) -> Path:
    """pass@k (solid) and maj@k (dashed) against k, one colour per benchmark, log2 k axis."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on training/eval machines
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for name, result in summary["benchmarks"].items():
        ks = sorted(int(k) for k in result["pass@k"])
        (line,) = axes.plot(ks, [result["pass@k"][str(k)] for k in ks], marker="o", label=f"{name} pass@k")
        if ks[-1] > 1:
            axes.plot(
                ks,
                [result["maj@k"][str(k)] for k in ks],
                marker="x",
                linestyle="--",
                color=line.get_color(),
                label=f"{name} maj@k",
            )
    all_ks = sorted({int(k) for r in summary["benchmarks"].values() for k in r["pass@k"]})
    title = f"{policy_label(summary['policy'])[:60]} (T={summary['sampling']['temperature']})"
    style_k_axis(axes, all_ks, "accuracy", title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def write_reports(out_dir: Path, summary: dict[str, Any]) -> dict[str, Path]:
    """Write ``summary.json``, ``summary.md`` and ``pass_at_k.png`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / SUMMARY_JSON, "markdown": out_dir / SUMMARY_MD, "plot": out_dir / PLOT_PNG}
    write_atomic(paths["json"], json.dumps(summary, indent=2, sort_keys=True) + "\n")
    write_atomic(paths["markdown"], summary_markdown(summary))
    plot_pass_at_k(summary, paths["plot"])
    return paths


def load_run(path: str | Path) -> dict[str, Any]:
    """A run summary from a run folder or its ``summary.json``."""
    path = Path(path)
    file = path / SUMMARY_JSON if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no eval summary at {str(file)!r} (give a run folder or its {SUMMARY_JSON})")
    return json.loads(file.read_text())


def compare_runs(a: dict[str, Any], b: dict[str, Any], labels: tuple[str, str] = ("A", "B")) -> str:
    """Both runs' metrics side by side, per benchmark, with the difference B − A (markdown table).

    Benchmarks or k values present in only one run show "—" for the other.
    """
    label_a, label_b = labels
    lines = [
        f"{label}: {policy_label(run['policy'])} (T={run['sampling']['temperature']}, n={run['sampling']['n']})"
        for label, run in ((label_a, a), (label_b, b))
    ]
    lines += [
        "",
        f"| benchmark | metric | {label_a} | {label_b} | Δ ({label_b} − {label_a}) |",
        "|---|---|---:|---:|---:|",
    ]
    names = list(a["benchmarks"]) + [name for name in b["benchmarks"] if name not in a["benchmarks"]]
    for name in names:
        ra, rb = a["benchmarks"].get(name), b["benchmarks"].get(name)
        for metric, va, vb in _metric_rows(ra, rb):
            delta = _fmt(vb - va) if va is not None and vb is not None else "—"
            if delta not in ("—",) and not delta.startswith("-"):
                delta = "+" + delta
            lines.append(f"| {name} | {metric} | {_fmt(va)} | {_fmt(vb)} | {delta} |")
        count_a = ra["problems"] if ra else "—"
        count_b = rb["problems"] if rb else "—"
        lines.append(f"| {name} | problems | {count_a} | {count_b} | |")
    return "\n".join(lines)


def _metric_rows(ra: dict[str, Any] | None, rb: dict[str, Any] | None) -> list[tuple[str, float | None, float | None]]:
    rows = []
    for family in ("pass@k", "maj@k"):
        ks = sorted({int(k) for r in (ra, rb) if r for k in r[family]})
        prefix = family.split("@")[0]
        for k in ks:
            value_a = ra[family].get(str(k)) if ra else None
            value_b = rb[family].get(str(k)) if rb else None
            rows.append((f"{prefix}@{k}", value_a, value_b))
    rows.append(("mean@n", ra["mean@n"] if ra else None, rb["mean@n"] if rb else None))
    return rows
