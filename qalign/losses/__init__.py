"""Every algorithm's math as pure tensor functions, one module per family.

Trainers only gather tensors and call these; each is tested alone on hand-computed numbers.
"""

from qalign.losses.advantages import quantile_advantages, quantile_baseline

__all__ = ["quantile_advantages", "quantile_baseline"]
