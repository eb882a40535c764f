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
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help") or sys.argv[1] not in COMMANDS:
        print(f"usage: qalign {{{','.join(COMMANDS)}}} --config X.yaml [--key value ...]", file=sys.stderr)
        sys.exit(0 if len(sys.argv) >= 2 and sys.argv[1] in ("-h", "--help") else 2)
    command = sys.argv.pop(1)
    importlib.import_module(COMMANDS[command]).main()
    if command == "train":  # as `python -m qalign.train` does (see exit_without_teardown)
        from qalign.distributed import exit_without_teardown

        exit_without_teardown(0)


if __name__ == "__main__":
    main()
