"""OneR's training objectives, each term switchable and weighted.

Notation (see docs/training.md, and docs/method.md for the sources): `z_I`, `z_T` the L2-normalised
embeddings of an image and of its caption, each encoded ALONE by the one tower and the one head;
`m = normalize(lam * z_I + (1 - lam) * z_T)` their mixup; `P(a, b)` the symmetric pairwise loss
between paired rows (InfoNCE, or SigLIP's sigmoid loss), negatives from every process.

| term | loss | source |
|------|------|--------|
| `itc` | `P(z_I, z_T)` (naive one-tower ITC, the failing baseline) | [talk] |
| `xmc` | `(P(z_I, m) + P(z_T, m)) / 2` | idea [talk], form [inferred] |
| `cic` | `P(z_C, m)`, `z_C` = the joint [I;T] pass where each modality attends only to the other | idea [talk], form [inferred] |
| `cmc` | `P(z_J, m)`, `z_J` = the joint [I;T] pass with full attention; or against `z_I` with negatives that share the text (`cmc_target`, `joint_negatives`, `joint_margin`) | [talk], form [inferred]; image target: MagicLens, MCA; shared-text negatives: ours |
| `quad` | each quadrant of a 2x2 mosaic (its patch tokens pooled) against its own object's caption | CLIM |
| `mlm` | cross-entropy on whole-word-masked caption tokens, joint pass with the image | [talk]/[code], form [inferred] |

The total is `sum_k w_k * L_k`. This module holds the terms; the model stays pure (`modeling_oner`
has no loss heads). The training side (`oner.training`) holds what produces their inputs: the
wrapper DDP wraps (`oner.training.pretrainer.OneRPretrainer`, features of one micro-batch), the MLM
head and whole-word masking (`oner.training.mlm`) and the EMA target encoder. The SigLIP bias of the
sigmoid loss is the model's own `logit_bias` (saved with it, added to its scores).

[`Objective`] computes the whole loss from the features of a batch; it exposes the split between
batch-level and per-sample terms that feature caching (GradCache, `oner.training.step`) needs.
"""

from __future__ import annotations

import math
from dataclasses import Field, dataclass, field, fields

import torch
import torch.nn.functional as F

from modeling_oner.modeling_oner import l2_normalize

from .losses import (
    PAIRWISE_KINDS,
    gather_with_grad,
    pairwise_loss,
    region_text_loss,
    shared_text_loss,
    soft_target_loss,
)

TERMS = ("itc", "xmc", "cic", "cmc", "quad", "mlm")
# How XMC builds its mixup (docs/method.md): the paper's "same-pair" mix of image i and text i, or
# our "cross-pair" mix of image i and the text of ANOTHER pair, scored with soft targets.
XMC_FORMS = ("same-pair", "cross-pair")
# What CMC's joint pass sees beside the caption: its own image ("pair", the paper's joint sequence),
# or a 2x2 mosaic of its image and three other images of the batch ("mosaic", ours).
CMC_CONTEXTS = ("pair", "mosaic")
# What CMC's joint embedding is scored against: the pair's mixup `m` (the paper's CMC, [inferred]
# form) or the pair's own image embedding `z_I` (the task of a joint query: find that image).
CMC_TARGETS = ("mixup", "image")
# CMC's negatives: the other pairs of the batch ("batch"), or those plus, for each pair, the joint
# pass of ITS caption over a context without its image ("shared_text", ours): a joint embedding that
# is the text's alone scores both the same and cannot win.
JOINT_NEGATIVES = ("batch", "shared_text")
# How `quad` pools a quadrant's patch tokens: their mean (CLIM) or a softmax over them conditioned
# on each text (PACL).
QUAD_POOLINGS = ("mean", "text_softmax")
# Which encoder passes each term needs: image-only, text-only, joint full attention, joint
# cross-modal attention, joint with masked text.
_NEEDS = {
    "itc": {"image", "text"},
    "xmc": {"image", "text"},
    "cic": {"image", "text", "cross"},
    "cmc": {"image", "text", "joint"},
    "quad": {"text", "quad"},
    "mlm": {"mlm"},
}
# The paper's final recipe as the talk describes it (XMC, then CMC for the joint sequence).
PAPER_OBJECTIVE = "xmc+cmc"
# train.py's default terms, decided by the ablations (docs/benchmarks.md), with `ObjectiveConfig`'s
# defaults (cross-pair XMC, mosaic CMC on half of each batch): cross-pair XMC beat naive ITC on
# retrieval and zero-shot classification (same-pair XMC, the shortcut, aligned nothing), mosaic CMC
# trains the joint image+text queries, and the quad term at weight 0.25 took the pointing game from
# 57 to 82% at the same 2,600 steps (3 seeds), retrieval unchanged.
DEFAULT_OBJECTIVE = "xmc+cmc+quad:0.25"
# SigLIP's initial logit bias for the sigmoid loss; the bias is the model's (`OneRConfig.logit_bias_init`).
SIGMOID_BIAS_INIT = -10.0


