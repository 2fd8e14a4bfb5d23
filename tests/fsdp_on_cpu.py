"""Run a script under accelerate's FSDP code path on CPUs (gloo): a test harness, not for real runs.

accelerate 1.x turns FSDP on only for accelerator devices: with `Accelerator(cpu=True)` (what
train.py uses without a GPU) an FSDP config file gives DistributedType.MULTI_CPU, i.e. DDP, and
the sharded code paths never run. torch's FSDP itself works on CPU tensors over gloo. To test
train.py's sharded save, checkpoint and resume on a machine without GPUs, this wrapper makes
accelerate's state say FSDP before the script builds its Accelerator, and works around the two
places where accelerate/torch assume an accelerator device:

1. `AcceleratorState` copies `PartialState`'s distributed type each time it is constructed, so
   both get FSDP; their device becomes plain `cpu` (FSDP1 compares it with the parameters' device,
   and `cpu:0` != `cpu`).
2. FSDP1's full state dict with `offload_to_cpu=True` (accelerate's `get_state_dict` and
   `save_fsdp_model` set it) frees the gathered buffer that the returned tensors still point to
   when the parameters already live on the CPU (a segfault): it is forced off. On GPUs offloading
   is a real copy and accelerate's setting is right.

Usage: accelerate launch --config_file <fsdp config> tests/fsdp_on_cpu.py train.py <train.py flags>
It prints `fsdp_on_cpu: FSDP<version> forced` on stderr once per process.
"""

import os
import runpy
import sys

import torch
import accelerate.state as accelerate_state
from accelerate.utils import DistributedType
from torch.distributed.fsdp import OptimStateDictConfig, StateDictConfig


def _force_fsdp() -> None:
    original_init = accelerate_state.AcceleratorState.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if plugin is None or os.environ.get("ACCELERATE_USE_FSDP") != "true":
            return
        if self.distributed_type != DistributedType.MULTI_CPU:
            raise RuntimeError(f"fsdp_on_cpu: expected MULTI_CPU before forcing FSDP, got {self.distributed_type}")
        for shared in (self, accelerate_state.PartialState._shared_state):
            setattr(shared, "distributed_type", DistributedType.FSDP) if shared is self else shared.update(
                distributed_type=DistributedType.FSDP, device=torch.device("cpu"))
        self.device = torch.device("cpu")
        self.fsdp_plugin = plugin
        print(f"fsdp_on_cpu: FSDP{plugin.fsdp_version} forced", file=sys.stderr)

    accelerate_state.AcceleratorState.__init__ = init
    for config_class in (StateDictConfig, OptimStateDictConfig):
        config_class.offload_to_cpu = property(lambda self: False, lambda self, value: None)


if __name__ == "__main__":
    _force_fsdp()
    script, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
