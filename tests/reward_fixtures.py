"""Reward functions that a config may name by import path, for the command-line tests."""

from __future__ import annotations


def positional_only(prompts, completions):  # no **kwargs: TRL's call, with completion_ids=…, would fail
    return [0.0 for _ in completions]


def raises_on_odd_lengths(completions, **kwargs):
    """1.0 per completion, but the whole call raises when any completion has an odd length."""
    if any(len(c) % 2 for c in completions):
        raise ValueError("odd length")
    return [1.0 for _ in completions]
