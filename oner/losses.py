"""Pairwise contrastive losses with negatives from every process.

The design follows open_clip's `loss.py` (`gather_features`, `ClipLoss`, `SigLipLoss`):

- Embeddings are gathered from all ranks WITH gradient through
  `torch.distributed.nn.functional.all_gather` (`accelerator.gather` carries none). Its backward
  sums each rank's gradient for the local slice over all ranks; DDP's averaging of parameter
  gradients then gives back exactly the one-process gradient of the same global batch.
- `local_loss=True` scores only this rank's rows against all gathered columns (memory O(n * N)
  instead of O(N * N)); the mean of the ranks' local losses is the global loss.
- Logits and softmax/sigmoid are computed in fp32, outside autocast.

Every function takes L2-normalised embeddings; `logit_scale` is the log of the inverse temperature
(the model's parameter), exponentiated here.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

PAIRWISE_KINDS = ("softmax", "sigmoid")


def world() -> tuple[int, int]:
    """`(rank, world_size)` of the default process group, `(0, 1)` when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """`(n, d)` on each rank -> `(world_size * n, d)` in rank order, differentiable.

    Every rank must pass the same `n` (the data loader drops ragged last batches).
    """
    rank, world_size = world()
    if world_size == 1:
        return tensor
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(tensor), dim=0)


def _labels(n_rows: int, offset: int, device: torch.device) -> torch.Tensor:
    return torch.arange(n_rows, device=device) + offset


def softmax_pairwise_loss(
    queries: torch.Tensor, keys: torch.Tensor, logit_scale: torch.Tensor, local_loss: bool = False
) -> torch.Tensor:
    """Symmetric InfoNCE between paired rows of `queries` and `keys` (CLIP's loss).

    Args:
        queries, keys: `(n, d)` L2-normalised, row i of one paired with row i of the other.
        logit_scale: scalar, log inverse temperature.
        local_loss: score local rows against all gathered rows only (open_clip's `--local-loss`).

    Returns:
        scalar `(CE(q -> k) + CE(k -> q)) / 2`, negatives = every other pair on every rank.
    """
    with torch.autocast(device_type=queries.device.type, enabled=False):
        queries, keys = queries.float(), keys.float()
        scale = logit_scale.float().exp()
        rank, world_size = world()
        all_queries, all_keys = gather_with_grad(queries), gather_with_grad(keys)
        if local_loss:
            labels = _labels(len(queries), rank * len(queries), queries.device)
            loss_q = F.cross_entropy(scale * queries @ all_keys.t(), labels)
            loss_k = F.cross_entropy(scale * keys @ all_queries.t(), labels)
        else:
            logits = scale * all_queries @ all_keys.t()
            labels = _labels(len(all_queries), 0, queries.device)
            loss_q = F.cross_entropy(logits, labels)
            loss_k = F.cross_entropy(logits.t(), labels)
        return (loss_q + loss_k) / 2


