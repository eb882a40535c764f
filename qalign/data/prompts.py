"""Prompt templates: one rendering path for training, collection and evaluation."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TEMPLATES = {
    # Zero-shot chain of thought with the answer in \boxed{}: what the verifier reads first.
    "boxed": "{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}.",
    "plain": "{question}",
    # Short instruction: small models follow it far more often than the CoT one.
    "boxed_short": "{question} Put the final answer in \\boxed{{}}.",
}


def render_prompt(
    tokenizer: PreTrainedTokenizerBase,
    question: str,
    template: str = "boxed",
    system_prompt: str | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
    messages: list[dict[str, str]] | None = None,
) -> str:
    """The prompt text for ``question``: through the chat template when the tokenizer has one (with a
    system message when given, and ``chat_template_kwargs`` such as ``enable_thinking`` passed to the
    template), as plain text (with a trailing newline) otherwise. ``messages`` (a conversational row's
    prompt turns, ``qalign.data.formats``) are rendered as they are, in place of ``question`` and
    ``template``. Every command renders prompts here."""
    if messages:  # a conversational row: its turns are the prompt, as written (no prompt_template)
        turns = list(messages)
        if system_prompt and not any(turn["role"] == "system" for turn in turns):
            turns.insert(0, {"role": "system", "content": system_prompt})
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(
                turns, tokenize=False, add_generation_prompt=True, **(chat_template_kwargs or {})
            )
        return "\n\n".join(turn["content"] for turn in turns) + "\n"
    if template not in TEMPLATES:
        raise ValueError(f"prompt_template {template!r} is not one of {sorted(TEMPLATES)}")
    content = TEMPLATES[template].format(question=question)
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": content})
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **(chat_template_kwargs or {})
        )
    prefix = f"{system_prompt}\n\n" if system_prompt else ""
    return f"{prefix}{content}\n"
