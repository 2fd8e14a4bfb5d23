"""OneR: one transformer and one projection head for images, texts and image+text sequences.

Jang et al., "Unifying Vision-Language Representation Space with Single-tower Transformer",
AAAI 2023 (arXiv 2211.11153). Only the input embedders are modality-specific: a patch embedding
and a token embedding, each with its own position embeddings. Everything after them (the
transformer, the pooling ([CLS] or token mean), the projection head, the logit scale) is shared, so an image, a
caption and an image+caption sequence all land in one space.

The model stays pure: it encodes, projects and (for CLIP compatibility) scores. The training
objectives (XMC, CIC, CMC, ...) live in `oner/objectives.py`.

This file is shipped as transformers remote code: it imports only torch, transformers and its
sibling `configuration_oner` (see "Remote code" in docs/method.md).
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from transformers import PreTrainedModel
from transformers import __version__ as TRANSFORMERS_VERSION
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput

from .configuration_oner import OneRConfig

# Modality ids of the joint sequence's parts (0 is the shared [CLS]); used to build the CIC attention mask.
CLS_MODALITY, IMAGE_MODALITY, TEXT_MODALITY = 0, 1, 2


@dataclass
class OneROutput(ModelOutput):
    """Output of [`OneRModel.forward`], with `CLIPModel`'s field names.

    Args:
        loss: symmetric InfoNCE between images and texts (naive ITC), when `return_loss=True`.
        logits_per_image: `(n_images, n_texts)` scaled cosine similarities.
        logits_per_text: `(n_texts, n_images)`, the transpose.
        text_embeds: `(n_texts, projection_dim)` L2-normalised text embeddings.
        image_embeds: `(n_images, projection_dim)` L2-normalised image embeddings.
        text_model_output: the shared encoder's output on the text-only sequences.
        vision_model_output: the shared encoder's output on the image-only sequences.
    """

    loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_model_output: BaseModelOutputWithPooling | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(
            self[k] if k not in ("text_model_output", "vision_model_output") else getattr(self, k).to_tuple()
            for k in self.keys()
        )


def l2_normalize(embeddings: torch.Tensor) -> torch.Tensor:
    """Unit-length rows, computed in fp32: the contrastive softmax is sensitive to rounding under
    bf16/fp16 autocast. The project's one normalisation (the model's scores, the training features,
    the evaluation's embeddings all use it)."""
    return F.normalize(embeddings.float(), dim=-1)


def contrastive_loss(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each row against the diagonal (the matching pair)."""
    return F.cross_entropy(logits, torch.arange(len(logits), device=logits.device))


def symmetric_contrastive_loss(logits_per_text: torch.Tensor, logits_per_image: torch.Tensor) -> torch.Tensor:
    """CLIP's loss on `(n, n)` logits with the matching pairs on the diagonal: the mean of the
    text-to-image and the image-to-text cross-entropies (the naive ITC of `forward(return_loss=True)`).

    `logits_per_image` is `logits_per_text.t()`, taken as given rather than transposed again here:
    the extra autograd node would change the order in which the two gradients are summed, and so
    the last bits of the logit bias's gradient.
    """
    return (contrastive_loss(logits_per_text) + contrastive_loss(logits_per_image)) / 2


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain attention. `attention_mask` is boolean, broadcastable to `(batch, heads, q, k)`, True = attend.

    Shapes: `query`/`key`/`value` `(batch, heads, seq, head_dim)` -> output `(batch, seq, heads, head_dim)`
    and weights `(batch, heads, seq, seq)`. The scale is applied to the query (`seq / head_dim` times
    fewer products than on the scores), and the softmax runs in the scores' dtype: torch's CPU and CUDA
    kernels accumulate bf16/fp16 in fp32 anyway, and an fp32 copy of the scores and its cast back
    cost a CPU bf16 step more than the softmax itself (docs/benchmarks.md, "Where a step's time goes").
    """
    attn_weights = torch.matmul(query * scaling, key.transpose(-1, -2))
    if attention_mask is not None:
        attn_weights = attn_weights.masked_fill(~attention_mask, torch.finfo(attn_weights.dtype).min)
    attn_weights = F.softmax(attn_weights, dim=-1)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


def _attention_function(implementation: str | None) -> Callable:
    if implementation in (None, "eager"):
        return eager_attention_forward
    if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):  # transformers 5
        return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
    return ALL_ATTENTION_FUNCTIONS[implementation]  # transformers 4.57


