"""The ``python -m qalign.probe`` job: collect → embed → train → evaluate → report.

Every stage's output is cached in ``output_dir`` and reused when its inputs match, so a killed job
resumes: samples are appended per chunk of prompts (``samples_<split>.jsonl``), features are saved
per split (``features_<split>.pt``), and the API embedder keeps its own per-request sqlite cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from qalign.atomic import atomic_path
from qalign.config import ConfigError
from qalign.probe.config import ProbeArguments
from qalign.probe.evaluate import best_of_k_curve, best_of_k_per_prompt, mean_reward
from qalign.probe.report import write_reports
from qalign.probe.sampling import Candidate
from qalign.probe.train import ProbeData, ProbeTrainConfig, train_probe
from qalign.rollout.base import Completion, SamplingConfig
from qalign.sample_store import SampleStore, chunk_seed

logger = logging.getLogger(__name__)


class Resources:
    """The base model, tokenizer, sampler and embedder of a run, loaded once and closed at the end."""

    def __init__(self, args: ProbeArguments):
        self.args = args
        self._model = None
        self._tokenizer = None
        self.sampler = None
        self.embedder = None
        self.server = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from qalign.models import load_tokenizer

            self._tokenizer = load_tokenizer(self.args.model_name_or_path)
        return self._tokenizer

    @property
    def model(self):
        if self._model is None:
            from qalign.models import load_model

            self._model = load_model(self.args.model_name_or_path, self.args.dtype)
        return self._model

    def build_sampler(self):
        args = self.args
        if args.sampler_backend.startswith("openai_"):
            from qalign.probe.sampling import OpenAISampler

            endpoint = "chat" if args.sampler_backend == "openai_chat" else "completions"
            self.sampler = OpenAISampler(
                args.sampler_base_url, args.sampler_model, endpoint, args.sampler_api_key_env,
                max_concurrency=args.sampler_max_concurrency, max_retries=args.sampler_max_retries,
                timeout=args.sampler_timeout, system_prompt=args.system_prompt,
            )  # fmt: skip
            return self.sampler
        from qalign.probe.sampling import EngineSampler
        from qalign.rollout.config import RolloutArguments
        from qalign.rollout.factory import build_engine

        rollout = RolloutArguments(rollout_backend=args.sampler_backend, rollout_dtype=args.dtype)
        if args.sampler_backend == "hf":
            engine = build_engine(rollout, self.model, self.tokenizer, batch_size=args.sampler_batch_size)
        else:
            from qalign.models import resolve_model_path

            engine = build_engine(rollout, resolve_model_path(args.model_name_or_path), self.tokenizer, seed=args.seed)
        self.sampler = EngineSampler(engine, self.tokenizer, {"backend": args.sampler_backend})
        return self.sampler

    def build_embedder(self):
        args = self.args
        if args.embedder_kind == "hidden_state":
            from qalign.probe.embed_local import HiddenStateEmbedder

            if args.embedder_model in (None, args.model_name_or_path):
                model, tokenizer = self.model, self.tokenizer
            else:
                from qalign.models import load_model, load_tokenizer

                model, tokenizer = load_model(args.embedder_model, args.dtype), load_tokenizer(args.embedder_model)
            self.embedder = HiddenStateEmbedder(
                model, tokenizer, args.embedder_layer, args.embedder_position, args.embedder_batch_size,
                name=args.embedder_model or args.model_name_or_path,
            )  # fmt: skip
        elif args.embedder_kind == "sentence_transformers":
            from qalign.probe.embed_local import SentenceTransformerEmbedder

            self.embedder = SentenceTransformerEmbedder(
                args.embedder_model or "minilm", args.embedder_batch_size, args.embedder_text_format
            )
        else:
            from qalign.probe.embed_api import EmbeddingServer, OpenAIEmbedder

            base_url, model = args.embedder_base_url, args.embedder_model
            if args.embedder_start_server:
                model = model or "minilm"
                logger.info("starting a vLLM embedding server for %s on 127.0.0.1", model)
                self.server = EmbeddingServer(model, served_name=model, api_key_env=args.embedder_api_key_env)
                base_url = self.server.base_url
            cache = args.embedder_cache_path or str(Path(args.output_dir) / "embeddings.sqlite")
            self.embedder = OpenAIEmbedder(
                base_url, model, args.embedder_api_key_env, batch_size=args.embedder_batch_size,
                max_concurrency=args.embedder_max_concurrency, max_retries=args.embedder_max_retries,
                timeout=args.embedder_timeout, cache_path=cache, dimensions=args.embedder_dimensions,
                text_format=args.embedder_text_format,
            )  # fmt: skip
        return self.embedder

    def close_sampler(self) -> None:
        if self.sampler is not None:
            # An HF sampler's model may be the hidden-state embedder's: closing HFEngine frees nothing.
            self.sampler.close()
            self.sampler = None

    def close(self) -> None:
        self.close_sampler()
        if self.embedder is not None:
            self.embedder.close()
        if self.server is not None:
            self.server.close()


# ----------------------------------------------------------------------------- stage 1: samples


def render(args: ProbeArguments, resources: Resources, question: str, messages: list | None = None) -> str:
    """The prompt as p0 sees it: the chat user message for openai_chat, the rendered template otherwise
    (a conversational row's ``messages`` as they are)."""
    from qalign.data.prompts import TEMPLATES, render_prompt

    if args.sampler_backend == "openai_chat":
        if messages:
            raise ConfigError("sampler.backend openai_chat sends one user message: a conversational dataset "
                              "needs a sampler that renders the chat template (hf, vllm, openai_completions)")  # fmt: skip
        return TEMPLATES[args.prompt_template].format(question=question)
    return render_prompt(resources.tokenizer, question, args.prompt_template, args.system_prompt,
                         args.chat_template_kwargs, messages)  # fmt: skip


def samples_meta(args: ProbeArguments, split: str, data_file: str | None = None) -> dict[str, Any]:
    """Everything that decides the samples of a split; a cache with other values is not reused."""
    keys = ("model_name_or_path", "dataset_name", "dataset_config", "prompt_template", "system_prompt",
            "fallback_last_number", "sampler_backend", "sampler_base_url", "sampler_model", "samples_per_prompt",
            "temperature", "top_p", "max_tokens", "seed", "sampler_batch_size")  # fmt: skip
    # The file only when one is given, so that caches written before the option existed stay valid.
    source = {"data_file": str(Path(data_file).expanduser().resolve())} if data_file else {}
    return {"split": split, **source, **{key: getattr(args, key) for key in keys}}


RESTART = "overwrite: true, or another output_dir"  # how a user starts a refused sample store over


def collect(
    args: ProbeArguments, resources: Resources, split: str, limit: int, data_file: str | None = None
) -> list[dict[str, Any]]:
    """n graded samples of each of the first ``limit`` prompts of ``split`` (cached, resumable per chunk), or of
    ``data_file``'s problems when one is given (stored under ``split``'s name).

    A prompt is done when all its n samples are stored; one that is not (a kill mid-write) is sampled again
    and only its missing samples are appended. Stored prompts beyond ``limit`` stay in the file, unused.
    """
    from qalign.data import load_math_split
    from qalign.reward import grade

    path = Path(args.output_dir) / f"samples_{split}.jsonl"
    store = SampleStore(path, samples_meta(args, split, data_file), restart=RESTART,
                        key=lambda row: (row["prompt_index"], row["sample_index"]))  # fmt: skip
    try:
        if data_file:
            problems = load_math_split(data_file, split, limit=limit)
        else:
            problems = load_math_split(args.dataset_name, split, args.dataset_config, limit=limit)
        # The settings name the data file, not its contents: samples of problems edited since are refused.
        store.refuse_other_problems(
            {i: (p["question"], p["answer"]) for i, p in enumerate(problems)}, index="prompt_index"
        )
        n = args.samples_per_prompt
        done = {i for i in range(len(problems)) if all((i, j) in store.rows for j in range(n))}
        chunk = args.sampler_batch_size
        todo = [i for i in range(len(problems)) if i not in done]
        if todo:
            sampler = resources.sampler or resources.build_sampler()
            logger.info("sampling %d prompts x %d of %s (%d cached)", len(todo), n, split, len(done))
        for start in range(0, len(problems), chunk):
            indices = [i for i in range(start, min(start + chunk, len(problems))) if i not in done]
            if not indices:
                continue
            prompts = [render(args, resources, problems[i]["question"], problems[i].get("messages")) for i in indices]
            # Seeded by (seed, split, chunk): a resumed chunk gets the samples it would have had.
            seed = chunk_seed("probe", args.seed, split, start // chunk)
            sampling = SamplingConfig(n=n, temperature=args.temperature, top_p=args.top_p,
                                      max_tokens=args.max_tokens, seed=seed)  # fmt: skip
            groups = sampler.sample(prompts, sampling)
            new_rows = []
            for i, prompt, group in zip(indices, prompts, groups):
                gold = problems[i]["answer"]
                for j, candidate in enumerate(group):
                    if (i, j) in store.rows:
                        continue  # written before the kill: kept, never replaced
                    reward = float(grade(candidate.text, gold, fallback_last_number=args.fallback_last_number))
                    c = candidate.completion
                    new_rows.append({
                        "prompt_index": i, "sample_index": j, "question": problems[i]["question"], "gold": gold,
                        "prompt": prompt, "completion": c.text, "prompt_ids": c.prompt_ids,
                        "completion_ids": c.completion_ids, "finish_reason": c.finish_reason, "reward": reward,
                    })  # fmt: skip
            store.append(new_rows)  # one write per chunk: a kill loses at most this chunk
            done.update(indices)
            logger.info("%s: %d/%d prompts sampled", split, len(done), len(problems))
    finally:
        store.close()
    return [row for key, row in sorted(store.rows.items()) if key[0] < len(problems)]


def candidates_of(rows: list[dict[str, Any]]) -> list[Candidate]:
    return [
        Candidate(
            r["prompt"], Completion(r["prompt_ids"], r["completion_ids"], r["completion"], [], r["finish_reason"])
        )
        for r in rows
    ]


# ----------------------------------------------------------------------------- stage 2: features


def features_for(args: ProbeArguments, resources: Resources, split: str, rows: list[dict[str, Any]]) -> torch.Tensor:
    """``(N, d)`` features of the rows (cached per split; reused when embedder and samples match)."""
    path = Path(args.output_dir) / f"features_{split}.pt"
    digest = hashlib.sha256(json.dumps([[r["prompt"], r["completion"]] for r in rows]).encode()).hexdigest()
    embedder = resources.embedder or resources.build_embedder()
    key = {"embedder": embedder.describe(), "samples": digest}
    if path.is_file():
        try:
            blob = torch.load(path, weights_only=True)
        except Exception as error:  # written by a version that saved in place and was killed mid-write
            logger.warning("%s is unreadable (%s); embedding %s again", path, error, split)
            blob = {}
        if blob.get("key") == json.dumps(key, sort_keys=True):
            return blob["features"]
    features = embedder.embed(candidates_of(rows))
    # Renamed into place whole: a kill mid-save leaves the old file (or none), never a torn one.
    with atomic_path(path) as tmp:
        torch.save({"key": json.dumps(key, sort_keys=True), "features": features}, tmp)
    return features


def probe_data(rows: list[dict[str, Any]], features: torch.Tensor) -> ProbeData:
    rewards = torch.tensor([r["reward"] for r in rows])
    groups = torch.tensor([r["prompt_index"] for r in rows])
    return ProbeData(features, rewards, groups)


# ----------------------------------------------------------------------------- the job


def train_config(args: ProbeArguments, loss: str) -> ProbeTrainConfig:
    return ProbeTrainConfig(
        loss=loss, depth=args.probe_depth, hidden=args.probe_hidden, epochs=args.probe_epochs, lr=args.probe_lr,
        weight_decay=args.probe_weight_decay, batch_prompts=args.probe_batch_prompts,
        chunk_size=args.probe_chunk_size or max(2, args.samples_per_prompt), beta=args.probe_beta,
        standardize=args.probe_standardize, seed=args.seed,
    )  # fmt: skip


def k_table(args: ProbeArguments, data: ProbeData, probes: dict[str, torch.nn.Module], beta: float) -> dict:
    """{k: {"p0": ..., <loss>: ..., "oracle": ...}} on ``data``."""
    oracle = best_of_k_curve(data.rewards, data.rewards, data.groups, args.ks, 0.0, args.eval_shuffles, args.seed)
    curves = {"oracle": oracle}  # best-of-k by the true reward
    with torch.no_grad():
        for loss, probe in probes.items():
            q = probe(data.features)
            curves[loss] = best_of_k_curve(q, data.rewards, data.groups, args.ks, beta, args.eval_shuffles, args.seed)
    p0 = mean_reward(data.rewards, data.groups)
    return {k: {"p0": p0, **{name: curves[name][k] for name in [*probes, "oracle"]}} for k in args.ks}


def per_prompt_table(args: ProbeArguments, data: ProbeData, probes: dict[str, torch.nn.Module], beta: float) -> dict:
    """{name: {k: [E[r] of π_{θ,k} per prompt]}} for each probe and the oracle, plus ``p0`` (one sample's
    mean reward per prompt): what a paired comparison over the held-out prompts needs."""
    prompts = data.prompt_indices()
    table: dict[str, Any] = {"p0": [data.rewards[rows].float().mean().item() for rows in prompts]}
    table["oracle"] = best_of_k_per_prompt(data.rewards, data.rewards, data.groups, args.ks, 0.0, args.eval_shuffles,
                                           args.seed)  # fmt: skip
    with torch.no_grad():
        for loss, probe in probes.items():
            table[loss] = best_of_k_per_prompt(probe(data.features), data.rewards, data.groups, args.ks, beta,
                                               args.eval_shuffles, args.seed)  # fmt: skip
    return table


def run(args: ProbeArguments) -> dict[str, Any]:
    """Run the whole job; returns the results written to ``output_dir/results.json``."""
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.overwrite:
        # The API embedding cache is kept on purpose: those vectors were paid for and stay valid.
        for pattern in (
            "samples_*",
            "features_*",
            "probe_*.pt",
            "results.*",
            "reward_vs_k.png",
            "best_of_k_policy.json",
        ):
            for file in out.glob(pattern):
                file.unlink()
    timings: dict[str, float] = {}
    resources = Resources(args)
    try:
        start = time.perf_counter()
        rows = {
            "train": collect(args, resources, args.train_split, args.num_train_prompts),
            "test": collect(args, resources, args.test_split, args.num_test_prompts, args.test_data_file),
        }
        timings["collect_s"] = time.perf_counter() - start
        resources.close_sampler()  # free a vLLM engine before the embedder loads

        start = time.perf_counter()
        data = {split: probe_data(r, features_for(args, resources, split, r)) for split, r in rows.items()}
        timings["embed_s"] = time.perf_counter() - start
        embedder_description = resources.embedder.describe() if resources.embedder else None
    finally:
        resources.close()

    start = time.perf_counter()
    probes, histories = {}, {}
    for loss in args.losses:
        probe, history = train_probe(data["train"], train_config(args, loss))
        probe.save(out / f"probe_{loss}.pt", extra={"loss": loss, "embedder": embedder_description})
        probes[loss], histories[loss] = probe, history
    timings["train_s"] = time.perf_counter() - start
    # The first loss's probe as a best-of-k policy that `qalign eval --policy` and `qalign serve` load.
    from qalign.probe.saved_policy import save_best_of_k_policy

    save_best_of_k_policy(args, args.losses[0])

    start = time.perf_counter()
    tables = {
        str(beta): {split: k_table(args, data[split], probes, beta) for split in ("test", "train")}
        for beta in args.betas
    }
    timings["evaluate_s"] = time.perf_counter() - start
    results = {
        "config": dataclasses.asdict(args),  # holds env var names only, never a key
        "embedder": embedder_description,
        "data": {
            split: {
                "prompts": int(d.groups.unique().numel()),
                "samples": int(d.groups.numel()),
                "dim": int(d.features.size(1)),
                "mean_reward": mean_reward(d.rewards, d.groups),
            }
            for split, d in data.items()
        },
        "loss_history": {loss: {"first": h[0], "last": h[-1]} for loss, h in histories.items()},
        "tables": tables,
        "per_prompt": {str(beta): per_prompt_table(args, data["test"], probes, beta) for beta in args.betas},
        "timings": timings,
    }
    write_reports(out, results)
    track_results(args, results)
    return results


def tracked_metrics(results: dict[str, Any]) -> dict[str, float]:
    """``<split>/beta<β>/<name>@k<k>``: expected reward of best-of-k by each probe, p0 and the oracle."""
    return {f"{split}/beta{beta}/{name}@k{k}": value
            for beta, splits in results["tables"].items() for split, table in splits.items()
            for k, row in table.items() for name, value in row.items()}  # fmt: skip


def track_results(args: ProbeArguments, results: dict[str, Any]) -> None:
    """Send the k-tables to ``args.report_to`` (nothing for none)."""
    from qalign.tracking import Tracker

    with Tracker(args.report_to, args.output_dir, "probe", {"embedder": results["embedder"]}) as tracker:
        tracker.log(tracked_metrics(results))
