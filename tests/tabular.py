"""The tabular token-MDP test bed: a tiny vocabulary, a short horizon, every completion enumerable,
and the KL-regularised optimum known exactly.

    mdp = TokenMDP()                                   # vocabulary 4 (0 = EOS), horizon 3, two prompts
    ref = TabularLM(mdp, seed=0)                       # random π_ref
    policy = ref.clone()                               # π_θ starts at π_ref
    rewards = random_rewards(mdp, seed=1)              # R(x, y) ∈ {0, 1}
    rows = enumerated_rollouts(mdp, ref, rewards)      # every (x, y), in the offline rollout format
    batch = RolloutCollator(PAD)(rows)                 # the trainers' collator
    p_star = optimal_distribution(mdp, ref, rewards, beta)   # π*(y|x) ∝ π_ref(y|x) exp(R(x,y)/β)
    kl_to_optimal(policy, mdp, p_star)                 # KL(π* ‖ π_θ), averaged over prompts

``TabularLM`` is a torch module with the calling convention of a transformers causal LM (input_ids,
attention_mask, position_ids, logits_to_keep, output_hidden_states → ``.logits``, ``.hidden_states``),
so the trainers' own forward/statistics/loss code runs on it unchanged. Its "hidden state" is the
one-hot code of the decision state and its ``lm_head`` is a free logit per (state, token): a tabular
model over the vocabulary. A linear head on that hidden state (DQO's ``value_head``) is a tabular V.

Multi-turn: ``TokenMDP(env_token=4, env_after=1)`` inserts an environment token after the policy's
first action (unless it stopped): it is part of the later states but not an action (``action_mask``
0), and ``env_rewards`` can put a reward on it, which belongs to the action before.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn

from qalign.data.rollouts import RolloutCollator, reference_stats
from tests.threads import one_torch_thread

PAD = 0  # the pad id is the EOS id, as in many LLM tokenizers: masks must never be derived from it

Episode = tuple[tuple[int, ...], tuple[int, ...]]  # (prompt tokens, policy actions)


@dataclass(frozen=True)
class TokenMDP:
    vocab_size: int = 4
    horizon: int = 3
    prompts: tuple[tuple[int, ...], ...] = ((1,), (2, 3))
    eos_token_id: int = 0
    env_token: int | None = None  # token the environment inserts …
    env_after: int | None = None  # … after this many policy actions (if the policy has not stopped)

    def action_sequences(self) -> list[tuple[int, ...]]:
        """Every completion as a sequence of policy actions: it ends at EOS or at the horizon."""
        out = []
        for length in range(1, self.horizon + 1):
            for seq in itertools.product(range(self.vocab_size), repeat=length):
                stops_once = all(a != self.eos_token_id for a in seq[:-1])
                if stops_once and (seq[-1] == self.eos_token_id or length == self.horizon):
                    out.append(seq)
        return out

    def action_prefixes(self) -> list[tuple[int, ...]]:
        """Prefixes after which the policy still acts: no EOS yet, shorter than the horizon."""
        return [p for n in range(self.horizon) for p in itertools.product(range(self.vocab_size), repeat=n)
                if self.eos_token_id not in p]  # fmt: skip

    def episodes(self) -> list[Episode]:
        return [(x, y) for x in self.prompts for y in self.action_sequences()]

    def is_terminal(self, actions: tuple[int, ...]) -> bool:
        return bool(actions) and (actions[-1] == self.eos_token_id or len(actions) == self.horizon)

    def render(self, actions: tuple[int, ...]) -> tuple[list[int], list[int]]:
        """(tokens, action_mask) of a (partial) completion, environment tokens included."""
        tokens, mask = [], []
        for i, action in enumerate(actions):
            tokens.append(action)
            mask.append(1)
            if self.env_token is not None and i + 1 == self.env_after and not self.is_terminal(actions[: i + 1]):
                tokens.append(self.env_token)
                mask.append(0)
        return tokens, mask

    def state(self, prompt: tuple[int, ...], prefix: tuple[int, ...]) -> tuple[int, ...]:
        """The full token prefix of the decision state after ``prefix`` (what the LM conditions on)."""
        return tuple(prompt) + tuple(self.render(prefix)[0])

    def decision_states(self) -> list[tuple[int, ...]]:
        return [self.state(x, p) for x in self.prompts for p in self.action_prefixes()]


class TabularLM(nn.Module):
    """A free logit per (decision state, token), with a transformers-style forward."""

    def __init__(self, mdp: TokenMDP, seed: int | None = 0, scale: float = 1.0):
        super().__init__()
        self.mdp = mdp
        self.states = [()] + mdp.decision_states()  # row 0: every other prefix (inside the prompt, before env tokens)
        self.index = {s: i for i, s in enumerate(self.states)}
        self.config = SimpleNamespace(hidden_size=len(self.states), vocab_size=mdp.vocab_size)
        self.lm_head = nn.Linear(len(self.states), mdp.vocab_size, bias=False)
        with torch.no_grad():
            generator = torch.Generator().manual_seed(seed or 0)
            init = scale * torch.randn(mdp.vocab_size, len(self.states), generator=generator)
            self.lm_head.weight.copy_(init if seed is not None else torch.zeros_like(init))
        self._cache: dict[tuple, torch.Tensor] = {}

    def clone(self) -> TabularLM:
        return copy.deepcopy(self)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def table(self) -> torch.Tensor:
        """``(num_states, vocab)`` logits; row i belongs to ``self.states[i]``."""
        return self.lm_head.weight.t()

    def state_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        mask_bytes = None if attention_mask is None else attention_mask.numpy().tobytes()
        key = (tuple(input_ids.shape), input_ids.numpy().tobytes(), mask_bytes)
        if key not in self._cache:
            mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
            ids = torch.zeros_like(input_ids)
            for b in range(input_ids.size(0)):
                tokens = [int(t) for t, m in zip(input_ids[b], mask[b]) if m]
                real = [i for i in range(input_ids.size(1)) if mask[b, i]]
                for j, position in enumerate(real):
                    ids[b, position] = self.index.get(tuple(tokens[: j + 1]), 0)
            self._cache[key] = ids
        return self._cache[key]

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep: int = 0,
                output_hidden_states: bool = False, use_cache=None, **kwargs):  # fmt: skip
        hidden = nn.functional.one_hot(self.state_ids(input_ids, attention_mask), len(self.states)).float()
        kept = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        return SimpleNamespace(logits=self.lm_head(kept), hidden_states=(hidden,) if output_hidden_states else None)


# ----------------------------------------------------------------------------- rewards and exact optimum


def random_rewards(mdp: TokenMDP, seed: int = 1, p: float = 0.5) -> dict[Episode, float]:
    """A fixed Bernoulli(p) verifier reward R(x, y) ∈ {0, 1} per episode."""
    generator = torch.Generator().manual_seed(seed)
    return {episode: float(torch.rand((), generator=generator) < p) for episode in mdp.episodes()}


def zero_rewards(mdp: TokenMDP) -> dict[Episode, float]:
    return {episode: 0.0 for episode in mdp.episodes()}


@torch.no_grad()
def policy_probs(model: TabularLM, mdp: TokenMDP, prompt: tuple[int, ...], prefix: tuple[int, ...]) -> torch.Tensor:
    """π(·|s) at the decision state after ``prefix``, read from the model's table."""
    return model.table()[model.index[mdp.state(prompt, prefix)]].double().softmax(-1)


