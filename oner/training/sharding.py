"""What the training loop does differently when Accelerate shards the model (FSDP) or the optimizer (DeepSpeed).

`train.py` itself has no distributed code: `accelerate launch --config_file configs/accelerate/<x>.yaml`
chooses DDP, FSDP or DeepSpeed ZeRO-2, and `accelerator.prepare` wraps the pretrainer. Four places
of the loop read or write the weights outside of forward/backward, and under sharding each process
holds only a part of them. This module makes those four places correct for every engine:

- **The final model folder** (`gathered_model_state_dict` + `build_model_for_saving`):
  `accelerator.get_state_dict(pretrainer)` is called on EVERY process (under FSDP it all-gathers
  the shards; under FSDP1/FSDP2 only the main process receives the full dict), then the main process
  loads it, without the pretrainer's `model.` prefix and training-only parts (MLM head), into a
  fresh copy of the model, strictly: a missing, extra or wrongly shaped tensor is an error, so an
  unsharded or partial save cannot pass.
- **The finite-weights check of `checkpoint()`** (`weights_are_finite`): each process checks the
  tensors it holds (its FSDP shards, or everything under DDP/ZeRO-2) and the verdict is reduced
  across processes; no gathering needed, since the shards together cover every weight.
- **Logged values of one parameter** (`parameter_value`, e.g. the logit scale for the temperature):
  under FSDP1 a parameter lives on the process whose shard holds it (the others see an empty view);
  each process contributes what it holds and the values are averaged over the holders (FSDP2's
  DTensor gives the full value to every process).
- **Scalar parameters** (`promote_scalar_parameters`): FSDP (both `FullyShardedDataParallel` and
  `fully_shard`) refuses 0-dimensional parameters ("FSDP doesn't support scalar parameters. Change
  model.logit_scale to a 1D tensor with numel equal to 1"), and DeepSpeed's engine fails on them
  when it broadcasts the model at start (0.19.8: "self.dim() cannot be 0 to view Float as Byte");
  OneR's `logit_scale`/`logit_bias` (like CLIP's) are scalars. Before `prepare`, under FSDP and
  DeepSpeed only, they become 1-element vectors (they broadcast the same everywhere they are used);
  the saved folder gets the model's own shapes back (`build_model_for_saving` reshapes by element
  count), so folders are the same under every engine. Checkpoints keep the engine's shapes: resume
  under the engine that wrote them.

DeepSpeed applies the optimizer update inside `accelerator.backward` (accelerate's
`DeepSpeedEngineWrapper` calls `engine.step()`) and clips there too, which limits what the loop can
do: `check_supported` refuses what cannot work under an engine, `configure_deepspeed_clipping`
hands `--max_grad_norm` to DeepSpeed, and the loop's NaN guard stops instead of skipping
(`oner.training.loop.optimisation_step`).
"""

from __future__ import annotations

import torch
from accelerate.utils import DistributedType
from torch import nn

# Training-side modules of the pretrainers that are not part of the saved model.
MODEL_PREFIX = "model."
# What `torch.compile` puts in the state-dict keys of a module it wrapped: at the front when accelerate's
# `dynamo_backend` compiles the whole pretrainer, in the middle for its regional compilation (each layer).
COMPILED_MODULE_KEY = "_orig_mod."


