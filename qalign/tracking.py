"""Experiment tracking for the commands that are not a ``transformers.Trainer``: eval, probe, compare.

Training goes through transformers' own integrations (``report_to`` of ``TrainingArguments``), so its
losses, rewards and ``qalign train``'s held-out accuracy land wherever TRL users expect them. The other
commands have no Trainer; ``Tracker`` sends their summary numbers (pass@k, maj@k, best-of-k rewards,
the comparison's accuracies and KL) to the same trackers through each tracker's own client:

* ``tensorboard``: event files under ``<output_dir>/runs`` (``torch.utils.tensorboard``), where
  ``tensorboard --logdir`` finds them beside a training run's;
* ``trackio``: the local trackio store (``trackio.init / log / finish``), project ``$TRACKIO_PROJECT``
  or ``qalign``;
* ``wandb``: ``wandb.init / log / finish``, project ``$WANDB_PROJECT`` or ``qalign``.

``report_to`` is checked when the config loads (``check_report_to``), so a tracker that is not installed
fails before any sampling starts.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

TRACKERS = {"tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb"}  # name → package


def check_report_to(value: Any, key: str = "report_to") -> list[str]:
    """``report_to`` as a list of tracker names; "none" / [] → []. Raises ValueError naming the bad entry
    (an unknown tracker, or one whose package is missing) before anything heavy is imported."""
    names = [value] if isinstance(value, str) else list(value or [])
    if names in (["none"], []):
        return []
    for name in names:
        if name not in TRACKERS:
            raise ValueError(f"{key}: {name!r} is not a tracker qalign can send to; valid: none, {', '.join(TRACKERS)}")
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise ValueError(f"{key}: {name} is not installed; `pip install {TRACKERS[name]}` or report_to: none")
    return names


class Tracker:
    """Scalars to every tracker in ``report_to``; a no-op for none. Use as a context manager."""

    def __init__(self, report_to: Any, output_dir: str | Path, run_name: str, config: Mapping[str, Any] | None = None):
        self.names = check_report_to(report_to)
        self.output_dir = Path(output_dir)
        self._writers: dict[str, Any] = {}
        for name in self.names:
            self._writers[name] = getattr(self, f"_open_{name}")(run_name, dict(config or {}))

    def _open_tensorboard(self, run_name: str, config: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(self.output_dir / "runs" / run_name))
        writer.add_text("config", "\n".join(f"    {key}: {value}" for key, value in config.items()))
        return writer

    def _open_trackio(self, run_name: str, config: dict[str, Any]):
        import trackio

        return trackio.init(project=os.environ.get("TRACKIO_PROJECT", "qalign"), name=run_name, config=config)

    def _open_wandb(self, run_name: str, config: dict[str, Any]):
        import wandb

        return wandb.init(project=os.environ.get("WANDB_PROJECT", "qalign"), name=run_name, config=config)

    def log(self, metrics: Mapping[str, float | None], step: int = 0) -> dict[str, float]:
        """Send the finite numbers of ``metrics`` (None and NaN are left out); returns what was sent."""
        sent = {key: float(value) for key, value in metrics.items()
                if value is not None and not (isinstance(value, float) and math.isnan(value))}  # fmt: skip
        if not sent:
            return sent
        for name, writer in self._writers.items():
            if name == "tensorboard":
                for key, value in sent.items():
                    writer.add_scalar(key, value, global_step=step)
            else:
                writer.log(sent, step=step)
        return sent

    def close(self) -> None:
        for name, writer in self._writers.items():
            if name == "tensorboard":
                writer.close()
            else:
                writer.finish()
        self._writers.clear()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
