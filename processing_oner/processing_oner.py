"""OneR processor: images and texts in, the model's `pixel_values`, `input_ids` and `attention_mask` out.

Shipped as transformers remote code next to the model: it imports only numpy, PIL, torch and
transformers, and nothing of this project (see "Remote code" in `docs/method.md`). The
sub-processors are stock classes (`CLIPImageProcessor`, `PreTrainedTokenizerFast`) so that
`AutoProcessor`, `AutoImageProcessor`, `AutoTokenizer` and the zero-shot pipeline all load them
without custom registration.
"""

import warnings
from typing import Any

import numpy as np
import torch
import transformers
from PIL import Image
from transformers import BatchFeature
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin

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


def _is_text(value: Any) -> bool:
    return isinstance(value, str) or (
        isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(item, str) for item in value)
    )


def _is_image(value: Any) -> bool:
    items = value if isinstance(value, (list, tuple)) and len(value) > 0 else [value]
    return all(isinstance(item, (Image.Image, np.ndarray, torch.Tensor)) for item in items)


def _as_lists(data: dict[str, Any], single_text: bool) -> dict[str, Any]:
    """`return_tensors=None`, as CLIPProcessor answers it: `pixel_values` a list of `(3, S, S)` float32
    arrays, `input_ids` / `attention_mask` lists of int lists (one flat list for a single string)."""
    out = {}
    for key, value in data.items():
        value = value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        if key == "pixel_values":
            out[key] = list(value.astype(np.float32))
        else:
            out[key] = value[0].tolist() if single_text else value.tolist()
    return out


class OneRProcessorKwargs(ProcessingKwargs, total=False):
    # Defaults of `OneRProcessor.__call__`, routed by transformers' `ProcessorMixin._merge_kwargs`
    # (`_defaults` is read by transformers 4.57 and, for backward compatibility, by 5.x).
    _defaults = {
        "text_kwargs": {
            "padding": True,
            "truncation": True,
            "add_special_tokens": False,  # the model prepends its own shared [CLS]
            "return_token_type_ids": False,
        },
        "common_kwargs": {"return_tensors": "pt"},
    }


# The text options of a plain `processor(text=...)` call (after kwargs routing): these take the fast path.
_DEFAULT_TEXT_CALL = {
    **OneRProcessorKwargs._defaults["text_kwargs"],
    "padding_side": "right",
    "return_tensors": "pt",
}


