"""What DDP wraps: a model plus the training-only parts, one forward per micro-batch, and the EMA target.

[`OneRPretrainer`] turns a micro-batch into the features the objective scores (`oner.objectives`):
the encoder passes the enabled terms need ([`encode_pairs`]) and, for `mlm`, the masked-token sums
of the MLM head (`oner.training.mlm`). It wraps a `OneRModel` or the two-tower baseline behind the
same interface (`oner.baseline.CLIPAsOneR`). [`EMATarget`] is the optional momentum encoder whose
embeddings build the mixup targets.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from modeling_oner.modeling_oner import l2_normalize
from oner.objectives import ObjectiveConfig, mosaic, quadrant_patches

from .mlm import MLMHead

# The kinds of output of `OneRPretrainer.forward`, as feature caching (`oner.training.step`) joins
# micro-batches: per-sample embeddings (concatenated), row indices into the micro-batch (shifted to
# rows of the whole batch) and the scoring scalars (one copy).
PER_SAMPLE_FEATURES = ("image", "text", "joint", "cross", "joint_negative", "quad")
ROW_INDEX_FEATURES = ("joint_rows", "quad_sources")
SCALAR_FEATURES = ("logit_scale", "logit_bias")


class OneRPretrainer(nn.Module):
    """A `OneRModel` (or `CLIPAsOneR`) plus the training-only parts (MLM head); one forward per micro-batch.

    `forward(input_ids, attention_mask, pixel_values, mlm_input_ids=None, mlm_labels=None)`
    returns a dict:

    - `image`, `text`: `(n, projection_dim)` normalised single-modality embeddings;
    - `joint` / `cross`: `(n, projection_dim)` normalised embeddings of the joint [I;T] pass with
      full / cross-modal attention (when `cmc` / `cic` is on);
    - `joint_negative`: `(n, projection_dim)` caption i jointly with pair i+1's context (its image
      or mosaic, which does not hold image i) (`joint_negatives="shared_text"`);
    - `quad`, `quad_sources`: `(4n, k, projection_dim)` the projected patch tokens of each quadrant
      of the mosaics encoded as images (`k` patches a quadrant), and `(4n,)` the row of the caption
      of each quadrant's image (`quad`);
    - `mlm_logits`, `mlm_labels`: `(m, vocab)` the MLM head's logits at the `m` masked caption tokens
      and `(m,)` their true tokens (when `mlm` is on; the objective scores them);
    - `logit_scale` (and `logit_bias` for the sigmoid loss): returned as outputs so that their
      gradients flow through DDP's graph.

    The model is not changed here: what the objective scores with (the sigmoid loss's bias, a fixed
    temperature) is in its config before it is built (`ObjectiveConfig.model_settings`).
    """

    def __init__(self, model: nn.Module, config: ObjectiveConfig):
        super().__init__()
        self.model = model
        self.objective = config
        self.passes = config.passes
        self.mlm_head = (
            MLMHead(model.config.hidden_size, model.embeddings.token_embedding, model.config.layer_norm_eps)
            if "mlm" in self.passes
            else None
        )
        if config.pairwise == "sigmoid" and getattr(model, "logit_bias", None) is None:
            raise ValueError("the sigmoid loss needs a model with a logit bias: build it with "
                             "ObjectiveConfig.model_settings (OneRConfig.logit_bias_init)")

    @property
    def logit_bias(self) -> nn.Parameter | None:
        """The model's SigLIP bias when the objective is the sigmoid loss, else None."""
        return self.model.logit_bias if self.objective.pairwise == "sigmoid" else None

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        mlm_input_ids: torch.Tensor | None = None,
        mlm_labels: torch.Tensor | None = None,
        **unused,
    ) -> dict[str, torch.Tensor]:
        joint_rows = None
        if self.objective.cmc_fraction < 1.0:
            joint_rows = max(1, math.ceil(self.objective.cmc_fraction * len(input_ids)))
        mosaic_joint = self.objective.cmc_context == "mosaic" and "joint" in self.passes
        if "joint_negative" in self.passes and len(input_ids) < (5 if mosaic_joint else 2):
            raise ValueError(f"joint_negatives 'shared_text' needs at least {5 if mosaic_joint else 2} pairs per "
                             f"micro-batch (pair i+1's context must not hold image i), got {len(input_ids)}")
        mosaics = sources = None
        if mosaic_joint or "quad" in self.passes:
            mosaics, sources = mosaic(pixel_values, return_sources=True)
        joint_pixels = mosaics if mosaic_joint else None
        out = encode_pairs(self.model, input_ids, attention_mask, pixel_values, self.passes, joint_rows, joint_pixels)
        if joint_rows is not None and "joint" in out:
            out["joint_rows"] = torch.arange(joint_rows, device=input_ids.device)  # which pairs' mixups are CMC's targets
        if "quad" in self.passes:
            rows = slice(None) if joint_rows is None else slice(0, joint_rows)
            out["quad"] = quadrant_tokens(self.model, mosaics[rows]).flatten(0, 1)
            out["quad_sources"] = sources[rows].flatten()
        if self.mlm_head is not None:
            if mlm_input_ids is None or mlm_labels is None:
                raise ValueError("the mlm term needs mlm_input_ids and mlm_labels (see whole_word_mask)")
            # [inferred] masked LANGUAGE modelling conditioned on the image: the joint [I; masked T]
            # sequence, as ALBEF/ViLT do; the talk's diagram names masked multimodal modelling.
            hidden = self.model.forward_features(
                input_ids=mlm_input_ids, attention_mask=attention_mask, pixel_values=pixel_values
            ).last_hidden_state
            text_hidden = hidden[:, 1 + self.model.config.num_patches :]
            where = mlm_labels != -100
            out["mlm_logits"] = self.mlm_head(text_hidden[where])
            out["mlm_labels"] = mlm_labels[where]
        out["logit_scale"] = self.model.logit_scale
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out


