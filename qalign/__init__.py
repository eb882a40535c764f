"""qalign: value-based LLM post-training (ShiQ, DQO, Q#, Q-probe) and the GRPO/QAE baselines, on TRL."""

__version__ = "0.1.0"
