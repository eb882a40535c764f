"""Q# guided decoding: exact optimality on the tabular token MDP, Algorithm-1 collection + value fitting
recovering π*, resumable collection, and the value model's KV-cache fast path on a tiny Llama."""

from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from qalign.config import ConfigError
from qalign.decoding.collect_qsharp import (
    CollectionSettings,
    collect_iteration,
    load_examples,
    read_rows,
    refuse_changed_problems,
)
from qalign.decoding.guided import GuidanceConfig, GuidedLogitsProcessor
from qalign.losses.qsharp import value_loss
from qalign.rollout.base import Completion, SamplingConfig
from qalign.sample_store import SettingsMismatch
from qalign.trainers.qsharp import ValueCollator
from qalign.value_model import QSharpValueModel, ValueHeadConfig
from tests.tabular import PAD, TabularLM, TokenMDP, optimal_distribution, policy_probs, random_rewards

# ----------------------------------------------------------------------------- tabular helpers


class TabularTrunk(nn.Module):
    """One-hot hidden state per token prefix (prompt + actions, terminal ones included): a V-type head on
    it is a free value per (s, a)."""

    def __init__(self, mdp: TokenMDP):
        super().__init__()
        prefixes = {y[:n] for y in mdp.action_sequences() for n in range(len(y) + 1)}
        self.states = [()] + sorted(tuple(x) + p for x in mdp.prompts for p in prefixes)  # row 0: anything else
        self.index = {s: i for i, s in enumerate(self.states)}
        self.config = SimpleNamespace(vocab_size=mdp.vocab_size, hidden_size=len(self.states))
        self.register_buffer("anchor", torch.zeros((), dtype=torch.float64))
        self._memo: dict[bytes, torch.Tensor] = {}

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False):
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        key = input_ids.numpy().tobytes() + mask.numpy().tobytes() + str(tuple(input_ids.shape)).encode()
        if key not in self._memo:
            ids = torch.zeros_like(input_ids)
            for b in range(input_ids.size(0)):
                real = [j for j in range(input_ids.size(1)) if mask[b, j]]
                tokens = tuple(int(input_ids[b, j]) for j in real)
                for n, j in enumerate(real):
                    ids[b, j] = self.index.get(tokens[: n + 1], 0)
            self._memo[key] = nn.functional.one_hot(ids, len(self.states)).to(torch.float64)
        return SimpleNamespace(last_hidden_state=self._memo[key])


def tabular_value_model(mdp: TokenMDP) -> QSharpValueModel:
    trunk = TabularTrunk(mdp)
    model = QSharpValueModel(trunk, len(trunk.states), ValueHeadConfig(head="bernoulli", value_type="v")).double()
    with torch.no_grad():
        model.score.weight.zero_()
    return model


def exact_success_probabilities(mdp: TokenMDP, ref: TabularLM, rewards) -> dict[tuple, float]:
    """p(s, a) = P_{π_ref}(R = 1 | s, a) for every decision state s (a full token prefix) and token a."""
    p: dict[tuple, float] = {}
    for x in mdp.prompts:
        for prefix in sorted(mdp.action_prefixes(), key=len, reverse=True):
            for a in range(mdp.vocab_size):
                actions = prefix + (a,)
                if mdp.is_terminal(actions):
                    value = rewards[(x, actions)]
                else:
                    pi = policy_probs(ref, mdp, x, actions)
                    value = sum(float(pi[b]) * p[mdp.state(x, actions + (b,))] for b in range(mdp.vocab_size))
                p[mdp.state(x, actions)] = value
    return p


def guided_distribution(model: QSharpValueModel, ref: TabularLM, mdp: TokenMDP, x, prefix, guidance) -> torch.Tensor:
    """π_guided(·|s) through the real logits processor (full vocabulary, no cache)."""
    state = torch.tensor([mdp.state(x, prefix)])
    ref_logits = ref.table()[ref.index[mdp.state(x, prefix)]].double().unsqueeze(0)
    processor = GuidedLogitsProcessor(model, guidance, torch.ones(1, len(x), dtype=torch.long))
    return processor(state, ref_logits)[0].exp()


