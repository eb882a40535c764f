"""Evaluation: pass@k / maj@k / mean@n of a policy on math benchmarks, resumable JSONL results.

    python -m qalign.eval --config configs/eval_math.yaml [--key value ...]
    python -m qalign.eval --compare RUN_A RUN_B

Imports are lazy so that config validation (``qalign.eval.config``) never pulls in torch.
"""

from __future__ import annotations

from qalign._lazy import lazy_exports

_EXPORTS = {
    "pass_at_k": "qalign.eval.metrics",
    "maj_at_k": "qalign.eval.metrics",
    "mean_at_n": "qalign.eval.metrics",
    "BENCHMARKS": "qalign.eval.benchmarks",
    "Problem": "qalign.eval.benchmarks",
    "load_benchmark": "qalign.eval.benchmarks",
    "EvalArguments": "qalign.eval.config",
    "parse_eval_args": "qalign.eval.config",
    "Policy": "qalign.policies",
    "EnginePolicy": "qalign.policies",
    "load_policy": "qalign.eval.runner",
    "run_eval": "qalign.eval.runner",
    "compare_runs": "qalign.eval.report",
    "heldout_accuracy": "qalign.eval.accuracy",
}

__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
