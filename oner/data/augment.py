"""Augmentations without torchvision: PIL + numpy only.

Determinism: each transform owns a ``numpy.random.Generator`` made from ``seed``; a call may pass
its own ``rng`` (a numpy Generator or a ``torch.Generator``, from which one seed is drawn, advancing
it) instead. Training passes one per sample, seeded from the run's seed, the epoch and the sample's
index (``oner.training.data``), so draws depend on no worker's or process's history and a resumed
run repeats them.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from processing_oner.processing_oner import pil_to_rgb

# Concepts whose meaning changes in a mirror image: directions, text and digits, clocks, flags.
_NO_FLIP = re.compile(
    r"\b(left|right|arrow|arrows|clockwise|anticlockwise|counterclockwise|keycap|letter|letters|"
    r"latin|button|sign|flag|clock|o’clock|o'clock|thirty|input|symbol|ideograph|hundred|"
    r"number|numbers|abc|abcd|atm|wc|sos|vs|zzz|mark|pointing|backhand|index|writing|"
    r"reversed|place|medal|calendar|newspaper|ledger|book|page|memo|scroll|ticket|label|"
    r"receipt|card|envelope|flags)\b|\d",
    re.IGNORECASE,
)


def flip_allowed(captions: str | Sequence[str]) -> bool:
    """False when any caption names something a horizontal flip would change (left/right, arrows,
    text or digits, clocks, flags, pointing hands, ...)."""
    items = [captions] if isinstance(captions, str) else list(captions)
    return not any(_NO_FLIP.search(c) for c in items)


def _as_numpy_rng(rng: Any) -> np.random.Generator:
    """A numpy Generator from a numpy Generator or a torch.Generator (one draw advances it)."""
    if isinstance(rng, np.random.Generator):
        return rng
    import torch

    if isinstance(rng, torch.Generator):
        seed = int(torch.randint(0, 2**62, (1,), generator=rng))
        return np.random.default_rng(seed)
    raise TypeError(f"rng must be a numpy.random.Generator or torch.Generator, not {type(rng).__name__}")


class _Seeded:
    """A transform owning a seeded numpy Generator, used when a call passes no ``rng``."""

    def __init__(self, seed: int | None) -> None:
        self.rng = np.random.default_rng(seed)

    def _rng(self, rng: Any) -> np.random.Generator:
        return self.rng if rng is None else _as_numpy_rng(rng)


class ImageAugment(_Seeded):
    """Random resized crop, horizontal flip (where meaning allows), colour jitter and light blur.

    Returns an RGB PIL image of ``size`` x ``size``. The crop follows the usual recipe: area fraction
    in ``scale``, aspect ratio log-uniform in ``ratio``, ten tries, then a centre crop.
    """

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.6, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip_p: float = 0.5,
        color_jitter: float = 0.2,
        blur_p: float = 0.1,
        blur_radius: tuple[float, float] = (0.1, 1.0),
        seed: int | None = 0,
    ) -> None:
        super().__init__(seed)
        self.size = int(size)
        self.scale = scale
        self.ratio = ratio
        self.hflip_p = hflip_p
        self.color_jitter = color_jitter
        self.blur_p = blur_p
        self.blur_radius = blur_radius

    def _crop_box(self, rng: np.random.Generator, width: int, height: int) -> tuple[int, int, int, int]:
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                x = int(rng.integers(0, width - w + 1))
                y = int(rng.integers(0, height - h + 1))
                return x, y, x + w, y + h
        side = min(width, height)  # fallback: the largest centred square
        x, y = (width - side) // 2, (height - side) // 2
        return x, y, x + side, y + side

    def __call__(self, image: Image.Image, *, allow_flip: bool = True, rng: Any = None) -> Image.Image:
        """Augment one image; ``allow_flip=False`` for direction- or text-bearing concepts."""
        rng = self._rng(rng)
        image = pil_to_rgb(image)
        box = self._crop_box(rng, *image.size)
        image = image.resize((self.size, self.size), Image.Resampling.BICUBIC, box=box)
        # Always draw, even when not flipping, so the random stream does not depend on allow_flip.
        flip = rng.random() < self.hflip_p
        if flip and allow_flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.color_jitter > 0:
            j = self.color_jitter
            order = rng.permutation(3)
            factors = rng.uniform(1 - j, 1 + j, size=3)
            enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
            for i in order:
                image = enhancers[i](image).enhance(float(factors[i]))
        if rng.random() < self.blur_p:
            image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(*self.blur_radius))))
        return image


class TextAugment(_Seeded):
    """Alias choice and whole-word masking on a sample's captions.

    Called with a sample dict (``captions``/``text``), a list of captions or one string; returns one
    caption. Words are masked independently with ``whole_word_mask_p``; a caption of one word is
    never masked and at least one word always stays visible.
    """

    def __init__(
        self,
        alias_choice: bool = True,
        whole_word_mask_p: float = 0.15,
        mask_token: str = "[MASK]",
        seed: int | None = 0,
    ) -> None:
        super().__init__(seed)
        self.alias_choice = alias_choice
        self.whole_word_mask_p = whole_word_mask_p
        self.mask_token = mask_token

    @staticmethod
    def _captions(sample: Any) -> list[str]:
        if isinstance(sample, str):
            return [sample]
        if isinstance(sample, dict):
            caps = list(sample.get("captions") or [])
            return caps or [sample.get("text", "")]
        return list(sample)

    def __call__(self, sample: Any, *, rng: Any = None) -> str:
        rng = self._rng(rng)
        captions = [c for c in self._captions(sample) if c and c.strip()] or [""]
        index = int(rng.integers(0, len(captions))) if self.alias_choice else 0
        words = captions[index].split()
        if len(words) < 2 or self.whole_word_mask_p <= 0:
            return " ".join(words)
        masked = rng.random(len(words)) < self.whole_word_mask_p
        if masked.all():
            masked[int(rng.integers(0, len(words)))] = False
        return " ".join(self.mask_token if m else w for w, m in zip(words, masked))
