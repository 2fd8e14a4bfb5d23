"""OneR processor: pixels and text in, one token stream out.

Shipped as transformers remote code next to the model: it imports only numpy, PIL, torch and
transformers (see `shared/reference/hf-remote-code.md`). The sub-processors are stock classes
(`CLIPImageProcessor`, `PreTrainedTokenizerFast`) so that `AutoProcessor`, `AutoImageProcessor`,
`AutoTokenizer` and the zero-shot pipeline all load them without custom registration.
"""

import warnings
from typing import Any

import numpy as np
import torch
import transformers
from PIL import Image
from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin

# Modality ids of the stream, the same as modeling_oner's (0 is the shared [CLS]).
CLS_MODALITY, IMAGE_MODALITY, TEXT_MODALITY = 0, 1, 2

# PIL modes that carry transparency: composited on white so that transparent pixels (which may
# hold any colour) do not leak into the picture.
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# High-bit-depth grey modes and the value that maps to white.
_WIDE_GREY_MODES = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I;16N": 65535, "I": None, "F": None}


def _from_alpha(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _grey_array_to_rgb(array: np.ndarray, white: float | None) -> Image.Image:
    array = array.astype(np.float64)
    if white is None:  # 32-bit int or float images: stretch what is there
        low, high = float(array.min()), float(array.max())
        array = (array - low) / (high - low) * 255.0 if high > low else np.zeros_like(array)
    else:
        array = array / white * 255.0
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8)).convert("RGB")


