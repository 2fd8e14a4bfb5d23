"""`--architecture clip`: transformers' own `CLIPModel`, the two-tower baseline every table needs.

Each tower gets the OneR preset's transformer size (width, depth, heads, MLP width), the same
image size and patch size, the same projection dimension and the same BERT WordPiece vocabulary,
so the comparison is one tower vs two towers of the same shape (CLIP has about twice the
transformer parameters). It trains on the same data, with the same loop and ITC.

[`CLIPAsOneR`] puts the `CLIPModel` behind the interface our code reads from a OneR model, so
training, evaluation and the benchmarks use one code path for both architectures.

CLIP pools text at its end-of-text token (the first `eos_token_id` in each row), so its tokenizer
appends `[SEP]` (id 102) to every caption and the text tower has one more position than OneR's.
The saved folder is a plain `CLIPModel` + `CLIPProcessor` (CLIPImageProcessor + a WordPiece
`PreTrainedTokenizerFast` whose post-processor appends `[SEP]`): it loads with
`AutoModel`/`AutoProcessor` and no remote code.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers.processors import TemplateProcessing
from torch import nn
from transformers import CLIPConfig, CLIPModel, CLIPProcessor
from transformers.modeling_outputs import BaseModelOutputWithPooling

from modeling_oner.modeling_oner import FEATURES_AS_OUTPUT, l2_normalize
from processing_oner.tokenizer import build_image_processor, build_tokenizer

SEP = "[SEP]"


def clip_config_for(oner_config) -> CLIPConfig:
    """A `CLIPConfig` whose vision and text towers each match `oner_config`'s transformer."""
    shared = dict(
        hidden_size=oner_config.hidden_size,
        num_hidden_layers=oner_config.num_hidden_layers,
        num_attention_heads=oner_config.num_attention_heads,
        intermediate_size=oner_config.intermediate_size,
        hidden_act="gelu",
        layer_norm_eps=oner_config.layer_norm_eps,
        initializer_range=oner_config.initializer_range,
    )
    tokenizer = build_tokenizer(oner_config.max_position_embeddings)
    sep_id = tokenizer.convert_tokens_to_ids(SEP)
    text = dict(
        **shared,
        vocab_size=oner_config.vocab_size,
        max_position_embeddings=oner_config.max_position_embeddings + 1,  # + the appended [SEP]
        pad_token_id=oner_config.pad_token_id,
        eos_token_id=sep_id,
        bos_token_id=sep_id,
    )
    vision = dict(**shared, image_size=oner_config.image_size, patch_size=oner_config.patch_size, num_channels=3)
    return CLIPConfig(
        text_config=text,
        vision_config=vision,
        projection_dim=oner_config.projection_dim,
        logit_scale_init_value=oner_config.logit_scale_init_value,
    )


def oner_config_of_clip(clip_config: CLIPConfig):
    """The `OneRConfig` whose `clip_config_for` is `clip_config`: the inverse, for a loaded baseline.

    Only the fields `clip_config_for` sets are meaningful (`CLIP_FIELDS`); the rest keep OneRConfig's
    defaults. Raises ValueError when the two towers differ (not a baseline made by this module).
    """
    from modeling_oner import OneRConfig

    vision, text = clip_config.vision_config, clip_config.text_config
    tower = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "layer_norm_eps",
             "initializer_range")
    differ = [name for name in tower if getattr(vision, name) != getattr(text, name)]
    if differ:
        raise ValueError(f"its vision and text towers differ in {differ}: not a baseline saved by train.py --architecture clip")
    return OneRConfig(
        **{name: getattr(vision, name) for name in tower},
        vocab_size=text.vocab_size,
        max_position_embeddings=text.max_position_embeddings - 1,  # clip_config_for adds the appended [SEP]
        pad_token_id=text.pad_token_id,
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        projection_dim=clip_config.projection_dim,
        logit_scale_init_value=clip_config.logit_scale_init_value,
    )


#: The OneRConfig fields that shape the baseline (those `clip_config_for` reads).
CLIP_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "layer_norm_eps",
               "initializer_range", "vocab_size", "max_position_embeddings", "pad_token_id", "image_size",
               "patch_size", "projection_dim", "logit_scale_init_value")


def build_clip_processor(oner_config) -> CLIPProcessor:
    """CLIPProcessor: OneR's image processor and WordPiece tokenizer, with `[SEP]` appended to each text."""
    tokenizer = build_tokenizer(oner_config.max_position_embeddings + 1)
    sep_id = tokenizer.convert_tokens_to_ids(SEP)
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"$A {SEP}", pair=f"$A {SEP} $B {SEP}", special_tokens=[(SEP, sep_id)]
    )
    return CLIPProcessor(image_processor=build_image_processor(oner_config.image_size), tokenizer=tokenizer)


class CLIPConfigAsOneR:
    """A `CLIPConfig` read with the OneR config's field names our code uses.

    A field of the `CLIPConfig` itself (`projection_dim`, `_attn_implementation`, ...) comes from it;
    any other (`image_size`, `patch_size`, `hidden_size`, `num_hidden_layers`, ...) from its vision
    tower, which has the OneR preset's shape as the text tower does. Nothing is copied or added, so
    the saved `config.json` stays CLIP's own.
    """

    def __init__(self, clip_config: CLIPConfig):
        self.clip_config = clip_config

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "clip_config":  # copy/pickle probe these before __init__ ran
            raise AttributeError(name)
        if hasattr(self.clip_config, name):
            return getattr(self.clip_config, name)
        return getattr(self.clip_config.vision_config, name)