def kl_optimal_to_guided(model, ref, mdp, p_star, guidance) -> float:
    kls = []
    for x, dist in p_star.items():
        memo = {}
        total = 0.0
        for y, prob in dist.items():
            log_q = 0.0
            for t, a in enumerate(y):
                if y[:t] not in memo:
                    memo[y[:t]] = guided_distribution(model, ref, mdp, x, y[:t], guidance)
                log_q += math.log(float(memo[y[:t]][a]))
            total += prob * (math.log(prob) - log_q) if prob > 0 else 0.0
        kls.append(total)
    return sum(kls) / len(kls)


class TabularEngine:
    """A RolloutEngine over the tabular MDP: samples π_ref, or π_guided when given a value model."""

    def __init__(self, mdp: TokenMDP, ref: TabularLM, value_model: QSharpValueModel | None = None,
                 guidance: GuidanceConfig | None = None):  # fmt: skip
        self.mdp, self.ref, self.value_model, self.guidance = mdp, ref, value_model, guidance

    def _split(self, tokens: list[int]) -> tuple[tuple, tuple]:
        for x in self.mdp.prompts:
            if tuple(tokens[: len(x)]) == x:
                return x, tuple(tokens[len(x) :])
        raise ValueError(tokens)

    def generate(self, prompts, sampling: SamplingConfig):
        generator = torch.Generator().manual_seed(sampling.seed or 0)
        memo: dict[tuple, torch.Tensor] = {}
        results = []
        for tokens in prompts:
            x, start = self._split(tokens)
            group = []
            for _ in range(sampling.n):
                actions = start
                while not self.mdp.is_terminal(actions) and len(actions) - len(start) < sampling.max_tokens:
                    if (x, actions) not in memo:
                        memo[(x, actions)] = (
                            policy_probs(self.ref, self.mdp, x, actions) if self.value_model is None
                            else guided_distribution(self.value_model, self.ref, self.mdp, x, actions, self.guidance)
                        )  # fmt: skip
                    actions += (int(torch.multinomial(memo[(x, actions)].float(), 1, generator=generator)),)
                group.append(Completion(list(tokens), list(actions[len(start) :]), ""))
            results.append(group)
        return results

    def sync_weights(self, model):
        pass

    def close(self):
        pass


def fit_value_model(model: QSharpValueModel, rows: list[dict], steps: int = 300, lr: float = 0.2) -> None:
    batch = ValueCollator(PAD)(rows)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        out = model(batch["input_ids"], batch["attention_mask"])
        value_loss(out, batch["rewards"].double(), batch["loss_mask"], "bernoulli").backward()
        optimizer.step()


# ----------------------------------------------------------------------------- tabular tests


@pytest.mark.parametrize("eta", [0.1, 0.5, 2.0])
def test_exact_values_give_optimal_policy(eta):
    """p̂ = π_ref's exact success probability ⇒ π^{Z,η} = π* ∝ π_ref·exp(R/η), to 1e-6 per sequence."""
    mdp = TokenMDP()
    ref = TabularLM(mdp, seed=0)
    rewards = random_rewards(mdp, seed=1)
    p_exact = exact_success_probabilities(mdp, ref, rewards)
    model = tabular_value_model(mdp)
    index = model.trunk.index
    with torch.no_grad():
        for state, p in p_exact.items():
            model.score.weight[0, index[state]] = math.log(max(p, 1e-30) / max(1 - p, 1e-30))  # ±69 at p ∈ {0, 1}
    guidance = GuidanceConfig(eta=eta, top_k=0, use_cache=False)
    p_star = optimal_distribution(mdp, ref, rewards, eta)
    for x, dist in p_star.items():
        for y, target in dist.items():
            prob = 1.0
            for t, a in enumerate(y):
                prob *= float(guided_distribution(model, ref, mdp, x, y[:t], guidance)[a])
            assert prob == pytest.approx(target, abs=1e-6), (x, y)