def engine(accelerator) -> str:
    """`fsdp1`, `fsdp2`, `deepspeed`, or `ddp` (DDP on GPUs or CPUs, and a single process)."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return "fsdp2" if accelerator.is_fsdp2 else "fsdp1"
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return "deepspeed"
    return "ddp"


def needs_vector_scalars(accelerator) -> bool:
    """FSDP and DeepSpeed cannot handle 0-dim parameters (see `promote_scalar_parameters`)."""
    return engine(accelerator) != "ddp"


def requested_engine(accelerator) -> str:
    """`engine` for the run's first line ("single process" for one), and whether the launcher asked
    for FSDP/DeepSpeed that accelerate did not turn on.

    accelerate 1.x enables FSDP and DeepSpeed only for accelerator devices: on a machine without one
    (`Accelerator(cpu=True)`, MULTI_CPU) an FSDP or DeepSpeed config file silently gives DDP over gloo.
    """
    import os

    actual = engine(accelerator)
    shown = "single process" if actual == "ddp" and accelerator.num_processes == 1 else actual
    for flag, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if os.environ.get(flag, "false").lower() == "true" and actual == "ddp":
            return (f"{shown} ({name} was requested, but accelerate runs {name} only on GPUs/accelerator devices; "
                    f"this {accelerator.device.type} run does without)")
    return shown


def promote_scalar_parameters(module: nn.Module) -> list[str]:
    """Replace every 0-dimensional parameter of `module` by a 1-element vector; returns their names.

    Call before the optimizer is built and before `accelerator.prepare` (FSDP flattens parameters
    at wrap time). Values and `requires_grad` are kept.
    """
    promoted = []
    for owner_name, owner in module.named_modules():
        for name, param in list(owner.named_parameters(recurse=False)):
            if param.ndim == 0:
                setattr(owner, name, nn.Parameter(param.detach().reshape(1).clone(), requires_grad=param.requires_grad))
                promoted.append(f"{owner_name}.{name}" if owner_name else name)
    return promoted


def gathered_model_state_dict(accelerator, pretrainer) -> dict[str, torch.Tensor] | None:
    """The full state dict of the pretrainer's `model` on the main process, None on the others.

    Every process must call it: under FSDP it is a collective (all-gather of the shards).
    """
    state_dict = accelerator.get_state_dict(pretrainer)
    if not accelerator.is_main_process:
        return None
    state_dict = {k.replace(COMPILED_MODULE_KEY, ""): v for k, v in state_dict.items()}
    model_state = {k[len(MODEL_PREFIX):]: v for k, v in state_dict.items() if k.startswith(MODEL_PREFIX)}
    if not model_state:
        raise RuntimeError(f"accelerator.get_state_dict gave no '{MODEL_PREFIX}*' weights on the main process "
                           f"({len(state_dict)} entries): the model cannot be saved")
    return model_state


def build_model_for_saving(model_class, config, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """A fresh `model_class(config)` in float32 holding exactly `state_dict`; raises on any mismatch.

    Tensors whose shape differs from the model's only by 1-sized dimensions (the scalars that
    `promote_scalar_parameters` made vectors) are reshaped; anything else must match as is.
    """
    model = model_class(config)
    own = model.state_dict()
    fixed = {}
    for name, tensor in state_dict.items():
        if name in own and tensor.shape != own[name].shape and tensor.numel() == own[name].numel() == 1:
            tensor = tensor.reshape(own[name].shape)
        fixed[name] = tensor
    missing, unexpected = [k for k in own if k not in fixed], [k for k in fixed if k not in own]
    wrong = [f"{k}: {tuple(fixed[k].shape)} instead of {tuple(own[k].shape)}" for k in own
             if k in fixed and fixed[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise RuntimeError(f"the gathered weights do not fit {model_class.__name__}: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}, wrong shapes {wrong[:5]} (a partial or sharded save?)")
    model.load_state_dict(fixed, strict=True)
    return model.float().eval()


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The part of `tensor` this process holds (a DTensor's local shard under FSDP2)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def weights_are_finite(accelerator, module: nn.Module) -> bool:
    """True when no weight of the (prepared) `module` is NaN/inf on ANY process; every process must call it."""
    bad = any(not torch.isfinite(_local(p.detach())).all() for p in module.parameters())
    flag = torch.tensor([float(bad)], device=accelerator.device)
    return accelerator.reduce(flag, reduction="sum").item() == 0


def parameter_value(accelerator, param: torch.Tensor) -> float:
    """The value of a 1-element parameter, whichever process holds it; every process must call it.

    Each process sends (sum of what it holds, number of elements it holds); under DDP/ZeRO-2 every
    process holds the value, under FSDP1 one does, under FSDP2 `full_tensor()` gives it to all.
    """
    if hasattr(param, "full_tensor"):
        param = param.full_tensor()
    local = param.detach().float().reshape(-1)
    pair = torch.stack([local.sum(), torch.tensor(float(local.numel()), device=local.device)]).to(accelerator.device)
    if accelerator.num_processes > 1:
        pair = accelerator.reduce(pair, reduction="sum")
    return float(pair[0] / pair[1]) if pair[1] > 0 else float("nan")


def check_supported(accelerator, args) -> str | None:
    """A reason why this run's settings cannot work under the engine accelerate chose, else None."""
    kind = engine(accelerator)
    if kind == "fsdp1" and not accelerator.state.fsdp_plugin.use_orig_params:
        return ("set fsdp_use_orig_params: true in the accelerate config (configs/accelerate/fsdp.yaml does): the "
                "optimizer has two parameter groups (with and without weight decay), which FSDP keeps only then")
    if kind.startswith("fsdp") and getattr(args, "momentum", 0) > 0:
        return ("--momentum (the EMA target encoder) is not supported under FSDP: the EMA copy would need "
                "the full weights on every process after each step; use DDP or DeepSpeed ZeRO-2")
    if kind == "deepspeed" and args.accum_freq > 1:
        return ("--accum_freq > 1 (feature caching: several backward passes per optimizer step) is not supported "
                "under DeepSpeed, whose engine steps inside accelerator.backward; raise --per_device_batch_size "
                "or use DDP/FSDP")
    return None


def configure_deepspeed_clipping(accelerator, max_grad_norm: float) -> str | None:
    """Make DeepSpeed clip at `--max_grad_norm`; a reason when its config says otherwise, else None.

    DeepSpeed clips inside its engine (`gradient_clipping` of its config), not in the loop.
    """
    if engine(accelerator) != "deepspeed":
        return None
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    value = config.get("gradient_clipping", "auto")
    if value in ("auto", None):
        config["gradient_clipping"] = float(max_grad_norm)
        return None
    if float(value) != float(max_grad_norm):
        return (f"the DeepSpeed config clips gradients at {value} but --max_grad_norm is {max_grad_norm}: "
                f"make them agree (or set gradient_clipping: auto)")
    return None
