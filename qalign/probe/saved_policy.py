"""A Q-probe run's best-of-k policy on disk: ``best_of_k_policy.json`` beside the probe weights.

The file is a description, not weights: the sampler (p0's model id or API), the embedder φ the probe was
trained on, which ``probe_<loss>.pt`` scores the candidates, k, the selection temperature β and the
temperature the candidates are drawn at. ``load_best_of_k_policy`` rebuilds the same sampler and
embedder through the probe pipeline's own constructors, so a served or evaluated policy is the one the
probe run graded. API keys are stored as the *names* of their environment variables, never as values.

    {"kind": "qprobe_best_of_k", "probe": "probe_pg.pt", "k": 8, "beta": 0.0,
     "candidate_temperature": 1.0, "settings": {"model_name_or_path": ..., "sampler_backend": ..., ...}}
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qalign.atomic import write_atomic

if TYPE_CHECKING:
    from qalign.probe.config import ProbeArguments
    from qalign.probe.policy import BestOfKPolicy

POLICY_FILE = "best_of_k_policy.json"
KIND = "qprobe_best_of_k"
# The ProbeArguments that decide how candidates are drawn and embedded: what rebuilding the policy needs.
SETTINGS = (
    "model_name_or_path", "dtype", "prompt_template", "system_prompt", "chat_template_kwargs",
    "sampler_backend", "sampler_base_url", "sampler_model", "sampler_api_key_env", "sampler_batch_size",
    "sampler_max_concurrency", "sampler_max_retries", "sampler_timeout", "top_p", "max_tokens", "seed",
    "embedder_kind", "embedder_model", "embedder_layer", "embedder_position", "embedder_batch_size",
    "embedder_text_format", "embedder_base_url", "embedder_api_key_env", "embedder_max_concurrency",
    "embedder_max_retries", "embedder_timeout", "embedder_dimensions", "embedder_start_server",
)  # fmt: skip


def save_best_of_k_policy(args: ProbeArguments, loss: str, k: int | None = None, beta: float | None = None) -> Path:
    """Write ``<output_dir>/best_of_k_policy.json`` for the probe trained with ``loss`` (default k: the
    largest graded, ``samples_per_prompt``; default β: the first of ``betas``)."""
    folder = Path(args.output_dir)
    record = {
        "kind": KIND,
        "probe": f"probe_{loss}.pt",
        "k": k if k is not None else args.samples_per_prompt,
        "beta": beta if beta is not None else args.betas[0],
        "candidate_temperature": args.temperature,
        "settings": {name: getattr(args, name) for name in SETTINGS},
    }
    # A relative embedding cache path would move with the working directory: keep it beside the policy.
    record["settings"]["embedder_cache_path"] = str((folder / "embeddings.sqlite").resolve())
    path = folder / POLICY_FILE
    write_atomic(path, json.dumps(record, indent=2) + "\n")
    return path


def read_best_of_k_policy(path: str | Path) -> dict[str, Any]:
    """The description in ``path`` (the file or its folder), checked: kind, probe file, k ≥ 1, β ≥ 0."""
    path = Path(path)
    file = path / POLICY_FILE if path.is_dir() else path
    try:
        record = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{file}: not a readable best-of-k policy description ({error})") from None
    missing = [key for key in ("kind", "probe", "k", "beta", "settings") if key not in record]
    if missing or record.get("kind") != KIND:
        raise ValueError(f"{file}: expected a {KIND!r} description with kind, probe, k, beta and settings; "
                         f"missing {missing or ['kind: ' + KIND]}")  # fmt: skip
    if not (file.parent / record["probe"]).is_file():
        raise ValueError(f"{file}: its probe weights {record['probe']!r} are not in {file.parent}")
    if int(record["k"]) < 1 or float(record["beta"]) < 0:
        raise ValueError(f"{file}: k must be >= 1 and beta >= 0, got k={record['k']}, beta={record['beta']}")
    return record | {"folder": str(file.parent)}


def load_best_of_k_policy(
    path: str | Path,
    *,
    k: int | None = None,
    beta: float | None = None,
    probe: str | None = None,
    backend: str | None = None,
    dtype: str | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
) -> BestOfKPolicy:
    """The saved policy as a ``BestOfKPolicy`` (a ``qalign.policies.Policy``); keyword arguments override
    the saved k, β, probe file (a loss name such as ``"ce"`` or a file name), sampler backend, dtype,
    sampler batch size and seed."""
    from qalign.probe.config import ProbeArguments
    from qalign.probe.models import Probe
    from qalign.probe.pipeline import Resources
    from qalign.probe.policy import BestOfKPolicy

    record = read_best_of_k_policy(path)
    folder = Path(record["folder"])
    fields = {f.name for f in dataclasses.fields(ProbeArguments)}
    settings = {key: value for key, value in record["settings"].items() if key in fields}
    overrides = {"sampler_backend": backend, "dtype": dtype, "sampler_batch_size": batch_size, "seed": seed}
    settings |= {key: value for key, value in overrides.items() if value is not None}
    args = ProbeArguments(**settings, output_dir=str(folder))
    probe_file = record["probe"] if probe is None else (probe if probe.endswith(".pt") else f"probe_{probe}.pt")
    if not (folder / probe_file).is_file():
        raise ValueError(
            f"{folder}: no probe weights {probe_file!r}; have {sorted(p.name for p in folder.glob('probe_*.pt'))}"
        )
    resources = Resources(args)
    sampler = resources.build_sampler()
    embedder = resources.build_embedder()
    tokenizer = None if args.sampler_backend.startswith("openai") else resources.tokenizer
    description = {
        "policy": str(folder),
        "probe": probe_file,
        "sampler_model": args.sampler_model or args.model_name_or_path,
    }
    return BestOfKPolicy(
        sampler, embedder, Probe.load(folder / probe_file),
        k=int(k if k is not None else record["k"]), beta=float(beta if beta is not None else record["beta"]),
        tokenizer=tokenizer, seed=args.seed, description=description,
        candidate_temperature=record.get("candidate_temperature"), server=resources.server,
    )  # fmt: skip
