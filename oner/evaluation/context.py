"""What every suite shares: the model loaded as a user loads it, batched encoders, ranking, chance.

All embeddings returned here are L2-normalised fp32 on the CPU, so that cosine similarity is a
plain matrix product and rankings do not depend on the model's logit scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from modeling_oner.modeling_oner import l2_normalize
from processing_oner.processing_oner import pil_to_rgb


class BenchmarkError(ValueError):
    """Bad input to the benchmark (not a model folder, empty data, unknown suite, ...)."""


ImageLike = Image.Image | str | Path


def load_model_and_processor(model_dir: str | Path, device: str | torch.device | None = None):
    """`AutoModel`/`AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)`, as a user does.

    Raises `BenchmarkError` with a readable message when `model_dir` is not a OneR model folder.
    """
    from transformers import AutoModel, AutoProcessor

    path = Path(model_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise BenchmarkError(f"{model_dir} is a file, not a model folder")
    if path.is_dir() and not (path / "config.json").is_file():
        raise BenchmarkError(
            f"{model_dir} is not a model folder: it has no config.json "
            "(expected the output of oner-init, train.py or save_pretrained)"
        )
    if not path.exists() and (str(model_dir).startswith((".", "/", "~")) or str(model_dir).count("/") > 1):
        raise BenchmarkError(f"{model_dir} does not exist")
    try:
        model = AutoModel.from_pretrained(str(model_dir), trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(str(model_dir), trust_remote_code=True)
    except (OSError, ValueError, KeyError) as e:
        raise BenchmarkError(f"cannot load a OneR model from {model_dir}: {e}") from e
    if type(model).__name__ == "CLIPModel":  # the two-tower baseline of train.py --architecture clip
        from oner.baseline import CLIPAsOneR

        model = CLIPAsOneR(model)
    for method in ("get_image_features", "get_text_features", "get_patch_features", "get_multimodal_features"):
        if not hasattr(model, method):
            raise BenchmarkError(f"{model_dir} holds a {type(model).__name__}, not a OneR model (no {method})")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), processor


def pooled(out: Any) -> torch.Tensor:
    """The `(n, d)` embedding from `get_image/text/multimodal_features`: `pooler_output` of the output
    object transformers 5's convention returns (OneR and CLIP alike), the tensor itself otherwise
    (transformers 4.x, and model folders saved before OneR followed the convention)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def patch_tokens(out: Any) -> torch.Tensor:
    """The `(n, num_patches, d)` patches from `get_patch_features`: `last_hidden_state` of an output
    object (its `pooler_output` is the pooled image embedding, not the patches), or the tensor."""
    return out if isinstance(out, torch.Tensor) else out.last_hidden_state


def open_image(item: ImageLike) -> Image.Image:
    """A PIL image from a PIL image or a path (RGB; transparency on white, as the data set stores it and
    OneR's processor does: its `pil_to_rgb`)."""
    if isinstance(item, Image.Image):
        return item
    with Image.open(item) as im:
        return pil_to_rgb(im).copy()  # a copy: the file (and `im`, when it is RGB already) closes here


