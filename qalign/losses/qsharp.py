"""Q# math as pure tensor functions (Zhou et al., "Q♯: Provably Optimal Distributional RL for LLM
Post-Training", arXiv 2502.20548): the guidance offset of the decoding rule and the value-model losses.

Decoding rule (Eq. 5), with η the KL weight of J = E[R] − η KL(π ‖ π_ref):

    π^{Z,η}(a|s) ∝ π_ref(a|s) · E_{z~Z(s,a)}[exp(z/η)]
    ⇔ log π^{Z,η}(a|s) = log π_ref(a|s) + offset(s,a) + const(s)

so every function here returns ``offset = ln E[exp(z/η)] − z_min/η`` (Q*,η/η up to a per-state constant).
The shift by the worst outcome z_min makes the offset ≥ 0, so "offset 0" means "surely z_min".

Tokens outside the top-k candidates are never scored; ``non_candidate_baseline`` says which offset they get:
the worst candidate's (``candidate_min``, the authors' rule and the default) or 0 = surely z_min (``z_min``).

η convention: the authors' code takes ``eta`` = 1/η (``--eta 10`` is the paper's η = 0.1). Here ``eta`` is
always the paper's η; ``inv_eta`` below is the code's number.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GUIDANCE_MODES = ("qsharp", "cd")
VALUE_HEADS = ("bernoulli", "histogram")
NORMALIZERS = ("token", "sequence")
NON_CANDIDATE_RULES = ("candidate_min", "z_min")


# ----------------------------------------------------------------------------- guidance offsets


def bernoulli_guidance_offset(logit: torch.Tensor, eta: float) -> torch.Tensor:
    """Q# offset of a Bernoulli head Z(s,a) = Bernoulli(p̂), p̂ = sigmoid(logit):

        offset = ln E[exp(z/η)] = ln(1 − p̂ + p̂·e^{1/η}) = softplus(logit + 1/η) − softplus(logit)

    (z ∈ {0, 1}, so z_min = 0). The softplus form is exact and never overflows, even for η = 0.01.

    Args:
        logit: ``(...)`` classifier logits, logit(p̂).
    Returns:
        ``(...)`` offsets in [0, 1/η].
    """
    inv_eta = 1.0 / eta  # the authors' "eta"
    return F.softplus(logit + inv_eta) - F.softplus(logit)


def histogram_guidance_offset(atom_logits: torch.Tensor, atoms: torch.Tensor, eta: float) -> torch.Tensor:
    """Q# offset of a histogram head Z(s,a) = Σ_i p̂_i δ_{z_i}, p̂ = softmax(atom_logits):

        offset = ln Σ_i p̂_i exp(z_i/η) − z_min/η = logsumexp_i(log p̂_i + (z_i − z_min)/η)

    Args:
        atom_logits: ``(..., A)`` logits over the A atoms.
        atoms: ``(A,)`` support z_1 < … < z_A.
    Returns:
        ``(...)`` offsets in [0, (z_max − z_min)/η].
    """
    log_p = atom_logits.log_softmax(dim=-1)
    shifted = (atoms - atoms.min()).to(log_p) / eta
    return torch.logsumexp(log_p + shifted, dim=-1)


def cd_guidance_offset(mean_value: torch.Tensor, eta: float, v_min: float = 0.0) -> torch.Tensor:
    """CD / VAS baseline: reweight with exp(Q^{π_ref,0}/η) = exp(E[z]/η), i.e. offset = (E[z] − z_min)/η.

    Sub-optimal for the KL-regularised objective (the paper's Thm 4.1); kept for comparison.

    Args:
        mean_value: ``(...)`` E_{z~Z(s,a)}[z] (p̂ for a Bernoulli head).
    """
    return (mean_value - v_min) / eta


def guidance_offset(
    head_output: torch.Tensor,
    eta: float,
    head: str = "bernoulli",
    mode: str = "qsharp",
    atoms: torch.Tensor | None = None,
) -> torch.Tensor:
    """The offset of ``mode`` ('qsharp' or 'cd') for raw value-head outputs.

    Args:
        head_output: ``(...)`` Bernoulli logits, or ``(..., A)`` histogram atom logits.
        atoms: ``(A,)``, histogram heads only.
    Returns:
        ``(...)`` offsets added to log π_ref(a|s).
    """
    if eta <= 0:
        raise ValueError(f"eta must be > 0, got {eta}")
    if mode not in GUIDANCE_MODES:
        raise ValueError(f"guidance mode must be one of {GUIDANCE_MODES}, got {mode!r}")
    if head == "bernoulli":
        if mode == "qsharp":
            return bernoulli_guidance_offset(head_output, eta)
        return cd_guidance_offset(head_output.sigmoid(), eta)
    if head == "histogram":
        if atoms is None:
            raise ValueError("a histogram head needs its atoms")
        if mode == "qsharp":
            return histogram_guidance_offset(head_output, atoms, eta)
        mean = (head_output.softmax(dim=-1) * atoms.to(head_output)).sum(dim=-1)
        return cd_guidance_offset(mean, eta, float(atoms.min()))
    raise ValueError(f"value head must be one of {VALUE_HEADS}, got {head!r}")


def non_candidate_baseline(offset: torch.Tensor, rule: str = "candidate_min") -> torch.Tensor:
    """m(s): the offset assumed for every token outside the scored candidate set C(s).

        candidate_min:  m(s) = min_{c ∈ C(s)} offset(s, c)   (no better than the worst candidate; the authors')
        z_min:          m(s) = 0                            (surely the worst outcome z_min)

    The guided policy is then π^{Z,η}(a|s) ∝ π_ref(a|s)·exp(offset(s,a) − m(s)) on C(s) and ∝ π_ref(a|s)
    off it. Softmax is shift-invariant, so when C(s) is the whole vocabulary m(s) changes nothing.

    Args:
        offset: ``(B, K)`` offsets of the K candidates of each of B states.
        rule: one of ``NON_CANDIDATE_RULES``.
    Returns:
        ``(B, 1)``, to subtract from ``offset``.
    """
    if rule == "candidate_min":
        # Unscored tokens are π_ref's less likely ones, of unknown value. Calling them surely z_min (m = 0)
        # would push mass off them whenever all candidates look good, even if the head prefers none of them.
        return offset.min(dim=-1, keepdim=True).values
    if rule == "z_min":
        return torch.zeros_like(offset[..., :1])
    raise ValueError(f"non_candidate_offset must be one of {NON_CANDIDATE_RULES}, got {rule!r}")


def guided_logits(
    ref_logits: torch.Tensor,
    offset: torch.Tensor,
    candidates: torch.Tensor | None = None,
    non_candidate: str = "candidate_min",
) -> torch.Tensor:
    """The normalised log π^{Z,η}(·|s) over the vocabulary:

        log π^{Z,η}(a|s) = log π_ref(a|s) + offset(s,a) − m(s)   for a ∈ C(s)
                         = log π_ref(a|s)                        for a ∉ C(s)       (up to normalisation)

    with m(s) from ``non_candidate_baseline`` (``non_candidate``).

    Args:
        ref_logits: ``(B, V)`` reference logits (already divided by the sampling temperature).
        offset: ``(B, K)`` offsets of ``candidates``, or ``(B, V)`` when ``candidates`` is None.
        candidates: ``(B, K)`` token ids, or None for the full vocabulary (then m(s) is irrelevant).
        non_candidate: ``'candidate_min'`` (default) or ``'z_min'``.
    Returns:
        ``(B, V)`` guided log-probabilities, normalised.
    """
    log_ref = ref_logits.log_softmax(dim=-1)
    offset = offset.to(log_ref)
    relative = offset - non_candidate_baseline(offset, non_candidate)
    if candidates is None:  # every token scored: m(s) is a per-row constant that the softmax removes
        return (log_ref + relative).log_softmax(dim=-1)
    return log_ref.scatter_add(-1, candidates, relative).log_softmax(dim=-1)


def kl_divergence(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) = Σ_a p(a) (log p(a) − log q(a)) per row.

    Args:
        log_p, log_q: ``(..., V)`` normalised log-probabilities (−inf allowed where p = 0).
    Returns:
        ``(...)``.
    """
    p = log_p.exp()
    terms = p * (log_p - log_q)
    return torch.where(p > 0, terms, torch.zeros_like(terms)).sum(dim=-1)


# ----------------------------------------------------------------------------- value-model losses


def masked_sequence_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over each sequence's masked positions, then over sequences (each sequence weighs the same,
    as the authors' code). Sequences with no masked position are left out.

    Args:
        values, mask: ``(B, T)``.
    """
    mask = mask.to(values.dtype)
    counts = mask.sum(dim=1)
    per_sequence = (values * mask).sum(dim=1) / counts.clamp(min=1)
    has_any = (counts > 0).to(values.dtype)
    return (per_sequence * has_any).sum() / has_any.sum().clamp(min=1)


def masked_token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over all masked positions of the batch: every (s_h, a_h) example weighs the same, as in the
    paper's objective Σ_h E_D[L(R, Z_θ(x_h, y_h))].

    Args:
        values, mask: ``(B, T)``.
    """
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def _reduce(values: torch.Tensor, mask: torch.Tensor, normalizer: str) -> torch.Tensor:
    if normalizer == "token":
        return masked_token_mean(values, mask)
    if normalizer == "sequence":
        return masked_sequence_mean(values, mask)
    raise ValueError(f"normalizer must be one of {NORMALIZERS}, got {normalizer!r}")


def bernoulli_value_loss(
    logits: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, normalizer: str = "token"
) -> torch.Tensor:
    """L_bce(r, p̂) = −r ln p̂ − (1 − r) ln(1 − p̂) at every masked position (every token after the switch
    point is trained toward the trajectory's final reward r ∈ [0, 1]).

    ``normalizer='token'`` averages over all masked positions (the paper's objective; the minimiser of a
    tabular p̂(s,a) is then the mean reward after (s,a)). ``'sequence'`` averages per sequence first, as
    the authors' code: that weighs a position by 1/(tokens after the switch), which biases p̂ toward the
    outcomes of short continuations when length and reward are correlated.

    Args:
        logits: ``(B, T)`` logit(p̂) per position (aligned with the action token at that position).
        rewards: ``(B,)`` final reward of each trajectory.
        mask: ``(B, T)`` 1 on the positions to train (post-switch actions).
    """
    targets = rewards.to(logits.dtype).unsqueeze(1).expand_as(logits)
    losses = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return _reduce(losses, mask, normalizer)


def nearest_atom(rewards: torch.Tensor, atoms: torch.Tensor) -> torch.Tensor:
    """idx(r): the index of the atom closest to r (rewards outside [z_1, z_A] go to the end atoms).

    Args:
        rewards: ``(B,)``; atoms: ``(A,)``.
    Returns:
        ``(B,)`` long.
    """
    return (rewards.unsqueeze(-1) - atoms.to(rewards)).abs().argmin(dim=-1)


def histogram_value_loss(
    atom_logits: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, atoms: torch.Tensor, normalizer: str = "token"
) -> torch.Tensor:
    """L_mle(r, ẑ) = −ln ẑ[idx(r)] at every masked position, ẑ = softmax(atom_logits).

    Args:
        atom_logits: ``(B, T, A)``; rewards: ``(B,)``; mask: ``(B, T)``; atoms: ``(A,)``.
        normalizer: as in ``bernoulli_value_loss``.
    """
    log_p = atom_logits.log_softmax(dim=-1)
    index = nearest_atom(rewards.to(log_p.dtype), atoms).view(-1, 1, 1).expand(-1, log_p.size(1), 1)
    losses = -log_p.gather(-1, index).squeeze(-1)
    return _reduce(losses, mask, normalizer)


def value_loss(
    head_output: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    head: str = "bernoulli",
    atoms: torch.Tensor | None = None,
    normalizer: str = "token",
) -> torch.Tensor:
    """BCE for a Bernoulli head (``(B, T)`` logits), MLE for a histogram head (``(B, T, A)`` logits)."""
    head_output = head_output if head_output.dtype == torch.float64 else head_output.float()
    if head == "bernoulli":
        return bernoulli_value_loss(head_output, rewards, mask, normalizer)
    if head == "histogram":
        if atoms is None:
            raise ValueError("a histogram head needs its atoms")
        return histogram_value_loss(head_output, rewards, mask, atoms, normalizer)
    raise ValueError(f"value head must be one of {VALUE_HEADS}, got {head!r}")


def expected_value(
    head_output: torch.Tensor, head: str = "bernoulli", atoms: torch.Tensor | None = None
) -> torch.Tensor:
    """E_{z~Z}[z]: p̂ for a Bernoulli head, Σ_i p̂_i z_i for a histogram head."""
    if head == "bernoulli":
        return head_output.sigmoid()
    return (head_output.softmax(dim=-1) * atoms.to(head_output)).sum(dim=-1)
