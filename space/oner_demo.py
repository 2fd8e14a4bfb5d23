"""OneR demo: the inference behind the Space, as plain functions (no Gradio in here).

Each public function takes the values a Gradio component hands over (a file path or PIL image,
a string) and returns what a Gradio output component shows (a dict of probabilities, a PIL image,
a list of (image, caption) pairs). Bad input raises `InputError` with a message written for the
person using the demo; the app turns it into `gr.Error`.

The model is loaded the way a user loads it, through the Auto classes with remote code, so this
folder needs nothing from the OneR repository (a Space only has this folder).
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

HERE = Path(__file__).resolve().parent
EXAMPLES_DIR = HERE / "examples"
GALLERY_FILE = EXAMPLES_DIR / "gallery.jsonl"
# The embedded default training run writes here (the repository root is the parent of space/).
DEFAULT_LOCAL_MODEL = HERE.parent / "outputs" / "oner-tiny-embedded"

MAX_LABELS = 100  # a softmax over more labels than this is slow to show and hard to read
MAX_TEXT_CHARS = 300  # longer phrases are refused rather than silently truncated to the model's length
# Refuse to decode more than this many pixels (a 40-megapixel RGB image is 120 MB in memory).
MAX_PIXELS = 40_000_000
# Decode and keep at most this side: the model sees a few dozen pixels, the overlay a few hundred.
WORK_SIDE = 1024
HEATMAP_SIDE = 384  # side of the localization overlay shown to the user
TOP_K = 5


class InputError(ValueError):
    """Input the demo cannot use; the message is shown to the user as is."""


# ---------------------------------------------------------------------------------------------
# The model and the gallery
# ---------------------------------------------------------------------------------------------
@dataclass
class Gallery:
    """The demo's small image-caption set with its embeddings (computed once per model)."""

    files: list[Path]
    captions: list[str]
    image_embeds: torch.Tensor  # (n, d), L2-normalised
    text_embeds: torch.Tensor  # (n, d), L2-normalised


@dataclass
class Bundle:
    """A loaded model, its processor, and the gallery embeddings cached for it."""

    name: str
    model: Any
    processor: Any
    revision: str | None = None
    _gallery: Gallery | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def grid(self) -> int:
        """Patches per side of the model's input image."""
        return self.model.config.image_size // self.model.config.patch_size

    def gallery(self) -> Gallery:
        """The gallery embeddings, computed on first use and reused by every later request."""
        with self._lock:  # concurrent first requests must not embed the gallery twice
            if self._gallery is None:
                self._gallery = embed_gallery(self)
            return self._gallery


_ACTIVE: Bundle | None = None


def load_model(name: str | os.PathLike, revision: str | None = None) -> Bundle:
    """Load a OneR model folder or Hub id as a user does (Auto classes, remote code), in eval mode.

    `revision` (a commit hash, branch or tag) pins a Hub repository: weights, processor and the
    model's remote code all come from that commit. A local folder has no revisions; it is loaded
    as it is, with a warning if a revision was asked for.
    """
    from transformers import AutoModel, AutoProcessor

    name = str(name)
    if revision and Path(name).is_dir():
        warnings.warn(f"revision {revision!r} ignored: {name} is a local folder, not a Hub repository", stacklevel=2)
        revision = None
    pinned = {"revision": revision} if revision else {}
    model = AutoModel.from_pretrained(name, trust_remote_code=True, **pinned).eval()
    processor = AutoProcessor.from_pretrained(name, trust_remote_code=True, **pinned)
    return Bundle(name=name, model=model, processor=processor, revision=revision)


def activate(bundle: Bundle) -> Bundle:
    """Make `bundle` the model every demo function uses."""
    global _ACTIVE
    _ACTIVE = bundle
    return bundle


def active() -> Bundle:
    """The model the demo functions use (set by `activate`)."""
    if _ACTIVE is None:
        raise RuntimeError("no model loaded: call oner_demo.activate(oner_demo.load_model(MODEL)) first")
    return _ACTIVE


