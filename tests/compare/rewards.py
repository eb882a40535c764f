"""A reward the tiny random model's samples differ on (it never answers a problem right): the share of
digits in the completion. The comparison's tests train on it so that the policies really move."""

from __future__ import annotations

import time


def digit_share(prompts, completions, **kwargs) -> list[float]:
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [sum(ch.isdigit() for ch in text) / max(len(text), 1) for text in texts]


def digit_share_slowly(prompts, completions, **kwargs) -> list[float]:
    """``digit_share``, a quarter of a second late: a tiny training step then lasts long enough to be killed
    in the middle of a run, not only between runs."""
    time.sleep(0.25)
    return digit_share(prompts, completions, **kwargs)
