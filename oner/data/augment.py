"""Augmentations without torchvision: PIL + numpy only.

Determinism: each transform owns a ``numpy.random.Generator`` made from ``seed``; a call may pass
its own ``rng`` (a numpy Generator) instead. Training passes one per sample, seeded from the run's
seed, the epoch and the sample's index (``oner.training.data``), so draws depend on no worker's or
process's history and a resumed run repeats them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
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


# Concepts named by their colour: colour words and skin tones (half of the embedded rows are skin-tone
# variants that differ in nothing else).
_NAMED_COLOUR = re.compile(
    r"\b(red|orange|yellow|green|blue|purple|violet|brown|black|white|grey|gray|pink|gold|golden|silver|"
    r"blond|blonde|skin|tone|colou?r|colou?red|rainbow)\b",
    re.IGNORECASE,
)


def colour_allowed(captions: str | Sequence[str]) -> bool:
    """False when any caption names a colour or a skin tone, which a hue change, greyscale or a
    random convolution would change (the counterpart of `flip_allowed` for colour)."""
    items = [captions] if isinstance(captions, str) else list(captions)
    return not any(_NAMED_COLOUR.search(c) for c in items)


def flip_allowed(captions: str | Sequence[str]) -> bool:
    """False when any caption names something a horizontal flip would change (left/right, arrows,
    text or digits, clocks, flags, pointing hands, ...)."""
    items = [captions] if isinstance(captions, str) else list(captions)
    return not any(_NO_FLIP.search(c) for c in items)


class _Seeded:
    """A transform owning a seeded numpy Generator, used when a call passes no ``rng``."""

    def __init__(self, seed: int | None) -> None:
        self.rng = np.random.default_rng(seed)

    def _rng(self, rng: np.random.Generator | None) -> np.random.Generator:
        if rng is None:
            return self.rng
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator, not {type(rng).__name__}")
        return rng


# Colour jitter's three operations, in the order of `AugmentParams.jitter`'s factors.
_ENHANCERS = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)


@dataclass(frozen=True)
class AugmentParams:
    """One sample's draws of `ImageAugment`, shared by the PIL and the batched tensor backend.

    ``box``: the crop ``(left, top, right, bottom)`` in the source image's pixels; ``flip``: mirror
    (already False where the caption forbids it); ``jitter``: ``(order, factors)``, the order of
    (brightness, contrast, saturation) and their factors, or None; ``blur_radius``: None for no blur.
    """

    box: tuple[int, int, int, int]
    flip: bool
    jitter: tuple[tuple[int, ...], tuple[float, float, float]] | None
    blur_radius: float | None


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

    def draw(self, rng: np.random.Generator, width: int, height: int, allow_flip: bool = True) -> AugmentParams:
        """One sample's random choices for a `width` x `height` image; both backends apply these.

        Every draw is made whatever `allow_flip` says, so the random stream (and the draws after it,
        e.g. the caption's) does not depend on it.
        """
        box = self._crop_box(rng, width, height)
        flip = rng.random() < self.hflip_p
        jitter = None
        if self.color_jitter > 0:
            j = self.color_jitter
            order = rng.permutation(3)
            factors = rng.uniform(1 - j, 1 + j, size=3)
            jitter = (tuple(int(i) for i in order), tuple(float(f) for f in factors))
        blur = float(rng.uniform(*self.blur_radius)) if rng.random() < self.blur_p else None
        return AugmentParams(box=box, flip=bool(flip and allow_flip), jitter=jitter, blur_radius=blur)

    def apply(self, image: Image.Image, params: AugmentParams) -> Image.Image:
        """The PIL backend: `params` (from `draw`) applied to one RGB image."""
        image = image.resize((self.size, self.size), Image.Resampling.BICUBIC, box=params.box)
        if params.flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if params.jitter is not None:
            order, factors = params.jitter
            for i in order:
                image = _ENHANCERS[i](image).enhance(factors[i])
        if params.blur_radius is not None:
            image = image.filter(ImageFilter.GaussianBlur(radius=params.blur_radius))
        return image

    def __call__(self, image: Image.Image, *, allow_flip: bool = True,
                 rng: np.random.Generator | None = None) -> Image.Image:
        """Augment one image; ``allow_flip=False`` for direction- or text-bearing concepts."""
        rng = self._rng(rng)
        image = pil_to_rgb(image)
        return self.apply(image, self.draw(rng, *image.size, allow_flip=allow_flip))


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

    def __call__(self, sample: Any, *, rng: np.random.Generator | None = None) -> str:
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


# ---------------------------------------------------------------------------------------------
# The batched tensor backend: cached uint8 images, one batch of augmentations at a time
# ---------------------------------------------------------------------------------------------

# PIL's RGB -> L weights (libImaging/Convert.c: L24), exact on integer pixel values.
_LUMA = (19595, 38470, 7471)
# RGB <-> YIQ: a hue rotation is a rotation of the (I, Q) chroma plane.
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)
# Outlines: a colour step of OUTLINE_EDGE_LOW (of 255) starts an edge, one of OUTLINE_EDGE_LOW +
# OUTLINE_EDGE_SPAN is a full one. Anti-aliased rims stay out; a yellow face on white is in.
OUTLINE_EDGE_LOW, OUTLINE_EDGE_SPAN = 16.0, 48.0


@dataclass(frozen=True)
class StyleAugment:
    """Augmentations that keep an image's shapes and change its drawing style (tensor backend).

    Each is off at 0. ``hue``: a hue rotation uniform in ``[-hue, hue]`` turns (0.5 = any hue);
    ``greyscale_p``: probability of greyscale; ``randconv_p``: probability of a random convolution
    (RandConv, Xu et al., ICLR 2021: kernel size drawn from ``randconv_kernel_sizes``, weights
    N(0, 1/(3 k^2)), output ``a * x + (1 - a) * conv(x)`` with ``a ~ U(0, 1)`` on the normalised
    image, clamped to the range of real pixels); ``outline_p``: probability of a dark, broken outline
    along colour edges (ours: OpenMoji draws black outlines, Twemoji none). With
    ``keep_named_colours`` the colour-changing ones (hue, greyscale, RandConv) leave alone a sample
    whose captions name a colour or skin tone (`colour_allowed`), as flips leave mirrored meanings.
    """

    hue: float = 0.0
    greyscale_p: float = 0.0
    randconv_p: float = 0.0
    randconv_kernel_sizes: tuple[int, ...] = (1, 3, 5, 7)
    outline_p: float = 0.0
    keep_named_colours: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5] turns, got {self.hue}")
        for name in ("greyscale_p", "randconv_p", "outline_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")
        if not self.randconv_kernel_sizes or any(k < 1 or k % 2 == 0 for k in self.randconv_kernel_sizes):
            raise ValueError(f"randconv_kernel_sizes must be odd and >= 1, got {self.randconv_kernel_sizes}")

    @property
    def active(self) -> bool:
        return bool(self.hue or self.greyscale_p or self.randconv_p or self.outline_p)

    def draw(self, rng: np.random.Generator, size: int, allow_colour: bool = True) -> StyleParams:
        """One sample's style draws for a `size` x `size` output. Each augmentation draws from its own
        stream (one number from `rng` seeds them all), so turning one on changes no other's draws.
        `allow_colour=False` (a caption names a colour) turns hue, greyscale and RandConv off for
        this sample (with `keep_named_colours`)."""
        params = self._draw(rng, size)
        if allow_colour or not self.keep_named_colours:
            return params
        return StyleParams(hue=0.0, greyscale=False, randconv=None, outline=params.outline)

    def _draw(self, rng: np.random.Generator, size: int) -> StyleParams:
        root = int(rng.integers(0, 2**63))
        hue = greyscale = 0.0
        randconv = outline = None
        if self.hue:
            hue = float(np.random.default_rng([root, 0]).uniform(-self.hue, self.hue))
        if self.greyscale_p:
            greyscale = bool(np.random.default_rng([root, 1]).random() < self.greyscale_p)
        if self.randconv_p:
            r = np.random.default_rng([root, 2])
            if r.random() < self.randconv_p:
                k = int(r.choice(self.randconv_kernel_sizes))
                weights = r.normal(0.0, 1.0 / math.sqrt(3 * k * k), size=(3, 3, k, k)).astype(np.float32)
                randconv = (weights, float(r.uniform(0.0, 1.0)))
        if self.outline_p:
            r = np.random.default_rng([root, 3])
            if r.random() < self.outline_p:
                darkness, ink, keep = r.uniform(0.6, 1.0), r.uniform(0.0, 60.0), r.uniform(0.5, 1.0)
                outline = (float(darkness), float(ink), r.random((size, size)) < keep)
        return StyleParams(hue=hue, greyscale=bool(greyscale), randconv=randconv, outline=outline)


@dataclass(frozen=True)
class StyleParams:
    """One sample's `StyleAugment` draws: ``hue`` in turns (0: none); ``greyscale``; ``randconv``:
    ``(weights (3, 3, k, k), a)`` or None; ``outline``: ``(darkness, ink grey level, keep mask
    (size, size) bool)`` or None (the mask breaks the stroke: edge noise)."""

    hue: float
    greyscale: bool
    randconv: tuple[np.ndarray, float] | None
    outline: tuple[float, float, np.ndarray] | None


def cache_size(size: int, image_augment: ImageAugment | None) -> int:
    """Side of the cached uint8 images: the smallest crop `image_augment` can draw still holds
    `size` pixels across (no upsampling beyond what the source has); `size` without augmentation."""
    if image_augment is None:
        return int(size)
    low, (r_low, r_high) = image_augment.scale[0], image_augment.ratio
    smallest_side = min(1.0, math.sqrt(low / r_high), math.sqrt(low * r_low))
    return int(math.ceil(size / smallest_side - 1e-9))


@dataclass(frozen=True)
class SampleDraws:
    """What the batched backend needs of one sample besides its pixels: the source image's
    ``(width, height)``, its `ImageAugment` draws (None: no augmentation) and its style draws."""

    source_size: tuple[int, int]
    image: AugmentParams | None
    style: StyleParams | None


class TensorAugment:
    """The batched backend of `ImageAugment` (+ `StyleAugment`): images are cached once as uint8
    ``(3, S, S)`` tensors (`to_pixels`, S = `cache_size`), each sample's choices are drawn by
    `ImageAugment.draw` exactly as the PIL backend draws them, and a whole batch is augmented at
    once (`__call__`): crop + resize + flip in one `grid_sample`, colour jitter with PIL's
    arithmetic (per-sample order and factors, values floored after each operation as PIL's blend
    does), blur, the style augmentations, then the processor's normalisation.

    Without `image_augment` the cache holds the processor's own view (the centre square resized
    with PIL's bicubic to `size`), so the batch equals the processor's pixel values for square
    images (and is within resampling error for others).
    """

    def __init__(self, size: int, image_augment: ImageAugment | None = None, style: StyleAugment | None = None,
                 interpolation: str = "bicubic") -> None:
        self.size = int(size)
        self.image_augment = image_augment
        self.style = style if style is not None and style.active else None
        self.interpolation = interpolation
        self.cache_size = cache_size(self.size, image_augment)

    def to_pixels(self, image: Image.Image) -> tuple[Any, tuple[int, int]]:
        """An image -> (uint8 tensor (3, S, S), its (width, height)). With augmentation the whole
        image is squashed to S x S (crop boxes are drawn in its own pixels and mapped through)."""
        import torch

        rgb = pil_to_rgb(image)
        width, height = rgb.size
        box = (0, 0, width, height)
        if self.image_augment is None:
            side = min(width, height)
            left, top = (width - side) // 2, (height - side) // 2
            box = (left, top, left + side, top + side)
        rgb = rgb.resize((self.cache_size, self.cache_size), Image.Resampling.BICUBIC, box=box)
        return torch.from_numpy(np.array(rgb)).permute(2, 0, 1).contiguous(), (width, height)

    def draw_image(self, rng: np.random.Generator, source_size: tuple[int, int], allow_flip: bool) -> AugmentParams | None:
        return None if self.image_augment is None else self.image_augment.draw(rng, *source_size, allow_flip=allow_flip)

    def draw_style(self, rng: np.random.Generator, captions: Sequence[str] = ()) -> StyleParams | None:
        """The style draws of a sample with these captions (see `StyleAugment.draw`)."""
        if self.style is None:
            return None
        return self.style.draw(rng, self.size, allow_colour=colour_allowed(captions))

    def __call__(self, pixels, draws: Sequence[SampleDraws], mean: Sequence[float], std: Sequence[float],
                 rescale: float = 1 / 255):
        """uint8 `(B, 3, S, S)` + each sample's draws -> normalised float `(B, 3, size, size)`:
        `(x * rescale - mean) / std`, as the processor normalises."""
        import torch

        x = pixels.float()
        if self.image_augment is not None:
            params = [d.image for d in draws]
            x = _crop_resize_flip(x, params, [d.source_size for d in draws], self.size, self.interpolation)
            if params[0].jitter is not None:
                x = _color_jitter(x, params)
        elif x.shape[-1] != self.size:
            raise ValueError(f"cached pixels are {x.shape[-1]} px, expected {self.size}")
        styles = [d.style for d in draws] if self.style is not None else None
        if styles is not None:
            x = _hue_and_greyscale(x, styles)
        if self.image_augment is not None:
            x = _blur(x, [p.blur_radius for p in params])
        if styles is not None:
            x = _outline(x, styles)
        x = x.round().clamp(0, 255)  # PIL's images are uint8
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        x = (x * rescale - mean_t) / std_t
        if styles is not None:
            x = _randconv(x, styles, low=(0 - mean_t) / std_t, high=(255 * rescale - mean_t) / std_t)
        return x


def _crop_resize_flip(x, params: Sequence[AugmentParams], sizes: Sequence[tuple[int, int]], size: int, mode: str):
    """Each sample's crop box (in its source's pixels), resized to `size` and mirrored where drawn:
    one `affine_grid` + `grid_sample` for the batch. A box maps to the normalised coordinates of the
    cached (squashed) image, sampled at the same pixel centres as PIL's `resize(box=...)`."""
    import torch
    import torch.nn.functional as F

    boxes = torch.tensor([p.box for p in params], dtype=torch.float64)  # (B, 4): left, top, right, bottom
    extent = torch.tensor(sizes, dtype=torch.float64).repeat(1, 2)  # (B, 4): width, height, width, height
    left, top, right, bottom = (boxes / extent).unbind(1)
    mirror = torch.tensor([-1.0 if p.flip else 1.0 for p in params], dtype=torch.float64)
    zero = torch.zeros_like(left)
    theta = torch.stack([torch.stack([(right - left) * mirror, zero, left + right - 1.0], 1),
                         torch.stack([zero, bottom - top, top + bottom - 1.0], 1)], 1).float()
    grid = F.affine_grid(theta, [len(params), 3, size, size], align_corners=False)
    out = F.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=False)
    return out.round().clamp(0, 255)  # PIL's resize returns uint8