def test_cd_is_not_optimal():
    """The CD baseline exp(E[z]/η) with the same exact p̂ misses π* (the paper's Thm 4.1)."""
    mdp = TokenMDP()
    ref = TabularLM(mdp, seed=0)
    rewards = random_rewards(mdp, seed=1)
    model = tabular_value_model(mdp)
    with torch.no_grad():
        for state, p in exact_success_probabilities(mdp, ref, rewards).items():
            model.score.weight[0, model.trunk.index[state]] = math.log(max(p, 1e-30) / max(1 - p, 1e-30))
    p_star = optimal_distribution(mdp, ref, rewards, 0.1)
    assert kl_optimal_to_guided(model, ref, mdp, p_star, GuidanceConfig(eta=0.1, top_k=0, use_cache=False)) < 1e-9
    assert (
        kl_optimal_to_guided(model, ref, mdp, p_star, GuidanceConfig(eta=0.1, top_k=0, mode="cd", use_cache=False))
        > 0.01
    )


class TableValueModel:
    """A Q-type value model whose head output per token is a fixed table row (same for every state)."""

    value_type = "q"

    def __init__(self, head: str, table: torch.Tensor, atoms: torch.Tensor | None = None):
        self.head, self.table, self.atoms = head, table, atoms

    def hidden(self, input_ids, attention_mask=None):
        return torch.zeros(*input_ids.shape, 1, dtype=torch.float64)

    def q_values(self, hidden, candidates):
        return self.table[candidates]


