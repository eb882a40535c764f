"""The model card (README.md) every qalign trainer writes beside what it saves.

TRL's cards name TRL's trainer class, so QAE and online ShiQ (subclasses of GRPOTrainer) would say GRPO and
cite DeepSeekMath, and the offline and Q# trainers (plain ``transformers.Trainer``s) write none. Here each
method names itself, its paper and citation, the base model, the dataset, the hyperparameters that define
the method, and how to use what was saved (a plain LM, or Q#'s guided policy). ``ModelCardMixin`` makes it
the card of TRL's checkpoint saves too.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class MethodPaper:
    name: str  # as the card's title says it
    title: str
    arxiv: str
    bibtex_key: str
    authors: str  # BibTeX author field
    year: int

    def citation(self) -> str:
        return textwrap.dedent(f"""\
            @article{{{self.bibtex_key},
                title   = {{{self.title}}},
                author  = {{{self.authors}}},
                year    = {self.year},
                eprint  = {{arXiv:{self.arxiv}}},
            }}""")


SHIQ = MethodPaper("ShiQ", "ShiQ: Bringing back Bellman to LLMs", "2505.11081", "clavier2025shiq",
                   "Clavier, Pierre and others", 2025)  # fmt: skip
PAPERS: dict[str, MethodPaper] = {
    "grpo": MethodPaper("GRPO", "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models",
                        "2402.03300", "shao2024deepseekmath", "Shao, Zhihong and others", 2024),
    "qae": MethodPaper("QAE (GRPO with a K-quantile baseline)", "Quantile Advantage Estimation for Entropy-Safe Reasoning",
                       "2509.22611", "wu2025quantile", "Wu and others", 2025),
    "shiq_online": SHIQ,
    "shiq": SHIQ,
    "dqo": MethodPaper("DQO", "Enhancing Multi-Step Reasoning Abilities of Language Models through Direct Q-Function "
                       "Optimization", "2410.09302", "ji2024dqo", "Ji, Kaixuan and Liu, Guanlin and others", 2024),
    "rft": MethodPaper("RFT (rejection-sampling fine-tuning)", "Scaling Relationship on Learning Mathematical "
                       "Reasoning with Large Language Models", "2308.01825", "yuan2023scaling", "Yuan, Zheng and others",
                       2023),
    "qsharp": MethodPaper("Q#", "Q#: Provably Optimal Distributional RL for LLM Post-Training", "2502.20548",
                          "zhou2025qsharp", "Zhou, Jin Peng and others", 2025),
}  # fmt: skip

EMBEDDED_ALIASES = ("smollm2-135m-instruct", "SmolLM2-135M-Instruct", "default")
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
COMMON = ("learning_rate", "max_steps", "num_train_epochs", "per_device_train_batch_size",
          "gradient_accumulation_steps", "max_completion_length", "seed")  # fmt: skip
# The keys that say what the method did, beyond the common training ones.
METHOD_KEYS: dict[str, tuple[str, ...]] = {
    "grpo": ("num_generations", "temperature", "beta", "epsilon", "epsilon_high", "loss_type", "dynamic_sampling"),
    "qae": ("quantile_k", "num_generations", "temperature", "beta", "epsilon", "epsilon_high", "dynamic_sampling"),
    "shiq_online": ("beta", "gamma", "shiq_residual", "num_generations", "temperature"),
    "shiq": ("beta", "gamma", "shiq_residual", "loss_normalizer", "rollouts_path"),
    "dqo": ("beta", "gamma", "lam", "importance_sampling", "is_clip", "value_function", "value_learning_rate",
            "rollouts_path"),
    "rft": ("reward_threshold", "rollouts_path"),
    "qsharp": ("guidance", "eta", "guidance_top_k", "num_iterations", "num_samples_per_prompt", "value_type",
               "value_head", "value_num_layers", "temperature"),
}  # fmt: skip


def _usage(method: str, hub_id: str) -> str:
    if method == "qsharp":
        return textwrap.dedent(f"""\
            The folder holds a value model and `guided_policy.json`; π_ref (the `reference` that file names) stays
            frozen and decoding is guided, π(a|s) ∝ π_ref(a|s)·exp(Q(s,a)/η) over π_ref's top-k tokens:

            ```python
            from huggingface_hub import snapshot_download
            from qalign.decoding import load_guided_policy
            from qalign.rollout import SamplingConfig

            policy = load_guided_policy(snapshot_download("{hub_id}"))   # or the folder qalign saved
            samples = policy.sample(["What is 12 + 30?"], SamplingConfig(n=1, temperature=0.0, max_tokens=128))
            ```""")
    return textwrap.dedent(f"""\
        ```python
        from transformers import pipeline
        generator = pipeline("text-generation", model="{hub_id}")
        print(generator("What is 12 + 30? Put the final answer in \\\\boxed{{}}.", max_new_tokens=128)[0]["generated_text"])
        ```""")


def model_card(method: str, args: Any, base_model: str | None, dataset: str | None, model_id: str) -> str:
    """README.md text for what ``method`` trained with config ``args`` (a trainer config)."""
    from qalign import __version__

    paper = PAPERS[method]
    hyper = {key: getattr(args, key) for key in (*METHOD_KEYS.get(method, ()), *COMMON)
             if getattr(args, key, None) is not None}  # fmt: skip
    hyper = {k: (v.value if hasattr(v, "value") else v) for k, v in hyper.items()}  # enums as their values
    front = {"library_name": "qalign" if method == "qsharp" else "transformers",
             "tags": ["qalign", method, "value-based-rl" if method in ("shiq", "shiq_online", "dqo", "qsharp")
                      else "reinforcement-learning"]}  # fmt: skip
    if base_model in EMBEDDED_ALIASES:
        base_model = EMBEDDED_HUB_ID  # the embedded default is a copy of this hub model
    if base_model and not Path(base_model).expanduser().exists():  # hub metadata takes hub ids, not local paths
        front["base_model"] = base_model
    if dataset and "/" in dataset and not Path(dataset).expanduser().exists():  # a hub dataset id
        front["datasets"] = [dataset]
    table = "\n".join(f"| `{key}` | `{value}` |" for key, value in hyper.items())
    return (
        f"---\n{yaml.safe_dump(front, sort_keys=False, allow_unicode=True)}---\n\n"
        f"# {model_id}\n\n"
        f"Trained with **{paper.name}** ([arXiv {paper.arxiv}](https://arxiv.org/abs/{paper.arxiv})) by qalign "
        f"{__version__}" + (f", from `{base_model}`" if base_model else "") + (f" on `{dataset}`" if dataset else "")
        + ".\n\n## Use\n\n" + _usage(method, model_id) + "\n\n## Hyperparameters\n\n| key | value |\n|---|---|\n"
        + table + f"\n\n## Citation\n\n```bibtex\n{paper.citation()}\n```\n"
    )  # fmt: skip


class ModelCardMixin:
    """``create_model_card`` writes qalign's card (TRL's checkpoint saves call it too). Set ``_method`` on the
    trainer class; ``card_base_model`` / ``card_dataset`` are set by ``qalign.train`` when it knows them."""

    _method: str = ""
    card_base_model: str | None = None
    card_dataset: str | None = None

    def create_model_card(self, model_name: str | None = None, *args: Any, **kwargs: Any) -> None:
        if not self.is_world_process_zero():  # type: ignore[attr-defined]
            return
        output_dir = Path(self.args.output_dir)  # type: ignore[attr-defined]
        model_id = getattr(self.args, "hub_model_id", None) or model_name or output_dir.name  # type: ignore[attr-defined]
        text = model_card(self._method, self.args, self.card_base_model, self.card_dataset, model_id)  # type: ignore[attr-defined]
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "README.md").write_text(text)