def pil_to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparency is composited on white; 16-bit grey keeps its full range."""
    if image.width == 0 or image.height == 0:
        raise ValueError(f"image has zero size {image.size}")
    if image.mode == "RGB":
        return image
    if image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        return _from_alpha(image)
    if image.mode in _WIDE_GREY_MODES:
        return _grey_array_to_rgb(np.asarray(image), _WIDE_GREY_MODES[image.mode])
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def array_to_rgb(array: np.ndarray) -> Image.Image:
    """`(H, W)`, `(H, W, C)` or `(C, H, W)` array with C in {1, 3, 4} -> RGB PIL image.

    uint8 is taken as is, uint16 as 16-bit, floats as [0, 1] (or [0, 255] if any value exceeds 1).
    """
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # channels-first, as torch tensors are
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3):
        raise ValueError(f"an image array must be (H, W), (H, W, C) or (C, H, W), got shape {array.shape}")
    if array.ndim == 3 and array.shape[-1] not in (3, 4):
        raise ValueError(f"an image must have 1, 3 or 4 channels on its first or last axis, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"image array is empty (shape {array.shape})")
    if array.dtype == np.uint16:
        array = array / 65535.0 * 255.0
    elif array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise ValueError("image array holds NaN or infinite values")
        array = array * 255.0 if array.max() <= 1.0 else array
    elif array.dtype == np.bool_:
        array = array * 255.0
    elif array.dtype.kind not in "ui":
        raise TypeError(f"unsupported image array dtype {array.dtype}")
    array = np.clip(np.rint(array), 0, 255).astype(np.uint8)
    image = Image.fromarray(array)  # mode L, RGB or RGBA from the shape
    return pil_to_rgb(image)


def to_rgb_image(image: Any) -> Image.Image:
    """A PIL image, numpy array or torch tensor -> RGB PIL image, with a clear error otherwise."""
    if isinstance(image, Image.Image):
        return pil_to_rgb(image)
    if isinstance(image, torch.Tensor):
        return array_to_rgb(image.detach().cpu().numpy())
    if isinstance(image, np.ndarray):
        return array_to_rgb(image)
    raise TypeError(f"images must be PIL images, numpy arrays or torch tensors, got {type(image).__name__}")


class OneRProcessor(ProcessorMixin):
    r"""Turns images and texts into OneR's inputs, and describes the one token stream they make.

    `processor(text=..., images=...)` returns the usual `input_ids`, `attention_mask` and
    `pixel_values`, plus, for the sequence the shared transformer will see:

    - `modality_ids` `(batch, 1 + num_patches + length)`: 0 for the shared [CLS], 1 for image
      patches, 2 for words (image-only and text-only inputs have only their own part);
    - `stream_attention_mask`, the same shape: 1 where the transformer attends, 0 for padding.

    With both images and texts, the stream is the joint `[CLS] + patches + words` of image i with
    text i; that needs as many texts as images (`joint=True` makes a mismatch an error; with the
    default `joint=None` a mismatch just omits the stream, as when scoring n images against m labels).

    Args:
        image_processor (`CLIPImageProcessor`): resize, centre-crop, normalise.
        tokenizer (`PreTrainedTokenizerFast`): BERT uncased WordPiece, no special tokens
            (the model prepends its own shared [CLS]).
        patch_size (`int`): the model's patch size, to lay out the stream.
    """

    attributes = ["image_processor", "tokenizer"]
    if int(transformers.__version__.split(".")[0]) < 5:
        # transformers 4.x needs the sub-processor classes named here; 5.x reads them from the saved
        # configs and warns that these attributes are deprecated.
        image_processor_class = "CLIPImageProcessor"
        tokenizer_class = "PreTrainedTokenizerFast"

    def __init__(self, image_processor=None, tokenizer=None, patch_size: int = 16, **kwargs):
        self.patch_size = patch_size  # before super().__init__, which rejects unknown kwargs in 5.x
        super().__init__(image_processor, tokenizer)

    @property
    def image_size(self) -> int:
        crop = self.image_processor.crop_size  # a dict, or transformers 5's SizeDict
        return int(crop["height"]) if crop is not None and not isinstance(crop, int) else int(crop)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def __call__(
        self,
        text: str | list[str] | None = None,
        images: Any = None,
        return_tensors: str = "pt",
        padding: bool | str = True,
        truncation: bool = True,
        max_length: int | None = None,
        joint: bool | None = None,
        **kwargs,
    ) -> BatchFeature:
        if text is None and images is None:
            raise ValueError("OneRProcessor needs text, images or both; got neither")
        if return_tensors != "pt":
            raise ValueError(f"OneRProcessor returns PyTorch tensors only (return_tensors='pt'), got {return_tensors!r}")
        data: dict[str, torch.Tensor] = {}
        n_images = n_texts = None
        if images is not None:
            pixel_values = self.preprocess_images(images)
            data["pixel_values"] = pixel_values
            n_images = len(pixel_values)
        if text is not None:
            data.update(self.tokenize(text, padding=padding, truncation=truncation, max_length=max_length))
            n_texts = len(data["input_ids"])

        if n_images is not None and n_texts is not None and n_images != n_texts:
            if joint:
                raise ValueError(
                    f"a joint image+text input needs one text per image: got {n_images} images and {n_texts} texts"
                )
        elif joint is not False:
            data.update(self._stream(n_images, data.get("attention_mask")))
        return BatchFeature(data=data, tensor_type=None)

    def preprocess_images(self, images: Any) -> torch.Tensor:
        """One image or a list of them (PIL, numpy, torch; any mode and size) -> `(batch, 3, S, S)`."""
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            images = list(images)
        elif isinstance(images, np.ndarray) and images.ndim == 4:
            images = list(images)
        elif not isinstance(images, (list, tuple)):
            images = [images]
        if len(images) == 0:
            raise ValueError("images is an empty list")
        rgb = []
        for index, image in enumerate(images):
            try:
                rgb.append(to_rgb_image(image))
            except (TypeError, ValueError) as error:
                raise type(error)(f"image {index}: {error}") from None
        return self.image_processor(images=rgb, return_tensors="pt")["pixel_values"]

    def tokenize(
        self,
        text: str | list[str],
        padding: bool | str = True,
        truncation: bool = True,
        max_length: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """Text or texts -> `input_ids` and `attention_mask`, `(batch, length)`; over-long text is truncated with a warning."""
        texts = [text] if isinstance(text, str) else text
        if not isinstance(texts, (list, tuple)):
            raise TypeError(f"text must be a string or a list of strings, got {type(text).__name__}")
        if len(texts) == 0:
            raise ValueError("text is an empty list")
        for index, item in enumerate(texts):
            if not isinstance(item, str):
                raise TypeError(f"text {index} is a {type(item).__name__}, not a string")
        max_length = max_length or self.tokenizer.model_max_length
        lengths = [len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
        empty = [i for i, n in enumerate(lengths) if n == 0]
        if empty:
            raise ValueError(f"texts at positions {empty} are empty (no tokens)")
        too_long = [i for i, n in enumerate(lengths) if n > max_length]
        if too_long and truncation:
            warnings.warn(
                f"{len(too_long)} text(s) longer than {max_length} tokens were truncated (first at position "
                f"{too_long[0]}: {lengths[too_long[0]]} tokens)",
                stacklevel=3,
            )
        encoded = self.tokenizer(
            list(texts),
            add_special_tokens=False,
            padding=padding,
            truncation=truncation,
            max_length=max_length,
            return_tensors="pt",
            return_token_type_ids=False,
        )
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def _stream(self, n_images: int | None, attention_mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """`modality_ids` and `stream_attention_mask` of `[CLS] + patches? + words?`."""
        batch = n_images if n_images is not None else len(attention_mask)
        ids = [torch.full((batch, 1), CLS_MODALITY)]
        mask = [torch.ones(batch, 1, dtype=torch.long)]
        if n_images is not None:
            ids.append(torch.full((batch, self.num_patches), IMAGE_MODALITY))
            mask.append(torch.ones(batch, self.num_patches, dtype=torch.long))
        if attention_mask is not None:
            ids.append(torch.full(attention_mask.shape, TEXT_MODALITY))
            mask.append(attention_mask.long())
        return {"modality_ids": torch.cat(ids, dim=1), "stream_attention_mask": torch.cat(mask, dim=1)}

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]


__all__ = ["OneRProcessor", "to_rgb_image"]
