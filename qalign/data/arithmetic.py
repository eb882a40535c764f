"""The bundled offline math task: short arithmetic word problems with exact integer answers.

Deterministic for a given (split, seed); the train and test splits come from disjoint seeds and
the test problems are removed from train, so held-out accuracy measures generalisation.
Small numbers keep the embedded default (SmolLM2-135M) in the range where it is right about half
the time: GRPO needs groups with both successes and failures to learn anything.
"""

from __future__ import annotations

import random

_NAMES = ["Ana", "Ben", "Chen", "Dana", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jia", "Kofi", "Lena"]
_ITEMS = ["apples", "books", "coins", "pencils", "stickers", "marbles", "cards", "shells", "stamps", "cookies"]

# (template, answer) pairs; {a} {b} are the operands.
_TEMPLATES = [
    ("{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?", lambda a, b: a + b),
    ("{name} had {a} {item} and gave away {b}. How many {item} are left?", lambda a, b: a - b),
    ("There are {a} boxes with {b} {item} in each box. How many {item} are there in total?", lambda a, b: a * b),
    ("What is {a} + {b}?", lambda a, b: a + b),
    ("What is {a} - {b}?", lambda a, b: a - b),
    ("What is {a} times {b}?", lambda a, b: a * b),
]

SPLIT_SEEDS = {"train": 0, "test": 1, "validation": 2}
SPLIT_SIZES = {"train": 2000, "test": 500, "validation": 500}


def make_problem(rng: random.Random) -> dict[str, str]:
    template, solve = rng.choice(_TEMPLATES)
    a, b = rng.randint(2, 12), rng.randint(1, 12)
    if solve(5, 3) == 2 and b > a:  # subtraction: keep answers non-negative
        a, b = b, a
    question = template.format(a=a, b=b, name=rng.choice(_NAMES), item=rng.choice(_ITEMS))
    return {"question": question, "answer": str(solve(a, b))}


def generate(split: str, size: int | None = None, seed: int | None = None) -> list[dict[str, str]]:
    """Problems of one split as ``{"question", "answer"}`` rows."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"the arithmetic task has splits {sorted(SPLIT_SEEDS)}, not {split!r}")
    size = SPLIT_SIZES[split] if size is None else size
    rng = random.Random(SPLIT_SEEDS[split] if seed is None else seed)
    held_out = set()
    if split == "train":
        test_rng = random.Random(SPLIT_SEEDS["test"])
        held_out = {make_problem(test_rng)["question"] for _ in range(SPLIT_SIZES["test"])}
    rows: list[dict[str, str]] = []
    while len(rows) < size:
        row = make_problem(rng)
        if row["question"] not in held_out:
            rows.append(row)
    return rows