def parse_objective(spec: str) -> dict[str, float]:
    """`"xmc+cmc"` or `"xmc:1+cmc:0.5"` -> `{"xmc": 1.0, "cmc": 0.5}` (weight 1 when omitted).

    Raises ValueError with the list of known terms for an unknown name, a repeated name, a bad
    weight or an empty spec.
    """
    weights: dict[str, float] = {}
    for part in str(spec).replace(",", "+").split("+"):
        part = part.strip()
        if not part:
            continue
        name, _, weight = part.partition(":")
        name = name.strip().lower()
        if name not in TERMS:
            raise ValueError(f"unknown objective term {name!r} in {spec!r}; choose from {', '.join(TERMS)}")
        if name in weights:
            raise ValueError(f"objective term {name!r} appears twice in {spec!r}")
        try:
            value = float(weight) if weight.strip() else 1.0
        except ValueError:
            raise ValueError(f"bad weight {weight!r} for objective term {name!r} in {spec!r}") from None
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"weight of {name!r} must be a finite number >= 0, got {weight!r}")
        weights[name] = value
    if not weights:
        raise ValueError(f"empty objective {spec!r}; choose terms from {', '.join(TERMS)}, e.g. {PAPER_OBJECTIVE}")
    if all(name == "mlm" for name in weights):
        raise ValueError("mlm alone trains no shared embedding space; add a contrastive term, e.g. xmc+cmc+mlm")
    return weights


