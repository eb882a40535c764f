"""qalign.distributed on FSDP2-sharded models: two gloo processes on this CPU (torch's ``fully_shard`` runs
there; accelerate is not involved), one process without sharding."""

from __future__ import annotations

import datetime
import json
import socket
from pathlib import Path

import pytest
import torch

from qalign.distributed import exit_without_teardown, full_parameters, full_state_dict, load_full_state_dict


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ToyGenerator(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = torch.nn.Linear(6, 5)
        self.second = torch.nn.Linear(5, 4)
        self.head = torch.nn.Linear(4, 3)  # left in the root's own FSDP group, as DQO's value head is

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.second(torch.tanh(self.first(inputs)))))

    def generate(self, inputs: torch.Tensor, steps: int = 2) -> torch.Tensor:
        """Several forwards per call, as decoding does."""
        for _ in range(steps):
            outputs = self(inputs)
        return outputs


def sharded_toy_model() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """Two linear layers, each its own FSDP2 unit, and the root with the head; the same random weights on
    every process. ``generate`` is registered as an FSDP forward method, as transformers' Trainer does."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    torch.manual_seed(0)
    model = ToyGenerator()
    reference = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    fully_shard(model.first)
    fully_shard(model.second)
    fully_shard(model)
    register_fsdp_forward_method(model, "generate")
    return model, reference


def reference_forward(reference: dict[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
    linear = torch.nn.functional.linear
    hidden = torch.tanh(linear(inputs, reference["first.weight"], reference["first.bias"]))
    hidden = torch.tanh(linear(hidden, reference["second.weight"], reference["second.bias"]))
    return linear(hidden, reference["head.weight"], reference["head.bias"])


def two_process_worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    # A collective one process never joins fails after the timeout instead of hanging the test.
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=30)
    )
    torch.set_num_threads(1)
    model, reference = sharded_toy_model()
    record: dict = {}
    inputs = torch.linspace(-1, 1, 12).reshape(2, 6)
    expected = reference_forward(reference, inputs)
    groups = [m._get_fsdp_state()._fsdp_param_group for m in (model.first, model.second, model)]
    meshes_before = [None if g is None else g.post_forward_mesh_info for g in groups]

    record["sharded_before"] = type(model.first.weight).__name__
    with full_parameters(model) as whole:
        record["inside_type"] = type(whole.first.weight).__name__
        record["inside_shape"] = list(whole.first.weight.shape)
        record["inside_equal"] = torch.equal(whole.first.weight.detach(), reference["first.weight"])
        # A different number of forwards per process, as in generation: must not wait on the other process.
        with torch.no_grad():
            outputs = [whole(inputs) for _ in range(1 + 3 * rank)]
            outputs += [whole.generate(inputs) for _ in range(1 + 3 * rank)]
        record["forward_error"] = max((o - expected).abs().max().item() for o in outputs)
    record["sharded_after"] = type(model.first.weight).__name__
    record["generate_registered_again"] = "generate" in vars(model)
    record["meshes_restored"] = all((g is None or g.post_forward_mesh_info is m) for g, m in zip(groups, meshes_before))

    full = full_state_dict(model)
    record["full_state_equal"] = all(torch.equal(full[k], reference[k]) for k in reference)
    record["full_state_plain"] = all(type(t) is torch.Tensor for t in full.values())

    new_state = {name: tensor + 1.0 for name, tensor in reference.items()}
    load_full_state_dict(model, new_state)
    record["state_untouched"] = all(type(t) is torch.Tensor for t in new_state.values())
    load_full_state_dict(model, new_state)  # reused, as Q# reuses its initial state every iteration
    record["loaded_sharded"] = type(model.first.weight).__name__
    reloaded = full_state_dict(model)
    record["load_equal"] = all(torch.equal(reloaded[k], new_state[k]) for k in new_state)
    # Training still works on the shards afterwards (resharding was restored, hooks intact).
    model(inputs).sum().backward()
    record["grad_sharded"] = type(model.first.weight.grad).__name__
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()
    exit_without_teardown(0)  # the backward above ran gloo collectives: see its docstring


@pytest.mark.multiprocess
def test_fsdp2_full_parameters_state_dict_and_load_on_two_processes(tmp_path):
    torch.multiprocessing.spawn(two_process_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        record = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert record["sharded_before"] == "DTensor" and record["sharded_after"] == "DTensor"
        assert record["inside_type"] == "Parameter" and record["inside_shape"] == [5, 6] and record["inside_equal"]
        assert record["forward_error"] < 1e-6
        assert record["meshes_restored"] and record["generate_registered_again"]
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
