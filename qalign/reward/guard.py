"""A user's reward function that raises or hangs must not end a run that has paid for its rollouts.

``guard_reward_function`` wraps a function given by import path (qalign's own rewards already bound their
time, ``qalign.reward.verify``). The rule, the same for training, collection and the comparison:

- a call that raises is repeated one completion at a time, so one bad completion does not take its batch
  down; a completion whose own call raises scores **None**;
- a call that runs past ``timeout`` seconds scores **None** for its whole batch (repeating a hanging
  function per completion would multiply the wait); the stuck call is left to finish in its own thread;
- TRL turns None into NaN and sums rewards with ``nansum``: with one reward function such a completion
  scores 0, with several it scores the sum of the others.

Every batch with a failure logs one warning with the counts and the first error; ``counts`` keeps the
running totals (calls, completions, raised, timed out).
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 60.0


class GuardedReward:
    """Calls ``function`` with TRL's keyword arguments under the rule of this module."""

    def __init__(self, function: Any, name: str, timeout: float = DEFAULT_TIMEOUT):
        if timeout <= 0:
            raise ValueError(f"reward timeout must be > 0 seconds, got {timeout}")
        self.function, self.name, self.timeout = function, name, timeout
        self.counts: Counter[str] = Counter()
        # Threads, so that a hung call can be abandoned; a few, so that a stuck one does not block the next.
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix=f"reward-{name}")
        functools.update_wrapper(self, function)  # TRL names the reward's metrics by __name__

    def _call(self, kwargs: dict[str, Any]) -> list:
        return self._pool.submit(self.function, **kwargs).result(timeout=self.timeout)

    def __call__(self, **kwargs: Any) -> list:
        size = len(kwargs.get("completions") or [])
        self.counts["calls"] += 1
        self.counts["completions"] += size
        try:
            return list(self._call(kwargs))
        except FutureTimeout:
            self.counts["timed_out"] += size
            logger.warning("reward function %r: ran past %.0f s on a batch of %d: scored None (%s)",
                           self.name, self.timeout, size, self.summary())  # fmt: skip
            return [None] * size
        except Exception as error:
            first = error
        rewards: list = []
        failed = 0
        for i in range(size):
            single = {k: v[i : i + 1] if isinstance(v, list) and len(v) == size else v for k, v in kwargs.items()}
            try:
                (reward,) = self._call(single)  # one completion in, one reward out
                rewards.append(reward)
            except FutureTimeout:
                self.counts["timed_out"] += 1
                failed += 1
                rewards.append(None)
            except Exception:
                self.counts["raised"] += 1
                failed += 1
                rewards.append(None)
        logger.warning("reward function %r raised (%s: %s); %d of %d completions scored None (%s)",
                       self.name, type(first).__name__, first, failed, size, self.summary())  # fmt: skip
        return rewards

    def summary(self) -> str:
        c = self.counts
        return (f"so far {c['raised']} raised and {c['timed_out']} timed out of {c['completions']} completions "
                f"in {c['calls']} calls")  # fmt: skip


def guard_reward_function(function: Any, name: str, timeout: float = DEFAULT_TIMEOUT) -> Any:
    """``function`` under the rule above; an ``async`` function is returned as it is (TRL awaits it)."""
    if inspect.iscoroutinefunction(function) or inspect.iscoroutinefunction(type(function).__call__):
        return function
    return GuardedReward(function, name, timeout)
