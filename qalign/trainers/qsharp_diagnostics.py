"""Q#'s value-model diagnostics: is the fitted value model any better than a constant predictor?

``ValueDiagnosticsMixin`` scores each iteration's value model on the roll-outs of prompts held out of its fit
(loss and AUROC against the best constant predictor) and measures the KL its guidance moves π_ref by, next to
the KL a constant value model (and top-k truncation alone) would give at the same η and top-k: a KL those
also show is truncation, not guidance. The math is in ``qalign.losses.qsharp_diagnostics``; this module runs
it on the trainer's models and data. Mixed into ``QSharpTrainer``, whose attributes it reads
(``args``, ``guidance``, ``ref_model``, ``heldout_prompts``, ``_prompt_ids``, ``iteration_stats``,
``full_models()``, ``guided_engine()``, ``value_model()``, ``_iteration_files()``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Any

import torch

from qalign.decoding.collect_qsharp import load_examples
from qalign.losses.qsharp import expected_value, guidance_offset, non_candidate_baseline
from qalign.losses.qsharp_diagnostics import (
    UNINFORMATIVE_AUROC,
    auroc,
    auroc_labels,
    constant_bernoulli_loss,
    constant_head_output,
    constant_histogram_loss,
    constant_value_kl,
    per_row_value_loss,
    row_weights,
    topk_truncation_kl,
    value_model_uninformative,
    weighted_mean,
)
from qalign.rollout.base import SamplingConfig
from qalign.value_model import QSharpValueModel

logger = logging.getLogger("qalign.trainers.qsharp")  # the trainer's logger: its warnings read as the trainer's


class ValueDiagnosticsMixin:
    """Held-out diagnostics of the value model, logged after each Q# iteration's fit (see the module)."""

    def _diagnose(self, k: int, train_examples: list[dict[str, Any]]) -> dict[str, Any]:
        """Score iteration k's value model on the held-out prompts' new roll-outs against the best constant
        predictor fitted on ``train_examples`` (the fit's data), and add the numbers to
        ``iteration_stats[-1]`` and the logged metrics.

        - ``heldout_value_loss`` vs ``constant_value_loss``: the value loss (BCE / histogram NLL, weighted as
          the fit's normaliser weighs roll-outs) of the model and of the constant (p̄, or the atom frequencies).
        - ``heldout_auroc``: E[z] at each held-out roll-out's switch token against its final reward.
        - ``heldout_kl_per_token`` vs ``constant_value_kl_per_token``: KL(guided ‖ π_ref) of the guided policy
          and of the constant value model on the same states (greedy decoding of the held-out prompts, as
          ``qalign.train``'s evaluation), plus ``topk_truncation_kl_per_token`` (−ln top-k mass).
        - ``value_model_uninformative``: held-out loss ≥ the constant's or AUROC ≤ 0.55 (logged as a warning).

        The held-out rows pass the same ``drop_no_variation`` filter as the fit's, so both come from one
        distribution. Every process computes the same numbers from the same files (a collective under
        ZeRO-3 / FSDP, like collection).
        """
        args = self.args
        held = set(self.heldout_prompts)
        new_rows = load_examples(self._iteration_files(k), args.drop_no_variation)
        rows = [e for e in new_rows if e["prompt_index"] in held]
        train_weights = row_weights([self._trained_tokens(e) for e in train_examples], args.value_loss_normalizer)
        train_rewards = [e["reward"] for e in train_examples]
        held_weights = row_weights([self._trained_tokens(e) for e in rows], args.value_loss_normalizer)
        held_rewards = [e["reward"] for e in rows]
        with self.full_models() as value_model:
            losses, values = self._heldout_predictions(value_model, rows)
            kl = self._heldout_kl(value_model, train_rewards, train_weights)
        atoms = self.value_model().atoms.detach().cpu()
        if args.value_head == "bernoulli":
            constant = constant_bernoulli_loss(train_rewards, train_weights, held_rewards, held_weights)
        else:
            constant = constant_histogram_loss(train_rewards, train_weights, held_rewards, held_weights, atoms)
        scored = [i for i, w in enumerate(held_weights) if w > 0]  # rows with a switch token
        area = auroc([values[i] for i in scored], auroc_labels([held_rewards[i] for i in scored]))
        stats: dict[str, Any] = {
            "heldout_prompts": float(len(held)),
            "heldout_rows": float(len(rows)),
            "train_reward_mean": weighted_mean(train_rewards, train_weights),
            "heldout_value_loss": weighted_mean(losses, held_weights) if rows else math.nan,
            "constant_value_loss": constant if rows else math.nan,
            "heldout_auroc": area,
            **kl,
        }
        stats["value_model_uninformative"] = value_model_uninformative(
            stats["heldout_value_loss"], stats["constant_value_loss"], area
        )
        self.iteration_stats[-1].update(stats)
        self.log({"qsharp/iteration": float(k), **{f"qsharp/{name}": float(value) for name, value in stats.items()}})
        if self.accelerator.is_main_process:
            loss_name = "BCE" if args.value_head == "bernoulli" else "NLL"
            summary = (f"held-out {loss_name} {stats['heldout_value_loss']:.4f} vs constant {constant:.4f}, "
                       f"AUROC {area:.3f}, KL/token {kl['heldout_kl_per_token']:.4f} vs constant value "
                       f"{kl['constant_value_kl_per_token']:.4f} (top-k truncation alone "
                       f"{kl['topk_truncation_kl_per_token']:.4f}); {len(rows)} roll-outs of {len(held)} "
                       "held-out prompts")  # fmt: skip
            if not rows:
                logger.warning("Q# iteration %d: no held-out roll-outs to score (all dropped by drop_no_variation?); "
                               "%s", k, summary)  # fmt: skip
            elif stats["value_model_uninformative"]:
                logger.warning("Q# iteration %d: the value model is no better than a constant predictor: %s "
                               "(flagged when the loss is >= the constant's or AUROC <= %.2f)",
                               k, summary, UNINFORMATIVE_AUROC)  # fmt: skip
            else:
                logger.info("Q# iteration %d: value model diagnostics: %s", k, summary)
        return stats

    def _trained_tokens(self, example: dict[str, Any]) -> int:
        """Positions of a roll-out the loss trains (as ``ValueCollator`` masks them)."""
        targets = len(example["target_ids"])
        return targets if self.args.prefix_mode == "all" else min(1, targets)

    @torch.no_grad()
    def _heldout_predictions(
        self, value_model: QSharpValueModel, rows: list[dict[str, Any]]
    ) -> tuple[list[float], list[float]]:
        """(per-roll-out value loss, E[z] at the switch token) of ``rows``."""
        losses: list[float] = []
        values: list[float] = []
        batch_size = self.args.per_device_eval_batch_size
        was_training = value_model.training
        value_model.eval()
        try:
            for start in range(0, len(rows), batch_size):
                collated = self.data_collator(rows[start : start + batch_size])
                batch = {name: tensor.to(value_model.device) for name, tensor in collated.items()}
                head_output = value_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).float()
                mask, head, atoms = batch["loss_mask"], value_model.head, value_model.atoms
                losses += per_row_value_loss(head_output, batch["rewards"], mask, head, atoms).tolist()
                # One prediction per roll-out: at the switch token (the first trained position; left padding),
                # a uniformly drawn point of the response. Later positions have seen more of the answer, which
                # would make ranking easier than the choices the guidance actually faces.
                first = mask.float().argmax(dim=1, keepdim=True)
                predicted = expected_value(head_output, head, atoms)
                values += predicted.gather(1, first).squeeze(1).tolist()
        finally:
            value_model.train(was_training)
        return losses, values

    @torch.no_grad()
    def _heldout_kl(
        self, value_model: QSharpValueModel, train_rewards: list[float], train_weights: list[float]
    ) -> dict[str, float]:
        """KL(π_guided ‖ π_ref) per token of the fitted value model and of the best constant one, on the states
        the guided policy visits when it decodes the held-out prompts greedily (T = 1 for the KL, as in
        ``qalign.train``'s evaluation)."""
        args, guidance = self.args, self.guidance
        prompts = [self._prompt_ids[i] for i in self.heldout_prompts]
        engine = self.guided_engine(value_model=value_model)
        completions = engine.generate(prompts, SamplingConfig(temperature=0.0, max_tokens=args.max_completion_length))
        responses = [c[0].completion_ids for c in completions]
        # The constant predictor's offset c, relative to the non-candidates' offset m(s) as the guided policy
        # applies it: every candidate has offset c, so m(s) = c under `candidate_min` (relative 0) and 0 under
        # `z_min` (relative c).
        atoms = value_model.atoms.detach().cpu().double()
        head_output = constant_head_output(args.value_head, train_rewards, train_weights, atoms)
        offset = guidance_offset(head_output, guidance.eta, args.value_head, guidance.mode, atoms)
        offsets = offset.reshape(1, 1).expand(1, max(guidance.top_k, 1))
        rule = getattr(guidance, "non_candidate_offset", "z_min")
        relative = float((offsets - non_candidate_baseline(offsets, rule))[0, 0])
        constant_sum = truncation_sum = 0.0
        states = 0
        for logits in self._reference_state_logits(prompts, responses):
            constant_sum += float(constant_value_kl(logits, relative, guidance.top_k).sum())
            truncation_sum += float(topk_truncation_kl(logits, guidance.top_k).sum())
            states += logits.size(0)
        return {
            "heldout_kl_per_token": engine.kl_summary()["kl_per_token"],
            "constant_value_kl_per_token": constant_sum / max(states, 1),
            "topk_truncation_kl_per_token": truncation_sum / max(states, 1),
        }

    @torch.no_grad()
    def _reference_state_logits(self, prompts: list[list[int]], responses: list[list[int]]) -> Iterator[torch.Tensor]:
        """For each response y, π_ref's float64 logits ``(|y|, V)`` at the states prompt + y[:t], t < |y|: the
        states ``GuidedEngine`` measured its KL on. Right-padded forwards of ``per_device_eval_batch_size``
        sequences: the real tokens sit at positions 0…L−1 and never see the padding, so each state gets the
        logits generate saw. One response at a time in float64 keeps memory at (batch × L + |y|) × V."""
        model = self.ref_model  # eval mode since __init__
        pad = self.processing_class.pad_token_id if self.processing_class.pad_token_id is not None else 0
        batch_size = self.args.per_device_eval_batch_size
        for start in range(0, len(prompts), batch_size):
            pairs = list(zip(prompts[start : start + batch_size], responses[start : start + batch_size]))
            sequences = [list(p) + list(y) for p, y in pairs]
            width = max(len(s) for s in sequences)
            ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences], device=model.device)
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences], device=model.device)
            logits = model(input_ids=ids, attention_mask=mask).logits
            for i, (p, y) in enumerate(pairs):
                yield logits[i, len(p) - 1 : len(p) - 1 + len(y)].double()
