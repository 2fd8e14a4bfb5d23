"""Multimodal retrieval: a joint image+text query, embedded as ONE sequence, retrieves an image.

Query = a composite + the name of one of its objects, through `get_multimodal_features`; gallery =
every single-emoji Twemoji image; the relevant item = that object's own image. The text-only query
(the name alone) is reported beside it: the joint query should do at least as well, since the
composite shows what the object looks like in context.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import Suite
from .context import BenchmarkError, EvalContext, rank, recall_metrics
from .embedded_data import read_split


@dataclass
class MultimodalRetrieval(Suite):
    """Composite + object name -> the object's single Twemoji image."""

    gallery_split: str = "twemoji"

    def run(self, ctx: EvalContext) -> dict[str, float | int]:
        gallery = read_split(ctx.data_root, self.gallery_split)
        by_name: dict[str, list[int]] = {}
        for i, row in enumerate(gallery):
            by_name.setdefault(row["name"], []).append(i)
        rows = ctx.cap(read_split(ctx.data_root, "composites"))
        images, texts, relevant = [], [], []
        for row in rows:
            for obj in row["objects"]:
                if obj["name"] in by_name:
                    images.append(row["path"])
                    texts.append(obj["name"])
                    relevant.append(by_name[obj["name"]])
        if not images:
            raise BenchmarkError(f"{self.name}: no composite object has an image in the {self.gallery_split!r} split")
        paths = [r["path"] for r in gallery]
        gallery_emb = ctx.encode_images(paths, desc=f"{self.gallery_split} gallery",
                                        cache_key=(self.gallery_split, tuple(paths)))
        joint = ctx.encode_multimodal(images, texts, desc="composite+name queries")
        out: dict[str, float | int] = {}
        out.update(recall_metrics(rank(joint, gallery_emb, 10), relevant, len(gallery), prefix=""))
        text_only = ctx.encode_texts(texts, desc="name-only queries")
        scores = recall_metrics(rank(text_only, gallery_emb, 10), relevant, len(gallery), prefix="text_only_")
        out.update({k: v for k, v in scores.items() if not k.startswith("chance_")})  # same chance
        out["n_queries"] = len(images)
        out["n_gallery"] = len(gallery)
        return out
