"""Value-guided decoding: π^{Z,η}(a|s) ∝ π_ref(a|s) · E_{z~Z(s,a)}[exp(z/η)] over the top-k candidates.

``GuidedLogitsProcessor`` turns π_ref's logits into the guided log-probabilities inside HF ``generate``;
``GuidedEngine`` wraps it behind the ``RolloutEngine`` interface (``generate(prompt_ids, sampling)``),
so data collection, ``qalign.train``'s held-out accuracy and ``qalign.eval`` use it like any sampler.

Where the guidance sits relative to the sampler's warpers. HF runs custom logits processors *before*
temperature and top-p. The authors' code therefore samples softmax((ℓ_ref + offset)/T), i.e. η is
silently multiplied by T. Here the processor divides by T itself and HF's temperature is left at 1, so
the guided policy is exactly π_ref,T(a|s)·E[exp(z/η)] with π_ref,T the tempered reference that is sampled
unguided; top-k/top-p then truncate the *guided* distribution (as in the authors' code). Greedy decoding
takes the mode of the guided policy built on π_ref at T = 1.

KV caches on transformers ≥ 4.46 (pitfall 2 of the Q# notes). The value model has its own cache. A
V-type model scores k candidates by appending them to the cached prefix in one forward (a 4D mask lets
each candidate see the prefix and itself, all at position |prefix|), and that forward *appends the k
candidate entries to the mutable ``DynamicCache``*. Left there they would be attended to by every later
token. The fast path crops them off right after the forward; ``use_cache=False`` scores every candidate
from scratch (prefix+candidate, no cache) and is the reference the fast path is tested against.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from qalign.decoding.value_cache import score_with_cache
from qalign.losses.qsharp import GUIDANCE_MODES, NON_CANDIDATE_RULES, guidance_offset, guided_logits, kl_divergence
from qalign.rollout.base import SamplingConfig
from qalign.rollout.hf import HFEngine

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from qalign.value_model import QSharpValueModel

POLICY_FILE = "guided_policy.json"


@dataclass
class GuidanceConfig:
    """How the value model guides π_ref."""

    eta: float = 0.1  # the paper's η (KL weight); the authors' --eta is 1/η
    top_k: int = 20  # candidates scored per step; <= 0: the whole vocabulary
    mode: str = "qsharp"  # qsharp: E[exp(z/η)]; cd: exp(E[z]/η) (the CD/VAS baseline)
    use_cache: bool = True  # value-model KV cache (fast path); False: rescore prefix+candidate each step
    # Offset of the tokens outside the top-k: "candidate_min" = the worst candidate's (the authors' rule),
    # "z_min" = 0, i.e. surely the worst outcome (qalign's rule before issue 13). No effect when top_k <= 0.
    non_candidate_offset: str = "candidate_min"

    def __post_init__(self) -> None:
        if self.eta <= 0:
            raise ValueError(f"eta must be > 0, got {self.eta}")
        if self.mode not in GUIDANCE_MODES:
            raise ValueError(f"guidance mode must be one of {GUIDANCE_MODES}, got {self.mode!r}")
        if self.non_candidate_offset not in NON_CANDIDATE_RULES:
            raise ValueError(
                f"non_candidate_offset must be one of {NON_CANDIDATE_RULES}, got {self.non_candidate_offset!r}"
            )


# ----------------------------------------------------------------------------- one guided step


def top_candidates(ref_logits: torch.Tensor, top_k: int) -> torch.Tensor | None:
    """``(B, k)`` the k most likely tokens under π_ref (the ones the value model scores); None: all of them."""
    return ref_logits.topk(top_k, dim=-1).indices if 0 < top_k < ref_logits.size(-1) else None


def guide_with_values(
    ref_logits: torch.Tensor,
    head_output: torch.Tensor,
    candidates: torch.Tensor | None,
    guidance: GuidanceConfig,
    value_model: QSharpValueModel,
) -> torch.Tensor:
    """log π^{Z,η}(·|s) from π_ref's (tempered) logits and the value head's outputs on the candidates."""
    offset = guidance_offset(
        head_output.to(ref_logits.dtype), guidance.eta, value_model.head, guidance.mode, value_model.atoms
    )
    return guided_logits(ref_logits, offset, candidates, guidance.non_candidate_offset)


# ----------------------------------------------------------------------------- logits processor


class GuidedLogitsProcessor(LogitsProcessor):
    """Adds the Q# offset to the top-k candidates of π_ref at each step of ``generate``; the unscored tokens
    get the offset ``guidance.non_candidate_offset`` names (the worst candidate's by default).

    Built for one ``generate`` call (it holds that batch's value-model cache). Rows are the batch rows of
    ``generate`` (prompts left-padded; ``prompt_mask`` ``(B, L0)`` marks the real prompt tokens).

    Args:
        temperature: the sampling temperature T (the processor divides by it; pass T = 1 to HF). 0: greedy.
        track_kl: record KL(π_guided(·|s) ‖ π_ref,T(·|s)) per row and step in ``kl_steps``.
    """

    def __init__(
        self,
        value_model: QSharpValueModel,
        guidance: GuidanceConfig,
        prompt_mask: torch.Tensor,
        temperature: float = 1.0,
        track_kl: bool = True,
    ):
        self.value_model = value_model
        self.guidance = guidance
        self.prompt_mask = prompt_mask.long()
        self.temperature = temperature if temperature > 0 else 1.0
        self.track_kl = track_kl
        self.kl_steps: list[torch.Tensor] = []  # one (B,) per step
        self._cache: Any = None
        self._seen = 0  # input_ids columns already in the value cache
        self._cache_mask: torch.Tensor | None = None  # (B, seen) real-token mask of the cached columns
        self._n_real: torch.Tensor | None = None  # (B,) real tokens cached (the next position id)

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        dtype = torch.promote_types(scores.dtype, torch.float32)  # float64 stays float64 (exact tests)
        ref_logits = scores.to(dtype) / self.temperature
        candidates = top_candidates(ref_logits, self.guidance.top_k)
        head_output = self.candidate_values(input_ids, candidates)
        guided = guide_with_values(ref_logits, head_output, candidates, self.guidance, self.value_model)
        if self.track_kl:
            self.kl_steps.append(kl_divergence(guided, ref_logits.log_softmax(dim=-1)))
        return guided.to(scores.dtype)

    def full_mask(self, width: int) -> torch.Tensor:
        """``(B, width)`` real-token mask of ``input_ids``: the prompt's, then every generated token."""
        prompt = self.prompt_mask
        extra = width - prompt.size(1)
        return torch.cat([prompt, prompt.new_ones(prompt.size(0), extra)], dim=1)

    def candidate_values(self, input_ids: torch.Tensor, candidates: torch.Tensor | None) -> torch.Tensor:
        """Head outputs ``(B, K)`` / ``(B, K, A)`` of (s, a) for each candidate a (K = |V| when None)."""
        if candidates is None and self.value_model.value_type == "v":
            # V-type over the full vocabulary: every token is a candidate (small vocabularies / tests only).
            candidates = torch.arange(self._vocab_size(), device=input_ids.device).expand(input_ids.size(0), -1)
        if self.guidance.use_cache:
            return self._values_cached(input_ids, candidates)
        return self._values_uncached(input_ids, candidates)

    def _vocab_size(self) -> int:
        trunk_config = getattr(self.value_model.trunk, "config", None)
        size = getattr(trunk_config, "vocab_size", None)
        if size is None:
            raise ValueError("full-vocabulary V-type guidance needs the trunk's config.vocab_size")
        return int(size)

    # ------------------------------------------------------------------ reference path: no cache

    def _values_uncached(self, input_ids: torch.Tensor, candidates: torch.Tensor | None) -> torch.Tensor:
        model = self.value_model
        mask = self.full_mask(input_ids.size(1)).to(input_ids.device)
        if model.value_type == "q":
            hidden = model.hidden(input_ids, mask)[:, -1]
            return model.q_values(hidden, candidates)
        batch, k = candidates.shape
        # One sequence per (row, candidate): prefix + candidate, scored from scratch.
        ids = torch.cat([input_ids.repeat_interleave(k, dim=0), candidates.reshape(-1, 1)], dim=1)
        ids_mask = torch.cat([mask.repeat_interleave(k, dim=0), mask.new_ones(batch * k, 1)], dim=1)
        hidden = model.hidden(ids, ids_mask)[:, -1]
        values = model.v_values(hidden)
        return values.view(batch, k, *values.shape[1:])

    # ------------------------------------------------------------------ fast path: the value model's own cache

    def _values_cached(self, input_ids: torch.Tensor, candidates: torch.Tensor | None) -> torch.Tensor:
        if self._cache is None:
            from transformers import DynamicCache

            self._cache = DynamicCache(config=self.value_model.trunk.config)
            self._cache_mask = input_ids.new_zeros(input_ids.size(0), 0)
            self._n_real = input_ids.new_zeros(input_ids.size(0))
        pending = input_ids[:, self._seen :]  # tokens not yet in the cache: the prompt, then the last sampled one
        pending_mask = self.full_mask(input_ids.size(1))[:, self._seen :].to(input_ids.device)
        values, self._cache_mask, self._n_real = score_with_cache(
            self.value_model, self._cache, self._cache_mask, self._n_real, pending, pending_mask, candidates
        )
        self._seen = input_ids.size(1)
        return values


# ----------------------------------------------------------------------------- engine


class GuidedEngine(HFEngine):
    """A ``RolloutEngine`` that samples from π^{Z,η}: π_ref's ``generate`` with a ``GuidedLogitsProcessor``.

    ``kl_summary()`` reports the KL to π_ref of everything generated since the last ``reset_kl()``.

    Example::

        engine = GuidedEngine(ref_model, QSharpValueModel.from_pretrained("out/value_model"), tokenizer,
                              GuidanceConfig(eta=0.1, top_k=20))
        completions = engine.generate([tokenizer(prompt)["input_ids"]], SamplingConfig(temperature=0.8, top_p=0.9))
    """

    def __init__(
        self,
        ref_model: PreTrainedModel,
        value_model: QSharpValueModel,
        tokenizer: PreTrainedTokenizerBase,
        guidance: GuidanceConfig,
        batch_size: int = 16,
    ):
        super().__init__(ref_model, tokenizer, batch_size)
        self.value_model = value_model
        self.guidance = guidance
        self.reset_kl()

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Guide with ``model`` (a value model) from now on; π_ref never changes."""
        self.value_model = model

    def reset_kl(self) -> None:
        self._kl_sum, self._kl_tokens, self._kl_sequences = 0.0, 0, []

    def kl_summary(self) -> dict[str, float]:
        """Per-token and per-sequence KL(π_guided(·|s) ‖ π_ref(·|s)) over the visited states."""
        sequences = self._kl_sequences
        return {
            "kl_per_token": self._kl_sum / max(self._kl_tokens, 1),
            "kl_per_sequence": sum(sequences) / max(len(sequences), 1),
            "tokens": float(self._kl_tokens),
        }

    def _generate_kwargs(self, sampling: SamplingConfig, attention_mask: torch.Tensor) -> dict:
        self._processor = GuidedLogitsProcessor(self.value_model, self.guidance, attention_mask, sampling.temperature)
        self._batch_kl = None
        kwargs = super()._generate_kwargs(sampling, attention_mask)
        kwargs["logits_processor"] = LogitsProcessorList([self._processor])
        if sampling.temperature != 0:
            kwargs["temperature"] = 1.0  # the processor already divided by T
        return kwargs

    def _generating_modules(self) -> tuple[torch.nn.Module, ...]:
        return (self.model, self.value_model)

    def _completed_row(self, row: int, length: int) -> None:
        steps = self._processor.kl_steps
        if not steps:
            return
        if self._batch_kl is None:
            self._batch_kl = torch.stack(steps, dim=1)  # (B, steps)
        row_kl = self._batch_kl[row, :length]
        self._kl_sum += float(row_kl.sum())
        self._kl_tokens += int(row_kl.numel())
        self._kl_sequences.append(float(row_kl.sum()))


# ----------------------------------------------------------------------------- the saved guided policy


def save_guided_policy(
    folder: str | Path, reference: str, value_model_dir: str, guidance: GuidanceConfig, **extra: Any
) -> Path:
    """Write ``guided_policy.json``: (reference id, value-model folder relative to ``folder``, and every
    ``GuidanceConfig`` field: η, k, mode, use_cache, non_candidate_offset)."""
    path = Path(folder) / POLICY_FILE
    record = {"kind": "qsharp", "reference": reference, "value_model": value_model_dir, **asdict(guidance), **extra}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    return path


def read_guided_policy(path: str | Path, **guidance_overrides: Any) -> tuple[Path, dict[str, Any], GuidanceConfig]:
    """(the ``guided_policy.json`` file, its record, the guidance it decodes with after ``guidance_overrides``)."""
    path = Path(path)
    file = path / POLICY_FILE if path.is_dir() else path
    record = json.loads(file.read_text())
    known = {f for f in GuidanceConfig.__dataclass_fields__}
    saved = {k: v for k, v in record.items() if k in known}
    # A file written before ``non_candidate_offset`` existed was decoded with non-candidates at offset 0:
    # load it that way (not with today's default), so it still describes the policy it was saved for.
    saved.setdefault("non_candidate_offset", "z_min")
    return file, record, GuidanceConfig(**saved | guidance_overrides)


def load_guided_engine(
    path: str | Path,
    batch_size: int = 16,
    dtype: str = "float32",
    reference_model: PreTrainedModel | None = None,
    **guidance_overrides: Any,
) -> tuple[GuidedEngine, PreTrainedTokenizerBase, dict[str, Any]]:
    """(engine, tokenizer, description) from a ``guided_policy.json`` or the folder holding it.
    ``reference_model``: the policy's π_ref when the caller already holds it (else loaded from the record)."""
    from qalign.models import load_model, load_tokenizer
    from qalign.value_model import QSharpValueModel

    file, record, guidance = read_guided_policy(path, **guidance_overrides)
    tokenizer = load_tokenizer(record["reference"])
    ref = reference_model if reference_model is not None else load_model(record["reference"], dtype).eval()
    value_model = QSharpValueModel.from_pretrained(file.parent / record["value_model"], dtype).eval()
    engine = GuidedEngine(ref, value_model, tokenizer, guidance, batch_size=batch_size)
    return engine, tokenizer, {**record, **asdict(guidance), "backend": "hf"}


GUIDED_BACKENDS = ("hf", "vllm")  # the engines that can decode a guided policy


def load_guided_policy(
    path: str | Path,
    batch_size: int = 16,
    dtype: str = "float32",
    *,
    backend: str = "hf",
    seed: int = 0,
    max_model_len: int | None = None,
    **guidance_overrides: Any,
):
    """The guided policy as a ``qalign.policies.Policy`` (an ``EnginePolicy``).

    Args:
        backend: ``"hf"``: HF ``generate`` with a ``GuidedLogitsProcessor`` (``GuidedEngine``, which also
            reports the KL to π_ref it decoded at); ``"vllm"``: an in-process vLLM computing π_ref, the value
            model scoring candidates inside vLLM's sampler (``qalign.decoding.vllm_guided``). Both decode the
            same policy: greedy completions agree token for token, samples come from the same distribution.
        batch_size: prompts per HF ``generate`` call (vLLM schedules its own batches).
        dtype: π_ref's and the value model's weights.
        seed, max_model_len: the vLLM engine's (unused by HF).
    """
    from qalign.policies import EnginePolicy

    if backend == "hf":
        engine, tokenizer, description = load_guided_engine(path, batch_size, dtype, **guidance_overrides)
        return EnginePolicy(engine, tokenizer, description)
    if backend != "vllm":
        raise ValueError(f"a guided policy decodes with backend {' or '.join(GUIDED_BACKENDS)}, not {backend!r}")
    from qalign.decoding.vllm_guided import VLLMGuidedEngine
    from qalign.models import load_tokenizer

    file, record, guidance = read_guided_policy(path, **guidance_overrides)
    tokenizer = load_tokenizer(record["reference"])
    engine = VLLMGuidedEngine(record["reference"], policy=file, guidance=asdict(guidance), value_dtype=dtype,
                              dtype=dtype, seed=seed, max_model_len=max_model_len)  # fmt: skip
    return EnginePolicy(engine, tokenizer, {**record, **asdict(guidance), "backend": "vllm"})