def encode_pairs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: torch.Tensor,
    passes: set[str],
    joint_rows: int | None = None,
    joint_pixels: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Normalised embeddings of the requested passes (`image`, `text`, `joint`, `cross`,
    `joint_negative`), each `(n, d)`; the `joint` pass (full attention) only of the first
    `joint_rows` pairs when given, and on `joint_pixels` (e.g. a [`mosaic`]) instead of
    `pixel_values` when given. `joint_negative` is the `joint` pass of caption i over pair i+1's
    context: the same caption without its image (with the same rows)."""
    # `model.embed` returns tensors under every transformers version; the public `get_*_features`
    # build output objects under transformers 5, which the hot path has no use for.
    out: dict[str, torch.Tensor] = {}
    if "image" in passes:
        out["image"] = l2_normalize(model.embed(pixel_values=pixel_values))
    if "text" in passes:
        out["text"] = l2_normalize(model.embed(input_ids=input_ids, attention_mask=attention_mask))
    for name, cross in (("joint", False), ("cross", True), ("joint_negative", False)):
        if name in passes:
            rows = slice(None) if cross or joint_rows is None else slice(0, joint_rows)
            pixels = joint_pixels if name != "cross" and joint_pixels is not None else pixel_values
            if name == "joint_negative":
                pixels = pixels.roll(-1, dims=0)  # row i: pair i+1's context
            out[name] = l2_normalize(
                model.embed(
                    input_ids=input_ids[rows],
                    pixel_values=pixels[rows],
                    attention_mask=attention_mask[rows],
                    cross_modal_attention=cross,
                )
            )
    return out


def quadrant_tokens(model: nn.Module, mosaics: torch.Tensor) -> torch.Tensor:
    """`(n, c, h, w)` mosaics encoded as images -> `(n, 4, k, d)`: each quadrant's `k` patch tokens
    through the shared head (as `get_patch_features`, the map the pointing game reads), not normalised;
    the objective pools them (`oner.objectives.region_logits`)."""
    num_patches = model.config.num_patches
    hidden = model.forward_features(pixel_values=mosaics).last_hidden_state
    return quadrant_patches(model.project(hidden[:, 1 : 1 + num_patches]), math.isqrt(num_patches))


class EMATarget(nn.Module):
    """A frozen copy of the model, updated as `t <- mu * t + (1 - mu) * online` after each step.

    `mu` follows MoCo v3 / BYOL's cosine schedule from `momentum` to 1 over `total_steps`
    [inferred: the talk says OneR started from MoCo v3]. Its `state_dict` goes into checkpoints.
    """

    def __init__(self, model: nn.Module, momentum: float, total_steps: int):
        super().__init__()
        self.target = copy.deepcopy(model).eval().requires_grad_(False)
        self.base_momentum = momentum
        self.total_steps = max(int(total_steps), 1)

    def momentum_at(self, step: int) -> float:
        progress = min(step / self.total_steps, 1.0)
        return 1.0 - (1.0 - self.base_momentum) * (math.cos(math.pi * progress) + 1) / 2

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        mu = self.momentum_at(step)
        online = dict(model.named_parameters())
        for name, target in self.target.named_parameters():
            target.mul_(mu).add_(online[name].detach().to(target.dtype), alpha=1.0 - mu)

    @torch.no_grad()
    def encode(self, input_ids, attention_mask, pixel_values) -> dict[str, torch.Tensor]:
        """Target `image` and `text` embeddings `(n, d)`, normalised, without gradient."""
        return encode_pairs(self.target, input_ids, attention_mask, pixel_values, {"image", "text"})
