"""A user's reward function that raises or hangs is scored by the documented rule; the run goes on."""

from __future__ import annotations

import logging
import threading

from qalign.reward import get_reward_functions
from qalign.reward.guard import GuardedReward


def test_a_raising_batch_is_scored_completion_by_completion(caplog):
    def boom(prompts, completions, **kwargs):
        if any("boom" in c for c in completions):
            raise ValueError("cannot parse")
        return [float(len(c)) for c in completions]

    guarded = GuardedReward(boom, "mod:boom", timeout=30)
    with caplog.at_level(logging.WARNING, logger="qalign.reward.guard"):
        got = guarded(prompts=["p"] * 4, completions=["ab", "boom", "abc", "a"], answer=["1"] * 4, trainer_state=None)
    assert got == [2.0, None, 3.0, 1.0]
    assert dict(guarded.counts) == {"calls": 1, "completions": 4, "raised": 1}
    assert ("reward function 'mod:boom' raised (ValueError: cannot parse); 1 of 4 completions scored None "
            "(so far 1 raised and 0 timed out of 4 completions in 1 calls)") in caplog.text  # fmt: skip
    assert guarded.__name__ == "boom"  # TRL names the reward's metrics after it


def test_a_hanging_call_is_cut_off_and_scores_none():
    release = threading.Event()

    def hangs(prompts, completions, **kwargs):
        release.wait(30)  # a function that never returns in time
        return [1.0 for _ in completions]

    guarded = GuardedReward(hangs, "mod:hangs", timeout=0.2)
    try:
        assert guarded(prompts=["p", "q"], completions=["a", "b"]) == [None, None]
        assert guarded.counts["timed_out"] == 2
    finally:
        release.set()


def test_import_paths_are_guarded_and_qaligns_own_are_not():
    accuracy, user = get_reward_functions(["accuracy", "tests.reward_fixtures:raises_on_odd_lengths"], timeout=5)
    assert not isinstance(accuracy, GuardedReward)
    assert isinstance(user, GuardedReward) and user.timeout == 5 and user.__name__ == "raises_on_odd_lengths"
    assert user(prompts=["p"] * 3, completions=["ab", "abc", "abcd"]) == [1.0, None, 1.0]


def test_training_goes_on_through_a_reward_function_that_raises(tiny_model_dir, tmp_path, caplog, monkeypatch):
    from pathlib import Path

    from qalign.train import main

    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    with caplog.at_level(logging.WARNING, logger="qalign.reward.guard"):
        result = main(["--config", "configs/demo.yaml", "--model_name_or_path", str(tiny_model_dir),
                       "--reward_funcs", "tests.reward_fixtures:raises_on_odd_lengths", "--eval_samples", "0",
                       "--max_steps", "1", "--per_device_train_batch_size", "8", "--num_generations", "4",
                       "--max_completion_length", "6", "--save_strategy", "no", "--output_dir", str(tmp_path)])  # fmt: skip
    assert result == {"before": None, "after": None}
    assert (
        "reward function 'tests.reward_fixtures:raises_on_odd_lengths' raised (ValueError: odd length)" in caplog.text
    )