def _luma(x):
    """PIL's `convert("L")` of integer-valued RGB `(B, 3, H, W)` -> `(B, 1, H, W)`, rounded as PIL
    rounds. Exact in float32: every partial sum stays below 2**24."""
    y = x[:, 0:1] * _LUMA[0] + x[:, 1:2] * _LUMA[1] + x[:, 2:3] * _LUMA[2] + 0x8000
    return (y / 65536.0).floor_()


def _color_jitter(x, params: Sequence[AugmentParams]):
    """Brightness, contrast and saturation in each sample's own order, as `ImageEnhance` computes
    them: a blend `d + f * (x - d)` with a degenerate image d (black; the grey of the image's
    mean luma, rounded; the image's luma), clipped and floored to integers after each operation."""
    import torch

    order = torch.tensor([p.jitter[0] for p in params])  # (B, 3)
    factors = torch.tensor([p.jitter[1] for p in params], dtype=torch.float32)  # (B, 3)
    for step in range(3):
        op = order[:, step]
        f = factors.gather(1, op[:, None]).view(-1, 1, 1, 1)
        grey = _luma(x)
        mean = torch.floor(grey.mean(dim=(1, 2, 3), keepdim=True) + 0.5)
        is_contrast, is_saturation = (op == 1).view(-1, 1, 1, 1), (op == 2).view(-1, 1, 1, 1)
        degenerate = grey * is_saturation + mean * is_contrast  # brightness blends with black
        x = torch.addcmul(degenerate, x - degenerate, f).clamp_(0, 255).floor_()  # in PIL's order of float32 ops
    return x


