"""Image<->text retrieval, R@1/5/10 in both directions, several captions per image allowed.

Protocol of COCO/Flickr30k zero-shot retrieval: every caption is a text->image query with one
relevant image; every image is an image->text query whose relevant texts are all its captions
(a hit on any of them counts).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from .base import Suite
from .context import BenchmarkError, EvalContext, ImageLike, recall_metrics
from .embedded_data import read_split


def image_text_retrieval(ctx: EvalContext, images: list[ImageLike], captions: list[list[str]], cache_key=None,
                         desc: str = "") -> dict[str, float | int]:
    """Retrieval metrics for `n` images, image i described by `captions[i]` (one or more strings).

    Returns `i2t_R@k`, `t2i_R@k`, their `chance_*` levels (expected recall of a random ranking)
    and the counts `n_images`, `n_captions`.
    """
    if not images:
        raise BenchmarkError(f"{desc or 'retrieval'}: no images to evaluate")
    texts, owner = [], []
    for i, caps in enumerate(captions):
        if not caps:
            raise BenchmarkError(f"{desc or 'retrieval'}: image {i} has no caption")
        texts.extend(caps)
        owner.extend([i] * len(caps))
    image_emb = ctx.encode_images(images, desc=f"{desc} images", cache_key=cache_key)
    text_emb = ctx.encode_texts(texts, desc=f"{desc} captions")
    out = recall_from_embeddings(image_emb, text_emb, owner)
    out["n_images"] = len(images)
    out["n_captions"] = len(texts)
    return out


def recall_from_embeddings(image_emb: torch.Tensor, text_emb: torch.Tensor, owner: list[int],
                           ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """`i2t_R@k`, `t2i_R@k` and their `chance_*` levels from normalised `(n, d)` image and `(m, d)`
    text embeddings, text t describing image `owner[t]`."""
    from .context import rank

    by_image = [[] for _ in range(image_emb.shape[0])]
    for t, i in enumerate(owner):
        by_image[i].append(t)
    top = max(ks)
    out: dict[str, float] = {}
    out.update(recall_metrics(rank(image_emb, text_emb, top), by_image, text_emb.shape[0], prefix="i2t_", ks=ks))
    out.update(recall_metrics(rank(text_emb, image_emb, top), [[i] for i in owner], image_emb.shape[0],
                              prefix="t2i_", ks=ks))
    return out


@dataclass
class EmbeddedRetrieval(Suite):
    """Retrieval over one single-emoji split of the embedded set (name + aliases as captions)."""

    split: str = "openmoji"

    def run(self, ctx: EvalContext) -> dict[str, float | int]:
        rows = ctx.cap(read_split(ctx.data_root, self.split))
        paths = [r["path"] for r in rows]
        return image_text_retrieval(ctx, paths, [r["captions"] for r in rows],
                                    cache_key=(self.split, tuple(paths)), desc=self.name)


@dataclass
class ImageTextRetrieval(Suite):
    """Retrieval on any user image-caption data that `oner.data.load_image_text_dataset` reads:
    an imagefolder with metadata.jsonl/csv, a CSV, webdataset shards, a save_to_disk folder."""

    source: str = ""
    image_column: str | None = None
    text_column: str | None = None
    split: str = "train"
    data_stats: dict = field(default_factory=dict)

    def run(self, ctx: EvalContext) -> dict[str, float | int]:
        images, captions = load_pairs(self, ctx.max_items)
        out = image_text_retrieval(ctx, images, captions, desc=self.name)
        out["n_skipped"] = self.data_stats.get("skipped", 0)
        return out


def load_pairs(suite: ImageTextRetrieval, max_items: int | None) -> tuple[list, list[list[str]]]:
    """Decoded images and caption lists from the suite's source; damaged samples skipped, counted
    in `suite.data_stats`. Raises `BenchmarkError` for an unreadable source or no usable sample."""
    from oner.data import load_image_text_dataset

    try:
        ds = load_image_text_dataset(suite.source, image_column=suite.image_column, text_column=suite.text_column,
                                     split=suite.split, streaming=None)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise BenchmarkError(f"{suite.name}: cannot read {suite.source!r}: {e}") from e
    images, captions = [], []
    iterator = iter(ds) if not hasattr(ds, "__getitem__") else (ds[i] for i in range(len(ds)))
    for sample in iterator:
        if sample is None:
            continue  # damaged: already counted in ds.stats
        images.append(sample["image"])
        captions.append(sample["captions"])
        if max_items is not None and len(images) >= max_items:
            break
    suite.data_stats = ds.stats.as_dict()
    if not images:
        raise BenchmarkError(f"{suite.name}: {suite.source!r} holds no usable image-caption pair "
                             f"({ds.stats.summary()})")
    return images, captions