class OneRProcessor(ProcessorMixin):
    r"""Turns images and texts into OneR's inputs, as `CLIPProcessor` does.

    `processor(images=..., text=...)` (images first, as every transformers processor) returns
    `pixel_values` for the images and `input_ids` / `attention_mask` for the texts; either may be
    left out. Keyword arguments are routed as transformers routes them
    (`ProcessorMixin._merge_kwargs`): tokenizer options (`padding`, `truncation`, `max_length`, ...)
    go to the tokenizer, image-processor options (`do_center_crop`, `size`, ...) to the image
    processor, and `text_kwargs={...}` / `images_kwargs={...}` address one of them explicitly. A
    keyword neither knows is named in transformers' warning "Keyword argument `x` is not a valid
    argument for this processor and will be ignored". `return_tensors` is "pt" (default), "np" or
    None (python lists, as `CLIPProcessor` returns them).

    The processor does not describe the token stream. The one sequence the shared transformer sees
    (`[CLS] + patches` for an image, `[CLS] + words` for a text, `[CLS] + patches + words` for a
    joint pass, with its modality embeddings and attention mask) is built in one place,
    `OneRModel.forward_features` in `modeling_oner.py`, from these inputs; see `docs/method.md`.

    Args:
        image_processor (`CLIPImageProcessor`): resize, centre-crop, normalise.
        tokenizer (`PreTrainedTokenizerFast`): BERT uncased WordPiece, no special tokens
            (the model prepends its own shared [CLS]).
        patch_size (`int`): the model's patch size, saved with the processor for reference.
    """

    attributes = ["image_processor", "tokenizer"]
    valid_processor_kwargs = OneRProcessorKwargs
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

    def __call__(self, images: Any = None, text: str | list[str] | None = None, **kwargs) -> BatchFeature:
        """Images and/or texts -> a `BatchFeature` with `pixel_values`, `input_ids`, `attention_mask`.

        Args:
            images: a PIL image, numpy array or torch tensor (any mode, size and layout), a list of
                them, or a 4-D batch.
            text: a string or a list of strings.
            kwargs: tokenizer and image-processor options, `text_kwargs` / `images_kwargs` dicts,
                and `return_tensors` ("pt", "np", or None for python lists).
        """
        for name in ("videos", "audio"):
            if kwargs.get(name) is not None:
                raise ValueError(f"OneRProcessor takes images and text only, got {name}=")
        if images is None and text is None:
            raise ValueError("OneRProcessor needs text, images or both; got neither")
        if images is not None and _is_text(images):
            if text is not None and _is_image(text):
                raise TypeError(
                    "`images` holds text and `text` holds images: OneRProcessor takes images first, as "
                    "transformers processors do; call processor(images=..., text=...)"
                )
            raise TypeError(
                "images must be PIL images, numpy arrays or torch tensors, got strings (file paths are not "
                "opened; texts go in text=..., since OneRProcessor takes images first)"
            )
        merged = self._merge_kwargs(
            OneRProcessorKwargs,
            tokenizer_init_kwargs=self.tokenizer.init_kwargs,
            **kwargs,
        )
        text_kwargs, images_kwargs = merged["text_kwargs"], merged["images_kwargs"]
        return_tensors = text_kwargs.get("return_tensors", "pt")
        if return_tensors not in ("pt", "np", None):
            raise ValueError(f"OneRProcessor returns 'pt' or 'np' tensors or python lists (None), got "
                             f"return_tensors={return_tensors!r}")

        data: dict[str, Any] = {}
        if images is not None:
            data["pixel_values"] = self.preprocess_images(images, **images_kwargs)
        if text is not None:
            data.update(self.tokenize(text, **text_kwargs))
        if return_tensors is None:
            data = _as_lists(data, single_text=isinstance(text, str))
        return BatchFeature(data=data, tensor_type=return_tensors)

    def preprocess_images(self, images: Any, **images_kwargs):
        """One image or a list of them (PIL, numpy, torch; any mode and size) -> `(batch, 3, S, S)`.

        `images_kwargs` go to the image processor (e.g. `do_center_crop=False`, `return_tensors="np"`).
        """
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
        images_kwargs = {"return_tensors": "pt", **images_kwargs}
        if images_kwargs == {"return_tensors": "pt"} and self._already_sized(rgb):
            return self._normalize(rgb)
        return self.image_processor(images=rgb, **images_kwargs)["pixel_values"]

    def _already_sized(self, images: list[Image.Image]) -> bool:
        """True when resizing and centre-cropping would leave every image as it is (training batches)."""
        size = self.image_size
        return all(image.size == (size, size) and image.mode == "RGB" for image in images)

    def _normalize(self, images: list[Image.Image]) -> torch.Tensor:
        """The image processor's rescale + normalise, batched; its resize and crop are identities here."""
        pixels = torch.from_numpy(np.stack([np.asarray(image) for image in images])).permute(0, 3, 1, 2)
        mean = torch.tensor(self.image_processor.image_mean, dtype=torch.float32)[None, :, None, None]
        std = torch.tensor(self.image_processor.image_std, dtype=torch.float32)[None, :, None, None]
        return (pixels.float() * self.image_processor.rescale_factor - mean) / std

    def tokenize(self, text: str | list[str], **text_kwargs) -> dict[str, Any]:
        """Text or texts -> `input_ids` and `attention_mask`, `(batch, length)`; over-long text is truncated with a warning.

        `text_kwargs` go to the tokenizer; `max_length` defaults to the model's text length.
        """
        texts = [text] if isinstance(text, str) else text
        if not isinstance(texts, (list, tuple)):
            raise TypeError(f"text must be a string or a list of strings, got {type(text).__name__}")
        if len(texts) == 0:
            raise ValueError("text is an empty list")
        for index, item in enumerate(texts):
            if not isinstance(item, str):
                raise TypeError(f"text {index} is a {type(item).__name__}, not a string")
        text_kwargs = {**OneRProcessorKwargs._defaults["text_kwargs"], "return_tensors": "pt", **text_kwargs}
        default_call = text_kwargs == _DEFAULT_TEXT_CALL
        text_kwargs["max_length"] = text_kwargs.get("max_length") or self.tokenizer.model_max_length
        max_length = text_kwargs["max_length"]
        if default_call:
            # The backend tokenizer directly: transformers' per-text Python conversion costs more than the
            # WordPiece itself for a training batch. Same ids and mask as the general path (tested).
            backend = self.tokenizer.backend_tokenizer
            backend.no_truncation()  # transformers sets truncation/padding again before its own next call
            backend.no_padding()
            ids = [encoding.ids for encoding in backend.encode_batch(list(texts), add_special_tokens=False)]
        else:
            ids = self.tokenizer(list(texts), add_special_tokens=text_kwargs["add_special_tokens"])["input_ids"]
        lengths = [len(row) for row in ids]
        empty = [i for i, n in enumerate(lengths) if n == 0]
        if empty:
            raise ValueError(f"texts at positions {empty} are empty (no tokens)")
        too_long = [i for i, n in enumerate(lengths) if n > max_length]
        if too_long and text_kwargs["truncation"] not in (False, "do_not_truncate"):
            warnings.warn(
                f"{len(too_long)} text(s) longer than {max_length} tokens were truncated (first at position "
                f"{too_long[0]}: {lengths[too_long[0]]} tokens)",
                stacklevel=3,
            )
        if default_call:
            return self._pad(ids, max_length)
        return dict(self.tokenizer(list(texts), **text_kwargs))

    def _pad(self, ids: list[list[int]], max_length: int) -> dict[str, torch.Tensor]:
        """Truncate to `max_length` and right-pad to the longest: `input_ids`, `attention_mask` tensors."""
        ids = [row[:max_length] for row in ids]
        length = max(len(row) for row in ids)
        input_ids = torch.full((len(ids), length), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), length), dtype=torch.long)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, : len(row)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]


__all__ = ["OneRProcessor", "to_rgb_image"]
