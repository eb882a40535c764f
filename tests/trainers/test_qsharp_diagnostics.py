"""QSharpTrainer's value-model diagnostics on the tiny Llama: held-out prompts stay out of the fit, every
iteration reports loss / AUROC / KL next to the constant predictor's, and a constant value model is flagged."""

from __future__ import annotations

import dataclasses
import logging
import math

import pytest
import torch

from qalign.decoding.collect_qsharp import load_examples
from qalign.losses.qsharp_diagnostics import bernoulli_cross_entropy, constant_bernoulli_mean, row_weights
from qalign.trainers.qsharp import QSharpTrainer
from qalign.value_model import QSharpValueModel, ValueHeadConfig
from tests.trainers.helpers import tiny_prompt_dataset
from tests.trainers.test_qsharp import even_first_token_reward, tiny_args

DIAGNOSTICS = ("heldout_value_loss", "constant_value_loss", "heldout_auroc", "heldout_kl_per_token",
               "constant_value_kl_per_token", "topk_truncation_kl_per_token", "train_reward_mean")  # fmt: skip


def constant_value_model(model_dir, logit: float = 0.0) -> QSharpValueModel:
    """A value model that predicts p̂ = sigmoid(logit) everywhere and cannot learn: zero head weights, frozen."""
    model = QSharpValueModel.from_reference(str(model_dir), ValueHeadConfig(num_layers=1))
    with torch.no_grad():
        model.score.weight.zero_()
        model.score.bias.fill_(logit)
    model.score.requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def constant_run(tiny_model_dir, tmp_path_factory):
    from qalign.models import load_model, load_tokenizer

    out = tmp_path_factory.mktemp("qsharp-diagnostics")
    tokenizer = load_tokenizer(str(tiny_model_dir))
    # No drop_no_variation: the held-out prompts keep all their roll-outs, whatever their rewards.
    args = tiny_args(out, num_train_epochs=1, drop_no_variation=False, diagnostics_holdout_fraction=0.25)
    trainer = QSharpTrainer(constant_value_model(tiny_model_dir), args, load_model(str(tiny_model_dir)), tokenizer,
                            tiny_prompt_dataset(16), [even_first_token_reward])  # fmt: skip
    logger = logging.getLogger("qalign.trainers.qsharp")
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        trainer.train()
    finally:
        logger.removeHandler(handler)
    return trainer, records


def test_heldout_prompts_are_collected_but_never_fitted(constant_run):
    trainer, _ = constant_run
    held = set(trainer.heldout_prompts)
    assert len(held) == 4  # 25 % of 16 prompts
    rows = load_examples(trainer._data_files(2), drop_no_variation=False)
    assert {r["prompt_index"] for r in rows} >= held  # their roll-outs were collected in both rounds…
    fitted = [r for r in rows if r["prompt_index"] not in held]
    assert len(trainer.train_dataset) == len(fitted) < len(rows)  # …and left out of the last fit
    assert sorted(trainer.train_dataset["reward"]) == sorted(r["reward"] for r in fitted)


