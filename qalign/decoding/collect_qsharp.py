"""Q# data collection (Algorithm 1 of Zhou et al., arXiv 2502.20548), incremental and resumable.

For every prompt, ``num_samples`` times:

1. Roll in with the current guided policy π^k: sample a full response y (as the authors' code does,
   then cut it, which batches well) and draw the switch point c = ⌊U·|y|⌋, U ~ U[0, 1).
2. Keep y[:c+1] and roll out with π_ref from there (guidance off, same T / top-p, the rest of the token
   budget). No roll-out when y[:c+1] is already finished.
3. Grade y[:c+1] + roll-out and store one example: prefix = prompt + y[:c], targets = the tokens from the
   switch on, label = the final reward. "Prefix: All" trains every target position toward the label.

In round 1 π^1 = π_ref (no value model yet), so the roll-in and the roll-out are the same policy and the
sampled y itself is the roll-out: the same distribution as steps 1–2, at half the generation cost.

Storage: one ``qalign.sample_store`` store per (iteration, process). Prompts are processed in fixed
chunks; chunk i is seeded from (seed, iteration, i) only, and its rows plus an end-of-chunk marker go out
in one append. On restart the chunks with a marker are skipped and the others collected again whole (the
rows of an unfinished chunk stay in the file; the marker vouches for the rows written just before it), so
a resumed collection produces the same rows as an uninterrupted one (bit-identical on one machine with the
same engine).
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qalign.rollout.base import RolloutEngine, SamplingConfig
from qalign.sample_store import SampleStore, chunk_seed, read_records, refuse_other_problems

logger = logging.getLogger(__name__)

# (prompt indices, completion token ids, completion texts) → one reward per completion.
RewardFn = Callable[[list[int], list[list[int]], list[str]], list[float]]
PREFIX_MODES = ("all", "single")


@dataclass
class CollectionSettings:
    """What one collection iteration samples; stored beside the data and checked on resume."""

    num_samples: int = 4  # samples per prompt (authors: 16)
    max_tokens: int = 256  # completion budget, roll-in + roll-out
    temperature: float = 0.8
    top_p: float = 0.9
    chunk_size: int = 16  # prompts per resumable chunk (one generate call)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.max_tokens < 1 or self.chunk_size < 1:
            raise ValueError("num_samples, max_tokens and chunk_size must be >= 1")


def switch_point(length: int, u: float) -> int:
    """c = ⌊U·|y|⌋ ∈ [0, |y| − 1]: the roll-in keeps y[:c], y[c] is the first trained action."""
    return min(int(u * length), max(length - 1, 0))


def collect_iteration(
    path: str | Path,
    prompts: Sequence[list[int]],
    ref_engine: RolloutEngine,
    reward_fn: RewardFn,
    settings: CollectionSettings,
    iteration: int = 1,
    rollin_engine: RolloutEngine | None = None,
    decode: Callable[[list[int]], str] | None = None,
    eos_ids: set[int] | None = None,
    rank: int = 0,
    world_size: int = 1,
    description: dict[str, Any] | None = None,
    restart: str = "collect into another path, or pass overwrite=True",
    overwrite: bool = False,
    reward_columns: Sequence[dict[str, Any]] | None = None,
) -> int:
    """Collect (or finish collecting) one iteration into the JSONL file ``path``; returns its row count.

    Args:
        prompts: token ids of every prompt (index = ``prompt_index`` in the rows).
        ref_engine: samples π_ref (the roll-out policy); any ``RolloutEngine``, vLLM included.
        rollin_engine: samples the guided π^k; None in round 1 (π^1 = π_ref).
        decode: completion ids → text for the reward (default: empty strings, for tabular tests).
        eos_ids: tokens that end a response (a roll-in cut right after one gets no roll-out).
        rank, world_size: this process takes chunks ``rank, rank + world_size, …``.
        description: JSON-able identity of the policies (stored and compared on resume with the settings).
        restart: how the caller's user starts over, named when the stored settings differ.
        overwrite: delete an existing file of this iteration and collect it from scratch.
        reward_columns: per prompt, what ``reward_fn`` grades it against besides the completion (the dataset's
            other columns: its gold answer, say). Stored in every row, so a resume on data whose answers
            changed since is refused like one whose prompts changed.
    """
    path = Path(path)
    columns = _as_stored(reward_columns, len(prompts))
    meta = {"settings": asdict(settings), "iteration": iteration, "guided": rollin_engine is not None,
            "num_prompts": len(prompts), "policy": description or {}}  # fmt: skip
    with SampleStore(path, meta, restart=restart, overwrite=overwrite) as store:
        # The settings count the prompts but do not name them: rows of problems that changed since are refused.
        now, stored = _problems(prompts, columns)
        store.refuse_other_problems(now, index="prompt_index", problem_of=stored)
        done = _complete_chunks(store.records)
        chunks = range(rank, -(-len(prompts) // settings.chunk_size), world_size)
        todo = [c for c in chunks if c not in done]
        if done:
            logger.info("Q# iteration %d: resuming %s (%d chunks done, %d to go)", iteration, path, len(done),
                        len(todo))  # fmt: skip
        from tqdm.auto import tqdm

        # Roll-ins and roll-outs of a few hundred prompts take minutes on a CPU: one bar, on the first process.
        for chunk in tqdm(todo, desc=f"Q# iteration {iteration}: collect", unit="chunk", disable=rank != 0):
            start = chunk * settings.chunk_size
            indices = list(range(start, min(start + settings.chunk_size, len(prompts))))
            seed = chunk_seed("qsharp", settings.seed, iteration, chunk)  # the string Q# always hashed
            rows = collect_chunk(indices, prompts, ref_engine, reward_fn, settings, seed, rollin_engine, decode,
                                 eos_ids)  # fmt: skip
            for row in rows:
                row["chunk"] = chunk
                if columns is not None:
                    row["reward_columns"] = columns[row["prompt_index"]]
            store.append([*rows, {"chunk": chunk, "done": len(rows)}])  # the chunk and its marker in one write
        return sum(len(rows) for rows in _complete_chunks(store.records).values())


def refuse_changed_problems(
    paths: Sequence[str | Path],
    prompts: Sequence[list[int]],
    reward_columns: Sequence[dict[str, Any]] | None = None,
    restart: str = "collect into another path, or pass overwrite=True",
) -> None:
    """Refuse earlier iterations' files (the aggregated data a fit reads with this iteration's) when a row's
    problem differs from the one now at its index, as ``collect_iteration`` refuses its own file."""
    now, stored = _problems(prompts, _as_stored(reward_columns, len(prompts)))
    for path in paths:
        refuse_other_problems(path, read_records(path), now, "prompt_index", restart, stored)


def _as_stored(reward_columns: Sequence[dict[str, Any]] | None, num_prompts: int) -> list[Any] | None:
    """``reward_columns`` as a row reads them back: JSON turns tuples into lists, and keeps what it cannot hold
    as its str."""
    if reward_columns is None:
        return None
    if len(reward_columns) != num_prompts:
        raise ValueError(f"reward_columns has {len(reward_columns)} entries for {num_prompts} prompts")
    return json.loads(json.dumps(list(reward_columns), default=str))


def _problems(
    prompts: Sequence[list[int]], columns: list[Any] | None
) -> tuple[dict[int, Any], Callable[[dict[str, Any]], Any]]:
    """What ``refuse_other_problems`` compares: each prompt index's problem now, and a row's problem as stored.

    A row's prompt is its prefix less the roll-in's c = ``switch`` tokens. Rows collected before rows carried
    their reward columns are checked on the prompt alone (as much as they can tell)."""

    def prompt_of(row: dict[str, Any]) -> list[int]:
        return row["prefix_ids"][: len(row["prefix_ids"]) - row["switch"]]

    if columns is None:
        return {i: list(prompt) for i, prompt in enumerate(prompts)}, prompt_of
    now = {i: (list(prompt), columns[i]) for i, prompt in enumerate(prompts)}
    return now, lambda row: (prompt_of(row), row.get("reward_columns", columns[row["prompt_index"]]))


def collect_chunk(
    indices: list[int],
    prompts: Sequence[list[int]],
    ref_engine: RolloutEngine,
    reward_fn: RewardFn,
    settings: CollectionSettings,
    seed: int,
    rollin_engine: RolloutEngine | None = None,
    decode: Callable[[list[int]], str] | None = None,
    eos_ids: set[int] | None = None,
) -> list[dict[str, Any]]:
    """Algorithm 1 on the prompts ``indices``: one example row per (prompt, sample)."""
    rng = random.Random(seed)
    sampling = SamplingConfig(n=settings.num_samples, temperature=settings.temperature, top_p=settings.top_p,
                              max_tokens=settings.max_tokens, seed=seed)  # fmt: skip
    policy = rollin_engine or ref_engine
    rollins = policy.generate([prompts[i] for i in indices], sampling)
    samples = []  # (prompt index, sample, y, c)
    for i, completions in zip(indices, rollins):
        for j, completion in enumerate(completions):
            y = list(completion.completion_ids)
            samples.append((i, j, y, switch_point(len(y), rng.random())))

    if rollin_engine is None:
        responses = [y for _, _, y, _ in samples]  # π^1 = π_ref: y is its own roll-out
    else:
        responses = _roll_out(samples, prompts, ref_engine, settings, seed, eos_ids or set())
    decode = decode or (lambda ids: "")
    rewards = reward_fn([i for i, _, _, _ in samples], responses, [decode(r) for r in responses])
    rows = []
    for (i, j, y, c), response, reward in zip(samples, responses, rewards):
        rows.append({
            "prompt_index": i, "sample": j, "switch": c, "rollin_length": len(y),
            "prefix_ids": list(prompts[i]) + response[:c], "target_ids": response[c:], "reward": float(reward or 0.0),
        })  # fmt: skip
    return rows


def _roll_out(samples, prompts, ref_engine: RolloutEngine, settings: CollectionSettings, seed: int, eos_ids: set[int]):
    """y[:c+1] + a π_ref continuation for each roll-in, in one batched generate call."""
    heads = [y[: c + 1] for _, _, y, c in samples]
    open_rows = [k for k, head in enumerate(heads)
                 if head and head[-1] not in eos_ids and len(head) < settings.max_tokens]  # fmt: skip
    responses = [list(head) for head in heads]
    if not open_rows:
        return responses
    # One call serves them all: it gets the largest budget left, and each roll-out is cut to its own (a
    # prefix of a sample is a sample of the shorter budget).
    budget = settings.max_tokens - min(len(heads[k]) for k in open_rows)
    sampling = SamplingConfig(
        n=1, temperature=settings.temperature, top_p=settings.top_p, max_tokens=budget, seed=seed + 1
    )
    outs = ref_engine.generate([list(prompts[samples[k][0]]) + heads[k] for k in open_rows], sampling)
    for k, completions in zip(open_rows, outs):
        left = settings.max_tokens - len(heads[k])
        responses[k] += list(completions[0].completion_ids)[:left]
    return responses


# ----------------------------------------------------------------------------- storage


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of the complete chunks of ``path`` (a torn last line or an unfinished chunk is ignored)."""
    complete = _complete_chunks(read_records(path))
    return [row for chunk in sorted(complete) for row in complete[chunk]]