@pytest.mark.parametrize("head", ["bernoulli", "histogram"])
def test_processor_non_candidate_offset_rules(head):
    """Vocabulary 5, top-2. With η = 1/ln 5, e^{1/η} = 5 and the Q# offset is ln(1 + 4p̂): p̂ = 1/2 → ln 3 for
    token 0, p̂ = 1/4 → ln 2 for token 1 (token 2's p̂ = 0.99 is never scored: it is not in the top 2).
    Default (worst candidate, ln 2, subtracted): (0.4·1.5, 0.3, 0.1, 0.1, 0.1) / 1.2.
    z_min (non-candidates at 0): (0.4·3, 0.3·2, 0.1, 0.1, 0.1) / 2.1."""
    p_hat = torch.tensor([0.5, 0.25, 0.99, 0.01, 0.01], dtype=torch.float64)
    if head == "bernoulli":
        model = TableValueModel(head, (p_hat / (1 - p_hat)).log())
    else:  # two atoms {0, 1}: the same Z as the Bernoulli head
        atoms = torch.tensor([0.0, 1.0], dtype=torch.float64)
        model = TableValueModel(head, torch.stack([(1 - p_hat).log(), p_hat.log()], dim=-1), atoms)
    scores = torch.tensor([[0.4, 0.3, 0.1, 0.1, 0.1]], dtype=torch.float64).log()
    input_ids = torch.tensor([[1, 2]])
    eta = 1 / math.log(5.0)

    def guided(**rule) -> torch.Tensor:
        guidance = GuidanceConfig(eta=eta, top_k=2, use_cache=False, **rule)
        return GuidedLogitsProcessor(model, guidance, torch.ones(1, 2, dtype=torch.long))(input_ids, scores)[0].exp()

    expected = torch.tensor([0.6, 0.3, 0.1, 0.1, 0.1], dtype=torch.float64) / 1.2
    torch.testing.assert_close(guided(), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(guided(non_candidate_offset="candidate_min"), expected, rtol=0, atol=1e-12)
    expected = torch.tensor([1.2, 0.6, 0.1, 0.1, 0.1], dtype=torch.float64) / 2.1
    torch.testing.assert_close(guided(non_candidate_offset="z_min"), expected, rtol=0, atol=1e-12)


def test_guidance_config_refuses_unknown_non_candidate_rule():
    message = r"non_candidate_offset must be one of \('candidate_min', 'z_min'\), got 'worst'"
    with pytest.raises(ValueError, match=message):
        GuidanceConfig(non_candidate_offset="worst")


def test_collect_and_fit_recovers_optimal_policy(tmp_path):
    """Two rounds of Algorithm 1 (round 2 rolls in with the guided policy) + BCE fitting of a tabular
    V-type value model ⇒ KL(π* ‖ π_guided) < 0.01."""
    mdp = TokenMDP()
    ref = TabularLM(mdp, seed=0)
    rewards = random_rewards(mdp, seed=1)
    eta = 0.5
    guidance = GuidanceConfig(eta=eta, top_k=0, use_cache=False)
    p_star = optimal_distribution(mdp, ref, rewards, eta)
    prompts = [list(x) for x in mdp.prompts]

    def reward_fn(indices, completions, texts):
        return [rewards[(mdp.prompts[i], tuple(y))] for i, y in zip(indices, completions)]

    settings = CollectionSettings(num_samples=800, max_tokens=mdp.horizon, temperature=1.0, top_p=1.0, chunk_size=1)
    model = tabular_value_model(mdp)
    kl_start = kl_optimal_to_guided(model, ref, mdp, p_star, guidance)  # π^1 = π_ref
    files = []
    for k in (1, 2):
        rollin = None if k == 1 else TabularEngine(mdp, ref, model, guidance)
        files.append(tmp_path / f"iter{k}.jsonl")
        collect_iteration(files[-1], prompts, TabularEngine(mdp, ref), reward_fn, settings, iteration=k,
                          rollin_engine=rollin, eos_ids={mdp.eos_token_id})  # fmt: skip
        fit_value_model(model, load_examples(files, drop_no_variation=False), steps=150, lr=0.3)
    kl_end = kl_optimal_to_guided(model, ref, mdp, p_star, guidance)
    assert kl_start > 0.1
    assert kl_end < 0.01, (kl_start, kl_end)


def test_collection_rows_follow_algorithm_1(tmp_path):
    """Round 2: prefix = prompt + y[:c], targets = y[c] + π_ref roll-out, label = R of the whole response."""
    mdp = TokenMDP(vocab_size=4, horizon=3)
    ref = TabularLM(mdp, seed=0)
    rewards = random_rewards(mdp, seed=1)
    model = tabular_value_model(mdp)
    prompts = [list(x) for x in mdp.prompts]
    guidance = GuidanceConfig(eta=0.5, top_k=0, use_cache=False)

    def reward_fn(indices, completions, texts):
        return [rewards[(mdp.prompts[i], tuple(y))] for i, y in zip(indices, completions)]

    settings = CollectionSettings(num_samples=50, max_tokens=3, temperature=1.0, top_p=1.0, chunk_size=1)
    collect_iteration(tmp_path / "d.jsonl", prompts, TabularEngine(mdp, ref), reward_fn, settings, iteration=2,
                      rollin_engine=TabularEngine(mdp, ref, model, guidance), eos_ids={0})  # fmt: skip
    rows = read_rows(tmp_path / "d.jsonl")
    assert len(rows) == 100
    for row in rows:
        x = mdp.prompts[row["prompt_index"]]
        assert tuple(row["prefix_ids"][: len(x)]) == x
        response = tuple(row["prefix_ids"][len(x) :] + row["target_ids"])
        assert len(row["prefix_ids"]) - len(x) == row["switch"] < row["rollin_length"]
        assert row["target_ids"] and mdp.is_terminal(response)
        assert row["reward"] == rewards[(x, response)]


def test_collection_resumes_to_identical_rows(tmp_path):
    """A collection killed mid-write (torn line + unfinished chunk) resumes to the same rows."""
    mdp = TokenMDP()
    ref = TabularLM(mdp, seed=0)
    rewards = random_rewards(mdp, seed=1)
    prompts = [list(x) for x in mdp.prompts] * 3

    def reward_fn(indices, completions, texts):
        return [rewards[(tuple(prompts[i]), tuple(y))] for i, y in zip(indices, completions)]

    settings = CollectionSettings(num_samples=5, max_tokens=3, temperature=1.0, top_p=1.0, chunk_size=2)
    full, partial = tmp_path / "full.jsonl", tmp_path / "partial.jsonl"
    collect_iteration(full, prompts, TabularEngine(mdp, ref), reward_fn, settings)
    lines = full.read_text().splitlines()
    partial.write_text("\n".join(lines[:14]) + "\n" + lines[14][:9])  # chunk 0 done, chunk 1 torn
    (tmp_path / "partial.meta.json").write_text((tmp_path / "full.meta.json").read_text())
    assert len(read_rows(partial)) == 10
    collect_iteration(partial, prompts, TabularEngine(mdp, ref), reward_fn, settings)
    assert read_rows(partial) == read_rows(full) and len(read_rows(full)) == 30
    with pytest.raises(ValueError, match="other settings"):
        other = CollectionSettings(num_samples=6, max_tokens=3)
        collect_iteration(partial, prompts, TabularEngine(mdp, ref), reward_fn, other)


class NoEngine:
    def generate(self, prompts, sampling):
        raise AssertionError("nothing should be collected")


def test_collection_resumes_or_refuses_other_settings_without_deleting(tmp_path):
    mdp = TokenMDP()
    ref = TabularLM(mdp, seed=0)
    prompts = [list(x) for x in mdp.prompts] * 3

    def reward_fn(indices, completions, texts):
        return [float(len(y)) for y in completions]

    settings = CollectionSettings(num_samples=5, max_tokens=3, temperature=1.0, top_p=1.0, chunk_size=2)
    path = tmp_path / "iter01.rank0.jsonl"
    assert collect_iteration(path, prompts, TabularEngine(mdp, ref), reward_fn, settings) == 30
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    # Equal settings: every chunk is done, so nothing is generated and nothing changes.
    assert collect_iteration(path, prompts, NoEngine(), reward_fn, settings) == 30
    other = CollectionSettings(num_samples=6, max_tokens=3, temperature=0.7, top_p=1.0, chunk_size=2)
    with pytest.raises(SettingsMismatch) as caught:
        collect_iteration(path, prompts, NoEngine(), reward_fn, other, restart="another output_dir")
    assert "settings: {'num_samples': 5, 'temperature': 1.0} → {'num_samples': 6, 'temperature': 0.7}" in str(
        caught.value
    ) and str(caught.value).endswith("To start over: another output_dir")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    # Equal settings and as many prompts, but other prompts (another dataset, say): the rows are not theirs.
    swapped = [prompts[1], prompts[0], *prompts[2:]]
    assert prompts[0] != prompts[1]
    with pytest.raises(ConfigError, match=r"holds samples of other problems than the data now has \(problem 0: "
                                          rf"stored {re.escape(repr(prompts[0]))}, now {re.escape(repr(prompts[1]))}\)"):  # fmt: skip
        collect_iteration(path, swapped, NoEngine(), reward_fn, settings, restart="another output_dir")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert collect_iteration(path, prompts, TabularEngine(mdp, ref), reward_fn, other, overwrite=True) == 36


def test_collection_refuses_rows_graded_against_answers_that_changed_since(tmp_path):
    # Same prompts, other gold answers (a dataset whose answers were corrected): the rewards in the rows were
    # graded against the old ones, so neither this iteration's resume nor a later iteration's fit may use them.
    mdp = TokenMDP()
    ref = TabularLM(mdp, seed=0)
    prompts = [list(x) for x in mdp.prompts] * 2
    answers = [{"answer": str(i), "level": (i, "easy")} for i in range(len(prompts))]

    def reward_fn(indices, completions, texts):
        return [float(len(y)) for y in completions]

    settings = CollectionSettings(num_samples=2, max_tokens=3, temperature=1.0, top_p=1.0, chunk_size=2)
    path = tmp_path / "iter01.rank0.jsonl"
    collect_iteration(path, prompts, TabularEngine(mdp, ref), reward_fn, settings, reward_columns=answers)
    rows = read_rows(path)
    assert [row["reward_columns"] for row in rows[:3]] == [
        {"answer": "0", "level": [0, "easy"]}, {"answer": "0", "level": [0, "easy"]},
        {"answer": "1", "level": [1, "easy"]},
    ]  # fmt: skip
    before = path.read_bytes()
    # Equal answers (a tuple reads back as a list): resumed, nothing collected; the earlier-iterations check agrees.
    assert collect_iteration(path, prompts, NoEngine(), reward_fn, settings, reward_columns=answers) == len(rows)
    refuse_changed_problems([path], prompts, answers)
    corrected = [*answers[:3], {"answer": "30", "level": (3, "easy")}, *answers[4:]]
    message = re.escape(
        f"holds samples of other problems than the data now has (problem 3: stored ({prompts[3]}, {{'answer': '3', "
        f"'level': [3, 'easy']}}), now ({prompts[3]}, {{'answer': '30', 'level': [3, 'easy']}})); no record was "
        "changed. To start over: another output_dir"
    )
    with pytest.raises(ConfigError, match=message):
        collect_iteration(path, prompts, NoEngine(), reward_fn, settings, restart="another output_dir",
                          reward_columns=corrected)  # fmt: skip
    with pytest.raises(ConfigError, match=message):
        refuse_changed_problems([path], prompts, corrected, restart="another output_dir")
    assert path.read_bytes() == before
    with pytest.raises(ValueError, match="reward_columns has 3 entries for 4 prompts"):
        collect_iteration(path, prompts, NoEngine(), reward_fn, settings, reward_columns=answers[:3])
    # Rows collected before rows carried their answers are checked on their prompts alone.
    old = tmp_path / "old.jsonl"
    collect_iteration(old, prompts, TabularEngine(mdp, ref), reward_fn, settings)
    assert "reward_columns" not in read_rows(old)[0]
    assert collect_iteration(old, prompts, NoEngine(), reward_fn, settings, reward_columns=corrected) == len(rows)


# ----------------------------------------------------------------------------- KV cache on a tiny Llama


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from qalign.models import load_model, load_tokenizer

    return load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir)), str(tiny_model_dir)


