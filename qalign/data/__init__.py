"""Datasets in one schema (question, answer), prompt templates, the bundled offline task."""

from qalign.data.prompts import TEMPLATES, render_prompt
from qalign.data.sources import check_dataset_name, load_math_split

__all__ = ["TEMPLATES", "check_dataset_name", "load_math_split", "render_prompt"]
