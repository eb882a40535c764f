"""The value model's KV cache during guided decoding: one cached scoring step, and a cache over requests
that come and go.

Scoring the top-k candidates a of a state s needs the value model on s + a for each a. Recomputing s each
step costs O(L²) per completion; with a cache, each step runs only the new tokens of s and the k candidates
(``score_with_cache``: the candidates see the cached prefix and themselves, never each other, and are cropped
off the cache after the forward).

HF ``generate`` keeps one batch from start to end, so ``GuidedLogitsProcessor`` holds one cache for it. vLLM
changes its batch every step: requests join, finish, and are moved or preempted. ``RaggedValueCache`` keeps
one batched cache whose rows follow the requests, so a step is still *one* value-model forward for every
guided request (one forward per request cost ~2× π_ref's speed on the embedded default on CPU):

- a request seen for the first time gets a new row: its prefix but the last token is run in a forward of the
  new rows alone (so a long prompt joining does not widen every other row's step), and its cache is
  left-padded to the others' width and appended;
- a row whose cached tokens are no longer a prefix of its request's tokens (vLLM took tokens back, or
  preempted and restarted it) is dropped and started again, so the cache only ever holds what a from-scratch
  forward would compute;
- rows of requests not in the step are dropped (their tensors are sliced out of every layer), and columns no
  remaining row uses are cut from the left, so a cache that never empties (a busy server) stays as wide as its
  oldest request, not as long as the server has run.

Rows that advance by different numbers of tokens in one step are left-padded into one block; the padding stays
in the cache as masked columns.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from qalign.value_model import QSharpValueModel


def candidate_attention_mask(
    cache_mask: torch.Tensor, pending_mask: torch.Tensor, num_candidates: int, dtype: torch.dtype
) -> torch.Tensor:
    """4D additive mask for one cached forward of [pending tokens, k candidates].

    Key columns are [cached (c), pending (m), candidates (k)]. A pending token sees the real cached
    tokens and the real pending tokens up to itself (causal); a candidate sees every real cached and
    pending token and itself, never another candidate. Every query sees itself, so a padding query never
    has an all-masked row (NaN in SDPA); padding keys are never seen by real tokens.

    Args:
        cache_mask: ``(B, c)``; pending_mask: ``(B, m)``, 1 = real token.
    Returns:
        ``(B, 1, m + k, c + m + k)``: 0 where attended, the dtype's minimum elsewhere.
    """
    batch, c = cache_mask.shape
    m, k = pending_mask.size(1), num_candidates
    device = cache_mask.device
    real = torch.cat([cache_mask, pending_mask], dim=1).bool()  # (B, c + m)
    causal = torch.ones(m, m, dtype=torch.bool, device=device).tril()
    pending_rows = torch.cat(
        [
            real[:, None, :c].expand(-1, m, -1),
            real[:, None, c:] & causal,
            torch.zeros(batch, m, k, dtype=torch.bool, device=device),
        ],
        dim=2,
    )
    candidate_rows = torch.cat(
        [real[:, None, :].expand(-1, k, -1), torch.eye(k, dtype=torch.bool, device=device).expand(batch, -1, -1)], dim=2
    )
    allowed = torch.cat([pending_rows, candidate_rows], dim=1)
    allowed[:, torch.arange(m, device=device), c + torch.arange(m, device=device)] = True  # self
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask.unsqueeze(1)


def score_with_cache(
    model: QSharpValueModel,
    cache,
    cache_mask: torch.Tensor,
    n_real: torch.Tensor,
    pending: torch.Tensor,
    pending_mask: torch.Tensor,
    candidates: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Append ``pending`` to the value model's ``cache`` and score each row's candidates after it.

    Args:
        cache: the trunk's ``DynamicCache`` (mutated: it gains the ``m`` pending columns, never the candidates).
        cache_mask: ``(B, c)`` real-token mask of the cached columns; n_real: ``(B,)`` real tokens cached.
        pending: ``(B, m)`` new tokens, left-padded; pending_mask: ``(B, m)``, 1 = real. A Q-type model reads
            the last column, so each row's last pending token must be real.
        candidates: ``(B, k)`` token ids (V-type: required; Q-type: None = the whole vocabulary).
    Returns:
        (head outputs ``(B, K)`` / ``(B, K, A)``, the cache mask after, the real-token counts after).
    """
    positions = (n_real.unsqueeze(1) + pending_mask.cumsum(dim=1) - 1).clamp(min=0)
    if model.value_type == "q":
        attention = torch.cat([cache_mask, pending_mask], dim=1)
        hidden = model.hidden(pending, attention, positions, past_key_values=cache, use_cache=True)
        values = model.q_values(hidden[:, -1], candidates)
    else:
        k = candidates.size(1)
        next_position = (n_real + pending_mask.sum(dim=1)).unsqueeze(1).expand(-1, k)
        ids = torch.cat([pending, candidates], dim=1)
        attention = candidate_attention_mask(cache_mask, pending_mask, k, model.score.weight.dtype)
        hidden = model.hidden(
            ids, attention, torch.cat([positions, next_position], dim=1), past_key_values=cache, use_cache=True
        )
        # The forward appended the k candidates to the cache: drop them, or every later step would
        # attend to k stray tokens at the current position.
        cache.crop(-k)
        values = model.v_values(hidden[:, pending.size(1) :])
    return values, torch.cat([cache_mask, pending_mask], dim=1), n_real + pending_mask.sum(dim=1)