@dataclass
class EvalContext:
    """The loaded model plus run settings; memoises embeddings so suites can share them."""

    model: Any
    processor: Any
    batch_size: int = 64
    progress: bool = True
    max_items: int | None = None
    data_root: Path | None = None
    output_dir: Path | None = None
    artifacts: dict[str, list[str]] = field(default_factory=dict)
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def image_size(self) -> int:
        return int(self.model.config.image_size)

    @property
    def grid_size(self) -> int:
        return self.image_size // int(self.model.config.patch_size)

    # ------------------------------------------------------------------ batching
    def _batched(self, n: int, desc: str, fn: Callable[[slice], torch.Tensor]) -> torch.Tensor:
        """Run `fn` on consecutive slices of `range(n)` with a progress bar; concatenate on the CPU."""
        from oner.progress import progress

        out = []
        with torch.inference_mode():
            # Outside a terminal the suite's own line reports: no line per batch.
            for start in progress(range(0, n, self.batch_size), desc=desc, unit="batch", disable=not self.progress,
                                  lines=False, leave=False):
                out.append(fn(slice(start, min(start + self.batch_size, n))).float().cpu())
        return torch.cat(out) if out else torch.empty(0)

    def _pixels(self, images: Sequence[ImageLike]) -> torch.Tensor:
        batch = self.processor(images=[open_image(im) for im in images], return_tensors="pt")
        return batch["pixel_values"].to(self.device)

    def _tokens(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        batch = self.processor(text=list(texts), return_tensors="pt", padding=True, truncation=True)
        return {"input_ids": batch["input_ids"].to(self.device), "attention_mask": batch["attention_mask"].to(self.device)}

    def _memo(self, key, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    # ------------------------------------------------------------------ encoders
    def encode_images(self, images: Sequence[ImageLike], desc: str = "images", cache_key=None) -> torch.Tensor:
        """`n` images -> `(n, projection_dim)` normalised image embeddings."""
        def compute():
            return l2_normalize(
                self._batched(len(images), f"encoding {desc}",
                              lambda s: pooled(self.model.get_image_features(pixel_values=self._pixels(images[s])))),
            )
        return self._memo(("image", cache_key), compute) if cache_key is not None else compute()

    def encode_texts(self, texts: Sequence[str], desc: str = "texts") -> torch.Tensor:
        """`n` texts -> `(n, projection_dim)` normalised text embeddings."""
        return l2_normalize(
            self._batched(len(texts), f"encoding {desc}", lambda s: pooled(self.model.get_text_features(**self._tokens(texts[s])))),
        )

    def encode_patches(self, images: Sequence[ImageLike], desc: str = "patches", cache_key=None) -> torch.Tensor:
        """`n` images -> `(n, num_patches, projection_dim)` normalised patch embeddings (row-major grid)."""
        def compute():
            return l2_normalize(
                self._batched(len(images), f"encoding {desc}",
                              lambda s: patch_tokens(self.model.get_patch_features(self._pixels(images[s])))),
            )
        return self._memo(("patch", cache_key), compute) if cache_key is not None else compute()

    def encode_multimodal(self, images: Sequence[ImageLike], texts: Sequence[str], desc: str = "image+text") -> torch.Tensor:
        """`n` (image i, text i) pairs, each ONE joint sequence -> `(n, projection_dim)` normalised."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        return l2_normalize(
            self._batched(
                len(images), f"encoding {desc}",
                lambda s: pooled(
                    self.model.get_multimodal_features(pixel_values=self._pixels(images[s]), **self._tokens(texts[s]))
                ),
            ),
        )

    def embed_images(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """ONE batch of images -> `(n, projection_dim)` normalised fp32 on the CPU, no progress bar
        (for callers that stream their data and show their own bar)."""
        with torch.inference_mode():
            return l2_normalize(pooled(self.model.get_image_features(pixel_values=self._pixels(images))).float().cpu())

    def cap(self, items: list, seed: int = 0) -> list:
        """At most `max_items` of `items`: a [`seeded_subset`] (all if no cap)."""
        return list(items) if self.max_items is None else seeded_subset(items, self.max_items, seed)


def seeded_subset(items: Sequence, size: int, seed: int = 0) -> list:
    """`size` of `items` drawn without replacement by a generator seeded with `seed`, kept in their
    original order (all of them when there are no more): the same subset on every run."""
    if len(items) <= size:
        return list(items)
    keep = np.sort(np.random.default_rng(seed).choice(len(items), size=int(size), replace=False))
    return [items[i] for i in keep.tolist()]


# ---------------------------------------------------------------------- ranking and chance


def rank(queries: torch.Tensor, keys: torch.Tensor, k: int) -> list[list[int]]:
    """Top-`k` key indices per query by cosine similarity: `(q, d)`, `(n, d)` -> q lists, best first."""
    sims = queries @ keys.T
    return sims.topk(min(k, keys.shape[0]), dim=1).indices.tolist()


def chance_recall(n_gallery: int, n_relevant: Sequence[int], k: int) -> float:
    """Expected Recall@k of a random ranking: mean over queries of 1 - C(N - m, k) / C(N, k)."""
    k = min(k, n_gallery)
    total = math.comb(n_gallery, k)
    return float(np.mean([1.0 - math.comb(n_gallery - m, k) / total for m in n_relevant]))


def recall_metrics(ranked: list[list[int]], relevant: list[list[int]], n_gallery: int, prefix: str,
                   ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """`{prefix}R@k` from the shipped `retrieval_recall` metric, plus `chance_{prefix}R@k`."""
    from .metrics import load_metric

    scores = load_metric("retrieval_recall").compute(predictions=ranked, references=relevant, k=list(ks))
    out = {f"{prefix}{name}": value for name, value in scores.items()}
    for kk in ks:
        out[f"chance_{prefix}R@{kk}"] = chance_recall(n_gallery, [len(r) for r in relevant], kk)
    return out
