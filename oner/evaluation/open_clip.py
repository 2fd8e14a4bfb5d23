"""open_clip's model interface on a OneR model, so that evaluation code written for open_clip
models (clip_benchmark's metric functions among them) runs on OneR unchanged.

    model, preprocess, tokenizer = load_open_clip("path/to/oner-folder")
    pixels = torch.stack([preprocess(image) for image in images])     # (n, 3, H, W)
    tokens = tokenizer(["a photo of a cat", "a dog"])                   # (n, context_length) int64
    image_features = model.encode_image(pixels)                         # (n, projection_dim)
    text_features = model.encode_text(tokens)

As in open_clip, `encode_*` return unnormalised features unless `normalize=True`, the tokenizer pads
every text to the model's context length with the pad id (the attention mask is rebuilt from it),
and `model(image, text)` returns the normalised features and `logit_scale.exp()`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from .context import load_model_and_processor, open_image, pooled


class OpenCLIPTokenizer:
    """`tokenizer(texts) -> (n, context_length)` int64 token ids, padded with the pad id, truncated."""

    def __init__(self, tokenizer, context_length: int) -> None:
        self.tokenizer = tokenizer
        self.context_length = int(context_length)
        self.pad_token_id = int(tokenizer.pad_token_id)

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        batch = self.tokenizer(texts, padding="max_length", truncation=True,
                               max_length=context_length or self.context_length, return_tensors="pt")
        return batch["input_ids"]


class OpenCLIPModel(torch.nn.Module):
    """A OneR (or baseline CLIP) model seen through open_clip's `encode_image` / `encode_text`."""

    def __init__(self, model, pad_token_id: int) -> None:
        super().__init__()
        self.model = model
        self.pad_token_id = int(pad_token_id)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """`(n, 3, H, W)` pixels (from `preprocess`) -> `(n, projection_dim)`."""
        features = pooled(self.model.get_image_features(pixel_values=image))
        return torch.nn.functional.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """`(n, L)` token ids (from the tokenizer) -> `(n, projection_dim)`; padding is masked out."""
        mask = (text != self.pad_token_id).long()
        features = pooled(self.model.get_text_features(input_ids=text, attention_mask=mask))
        return torch.nn.functional.normalize(features, dim=-1) if normalize else features

    def forward(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None):
        image_features = self.encode_image(image, normalize=True) if image is not None else None
        text_features = self.encode_text(text, normalize=True) if text is not None else None
        return image_features, text_features, self.logit_scale.exp()


class OpenCLIPPreprocess:
    """`preprocess(image) -> (3, H, W)`: OneR's own image processor on one PIL image (or path)."""

    def __init__(self, processor) -> None:
        self.processor = processor

    def __call__(self, image: Image.Image | str | Path) -> torch.Tensor:
        return self.processor(images=[open_image(image)], return_tensors="pt")["pixel_values"][0]


def load_open_clip(model_dir: str | Path, device: str | torch.device | None = None):
    """(model, preprocess, tokenizer) for a OneR model folder, as `open_clip.create_model_and_transforms`
    plus `open_clip.get_tokenizer` give them (and clip_benchmark's `load_clip`)."""
    model, processor = load_model_and_processor(model_dir, device=device)
    tokenizer = processor.tokenizer
    context_length = int(getattr(model.config, "max_position_embeddings", tokenizer.model_max_length))
    wrapped = OpenCLIPModel(model, tokenizer.pad_token_id).eval()
    return wrapped, OpenCLIPPreprocess(processor), OpenCLIPTokenizer(tokenizer, context_length)
