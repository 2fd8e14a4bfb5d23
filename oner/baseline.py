"""`--architecture clip`: transformers' own `CLIPModel`, the two-tower baseline every table needs.

Each tower gets the OneR preset's transformer size (width, depth, heads, MLP width), the same
image size and patch size, the same projection dimension and the same BERT WordPiece vocabulary,
so the comparison is one tower vs two towers of the same shape (CLIP has about twice the
transformer parameters). It trains on the same data, with the same loop and ITC.

CLIP pools text at its end-of-text token (the first `eos_token_id` in each row), so its tokenizer
appends `[SEP]` (id 102) to every caption and the text tower has one more position than OneR's.
The saved folder is a plain `CLIPModel` + `CLIPProcessor` (CLIPImageProcessor + a WordPiece
`PreTrainedTokenizerFast` whose post-processor appends `[SEP]`): it loads with
`AutoModel`/`AutoProcessor` and no remote code.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers.processors import TemplateProcessing
from torch import nn
from transformers import CLIPConfig, CLIPModel, CLIPProcessor

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


class CLIPPretrainer(nn.Module):
    """`CLIPModel` behind the same interface as [`oner.objectives.OneRPretrainer`] (ITC features only)."""

    def __init__(self, model: CLIPModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, pixel_values, **unused) -> dict[str, torch.Tensor]:
        image = self.model.get_image_features(pixel_values=pixel_values)
        text = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        # transformers 5 returns output objects from get_*_features; 4.x returned tensors.
        image = getattr(image, "pooler_output", image)
        text = getattr(text, "pooler_output", text)
        return {
            "image": F.normalize(image.float(), dim=-1),
            "text": F.normalize(text.float(), dim=-1),
            "logit_scale": self.model.logit_scale,
        }


def build_clip(oner_config) -> tuple[CLIPModel, CLIPProcessor]:
    """A freshly initialised two-tower baseline and its processor, with OneR's attention kernel."""
    clip_config = clip_config_for(oner_config)
    implementation = getattr(oner_config, "_attn_implementation", None)
    if implementation:
        clip_config._attn_implementation = implementation
    return CLIPModel(clip_config), build_clip_processor(oner_config)


def save_clip_folder(model: CLIPModel, processor: CLIPProcessor, output_dir: str | Path) -> Path:
    """`save_pretrained` of both: loads with `AutoModel` / `AutoProcessor` (no remote code needed)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return output_dir
