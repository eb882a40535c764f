"""Q# guided decoding inside vLLM: a V1 logits processor that runs the value model in vLLM's worker.

π^{Z,η}(a|s) ∝ π_ref,T(a|s) · E_{z~Z(s,a)}[exp(z/η)] over π_ref's top-k candidates, the policy
``GuidedEngine`` samples in HF ``generate``, here with vLLM computing π_ref. ``QSharpLogitsProcessor``
implements vLLM's batch-level logits-processor interface (``vllm/v1/sample/logits_processor/interface.py``):

- **Which requests.** A request is guided when its ``SamplingParams.extra_args`` holds ``"qsharp"``
  (a dict of ``GuidanceConfig`` overrides, ``{}`` for the engine's defaults); every other row of the
  batch is returned untouched.
- **Which value model.** The engine's default, loaded once when the worker builds its logits processors,
  from ``LLM(..., additional_config={"qalign_qsharp": {...}})``: ``policy`` (a ``guided_policy.json`` or
  its folder: value model + default guidance) or ``value_model`` (a saved ``QSharpValueModel`` folder),
  optional ``dtype`` and guidance defaults. ``additional_config`` is part of ``VllmConfig``, the one
  object the processor's constructor receives (``__init__(vllm_config, device, is_pin_memory)``); it
  travels to the engine-core process with the rest of the config, so it works with and without
  ``VLLM_ENABLE_V1_MULTIPROCESSING``, with no process-global environment variable. A request may name
  its own (``extra_args={"qsharp": {"value_model": folder}}``), loaded when the first request naming it
  arrives; the last one named stays loaded (the next batch of requests most likely names it again), any
  other is freed once no request uses it. The Q# trainer samples π_ref's roll-outs and each iteration's
  guided roll-ins on one engine this way (an entry with neither ``policy`` nor ``value_model`` starts an
  engine with no default, whose guided requests must each name one).
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
from collections.abc import Hashable
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
VALUE_MODEL_FIELD = "value_model"  # a request's own value-model folder, instead of the engine's default


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
    unknown = set(overrides) - {*GUIDANCE_FIELDS, VALUE_MODEL_FIELD}
    if unknown:
        raise ValueError(f"extra_args[{EXTRA_ARG!r}]: unknown settings {sorted(unknown)}; "
                         f"known: {(*GUIDANCE_FIELDS, VALUE_MODEL_FIELD)}")  # fmt: skip
    folder = overrides.get(VALUE_MODEL_FIELD)
    if folder is not None and not Path(folder).is_dir():
        raise ValueError(f"extra_args[{EXTRA_ARG!r}][{VALUE_MODEL_FIELD!r}]: {folder} is not a value-model folder")
    return dict(overrides)


def read_engine_settings(settings: dict[str, Any]) -> tuple[Path | None, str, GuidanceConfig]:
    """(default value-model folder or None, dtype, default guidance) from the ``additional_config`` entry."""
    settings = dict(settings)
    dtype = settings.pop("dtype", "float32")
    defaults: dict[str, Any] = {}
    source = _default_value_model_source(settings)
    if source == "policy":
        file, record, saved = read_guided_policy(settings["policy"])
        folder = file.parent / record["value_model"]
        defaults = asdict(saved)
    elif source == "value_model":
        folder = Path(settings["value_model"])
    else:
        folder = None  # no default: every guided request names its value model
    settings.pop("policy", None)
    settings.pop("value_model", None)
    unknown = set(settings) - set(GUIDANCE_FIELDS)
    if unknown:
        raise ValueError(f"additional_config[{CONFIG_KEY!r}]: unknown settings {sorted(unknown)}")
    return folder, dtype, GuidanceConfig(**defaults | settings)


def _default_value_model_source(settings: dict[str, Any]) -> str | None:
    """Which processor setting names the engine's default value model: ``"policy"`` (a guided-policy file, whose
    value model and guidance become the defaults), ``"value_model"`` (a folder), or None (no default)."""
    for key in ("policy", "value_model"):
        if settings.get(key) is not None:
            return key
    return None


@dataclass
class _GuidedRequest:
    prompt_ids: list[int]
    output_ids: list[int]  # vLLM's live list: it grows as the request decodes
    guidance: GuidanceConfig
    temperature: float  # the T the guidance divides by (1 for greedy requests)
    value_model: Hashable  # key of its value model in the processor's ``value_models`` (None: the default)
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
            overrides.pop(VALUE_MODEL_FIELD, None)
            GuidanceConfig(**overrides)

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool):
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
        self.caches: dict[tuple, RaggedValueCache] = {}  # (value model, guidance settings) → its requests' cache
        folder, self.dtype, self.defaults = read_engine_settings(settings)
        # None → the engine's default; a request's own folder → (its path, the newest mtime of its files).
        self.value_models: dict[Hashable, QSharpValueModel] = {}
        self.last_named: Hashable = None  # the value model a request named last: kept while no request uses it
        self.folder_keys: dict[Path, Hashable] = {}  # folder → its key, for the batch update being applied
        if folder is not None:
            self.value_models[None] = _load_value_model(folder, self.dtype, self.device)
            logger.info("Q# guidance: value model %s (%s) on %s", folder, self.dtype, self.device)

    def is_argmax_invariant(self) -> bool:
        """Guidance changes which token is most likely: run before temperature, and for greedy requests."""
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        # A request's state (and value cache) moves with it between slots and is dropped when it leaves;
        # a preempted request comes back as a new one, scored from scratch.
        self.folder_keys = {}
        process_dict_updates(self.requests, batch_update, self._new_request)

    def _new_request(
        self, params: SamplingParams, prompt_ids: list[int] | None, output_ids: list[int]
    ) -> _GuidedRequest | None:
        overrides = guidance_overrides(params)
        if overrides is None:
            return None
        if prompt_ids is None:
            raise ValueError("Q# guidance needs the prompt's token ids (prompt embeddings are not supported)")
        model_key = self._value_model_key(overrides.pop(VALUE_MODEL_FIELD, None))
        guidance = GuidanceConfig(**asdict(self.defaults) | overrides)
        temperature = params.temperature if params.temperature >= GREEDY_EPS else 1.0
        return _GuidedRequest(list(prompt_ids), output_ids, guidance, float(temperature), model_key)

    def _value_model_key(self, folder: str | None) -> Hashable:
        """The key of the value model a request asks for, loading a folder the first time it is named."""
        if folder is None:
            if None not in self.value_models:
                raise ValueError(f"this engine has no default value model: a guided request must name one "
                                 f"(extra_args[{EXTRA_ARG!r}][{VALUE_MODEL_FIELD!r}])")  # fmt: skip
            return None
        # The files' mtimes are part of the key: a folder saved again (a later fit) is loaded again. The
        # requests joining in one batch update usually name one folder: it is listed once per update.
        path = Path(folder).resolve()
        key = self.folder_keys.get(path)
        if key is None:
            key = (str(path), max((f.stat().st_mtime_ns for f in path.rglob("*") if f.is_file()), default=0))
            self.folder_keys[path] = key
        if key not in self.value_models:
            self.value_models[key] = _load_value_model(path, self.dtype, self.device)
            logger.info("Q# guidance: value model %s (%s) on %s, named by a request", path, self.dtype, self.device)
        self.last_named = key
        return key

    @torch.no_grad()
    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        groups: dict[tuple, list[int]] = {}
        for slot, request in self.requests.items():
            groups.setdefault(_key(request), []).append(slot)
        # Free what no request uses any more (the last guided request left, or the last with these settings /
        # this value model) now, not when the next guided request comes; the value model named last is kept.
        for key in set(self.caches) - set(groups):
            del self.caches[key]
        in_use = {request.value_model for request in self.requests.values()}
        for key in set(self.value_models) - in_use - {None, self.last_named}:
            del self.value_models[key]
        if not self.requests:
            return logits
        for slots in groups.values():
            chunks = [slots] if self.requests[slots[0]].guidance.use_cache else self._chunks(slots)
            for chunk in chunks:
                rows = torch.tensor(chunk, device=logits.device)
                logits[rows] = self.guided_rows(chunk, logits[rows]).to(logits.dtype)
        return logits

    def _chunks(self, slots: list[int]) -> list[list[int]]:
        guidance = self.requests[slots[0]].guidance
        value_model = self.value_models[self.requests[slots[0]].value_model]
        per_prefix_token = max(guidance.top_k, 1) if value_model.value_type == "v" else 1
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
        guidance, value_model = requests[0].guidance, self.value_models[requests[0].value_model]
        processor = GuidedLogitsProcessor(value_model, guidance, mask.to(self.device), 1.0, track_kl=False)
        return processor(ids.to(self.device), logits)

    def _cached_rows(self, requests: list[_GuidedRequest], logits: torch.Tensor) -> torch.Tensor:
        """All rows in one value-model forward over the cache of their guidance settings: only each request's
        new tokens (the last sampled one; a new request's whole prefix) and its k candidates are run."""
        guidance, value_model = requests[0].guidance, self.value_models[requests[0].value_model]
        key = _key(requests[0])
        if key not in self.caches:
            self.caches[key] = RaggedValueCache(value_model, self.device)
        cache = self.caches[key]
        dtype = logits.dtype
        logits = logits.to(torch.promote_types(dtype, torch.float32))  # as GuidedLogitsProcessor: bf16 → f32
        candidates = top_candidates(logits, guidance.top_k)
        scored = candidates
        if scored is None and value_model.value_type == "v":
            # Full-vocabulary V-type guidance: every token is a candidate (small vocabularies / tests only).
            scored = torch.arange(logits.size(-1), device=logits.device).expand(len(requests), -1)
        head_output = cache.values([r.serial for r in requests], [r.prefix() for r in requests], scored)
        return guide_with_values(logits, head_output, candidates, guidance, value_model).to(dtype)


def _load_value_model(folder: Path, dtype: str, device: torch.device) -> QSharpValueModel:
    from qalign.models import whole_models
    from qalign.value_model import QSharpValueModel

    # An in-process engine's processor lives in a training process: under ZeRO-3, transformers would partition
    # the value model as it loads (zero.Init), and the sampler needs its weights whole.
    with whole_models():
        return QSharpValueModel.from_pretrained(folder, dtype).to(device).eval()


def _key(request: _GuidedRequest) -> tuple:
    """Requests that share a value-model cache: the same value model and guidance settings."""
    return (request.value_model, *asdict(request.guidance).values())


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
        return generate_guided(self.llm, prompts, sampling, self.guidance)

    def sync_weights(self, model: torch.nn.Module) -> None:
        raise NotImplementedError("VLLMGuidedEngine keeps π_ref and the value model it started with")


def generate_guided(llm, prompts: list[list[int]], sampling: SamplingConfig, request: dict[str, Any]
                    ) -> list[list[Completion]]:  # fmt: skip
    """``sampling.n`` completions per prompt from ``llm`` (a ``vllm.LLM`` started with the processor), each
    request guided with ``request`` (guidance overrides, and optionally ``value_model``)."""
    if request.get(VALUE_MODEL_FIELD) is None and not _has_default_value_model(llm):
        # Refused here, where the engine's settings are visible: the worker could only raise inside vLLM's step,
        # which takes the engine down for every request in flight.
        raise ValueError(f"this engine has no default value model: a guided request must name one "
                         f"({VALUE_MODEL_FIELD!r}), e.g. through GuidedRequests")  # fmt: skip
    if not prompts:
        return []
    params = [sampling_params(sampling, seed) for seed in request_seeds(sampling, len(prompts))]
    for param in params:
        param.extra_args = {**(param.extra_args or {}), EXTRA_ARG: dict(request)}
    inputs = [{"prompt_token_ids": list(p)} for p in prompts]
    outputs = llm.generate(inputs, params, use_tqdm=False)
    return [to_completions(p, out) for p, out in zip(prompts, outputs)]


# ----------------------------------------------------------------------------- one engine for π_ref and π^{Z,η}


def guided_requests_kwargs(value_dtype: str = "float32") -> dict[str, Any]:
    """``VLLMEngine`` / ``build_engine`` keyword arguments that start π_ref's engine with the processor and no
    default value model: it samples π_ref as before, and ``GuidedRequests`` samples guided policies on it."""
    return {"logits_processors": [QSharpLogitsProcessor], "additional_config": {CONFIG_KEY: {"dtype": value_dtype}}}


def _processor_settings(llm: Any) -> dict[str, Any] | None:
    """The ``additional_config`` entry a ``vllm.LLM`` was started with for the processor, or None."""
    config = getattr(getattr(getattr(llm, "llm_engine", None), "vllm_config", None), "additional_config", None)
    return config.get(CONFIG_KEY) if isinstance(config, dict) else None


def _has_default_value_model(llm: Any) -> bool:
    """Whether ``llm`` was started with a value model every guided request may use (``policy`` or ``value_model``
    in its processor settings). An engine without the processor's settings counts as having one: it cannot
    start with the processor, and without it vLLM ignores the guidance (documented above)."""
    settings = _processor_settings(llm)
    return settings is None or _default_value_model_source(settings) is not None


def accepts_guided_requests(engine: Any) -> bool:
    """Whether ``engine`` is an in-process vLLM engine started with the processor (``guided_requests_kwargs``)."""
    return isinstance(engine, VLLMEngine) and _processor_settings(getattr(engine, "llm", None)) is not None


class GuidedRequests:
    """π^{Z,η} with the value model saved in ``value_model``, sampled on ``engine``, which keeps sampling π_ref
    for everyone else: no second copy of π_ref, no second engine. A ``RolloutEngine`` for ``generate``.

    Args:
        engine: a ``VLLMEngine`` started with ``guided_requests_kwargs()`` (``accepts_guided_requests``).
        value_model: a saved ``QSharpValueModel`` folder; the engine loads it at the first request.
        guidance: ``GuidanceConfig`` settings for every request.
    """

    backend = "vllm"

    def __init__(self, engine: VLLMEngine, value_model: str | Path, guidance: dict[str, Any]):
        if not accepts_guided_requests(engine):
            raise ValueError("GuidedRequests needs a VLLMEngine started with guided_requests_kwargs()")
        if not Path(value_model).is_dir():
            raise ValueError(f"GuidedRequests: {value_model} is not a value-model folder")
        GuidanceConfig(**guidance)  # refuse bad settings before any request
        self.engine = engine
        self.request = {**guidance, VALUE_MODEL_FIELD: str(value_model)}

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[Completion]]:
        return generate_guided(self.engine.llm, prompts, sampling, self.request)
