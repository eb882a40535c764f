"""``ValueCollator``: Q#'s training examples (a prefix, the tokens after the switch point, the final reward)
as padded batches for the value model."""

from __future__ import annotations

from typing import Any

import torch


class ValueCollator:
    """Example rows → ``input_ids``/``attention_mask`` ``(B, W)`` (prefix + targets, left-padded),
    ``loss_mask`` ``(B, W)`` on the target tokens (only the first one for ``prefix_mode='single'``) and
    ``rewards`` ``(B,)``."""

    def __init__(self, pad_token_id: int, prefix_mode: str = "all"):
        self.pad_token_id = pad_token_id
        self.prefix_mode = prefix_mode

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        sequences = [list(r["prefix_ids"]) + list(r["target_ids"]) for r in rows]
        width = max(len(s) for s in sequences)
        ids, mask, loss_mask = [], [], []
        for row, seq in zip(rows, sequences):
            pad = width - len(seq)
            trained = len(row["target_ids"]) if self.prefix_mode == "all" else min(1, len(row["target_ids"]))
            untrained = len(seq) - trained
            ids.append([self.pad_token_id] * pad + seq)
            mask.append([0] * pad + [1] * len(seq))
            loss_mask.append([0] * (pad + untrained) + [1] * trained)
        return {
            "input_ids": torch.tensor(ids),
            "attention_mask": torch.tensor(mask),
            "loss_mask": torch.tensor(loss_mask),
            "rewards": torch.tensor([float(r["reward"]) for r in rows]),
        }