class OneREmbeddings(nn.Module):
    """The only modality-specific part of OneR: turns pixels and token ids into token vectors.

    Images become `num_patches` patch tokens, texts become one token per id; both get their own
    position embeddings and, if `config.use_modality_embeddings`, a learned modality embedding.
    A single learned [CLS] vector, shared by every input kind, is prepended by [`OneRModel`].
    """

    def __init__(self, config: OneRConfig):
        super().__init__()
        self.config = config
        self.patch_size = config.patch_size
        self.grid_size = config.image_size // config.patch_size
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.image_position_embedding = nn.Parameter(torch.empty(1, config.num_patches, config.hidden_size))
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.text_position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.cls_embedding = nn.Parameter(torch.empty(1, 1, config.hidden_size))
        self.modality_embedding = nn.Embedding(3, config.hidden_size) if config.use_modality_embeddings else None

    def _image_positions(self, height: int, width: int) -> torch.Tensor:
        """Position embeddings for a `height x width` patch grid, bicubically resized if it differs."""
        if height == width == self.grid_size:
            return self.image_position_embedding
        grid = self.image_position_embedding.reshape(1, self.grid_size, self.grid_size, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(height, width), mode="bicubic", align_corners=False)
        return grid.to(self.image_position_embedding.dtype).permute(0, 2, 3, 1).reshape(1, height * width, -1)

    def embed_image(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """`(batch, channels, height, width)` pixels -> `(batch, num_patches, hidden_size)` patch tokens."""
        _, _, height, width = pixel_values.shape
        if not interpolate_pos_encoding and (height != self.config.image_size or width != self.config.image_size):
            raise ValueError(
                f"pixel_values are {height}x{width} but the model expects {self.config.image_size}x"
                f"{self.config.image_size}; resize them (OneRProcessor does) or pass interpolate_pos_encoding=True"
            )
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"pixel_values {height}x{width} are not divisible by patch_size {self.patch_size}")
        weight_dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(weight_dtype)).flatten(2).transpose(1, 2)
        embeddings = patches + self._image_positions(height // self.patch_size, width // self.patch_size)
        if self.modality_embedding is not None:
            embeddings = embeddings + self.modality_embedding.weight[IMAGE_MODALITY]
        return embeddings

    def embed_text(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """`(batch, length)` token ids -> `(batch, length, hidden_size)` text tokens."""
        if position_ids is None:
            # Computed on the fly: a non-persistent buffer would come back uninitialised from
            # transformers 5's meta-device loading.
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        embeddings = self.token_embedding(input_ids) + self.text_position_embedding(position_ids)
        if self.modality_embedding is not None:
            embeddings = embeddings + self.modality_embedding.weight[TEXT_MODALITY]
        return embeddings

    def cls(self, batch_size: int) -> torch.Tensor:
        """The shared [CLS] token, `(batch, 1, hidden_size)`."""
        cls = self.cls_embedding
        if self.modality_embedding is not None:
            cls = cls + self.modality_embedding.weight[CLS_MODALITY]
        return cls.expand(batch_size, -1, -1)


class OneRAttention(nn.Module):
    """Multi-head self-attention over a sequence of any mix of modalities."""

    def __init__(self, config: OneRConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        # transformers' SDPA wrapper reads this and would otherwise make the attention causal.
        self.is_causal = False
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`(batch, seq, hidden)` -> `(batch, seq, hidden)` and the attention weights (eager only)."""
        batch, seq, _ = hidden_states.shape
        # One fused projection: a single matmul is faster than three on small CPU batches.
        qkv = self.qkv(hidden_states).view(batch, seq, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)
        attention = _attention_function(self.config._attn_implementation)
        attn_output, attn_weights = attention(
            self,
            query,
            key,
            value,
            attention_mask,
            is_causal=False,
            scaling=self.scaling,
            dropout=self.dropout if self.training else 0.0,
        )
        return self.out_proj(attn_output.reshape(batch, seq, -1)), attn_weights


class OneRMLP(nn.Module):
    def __init__(self, config: OneRConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden_states)))


class OneREncoderLayer(GradientCheckpointingLayer):
    """Pre-norm transformer block, shared by all modalities."""

    def __init__(self, config: OneRConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = OneRAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = OneRMLP(config)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn_output, attn_weights = self.self_attn(self.layer_norm1(hidden_states), attention_mask)
        hidden_states = hidden_states + attn_output
        hidden_states = hidden_states + self.mlp(self.layer_norm2(hidden_states))
        return hidden_states, attn_weights


class OneREncoder(nn.Module):
    """The ONE transformer: a stack of [`OneREncoderLayer`] used for every input kind."""

    def __init__(self, config: OneRConfig):
        super().__init__()
        self.layers = nn.ModuleList([OneREncoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> BaseModelOutput:
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layers:
            hidden_states, attn_weights = layer(hidden_states, attention_mask)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (attn_weights,)
        return BaseModelOutput(
            last_hidden_state=hidden_states, hidden_states=all_hidden_states, attentions=all_attentions
        )


class OneRProjectionHead(nn.Module):
    """The ONE projection head into the shared space, applied to [CLS], patch and word tokens alike."""

    def __init__(self, config: OneRConfig):
        super().__init__()
        if config.projection_head == "mlp":
            self.proj = nn.Sequential(
                nn.Linear(config.hidden_size, config.hidden_size),
                nn.GELU(),
                nn.Linear(config.hidden_size, config.projection_dim, bias=False),
            )
        else:
            self.proj = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden_states)


# ---------------------------------------------------------------------------- input checks
# Plain functions of the inputs and the few config numbers they need, so each check can be read and
# tested on its own. They raise before the transformer runs, with a message that says what to change.


def check_input_kinds(input_ids: Any, pixel_values: Any, cross_modal_attention: bool) -> None:
    """Checks that there is something to encode, and both parts when the CIC mask is asked for."""
    if input_ids is None and pixel_values is None:
        raise ValueError("pass pixel_values, input_ids or both")
    if cross_modal_attention and (input_ids is None or pixel_values is None):
        raise ValueError("cross_modal_attention needs a joint input: pass both pixel_values and input_ids")


def check_pixel_values(pixel_values: Any, num_channels: int) -> None:
    """Checks that `pixel_values` is a non-empty `(batch, num_channels, height, width)` tensor.

    The image size is checked by [`OneREmbeddings.embed_image`], which knows about
    `interpolate_pos_encoding`.
    """
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
    if pixel_values.ndim != 4:
        raise ValueError(
            f"pixel_values must have shape (batch, channels, height, width), got {tuple(pixel_values.shape)}"
        )
    if pixel_values.shape[0] == 0:
        raise ValueError("pixel_values is an empty batch")
    if pixel_values.shape[1] != num_channels:
        raise ValueError(f"pixel_values have {pixel_values.shape[1]} channels but the model expects {num_channels}")


def check_text_inputs(input_ids: Any, attention_mask: torch.Tensor | None, max_positions: int) -> None:
    """Checks `input_ids` `(batch, length)` integer ids, at most `max_positions` long, and
    `attention_mask` (if given) of the same shape with at least one real token in every row."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.ndim != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must have shape (batch, length) with both > 0, got {tuple(input_ids.shape)}")
    if input_ids.dtype.is_floating_point:
        raise TypeError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
    if input_ids.shape[1] > max_positions:
        raise ValueError(
            f"text is {input_ids.shape[1]} tokens long but the model has {max_positions} "
            "text positions; truncate it (OneRProcessor does with truncation=True)"
        )
    if attention_mask is None:
        return
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask {tuple(attention_mask.shape)} does not match input_ids {tuple(input_ids.shape)}"
        )
    empty = (attention_mask == 0).all(dim=1).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"texts at batch positions {empty} have no tokens (all-zero attention_mask)")