def _value_model(path: str, value_type: str, head: str) -> QSharpValueModel:
    torch.manual_seed(0)
    model = QSharpValueModel.from_reference(path, ValueHeadConfig(head=head, value_type=value_type, num_layers=1))
    with torch.no_grad():
        model.score.weight.normal_(0.0, 1.0)  # a head strong enough to change which tokens are sampled
    return model.eval()


def _guided_run(ref, tokenizer, value_model, use_cache: bool):
    from qalign.decoding.guided import GuidedEngine

    prompts = [tokenizer("What is 3 + 4?")["input_ids"], tokenizer("Ana has")["input_ids"]]  # different lengths
    engine = GuidedEngine(ref, value_model, tokenizer, GuidanceConfig(eta=0.3, top_k=6, use_cache=use_cache))
    out = engine.generate(prompts, SamplingConfig(n=2, temperature=1.0, max_tokens=10, seed=7))
    completions = [c for group in out for c in group]
    return [c.completion_ids for c in completions], [c.logprobs for c in completions], engine.kl_summary()


@pytest.mark.parametrize(("value_type", "head"), [("v", "bernoulli"), ("v", "histogram"), ("q", "bernoulli")])
def test_cache_fast_path_gives_identical_tokens(tiny, value_type, head):
    ref, tokenizer, path = tiny
    value_model = _value_model(path, value_type, head)
    fast_ids, fast_logprobs, fast_kl = _guided_run(ref, tokenizer, value_model, use_cache=True)
    slow_ids, slow_logprobs, slow_kl = _guided_run(ref, tokenizer, value_model, use_cache=False)
    assert fast_ids == slow_ids
    for a, b in zip(fast_logprobs, slow_logprobs):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-4, rtol=0)
    assert fast_kl["kl_per_token"] == pytest.approx(slow_kl["kl_per_token"], abs=1e-5)
    assert fast_kl["kl_per_token"] > 0.01  # the guidance really changed the distribution


