"""Pool comparisons that differ only in the training seed: each method's accuracy and each paired difference
over seeds × problems, with intervals that count the seeds drawn as well as the problems.

One comparison's intervals resample the held-out problems of one training run. Training the same recipe
again with another seed moves its score too, so a difference between two recipes that one run calls
significant may be the seed's. Run the comparison once per seed into folders of their own, e.g.

    python -m qalign.compare --config configs/compare_demo.yaml --shared.seed 1 --output_dir outputs/seed1

then pool them:

    python -m qalign.compare.seeds outputs/compare_demo outputs/seed1 outputs/seed2 \\
        --methods grpo_sft,shiq_online_sft --output_dir outputs/seeds

Only each folder's ``report.json`` is read: its rows hold every method's per-problem scores and training
seed, so a report copied out of its folder (docs/compare_demo_seed1/report.json, say) pools as well. The
folders must have graded the same held-out problems the same way (their reports' ``heldout`` agree); a trained
method must have a different seed in every folder. Prints the tables; with ``--output_dir``
also writes ``seeds.md``, ``seeds.json`` and ``seeds.png``. The interval is ``stats.seeds_interval``'s.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import Any

from qalign.compare.report import format_interval
from qalign.compare.stats import seeds_interval
from qalign.reporting import write_atomic

MODES = {"greedy": "greedy", "sampled": "mean@n"}


class SeedsError(ValueError):
    """Folders that cannot be pooled; the message names the folder and what is wrong."""


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SeedsError(f"{path} does not exist: is its folder a finished qalign.compare output?")
    return json.loads(path.read_text())


def _report(folder: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """``folder``'s report.json and its rows by method name (every row is a finished method)."""
    report = _read_json(folder / "report.json")
    rows = {row["name"]: row for row in report["rows"]}
    for row in rows.values():
        if any(row.get(mode) is not None and "scores" not in row[mode] for mode in MODES):
            raise SeedsError(f"{folder / 'report.json'} holds no per-problem scores (it was written before qalign "
                             f"recorded them): run its comparison again to rewrite the report; nothing finished "
                             f"is rerun")  # fmt: skip
    return report, rows


def load_seeds(
    folders: list[Path], methods: list[str] | None
) -> tuple[dict[str, Any], dict[str, list[dict]], dict[str, list[int | None]]]:
    """(the shared held-out settings, method → its report row in each folder, method → its training seed in each
    folder), after checking they pool."""
    if len(folders) < 2:
        raise SeedsError("give at least two comparison folders, one per training seed")
    reports, rows = zip(*(_report(folder) for folder in folders))
    heldout = reports[0]["heldout"]
    for folder, report in zip(folders[1:], reports[1:]):
        differing = sorted(k for k in heldout.keys() | report["heldout"].keys()
                           if heldout.get(k) != report["heldout"].get(k))  # fmt: skip
        if differing:
            raise SeedsError(f"{folder} graded other held-out problems or another way than {folders[0]} "
                             f"(heldout {', '.join(differing)} differ): pool only runs of one held-out set")  # fmt: skip
    in_all = [name for name in rows[0] if all(name in other for other in rows[1:])]
    if methods:
        for method in methods:
            missing = [str(folder) for folder, found in zip(folders, rows) if method not in found]
            if missing:
                raise SeedsError(f"method {method!r} has no result in {', '.join(missing)}; "
                                 f"finished in every folder: {', '.join(in_all) or 'none'}")  # fmt: skip
    chosen = methods or in_all
    if not chosen:
        raise SeedsError("no method finished in every folder")
    seeds_of = {method: [found[method].get("seed") for found in rows] for method in chosen}
    for method, seeds in seeds_of.items():
        repeated = [s for s in set(seeds) if s is not None and seeds.count(s) > 1]
        if repeated:
            twins = [str(f) for f, s in zip(folders, seeds) if s == repeated[0]]
            raise SeedsError(f"method {method!r} was trained with the same seed {repeated[0]} in {' and '.join(twins)}: "
                             f"a repeat is not another sample of the seed")  # fmt: skip
    return heldout, {method: [found[method] for found in rows] for method in chosen}, seeds_of


def pool(results: dict[str, list[dict]], confidence: float) -> dict[str, Any]:
    """Each method's pooled accuracies, and every later-listed method minus every earlier one."""
    methods: dict[str, Any] = {}
    for name, runs in results.items():
        kls = [run["kl_per_token"] for run in runs if run.get("kl_per_token") is not None]
        methods[name] = {mode: seeds_interval([run[mode]["scores"] for run in runs], confidence).as_dict()
                         for mode in MODES if all(run.get(mode) for run in runs)}  # fmt: skip
        methods[name]["kl_per_token"] = kls if len(kls) == len(runs) else None
    differences = []
    for (b, runs_b), (a, runs_a) in itertools.combinations(results.items(), 2):
        row: dict[str, Any] = {"a": a, "b": b}
        for mode in MODES:
            if all(run.get(mode) for run in runs_a + runs_b):
                gaps = [[x - y for x, y in zip(ra[mode]["scores"], rb[mode]["scores"], strict=True)]
                        for ra, rb in zip(runs_a, runs_b)]  # fmt: skip
                row[mode] = seeds_interval(gaps, confidence).as_dict()
        differences.append(row)
    return {"methods": methods, "differences": differences}


