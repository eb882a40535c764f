"""``python -m qalign.collect --config X.yaml [--key value …]``: an offline rollout dataset.

Samples, grades and stores every prompt of a dataset split with the reference model's statistics, and
a killed run started again resumes where it stopped (``qalign.data.collection`` does the work).

Example (YAML)::

    model_name_or_path: smollm2-135m-instruct
    dataset_name: arithmetic
    prompt_template: boxed_short
    reward_funcs: [accuracy_last_number]
    max_prompts: 64
    num_samples: 4
    max_tokens: 32
    output_dir: outputs/rollouts/arithmetic-smollm2
    rollout:
      backend: hf
"""

from __future__ import annotations

import logging
from pathlib import Path

from qalign.config import exit_on_config_error

# Re-exported: scripts and tests import them from the command's module.
from qalign.data.collection import CollectArguments, collect, collect_from_yaml, parse_collect_args

__all__ = ["CollectArguments", "collect", "collect_from_yaml", "main", "parse_collect_args"]


def main(argv: list[str] | None = None) -> Path:
    with exit_on_config_error():
        collect_args, rollout_args = parse_collect_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    folder = collect(collect_args, rollout_args)
    print(f"rollouts: {folder}", flush=True)
    return folder


if __name__ == "__main__":
    main()