def _complete_chunks(records: Sequence[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    """Chunk id → its rows, for every chunk with an end-of-chunk marker ``{"chunk": i, "done": n}``.

    The marker went out in the same write as the n rows before it, so those are the chunk; earlier rows of
    the same chunk are what a killed attempt left behind, kept in the file but superseded.
    """
    pending: dict[int, list[dict[str, Any]]] = {}
    complete: dict[int, list[dict[str, Any]]] = {}
    for record in records:
        if "done" in record:
            rows = pending.pop(record["chunk"], [])
            if len(rows) >= record["done"]:
                complete[record["chunk"]] = rows[len(rows) - record["done"] :]
        else:
            pending.setdefault(record["chunk"], []).append(record)
    return complete


def load_examples(paths: Sequence[str | Path], drop_no_variation: bool = True) -> list[dict[str, Any]]:
    """Every complete row of ``paths`` (all iterations: the aggregated dataset D).

    ``drop_no_variation`` removes, per file, the prompts whose samples all got the same reward (as the
    authors' ``drop_no_variation=1``): they teach the value model nothing about which tokens matter.
    """
    examples: list[tuple[tuple, dict[str, Any]]] = []
    for path in paths:
        rows = read_rows(path)
        if drop_no_variation:
            by_prompt: dict[int, set[float]] = {}
            for row in rows:
                by_prompt.setdefault(row["prompt_index"], set()).add(row["reward"])
            rows = [row for row in rows if len(by_prompt[row["prompt_index"]]) > 1]
        # One order whatever the number of processes that wrote the files (iterXX.rankR.jsonl): the
        # iteration, then the prompt and sample. The same data then gives the same training batches.
        iteration = re.sub(r"\.rank\d+", "", Path(path).name)
        examples.extend(((iteration, row["prompt_index"], row["sample"]), row) for row in rows)
    return [row for _, row in sorted(examples, key=lambda pair: pair[0])]
