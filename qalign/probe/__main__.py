"""``python -m qalign.probe --config configs/probe_demo.yaml [--key value ...]``.

Collects n samples per prompt from the base model, embeds them, trains one probe per loss, and
prints the held-out k-table (expected reward of π_{θ,k}); writes results.md, results.json and
reward_vs_k.png to output_dir.
"""

from __future__ import annotations

import logging
import sys
import time

from qalign.config import ConfigError, exit_on_config_error
from qalign.probe.config import parse_probe_args


def main(argv: list[str] | None = None) -> int:
    """Entry point: 0 when done; a bad config prints one line ``qalign: …`` and raises SystemExit(2),
    cached samples made with other settings ``error: …`` and SystemExit(2), an API that fails for good
    ``error: …`` and SystemExit(1)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with exit_on_config_error():
        args = parse_probe_args(argv)
    from qalign.openai_http import ApiError
    from qalign.probe.pipeline import run
    from qalign.probe.report import table_markdown

    start = time.perf_counter()
    try:
        results = run(args)
    except ApiError as error:  # already redacted; what was answered is cached, so a rerun resumes
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    except ConfigError as error:  # the sample store refused to resume: it names what differs and the way out
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    for beta, splits in results["tables"].items():
        print(table_markdown(splits["test"], f"held-out expected reward, β = {beta}"))
        print()
    timings = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in results["timings"].items())
    print(f"total {time.perf_counter() - start:.1f}s ({timings}); results in {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