def test_every_iteration_reports_finite_diagnostics_and_flags_a_constant_model(constant_run):
    trainer, records = constant_run
    assert [s["iteration"] for s in trainer.iteration_stats] == [1.0, 2.0]
    for k, stats in enumerate(trainer.iteration_stats, start=1):
        assert stats["heldout_prompts"] == 4.0 and stats["heldout_rows"] == 16.0  # 4 prompts × 4 samples
        for name in DIAGNOSTICS:
            assert math.isfinite(stats[name]), (k, name, stats[name])
        # p̂ = 1/2 everywhere: every roll-out ties, and the BCE is ln 2 at every token.
        assert stats["heldout_auroc"] == 0.5
        assert stats["heldout_value_loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert stats["value_model_uninformative"] is True
        # The constant of the fit's data (p̄, token-weighted) scored on the held-out labels.
        held = set(trainer.heldout_prompts)
        rows = load_examples(trainer._iteration_files(k), drop_no_variation=False)
        aggregated = load_examples(trainer._data_files(k), drop_no_variation=False)
        fit = [r for r in aggregated if r["prompt_index"] not in held]
        heldout = [r for r in rows if r["prompt_index"] in held]
        tokens = lambda rs: [len(r["target_ids"]) for r in rs]
        p_bar = constant_bernoulli_mean([r["reward"] for r in fit], row_weights(tokens(fit)))
        expected = bernoulli_cross_entropy(p_bar, [r["reward"] for r in heldout], row_weights(tokens(heldout)))
        assert stats["train_reward_mean"] == pytest.approx(p_bar, abs=1e-12)
        assert stats["constant_value_loss"] == pytest.approx(expected, abs=1e-12)
        # A constant value model's guided policy is the constant's: the two KLs agree.
        assert stats["heldout_kl_per_token"] == pytest.approx(stats["constant_value_kl_per_token"], abs=1e-3)
        assert stats["constant_value_kl_per_token"] <= stats["topk_truncation_kl_per_token"] + 1e-12
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    for k in (1, 2):
        assert any(f"iteration {k}: the value model is no better than a constant" in m and "AUROC 0.500" in m
                   for m in warnings), warnings  # fmt: skip
    # The logged metrics of both iterations, in one history although each fit starts a fresh TrainerState.
    logged = [entry for entry in trainer.state.log_history if "qsharp/heldout_auroc" in entry]
    assert [entry["qsharp/iteration"] for entry in logged] == [1.0, 2.0]
    assert all(entry["qsharp/value_model_uninformative"] == 1.0 for entry in logged)
    assert any("loss" in entry for entry in trainer.state.log_history[: trainer.state.log_history.index(logged[0])])


def test_constant_model_kl_from_reference_logits_equals_the_guided_engines(constant_run, tiny_model_dir):
    """The constant value model's KL is computed from one π_ref forward over the visited states; with a value
    model that *is* that constant (bias logit(p̄)), the guided engine's own KL must come out the same."""
    trainer, _ = constant_run
    train_rewards, weights = [1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]  # p̄ = 1/4
    model = constant_value_model(tiny_model_dir, logit=math.log(1 / 3))
    saved = trainer.guidance
    rules = ["z_min", "candidate_min"] if hasattr(saved, "non_candidate_offset") else [None]
    try:
        for rule in rules:
            # z_min: candidates get offset c over the rest, so the KL is top-k truncation softened by c.
            trainer.guidance = dataclasses.replace(saved, non_candidate_offset=rule) if rule else saved
            kl = trainer._heldout_kl(model, train_rewards, weights)
            assert kl["heldout_kl_per_token"] == pytest.approx(kl["constant_value_kl_per_token"], rel=1e-4, abs=1e-6)
            if rule != "candidate_min":
                assert kl["constant_value_kl_per_token"] > 1e-3
            else:
                assert kl["constant_value_kl_per_token"] == pytest.approx(0.0, abs=1e-12)  # all offsets equal m(s)
    finally:
        trainer.guidance = saved


def test_histogram_head_reports_nll_against_the_atom_frequencies(tiny_model_dir, tmp_path):
    from qalign.losses.qsharp_diagnostics import constant_histogram_loss
    from qalign.models import load_model, load_tokenizer

    args = tiny_args(tmp_path, num_iterations=1, num_train_epochs=1, drop_no_variation=False, value_head="histogram",
                     num_atoms=3, diagnostics_holdout_fraction=0.25)  # fmt: skip
    model_dir = str(tiny_model_dir)
    trainer = QSharpTrainer(model_dir, args, load_model(model_dir), load_tokenizer(model_dir), tiny_prompt_dataset(16),
                            [even_first_token_reward])  # fmt: skip
    trainer.train()
    (stats,) = trainer.iteration_stats
    for name in DIAGNOSTICS:
        assert math.isfinite(stats[name]), (name, stats[name])
    held = set(trainer.heldout_prompts)
    rows = load_examples(trainer._data_files(1), drop_no_variation=False)
    fit, heldout = [r for r in rows if r["prompt_index"] not in held], [r for r in rows if r["prompt_index"] in held]
    tokens = lambda rs: [float(len(r["target_ids"])) for r in rs]
    expected = constant_histogram_loss([r["reward"] for r in fit], tokens(fit), [r["reward"] for r in heldout],
                                       tokens(heldout), torch.linspace(0, 1, 3))  # fmt: skip
    assert stats["constant_value_loss"] == pytest.approx(expected, abs=1e-12)
    assert 0.0 <= stats["heldout_auroc"] <= 1.0
    assert isinstance(stats["value_model_uninformative"], bool)
