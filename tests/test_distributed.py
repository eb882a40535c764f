"""qalign.distributed on FSDP2-sharded models: two gloo processes on this CPU (torch's ``fully_shard`` runs
there; accelerate is not involved), one process without sharding."""

from __future__ import annotations

import datetime
import json
import socket
from pathlib import Path

import pytest
import torch

from qalign.distributed import full_parameters, full_state_dict, load_full_state_dict


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sharded_toy_model() -> torch.nn.Module:
    """Two linear layers, each its own FSDP2 unit, plus the root; the same random weights on every process."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    reference = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    fully_shard(model[0])
    fully_shard(model[2])
    fully_shard(model)
    return model, reference


def two_process_worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    # A collective one process never joins fails after the timeout instead of hanging the test.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))
    torch.set_num_threads(1)
    model, reference = sharded_toy_model()
    record: dict = {}
    inputs = torch.linspace(-1, 1, 12).reshape(2, 6)
    expected = torch.nn.functional.linear(
        torch.tanh(torch.nn.functional.linear(inputs, reference["0.weight"], reference["0.bias"])),
        reference["2.weight"], reference["2.bias"],
    )  # fmt: skip
    groups = [m._get_fsdp_state()._fsdp_param_group for m in (model[0], model[2], model)]
    meshes_before = [None if g is None else g.post_forward_mesh_info for g in groups]

    record["sharded_before"] = type(model[0].weight).__name__
    with full_parameters(model) as whole:
        record["inside_type"] = type(whole[0].weight).__name__
        record["inside_shape"] = list(whole[0].weight.shape)
        record["inside_equal"] = torch.equal(whole[0].weight.detach(), reference["0.weight"])
        # A different number of forwards per process, as in generation: must not wait on the other process.
        with torch.no_grad():
            outputs = [whole(inputs) for _ in range(1 + 3 * rank)]
        record["forward_error"] = max((o - expected).abs().max().item() for o in outputs)
    record["sharded_after"] = type(model[0].weight).__name__
    record["meshes_restored"] = all(
        (g is None or g.post_forward_mesh_info is m) for g, m in zip(groups, meshes_before)
    )

    full = full_state_dict(model)
    record["full_state_equal"] = all(torch.equal(full[k], reference[k]) for k in reference)
    record["full_state_plain"] = all(type(t) is torch.Tensor for t in full.values())

    new_state = {name: tensor + 1.0 for name, tensor in reference.items()}
    load_full_state_dict(model, new_state)
    record["state_untouched"] = all(type(t) is torch.Tensor for t in new_state.values())
    load_full_state_dict(model, new_state)  # reused, as Q# reuses its initial state every iteration
    record["loaded_sharded"] = type(model[0].weight).__name__
    reloaded = full_state_dict(model)
    record["load_equal"] = all(torch.equal(reloaded[k], new_state[k]) for k in new_state)
    # Training still works on the shards afterwards (resharding was restored, hooks intact).
    model(inputs).sum().backward()
    record["grad_sharded"] = type(model[0].weight.grad).__name__
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


@pytest.mark.multiprocess
def test_fsdp2_full_parameters_state_dict_and_load_on_two_processes(tmp_path):
    torch.multiprocessing.spawn(two_process_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        record = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert record["sharded_before"] == "DTensor" and record["sharded_after"] == "DTensor"
        assert record["inside_type"] == "Parameter" and record["inside_shape"] == [5, 6] and record["inside_equal"]
        assert record["forward_error"] < 1e-6
        assert record["meshes_restored"]
        assert record["full_state_equal"] and record["full_state_plain"]
        assert record["state_untouched"]
        assert record["loaded_sharded"] == "DTensor" and record["load_equal"]
        assert record["grad_sharded"] == "DTensor"


def test_without_sharding_the_helpers_are_plain_state_dict_calls():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    with full_parameters(model) as inside:
        assert inside is model
    state = full_state_dict(model)
    assert state.keys() == {"weight", "bias"} and torch.equal(state["weight"], model.weight)
    load_full_state_dict(model, {"weight": torch.ones(2, 3), "bias": torch.zeros(2)})
    assert torch.equal(model.weight, torch.ones(2, 3)) and torch.equal(model.bias, torch.zeros(2))
