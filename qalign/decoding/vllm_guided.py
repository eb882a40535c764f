"""Q# guided decoding inside vLLM: a V1 logits processor that runs the value model in vLLM's worker.

π^{Z,η}(a|s) ∝ π_ref,T(a|s) · E_{z~Z(s,a)}[exp(z/η)] over π_ref's top-k candidates, the policy
``GuidedEngine`` samples in HF ``generate``, here with vLLM computing π_ref. ``QSharpLogitsProcessor``
implements vLLM's batch-level logits-processor interface (``vllm/v1/sample/logits_processor/interface.py``):

- **Which requests.** A request is guided when its ``SamplingParams.extra_args`` holds ``"qsharp"``
  (a dict of ``GuidanceConfig`` overrides, ``{}`` for the engine's defaults); every other row of the
  batch is returned untouched.
- **Which value model.** One per engine, loaded once when the worker builds its logits processors,
  from ``LLM(..., additional_config={"qalign_qsharp": {...}})``: ``policy`` (a ``guided_policy.json`` or
  its folder: value model + default guidance) or ``value_model`` (a saved ``QSharpValueModel`` folder),
  optional ``dtype`` and guidance defaults. ``additional_config`` is part of ``VllmConfig``, the one
  object the processor's constructor receives (``__init__(vllm_config, device, is_pin_memory)``); it
  travels to the engine-core process with the rest of the config, so it works with and without
  ``VLLM_ENABLE_V1_MULTIPROCESSING``, with no process-global environment variable.
- **Prefixes.** ``update_state`` receives each added request's prompt ids and a *reference* to its live
  output-id list, and the removed / moved / swapped batch slots; the state is a dict keyed by batch slot
  kept in step with vLLM's ``process_dict_updates``. ``apply`` reads prompt + outputs at sampling time.
- **The math.** Each step the rows are handed to ``GuidedLogitsProcessor`` (on π_ref's logits / T):
  candidates, value-model forward, ``guidance_offset`` and ``guided_logits`` are exactly HF's.
- **The value model's KV cache** (``use_cache``, default: the policy's, i.e. on). The requests guided with
  the same settings share one ``RaggedValueCache`` (``qalign.decoding.value_cache``): one batched value-model
  forward per step runs each request's new tokens (the last sampled one; a new request's whole prefix) and its
  k candidates. A request that leaves the batch is dropped from the cache; a preempted request comes back as
  a new one, and a request whose tokens no longer extend what its row holds (vLLM discarded outputs) is
  scored from scratch. ``use_cache: False`` batches all rows into one left-padded forward that rescores every
  prefix + k candidates from scratch: O(k·L²) value work per completion of length L instead of O(k·L), only
  for short prompts.

Temperature. vLLM runs non-argmax-invariant processors *before* temperature (``Sampler.forward`` →
``apply_logits_processors``, then ``sample`` → ``apply_temperature``, then top-k/top-p), as HF does. The
processor therefore builds the guided log-probs on π_ref's logits divided by the request's T and returns
them multiplied by T: vLLM's division by T then yields exactly log π^{Z,η} built on π_ref,T (softmax is
shift-invariant; the guided log-probs are normalised), and top-k/top-p truncate the guided distribution,
as ``GuidedEngine`` does. A greedy request (T < 1e-5, vLLM's threshold) takes the mode of the guided
policy built on π_ref at T = 1, like ``GuidedLogitsProcessor(temperature=0)``.

Limits. Log-probs: ``logprobs_mode="processed_logprobs"`` returns the guided policy's log-probs (the
default ``raw_logprobs`` returns π_ref's). vLLM refuses custom logits processors with speculative decoding
and on TPU; ``logit_bias`` and min-tokens (built-ins that run first) change π_ref before guidance,
penalties apply after it. The value model and its caches live outside vLLM's memory accounting. The
processor refuses to start without its ``additional_config`` entry; a request asking for guidance from
an engine started without the processor is sampled from π_ref (vLLM ignores unknown ``extra_args``).

Example::

    llm = LLM(ref_dir, logits_processors=[QSharpLogitsProcessor],
              additional_config={"qalign_qsharp": {"policy": "out/qsharp"}})
    llm.generate(prompts, SamplingParams(temperature=0.8, extra_args={"qsharp": {"eta": 0.1}}))

or, behind the ``RolloutEngine`` interface, ``VLLMGuidedEngine(ref_dir, policy="out/qsharp")``.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from vllm.v1.sample.logits_processor import LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from qalign.decoding.guided import (
    GuidanceConfig,
    GuidedLogitsProcessor,
    guide_with_values,
    read_guided_policy,
    top_candidates,
)
from qalign.decoding.value_cache import RaggedValueCache
from qalign.rollout.vllm_engine import VLLMEngine, request_seeds, sampling_params, to_completions

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.config import VllmConfig
    from vllm.v1.sample.logits_processor import BatchUpdate

    from qalign.rollout.base import Completion, SamplingConfig
    from qalign.value_model import QSharpValueModel

logger = logging.getLogger(__name__)
_SERIALS = itertools.count()  # one number per guided request this process sees

EXTRA_ARG = "qsharp"  # SamplingParams.extra_args key that turns guidance on for a request
CONFIG_KEY = "qalign_qsharp"  # VllmConfig.additional_config key naming the value model
GREEDY_EPS = 1e-5  # vLLM's _SAMPLING_EPS: below this temperature a request is greedy
GUIDANCE_FIELDS = ("eta", "top_k", "mode", "non_candidate_offset", "use_cache")  # a request may override them


def guidance_overrides(params: SamplingParams) -> dict[str, Any] | None:
    """The request's ``GuidanceConfig`` overrides, or None when it is not guided."""
    extra = params.extra_args or {}
    if EXTRA_ARG not in extra:
        return None
    overrides = extra[EXTRA_ARG]
    if overrides is None or overrides is True:
        return {}
    if not isinstance(overrides, dict):
        raise ValueError(f"extra_args[{EXTRA_ARG!r}] must be a dict of guidance settings, got {overrides!r}")
    unknown = set(overrides) - set(GUIDANCE_FIELDS)
    if unknown:
        raise ValueError(f"extra_args[{EXTRA_ARG!r}]: unknown settings {sorted(unknown)}; known: {GUIDANCE_FIELDS}")
    return dict(overrides)


