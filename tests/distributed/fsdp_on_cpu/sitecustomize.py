"""Lets accelerate run an FSDP config on CPU processes (gloo), so CI exercises qalign's FSDP2 code paths.

On ``PYTHONPATH`` only in the FSDP2 tests (tests/distributed/test_multiprocess.py); Python imports it at
start-up in every process. torch's FSDP2 (``fully_shard``) runs on CPU with gloo, but accelerate turns an
FSDP config into FSDP only on accelerator devices and leaves ``MULTI_CPU`` runs as plain DDP. This lifts
that one check; the rest (wrapping, sharded optimizer, sharded checkpoints, full-state saves) is
accelerate's and torch's own code.
"""

import os


def _allow_fsdp_on_cpu() -> None:
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original_init = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            # As accelerate does at the end of its own set-up: later AcceleratorState() calls copy the
            # partial state's type over theirs.
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = init


if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
    import torch

    if not torch.cuda.is_available():
        _allow_fsdp_on_cpu()
