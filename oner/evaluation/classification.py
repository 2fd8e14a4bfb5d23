"""Zero-shot classification with a prompt-template ensemble (CLIP's ImageNet protocol).

Each class embedding is the normalised mean of the normalised embeddings of its name put into
every template; an image is assigned the class of highest cosine similarity.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from modeling_oner.modeling_oner import l2_normalize

from .base import Suite
from .context import BenchmarkError, EvalContext, ImageLike, rank, seeded_subset
from .embedded_data import read_split

#: Default templates for emoji (several phrasings; "{}" is the class name).
EMOJI_TEMPLATES = (
    "{}",
    "an emoji of {}",
    "a {} emoji",
    "an icon of {}",
    "a drawing of {}",
    "a picture of {}",
)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def check_templates(templates: Sequence[str]) -> list[str]:
    """Templates as a list; each must hold exactly one `{}` for the class name."""
    templates = [t for t in templates if t is not None]
    if not templates:
        raise BenchmarkError("no prompt templates given")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise BenchmarkError(f"each template needs exactly one '{{}}' for the class name; bad: {bad}")
    return templates


def class_embeddings(ctx: EvalContext, class_names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """`C` names x `T` templates -> `(C, projection_dim)`: normalised mean of normalised prompts."""
    prompts = [t.format(name) for name in class_names for t in templates]
    emb = ctx.encode_texts(prompts, desc="class prompts").reshape(len(class_names), len(templates), -1)
    return l2_normalize(emb.mean(dim=1))


def zero_shot_classification(ctx: EvalContext, images: list[ImageLike], labels: list[int],
                             class_names: Sequence[str], templates: Sequence[str], cache_key=None,
                             desc: str = "") -> dict[str, float | int]:
    """Top-1/top-5 accuracy (shipped `topk_accuracy` metric), chance levels and counts."""
    from .metrics import load_metric

    if not images:
        raise BenchmarkError(f"{desc or 'classification'}: no images to classify")
    if len(class_names) < 2:
        raise BenchmarkError(f"{desc or 'classification'}: needs at least 2 classes, got {list(class_names)}")
    templates = check_templates(templates)
    image_emb = ctx.encode_images(images, desc=f"{desc} images", cache_key=cache_key)
    ranked = rank(image_emb, class_embeddings(ctx, class_names, templates), 5)
    ks = [1, 5] if len(class_names) > 5 else [1]
    out: dict[str, float | int] = dict(load_metric("topk_accuracy").compute(predictions=ranked, references=labels, k=ks))
    counts = np.bincount(labels, minlength=len(class_names))
    for kk in ks:
        out[f"chance_top{kk}"] = kk / len(class_names)  # a random ranking, whatever the class balance
    out["chance_majority_top1"] = float(counts.max() / counts.sum())  # always answering the largest class
    out["n_images"] = len(images)
    out["n_classes"] = len(class_names)
    out["n_templates"] = len(templates)
    return out


@dataclass
class EmbeddedClassification(Suite):
    """Held-out-style (OpenMoji) emoji images classified into a metadata field's values.

    `field_name="group"`: the coarse emoji groups; `"subgroup"`: the finer sub-groups;
    `"name"`: `n_classes` concept names picked with a fixed seed (ImageNet-like N-way).
    """

    split: str = "openmoji"
    field_name: str = "group"
    n_classes: int | None = None
    templates: tuple[str, ...] = EMOJI_TEMPLATES

    def run(self, ctx: EvalContext) -> dict[str, float | int]:
        rows = read_split(ctx.data_root, self.split)
        if self.n_classes is not None:
            wanted = set(seeded_subset(sorted({r[self.field_name] for r in rows}), self.n_classes))
            rows = [r for r in rows if r[self.field_name] in wanted]
        rows = ctx.cap(rows)
        class_values = sorted({r[self.field_name] for r in rows})
        index = {v: i for i, v in enumerate(class_values)}
        paths = [r["path"] for r in rows]
        return zero_shot_classification(
            ctx, paths, [index[r[self.field_name]] for r in rows], [v.lower() if self.field_name != "name" else v
                                                                      for v in class_values],
            self.templates, cache_key=(self.split, tuple(paths)), desc=self.name,
        )


@dataclass
class FolderClassification(Suite):
    """Zero-shot classification of a labelled image folder: one sub-folder per class.

    `class_names`: None (sub-folder names, `_` -> space), a list in sorted sub-folder order, or a
    dict {sub-folder: class name}. `templates`: strings with one `{}`.
    """

    folder: str = ""
    class_names: list[str] | dict[str, str] | None = None
    templates: tuple[str, ...] = ("a photo of a {}.",)
    data_stats: dict = field(default_factory=dict)

    def run(self, ctx: EvalContext) -> dict[str, float | int]:
        folders, names = resolve_classes(Path(self.folder), self.class_names)
        images, labels = load_labelled_images(Path(self.folder), folders, ctx.max_items, self.data_stats)
        out = zero_shot_classification(ctx, images, labels, names, self.templates, desc=self.name)
        out["n_skipped"] = self.data_stats.get("skipped", 0)
        return out


def resolve_classes(folder: Path, class_names) -> tuple[list[str], list[str]]:
    """(sub-folder names, class names) in sorted sub-folder order; clear errors for mismatches."""
    if not folder.is_dir():
        raise BenchmarkError(f"{folder} is not a folder")
    folders = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise BenchmarkError(f"{folder} has no class sub-folders (expected {folder}/<class>/<image files>)")
    if class_names is None:
        return folders, [f.replace("_", " ") for f in folders]
    if isinstance(class_names, dict):
        unknown = sorted(set(class_names) - set(folders))
        if unknown:
            raise BenchmarkError(f"class names given for unknown classes {unknown}; sub-folders are {folders}")
        missing = [f for f in folders if f not in class_names]
        if missing:
            raise BenchmarkError(f"no class name given for sub-folders {missing}")
        names = [class_names[f] for f in folders]
    else:
        names = list(class_names)
        if len(names) != len(folders):
            raise BenchmarkError(f"{len(names)} class names given for {len(folders)} sub-folders {folders}")
    empty = [f for f, n in zip(folders, names) if not str(n).strip()]
    if empty:
        raise BenchmarkError(f"empty class name for sub-folders {empty}")
    return folders, [str(n).strip() for n in names]


def load_labelled_images(folder: Path, class_folders: list[str], max_items: int | None,
                         stats_out: dict) -> tuple[list, list[int]]:
    """Decoded images and labels; damaged files skipped and counted (`stats_out` gets the counts)."""
    from oner.data import DataStats, decode_image
    from oner.data.pairs import DamagedSample

    stats = DataStats()
    files = [(label, p) for label, name in enumerate(class_folders)
             for p in sorted((folder / name).rglob("*")) if p.suffix.lower() in IMAGE_EXTENSIONS]
    if max_items is not None:
        files = seeded_subset(files, max_items)
    images, labels = [], []
    for label, path in files:
        try:
            images.append(decode_image(path))
        except DamagedSample as e:
            stats.record(e.kind)
            continue
        stats.record("ok")
        labels.append(label)
    stats_out.update(stats.as_dict())
    if not images:
        raise BenchmarkError(f"{folder}: no readable image in its class sub-folders ({stats.summary()})")
    return images, labels


def read_lines_or_json(value: str | None):
    """A CLI value: a .json file (list or {folder: name}), a text file (one per line), or a
    comma-separated list. None stays None."""
    if value is None:
        return None
    path = Path(value).expanduser()
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            return json.loads(text)
        return [line.strip() for line in text.splitlines() if line.strip()]
    return [v.strip() for v in value.split(",") if v.strip()]