class CLIPAsOneR(nn.Module):
    """A `CLIPModel` with the interface our code reads from a `OneRModel`, so that training,
    evaluation and the benchmarks treat both architectures the same way.

    - `get_image_features` / `get_text_features`: CLIP's own, in the installed transformers'
      convention (an output object under 5, a tensor under 4.x), which OneR's follow too;
    - `get_patch_features`: the vision tower's patch tokens through its post-LayerNorm and visual
      projection (the usual way to read a dense CLIP map, MaskCLIP-style without its value trick),
      in OneR's convention: `last_hidden_state` the projected patches, `pooler_output` the image
      embedding (the tensor of patches under 4.x);
    - `get_multimodal_features`: LATE fusion, normalize(z_I) + normalize(z_T): a two-tower model
      has no joint pass, so this is the natural baseline for the composed query;
    - `embed(...)`: the same embeddings as plain tensors under every transformers version, as
      `OneRModel.embed` (the training path: `oner.training.pretrainer.encode_pairs`);
    - `logit_scale`: CLIP's own parameter (clamped and read by training, read by the heatmaps);
    - `config`: a [`CLIPConfigAsOneR`] (`image_size`, `patch_size`, `projection_dim`, ... as OneR's
      config has them). As with a `PreTrainedModel`, `CLIPAsOneR(model.config)` builds a fresh model
      of the same shape (the training loop rebuilds the model it saves that way).

    `clip` is the wrapped `CLIPModel`, the model that is saved ([`save_clip_folder`]) and loaded.
    """

    def __init__(self, clip: CLIPModel | CLIPConfigAsOneR):
        super().__init__()
        self.clip = CLIPModel(clip.clip_config) if isinstance(clip, CLIPConfigAsOneR) else clip
        self.config = CLIPConfigAsOneR(self.clip.config)

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clip.logit_scale

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Activation checkpointing of both towers (`train.py --gradient_checkpointing`)."""
        if hasattr(self.clip, "activation_checkpointing_enable"):  # transformers >= 5's name for it
            self.clip.activation_checkpointing_enable(activation_checkpointing_kwargs=gradient_checkpointing_kwargs)
        else:
            self.clip.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)

    # ------------------------------------------------------------------ OneR's feature methods
    def get_image_features(self, pixel_values: torch.Tensor, **kwargs):
        return self.clip.get_image_features(pixel_values=pixel_values, **kwargs)

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        return self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def get_patch_features(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False, **kwargs):
        out = self.clip.vision_model(pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        patches = self.clip.visual_projection(self.clip.vision_model.post_layernorm(out.last_hidden_state[:, 1:]))
        if not FEATURES_AS_OUTPUT:
            return patches
        return BaseModelOutputWithPooling(last_hidden_state=patches,
                                          pooler_output=self.clip.visual_projection(out.pooler_output))

    def get_multimodal_features(self, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                                attention_mask: torch.Tensor | None = None, **kwargs):
        fused = self.embed(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
        return BaseModelOutputWithPooling(pooler_output=fused) if FEATURES_AS_OUTPUT else fused

    # ------------------------------------------------------------------ tensors, for training
    def embed(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cross_modal_attention: bool = False,
        interpolate_pos_encoding: bool = False,
    ) -> torch.Tensor:
        """Projected, NOT normalised `(batch, projection_dim)` embeddings, as `OneRModel.embed`: the
        image, the text, or (both given) their late fusion. Raises for `cross_modal_attention`: no
        attention crosses between two towers (OneR's `cic` term has no CLIP counterpart)."""
        if cross_modal_attention:
            raise ValueError("a two-tower CLIP has no attention between its towers: cross_modal_attention needs OneR")
        image = text = None
        if pixel_values is not None:
            vision = self.clip.vision_model(pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
            image = self.clip.visual_projection(vision.pooler_output)
        if input_ids is not None:
            words = self.clip.text_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
            text = self.clip.text_projection(words.pooler_output)
        if image is None and text is None:
            raise ValueError("pass pixel_values, input_ids or both")
        if image is None or text is None:
            return image if text is None else text
        return l2_normalize(image) + l2_normalize(text)


def build_clip(oner_config) -> tuple[CLIPAsOneR, CLIPProcessor]:
    """A freshly initialised two-tower baseline (behind [`CLIPAsOneR`]) and its processor, with
    OneR's attention kernel."""
    clip_config = clip_config_for(oner_config)
    implementation = getattr(oner_config, "_attn_implementation", None)
    if implementation:
        clip_config._attn_implementation = implementation
    return CLIPAsOneR(CLIPModel(clip_config)), build_clip_processor(oner_config)


def save_clip_folder(model: CLIPAsOneR, processor: CLIPProcessor, output_dir: str | Path) -> Path:
    """`save_pretrained` of the wrapped `CLIPModel` and of the processor: the folder loads with
    `AutoModel` / `AutoProcessor` (no remote code needed)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.clip.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return output_dir