def read_gallery_file(path: Path = GALLERY_FILE) -> tuple[list[Path], list[str]]:
    """Gallery image paths and their captions from the `metadata.jsonl`-style gallery file."""
    files, captions = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            files.append(path.parent / row["file_name"])
            captions.append(row["text"])
    return files, captions


def embed_gallery(bundle: Bundle, path: Path = GALLERY_FILE) -> Gallery:
    """Embed every gallery image and caption once, in one batch each."""
    files, captions = read_gallery_file(path)
    images = []
    for file in files:
        with Image.open(file) as im:
            images.append(_to_rgb(im))
    return Gallery(files, captions, _image_embeds(bundle, images), _text_embeds(bundle, captions))


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------
def too_large_message(width: int, height: int) -> str:
    return (
        f"The image is {width}x{height} ({width * height / 1e6:.0f} megapixels); this demo accepts images "
        f"up to {MAX_PIXELS / 1e6:.0f} megapixels. Please upload a smaller image."
    )


NOT_AN_IMAGE = "The upload is not an image this demo can read. Please upload a PNG, JPEG, WebP, GIF or BMP file."
NO_IMAGE = "No image: upload an image or click one of the examples."


def image_error_message(error: BaseException) -> str:
    """A user-facing message for an exception raised while opening an upload."""
    if isinstance(error, Image.DecompressionBombError):
        return (
            f"The image is too large to open safely; this demo accepts images up to {MAX_PIXELS / 1e6:.0f} "
            "megapixels. Please upload a smaller image."
        )
    return NOT_AN_IMAGE


def open_image(image: Any) -> Image.Image:
    """A file path, PIL image or array -> RGB PIL image no larger than WORK_SIDE on its long side.

    The size is checked from the header BEFORE decoding, so a 20000x20000 upload is refused without
    allocating its pixels; JPEGs are decoded at a reduced scale when they are large (PIL's draft).
    """
    if image is None or (isinstance(image, str) and not image.strip()):
        raise InputError(NO_IMAGE)
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if isinstance(image, Image.Image):
        _check_size(*image.size)
        return _to_rgb(_shrink(image.copy()))
    try:
        with warnings.catch_warnings():
            # Our own pixel limit below is stricter than PIL's warning threshold.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(image) as im:
                _check_size(*im.size)
                return _to_rgb(_shrink(im))
    except InputError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as error:
        # OSError covers truncated files, SyntaxError and ValueError some malformed headers.
        raise InputError(image_error_message(error)) from error