def read_engine_settings(settings: dict[str, Any]) -> tuple[Path, str, GuidanceConfig]:
    """(value-model folder, dtype, default guidance) from the ``additional_config`` entry."""
    settings = dict(settings)
    dtype = settings.pop("dtype", "float32")
    defaults: dict[str, Any] = {}
    if "policy" in settings:
        file, record, saved = read_guided_policy(settings.pop("policy"))
        folder = file.parent / record["value_model"]
        defaults = asdict(saved)
    elif "value_model" in settings:
        folder = Path(settings.pop("value_model"))
    else:
        raise ValueError(f"additional_config[{CONFIG_KEY!r}] needs 'policy' or 'value_model', got {settings}")
    settings.pop("value_model", None)
    unknown = set(settings) - set(GUIDANCE_FIELDS)
    if unknown:
        raise ValueError(f"additional_config[{CONFIG_KEY!r}]: unknown settings {sorted(unknown)}")
    return folder, dtype, GuidanceConfig(**defaults | settings)


@dataclass
class _GuidedRequest:
    prompt_ids: list[int]
    output_ids: list[int]  # vLLM's live list: it grows as the request decodes
    guidance: GuidanceConfig
    temperature: float  # the T the guidance divides by (1 for greedy requests)
    serial: int = field(default_factory=lambda: next(_SERIALS))  # its row's key in the value cache

    def prefix(self) -> list[int]:
        if self.output_ids and self.output_ids[-1] < 0:
            # Async scheduling fills its -1 placeholders in before sampling; one left here is a bug.
            raise RuntimeError("Q# guidance got a placeholder (-1) output token id")
        return self.prompt_ids + self.output_ids


