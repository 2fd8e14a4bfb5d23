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

from .pretrainer import PER_SAMPLE_FEATURES, ROW_INDEX_FEATURES, SCALAR_FEATURES

# What the joined batch is made of; the rest of a micro-batch's output (MLM's logits) is reduced at once.
_JOINED = (*PER_SAMPLE_FEATURES, *ROW_INDEX_FEATURES, *SCALAR_FEATURES)


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
    # 1. features of every micro-batch, no graph kept; per-sample terms reduced to their sums at once
    #    (MLM's logits over the vocabulary are not kept).
    rand_states, cached, sample_sums, targets = [], [], [], []
    with torch.no_grad():
        for batch in micro_batches:
            rand_states.append(RandContext(device))
            features = model(**batch)
            sample_sums.append(objective.sample_sums(features))
            cached.append({k: v for k, v in features.items() if k in _JOINED})
            targets.append(_targets(ema, batch, accelerator))
    leaves, sizes = _joined_features(cached, [len(b["input_ids"]) for b in micro_batches])
    all_targets = None if ema is None else {k: torch.cat([t[k] for t in targets]) for k in targets[0]}
    counts = objective.sample_counts(sample_sums)

    # 2. the batch-level terms on the joined features, backpropagated to them.
    loss, parts = objective.batch_loss(leaves, all_targets)
    differentiable = {k: v for k, v in leaves.items() if v.requires_grad}
    grads = torch.autograd.grad(loss, list(differentiable.values()), allow_unused=True) if differentiable else []
    grads = {k: (g if g is not None else torch.zeros_like(differentiable[k])) for k, g in zip(differentiable, grads)}
    for sums in sample_sums:  # the per-sample terms' values, for the log
        value, shares = objective.sample_loss(sums, counts)
        loss = loss + value
        for name, share in shares.items():
            parts[name] = parts.get(name, 0.0) + share

    # 3. re-encode each micro-batch with gradient and push the cached gradients through it, with the
    #    per-sample terms' own gradient.
    keys = [k for k in PER_SAMPLE_FEATURES if k in cached[0]]
    offset = dict.fromkeys(keys, 0)
    for index, (batch, rand) in enumerate(zip(micro_batches, rand_states)):
        last = index == len(micro_batches) - 1
        sync = contextlib.nullcontext() if last else accelerator.no_sync(model)
        with sync, rand:
            out = model(**batch)
            surrogate = sum((out[k] * grads[k][offset[k] : offset[k] + sizes[k][index]]).sum() for k in keys)
            for k in SCALAR_FEATURES:
                if k in grads:  # the scalar's gradient once, on the first micro-batch
                    surrogate = surrogate + out[k] * (grads[k] if index == 0 else 0.0)
            surrogate = surrogate + objective.sample_loss(objective.sample_sums(out), counts)[0]
            accelerator.backward(surrogate)
        for k in keys:
            offset[k] += sizes[k][index]
    return loss.detach(), {k: v.detach() for k, v in parts.items()}


def _joined_features(cached: list[dict], rows: list[int]) -> tuple[dict, dict]:
    """The micro-batches' features as one batch's: per-sample embeddings concatenated as leaves that
    collect gradient, row indices shifted to rows of the whole batch, the scalars once (a leaf too);
    and, per embedding, its rows in each micro-batch (the joint pass may cover a fraction of them)."""
    device = cached[0]["logit_scale"].device
    keys = [k for k in PER_SAMPLE_FEATURES if k in cached[0]]
    leaves = {k: torch.cat([c[k] for c in cached]).detach().requires_grad_(True) for k in keys}
    sizes = {k: [len(c[k]) for c in cached] for k in keys}
    offsets = torch.tensor([0] + rows[:-1], device=device).cumsum(0)
    for k in ROW_INDEX_FEATURES:
        if k in cached[0]:
            leaves[k] = torch.cat([c[k] + o for c, o in zip(cached, offsets)])
    for k in SCALAR_FEATURES:
        if k in cached[0]:
            leaves[k] = cached[0][k].detach().clone().requires_grad_(True)
    return leaves, sizes
