"""Probes Q_θ(x, a) on fixed features φ(x, a): linear (the paper's ``nn.Linear(d, 1)``) or a small MLP.

Features are standardised with the training set's mean and standard deviation, stored as buffers:
an affine map of φ, so a depth-1 probe is still exactly wᵀφ + b, while the optimiser sees
unit-scale inputs whatever the embedder (hidden states of LMs have a few huge coordinates).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn


class Probe(nn.Module):
    """Q_θ(x, a) = g_θ((φ − μ) / σ).

    Args:
        dim: feature size d.
        depth: 1 = linear with bias (d + 1 parameters); 2 or 3 = MLP with ``depth − 1`` hidden ReLU
            layers of width ``hidden`` (the reference code's variants).
        hidden: hidden width (256 in the reference code's code experiments).
        mean, std: ``(d,)`` feature statistics; None = no standardisation.

    Example::

        probe = Probe(384, depth=1, mean=x.mean(0), std=x.std(0))
        q = probe(x)  # (N,)
    """

    def __init__(
        self,
        dim: int,
        depth: int = 1,
        hidden: int = 256,
        mean: torch.Tensor | None = None,
        std: torch.Tensor | None = None,
    ):
        super().__init__()
        if depth < 1:
            raise ValueError(f"probe depth must be >= 1, got {depth}")
        self.config = {"dim": dim, "depth": depth, "hidden": hidden}
        self.register_buffer("mean", torch.zeros(dim) if mean is None else mean.detach().float().clone())
        # A constant feature would divide by zero: give it scale 1 (it then contributes only to the bias).
        std = torch.ones(dim) if std is None else std.detach().float().clone()
        self.register_buffer("std", torch.where(std > 1e-6, std, torch.ones_like(std)))
        layers: list[nn.Module] = []
        width = dim
        for _ in range(depth - 1):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(..., d)`` features → ``(...)`` probe values."""
        return self.net((features.float() - self.mean) / self.std).squeeze(-1)

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        from qalign.atomic import atomic_path

        with atomic_path(path) as tmp:  # a kill mid-save never leaves a torn probe file
            torch.save({"config": self.config, "state_dict": self.state_dict(), "extra": extra or {}}, tmp)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Probe:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        probe = cls(**blob["config"])
        probe.load_state_dict(blob["state_dict"])
        probe.extra = blob.get("extra", {})
        return probe.eval()