class QSharpLogitsProcessor(LogitsProcessor):
    """vLLM V1 logits processor: π_ref's logits → the Q# guided logits, for the requests that ask.

    Built by vLLM's worker, once per engine (``LLM(logits_processors=[QSharpLogitsProcessor])``). See
    the module docstring for the configuration, the temperature convention and the cost.

    Attributes:
        max_batch_tokens: value-model tokens per uncached forward (rows are split into chunks of at most
            this many prefix+candidate tokens; a single row is never split).
    """

    max_batch_tokens = 32768

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """Refuse malformed guidance settings when the request is submitted (HTTP 400 in a server)."""
        overrides = guidance_overrides(sampling_params)
        if overrides is not None:
            GuidanceConfig(**overrides)

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool):
        from qalign.value_model import QSharpValueModel

        extra = vllm_config.additional_config
        settings = extra.get(CONFIG_KEY) if isinstance(extra, dict) else None
        if settings is None:
            # Refused at start-up: a guided request failing later would take the running engine down.
            raise ValueError(
                f"QSharpLogitsProcessor needs its value model: start vLLM with "
                f"additional_config={{{CONFIG_KEY!r}: {{'policy': <guided_policy.json or its folder>}}}}"
            )
        self.device = torch.device(device)
        self.requests: dict[int, _GuidedRequest] = {}  # batch slot → guided request
        self.caches: dict[tuple, RaggedValueCache] = {}  # guidance settings → its requests' value cache
        folder, dtype, self.defaults = read_engine_settings(settings)
        self.value_model: QSharpValueModel = QSharpValueModel.from_pretrained(folder, dtype).to(self.device).eval()
        logger.info("Q# guidance: value model %s (%s) on %s", folder, dtype, self.device)

    def is_argmax_invariant(self) -> bool:
        """Guidance changes which token is most likely: run before temperature, and for greedy requests."""
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        # A request's state (and value cache) moves with it between slots and is dropped when it leaves;
        # a preempted request comes back as a new one, scored from scratch.
        process_dict_updates(self.requests, batch_update, self._new_request)

    def _new_request(
        self, params: SamplingParams, prompt_ids: list[int] | None, output_ids: list[int]
    ) -> _GuidedRequest | None:
        overrides = guidance_overrides(params)
        if overrides is None:
            return None
        if prompt_ids is None:
            raise ValueError("Q# guidance needs the prompt's token ids (prompt embeddings are not supported)")
        guidance = GuidanceConfig(**asdict(self.defaults) | overrides)
        temperature = params.temperature if params.temperature >= GREEDY_EPS else 1.0
        return _GuidedRequest(list(prompt_ids), output_ids, guidance, float(temperature))

    @torch.no_grad()
    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.requests:
            self.caches.clear()  # the last guided request left: free its value cache now, not at the next one
            return logits
        groups: dict[tuple, list[int]] = {}
        for slot, request in self.requests.items():
            groups.setdefault(_key(request.guidance), []).append(slot)
        for key in set(self.caches) - set(groups):
            del self.caches[key]  # no request is guided with these settings any more
        for slots in groups.values():
            chunks = [slots] if self.requests[slots[0]].guidance.use_cache else self._chunks(slots)
            for chunk in chunks:
                rows = torch.tensor(chunk, device=logits.device)
                logits[rows] = self.guided_rows(chunk, logits[rows]).to(logits.dtype)
        return logits

    def _chunks(self, slots: list[int]) -> list[list[int]]:
        guidance = self.requests[slots[0]].guidance
        per_prefix_token = max(guidance.top_k, 1) if self.value_model.value_type == "v" else 1
        chunks: list[list[int]] = []
        width = 0
        for slot in slots:
            length = len(self.requests[slot].prompt_ids) + len(self.requests[slot].output_ids) + 1
            new_width = max(width, length)
            if chunks and (len(chunks[-1]) + 1) * new_width * per_prefix_token <= self.max_batch_tokens:
                chunks[-1].append(slot)
                width = new_width
            else:
                chunks.append([slot])
                width = length
        return chunks

    def guided_rows(self, slots: list[int], logits: torch.Tensor) -> torch.Tensor:
        """The guided logits of the requests in ``slots`` (same guidance), scaled by T so that vLLM's
        division by T undoes it.

        Args:
            slots: batch slots of guided requests; logits: ``(R, V)`` their raw π_ref logits.
        Returns:
            ``(R, V)``: T · log π^{Z,η}(·|s) with π^{Z,η} built on softmax(logits / T) (T = 1 when greedy).
        """
        requests = [self.requests[slot] for slot in slots]
        scale = torch.tensor([r.temperature for r in requests], dtype=logits.dtype, device=logits.device)[:, None]
        tempered = logits / scale
        if requests[0].guidance.use_cache:
            guided = self._cached_rows(requests, tempered)
        else:
            guided = self._uncached_rows(requests, tempered)
        return guided * scale

    def _uncached_rows(self, requests: list[_GuidedRequest], logits: torch.Tensor) -> torch.Tensor:
        """All rows in one value-model forward, every prefix + candidate scored from scratch."""
        prefixes = [r.prefix() for r in requests]
        width = max(map(len, prefixes))
        ids = torch.zeros(len(prefixes), width, dtype=torch.long)
        mask = torch.zeros(len(prefixes), width, dtype=torch.long)
        for row, prefix in enumerate(prefixes):
            ids[row, width - len(prefix) :] = torch.tensor(prefix)
            mask[row, width - len(prefix) :] = 1
        # prompt_mask covers every column, so GuidedLogitsProcessor sees the left-padded prefixes as prompts.
        guidance = requests[0].guidance
        processor = GuidedLogitsProcessor(self.value_model, guidance, mask.to(self.device), 1.0, track_kl=False)
        return processor(ids.to(self.device), logits)

    def _cached_rows(self, requests: list[_GuidedRequest], logits: torch.Tensor) -> torch.Tensor:
        """All rows in one value-model forward over the cache of their guidance settings: only each request's
        new tokens (the last sampled one; a new request's whole prefix) and its k candidates are run."""
        guidance = requests[0].guidance
        key = _key(guidance)
        if key not in self.caches:
            self.caches[key] = RaggedValueCache(self.value_model, self.device)
        cache = self.caches[key]
        dtype = logits.dtype
        logits = logits.to(torch.promote_types(dtype, torch.float32))  # as GuidedLogitsProcessor: bf16 → f32
        candidates = top_candidates(logits, guidance.top_k)
        scored = candidates
        if scored is None and self.value_model.value_type == "v":
            # Full-vocabulary V-type guidance: every token is a candidate (small vocabularies / tests only).
            scored = torch.arange(logits.size(-1), device=logits.device).expand(len(requests), -1)
        head_output = cache.values([r.serial for r in requests], [r.prefix() for r in requests], scored)
        return guide_with_values(logits, head_output, candidates, guidance, self.value_model).to(dtype)