def _setting(default, help: str, *, choices: tuple | None = None, flag: str | None = None, type=None):
    """A field of `ObjectiveConfig` with what train.py's flag needs: its help, choices, name (the field's
    unless `flag` says otherwise) and type (the default's unless `type` says otherwise)."""
    metadata = {"help": help, "choices": choices, "flag": flag, "type": type}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ObjectiveConfig:
    """Settings of the objective; its defaults are train.py's, and train.py's objective flags are made
    from its fields (`oner.training.args`). Settings marked [inferred] are our reading of the method.

    Args:
        weights: term -> weight, from [`parse_objective`] (the flag `--objective` takes its string form).
        pairwise: `"softmax"` (InfoNCE, CLIP) or `"sigmoid"` (SigLIP) form of every pairwise term.
        local_loss: score local rows against gathered columns only (open_clip's `--local-loss`).
        mix_weight: `lam` of the mixup `lam * z_I + (1 - lam) * z_T`; the talk says "average" [inferred 0.5].
        mlm_probability: fraction of caption WORDS masked for `mlm` (15%, as the first author's code) [code].
        momentum: EMA momentum of a target encoder that produces the mixup targets `m` (without
            gradient), MoCo v3 style; 0 turns it off (the default) [inferred].
        xmc_form: `"same-pair"` (the paper's form as we infer it: `m_i` mixes image i and text i; each
            modality can match "its own half" of `m` without any cross-modal alignment, see
            docs/method.md) or `"cross-pair"` (ours, the default: `m_i` mixes image i with text i+1 of
            the global batch and is scored against the images and against the texts with soft
            targets, `lam` on pair i and `1 - lam` on pair i+1, so half of every target is reachable
            only through cross-modal alignment).
        cmc_fraction: fraction of each micro-batch (its first rows) that gets the joint pass of
            `cmc` (and the mosaic image pass of `quad`), trading their training for speed (1 = every
            row; the joint pass costs about as much as the image and text passes together) [ours].
        temperature: a FIXED temperature (MoCo v3 uses 0.2) instead of the learned logit scale;
            None keeps it learned (CLIP) [inferred].
        cmc_context: the image of CMC's joint pass. `"pair"`: the pair's own image (the paper's joint
            sequence). `"mosaic"` (ours, the default): a 2x2 mosaic of the pair's image (in a random
            quadrant) and three other images of the batch, each at half resolution, still
            contrasted with the pair's own target, so the joint pass must find the object the
            caption names among distractors (what a joint image+text query about one object in a
            scene needs).
        cmc_target: what CMC's joint embedding is scored against: `"mixup"` (the pair's `m`, the
            paper's CMC) or `"image"` (the pair's own image embedding `z_I`, the answer a joint
            query must find; MagicLens's query -> target image).
        joint_negatives: `"batch"` (the other pairs) or `"shared_text"` (ours): besides them, each
            pair's caption is also encoded jointly with the NEXT pair's context (a mosaic without
            the pair's image), and each target is scored against both joint embeddings; the text
            alone cannot tell them apart. Needs the softmax pairwise loss and, with mosaics, at
            least 5 pairs per micro-batch.
        joint_margin: when > 0, a hinge `relu(margin - (cos(z_J, t) - cos(z_T, t)))` added to
            CMC: the joint embedding must be nearer its target `t` than the caption alone is (MCA's
            preference of the composed over the unimodal embedding); the caption's side carries no
            gradient, so the hinge never pulls the text away from its image.
        quad_pooling: how `quad` pools each mosaic quadrant's patch tokens: `"mean"` (CLIM) or
            `"text_softmax"` (PACL: weighted by their similarity to each text); see [`region_logits`].
    """

    weights: dict[str, float] = _setting(
        parse_objective(DEFAULT_OBJECTIVE), flag="objective", type=str,
        help="terms joined by '+', each optionally ':weight', from itc, xmc, cic, cmc, quad, mlm (e.g. itc, xmc+cmc, "
        "xmc+cmc+quad:0.5, itc+xmc+cmc:0.5+mlm:0.1)")
    pairwise: str = _setting("softmax", "InfoNCE (CLIP) or the pairwise sigmoid loss (SigLIP) for every contrastive term",
                             choices=PAIRWISE_KINDS, flag="pairwise_loss")
    local_loss: bool = _setting(False, "score local rows against gathered columns only (open_clip --local-loss)")
    mix_weight: float = _setting(0.5, "lam of the mixup lam*z_I + (1-lam)*z_T [inferred]")
    mlm_probability: float = _setting(0.15, "fraction of caption words masked for the mlm term")
    momentum: float = _setting(0.0, "EMA target encoder momentum (cosine to 1) producing the mixup targets; 0 = off "
                               "[inferred]")
    xmc_form: str = _setting("cross-pair", "XMC's mixup: image i + text i (paper, inferred) or image i + text of another "
                             "pair with soft targets (ours; no shortcut)", choices=XMC_FORMS)
    cmc_fraction: float = _setting(0.5, "fraction of each batch that gets CMC's joint pass (1 = all); the joint pass "
                                   "costs about as much as the image and text passes together")
    temperature: float | None = _setting(None, "fixed temperature of every contrastive term (MoCo v3: 0.2); unset = "
                                         "learned logit scale (CLIP)", type=float)
    cmc_context: str = _setting("mosaic", "image of CMC's joint pass: the pair's own (paper) or a 2x2 mosaic with 3 "
                                "other batch images (ours)", choices=CMC_CONTEXTS)
    cmc_target: str = _setting("mixup", "what CMC's joint embedding is scored against: the pair's mixup (paper, "
                               "inferred) or its own image embedding", choices=CMC_TARGETS)
    joint_negatives: str = _setting("batch", "CMC's negatives: the other pairs, or also each caption over the next "
                                    "pair's context (ours: the text alone cannot win)", choices=JOINT_NEGATIVES)
    joint_margin: float = _setting(0.0, "hinge asking cos(joint, target) > cos(caption alone, target) + margin, added "
                                   "to CMC; 0 = off")
    quad_pooling: str = _setting("mean", "how the quad term pools a mosaic quadrant's patches: their mean (CLIM) or a "
                                 "softmax over them conditioned on each text (PACL)", choices=QUAD_POOLINGS)

    @classmethod
    def from_flags(cls, flags) -> "ObjectiveConfig":
        """The config train.py's parsed flags describe (an argparse namespace or any object with one
        attribute per flag). Raises ValueError naming the flag for a bad `--objective` and naming the
        setting for any other bad value."""
        values = {}
        for setting in fields(cls):
            value = getattr(flags, flag_name(setting))
            if setting.name == "weights":
                try:
                    value = parse_objective(value)
                except ValueError as e:
                    raise ValueError(f"--objective: {e}") from None
            values[setting.name] = value
        return cls(**values)

    def __post_init__(self) -> None:
        if self.pairwise not in PAIRWISE_KINDS:
            raise ValueError(f"pairwise must be one of {PAIRWISE_KINDS}, got {self.pairwise!r}")
        if not 0.0 <= self.mix_weight <= 1.0:
            raise ValueError(f"mix_weight must be in [0, 1], got {self.mix_weight}")
        if not 0.0 < self.mlm_probability < 1.0:
            raise ValueError(f"mlm_probability must be in (0, 1), got {self.mlm_probability}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.xmc_form not in XMC_FORMS:
            raise ValueError(f"xmc_form must be one of {XMC_FORMS}, got {self.xmc_form!r}")
        if self.xmc_form == "cross-pair" and self.weights.get("xmc", 0) > 0 and self.pairwise != "softmax":
            raise ValueError("xmc_form 'cross-pair' scores soft targets and needs the softmax pairwise loss")
        if self.cmc_context not in CMC_CONTEXTS:
            raise ValueError(f"cmc_context must be one of {CMC_CONTEXTS}, got {self.cmc_context!r}")
        if self.cmc_target not in CMC_TARGETS:
            raise ValueError(f"cmc_target must be one of {CMC_TARGETS}, got {self.cmc_target!r}")
        if self.joint_negatives not in JOINT_NEGATIVES:
            raise ValueError(f"joint_negatives must be one of {JOINT_NEGATIVES}, got {self.joint_negatives!r}")
        if self.joint_negatives == "shared_text" and self.weights.get("cmc", 0) > 0 and self.pairwise != "softmax":
            raise ValueError("joint_negatives 'shared_text' scores extra negatives and needs the softmax pairwise loss")
        if self.weights.get("quad", 0) > 0 and self.pairwise != "softmax":
            raise ValueError("the quad term scores several regions per caption and needs the softmax pairwise loss")
        if self.quad_pooling not in QUAD_POOLINGS:
            raise ValueError(f"quad_pooling must be one of {QUAD_POOLINGS}, got {self.quad_pooling!r}")
        if not (math.isfinite(self.joint_margin) and 0.0 <= self.joint_margin <= 2.0):
            raise ValueError(f"joint_margin must be in [0, 2] (a cosine difference; 0 = off), got {self.joint_margin}")
        if not 0.0 < self.cmc_fraction <= 1.0:
            raise ValueError(f"cmc_fraction must be in (0, 1], got {self.cmc_fraction}")
        if self.temperature is not None and not 0.0 < self.temperature <= 1.0:
            raise ValueError(f"temperature must be in (0, 1] (or None for a learned one), got {self.temperature}")

    @property
    def passes(self) -> set[str]:
        """Encoder passes needed by the enabled (non-zero weight) terms."""
        needs = set().union(*(_NEEDS[name] for name, w in self.weights.items() if w > 0))
        if "joint" in needs and self.joint_negatives == "shared_text":
            needs.add("joint_negative")
        return needs

    @property
    def model_settings(self) -> dict[str, float]:
        """The `OneRConfig` fields this objective scores with, set before the model is built so that the
        saved model scores as it was trained: the sigmoid loss's learned bias (`logit_bias_init`,
        SigLIP's -10) and a fixed temperature's logit scale (`logit_scale_init_value`; training
        freezes it)."""
        settings = {}
        if self.pairwise == "sigmoid":
            settings["logit_bias_init"] = SIGMOID_BIAS_INIT
        if self.temperature is not None:
            settings["logit_scale_init_value"] = math.log(1.0 / self.temperature)
        return settings

    @property
    def uses_mixup(self) -> bool:
        terms = ("xmc", "cic", "cmc") if self.cmc_target == "mixup" else ("xmc", "cic")
        return any(self.weights.get(name, 0) > 0 for name in terms)


def flag_name(setting: Field) -> str:
    """train.py's flag (without dashes) for a field of `ObjectiveConfig`."""
    return setting.metadata.get("flag") or setting.name


# ---------------------------------------------------------------------------------------------
# CMC's context
# ---------------------------------------------------------------------------------------------


def mosaic(pixel_values: torch.Tensor, return_sources: bool = False):
    """`(n, c, h, w)` -> `(n, c, h, w)`: image i at half resolution in a random quadrant of a 2x2
    mosaic whose other quadrants hold images i+1, i+2, i+3 of the batch (cyclically).

    Quadrants are numbered row-major: 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right. With
    `return_sources=True` also returns `(n, 4)` long: the batch row of the image in each quadrant.
    The quadrant comes from torch's global generator, so feature caching's replayed RNG state
    rebuilds the same mosaic. A batch of fewer than 4 images repeats images.
    """
    n, _, h, w = pixel_values.shape
    if h % 2 or w % 2:
        raise ValueError(f"a mosaic needs even image sides, got {h}x{w}")
    small = F.interpolate(pixel_values.float(), size=(h // 2, w // 2), mode="bilinear", antialias=True,
                          align_corners=False).to(pixel_values.dtype)
    own_quadrant = torch.randint(0, 4, (n,), device=pixel_values.device)
    rows = torch.arange(n, device=pixel_values.device)
    sources = torch.stack([(rows + (k - own_quadrant) % 4) % n for k in range(4)], dim=1)  # (n, 4)
    tiles = [small[sources[:, k]] for k in range(4)]  # quadrant k of every mosaic
    out = torch.cat([torch.cat(tiles[:2], dim=3), torch.cat(tiles[2:], dim=3)], dim=2)
    return (out, sources) if return_sources else out


def quadrant_patches(patches: torch.Tensor, grid: int) -> torch.Tensor:
    """`(n, grid * grid, d)` row-major patch tokens -> `(n, 4, (grid // 2) ** 2, d)`: each quadrant's
    patches (row-major inside it), in [`mosaic`]'s quadrant order (0 top-left, 1 top-right,
    2 bottom-left, 3 bottom-right)."""
    n, num_patches, d = patches.shape
    if num_patches != grid * grid:
        raise ValueError(f"{num_patches} patch tokens are not a {grid}x{grid} grid")
    if grid % 2:
        raise ValueError(f"quadrant pooling needs an even patch grid, got {grid}x{grid}")
    half = grid // 2
    blocks = patches.reshape(n, 2, half, 2, half, d)  # (n, quadrant row, row in it, quadrant column, column in it, d)
    return blocks.permute(0, 1, 3, 2, 4, 5).reshape(n, 4, half * half, d)


def quadrant_pool(patches: torch.Tensor, grid: int) -> torch.Tensor:
    """`(n, grid * grid, d)` -> `(n, 4, d)`: the mean of each quadrant's patch tokens ([`quadrant_patches`])."""
    return quadrant_patches(patches, grid).mean(dim=2)


def region_logits(
    patches: torch.Tensor, texts: torch.Tensor, logit_scale: torch.Tensor, pooling: str = "mean"
) -> torch.Tensor:
    """Scaled similarities `(r, n)` of `r` regions, each given by its projected patch tokens, to `n` texts.

    Args:
        patches: `(r, k, d)` the patch tokens of each region through the shared head.
        texts: `(n, d)` L2-normalised.
        logit_scale: scalar, log inverse temperature.
        pooling: `"mean"`: the region's embedding is the mean of its patches (CLIM's pooled region
            feature; with the linear head, the pooled global score's own form). `"text_softmax"`:
            for each text, the patches weighted by `softmax_k(t * cos(patch_k, text))` (the same
            softmax over patches as the localization heatmaps), so a region is scored by the
            patches that show what the text names (PACL, arXiv 2212.04994).
    """
    with torch.autocast(device_type=patches.device.type, enabled=False):
        scale = logit_scale.float().exp()
        patches, texts = patches.float(), texts.float()
        if pooling == "mean":
            return scale * l2_normalize(patches.mean(dim=1)) @ texts.t()
        if pooling == "text_softmax":
            unit = l2_normalize(patches)
            weights = torch.softmax(scale * torch.einsum("rkd,nd->rnk", unit, texts), dim=-1)
            pooled = l2_normalize(torch.einsum("rnk,rkd->rnd", weights, unit))
            return scale * (pooled * texts[None]).sum(-1)
        raise ValueError(f"unknown quad pooling {pooling!r}; choose one of {QUAD_POOLINGS}")


# ---------------------------------------------------------------------------------------------
# The loss from features
# ---------------------------------------------------------------------------------------------


def mixup(image: torch.Tensor, text: torch.Tensor, mix_weight: float = 0.5) -> torch.Tensor:
    """`normalize(lam * z_I + (1 - lam) * z_T)`: the common ground between the two modalities [talk]."""
    return l2_normalize(mix_weight * image + (1.0 - mix_weight) * text)


class Objective:
    """The whole loss of a batch from its features: the weighted sum of the enabled terms (see the module table).

    Two kinds of term, so that feature caching (`oner.training.step`) can score a big batch in parts:
    batch-level terms ([`batch_loss`]: every contrastive term, whose rows are scored against each
    other) need the features of the whole batch at once; per-sample terms ([`sample_sums`] and
    [`sample_loss`]: `mlm`, a mean over masked tokens) are sums over samples, computed micro-batch by
    micro-batch and divided by the count over the whole batch. `objective(features)` is both, for
    one batch.
    """

    def __init__(self, config: ObjectiveConfig):
        self.config = config

    def _pair(self, a: torch.Tensor, b: torch.Tensor, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return pairwise_loss(
            a,
            b,
            features["logit_scale"],
            kind=self.config.pairwise,
            logit_bias=features.get("logit_bias"),
            local_loss=self.config.local_loss,
        )

    def batch_loss(
        self, features: dict[str, torch.Tensor], targets: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted batch-level terms and each term's (unweighted) value.

        Args:
            features: from `oner.training.pretrainer.OneRPretrainer` for the whole (local) batch.
            targets: `image`/`text` of the EMA target encoder (no gradient) when momentum is on:
                the mixup `m` is then built from them, MoCo-style [inferred]; otherwise from `features`,
                with gradient through both sides.
        """
        w = self.config.weights
        parts: dict[str, torch.Tensor] = {}
        z_i, z_t = features.get("image"), features.get("text")
        if self.config.uses_mixup:
            source = targets if targets is not None else features
            m = mixup(source["image"], source["text"], self.config.mix_weight)
        if w.get("itc", 0) > 0:
            parts["itc"] = self._pair(z_i, z_t, features)
        if w.get("xmc", 0) > 0:
            if self.config.xmc_form == "cross-pair":
                parts["xmc"] = self.cross_pair_xmc(z_i, z_t, features["logit_scale"])
            else:
                parts["xmc"] = (self._pair(z_i, m, features) + self._pair(z_t, m, features)) / 2
        if w.get("cic", 0) > 0:
            parts["cic"] = self._pair(features["cross"], m, features)
        if w.get("cmc", 0) > 0:
            parts.update(self.cmc(features, m if self.config.cmc_target == "mixup" else (targets or features)["image"]))
        if w.get("quad", 0) > 0:
            logits = region_logits(features["quad"], z_t, features["logit_scale"], self.config.quad_pooling)
            parts["quad"] = region_text_loss(logits, features["quad_sources"])
        total = sum(w[name] * parts[name] for name in w if name in parts)
        if z_i is not None and z_t is not None:
            parts.update(modality_gap(z_i, z_t))  # logged, never weighted
        return total, parts

    def cmc(self, features: dict[str, torch.Tensor], target: torch.Tensor) -> dict[str, torch.Tensor]:
        """CMC against `target` `(n, d)` (the mixups or the images of the batch), as the config says.

        Returns `cmc` (with the margin hinge added when `joint_margin > 0`) and, logged only,
        `joint/image_gain`: the mean of `cos(z_J, t) - cos(z_T, t)`, how much nearer its target the
        joint embedding is than the caption alone (0 or less: the image adds nothing).
        """
        rows = features.get("joint_rows")  # only some pairs got the joint pass when cmc_fraction < 1
        joint = features["joint"]
        target = target if rows is None else target[rows]
        if "joint_negative" in features:
            loss = shared_text_loss(joint, features["joint_negative"], target, features["logit_scale"])
        else:
            loss = self._pair(joint, target, features)
        out = {}
        if "text" in features:
            text = features["text"] if rows is None else features["text"][rows]
            gain = (joint * target).sum(-1) - (text * target).sum(-1).detach()  # the caption's side: a reference only
            out["joint/image_gain"] = gain.detach().mean()
            if self.config.joint_margin > 0:
                hinge = F.relu(self.config.joint_margin - gain).mean()
                out["joint/margin_hinge"] = hinge.detach()
                loss = loss + hinge
        out["cmc"] = loss
        return out

    def cross_pair_xmc(self, z_i: torch.Tensor, z_t: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        """XMC with the mixup across pairs (see `ObjectiveConfig.xmc_form`), over the global batch.

        `m_i = normalize(lam * z_I[i] + (1 - lam) * z_T[i+1])`, scored against every image and every
        text with targets `lam` on column i and `1 - lam` on column i+1: the image half of `m_i`
        points at image i directly and at text i only through alignment; the text half points at
        text i+1 directly and at image i+1 only through alignment.
        """
        all_i, all_t = gather_with_grad(z_i), gather_with_grad(z_t)
        lam = self.config.mix_weight
        m = mixup(all_i, all_t.roll(-1, dims=0), lam)
        n = len(all_i)
        targets = lam * torch.eye(n, device=m.device) + (1 - lam) * torch.eye(n, device=m.device).roll(1, dims=1)
        return (soft_target_loss(m, all_i, targets, logit_scale) + soft_target_loss(m, all_t, targets, logit_scale)) / 2

    def sample_sums(self, features: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per-sample terms of one micro-batch as `term -> (sum, count)`: for `mlm`, the token
        cross-entropy summed over its masked tokens `(m, vocab)` logits and their number."""
        sums = {}
        if self.config.weights.get("mlm", 0) > 0 and "mlm_logits" in features:
            labels = features["mlm_labels"]
            sums["mlm"] = (F.cross_entropy(features["mlm_logits"].float(), labels, reduction="sum"), labels.new_tensor(len(labels)))
        return sums

    def sample_loss(
        self, sums: dict[str, tuple[torch.Tensor, torch.Tensor]], counts: dict[str, int]
    ) -> tuple[torch.Tensor | float, dict[str, torch.Tensor]]:
        """Weighted per-sample terms of one micro-batch, each sum divided by `counts[term]`, the count
        over the whole batch (its micro-batches together); and each term's unweighted share."""
        parts = {name: total / max(int(counts[name]), 1) for name, (total, _) in sums.items()}
        return sum((self.config.weights[name] * value for name, value in parts.items()), 0.0), parts

    @staticmethod
    def sample_counts(sums_of_micro_batches: list[dict]) -> dict[str, int]:
        """`term -> count` over the micro-batches of one batch, from their [`sample_sums`]."""
        names = {name for sums in sums_of_micro_batches for name in sums}
        return {name: sum(int(sums[name][1]) for sums in sums_of_micro_batches if name in sums) for name in names}

    def __call__(
        self, features: dict[str, torch.Tensor], targets: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss of one batch from its features (no accumulation) and the unweighted terms."""
        total, parts = self.batch_loss(features, targets)
        sums = self.sample_sums(features)
        sample_total, sample_parts = self.sample_loss(sums, self.sample_counts([sums]))
        return total + sample_total, {**parts, **sample_parts}


@torch.no_grad()
def modality_gap(z_i: torch.Tensor, z_t: torch.Tensor) -> dict[str, torch.Tensor]:
    """How far apart the two modalities sit in the shared space (logged during training).

    - `gap/centroid_distance`: `|mean(z_I) - mean(z_T)|` (Liang et al. 2022's modality gap);
    - `gap/modality_probe_acc`: training accuracy of a linear classifier (Fisher's discriminant,
      closed form, ridge 1e-3) that tells an image embedding from a text embedding in the batch:
      0.5 = one mixed space, 1.0 = separable modalities (the "each modality matches its own half"
      shortcut needs them separable);
    - `gap/pair_cosine`: mean cosine between an image and its own caption.
    """
    z_i, z_t = z_i.float(), z_t.float()
    c_i, c_t = z_i.mean(0), z_t.mean(0)
    within = torch.cat([z_i - c_i, z_t - c_t]).t().cov(correction=0) if len(z_i) > 1 else None
    eye = torch.eye(z_i.shape[1], device=z_i.device)
    direction = torch.linalg.solve((within if within is not None else 0) + 1e-3 * eye, c_i - c_t)
    threshold = direction @ (c_i + c_t) / 2
    correct = (z_i @ direction > threshold).float().sum() + (z_t @ direction <= threshold).float().sum()
    return {
        "gap/centroid_distance": (c_i - c_t).norm(),
        "gap/modality_probe_acc": correct / (len(z_i) + len(z_t)),
        "gap/pair_cosine": (z_i * z_t).sum(-1).mean(),
    }