@torch.no_grad()
def sequence_logprob(model: TabularLM, mdp: TokenMDP, prompt: tuple[int, ...], actions: tuple[int, ...]) -> float:
    """ln π(y|x): the sum over policy actions only (environment tokens are not the policy's)."""
    return sum(math.log(policy_probs(model, mdp, prompt, actions[:t])[a]) for t, a in enumerate(actions))


def total_reward(episode: Episode, rewards: dict[Episode, float], env_rewards: dict | None = None) -> float:
    x, y = episode
    return rewards[episode] + ((env_rewards or {}).get((x, y[0]), 0.0) if len(y) > 1 else 0.0)


def optimal_distribution(
    mdp: TokenMDP, ref: TabularLM, rewards: dict[Episode, float], beta: float, env_rewards: dict | None = None
) -> dict[tuple[int, ...], dict[tuple[int, ...], float]]:
    """π*(y|x) = π_ref(y|x) exp(R(x,y)/β) / Z(x) for γ = 1, by enumeration (no recursion involved)."""
    out = {}
    for x in mdp.prompts:
        logits = {y: sequence_logprob(ref, mdp, x, y) + total_reward((x, y), rewards, env_rewards) / beta
                  for y in mdp.action_sequences()}  # fmt: skip
        log_z = torch.logsumexp(torch.tensor(list(logits.values()), dtype=torch.float64), 0).item()
        out[x] = {y: math.exp(v - log_z) for y, v in logits.items()}
    return out


