"""Small pieces every report writer shares: atomic writes and the "metric vs k" plot axis."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` so that a run killed mid-report never leaves a truncated file behind."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


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