class RaggedValueCache:
    """One batched value-model cache over sequences that join, grow and leave (see the module docstring).

    ``values(keys, prefixes, candidates)`` is one guided step: ``keys`` name the sequences (any hashable,
    unique within a call), ``prefixes`` their full token ids now. The cache afterwards holds exactly these
    sequences; its outputs equal scoring every prefix + candidate from scratch.
    """

    def __init__(self, value_model: QSharpValueModel, device: torch.device | str = "cpu"):
        self.model = value_model
        self.device = torch.device(device)
        self.keys: list[Hashable] = []  # row → key
        self.cached: list[list[int]] = []  # row → the token ids its cache columns hold
        self._reset()

    def _reset(self) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.trunk.config)
        self.cache_mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)
        self.n_real = torch.zeros(0, dtype=torch.long, device=self.device)
        self.keys, self.cached = [], []

    def __len__(self) -> int:
        return len(self.keys)

    @torch.no_grad()
    def values(
        self, keys: Sequence[Hashable], prefixes: Sequence[Sequence[int]], candidates: torch.Tensor | None
    ) -> torch.Tensor:
        """Head outputs ``(n, K)`` / ``(n, K, A)`` of (prefix_i, candidate) for each of the n sequences, in
        the order of ``keys``; ``candidates`` ``(n, k)`` as in ``score_with_cache``."""
        if len(set(keys)) != len(keys):
            raise ValueError("RaggedValueCache.values: keys must be unique within a call")
        wanted = dict(zip(keys, prefixes))
        # A row is kept when its sequence is still asked for and has grown: its cached tokens are a strict
        # prefix of the sequence (a Q-type forward needs at least one new token to read the last state from).
        keep = [
            row
            for row, key in enumerate(self.keys)
            if key in wanted
            and len(self.cached[row]) < len(wanted[key])
            and _starts_with(wanted[key], self.cached[row])
        ]
        if len(keep) < len(self.keys):
            self._select(keep)
        present = set(self.keys)
        self._join([key for key in keys if key not in present], wanted)
        row_of = {key: row for row, key in enumerate(self.keys)}
        order = torch.tensor([row_of[key] for key in keys], device=self.device)

        pending, pending_mask = _left_padded(
            [wanted[key][len(self.cached[row]) :] for row, key in enumerate(self.keys)]
        )
        row_candidates = None
        if candidates is not None:
            row_candidates = torch.empty_like(candidates)
            row_candidates[order] = candidates
        values, self.cache_mask, self.n_real = score_with_cache(
            self.model, self.cache, self.cache_mask, self.n_real,
            pending.to(self.device), pending_mask.to(self.device), row_candidates,
        )  # fmt: skip
        self.cached = [list(wanted[key]) for key in self.keys]
        return values[order]

    def _select(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in this order) of every layer of the cache, and cut the columns none of them uses."""
        if not rows:
            self._reset()
            return
        index = torch.tensor(rows, device=self.device)
        self.cache.batch_select_indices(index)
        self.cache_mask, self.n_real = self.cache_mask[index], self.n_real[index]
        self.keys = [self.keys[row] for row in rows]
        self.cached = [self.cached[row] for row in rows]
        used = self.cache_mask.bool().any(dim=0)
        first = int(used.float().argmax()) if bool(used.any()) else self.cache_mask.size(1)
        if first > 0:
            for layer in self._layers():
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
            self.cache_mask = self.cache_mask[:, first:]

    def _join(self, keys: list[Hashable], wanted: dict[Hashable, Sequence[int]]) -> None:
        """New rows for ``keys``: every token of their sequence but the last is run through the value model in a
        forward of the new rows alone; their caches, left-padded to the others' width, are appended."""
        if not keys:
            return
        from transformers import DynamicCache

        tokens, mask = _left_padded([wanted[key][:-1] for key in keys])
        cache = DynamicCache(config=self.model.trunk.config)
        if tokens.size(1) > 0:
            tokens, mask = tokens.to(self.device), mask.to(self.device)
            positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
            attention = candidate_attention_mask(mask[:, :0], mask, 0, self.model.score.weight.dtype)
            self.model.hidden(tokens, attention, positions, past_key_values=cache, use_cache=True)
        width = max(self.cache_mask.size(1), mask.size(1))
        old_layers, new_layers = self._layers(), [layer for layer in cache.layers if _filled(layer)]
        # A side with no filled layers (nothing cached yet, or only one-token sequences joined) is rows of
        # padding: zeros shaped like the other side's, which the masks never attend to.
        olds, news = old_layers or [None] * len(new_layers), new_layers or [None] * len(old_layers)
        for old, new in zip(olds, news):
            target = old if old is not None else new
            for name in ("keys", "values"):
                top, bottom = _rows_or_zeros(old, new, name, len(self.keys)), _rows_or_zeros(new, old, name, len(keys))
                setattr(target, name, torch.cat([_pad_left(top, width), _pad_left(bottom, width)]))
        if not old_layers:
            self.cache = cache
        self.cache_mask = torch.cat([_pad_left(self.cache_mask, width), _pad_left(mask.to(self.device), width)])
        self.n_real = torch.cat([self.n_real, mask.sum(dim=1).to(self.device)])
        self.keys += keys
        self.cached += [list(wanted[key][:-1]) for key in keys]

    def _layers(self) -> list:
        return [layer for layer in self.cache.layers if _filled(layer)]


