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
| `cmc` | `P(z_J, m)`, `z_J` = the joint [I;T] pass with full attention | [talk], form [inferred] |
| `mlm` | cross-entropy on whole-word-masked caption tokens, joint pass with the image | [talk]/[code], form [inferred] |

The total is `sum_k w_k * L_k`. The model stays pure (`modeling_oner` has no loss heads): the MLM
head lives in [`OneRPretrainer`], a training-side wrapper that is what DDP wraps; the SigLIP bias of the
sigmoid loss is the model's own `logit_bias` (saved with it, added to its scores).

The training loop uses three pieces so that feature caching (GradCache) can split them:
[`OneRPretrainer.forward`] (features of one micro-batch), [`Objective.contrastive_loss`]
(the batch-level terms, from features of the whole batch) and the per-sample MLM sums.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .losses import PAIRWISE_KINDS, gather_with_grad, pairwise_loss, soft_target_loss

TERMS = ("itc", "xmc", "cic", "cmc", "mlm")
# How XMC builds its mixup (docs/method.md): the paper's "same-pair" mix of image i and text i, or
# our "cross-pair" mix of image i and the text of ANOTHER pair, scored with soft targets.
XMC_FORMS = ("same-pair", "cross-pair")
# What CMC's joint pass sees beside the caption: its own image ("pair", the paper's joint sequence),
# or a 2x2 mosaic of its image and three other images of the batch ("mosaic", ours).
CMC_CONTEXTS = ("pair", "mosaic")
# Which encoder passes each term needs: image-only, text-only, joint full attention, joint
# cross-modal attention, joint with masked text.
_NEEDS = {
    "itc": {"image", "text"},
    "xmc": {"image", "text"},
    "cic": {"image", "text", "cross"},
    "cmc": {"image", "text", "joint"},
    "mlm": {"mlm"},
}
# The paper's final recipe as the talk describes it (XMC, then CMC for the joint sequence).
FULL_OBJECTIVE = "xmc+cmc"
# train.py's default terms, decided by the ablation at equal wall-clock (docs/benchmarks.md), with
# train.py's defaults --xmc_form cross-pair --cmc_context mosaic --cmc_fraction 0.5: cross-pair XMC
# beat naive ITC on retrieval and zero-shot classification (same-pair XMC, the shortcut, aligned
# nothing), and mosaic CMC trains the joint image+text queries.
DEFAULT_OBJECTIVE = "xmc+cmc"


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
        raise ValueError(f"empty objective {spec!r}; choose terms from {', '.join(TERMS)}, e.g. {FULL_OBJECTIVE}")
    if all(name == "mlm" for name in weights):
        raise ValueError("mlm alone trains no shared embedding space; add a contrastive term, e.g. xmc+cmc+mlm")
    return weights