def sigmoid_pairwise_loss(
    queries: torch.Tensor,
    keys: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    local_loss: bool = False,
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss (Zhai et al., 2023): every pair is a binary match / no match.

    `-sum_ij log sigmoid(y_ij * (t * q_i . k_j + b)) / N` with `y_ij = +1` on the diagonal and
    `-1` elsewhere, over all `N` pairs of the global batch. `local_loss=True` sums only this rank's
    rows (against all gathered keys) and divides by the local row count: the ranks' mean is the
    global loss. SigLIP exchanges key blocks between neighbours; a gather gives the same sum.

    Args:
        queries, keys: `(n, d)` L2-normalised; logit_scale: log of t; logit_bias: b.
    """
    with torch.autocast(device_type=queries.device.type, enabled=False):
        queries, keys = queries.float(), keys.float()
        scale, bias = logit_scale.float().exp(), logit_bias.float()
        rank, world_size = world()
        all_keys = gather_with_grad(keys)
        if local_loss:
            rows, offset = queries, rank * len(queries)
        else:
            rows, offset = gather_with_grad(queries), 0
        logits = scale * rows @ all_keys.t() + bias
        signs = -torch.ones_like(logits)
        signs[torch.arange(len(rows), device=rows.device), _labels(len(rows), offset, rows.device)] = 1.0
        return -F.logsigmoid(signs * logits).sum() / len(rows)


def soft_target_loss(
    queries: torch.Tensor, keys: torch.Tensor, targets: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE with soft targets: `(CE(q -> k, T) + CE(k -> q, T^t)) / 2`.

    Unlike the functions above it does not gather: pass GLOBAL `queries` and `keys` (the caller
    gathers with `gather_with_grad`, as the cross-pair mixup must mix rows of other ranks).

    Args:
        queries, keys: `(N, d)` L2-normalised.
        targets: `(N, N)`, each row and each column summing to 1 (e.g. a mix of the identity and a
            permutation), so that both directions are proper distributions.
        logit_scale: scalar, log inverse temperature.
    """
    with torch.autocast(device_type=queries.device.type, enabled=False):
        if targets.shape != (len(queries), len(keys)):
            raise ValueError(f"targets {tuple(targets.shape)} do not match {len(queries)} queries x {len(keys)} keys")
        logits = logit_scale.float().exp() * queries.float() @ keys.float().t()
        loss_q = F.cross_entropy(logits, targets)
        loss_k = F.cross_entropy(logits.t(), targets.t())
        return (loss_q + loss_k) / 2


def shared_text_loss(
    joint: torch.Tensor, joint_negative: torch.Tensor, targets: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """InfoNCE of joint image+text embeddings against their targets, with negatives the text cannot separate.

    Row i of `joint` is caption i over a context that holds image i; row i of `joint_negative` is
    the SAME caption over a context without image i; row i of `targets` is what a joint query must
    find (image i's embedding, or the pair's mixup). Gathered over every process, with gradient.

    `(CE(joint -> targets) + CE(targets -> [joint; joint_negative])) / 2`: in the second direction
    each target must pick its joint embedding over the one with the same caption, so an embedding
    that is the caption's alone scores both alike and keeps a loss of at least ln 2.

    Args:
        joint, joint_negative, targets: `(n, d)` L2-normalised, row-aligned.
        logit_scale: scalar, log inverse temperature.
    """
    with torch.autocast(device_type=joint.device.type, enabled=False):
        if not joint.shape == joint_negative.shape == targets.shape:
            raise ValueError(f"joint {tuple(joint.shape)}, joint_negative {tuple(joint_negative.shape)} and "
                             f"targets {tuple(targets.shape)} must have the same shape")
        scale = logit_scale.float().exp()
        all_joint = gather_with_grad(joint.float())
        all_negative = gather_with_grad(joint_negative.float())
        all_targets = gather_with_grad(targets.float())
        labels = _labels(len(all_joint), 0, joint.device)
        loss_joint = F.cross_entropy(scale * all_joint @ all_targets.t(), labels)
        loss_target = F.cross_entropy(scale * all_targets @ torch.cat([all_joint, all_negative]).t(), labels)
        return (loss_joint + loss_target) / 2


def region_text_loss(logits: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
    """CLIM's region-text contrast: each region against every text of this process's batch.

    A text may own several regions (an image sits in up to four mosaics), so the text -> region
    direction spreads its target evenly over its regions; texts that own none are left out of it.
    Not gathered: each process scores its own regions (DDP averages the gradients).

    Args:
        logits: `(r, n)` scaled region-text similarities (`oner.objectives.region_logits`).
        sources: `(r,)` long, the text that describes each region.

    Returns:
        scalar `(CE(region -> text) + CE(text -> region, soft)) / 2`.
    """
    with torch.autocast(device_type=logits.device.type, enabled=False):
        if sources.shape != (len(logits),):
            raise ValueError(f"sources {tuple(sources.shape)} must name one text per region ({len(logits)})")
        logits = logits.float()
        loss_region = F.cross_entropy(logits, sources)
        owns = F.one_hot(sources, logits.shape[1]).t().float()  # (n, r)
        has_region = owns.sum(1) > 0
        soft = owns[has_region] / owns[has_region].sum(1, keepdim=True)
        loss_text = F.cross_entropy(logits.t()[has_region], soft)
        return (loss_region + loss_text) / 2


def pairwise_loss(
    queries: torch.Tensor,
    keys: torch.Tensor,
    logit_scale: torch.Tensor,
    kind: str = "softmax",
    logit_bias: torch.Tensor | None = None,
    local_loss: bool = False,
) -> torch.Tensor:
    """Dispatch to the softmax (InfoNCE) or sigmoid (SigLIP) form; see those functions."""
    if kind == "softmax":
        return softmax_pairwise_loss(queries, keys, logit_scale, local_loss)
    if kind == "sigmoid":
        if logit_bias is None:
            raise ValueError("the sigmoid pairwise loss needs a logit_bias")
        return sigmoid_pairwise_loss(queries, keys, logit_scale, logit_bias, local_loss)
    raise ValueError(f"unknown pairwise loss {kind!r}; choose one of {PAIRWISE_KINDS}")


@torch.no_grad()
def clamp_logit_scale_(logit_scale: torch.nn.Parameter, max_value: float = 4.605170185988092) -> None:
    """Clamp the log inverse temperature to [0, ln 100] in place (CLIP, open_clip), after each step."""
    logit_scale.clamp_(0.0, max_value)