def _filled(layer) -> bool:
    return getattr(layer, "is_initialized", False) and getattr(layer, "keys", None) is not None


def _rows_or_zeros(layer, other, name: str, rows: int) -> torch.Tensor:
    """``layer``'s keys/values, or ``rows`` rows of zeros shaped like ``other``'s when ``layer`` is missing."""
    if layer is not None:
        return getattr(layer, name)
    like = getattr(other, name)
    return like.new_zeros(rows, *like.shape[1:])


def _pad_left(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Zeros before the columns (dim 2 of a ``(B, h, c, d)`` cache tensor, dim 1 of a ``(B, c)`` mask)."""
    dim = 2 if tensor.dim() == 4 else 1
    missing = width - tensor.size(dim)
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _left_padded(sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, m)`` token ids right-aligned (left-padded with 0) and their real-token mask."""
    width = max((len(tokens) for tokens in sequences), default=0)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, tokens in enumerate(sequences):
        if tokens:
            ids[row, width - len(tokens) :] = torch.tensor(list(tokens), dtype=torch.long)
            mask[row, width - len(tokens) :] = 1
    return ids, mask


def _starts_with(sequence: Sequence[int], prefix: Sequence[int]) -> bool:
    return len(prefix) <= len(sequence) and list(sequence[: len(prefix)]) == list(prefix)