@dataclass
class ObjectiveConfig:
    """Settings of the objective. Fields marked [inferred] are our reading of the method.

    Args:
        weights: term -> weight, from [`parse_objective`].
        pairwise: `"softmax"` (InfoNCE, CLIP) or `"sigmoid"` (SigLIP) form of every pairwise term.
        local_loss: score local rows against gathered columns only (open_clip's `--local-loss`).
        mix_weight: `lam` of the mixup `lam * z_I + (1 - lam) * z_T`; the talk says "average" [inferred 0.5].
        mlm_probability: fraction of caption WORDS masked for `mlm` (15%, as the first author's code) [code].
        momentum: EMA momentum of a target encoder that produces the mixup targets `m` (without
            gradient), MoCo v3 style; 0 turns it off (the default) [inferred].
        sigmoid_bias_init: SigLIP's initial logit bias (-10) [SigLIP].
        xmc_form: `"same-pair"` (`m_i` mixes image i and text i; each modality can match "its own
            half" of `m` without any cross-modal alignment, see docs/method.md) or `"cross-pair"`
            (ours: `m_i` mixes image i with text i+1 of the global batch and is scored against
            the images and against the texts with soft targets, `lam` on pair i and `1 - lam` on
            pair i+1, so half of every target is reachable only through cross-modal alignment).
        cmc_fraction: fraction of each micro-batch (its first rows) that gets the joint pass of
            `cmc`, trading the joint space's training for speed (1 = every row) [ours].
        temperature: a FIXED temperature (MoCo v3 uses 0.2) instead of the learned logit scale;
            None keeps it learned (CLIP) [inferred].
        cmc_context: the image of CMC's joint pass. `"pair"`: the pair's own image. `"mosaic"` (ours):
            a 2x2 mosaic of the pair's image (in a random quadrant) and three other images of the
            batch, each at half resolution, still contrasted with the pair's own mixup, so the joint
            pass must find the object the caption names among distractors (what a joint image+text
            query about one object in a scene needs).
    """

    weights: dict[str, float] = field(default_factory=lambda: parse_objective(DEFAULT_OBJECTIVE))
    pairwise: str = "softmax"
    local_loss: bool = False
    mix_weight: float = 0.5
    mlm_probability: float = 0.15
    momentum: float = 0.0
    sigmoid_bias_init: float = -10.0
    xmc_form: str = "same-pair"
    cmc_fraction: float = 1.0
    temperature: float | None = None
    cmc_context: str = "pair"

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
        if self.xmc_form == "cross-pair" and self.pairwise != "softmax":
            raise ValueError("xmc_form 'cross-pair' scores soft targets and needs the softmax pairwise loss")
        if self.cmc_context not in CMC_CONTEXTS:
            raise ValueError(f"cmc_context must be one of {CMC_CONTEXTS}, got {self.cmc_context!r}")
        if not 0.0 < self.cmc_fraction <= 1.0:
            raise ValueError(f"cmc_fraction must be in (0, 1], got {self.cmc_fraction}")
        if self.temperature is not None and not 0.0 < self.temperature <= 1.0:
            raise ValueError(f"temperature must be in (0, 1] (or None for a learned one), got {self.temperature}")

    @property
    def passes(self) -> set[str]:
        """Encoder passes needed by the enabled (non-zero weight) terms."""
        return set().union(*(_NEEDS[name] for name, w in self.weights.items() if w > 0))

    @property
    def uses_mixup(self) -> bool:
        return any(self.weights.get(name, 0) > 0 for name in ("xmc", "cic", "cmc"))


# ---------------------------------------------------------------------------------------------
# Whole-word masking and the MLM head
# ---------------------------------------------------------------------------------------------


def subword_table(tokenizer) -> torch.Tensor:
    """`(vocab,)` bool: True for WordPiece continuation pieces (`##...`), which belong to the previous word."""
    vocab = tokenizer.get_vocab()
    table = torch.zeros(max(vocab.values()) + 1, dtype=torch.bool)
    for token, index in vocab.items():
        if token.startswith("##"):
            table[index] = True
    return table


