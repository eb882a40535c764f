"""Fit a probe on cached (φ, r) arrays with one of the four Q-probe losses. Seconds on a CPU.

Batches are made of whole prompts (the paper: "100 problems × 10 samples"), so every loss sees the
same data per step:

* ``mse`` / ``ce``: every sample of the batch's prompts;
* ``pg``: each prompt's samples are shuffled and cut into chunks of ``chunk_size`` every epoch (as the
  reference code re-chunks every epoch); a short last chunk is kept with a mask, a 1-sample chunk is
  dropped (softmax over one sample has no gradient);
* ``bt``: every pair of samples of one prompt with different rewards, the higher one preferred.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from qalign.losses.qprobe import QPROBE_LOSSES, qprobe_bt_loss, qprobe_ce_loss, qprobe_mse_loss, qprobe_pg_loss
from qalign.probe.models import Probe

logger = logging.getLogger(__name__)


@dataclass
class ProbeData:
    """Cached samples: ``features`` ``(N, d)``, ``rewards`` ``(N,)``, ``groups`` ``(N,)`` prompt index."""

    features: torch.Tensor
    rewards: torch.Tensor
    groups: torch.Tensor

    def __post_init__(self) -> None:
        self.features = self.features.float()
        self.rewards = self.rewards.float()
        self.groups = self.groups.long()
        n = self.features.size(0)
        if self.rewards.shape != (n,) or self.groups.shape != (n,):
            raise ValueError(
                f"features {tuple(self.features.shape)}, rewards {tuple(self.rewards.shape)} and groups "
                f"{tuple(self.groups.shape)} must agree on N"
            )

    def prompt_indices(self) -> list[torch.Tensor]:
        """For each prompt (by increasing group id), the row indices of its samples."""
        if not len(self.groups):
            return []
        _, inverse = torch.unique(self.groups, return_inverse=True)
        order = torch.argsort(inverse, stable=True)
        return list(torch.split(order, torch.bincount(inverse).tolist()))


@dataclass
class ProbeTrainConfig:
    loss: str = field(default="pg", metadata={"help": f"One of {QPROBE_LOSSES}."})
    depth: int = field(default=1, metadata={"help": "1 = linear probe; 2, 3 = MLP."})
    hidden: int = field(default=256, metadata={"help": "MLP hidden width."})
    epochs: int = field(default=150, metadata={"help": "Passes over the prompts (reference: 150)."})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate (reference: 5e-5 on 4096-d features)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (reference: 0)."})
    batch_prompts: int = field(default=100, metadata={"help": "Prompts per optimiser step (all their samples)."})
    chunk_size: int = field(default=10, metadata={"help": "PG: samples per softmax chunk (reference: 10)."})
    beta: float = field(
        default=1.0, metadata={"help": "PG: training temperature β (reference: 1; the probe scale absorbs it)."}
    )
    standardize: bool = field(
        default=True, metadata={"help": "Standardise features with the training set's statistics."}
    )
    seed: int = field(default=0, metadata={"help": "Initialisation and shuffling seed."})

    def __post_init__(self) -> None:
        if self.loss not in QPROBE_LOSSES:
            raise ValueError(f"loss must be one of {QPROBE_LOSSES}, got {self.loss!r}")
        if self.epochs < 1 or self.batch_prompts < 1:
            raise ValueError(f"epochs and batch_prompts must be >= 1, got {self.epochs} and {self.batch_prompts}")
        if self.chunk_size < 2:
            raise ValueError(
                f"chunk_size must be >= 2 (a softmax over one sample has no gradient), got {self.chunk_size}"
            )


def pg_chunks(
    prompts: list[torch.Tensor], chunk_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle each prompt's rows and cut them into chunks: ``(C, chunk_size)`` row indices and a mask.

    A short last chunk is padded (mask False); a 1-sample leftover is dropped (no gradient).
    """
    chunks, masks = [], []
    for n in sorted({len(rows) for rows in prompts}):
        rows = torch.stack([r for r in prompts if len(r) == n])  # (P, n): prompts with n samples
        rows = rows.gather(1, torch.argsort(torch.rand(rows.shape, generator=generator), dim=1))
        per_prompt = -(-n // chunk_size)
        padded = torch.zeros(rows.size(0), per_prompt * chunk_size, dtype=torch.long)
        padded[:, :n] = rows
        mask = (torch.arange(per_prompt * chunk_size) < n).expand_as(padded)
        padded, mask = padded.reshape(-1, chunk_size), mask.reshape(-1, chunk_size)
        keep = mask.sum(1) >= 2
        chunks.append(padded[keep])
        masks.append(mask[keep])
    if not chunks:
        return torch.zeros(0, chunk_size, dtype=torch.long), torch.zeros(0, chunk_size, dtype=torch.bool)
    return torch.cat(chunks), torch.cat(masks)


def preference_pairs(prompts: list[torch.Tensor], rewards: torch.Tensor) -> torch.Tensor:
    """``(P, 2)`` rows (chosen, rejected): every within-prompt pair with r_chosen > r_rejected."""
    pairs = [torch.zeros(0, 2, dtype=torch.long)]
    for n in sorted({len(rows) for rows in prompts}):
        rows = torch.stack([r for r in prompts if len(r) == n])  # (P, n)
        r = rewards[rows]
        p, i, j = torch.nonzero(r.unsqueeze(2) > r.unsqueeze(1), as_tuple=True)  # sample i beats sample j
        pairs.append(torch.stack([rows[p, i], rows[p, j]], dim=1))
    return torch.cat(pairs)


def batch_loss(probe: Probe, data: ProbeData, prompts: list[torch.Tensor], config: ProbeTrainConfig,
               generator: torch.Generator, baseline: float) -> torch.Tensor | None:  # fmt: skip
    """The configured loss on the samples of ``prompts`` (None when the batch holds no usable signal)."""
    rows = torch.cat(prompts)
    q = probe(data.features[rows])  # one forward per step; the losses below index into it
    r = data.rewards[rows]
    if config.loss == "mse":
        return qprobe_mse_loss(q, r)
    if config.loss == "ce":
        return qprobe_ce_loss(q, r)
    # Positions of each prompt's samples inside ``rows``.
    local, offset = [], 0
    for prompt in prompts:
        local.append(torch.arange(offset, offset + len(prompt)))
        offset += len(prompt)
    if config.loss == "pg":
        index, mask = pg_chunks(local, config.chunk_size, generator)
        if not len(index):
            return None
        return qprobe_pg_loss(q[index], r[index], beta=config.beta, baseline=baseline, mask=mask)  # (C, k) chunks
    pairs = preference_pairs(local, r)
    if not len(pairs):
        return None
    return qprobe_bt_loss(q[pairs[:, 0]], q[pairs[:, 1]])


def train_probe(data: ProbeData, config: ProbeTrainConfig) -> tuple[Probe, list[float]]:
    """Train a fresh probe; returns it (in eval mode) and the mean loss of each epoch."""
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    mean = data.features.mean(0) if config.standardize else None
    std = data.features.std(0) if config.standardize and len(data.features) > 1 else None
    probe = Probe(data.features.size(1), config.depth, config.hidden, mean, std)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    prompts = data.prompt_indices()
    # b = mean over prompts of the per-prompt mean reward, as in the reference (a no-op for the gradient).
    baseline = float(torch.stack([data.rewards[rows].mean() for rows in prompts]).mean()) if prompts else 0.0
    history: list[float] = []
    probe.train()
    for _ in range(config.epochs):
        order = torch.randperm(len(prompts), generator=generator).tolist()
        losses = []
        for start in range(0, len(order), config.batch_prompts):
            batch = [prompts[i] for i in order[start : start + config.batch_prompts]]
            loss = batch_loss(probe, data, batch, config, generator, baseline)
            if loss is None:
                continue
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        history.append(sum(losses) / len(losses) if losses else float("nan"))
    logger.info("probe (%s, depth %d): loss %.4f → %.4f", config.loss, config.depth, history[0], history[-1])
    return probe.eval(), history