def check_loss_pairs(image_embeds: torch.Tensor | None, text_embeds: torch.Tensor | None) -> None:
    """`return_loss` pairs image i with text i, so it needs both embeddings, `(n, projection_dim)`
    each with the same `n` (None: that input was not given)."""
    if image_embeds is None or text_embeds is None:
        raise ValueError("return_loss needs both pixel_values and input_ids")
    if len(image_embeds) != len(text_embeds):
        raise ValueError(
            f"return_loss needs one text per image: got {len(image_embeds)} images and {len(text_embeds)} texts"
        )


def check_one_text_per_image(num_images: int, num_texts: int) -> None:
    """A joint sequence pairs image i with text i, so both batches must have the same size."""
    if num_images != num_texts:
        raise ValueError(
            f"a joint image+text input needs one text per image: got {num_images} images and {num_texts} texts"
        )


# ---------------------------------------------------------------------------- attention masks
# Boolean, True = may attend, broadcastable to `(batch, heads, query, key)`: the form that both
# `eager_attention_forward` and torch's SDPA take, so no additive float mask is built (and
# transformers 5 no longer has `modeling_attn_mask_utils` to build one).


def sequence_modalities(seq_len: int, num_image_tokens: int, device: torch.device) -> torch.Tensor:
    """The modality id of each position of `[CLS] + patches + words`, `(seq_len,)`:
    `CLS_MODALITY` at 0, `IMAGE_MODALITY` for the next `num_image_tokens`, `TEXT_MODALITY` after."""
    modality = torch.full((seq_len,), TEXT_MODALITY, device=device)
    modality[0] = CLS_MODALITY
    modality[1 : 1 + num_image_tokens] = IMAGE_MODALITY
    return modality