def soft_optimal_values(
    mdp: TokenMDP, ref: TabularLM, rewards: dict[Episode, float], beta: float, gamma: float = 1.0,
    env_rewards: dict | None = None,
) -> tuple[dict[tuple[int, ...], float], dict[tuple[int, ...], torch.Tensor]]:  # fmt: skip
    """V*(s) and Q*(s, ·) at every decision state by the soft Bellman backward recursion
    Q*(s,a) = r(s,a) + γ V*(s'),  V*(s) = β ln Σ_a π_ref(a|s) exp(Q*(s,a)/β). Keys: full token prefixes."""
    values: dict[tuple[int, ...], float] = {}
    q_values: dict[tuple[int, ...], torch.Tensor] = {}
    for x in mdp.prompts:
        for prefix in sorted(mdp.action_prefixes(), key=len, reverse=True):
            q = torch.zeros(mdp.vocab_size, dtype=torch.float64)
            for a in range(mdp.vocab_size):
                actions = prefix + (a,)
                env_step = len(actions) == mdp.env_after and not mdp.is_terminal(actions)
                reward = (env_rewards or {}).get((x, a), 0.0) if env_step else 0.0  # on the env token after a
                if mdp.is_terminal(actions):
                    q[a] = reward + rewards[(x, actions)]
                else:
                    q[a] = reward + gamma * values[mdp.state(x, actions)]
            pi_ref = policy_probs(ref, mdp, x, prefix)
            state = mdp.state(x, prefix)
            values[state] = beta * torch.logsumexp(pi_ref.log() + q / beta, 0).item()
            q_values[state] = q
    return values, q_values


def kl_to_optimal(model: TabularLM, mdp: TokenMDP, p_star: dict) -> float:
    """KL(π* ‖ π_θ) over whole completions, averaged over prompts."""
    kls = []
    for x, dist in p_star.items():
        kls.append(sum(p * (math.log(p) - sequence_logprob(model, mdp, x, y)) for y, p in dist.items() if p > 0))
    return sum(kls) / len(kls)


# ----------------------------------------------------------------------------- data


def enumerated_rollouts(
    mdp: TokenMDP, ref: TabularLM, rewards: dict[Episode, float], env_rewards: dict | None = None
) -> list[dict]:
    """Every episode once, in the offline rollout format (reference statistics from ``ref`` through the
    trainers' own ``reference_stats``; the data is treated as sampled by π_ref)."""
    rows = []
    for x, y in mdp.episodes():
        tokens, mask = mdp.render(y)
        token_rewards = [0.0] * len(tokens)
        token_rewards[len(tokens) - 1] = rewards[(x, y)]
        if mdp.env_token is not None and 0 in mask:
            token_rewards[mask.index(0)] = (env_rewards or {}).get((x, y[0]), 0.0)  # on the env token itself
        rows.append({"prompt_ids": list(x), "completion_ids": tokens, "action_mask": mask, "rewards": token_rewards})
    for row, stats in zip(rows, reference_stats(ref, rows, PAD, batch_size=len(rows))):
        row.update(stats, behavior_logprobs=stats["ref_logprobs"])
    return rows


def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    return RolloutCollator(PAD)(rows)


@contextlib.contextmanager
def single_thread():
    """Run tiny tensor loops on one thread: on a shared CPU, intra-op threads make each op ~10x slower."""
    with one_torch_thread():
        yield