def test_leaking_candidates_into_the_cache_is_caught(tiny, monkeypatch):
    """Without the crop the candidates stay in the value cache: the test above would fail."""
    from transformers import DynamicCache

    ref, tokenizer, path = tiny
    value_model = _value_model(path, "v", "bernoulli")
    _, slow_logprobs, _ = _guided_run(ref, tokenizer, value_model, use_cache=False)
    monkeypatch.setattr(DynamicCache, "crop", lambda self, n: None)
    with pytest.raises(Exception):  # noqa: B017 - wrong cache length: a shape error or different numbers
        _, leaky_logprobs, _ = _guided_run(ref, tokenizer, value_model, use_cache=True)
        for a, b in zip(leaky_logprobs, slow_logprobs):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-4, rtol=0)


def test_saved_guided_policy_round_trip(tiny, tmp_path):
    from qalign.decoding.guided import load_guided_engine, save_guided_policy

    ref, tokenizer, path = tiny
    value_model = _value_model(path, "v", "histogram")
    value_model.save_pretrained(tmp_path / "value_model")
    save_guided_policy(tmp_path, path, "value_model", GuidanceConfig(eta=0.3, top_k=6))
    engine, _, description = load_guided_engine(tmp_path)
    assert json.loads((tmp_path / "guided_policy.json").read_text())["eta"] == 0.3 == description["eta"]
    ids, _, _ = _guided_run(ref, tokenizer, value_model, use_cache=True)
    reloaded, _, _ = _guided_run(engine.model, tokenizer, engine.value_model, use_cache=True)
    assert ids == reloaded


