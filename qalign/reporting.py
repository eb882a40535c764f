"""Small pieces every report writer shares: the "metric vs k" plot axis (and, re-exported, atomic writes)."""

from __future__ import annotations

from typing import Any

from qalign.atomic import write_atomic

__all__ = ["style_k_axis", "write_atomic"]


def style_k_axis(axis: Any, ks: list[int], ylabel: str, title: str, ymax: float = 1.0) -> None:
    """k on a log2 axis with a tick per k, y in [0, ymax], grid and legend (matplotlib Axes)."""
    if ks[-1] > 1:
        axis.set_xscale("log", base=2)
    axis.set_xticks(ks, [str(k) for k in ks])
    axis.set_ylim(0, ymax)
    axis.set_xlabel("k")
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