def whole_word_mask(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    is_subword: torch.Tensor,
    mask_token_id: int,
    probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace every piece of randomly chosen WORDS by [MASK] (BERT's whole-word masking).

    Each word is masked with `probability`; every caption gets at least one masked word, so every
    row contributes to the loss. Masked pieces become [MASK] (no 80/10/10 split: the first
    author's augmentation masks with [MASK] only [code, inferred]).

    Args:
        input_ids, attention_mask: `(batch, length)`.
        is_subword: `(vocab,)` bool from [`subword_table`].

    Returns:
        `masked_ids` `(batch, length)` and `labels` `(batch, length)`: the original id where masked, -100 elsewhere.
    """
    real = attention_mask.bool()
    starts = real & ~is_subword.to(input_ids.device)[input_ids]
    starts[:, 0] |= real[:, 0]  # a caption that begins with a ## piece still begins a word
    word_index = torch.cumsum(starts.long(), dim=1) - 1  # word of each token, -1 before the first
    n_words = int(starts.sum(dim=1).max())
    draws = torch.rand(input_ids.shape[0], max(n_words, 1), generator=generator, device=input_ids.device)
    chosen = draws < probability
    # At least one word per caption: the word with the smallest draw among the real words.
    words_per_row = starts.sum(dim=1)
    valid_word = torch.arange(chosen.shape[1], device=input_ids.device)[None] < words_per_row[:, None]
    first = torch.where(valid_word, draws, torch.full_like(draws, 2.0)).argmin(dim=1)
    chosen[torch.arange(len(chosen), device=input_ids.device), first] = True
    chosen &= valid_word
    masked = real & torch.gather(chosen, 1, word_index.clamp(min=0)) & (word_index >= 0)
    labels = torch.where(masked, input_ids, torch.full_like(input_ids, -100))
    masked_ids = torch.where(masked, torch.full_like(input_ids, mask_token_id), input_ids)
    return masked_ids, labels


class MLMHead(nn.Module):
    """BERT's prediction head: dense -> GELU -> LayerNorm -> decoder tied to the token embedding.

    Lives on the training side only; it is not saved with the model folder.
    """

    def __init__(self, hidden_size: int, token_embedding: nn.Embedding, eps: float = 1e-6):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.token_embedding = token_embedding  # tied: no extra vocab-sized matrix
        self.bias = nn.Parameter(torch.zeros(token_embedding.num_embeddings))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """`(n, hidden)` -> `(n, vocab)` logits."""
        return self.norm(F.gelu(self.dense(hidden))) @ self.token_embedding.weight.t() + self.bias


# ---------------------------------------------------------------------------------------------
# The training-side wrapper: what DDP wraps and what each micro-batch goes through
# ---------------------------------------------------------------------------------------------


def _normalize(x: torch.Tensor) -> torch.Tensor:
    # fp32: the pairwise softmax is sensitive to rounding under bf16 autocast.
    return F.normalize(x.float(), dim=-1)


class OneRPretrainer(nn.Module):
    """A `OneRModel` plus the training-only parts (MLM head); one forward per micro-batch.

    `forward(input_ids, attention_mask, pixel_values, mlm_input_ids=None, mlm_labels=None)`
    returns a dict:

    - `image`, `text`: `(n, projection_dim)` normalised single-modality embeddings;
    - `joint` / `cross`: `(n, projection_dim)` normalised embeddings of the joint [I;T] pass with
      full / cross-modal attention (when `cmc` / `cic` is on);
    - `mlm_sum`, `mlm_count`: summed token cross-entropy and the number of masked tokens (when `mlm` is on);
    - `logit_scale` (and `logit_bias` for the sigmoid loss): returned as outputs so that their
      gradients flow through DDP's graph.
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
            # The sigmoid loss's bias belongs to the model (saved with it, used by its scores).
            model.config.logit_bias_init = float(config.sigmoid_bias_init)
            model.logit_bias = nn.Parameter(torch.tensor(float(config.sigmoid_bias_init)))
        if config.temperature is not None:
            # Saved with the model, so that its logits are those it was trained with.
            with torch.no_grad():
                model.logit_scale.fill_(math.log(1.0 / config.temperature))
            model.logit_scale.requires_grad_(False)

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
        joint_pixels = mosaic(pixel_values) if self.objective.cmc_context == "mosaic" and "joint" in self.passes else None
        out = encode_pairs(self.model, input_ids, attention_mask, pixel_values, self.passes, joint_rows, joint_pixels)
        if joint_rows is not None and "joint" in out:
            out["joint_rows"] = torch.arange(joint_rows, device=input_ids.device)  # which pairs' mixups are CMC's targets
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
            logits = self.mlm_head(text_hidden[where]).float()
            out["mlm_sum"] = F.cross_entropy(logits, mlm_labels[where], reduction="sum")
            out["mlm_count"] = where.sum()
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
    """Normalised embeddings of the requested passes (`image`, `text`, `joint`, `cross`), each `(n, d)`;
    the `joint` pass (full attention) only of the first `joint_rows` pairs when given, and on
    `joint_pixels` (e.g. a [`mosaic`]) instead of `pixel_values` when given."""
    # `model.embed` returns tensors under every transformers version; the public `get_*_features`
    # build output objects under transformers 5, which the hot path has no use for.
    out: dict[str, torch.Tensor] = {}
    if "image" in passes:
        out["image"] = _normalize(model.embed(pixel_values=pixel_values))
    if "text" in passes:
        out["text"] = _normalize(model.embed(input_ids=input_ids, attention_mask=attention_mask))
    for name, cross in (("joint", False), ("cross", True)):
        if name in passes:
            rows = slice(None) if cross or joint_rows is None else slice(0, joint_rows)
            pixels = joint_pixels if name == "joint" and joint_pixels is not None else pixel_values
            out[name] = _normalize(
                model.embed(
                    input_ids=input_ids[rows],
                    pixel_values=pixels[rows],
                    attention_mask=attention_mask[rows],
                    cross_modal_attention=cross,
                )
            )
    return out


def mosaic(pixel_values: torch.Tensor) -> torch.Tensor:
    """`(n, c, h, w)` -> `(n, c, h, w)`: image i at half resolution in a random quadrant of a 2x2
    mosaic whose other quadrants hold images i+1, i+2, i+3 of the batch (cyclically).

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
    tiles = [small[(rows + (k - own_quadrant) % 4) % n] for k in range(4)]  # quadrant k of every mosaic
    return torch.cat([torch.cat(tiles[:2], dim=3), torch.cat(tiles[2:], dim=3)], dim=2)


# ---------------------------------------------------------------------------------------------
# The loss from features
# ---------------------------------------------------------------------------------------------


def mixup(image: torch.Tensor, text: torch.Tensor, mix_weight: float = 0.5) -> torch.Tensor:
    """`normalize(lam * z_I + (1 - lam) * z_T)`: the common ground between the two modalities [talk]."""
    return _normalize(mix_weight * image + (1.0 - mix_weight) * text)


class Objective:
    """Computes the weighted sum of the enabled terms from features (see the module table)."""

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

    def contrastive_loss(
        self, features: dict[str, torch.Tensor], targets: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted batch-level terms and each term's (unweighted) value.

        Args:
            features: from [`OneRPretrainer.forward`] for the whole (local) batch.
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
            rows = features.get("joint_rows")  # only some pairs got the joint pass when cmc_fraction < 1
            parts["cmc"] = self._pair(features["joint"], m if rows is None else m[rows], features)
        total = sum(w[name] * parts[name] for name in w if name in parts)
        if z_i is not None and z_t is not None:
            parts.update(modality_gap(z_i, z_t))  # logged, never weighted
        return total, parts

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

    def mlm_loss(self, mlm_sum: torch.Tensor, mlm_count: torch.Tensor | int) -> torch.Tensor:
        """Weighted mean token cross-entropy; `mlm_count` is the masked-token count of the whole local batch."""
        return self.config.weights.get("mlm", 0.0) * mlm_sum / max(int(mlm_count), 1)

    def __call__(
        self, features: dict[str, torch.Tensor], targets: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss of one batch from its features (no accumulation) and the unweighted terms."""
        total, parts = self.contrastive_loss(features, targets)
        if "mlm_sum" in features:
            parts["mlm"] = features["mlm_sum"] / max(int(features["mlm_count"]), 1)
            total = total + self.mlm_loss(features["mlm_sum"], features["mlm_count"])
        return total, parts


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


# ---------------------------------------------------------------------------------------------
# Momentum (EMA) target encoder
# ---------------------------------------------------------------------------------------------


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