def cross_modal_attention_mask(key_mask: torch.Tensor, num_image_tokens: int) -> torch.Tensor:
    """The CIC pass's mask, `(batch, 1, seq, seq)`: each modality attends only to the other; [CLS] to all.

    `key_mask` `(batch, seq)` is True for [CLS] and every non-padding token; padding is never
    attended. Patch and word queries do not read [CLS] either.
    """
    modality = sequence_modalities(key_mask.shape[1], num_image_tokens, key_mask.device)
    is_cls_query = modality[:, None] == CLS_MODALITY
    other_modality = (modality[:, None] != modality[None, :]) & (modality[None, :] != CLS_MODALITY)
    allowed = is_cls_query | other_modality  # (seq, seq): query x key
    return allowed[None, None] & key_mask[:, None, None, :]


def encoder_attention_mask(
    key_mask: torch.Tensor, num_image_tokens: int, cross_modal_attention: bool
) -> torch.Tensor | None:
    """The mask the encoder gets for a `[CLS] + patches + words` sequence with key mask `(batch, seq)`.

    Returns `cross_modal_attention_mask` `(batch, 1, seq, seq)` for the CIC pass; otherwise
    `(batch, 1, 1, seq)` hiding the padding from every query, or None when there is no padding,
    which lets SDPA pick its fastest kernel.
    """
    if cross_modal_attention:
        return cross_modal_attention_mask(key_mask, num_image_tokens)
    if key_mask.all():
        return None
    return key_mask[:, None, None, :]


# ---------------------------------------------------------------------------- pooling