def test_saved_guided_policy_keeps_the_non_candidate_rule(tiny, tmp_path):
    from qalign.decoding.guided import load_guided_engine, save_guided_policy

    _, _, path = tiny
    _value_model(path, "v", "bernoulli").save_pretrained(tmp_path / "value_model")
    file = tmp_path / "guided_policy.json"
    save_guided_policy(tmp_path, path, "value_model", GuidanceConfig(eta=0.3, top_k=6))
    assert json.loads(file.read_text())["non_candidate_offset"] == "candidate_min"
    save_guided_policy(tmp_path, path, "value_model", GuidanceConfig(eta=0.3, top_k=6, non_candidate_offset="z_min"))
    engine, _, description = load_guided_engine(tmp_path)
    assert engine.guidance.non_candidate_offset == "z_min" == description["non_candidate_offset"]
    # A file from before the field existed was decoded with non-candidates at offset 0: it loads that way.
    record = json.loads(file.read_text())
    del record["non_candidate_offset"]
    file.write_text(json.dumps(record))
    engine, _, description = load_guided_engine(tmp_path)
    assert engine.guidance.non_candidate_offset == "z_min" == description["non_candidate_offset"]
    engine, _, _ = load_guided_engine(tmp_path, non_candidate_offset="candidate_min")  # an override wins
    assert engine.guidance.non_candidate_offset == "candidate_min"


@pytest.mark.parametrize(("value_type", "head"), [("v", "bernoulli"), ("v", "histogram"), ("q", "bernoulli")])
def test_a_bfloat16_value_trunk_feeds_its_float32_head(tiny, value_type, head):
    """The head stays float32 whatever the trunk's dtype; outside autocast (guided decoding) its bf16 hidden
    states are upcast for it, and the values equal those of the same weights in float32 up to bf16's rounding."""
    ref, tokenizer, path = tiny
    torch.manual_seed(0)
    config = ValueHeadConfig(head=head, value_type=value_type, num_layers=1)
    half = QSharpValueModel.from_reference(path, config, "bfloat16").eval()
    full = QSharpValueModel.from_reference(path, config, "float32").eval()
    full.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    assert half.score.weight.dtype == torch.float32
    ids = torch.tensor([tokenizer("What is 3 + 4?")["input_ids"]])
    with torch.no_grad():
        values, expected = half(ids), full(ids)
    assert values.dtype == torch.float32
    torch.testing.assert_close(values, expected, atol=0.05, rtol=0.05)
    engine_ids, _, _ = _guided_run(ref, tokenizer, half, use_cache=True)  # decodes without a dtype error
    assert all(len(ids) > 0 for ids in engine_ids)
