"""qalign.models: loading that stays right under distributed training configs."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _load_as_second_process(rank: int, port: int, model_dir: str, out_dir: str) -> None:
    """A process that transformers takes for local rank 1 of an FSDP job with cpu_ram_efficient_loading."""
    import os

    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from qalign.distributed import exit_without_teardown
    from qalign.models import load_model

    os.environ.update(ACCELERATE_USE_FSDP="true", FSDP_CPU_RAM_EFFICIENT_LOADING="true", LOCAL_RANK="1")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    bare = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    ours = load_model(model_dir).state_dict()
    from safetensors.torch import load_file

    on_disk = load_file(str(Path(model_dir) / "model.safetensors"))
    record = {
        "bare_all_zero": all(not tensor.any() for tensor in bare.values()),
        "ours_equal_disk": all(torch.equal(ours[name], tensor) for name, tensor in on_disk.items()),
        "env_restored": os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true",
    }
    Path(out_dir, "record.json").write_text(json.dumps(record))
    dist.destroy_process_group()
    exit_without_teardown(0)  # as every multi-process worker ends (qalign.distributed)


@pytest.mark.multiprocess
def test_load_model_gives_real_weights_where_fsdp_efficient_loading_gives_zeros(tiny_model_dir, tmp_path):
    torch.multiprocessing.spawn(_load_as_second_process, args=(_free_port(), str(tiny_model_dir), str(tmp_path)),
                                nprocs=1, join=True)  # fmt: skip
    record = json.loads((tmp_path / "record.json").read_text())
    # transformers' own loading leaves process "1" with zeros, to be overwritten by FSDP's broadcast...
    assert record["bare_all_zero"]
    # ...which never comes for π_ref or an evaluated model: qalign loads the weights themselves.
    assert record["ours_equal_disk"] and record["env_restored"]