def _key(guidance: GuidanceConfig) -> tuple:
    return tuple(asdict(guidance).values())


# ----------------------------------------------------------------------------- RolloutEngine


class VLLMGuidedEngine(VLLMEngine):
    """A ``RolloutEngine`` sampling π^{Z,η} with vLLM computing π_ref (an in-process ``vllm.LLM``).

    Args:
        reference: π_ref, a folder or a model alias of ``qalign.models``.
        policy: a ``guided_policy.json`` (or its folder); or ``value_model``: a saved value-model folder.
        guidance: overrides of the guidance settings for every request (eta, top_k, mode, non_candidate_offset,
            use_cache).
        value_dtype: the value model's dtype in the worker.
        vllm_kwargs: as ``VLLMEngine`` (max_model_len, seed, ...), passed on to ``vllm.LLM``.

    ``sync_weights`` is not supported (neither π_ref's nor the value model's weights change here).
    """

    processor_class: type[QSharpLogitsProcessor] = QSharpLogitsProcessor

    def __init__(
        self,
        reference: str,
        policy: str | Path | None = None,
        *,
        value_model: str | Path | None = None,
        guidance: dict[str, Any] | None = None,
        value_dtype: str = "float32",
        **vllm_kwargs: Any,
    ):
        from qalign.models import resolve_model_path

        if (policy is None) == (value_model is None):
            raise ValueError("give exactly one of policy= (guided_policy.json) or value_model= (a folder)")
        settings: dict[str, Any] = {"dtype": value_dtype}
        settings |= {"policy": str(policy)} if policy is not None else {"value_model": str(value_model)}
        self.guidance = dict(guidance or {})
        GuidanceConfig(**self.guidance)  # refuse bad settings before the engine starts
        logits_processors = [*vllm_kwargs.pop("logits_processors", []), self.processor_class]
        additional = dict(vllm_kwargs.pop("additional_config", None) or {}) | {CONFIG_KEY: settings}
        super().__init__(
            resolve_model_path(reference),
            logits_processors=logits_processors,
            additional_config=additional,
            **vllm_kwargs,
        )

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[Completion]]:
        if not prompts:
            return []
        params = [sampling_params(sampling, seed) for seed in request_seeds(sampling, len(prompts))]
        for param in params:
            param.extra_args = {**(param.extra_args or {}), EXTRA_ARG: dict(self.guidance)}
        inputs = [{"prompt_token_ids": list(p)} for p in prompts]
        outputs = self.llm.generate(inputs, params, use_tqdm=False)
        return [to_completions(p, out) for p, out in zip(prompts, outputs)]

    def sync_weights(self, model: torch.nn.Module) -> None:
        raise NotImplementedError("VLLMGuidedEngine keeps π_ref and the value model it started with")
