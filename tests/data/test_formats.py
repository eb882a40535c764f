"""TRL's conversational dataset format: read into question/answer/messages, rendered as written, and run
through train, collect, eval and probe on the tiny model."""

from __future__ import annotations

import json

import pytest

from qalign.config import ConfigError
from qalign.data import load_math_split, render_prompt

SYSTEM = {"role": "system", "content": "You are a careful calculator."}
PROBLEMS = [("What is 2 + 3?", "5"), ("What is 4 + 4?", "8"), ("What is 7 - 2?", "5"), ("What is 3 * 3?", "9")]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def messages_file(tmp_path):
    """GSM8K-style conversations: a system turn, the question, the solution ending in '#### n'."""
    rows = [{"messages": [SYSTEM, {"role": "user", "content": q}, {"role": "assistant", "content": f"So #### {a}"}]}
            for q, a in PROBLEMS]  # fmt: skip
    return write_jsonl(tmp_path / "conversations.jsonl", rows)


def test_messages_rows_become_question_answer_and_prompt_turns(messages_file):
    rows = load_math_split(str(messages_file), "train")
    assert rows.column_names == ["question", "answer", "messages"]
    assert rows[0] == {"question": "What is 2 + 3?", "answer": "So #### 5",
                       "messages": [SYSTEM, {"role": "user", "content": "What is 2 + 3?"}]}  # fmt: skip


def test_prompt_as_messages_with_an_answer_column(tmp_path):
    file = write_jsonl(tmp_path / "p.jsonl", [{"prompt": [{"role": "user", "content": "1 + 1?"}], "answer": 2}])
    assert load_math_split(str(file), "train")[0] == {
        "question": "1 + 1?", "answer": "2", "messages": [{"role": "user", "content": "1 + 1?"}]}  # fmt: skip


@pytest.mark.parametrize(
    ("row", "words"),
    [
        ({"prompt": 7, "answer": "1"}, "'prompt': a row holds int"),
        ({"messages": [{"text": "hi"}], "answer": "1"}, "'messages': a row holds list"),
        ({"messages": [{"role": "assistant", "content": "1"}]}, "no user turn"),
        ({"messages": [{"role": "user", "content": "1 + 1?"}]}, "no gold answer"),
        (
            {"messages": [{"role": "narrator", "content": "x"}, {"role": "user", "content": "q"}], "answer": "1"},
            "unknown role 'narrator'",
        ),
    ],
)
def test_rows_of_neither_shape_are_refused_naming_why(tmp_path, row, words):
    with pytest.raises(ConfigError, match=words):
        load_math_split(str(write_jsonl(tmp_path / "bad.jsonl", [row])), "train")


def test_messages_render_as_written_with_the_system_prompt_only_when_missing(tiny_model_dir):
    from qalign.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    tokenizer.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant]"
    user = [{"role": "user", "content": "1 + 1?"}]
    assert render_prompt(tokenizer, "ignored", "boxed", "Be brief.", None, user) == (
        "[system] Be brief.\n[user] 1 + 1?\n[assistant]")  # fmt: skip
    assert render_prompt(tokenizer, "ignored", "boxed", "Be brief.", None, [SYSTEM, *user]) == (
        "[system] You are a careful calculator.\n[user] 1 + 1?\n[assistant]")  # fmt: skip


def test_conversational_data_trains_collects_evaluates_and_probes(tiny_model_dir, messages_file, tmp_path, capsys):
    """End to end on the tiny model: each command reads the conversations and renders them as written."""
    from qalign.collect import main as collect_main
    from qalign.data.rollouts import load_rollouts
    from qalign.eval.__main__ import main as eval_main
    from qalign.probe.__main__ import main as probe_main
    from qalign.train import main as train_main

    model = str(tiny_model_dir)
    result = train_main(["--config", "configs/demo.yaml", "--model_name_or_path", model, "--dataset_name",
                         str(messages_file), "--dataset_test_split", "train", "--eval_samples", "2", "--max_steps", "1",
                         "--per_device_train_batch_size", "4", "--num_generations", "2", "--max_completion_length", "4",
                         "--save_strategy", "no", "--output_dir", str(tmp_path / "train")])  # fmt: skip
    assert set(result) == {"before", "after"}

    collect_main(["--model_name_or_path", model, "--rollout.backend", "hf", "--dataset_name", str(messages_file),
                  "--num_samples", "2",
                  "--max_tokens", "4", "--reward_funcs", "accuracy", "--output_dir", str(tmp_path / "rollouts")])  # fmt: skip
    rollouts = load_rollouts(str(tmp_path / "rollouts"), "train")
    assert len(rollouts) == 8
    assert "You are a careful calculator." in rollouts["prompt"][0] and "What is 2 + 3?" in rollouts["prompt"][0]

    assert eval_main(["--model_name_or_path", model, "--rollout.backend", "hf", "--benchmarks", "gsm8k", "--data_files",
                      f"gsm8k={messages_file}", "--max_tokens", "4", "--output_dir", str(tmp_path / "eval")]) == 0  # fmt: skip
    records = [json.loads(line) for line in (tmp_path / "eval" / "samples" / "gsm8k.jsonl").read_text().splitlines()]
    assert [r["gold"] for r in records] == ["5", "8", "5", "9"]  # from each conversation's '#### n'

    assert probe_main(["--model_name_or_path", model, "--dataset_name", str(messages_file), "--test_split", "train",
                       "--num_train_prompts", "4", "--num_test_prompts", "4", "--samples_per_prompt", "2",
                       "--max_tokens", "4", "--probe.epochs", "2", "--probe.chunk_size", "2", "--k_values", "1", "2",
                       "--embedder.layer", "1", "--output_dir", str(tmp_path / "probe")]) == 0  # fmt: skip
    sample = json.loads((tmp_path / "probe" / "samples_train.jsonl").read_text().splitlines()[0])
    assert "You are a careful calculator." in sample["prompt"]