def masked_mean(tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean of `tokens` `(batch, n, hidden)` over the tokens whose weight `(batch, n)` is 1 (0 for
    padding): `(batch, hidden)`. A row without any such token gives zeros instead of NaN."""
    weights = weights[..., None]
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


def modality_balanced_mean(tokens: torch.Tensor, token_mask: torch.Tensor, num_image_tokens: int) -> torch.Tensor:
    """`tokens` `(batch, n, hidden)`, a sequence without its [CLS] -> `(batch, hidden)`, the mean of
    its non-padding tokens.

    `token_mask` `(batch, n)` is True for non-padding tokens; the first `num_image_tokens` tokens
    are patches, the rest words. With both, the result is the average of the patches' mean and the
    words' mean, so a joint sequence weighs its image and its text equally (as the mixup it is
    trained towards does) instead of by token count.
    """
    weights = token_mask.to(tokens.dtype)
    spans = [slice(0, num_image_tokens), slice(num_image_tokens, None)] if num_image_tokens else [slice(None)]
    means = [masked_mean(tokens[:, span], weights[:, span]) for span in spans if tokens[:, span].shape[1]]
    return torch.stack(means).mean(dim=0)


def pool_sequence(
    last_hidden_state: torch.Tensor, key_mask: torch.Tensor, pooling: str, num_image_tokens: int = 0
) -> torch.Tensor:
    """One vector per sequence: `(batch, seq, hidden)` -> `(batch, hidden)`.

    Args:
        last_hidden_state: the encoder's output `[CLS] + patches + words` after the final LayerNorm.
        key_mask: `(batch, seq)`, True for [CLS] (position 0) and every non-padding token.
        pooling: `"cls"` (the [CLS] output), `"mean"` ([`modality_balanced_mean`] of the other
            tokens) or `"cls+mean"` (the average of the two).
        num_image_tokens: how many tokens after [CLS] are patches (0 for a text-only sequence).
    """
    cls = last_hidden_state[:, 0]
    if pooling == "cls":
        return cls
    mean = modality_balanced_mean(last_hidden_state[:, 1:], key_mask[:, 1:], num_image_tokens)
    return mean if pooling == "mean" else (cls + mean) / 2


# ---------------------------------------------------------------------------- transformers 4 / 5 features
# transformers 5 changed `CLIPModel.get_image_features` / `get_text_features` to return a
# `BaseModelOutputWithPooling` whose `pooler_output` is the projected embedding; 4.x returned that
# tensor. OneR's `get_*_features` follow the INSTALLED version, so code written for CLIP runs unchanged
# on OneR. Decided once, here, from the version string ("5.0.0.dev0" counts as 5).
FEATURES_AS_OUTPUT = int(TRANSFORMERS_VERSION.split(".")[0]) >= 5


def clip_style_feature_options(kwargs: dict[str, Any]) -> dict[str, bool]:
    """The `output_attentions` / `output_hidden_states` that a `get_*_features` call passes on to
    `forward_features`: as given under transformers 5, none under 4.x (a tensor has no place for them)."""
    if not FEATURES_AS_OUTPUT:
        return {}
    return {k: bool(kwargs.get(k)) for k in ("output_attentions", "output_hidden_states")}


def clip_style_features(
    encoded: BaseModelOutputWithPooling,
    pooled: torch.Tensor,
    patch_embeds: torch.Tensor | None,
    return_dict: bool,
) -> BaseModelOutputWithPooling | tuple | torch.Tensor:
    """What the installed transformers' `CLIPModel.get_*_features` would return, from OneR's parts.

    Args:
        encoded: `forward_features`' output, `last_hidden_state` `(batch, seq, hidden_size)`.
        pooled: the projected embedding `(batch, projection_dim)`.
        patch_embeds: the projected patches `(batch, num_patches, projection_dim)` for
            `get_patch_features`, else None.
        return_dict: transformers 5 only; False gives `.to_tuple()`, as CLIP's `@can_return_tuple` does.

    Returns:
        transformers >= 5: `encoded` with `pooler_output` replaced by `pooled` (and
        `last_hidden_state` by `patch_embeds` when given); 4.x: `patch_embeds` if given, else `pooled`.
    """
    if not FEATURES_AS_OUTPUT:
        return patch_embeds if patch_embeds is not None else pooled
    encoded.pooler_output = pooled
    if patch_embeds is not None:
        encoded.last_hidden_state = patch_embeds
    return encoded if return_dict else encoded.to_tuple()


class OneRPreTrainedModel(PreTrainedModel):
    config_class = OneRConfig
    base_model_prefix = "oner"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    _no_split_modules = ["OneREncoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_attention_backend = True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except SafetensorError as error:
            # safetensors' own message ("invalid header length") does not say which file or what to do.
            raise OSError(
                f"the weights in {pretrained_model_name_or_path} are damaged or incomplete ({error}); "
                "save or download the model folder again"
            ) from error

    def _init_weights(self, module: nn.Module) -> None:
        # torch.nn.init only: transformers 5 skips parameters that were loaded from a checkpoint,
        # whereas in-place ops (p.data.fill_) would overwrite them.
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, OneREmbeddings):
            nn.init.trunc_normal_(module.image_position_embedding, std=std)
            nn.init.trunc_normal_(module.cls_embedding, std=std)
        elif isinstance(module, OneRModel):
            nn.init.constant_(module.logit_scale, self.config.logit_scale_init_value)
            if module.logit_bias is not None:
                nn.init.constant_(module.logit_bias, self.config.logit_bias_init)


class OneRModel(OneRPreTrainedModel):
    r"""OneR: images, texts and image+text sequences through ONE transformer and ONE head.

    Every input becomes one sequence `[CLS] + tokens` for the same encoder:
    image-only `[CLS] + patches`, text-only `[CLS] + words`, joint `[CLS] + patches + words`.
    The pooled output (`config.pooling`: [CLS], token mean or both), after the final LayerNorm and the
    shared head, is the embedding.

    `forward` mirrors `CLIPModel.forward` (images and texts encoded separately, then scored), so
    code written for CLIP and the zero-shot-image-classification pipeline work unchanged.
    The `get_*_features` methods return what the installed transformers' `CLIPModel` returns: on
    transformers 5 a `BaseModelOutputWithPooling` whose `pooler_output` is the `(batch, projection_dim)`
    embedding (not normalised), on 4.x that tensor itself (`FEATURES_AS_OUTPUT`).
    """

    def __init__(self, config: OneRConfig):
        config.validate_oner()  # again: from_pretrained's keyword overrides are set after the config's __init__
        super().__init__(config)
        self.embeddings = OneREmbeddings(config)
        self.encoder = OneREncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.head = OneRProjectionHead(config)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init_value)))
        # SigLIP's bias, only in models trained with the sigmoid loss (older folders have none).
        bias = getattr(config, "logit_bias_init", None)
        self.logit_bias = nn.Parameter(torch.tensor(float(bias))) if bias is not None else None
        self.post_init()

    # ------------------------------------------------------------------ the shared tower
    def forward_features(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cross_modal_attention: bool = False,
        interpolate_pos_encoding: bool = False,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> BaseModelOutputWithPooling:
        """Encode one sequence per example with the shared transformer.

        Given only `pixel_values` the sequence is `[CLS] + patches`; only `input_ids`,
        `[CLS] + words`; both, the joint `[CLS] + patches + words` (image i with text i).

        Args:
            input_ids: `(batch, length)` token ids (no special tokens; the [CLS] is the model's).
            attention_mask: `(batch, length)`, 1 for real tokens, 0 for padding.
            pixel_values: `(batch, channels, image_size, image_size)` normalised pixels.
            position_ids: `(batch, length)` text positions; default `0..length-1`.
            cross_modal_attention: joint input only. Image tokens attend only to text tokens and
                text tokens only to image tokens; [CLS] attends to all. The CIC objective's pass.
            interpolate_pos_encoding: accept other image sizes by resizing the position grid.

        Returns:
            `BaseModelOutputWithPooling` with `last_hidden_state` `(batch, seq, hidden)` after the
            final LayerNorm and `pooler_output` `(batch, hidden)`, pooled as `config.pooling` says
            (the [CLS] token, the mean of the other non-padding tokens, or the average of both).
        """
        check_input_kinds(input_ids, pixel_values, cross_modal_attention)
        hidden_states, key_mask, num_image_tokens = self._embed_sequence(
            input_ids, attention_mask, pixel_values, position_ids, interpolate_pos_encoding
        )
        encoded = self.encoder(
            hidden_states,
            attention_mask=encoder_attention_mask(key_mask, num_image_tokens, cross_modal_attention),
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        last_hidden_state = self.post_layernorm(encoded.last_hidden_state)
        return BaseModelOutputWithPooling(
            last_hidden_state=last_hidden_state,
            pooler_output=self.pool(last_hidden_state, key_mask, num_image_tokens=num_image_tokens),
            hidden_states=encoded.hidden_states,
            attentions=encoded.attentions,
        )

    def _embed_sequence(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        pixel_values: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        interpolate_pos_encoding: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Checks the inputs and embeds them as ONE sequence `[CLS] + patches + words` (either part optional).

        Returns:
            `hidden_states` `(batch, 1 + num_image_tokens + length, hidden_size)`;
            `key_mask` `(batch, 1 + num_image_tokens + length)` boolean, True for [CLS], every patch
            and every non-padding word (the keys a query may attend to);
            `num_image_tokens`, the number of patch tokens after [CLS] (0 for a text-only input).
        """
        parts, masks = [], []
        if pixel_values is not None:
            check_pixel_values(pixel_values, self.config.num_channels)
            image_tokens = self.embeddings.embed_image(pixel_values, interpolate_pos_encoding)
            parts.append(image_tokens)
            masks.append(torch.ones(image_tokens.shape[:2], dtype=torch.bool, device=image_tokens.device))
        if input_ids is not None:
            check_text_inputs(input_ids, attention_mask, self.config.max_position_embeddings)
            parts.append(self.embeddings.embed_text(input_ids, position_ids))
            text_mask = (
                attention_mask.bool()
                if attention_mask is not None
                else torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device)
            )
            masks.append(text_mask)
        if len(parts) == 2:
            check_one_text_per_image(num_images=parts[0].shape[0], num_texts=parts[1].shape[0])
        batch = parts[0].shape[0]
        hidden_states = torch.cat([self.embeddings.cls(batch).to(parts[0].dtype), *parts], dim=1)
        key_mask = torch.cat([torch.ones(batch, 1, dtype=torch.bool, device=hidden_states.device), *masks], dim=1)
        num_image_tokens = parts[0].shape[1] if pixel_values is not None else 0
        return hidden_states, key_mask, num_image_tokens

    def pool(self, last_hidden_state: torch.Tensor, key_mask: torch.Tensor, num_image_tokens: int = 0) -> torch.Tensor:
        """`(batch, seq, hidden)` -> `(batch, hidden)` as `config.pooling` says; see [`pool_sequence`]."""
        return pool_sequence(last_hidden_state, key_mask, self.config.pooling, num_image_tokens=num_image_tokens)

    def project(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The shared head: `(..., hidden_size)` -> `(..., projection_dim)`."""
        return self.head(hidden_states)

    # ------------------------------------------------------------------ embeddings in the shared space
    def embed(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cross_modal_attention: bool = False,
        interpolate_pos_encoding: bool = False,
    ) -> torch.Tensor:
        """Projected, NOT normalised embeddings `(batch, projection_dim)` as a plain tensor.

        The same inputs as [`forward_features`] (image only, text only, or image i + text i as one
        joint sequence). A tensor under every transformers version: the entry point of the training
        code (`oner.training.pretrainer.encode_pairs`), which has no use for output objects.
        """
        out = self.forward_features(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            position_ids=position_ids,
            cross_modal_attention=cross_modal_attention,
            interpolate_pos_encoding=interpolate_pos_encoding,
        )
        return self.project(out.pooler_output)

    def _features(self, inputs: dict[str, Any], kwargs: dict[str, Any], patches: bool = False):
        """The body of every `get_*_features`: one encoder pass, the shared head on the pooled
        output (and on the patch tokens when `patches=True`), returned by [`clip_style_features`]."""
        out = self.forward_features(**inputs, **clip_style_feature_options(kwargs))
        pooled = self.project(out.pooler_output)
        patch_embeds = self.project(out.last_hidden_state[:, 1:]) if patches else None
        return_dict = kwargs.get("return_dict")
        return_dict = self.config.return_dict if return_dict is None else return_dict
        return clip_style_features(out, pooled, patch_embeds, return_dict)

    def get_image_features(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False, **kwargs
    ) -> BaseModelOutputWithPooling | torch.Tensor:
        """`(batch, channels, H, W)` pixels -> image embeddings in the shared space, not normalised.

        Returns, like the installed transformers' `CLIPModel.get_image_features`:
        - transformers >= 5: `BaseModelOutputWithPooling` with `pooler_output` `(batch, projection_dim)`
          the embedding and `last_hidden_state` `(batch, 1 + num_patches, hidden_size)` the shared
          encoder's tokens after its final LayerNorm;
        - transformers 4.x: the `(batch, projection_dim)` tensor.
        """
        return self._features(dict(pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding), kwargs)

    def get_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | torch.Tensor:
        """`(batch, length)` token ids -> text embeddings in the shared space, not normalised.

        transformers >= 5: `BaseModelOutputWithPooling`, `pooler_output` `(batch, projection_dim)`,
        `last_hidden_state` `(batch, 1 + length, hidden_size)`; 4.x: the `(batch, projection_dim)` tensor.
        """
        return self._features(dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids), kwargs)

    def get_multimodal_features(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cross_modal_attention: bool = False,
        interpolate_pos_encoding: bool = False,
        **kwargs,
    ) -> BaseModelOutputWithPooling | torch.Tensor:
        """Image i and text i encoded together as ONE sequence `[CLS] + patches + words`, same space.

        transformers >= 5: `BaseModelOutputWithPooling`, `pooler_output` `(batch, projection_dim)`,
        `last_hidden_state` `(batch, 1 + num_patches + length, hidden_size)`; 4.x: the
        `(batch, projection_dim)` tensor.
        """
        inputs = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            cross_modal_attention=cross_modal_attention,
            interpolate_pos_encoding=interpolate_pos_encoding,
        )
        return self._features(inputs, kwargs)

    def get_patch_features(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False, **kwargs
    ) -> BaseModelOutputWithPooling | torch.Tensor:
        """Every patch token through the shared head, in the same space as texts.

        `normalize(patches) @ normalize(text).T` is a text-to-patch similarity map (zero-shot
        localization) with no extra module. Patch `k` is at row `k // grid`, column `k % grid`.

        Returns:
        - transformers >= 5: `BaseModelOutputWithPooling` whose `last_hidden_state`
          `(batch, num_patches, projection_dim)` holds the projected patches (the [CLS] token
          dropped; the sequence a CLIP user reads from `last_hidden_state`, here already in the
          shared space) and whose `pooler_output` `(batch, projection_dim)` is the image embedding,
          equal to `get_image_features(...).pooler_output` (one encoder pass gives both);
        - transformers 4.x: the `(batch, num_patches, projection_dim)` tensor.
        """
        inputs = dict(pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        return self._features(inputs, kwargs, patches=True)

    # ------------------------------------------------------------------ CLIP-compatible forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        return_loss: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        interpolate_pos_encoding: bool = False,
        return_dict: bool | None = None,
        token_type_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> OneROutput | tuple:
        """Encode images and texts SEPARATELY (as CLIP does) and score every image against every text.

        Args:
            input_ids: `(n_texts, length)`; attention_mask: `(n_texts, length)`.
            pixel_values: `(n_images, channels, image_size, image_size)`.
            return_loss: add the symmetric InfoNCE loss (needs n_images == n_texts, pairs on the diagonal).
            token_type_ids: accepted and ignored, so the output of a BERT-style tokenizer can be
                passed with `**inputs`.

        Returns:
            [`OneROutput`]; the logits are computed in fp32 even under autocast.
        """
        check_input_kinds(input_ids, pixel_values, cross_modal_attention=False)
        output_attentions = bool(output_attentions)
        output_hidden_states = bool(output_hidden_states)
        return_dict = return_dict if return_dict is not None else self.config.return_dict

        vision_outputs = text_outputs = image_embeds = text_embeds = None
        logits_per_image = logits_per_text = loss = None
        features = dict(output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        if pixel_values is not None:
            vision_outputs = self.forward_features(
                pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, **features
            )
            image_embeds = l2_normalize(self.project(vision_outputs.pooler_output))
        if input_ids is not None:
            text_outputs = self.forward_features(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **features
            )
            text_embeds = l2_normalize(self.project(text_outputs.pooler_output))

        if image_embeds is not None and text_embeds is not None:
            logits_per_text = self.similarity(text_embeds, image_embeds)
            logits_per_image = logits_per_text.t()
        if return_loss:
            # Checked after encoding, so that a bad image or text is reported first.
            check_loss_pairs(image_embeds, text_embeds)
            loss = symmetric_contrastive_loss(logits_per_text, logits_per_image)

        output = OneROutput(
            loss=loss,
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            text_model_output=text_outputs,
            vision_model_output=vision_outputs,
        )
        return output if return_dict else output.to_tuple()

    def similarity(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Scaled cosine similarities `(n_queries, n_keys)` of normalised embeddings, in fp32, plus the
        logit bias when the model has one (trained with the sigmoid loss)."""
        with torch.autocast(device_type=queries.device.type, enabled=False):
            scale = self.logit_scale.float().exp()
            logits = scale * queries.float() @ keys.float().t()
            return logits + self.logit_bias.float() if self.logit_bias is not None else logits


__all__ = ["FEATURES_AS_OUTPUT", "l2_normalize", "OneRModel", "OneRPreTrainedModel", "OneROutput", "OneREncoderLayer"]
