"""``python -m qalign.compare --config configs/compare_demo.yaml`` (also ``qalign compare``).

Runs every method of the config on one task with one training-sample budget, grades each on the same
held-out problems (greedy and sampled, with confidence intervals and paired tests), and writes
``report.md``, ``report.json``, ``frontier.png`` and ``curves.png`` to ``output_dir``. A killed
comparison started again reruns nothing that finished.
"""

from __future__ import annotations

import logging
import sys

from qalign.config import exit_on_config_error


def main(argv: list[str] | None = None) -> dict | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    with exit_on_config_error():
        from qalign.compare.config import parse_compare_args

        config = parse_compare_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from qalign.compare.runner import run_compare

    record = run_compare(config)
    print(f"qalign compare: report in {config.root / 'report.md'}", flush=True)
    return record


if __name__ == "__main__":
    main()
