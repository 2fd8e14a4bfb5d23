"""One optimisation step's forward and backward, with or without feature caching.

With `accum_freq > 1` plain gradient accumulation would score each micro-batch against its own
negatives only. Feature caching (GradCache, Gao et al. 2021; open_clip's `--accum-freq`) keeps the
big batch's loss exactly:

1. encode every micro-batch WITHOUT gradient, keeping its RNG state;
2. compute the loss on the concatenated features (leaf tensors) and backpropagate it to them;
3. re-encode each micro-batch WITH gradient under the same RNG state and backpropagate
   `sum(features * cached_grad)`; parameters thus get d(big-batch loss)/d(parameters).

`logit_scale` (and SigLIP's `logit_bias`) enter the loss directly: their gradient from step 2 is
routed through the first micro-batch's output so that DDP reduces it with everything else.
"""

from __future__ import annotations

import contextlib

import torch
from torch.profiler import record_function

from oner.objectives import Objective

# Outputs that are per-sample embeddings (concatenated across micro-batches).
_FEATURE_KEYS = ("image", "text", "joint", "cross", "joint_negative", "quad")
# Outputs that index rows of the micro-batch (shifted to rows of the whole step when concatenated).
_INDEX_KEYS = ("joint_rows", "quad_sources")
_SCALAR_KEYS = ("logit_scale", "logit_bias")


class RandContext:
    """Captures the CPU (and CUDA) RNG state now; `with ctx:` replays it (GradCache's RandContext)."""

    def __init__(self, device: torch.device):
        self.cpu_state = torch.get_rng_state()
        self.cuda = device.type == "cuda"
        self.cuda_state = torch.cuda.get_rng_state(device) if self.cuda else None
        self.device = device
        self._fork = None

    def __enter__(self):
        self._fork = torch.random.fork_rng(devices=[self.device] if self.cuda else [], enabled=True)
        self._fork.__enter__()
        torch.set_rng_state(self.cpu_state)
        if self.cuda:
            torch.cuda.set_rng_state(self.cuda_state, self.device)

    def __exit__(self, *exc):
        self._fork.__exit__(*exc)
        self._fork = None


def _targets(ema, batch, accelerator):
    if ema is None:
        return None
    with accelerator.autocast():
        return ema.encode(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])


def forward_backward(
    model, objective: Objective, micro_batches: list[dict], accelerator, ema=None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward and backward of one step over `micro_batches` (one or more); returns the loss and its terms.

    Args:
        model: the (accelerate-prepared) [`oner.training.pretrainer.OneRPretrainer`].
        micro_batches: dicts of tensors; with more than one, features are cached (see module doc).
        ema: optional [`oner.training.pretrainer.EMATarget`] producing the mixup targets.

    Returns:
        `(loss, parts)`: the detached total loss of the whole step and each term's value.
    """
    # Model inputs only: a streamed batch also names its samples ("sample_keys").
    micro_batches = [{k: v for k, v in b.items() if k != "sample_keys"} for b in micro_batches]
    if len(micro_batches) == 1:
        batch = micro_batches[0]
        # The scopes name a step's phases in a torch.profiler trace (benchmarks/loop_speed.py --profile).
        with record_function("oner:forward"):
            features = model(**batch)
        with record_function("oner:objective"):
            loss, parts = objective(features, _targets(ema, batch, accelerator))
        with record_function("oner:backward"):
            accelerator.backward(loss)
        return loss.detach(), {k: v.detach() for k, v in parts.items()}
    return _cached_forward_backward(model, objective, micro_batches, accelerator, ema)


def _cached_forward_backward(model, objective, micro_batches, accelerator, ema):
    device = micro_batches[0]["input_ids"].device
    # 1. features of every micro-batch, no graph kept.
    rand_states, cached, targets = [], [], []
    with torch.no_grad():
        for batch in micro_batches:
            rand_states.append(RandContext(device))
            cached.append(model(**batch))
            targets.append(_targets(ema, batch, accelerator))
    keys = [k for k in _FEATURE_KEYS if k in cached[0]]
    leaves = {k: torch.cat([c[k] for c in cached]).detach().requires_grad_(True) for k in keys}
    sizes = {k: [len(c[k]) for c in cached] for k in keys}  # rows per micro-batch (joint: a fraction)
    starts = [0] + [len(b["input_ids"]) for b in micro_batches][:-1]
    offsets = torch.tensor(starts, device=device).cumsum(0)
    for k in _INDEX_KEYS:  # e.g. which rows of the whole step the joint pass covered
        if k in cached[0]:
            leaves[k] = torch.cat([c[k] + o for c, o in zip(cached, offsets)])
    for k in _SCALAR_KEYS:
        if k in cached[0]:
            leaves[k] = cached[0][k].detach().clone().requires_grad_(True)
    all_targets = None if ema is None else {k: torch.cat([t[k] for t in targets]) for k in targets[0]}

    # 2. the big-batch loss on cached features, backpropagated to them.
    loss, parts = objective.contrastive_loss(leaves, all_targets)
    mlm_count = sum(int(c["mlm_count"]) for c in cached) if "mlm_count" in cached[0] else 0
    if mlm_count:
        mlm_sum = sum(c["mlm_sum"] for c in cached)
        parts["mlm"] = mlm_sum / mlm_count
        loss = loss + objective.mlm_loss(mlm_sum, mlm_count)
    contrastive = sum(weight * parts[name] for name, weight in objective.config.weights.items()
                      if name in parts and name != "mlm")
    differentiable = {k: v for k, v in leaves.items() if v.requires_grad}
    grads = torch.autograd.grad(contrastive, list(differentiable.values()), allow_unused=True) if differentiable else []
    grads = {k: (g if g is not None else torch.zeros_like(differentiable[k])) for k, g in zip(differentiable, grads)}

    # 3. re-encode each micro-batch with gradient and push the cached gradients through it.
    offset = dict.fromkeys(keys, 0)
    for index, (batch, rand) in enumerate(zip(micro_batches, rand_states)):
        last = index == len(micro_batches) - 1
        sync = contextlib.nullcontext() if last else accelerator.no_sync(model)
        with sync, rand:
            out = model(**batch)
            surrogate = sum((out[k] * grads[k][offset[k] : offset[k] + sizes[k][index]]).sum() for k in keys)
            for k in _SCALAR_KEYS:
                if k in grads:  # the scalar's gradient once, on the first micro-batch
                    surrogate = surrogate + out[k] * (grads[k] if index == 0 else 0.0)
            if "mlm_sum" in out:
                surrogate = surrogate + objective.mlm_loss(out["mlm_sum"], mlm_count)
            accelerator.backward(surrogate)
        for k in keys:
            offset[k] += sizes[k][index]
    return loss.detach(), {k: v.detach() for k, v in parts.items()}
