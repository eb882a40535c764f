"""Offline rollout datasets: one row per sampled completion, stored as parquet shards.

A rollout folder (written by ``python -m qalign.collect``) holds ``meta.json`` (what was collected,
checked on resume) and ``shard-00000.parquet``, ``shard-00001.parquet``, … Each shard holds every
sample of a whole batch of prompts and appears atomically (written aside, then renamed), so after a
crash a folder holds only complete prompts and collection resumes by skipping them.

Columns (per-token lists are aligned with ``completion_ids``):

    prompt_index       int    index of the prompt in its source split (what resume skips on)
    sample_index       int    0 … n−1 among the prompt's samples
    prompt, answer     str    rendered prompt text and gold answer
    completion         str    decoded completion
    prompt_ids         [int]
    completion_ids     [int]  the policy's tokens (EOS kept when it stopped: it is an action)
    action_mask        [int]  1 = token produced by the policy; 0 = environment token (tool/user turn):
                              part of the state, not an action, left out of every loss
    rewards            [float] r_t; a sequence reward sits on the last action token
    reward             float  Σ_t r_t, for inspection and filtering
    ref_logprobs       [float] ln π_ref(a_t | s_t)
    ref_lse            [float] log Σ_a exp ℓ_ref(s_t, a): with ref_logprobs, the raw reference logit
    behavior_logprobs  [float] log-prob of the sampler (after temperature/top-p), for importance weights
    finish_reason      str    "stop" or "length"

Any other dataset with ``prompt``/``completion`` (text or ids) and ``reward`` (scalar) or ``rewards``
(per token) columns loads too (``normalize_rollouts``): the trainer then tokenizes it and computes the
reference statistics once.

Batch layout (``RolloutCollator``): prompts left-padded to width P, completions right-padded to width C,
so completion token t sits at column P + t and is predicted by the logits at column P + t − 1. Every
per-token tensor of a batch is ``(B, C)`` and aligned with the completion.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from qalign.atomic import atomic_path, write_atomic

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

PER_TOKEN_COLUMNS = ("action_mask", "rewards", "ref_logprobs", "ref_lse", "behavior_logprobs")
SHARD_GLOB = "shard-*.parquet"
META_FILE = "meta.json"


def _schema():
    import pyarrow as pa

    floats = pa.list_(pa.float32())
    return pa.schema([
        ("prompt_index", pa.int64()), ("sample_index", pa.int64()), ("prompt", pa.string()), ("answer", pa.string()),
        ("completion", pa.string()), ("prompt_ids", pa.list_(pa.int32())), ("completion_ids", pa.list_(pa.int32())),
        ("action_mask", pa.list_(pa.int8())), ("rewards", floats), ("reward", pa.float32()), ("ref_logprobs", floats),
        ("ref_lse", floats), ("behavior_logprobs", floats), ("finish_reason", pa.string()),
    ])  # fmt: skip


def shard_files(folder: str | Path) -> list[Path]:
    return sorted(Path(folder).glob(SHARD_GLOB))


def is_rollout_folder(path: str | Path) -> bool:
    return Path(path).is_dir() and bool(shard_files(path))


class RolloutWriter:
    """Appends shards to a rollout folder; knows which prompts are already written.

    ``meta`` describes the collection (model, dataset, sampling…): a folder started with a different
    ``meta`` is refused rather than silently mixed.
    """

    def __init__(self, folder: str | Path, meta: dict[str, Any]):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob(".shard-*.tmp"):
            stale.unlink()  # half-written by a killed run: never renamed, never counted
        meta_file = self.folder / META_FILE
        if meta_file.is_file():
            existing = json.loads(meta_file.read_text())
            changed = {k for k in set(existing) | set(meta) if existing.get(k) != meta.get(k)}
            if changed:
                raise ValueError(
                    f"rollout folder {str(self.folder)!r} was collected with different settings ({sorted(changed)}): "
                    f"use another output_dir, or delete it to start over"
                )
        else:
            write_atomic(meta_file, json.dumps(meta, indent=2, sort_keys=True))

    def done_prompts(self) -> set[int]:
        import pyarrow.parquet as pq

        done: set[int] = set()
        for shard in shard_files(self.folder):
            done.update(pq.read_table(shard, columns=["prompt_index"]).column(0).to_pylist())
        return done

    def write(self, rows: list[dict[str, Any]]) -> Path:
        """Write ``rows`` as the next shard, atomically."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        existing = shard_files(self.folder)
        index = int(existing[-1].stem.split("-")[1]) + 1 if existing else 0
        target = self.folder / f"shard-{index:05d}.parquet"
        table = pa.Table.from_pylist(rows, schema=_schema())
        with atomic_path(target) as tmp:
            pq.write_table(table, tmp)
        return target


