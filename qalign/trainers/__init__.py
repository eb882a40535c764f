"""Trainers: thin TRL subclasses, one module per algorithm, picked by name from ``registry.TRAINERS``."""
