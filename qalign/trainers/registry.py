"""Algorithm name → (config class, trainer class), as import paths.

Kept free of heavy imports so ``qalign.train_config`` can validate a config before torch/TRL load.
A new trainer is one line here plus its module.
"""

from __future__ import annotations

import importlib

TRAINERS: dict[str, tuple[str, str]] = {
    "grpo": ("qalign.trainers.grpo:GRPOConfig", "qalign.trainers.grpo:GRPOTrainer"),
    "qae": ("qalign.trainers.qae:QAEConfig", "qalign.trainers.qae:QAETrainer"),
    "shiq": ("qalign.trainers.shiq:ShiQConfig", "qalign.trainers.shiq:ShiQTrainer"),
    "shiq_online": ("qalign.trainers.shiq:ShiQOnlineConfig", "qalign.trainers.shiq:ShiQOnlineTrainer"),
    "dqo": ("qalign.trainers.dqo:DQOConfig", "qalign.trainers.dqo:DQOTrainer"),
    "qsharp": ("qalign.trainers.qsharp_config:QSharpConfig", "qalign.trainers.qsharp:QSharpTrainer"),
    "rft": ("qalign.trainers.rft:RFTConfig", "qalign.trainers.rft:RFTTrainer"),
}


def _import(path: str):
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def config_class(algorithm: str) -> type:
    return _import(TRAINERS[algorithm][0])


def trainer_class(algorithm: str) -> type:
    return _import(TRAINERS[algorithm][1])