def _check_size(width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise InputError(too_large_message(width, height))
    if width == 0 or height == 0:
        raise InputError(NOT_AN_IMAGE)


def _shrink(image: Image.Image) -> Image.Image:
    """Downscale in place to WORK_SIDE (thumbnail uses JPEG draft decoding) and return it."""
    image.thumbnail((WORK_SIDE, WORK_SIDE), Image.Resampling.LANCZOS)
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparency composited on white (what the embedded data set's images look like).

    The same rule as the processor's `pil_to_rgb` (processing_oner/processing_oner.py), kept here
    because a Space has only this folder."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def clean_text(text: Any, what: str) -> str:
    """A stripped, non-empty, not over-long phrase, or an InputError naming `what` it is."""
    text = "" if text is None else str(text).strip()
    if not text:
        raise InputError(f"The {what} is empty: please type a few words.")
    if len(text) > MAX_TEXT_CHARS:
        raise InputError(f"The {what} is {len(text)} characters long; please keep it under {MAX_TEXT_CHARS}.")
    return text


def parse_labels(labels: Any) -> list[str]:
    """Comma-separated labels -> a de-duplicated list (order kept), 1 to MAX_LABELS of them."""
    items = [part.strip() for part in str(labels or "").split(",")]
    unique = list(dict.fromkeys(item for item in items if item))
    if not unique:
        raise InputError("The label list is empty: type labels separated by commas, e.g. cat, dog, red apple.")
    if len(unique) > MAX_LABELS:
        raise InputError(
            f"Too many labels: {len(unique)} given; this demo scores at most {MAX_LABELS} at once. "
            "Please remove some."
        )
    too_long = [label for label in unique if len(label) > MAX_TEXT_CHARS]
    if too_long:
        raise InputError(f"A label is {len(too_long[0])} characters long; please keep labels under {MAX_TEXT_CHARS}.")
    return unique


def apply_template(template: Any, label: str) -> str:
    """Put `label` where `{}` is in the template (an empty template means the label alone)."""
    template = str(template or "").strip() or "{}"
    if "{}" not in template:
        raise InputError("The prompt template must contain {} where the label goes, e.g. 'a photo of a {}'.")
    return template.replace("{}", label)


# ---------------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------------
def _normalize(x: torch.Tensor) -> torch.Tensor:
    """Unit rows in fp32, as `modeling_oner.l2_normalize` (a Space has only this folder)."""
    return torch.nn.functional.normalize(x.float(), dim=-1)


def _pooled(out: Any) -> torch.Tensor:
    """`(n, d)` from `get_image/text/multimodal_features`: an output object's `pooler_output` under
    transformers 5 (as CLIP's), the tensor itself under 4.x or from a folder saved by older code."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _patch_tokens(out: Any) -> torch.Tensor:
    """`(n, num_patches, d)` from `get_patch_features`: an output object's `last_hidden_state`, or the tensor."""
    return out if isinstance(out, torch.Tensor) else out.last_hidden_state


def _pixels(bundle: Bundle, images: list[Image.Image]) -> torch.Tensor:
    return bundle.processor(images=images, return_tensors="pt")["pixel_values"]


def _tokens(bundle: Bundle, texts: list[str]) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # truncation to the model's text length is expected here
        out = bundle.processor(text=texts, return_tensors="pt", padding=True, truncation=True)
    return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}


@torch.inference_mode()
def _image_embeds(bundle: Bundle, images: list[Image.Image]) -> torch.Tensor:
    return _normalize(_pooled(bundle.model.get_image_features(pixel_values=_pixels(bundle, images))))


@torch.inference_mode()
def _text_embeds(bundle: Bundle, texts: list[str]) -> torch.Tensor:
    return _normalize(_pooled(bundle.model.get_text_features(**_tokens(bundle, texts))))


@torch.inference_mode()
def _multimodal_embeds(bundle: Bundle, images: list[Image.Image], texts: list[str]) -> torch.Tensor:
    return _normalize(
        _pooled(bundle.model.get_multimodal_features(pixel_values=_pixels(bundle, images), **_tokens(bundle, texts)))
    )


@torch.inference_mode()
def _softmax_scores(bundle: Bundle, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Probabilities of `query` (1, d) over `keys` (n, d) with the model's learned temperature."""
    return bundle.model.similarity(query, keys).softmax(dim=-1)[0]


def _ranked(files: list[Path], captions: list[str], scores: torch.Tensor, k: int, what: str) -> list[tuple[str, str]]:
    """The top-k gallery images as (path, "caption · what score") pairs, best first."""
    top = torch.topk(scores, min(k, len(scores)))
    return [(str(files[i]), f"{captions[i]} · {what} {s:.3f}") for s, i in zip(top.values.tolist(), top.indices.tolist())]


# ---------------------------------------------------------------------------------------------
# The demo's functions (one per tab action; the Gradio endpoints carry these names)
# ---------------------------------------------------------------------------------------------
def classify(image: Any, labels: str, template: str = "{}") -> dict[str, float]:
    """Zero-shot classification: probability of each label for the image, from one softmax."""
    bundle = active()
    names = parse_labels(labels)
    prompts = [apply_template(template, name) for name in names]
    picture = open_image(image)
    probs = _softmax_scores(bundle, _image_embeds(bundle, [picture]), _text_embeds(bundle, prompts))
    ranked = sorted(zip(names, probs.tolist()), key=lambda pair: -pair[1])
    return {name: round(p, 6) for name, p in ranked}


@torch.inference_mode()
def patch_similarity(bundle: Bundle, picture: Image.Image, phrase: str) -> np.ndarray:
    """Cosine similarity of the phrase to every image patch, as a (grid, grid) array.

    Patches and texts go through the same transformer and head, so they share one space.
    """
    patches = _normalize(_patch_tokens(bundle.model.get_patch_features(pixel_values=_pixels(bundle, [picture]))))[0]
    text = _text_embeds(bundle, [phrase])[0]
    return (patches @ text).reshape(bundle.grid, bundle.grid).numpy()


# The heatmap's colour map: viridis (dark purple -> teal -> yellow), as oner-eval's heatmaps
# (`oner.evaluation.localization.HEATMAP_COLORMAP`): matplotlib's viridis at 17 evenly spaced
# points, interpolated linearly (within 6 of 255 levels of it; this folder runs without matplotlib).
_RAMP = np.array([
    [68, 1, 84], [72, 24, 106], [71, 45, 123], [66, 64, 134], [59, 82, 139], [51, 99, 141], [44, 114, 142],
    [38, 130, 142], [33, 145, 140], [31, 160, 136], [40, 174, 128], [63, 188, 115], [94, 201, 98],
    [132, 212, 75], [173, 220, 48], [216, 226, 25], [253, 231, 37],
], dtype=np.float32)


def heatmap_colors(values: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) uint8 colours along `_RAMP`."""
    pos = np.clip(values, 0.0, 1.0) * (len(_RAMP) - 1)
    low = np.floor(pos).astype(int).clip(0, len(_RAMP) - 2)
    frac = (pos - low)[..., None]
    return (_RAMP[low] * (1 - frac) + _RAMP[low + 1] * frac).astype(np.uint8)


def overlay_heatmap(picture: Image.Image, similarity: np.ndarray, side: int = HEATMAP_SIDE) -> Image.Image:
    """The centre square the model sees, with the similarity map blended on and the best patch boxed."""
    # The processor resizes the short side and centre-crops: ImageOps.fit shows the same square.
    base = ImageOps.fit(picture, (side, side), Image.Resampling.BICUBIC, centering=(0.5, 0.5))
    low, high = float(similarity.min()), float(similarity.max())
    scaled = (similarity - low) / (high - low) if high > low else np.zeros_like(similarity)
    small = Image.fromarray(heatmap_colors(scaled))
    heat = small.resize((side, side), Image.Resampling.BILINEAR)
    blended = Image.blend(base, heat, alpha=0.55)
    grid = similarity.shape[0]
    row, col = np.unravel_index(int(np.argmax(similarity)), similarity.shape)
    cell = side / grid
    box = [col * cell, row * cell, (col + 1) * cell - 1, (row + 1) * cell - 1]
    ImageDraw.Draw(blended).rectangle(box, outline=(255, 0, 0), width=max(2, side // 128))
    return blended


def localize(image: Any, phrase: str) -> tuple[Image.Image, str]:
    """Zero-shot localization: a text-to-patch similarity heatmap and where it peaks."""
    bundle = active()
    phrase = clean_text(phrase, "phrase")
    picture = open_image(image)
    sim = patch_similarity(bundle, picture, phrase)
    row, col = np.unravel_index(int(np.argmax(sim)), sim.shape)
    summary = (
        f"Best patch for '{phrase}': row {row + 1}, column {col + 1} of a {sim.shape[0]}x{sim.shape[1]} grid "
        f"(cosine {sim.max():.3f}; map ranges {sim.min():.3f} to {sim.max():.3f})."
    )
    return overlay_heatmap(picture, sim), summary


def search_images(query: str) -> list[tuple[str, str]]:
    """Text -> image retrieval: the gallery images closest to the query, best first."""
    bundle = active()
    query = clean_text(query, "text query")
    gallery = bundle.gallery()
    probs = _softmax_scores(bundle, _text_embeds(bundle, [query]), gallery.image_embeds)
    return _ranked(gallery.files, gallery.captions, probs, TOP_K, "p")


def search_captions(image: Any) -> dict[str, float]:
    """Image -> text retrieval: the gallery captions closest to the image, as probabilities."""
    bundle = active()
    picture = open_image(image)
    gallery = bundle.gallery()
    probs = _softmax_scores(bundle, _image_embeds(bundle, [picture]), gallery.text_embeds)
    top = torch.topk(probs, min(TOP_K, len(probs)))
    return {gallery.captions[i]: round(p, 6) for p, i in zip(top.values.tolist(), top.indices.tolist())}


def multimodal_search(image: Any, phrase: str) -> tuple[list, list, list]:
    """Image + phrase as ONE sequence -> gallery images; beside it, image-only and text-only results.

    All three queries land in the same embedding space, so the columns differ only by what the
    query holds: the joint one can combine what the picture shows with what the phrase asks for.
    """
    bundle = active()
    phrase = clean_text(phrase, "phrase")
    picture = open_image(image)
    gallery = bundle.gallery()
    queries = {
        "joint": _multimodal_embeds(bundle, [picture], [phrase]),
        "image": _image_embeds(bundle, [picture]),
        "text": _text_embeds(bundle, [phrase]),
    }
    results = []
    for query in queries.values():
        probs = _softmax_scores(bundle, query, gallery.image_embeds)
        results.append(_ranked(gallery.files, gallery.captions, probs, TOP_K, "p"))
    return tuple(results)


# ---------------------------------------------------------------------------------------------
# Choosing the model
# ---------------------------------------------------------------------------------------------
NO_MODEL_HINT = (
    "No model given and no {default} folder: train one with `accelerate launch train.py`, or make an "
    "untrained one with `oner-init --preset tiny --output-dir DIR`, then pass --model DIR (or set ONER_MODEL)."
)


def space_model_id(readme: Path = HERE / "README.md") -> str | None:
    """The first entry of `models:` in the Space card's front matter (the model a Space serves)."""
    try:
        text = readme.read_text(encoding="utf-8")
    except OSError:
        return None
    if not text.startswith("---"):
        return None
    front = text.split("---", 2)[1].splitlines()
    for i, line in enumerate(front):
        if line.strip().startswith("models:"):
            inline = line.split(":", 1)[1].strip()
            if inline.startswith("["):
                first = inline.strip("[]").split(",")[0].strip().strip("'\"")
                return first or None
            for item in front[i + 1 :]:
                if item.strip().startswith("- "):
                    return item.strip()[2:].strip().strip("'\"") or None
                if item.strip():
                    break
    return None


def resolve_revision(cli_revision: str | None = None, environ: dict | None = None) -> str | None:
    """`--revision`, else `ONER_MODEL_REVISION` (set on a Space by `oner-push --space`), else None (latest)."""
    environ = os.environ if environ is None else environ
    revision = cli_revision or environ.get("ONER_MODEL_REVISION") or None
    if revision is not None and (not revision.strip() or any(c.isspace() for c in revision)):
        raise SystemExit(f"ONER_MODEL_REVISION / --revision must be a commit hash, branch or tag, got {revision!r}")
    return revision


def resolve_model(cli_model: str | None = None, environ: dict | None = None) -> str:
    """`--model`, else `ONER_MODEL`, else the embedded default run's folder, else (on a Space) the card's model.

    Raises SystemExit with a one-line hint when none applies.
    """
    environ = os.environ if environ is None else environ
    if cli_model:
        return cli_model
    if environ.get("ONER_MODEL"):
        return environ["ONER_MODEL"]
    if (DEFAULT_LOCAL_MODEL / "config.json").is_file():
        return str(DEFAULT_LOCAL_MODEL)
    if environ.get("SPACE_ID") and space_model_id():
        return space_model_id()
    raise SystemExit(NO_MODEL_HINT.format(default=DEFAULT_LOCAL_MODEL))
