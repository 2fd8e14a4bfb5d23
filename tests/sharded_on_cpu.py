"""Run a script under accelerate's FSDP or DeepSpeed code path on CPUs: a test harness, not for real runs.

accelerate 1.x turns FSDP and DeepSpeed on only for accelerator devices: with `Accelerator(cpu=True)`
(what train.py uses without a GPU) an FSDP or DeepSpeed config file gives DistributedType.MULTI_CPU,
i.e. DDP over gloo, and the sharded code paths never run. torch's FSDP works on CPU tensors over
gloo, and DeepSpeed (>= 0.15) has a CPU accelerator that talks gloo. To test train.py's sharded
save, checkpoint and resume on a machine without GPUs, this wrapper changes, before the script
builds its Accelerator, only what accelerate/torch decide from the device:

FSDP (`ACCELERATE_USE_FSDP=true`, set by `accelerate launch` from the config file):
1. `AcceleratorState` copies `PartialState`'s distributed type each time it is constructed, so
   both are set to FSDP; their device becomes plain `cpu` (FSDP1 compares it with the parameters'
   device, and `cpu:0` != `cpu`).
2. FSDP1's full state dict with `offload_to_cpu=True` (accelerate's `get_state_dict` and
   `save_fsdp_model` set it) frees the gathered buffer that the returned tensors still point to
   when the parameters already live on the CPU (a segfault): it is forced off. On GPUs offloading
   is a real copy and accelerate's setting is right.
3. The config's `fsdp_sync_module_states: true` needs a GPU in accelerate's plugin: the test passes
   a copy of the config with it off (train.py seeds the model identically on every process).

DeepSpeed (`ACCELERATE_USE_DEEPSPEED=true`): the Accelerator is built with `cpu=False` and the gloo
backend, which is the path accelerate takes for DeepSpeed on a GPU, with DeepSpeed's CPU accelerator.

Usage: accelerate launch --config_file <config> tests/sharded_on_cpu.py train.py <train.py flags>
It prints `sharded_on_cpu: <engine> forced` on stderr once per process.
"""

import os
import runpy
import sys

import accelerate
import accelerate.state as accelerate_state
import torch
from accelerate.utils import DistributedType, InitProcessGroupKwargs


def _force_fsdp() -> None:
    from torch.distributed.fsdp import OptimStateDictConfig, StateDictConfig

    original_init = accelerate_state.AcceleratorState.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if plugin is None:  # a later AcceleratorState() of the same process
            return
        if self.distributed_type != DistributedType.MULTI_CPU:
            raise RuntimeError(f"sharded_on_cpu: expected MULTI_CPU before forcing FSDP, got {self.distributed_type}")
        accelerate_state.PartialState._shared_state.update(distributed_type=DistributedType.FSDP,
                                                           device=torch.device("cpu"))
        self.distributed_type, self.device, self.fsdp_plugin = DistributedType.FSDP, torch.device("cpu"), plugin
        print(f"sharded_on_cpu: FSDP{plugin.fsdp_version} forced", file=sys.stderr)

    accelerate_state.AcceleratorState.__init__ = init
    for config_class in (StateDictConfig, OptimStateDictConfig):
        config_class.offload_to_cpu = property(lambda self: False, lambda self, value: None)


def _force_deepspeed() -> None:
    original_init = accelerate.Accelerator.__init__

    def init(self, *args, **kwargs):
        kwargs["cpu"] = False
        kwargs["kwargs_handlers"] = [*(kwargs.get("kwargs_handlers") or []), InitProcessGroupKwargs(backend="gloo")]
        print("sharded_on_cpu: DeepSpeed forced", file=sys.stderr)
        original_init(self, *args, **kwargs)

    accelerate.Accelerator.__init__ = init


if __name__ == "__main__":
    if os.environ.get("ACCELERATE_USE_FSDP") == "true":
        _force_fsdp()
    elif os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
        _force_deepspeed()
    else:
        raise SystemExit("sharded_on_cpu: launch with an FSDP or DeepSpeed accelerate config")
    script, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
