"""The two-tower CLIP baseline through the OneR benchmark suites.

`train.py --architecture clip` saves a plain transformers `CLIPModel`; the suites call four methods
of a OneR model. [`CLIPForOneREval`] gives a CLIPModel those methods, so every result table
compares both architectures with the same code.
"""

import torch
import torch.nn.functional as F
from torch import nn


class CLIPForOneREval(nn.Module):
    """A `CLIPModel` with the OneR evaluation interface.

    - image / text features: CLIP's own projected embeddings;
    - patch features: the vision tower's patch tokens through its post-LayerNorm and visual
      projection (the usual way to read a dense CLIP map, MaskCLIP-style without its value trick);
    - multimodal features: LATE fusion, normalize(z_I) + normalize(z_T): a two-tower model has no
      joint pass, so this is the natural baseline for the composed query.
    """

    def __init__(self, clip_model: nn.Module):
        super().__init__()
        self.clip = clip_model
        self.config = clip_model.config.vision_config  # image_size and patch_size, as OneR's config has
        self.logit_scale = clip_model.logit_scale  # heatmaps read the temperature

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
        out = self.clip.get_image_features(pixel_values=pixel_values)
        return getattr(out, "pooler_output", out)  # an output object in transformers 5, a tensor in 4.x

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        out = self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return getattr(out, "pooler_output", out)

    def get_patch_features(self, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
        hidden = self.clip.vision_model(pixel_values=pixel_values).last_hidden_state[:, 1:]
        return self.clip.visual_projection(self.clip.vision_model.post_layernorm(hidden))

    def get_multimodal_features(self, input_ids, pixel_values, attention_mask=None, **kwargs) -> torch.Tensor:
        image = F.normalize(self.get_image_features(pixel_values).float(), dim=-1)
        text = F.normalize(self.get_text_features(input_ids, attention_mask).float(), dim=-1)
        return image + text


def clip_adapter(clip_model: nn.Module) -> CLIPForOneREval:
    return CLIPForOneREval(clip_model).eval()
