"""Whole tensors out of sharded models: the one place qalign deals with how a strategy splits parameters.

DeepSpeed ZeRO-3 partitions parameters (empty tensors outside its gather); FSDP2 (``fully_shard``)
turns them into DTensor shards. Generation, weight sync to vLLM and saving need whole tensors. The
helpers here give them under DDP, ZeRO-2, ZeRO-3 and FSDP2 alike.

Each helper is a collective under ZeRO-3 and FSDP2: every process must call it, the same number of times.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import NoReturn

import torch


def fsdp_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The FSDP2-sharded modules inside ``model`` (empty unless ``fully_shard`` was applied)."""
    from torch.distributed.fsdp import FSDPModule

    return [module for module in model.modules() if isinstance(module, FSDPModule)]


@contextlib.contextmanager
def full_parameters(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Inside: ``model``'s parameters are whole tensors on every process, for reading (generation, sync).

    Under ZeRO-3 (partitioned at load time under ``zero.Init``, or inside an engine) they are gathered;
    under FSDP2 every sharded module is unsharded and kept so across forwards. Changes made inside are
    lost under both: write with :func:`load_full_state_dict`. Without sharding this does nothing.
    """
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        with _zero3_gathered(model):
            yield model
        return
    sharded = fsdp_modules(model)
    if not sharded:
        yield model
        return
    # Generation runs a different number of forwards on each process (completions end at different
    # lengths), so no forward inside may communicate:
    # * resharding after forward is switched off (else the next forward all-gathers again). FSDP2 has no
    #   public getter for that setting, so each parameter group's post-forward mesh (None exactly when it
    #   is off) is saved and put back;
    # * methods registered as FSDP forward methods (transformers registers ``generate``) are set aside:
    #   their wrapper reshards after every call whatever that setting says, and unshards before the next.
    states = list({id(state): state for state in (module._get_fsdp_state() for module in sharded)}.values())
    saved_meshes = [(group, group.post_forward_mesh_info) for state in states for group in state._fsdp_param_groups]
    saved_auto = [(state, getattr(state, "_auto_reshard_after_forward", None)) for state in states]
    forward_methods = {module: _pop_registered_forward_methods(module) for module in sharded}
    for module in sharded:
        module.unshard()
        module.set_reshard_after_forward(False, recurse=False)
    try:
        yield model
    finally:
        for group, mesh in saved_meshes:
            group.post_forward_mesh_info = mesh
        for state, auto in saved_auto:
            if auto is not None:
                state._auto_reshard_after_forward = auto
        for module, methods in forward_methods.items():
            for name, method in methods.items():
                setattr(module, name, method)
        for module in sharded:
            module.reshard()


def _pop_registered_forward_methods(module: torch.nn.Module) -> dict:
    """Remove (and return) the per-instance wrappers ``register_fsdp_forward_method`` installed."""
    wrappers = {name: value for name, value in vars(module).items()
                if callable(value) and hasattr(getattr(value, "__func__", None), "__wrapped__")}  # fmt: skip
    for name in wrappers:
        delattr(module, name)
    return wrappers


@contextlib.contextmanager
def _zero3_gathered(model: torch.nn.Module, modifier_rank: int | None = None):
    import deepspeed

    if not deepspeed.comm.is_initialized():  # before the trainer's first step DeepSpeed may not have set it up
        deepspeed.init_distributed()
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=modifier_rank):
        yield


def load_full_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """``model.load_state_dict(state)`` for whole tensors that every process holds, however the
    parameters are split (each process keeps its own part)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        with _zero3_gathered(model, modifier_rank=0):  # process 0's copy is partitioned back on exit
            model.load_state_dict(state)
    elif fsdp_modules(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        # A copy: torch replaces the dict's entries by the shards it made, and callers reuse ``state``.
        set_model_state_dict(model, dict(state), options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(state)


def full_state_dict(model: torch.nn.Module, keep_vars: bool = False) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with whole tensors, also for FSDP2 (DTensor) models.

    Inside :func:`full_parameters` nothing is communicated: the unsharded parameters are read (FSDP2's
    own ``state_dict`` returns the shards even then). Outside it, each FSDP2 shard is all-gathered: a
    collective. Under ZeRO-3, call it inside :func:`full_parameters`. ``keep_vars``: the parameter
    objects themselves where they are whole, so tied ones can be recognised by identity.
    """
    from torch.distributed.tensor import DTensor

    state = model.state_dict(keep_vars=True)
    if any(isinstance(tensor, DTensor) for tensor in state.values()):
        unsharded = {name: param for name, param in model.named_parameters(remove_duplicate=False)
                     if not isinstance(param, DTensor)}  # fmt: skip
        state = {name: unsharded.get(name, tensor) for name, tensor in state.items()}
        gathered: dict[int, torch.Tensor] = {}  # by identity: a tied shard is gathered once, under both names
        for name, tensor in state.items():
            if isinstance(tensor, DTensor):
                if id(tensor) not in gathered:
                    gathered[id(tensor)] = tensor.full_tensor()
                state[name] = gathered[id(tensor)]
    return state if keep_vars else {name: tensor.detach() for name, tensor in state.items()}


@contextlib.contextmanager
def trainer_model_for_generation(trainer) -> Iterator[torch.nn.Module]:
    """Inside: the trainer's model, unwrapped and whole on every process, ready for ``generate``.

    Processes generate different numbers of tokens, so no forward inside may be a collective. A model in
    an engine or wrapper (DeepSpeed, DDP) goes through TRL's unwrap, which also takes ZeRO-3's fetch and
    release hooks off; FSDP2 shards in place (no wrapper), and so does a model not yet prepared, so
    :func:`full_parameters` unshards or gathers those.
    """
    from trl.models import unwrap_model_for_generation

    if trainer.model_wrapped is not trainer.model:
        with unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator) as model:
            yield trainer.accelerator.unwrap_model(model)
        return
    with full_parameters(trainer.accelerator.unwrap_model(trainer.model)) as model:
        yield model


_EXIT_GUARD_SECONDS = 0.05
_exit_guard_installed = False


def exit_without_teardown(code: int = 0) -> NoReturn:
    """End a finished multi-process run: run the ``atexit`` handlers, flush, and exit without teardown.

    Why: a finished gloo run can abort at exit ("terminate called without an active exception", SIGABRT)
    after it has written everything, and the launcher then reports the whole job as failed.
    ``bench/exit_abort.py`` measured 13/30 aborted 2-process FSDP2 runs and 7/30 DDP runs that left
    through the interpreter's teardown, and 0/30 of each through this helper (torch 2.13, CPU).

    The cause is in torch (pytorch/pytorch#190489), not in anything qalign leaves running:
    ``torch.autograd.backward`` keeps a Python object (a ``contextvars`` copy) in the thread-local state
    while it runs. A collective issued from a backward hook (DDP's and FSDP's gradient reductions,
    DeepSpeed's) captures that state, and gloo's worker thread often drops the last reference to the
    finished collective, which must take the GIL to decref the object. If the main thread has begun
    interpreter finalisation by then, CPython ends the worker thread with ``pthread_exit``, which unwinds
    through a ``noexcept`` destructor and ``std::terminate`` aborts the process. It is rare in long runs
    and common when the process exits soon after its last backward pass.

    Skipping finalisation removes the window. Nothing of qalign's needs it: outputs are written and
    closed, and cleanups (reward workers, vLLM servers) are ``atexit`` handlers, which run here first.
    Every qalign entry point and every multi-process test worker ends through this helper; a script of
    your own that trains on several processes can end with it too.
    """
    import atexit
    import sys

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def guard_interpreter_exit() -> None:
    """For processes that leave through the interpreter's teardown anyway (a user's own training script):
    an ``atexit`` handler that releases the GIL for a moment before finalisation begins.

    A gloo worker thread still dropping a finished collective (see :func:`exit_without_teardown`) then
    takes the GIL while the interpreter is whole. This narrows the window rather than closing it (the
    worker could be descheduled for longer); ``bench/exit_abort.py --exit guard`` measures it. The
    trainers install it when they run on several processes. Idempotent.
    """
    import atexit
    import time

    global _exit_guard_installed
    if not _exit_guard_installed:
        atexit.register(time.sleep, _EXIT_GUARD_SECONDS)
        _exit_guard_installed = True