def load_rollouts(name: str, split: str = "train") -> Dataset:
    """A rollout folder (all shards, in order), or any dataset ``qalign.data.sources`` can load."""
    from datasets import Dataset

    if is_rollout_folder(name):
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.concat_tables([pq.read_table(f) for f in shard_files(name)])
        return Dataset(table)
    from qalign.data.sources import load_raw

    return load_raw(name, split)


def _prompt_ids(row: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    if row.get("prompt_ids") is not None:
        return list(row["prompt_ids"])
    prompt = row["prompt"]
    if isinstance(prompt, list):  # conversational: messages up to the assistant's turn
        return list(tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=False))
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


def _completion_ids(row: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    if row.get("completion_ids") is not None:
        return list(row["completion_ids"])
    completion = row["completion"]
    if isinstance(completion, list):
        from qalign.reward import completion_text

        completion = completion_text(completion)
    ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    # A finished text completion ended with EOS: stopping is an action the policy must learn.
    return ids + [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else ids


def normalize_rollouts(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_prompt_length: int | None = None,
    max_completion_length: int | None = None,
) -> Dataset:
    """Bring any rollout dataset to token form: ``prompt_ids``, ``completion_ids``, ``action_mask``,
    ``rewards`` (a scalar ``reward`` goes on the last action token) and any stored reference /
    behaviour statistics. Rows over the length limits are dropped, not truncated: cutting a completion
    would drop its final reward and turn a stopped episode into a different one."""
    columns = set(dataset.column_names)
    if not ({"prompt_ids", "prompt"} & columns and {"completion_ids", "completion"} & columns):
        raise ValueError(f"a rollout dataset needs prompt(_ids) and completion(_ids) columns, got {sorted(columns)}")
    if not {"rewards", "reward"} & columns:
        raise ValueError(
            f"a rollout dataset needs a 'reward' (per sequence) or 'rewards' (per token) column, got {sorted(columns)}"
        )
    keep = [c for c in ("ref_logprobs", "ref_lse", "behavior_logprobs") if c in columns]

    def convert(row: dict[str, Any]) -> dict[str, Any]:
        prompt_ids, completion_ids = _prompt_ids(row, tokenizer), _completion_ids(row, tokenizer)
        n = len(completion_ids)
        action_mask = list(row["action_mask"]) if row.get("action_mask") is not None else [1] * n
        if row.get("rewards") is not None:
            rewards = [float(r) for r in row["rewards"]]
        else:
            rewards = [0.0] * n
            last_action = max((t for t, m in enumerate(action_mask) if m), default=None)
            if last_action is not None:
                rewards[last_action] = float(row["reward"])
        out = {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "action_mask": action_mask,
               "rewards": rewards}  # fmt: skip
        for column in keep:
            out[column] = row[column]
        for column in ("action_mask", "rewards", *keep):
            if len(out[column]) != n:
                raise ValueError(f"column {column!r} has {len(out[column])} entries for a completion of {n} tokens")
        return out

    from datasets import Dataset

    token_columns = ["prompt_ids", "completion_ids", "action_mask", "rewards"]
    if set(token_columns) <= columns:  # already in token form (qalign.collect): no Python pass over rows
        data = dataset.select_columns(token_columns + keep)
    else:
        data = Dataset.from_list([convert(row) for row in dataset])

    def usable(row: dict[str, Any]) -> bool:
        return (
            len(row["completion_ids"]) > 0 and any(row["action_mask"])
            and (max_prompt_length is None or len(row["prompt_ids"]) <= max_prompt_length)
            and (max_completion_length is None or len(row["completion_ids"]) <= max_completion_length)
        )  # fmt: skip

    before = len(data)
    data = data.filter(usable)
    if len(data) < before:
        logger.warning(
            "dropped %d of %d rollouts: empty, no action, or over max_prompt_length=%s / max_completion_length=%s",
            before - len(data), before, max_prompt_length, max_completion_length,
        )  # fmt: skip
    if len(data) == 0:
        raise ValueError("no usable rollout left after filtering")
    return data


# ----------------------------------------------------------------------------- batches and per-token statistics


class RolloutCollator:
    """Rollout rows → padded tensors.

    Returns ``prompt_ids``/``prompt_mask`` ``(B, P)`` left-padded, ``completion_ids``/``completion_mask``
    ``(B, C)`` right-padded, and each per-token column present in every row (``action_mask``,
    ``rewards``, ``ref_logprobs``, ``ref_lse``, ``behavior_logprobs``) as ``(B, C)``, zero on padding.
    Masks come from lengths, never from the pad id (the pad id is often the EOS id, an action).
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        prompts = [list(r["prompt_ids"]) for r in rows]
        completions = [list(r["completion_ids"]) for r in rows]
        batch = {
            "prompt_ids": _pad(prompts, self.pad_token_id, left=True),
            "prompt_mask": _pad([[1] * len(p) for p in prompts], 0, left=True),
            "completion_ids": _pad(completions, self.pad_token_id),
            "completion_mask": _pad([[1] * len(c) for c in completions], 0),
        }
        for column in PER_TOKEN_COLUMNS:
            if all(r.get(column) is not None for r in rows):
                dtype = torch.long if column == "action_mask" else torch.float32
                batch[column] = _pad([list(r[column]) for r in rows], 0, dtype=dtype)
        if "action_mask" not in batch:
            batch["action_mask"] = batch["completion_mask"].clone()
        batch["action_mask"] = batch["action_mask"] * batch["completion_mask"]
        return batch


def _pad(rows: list[list], value, left: bool = False, dtype: torch.dtype = torch.long) -> torch.Tensor:
    width = max(len(row) for row in rows)
    padded = [[value] * (width - len(row)) + row if left else row + [value] * (width - len(row)) for row in rows]
    return torch.tensor(padded, dtype=dtype)


class TokenStats(NamedTuple):
    logprobs: torch.Tensor  # (B, C) ln π(a_t|s_t) = ℓ(s_t, a_t) − LSE(s_t), fp32
    lse: torch.Tensor  # (B, C) LSE(s_t) over the full vocabulary, fp32
    hidden: torch.Tensor | None  # (B, C, H) last hidden state at the positions that predict a_t


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask and position_ids (counted over real tokens, as generation does)."""
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}


def completion_token_stats(model: torch.nn.Module, batch: dict[str, torch.Tensor], hidden: bool = False) -> TokenStats:
    """One forward pass → per completion token: ln π(a_t|s_t), LSE(s_t) and optionally the hidden state.

    The log-sum-exp runs over the model's whole output vocabulary in fp32, padded rows included:
    that is the normaliser softmax sampling uses, so "logits = shifted Q" holds exactly. ln π is
    formed as ℓ − LSE in the same way for the policy and the precomputed reference, so a policy equal
    to the reference gives a log-ratio of exactly 0.
    """
    width_c = batch["completion_ids"].size(1)
    outputs = model(**model_inputs(batch), logits_to_keep=width_c + 1, output_hidden_states=hidden, use_cache=False)
    logits = outputs.logits[:, -width_c - 1 : -1].float()
    lse = logits.logsumexp(dim=-1)
    logprobs = logits.gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1) - lse
    last_hidden = outputs.hidden_states[-1][:, -width_c - 1 : -1] if hidden else None
    return TokenStats(logprobs, lse, last_hidden)


@torch.no_grad()
def reference_stats(
    model: torch.nn.Module, rows: list[dict[str, Any]], pad_token_id: int, batch_size: int = 16
) -> list[dict[str, list[float]]]:
    """``ref_logprobs`` and ``ref_lse`` (unpadded lists) for each row, from ``model`` in eval mode."""
    collate = RolloutCollator(pad_token_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[dict[str, list[float]]] = []
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            batch = {k: v.to(device) for k, v in collate(chunk).items()}
            stats = completion_token_stats(model, batch)
            for i, row in enumerate(chunk):
                n = len(row["completion_ids"])
                out.append({"ref_logprobs": stats.logprobs[i, :n].tolist(), "ref_lse": stats.lse[i, :n].tolist()})
    finally:
        model.train(was_training)
    return out
