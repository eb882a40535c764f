"""Response building: stop strings, choice order, usage, and the token-wise split of streamed text."""

from __future__ import annotations

import pytest

from qalign.rollout.base import Completion
from qalign.serve.responses import cut_at_stop, make_choices, text_pieces, usage


def test_cut_at_stop_takes_the_earliest_stop_and_excludes_it():
    assert cut_at_stop("12 #### 42\nnext", ["\n", "####"]) == ("12 ", True)
    assert cut_at_stop("no stop here", ["###"]) == ("no stop here", False)
    assert cut_at_stop("abc", None) == ("abc", False)


def test_choices_are_prompt_major_and_finish_reasons_follow_stops(tiny_tokenizer):
    groups = [
        [Completion([1], [5, 6], "a\nb", [], "length"), Completion([1], [7], "c", [], "stop")],
        [Completion([2, 3], [8, 9, 10], "d", [], "length")],
        ["plain text answer"],  # a text-only policy's answer
    ]
    choices = make_choices(groups, ["\n"], tiny_tokenizer)
    assert [(c.index, c.text, c.finish_reason) for c in choices] == [
        (0, "a", "stop"), (1, "c", "stop"), (2, "d", "length"), (3, "plain text answer", "stop"),
    ]  # fmt: skip
    assert choices[3].completion_ids == tiny_tokenizer("plain text answer", add_special_tokens=False)["input_ids"]
    used = usage([1, 2, 0], choices[:3])
    assert used == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}


@pytest.mark.parametrize(
    "text", ["What is 3 + 4? The answer is 7.", "naïve café ∑ 漢字 🙂 done", "  two  spaces\n\nand lines"]
)
def test_pieces_are_one_per_token_and_join_to_the_text(tiny_tokenizer, text):
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = text_pieces(tiny_tokenizer, ids, text)
    assert "".join(pieces) == text
    assert all(pieces) and "\ufffd" not in "".join(pieces)
    if text.isascii():
        assert len(pieces) == len(ids)  # one chunk per token
    else:
        assert len(ids) > len(pieces) > 1  # a character split over byte tokens waits for its last byte


def test_pieces_stop_at_a_cut_text_and_skip_eos(tiny_tokenizer):
    text = "The answer is 7. #### 42"
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    cut = cut_at_stop(text, ["####"])[0]
    assert "".join(text_pieces(tiny_tokenizer, ids, cut)) == cut == "The answer is 7. "
    assert "".join(text_pieces(tiny_tokenizer, ids, text)) == text
    assert text_pieces(tiny_tokenizer, [], "") == []