def _blur(x, radii: Sequence[float | None]):
    """Gaussian blur (sigma = radius, as PIL's GaussianBlur; edges repeated) of the samples with a
    radius: one grouped separable convolution for all of them."""
    import torch
    import torch.nn.functional as F

    index = [i for i, r in enumerate(radii) if r is not None]
    if not index:
        return x
    sigma = torch.tensor([radii[i] for i in index], dtype=torch.float32)
    reach = int(math.ceil(3 * float(sigma.max())))
    taps = torch.arange(-reach, reach + 1, dtype=torch.float32)
    kernel = torch.exp(-(taps[None] ** 2) / (2 * sigma[:, None] ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(3, 0)  # (n*3, taps)
    n, (height, width) = len(index), x.shape[-2:]
    sub = F.pad(x[index].reshape(1, n * 3, height, width), (reach,) * 4, mode="replicate")
    sub = F.conv2d(sub, kernel.view(n * 3, 1, 1, -1), groups=n * 3)
    sub = F.conv2d(sub, kernel.view(n * 3, 1, -1, 1), groups=n * 3)
    x = x.clone()
    x[index] = sub.view(n, 3, height, width).round()
    return x


def _hue_and_greyscale(x, styles: Sequence[StyleParams]):
    """Hue rotation (in YIQ's chroma plane) and greyscale (PIL's luma), per sample."""
    import torch

    hues = torch.tensor([s.hue for s in styles], dtype=torch.float64)
    if bool((hues != 0).any()):
        angle = hues * 2 * math.pi
        rotation = torch.zeros(len(styles), 3, 3, dtype=torch.float64)
        rotation[:, 0, 0] = 1.0
        rotation[:, 1, 1] = rotation[:, 2, 2] = torch.cos(angle)
        rotation[:, 1, 2], rotation[:, 2, 1] = -torch.sin(angle), torch.sin(angle)
        matrix = (torch.from_numpy(_YIQ_TO_RGB) @ rotation @ torch.from_numpy(_RGB_TO_YIQ)).float()
        x = torch.einsum("bij,bjhw->bihw", matrix, x).clamp(0, 255).round()
    grey = torch.tensor([s.greyscale for s in styles]).view(-1, 1, 1, 1)
    if bool(grey.any()):
        x = torch.where(grey, _luma(x).expand_as(x), x)
    return x


def _outline(x, styles: Sequence[StyleParams]):
    """A dark stroke along colour edges (one pixel, on the darker side's neighbour), broken by each
    sample's keep mask: ``x + darkness * edge * (ink - x)``."""
    import torch

    index = [i for i, s in enumerate(styles) if s.outline is not None]
    if not index:
        return x
    sub = x[index]
    step = torch.zeros(sub.shape[0], *sub.shape[-2:])
    step[..., :, :-1] = (sub[..., :, 1:] - sub[..., :, :-1]).abs().amax(1)
    step[..., :-1, :] = torch.maximum(step[..., :-1, :], (sub[..., 1:, :] - sub[..., :-1, :]).abs().amax(1))
    edge = ((step - OUTLINE_EDGE_LOW) / OUTLINE_EDGE_SPAN).clamp(0, 1)
    darkness = torch.tensor([styles[i].outline[0] for i in index]).view(-1, 1, 1)
    ink = torch.tensor([styles[i].outline[1] for i in index]).view(-1, 1, 1, 1)
    keep = torch.from_numpy(np.stack([styles[i].outline[2] for i in index]))
    weight = (darkness * edge * keep).unsqueeze(1)
    x = x.clone()
    x[index] = sub + weight * (ink - sub)
    return x


def _randconv(x, styles: Sequence[StyleParams], low, high):
    """RandConv on the normalised images: each drawn sample convolved with its own random kernel
    (grouped convolution per kernel size, edges repeated), mixed with itself, clamped to [low, high]."""
    import torch
    import torch.nn.functional as F

    drawn = [i for i, s in enumerate(styles) if s.randconv is not None]
    if not drawn:
        return x
    x = x.clone()
    height, width = x.shape[-2:]
    for k in sorted({styles[i].randconv[0].shape[-1] for i in drawn}):
        index = [i for i in drawn if styles[i].randconv[0].shape[-1] == k]
        n = len(index)
        weights = torch.from_numpy(np.stack([styles[i].randconv[0] for i in index])).view(n * 3, 3, k, k)
        alpha = torch.tensor([styles[i].randconv[1] for i in index]).view(n, 1, 1, 1)
        sub = x[index]
        padded = F.pad(sub.reshape(1, n * 3, height, width), (k // 2,) * 4, mode="replicate") if k > 1 else \
            sub.reshape(1, n * 3, height, width)
        conv = F.conv2d(padded, weights, groups=n).view(n, 3, height, width)
        x[index] = torch.maximum(torch.minimum(alpha * sub + (1 - alpha) * conv, high), low)
    return x
