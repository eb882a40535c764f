"""``python -m qalign.compare --config configs/compare_demo.yaml`` (also ``qalign compare``).

Runs every method of the config on one task with one training-sample budget, grades each on the same
held-out problems (greedy and sampled, with confidence intervals and paired tests), and writes
``report.md``, ``report.json``, ``frontier.png`` and ``curves.png`` to ``output_dir``. A killed
comparison started again reruns nothing that finished.
"""

from __future__ import annotations

import logging
import sys

from qalign.config import ConfigError, split_argv

USAGE = ("usage: python -m qalign.compare --config COMPARE.yaml [--output_dir DIR] [--budget N] "
         "[--heldout.split validation] [--heldout.problems N] [--only METHOD,METHOD]")


def main(argv: list[str] | None = None) -> dict | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        path, overrides, want_help = split_argv(argv)
        if want_help or path is None:
            print(f"{USAGE}\n\n{__doc__}", file=sys.stderr)
            raise SystemExit(0 if want_help else 2)
        from qalign.compare.config import load_compare_config

        if "budget" in overrides:
            overrides["budget"] = int(overrides["budget"])
        config = load_compare_config(path, overrides)
    except (ConfigError, ValueError) as error:
        print(f"qalign: config error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from qalign.compare.runner import run_compare

    record = run_compare(config)
    print(f"qalign compare: report in {config.root / 'report.md'}", flush=True)
    return record


if __name__ == "__main__":
    main()
