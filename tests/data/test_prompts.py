"""Prompt rendering: templates, the system message and chat-template keyword arguments, in one place."""

from __future__ import annotations

from pathlib import Path

from qalign.data import render_prompt

REPO = Path(__file__).resolve().parents[2]
# A chat template that shows every input it receives, a template keyword among them.
TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
            "{% if enable_thinking is defined and not enable_thinking %}[no-think]{% endif %}[assistant]")  # fmt: skip


def _tokenizer(tiny_model_dir):
    from qalign.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def test_system_prompt_and_template_keywords_reach_the_chat_template(tiny_model_dir):
    tokenizer = _tokenizer(tiny_model_dir)
    assert render_prompt(tokenizer, "1 + 1?", "plain") == "[user] 1 + 1?\n[assistant]"
    got = render_prompt(tokenizer, "1 + 1?", "plain", "Be brief.", {"enable_thinking": False})
    assert got == "[system] Be brief.\n[user] 1 + 1?\n[no-think][assistant]"


def test_training_prompts_carry_system_prompt_and_chat_template_kwargs(tiny_model_dir, tmp_path):
    from qalign.train import build_datasets
    from qalign.train_config import parse_config

    config = tmp_path / "train.yaml"
    config.write_text(f"model_name_or_path: {tiny_model_dir}\nprompt_template: plain\nsystem_prompt: Be brief.\n"
                      f"chat_template_kwargs: {{enable_thinking: false}}\nmax_train_samples: 2\neval_samples: 1\n"
                      f"output_dir: {tmp_path / 'out'}\nnum_generations: 2\nper_device_train_batch_size: 2\n")  # fmt: skip
    train, heldout = build_datasets(parse_config(["--config", str(config)]), _tokenizer(tiny_model_dir))
    rows = [
        *zip(train["prompt"], train["question"], strict=True),
        *zip(heldout["prompt"], heldout["question"], strict=True),
    ]
    assert len(rows) == 3
    for prompt, question in rows:
        assert prompt == f"[system] Be brief.\n[user] {question}\n[no-think][assistant]"


def test_chat_template_kwargs_from_the_command_line_are_typed():
    from qalign.eval.config import parse_eval_args

    args = parse_eval_args(["--config", str(REPO / "configs" / "eval_demo.yaml"),
                            "--chat_template_kwargs", "enable_thinking=false", "budget=2"])  # fmt: skip
    assert args.chat_template_kwargs == {"enable_thinking": False, "budget": 2}
