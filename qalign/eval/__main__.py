"""``python -m qalign.eval`` / ``qalign eval``: run an eval from a config, or compare two runs.

python -m qalign.eval --config configs/eval_math.yaml --n 8 --temperature 0.6
python -m qalign.eval --compare outputs/eval_base outputs/eval_grpo
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

from qalign.config import exit_on_config_error
from qalign.eval.benchmarks import BenchmarkError
from qalign.eval.config import ConfigError, parse_eval_args
from qalign.policies import PolicyError


def _compare(paths: list[str]) -> int:
    from qalign.eval.report import compare_runs, load_run

    if len(paths) != 2:
        raise ConfigError("--compare takes two run folders (or summary.json files)")
    runs = [load_run(p) for p in paths]
    print(compare_runs(runs[0], runs[1], labels=(paths[0], paths[1])))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: returns 0 when done; a bad config prints one line ``qalign: …``, bad data found
    while running ``error: …``, and both raise SystemExit(2) (raised rather than returned because
    ``qalign.cli`` ignores the return value)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if argv and argv[0] == "--compare":
        with _run_errors_exit():
            return _compare(argv[1:])
    with exit_on_config_error():
        args = parse_eval_args(argv)
    from qalign.eval.runner import run_eval

    with _run_errors_exit():
        run_eval(args)
    return 0


@contextlib.contextmanager
def _run_errors_exit() -> Iterator[None]:
    """Bad input found while running (a benchmark file in another schema, a missing run folder): one line."""
    try:
        yield
    except (ConfigError, BenchmarkError, FileNotFoundError, PolicyError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    sys.exit(main())
