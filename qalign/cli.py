"""``qalign <command> …``: one console script for every entry point (``python -m qalign.<command>``)."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": "qalign.train",
    "collect": "qalign.collect",
    "eval": "qalign.eval.__main__",
    "config": "qalign.train_config",  # validate a training config and print it resolved
    "probe": "qalign.probe.__main__",
    "compare": "qalign.compare.__main__",
    "serve": "qalign.serve.__main__",
}
SUMMARIES = {
    "train": "train a policy: GRPO, QAE, online/offline ShiQ, DQO, RFT or Q# (accelerate launch -m qalign.train …)",
    "collect": "sample, grade and store an offline rollout dataset (resumable) for shiq, dqo and rft",
    "eval": "pass@k / maj@k of a model or adapter on math benchmarks (gsm8k, math500, aime24/25, amc23)",
    "config": "check a training config and print it resolved, as YAML ready to rerun",
    "probe": "train a Q-probe on embeddings (local model or an OpenAI-compatible API) and grade best-of-k",
    "compare": "every method on one task at one sample budget, with intervals, KL and plots",
    "serve": "serve any saved policy (model, LoRA, Q#, Q-probe) over an OpenAI-compatible HTTP API",
}


def usage() -> str:
    lines = ["usage: qalign <command> --config X.yaml [--key value ...]", "", "commands:"]
    lines += [f"  {name:<8} {SUMMARIES[name]}" for name in COMMANDS]
    lines += [
        "",
        "`qalign <command> --help` lists a command's keys; `--debug` shows a traceback on errors;",
        "`qalign --version` prints the version.",
    ]
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) >= 2 and sys.argv[1] in ("-V", "--version"):
        from qalign import __version__

        print(f"qalign {__version__}")
        sys.exit(0)
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(usage())
        sys.exit(0 if len(sys.argv) >= 2 else 2)
    if sys.argv[1] not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(sys.argv[1], COMMANDS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        print(f"qalign: unknown command {sys.argv[1]!r}; valid: {', '.join(COMMANDS)}.{hint}", file=sys.stderr)
        sys.exit(2)
    command = sys.argv.pop(1)
    importlib.import_module(COMMANDS[command]).main()
    if command == "train":  # as `python -m qalign.train` does (see exit_without_teardown)
        from qalign.distributed import exit_without_teardown

        exit_without_teardown(0)


if __name__ == "__main__":
    main()