def _per_seed(cell: dict[str, Any] | None, signed: bool = False) -> str:
    f = "{:+.3f}" if signed else "{:.3f}"
    return "n/a" if cell is None else " / ".join(f.format(v) for v in cell["seed_means"])


def _seeds_line(seeds: dict[str, list[int | None]]) -> str:
    """``0 / 1 / 2`` when every trained method used the same seeds, else each method's."""
    trained = {name: values for name, values in seeds.items() if any(v is not None for v in values)}
    as_text = {name: " / ".join(str(v) for v in values) for name, values in trained.items()}
    if len(set(as_text.values())) == 1:
        return next(iter(as_text.values()))
    return "; ".join(f"{name} {text}" for name, text in as_text.items()) or "none recorded"


def seeds_markdown(record: dict[str, Any]) -> str:
    n = record["heldout"].get("n")
    level = round(record["confidence"] * 100)
    lines = [
        f"# Pooled over {len(record['folders'])} training seeds",
        "",
        f"Folders: {', '.join(f'`{f}`' for f in record['folders'])}. Held-out: {record['heldout'].get('graded')} "
        f"problems ({record['heldout'].get('split')} split of {record['heldout'].get('benchmark')}), greedy and "
        f"mean@{n}. Pooled = the mean over seeds × problems; its {level}% interval counts the seeds drawn as well "
        "as the problems (two-way random effects, t on Satterthwaite's degrees of freedom: with few seeds, wide).",
        "",
        f"Training seeds, in folder order: {_seeds_line(record['seeds'])}.",
        "",
        f"| method | greedy per seed | greedy pooled | mean@{n} per seed | mean@{n} pooled | KL/token per seed |",
        "|---|---|---|---|---|---|",
    ]
    for name, cells in record["methods"].items():
        kl = " / ".join(f"{v:.3f}" for v in cells["kl_per_token"]) if cells["kl_per_token"] else "n/a"
        lines.append(f"| {name} | {_per_seed(cells.get('greedy'))} | {format_interval(cells.get('greedy'))} | "
                     f"{_per_seed(cells.get('sampled'))} | {format_interval(cells.get('sampled'))} | {kl} |")  # fmt: skip
    if record["differences"]:
        lines += ["", "## Paired differences (same problems, each seed's run against the same seed's; * = interval "
                  "excludes 0)", "", f"| A − B | greedy per seed | greedy pooled | mean@{n} per seed | mean@{n} pooled |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for row in record["differences"]:
            g, s = row.get("greedy"), row.get("sampled")
            lines.append(f"| {row['a']} − {row['b']} | {_per_seed(g, True)} | {format_interval(g, True)} | "
                         f"{_per_seed(s, True)} | {format_interval(s, True)} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot_seeds(record: dict[str, Any], path: Path) -> Path:
    """Per method: each seed's accuracy (dots) and the pooled mean with its interval (bar), greedy and mean@n."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(record["methods"])
    figure, axes = plt.subplots(1, 2, figsize=(max(6, 1.2 * len(names) + 3), 4), sharey=True)
    for axis, (mode, label) in zip(axes, MODES.items()):
        for i, name in enumerate(names):
            cell = record["methods"][name].get(mode)
            if cell is None:
                continue
            axis.errorbar(i, cell["estimate"], yerr=[[cell["estimate"] - cell["low"]], [cell["high"] - cell["estimate"]]],
                          fmt="s", color="black", capsize=4)  # fmt: skip
            axis.scatter([i + 0.15] * len(cell["seed_means"]), cell["seed_means"], color="tab:blue", s=14)
        axis.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        axis.set_title(label.replace("@n", f"@{record['heldout'].get('n')}"))
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("held-out accuracy")
    level = round(record["confidence"] * 100)
    figure.suptitle(f"dots: one training seed each; squares and bars: pooled mean and {level}% interval", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m qalign.compare.seeds", description=__doc__.split("\n")[0])
    parser.add_argument("folders", type=Path, nargs="+", help="qalign.compare output folders, one per training seed")
    parser.add_argument("--methods", help="comma-separated methods, baselines first (default: every method "
                        "finished in all folders)")  # fmt: skip
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--output_dir", type=Path, help="write seeds.md, seeds.json and seeds.png here")
    args = parser.parse_args(argv)
    if not 0 < args.confidence < 1:
        raise SystemExit(f"qalign: --confidence must be in (0, 1), got {args.confidence}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    try:
        heldout, results, seeds = load_seeds(args.folders, methods)
    except SeedsError as error:
        raise SystemExit(f"qalign: {error}") from None
    record = {"folders": [str(f) for f in args.folders], "heldout": heldout, "confidence": args.confidence,
              "seeds": seeds,
              **pool(results, args.confidence)}  # fmt: skip
    markdown = seeds_markdown(record)
    print(markdown, end="")
    if args.output_dir is not None:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(args.output_dir / "seeds.json", json.dumps(record, indent=2) + "\n")
        write_atomic(args.output_dir / "seeds.md", markdown)
        plot_seeds(record, args.output_dir / "seeds.png")
        print(f"qalign compare.seeds: {len(results)} methods over {len(args.folders)} seeds; "
              f"report in {args.output_dir / 'seeds.md'}")  # fmt: skip
    return record


if __name__ == "__main__":
    main()
