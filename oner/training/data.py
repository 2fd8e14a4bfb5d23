"""Training-side data adapter around `oner.data`: per-sample seeded augmentation and an epoch sampler.

Why not hand `ImageAugment`/`TextAugment` to the collator directly: their random generators would
advance inside DataLoader workers (copies) and be skipped over by `skip_first_batches`, so a
resumed run would see different augmentations. Here each sample's randomness is a pure function of
`(seed, epoch, index)`, which makes a killed-and-resumed run bit-identical with any worker count.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from oner.data import ImageAugment, ImageTextCollator, TextAugment, flip_allowed, load_image_text_dataset


# Decoded samples kept in memory, per loading process, up to this many bytes of pixels: the embedded
# data (about 60 MB decoded) is decoded once instead of once per epoch; a large data set fills the
# budget and the rest is decoded on every visit, as before.
DECODED_CACHE_BYTES = 1 << 30


class AugmentedPairs(torch.utils.data.Dataset):
    """Wraps a map-style `ImageTextDataset`; item `i` of epoch `e` is augmented with RNG `(seed, e, i)`.

    Items are `{"image": PIL, "text": str, "captions": [str]}` or `None` for a damaged sample (the
    collator drops and counts it). Decoded samples are cached (see `DECODED_CACHE_BYTES`); damaged
    ones are not, so each visit counts them again, as without the cache.
    """

    def __init__(
        self,
        dataset,
        image_augment: ImageAugment | None,
        text_augment: TextAugment | None,
        seed: int = 0,
        limit: int | None = None,
    ):
        self.dataset = dataset
        self.image_augment = image_augment
        self.text_augment = text_augment
        self.seed = int(seed)
        self.epoch = 0
        self.length = len(dataset) if limit is None else min(int(limit), len(dataset))
        self._decoded: dict[int, dict] = {}
        self._flip_allowed: dict[int, bool] = {}  # a pure function of the captions: computed once
        self._decoded_bytes = 0

    @property
    def stats(self):
        return self.dataset.stats

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def _decoded_sample(self, index: int) -> dict | None:
        sample = self._decoded.get(index)
        if sample is not None:
            self.stats.record("ok")  # counted per visit, as an uncached read does
        else:
            sample = self.dataset[index]
            if sample is not None and self._decoded_bytes < DECODED_CACHE_BYTES:
                width, height = sample["image"].size
                self._decoded[index] = sample
                self._decoded_bytes += width * height * len(sample["image"].getbands())
        return sample

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        index = int(index)
        sample = self._decoded_sample(index)
        if sample is None:
            return None
        rng = np.random.default_rng([self.seed, self.epoch, index])
        image, text = sample["image"], sample["text"]
        if self.image_augment is not None:
            allow_flip = self._flip_allowed.get(index)
            if allow_flip is None:
                allow_flip = self._flip_allowed[index] = flip_allowed(sample["captions"])
            image = self.image_augment(image, allow_flip=allow_flip, rng=rng)
        if self.text_augment is not None:
            text = self.text_augment(sample, rng=rng)
        return {"image": image, "text": text, "captions": [text]}


class EpochSampler(torch.utils.data.Sampler[int]):
    """A fresh permutation of `range(n)` per epoch, drawn from `seed + epoch` (same on every rank).

    Accelerate shards its batches across processes and `skip_first_batches` skips whole batches,
    so the data position after a resume is exact.
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self.epoch = n, int(seed), shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.n))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())


def open_train_data(args, seed: int, image_size: int):
    """`load_image_text_dataset(args.train_data)` wrapped with augmentation, or a clear error.

    Raises `ValueError`/`FileNotFoundError` (from `oner.data`) for a missing or empty path or a
    missing column, and `ValueError` for a streaming source (not supported by this loop yet) or a
    data set with no pairs.
    """
    dataset = load_image_text_dataset(
        args.train_data, image_column=args.image_column, text_column=args.text_column, streaming=False
    )
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise ValueError(
            f"{args.train_data} opened as a stream; the training loop needs map-style data "
            "(a folder with metadata.jsonl/csv, a .csv, a save_to_disk folder or .tar shards read map-style)"
        )
    if len(dataset) == 0:
        raise ValueError(f"{args.train_data} holds no image-text pairs")
    if args.train_filter:
        dataset = filter_rows(dataset, args.train_filter, args.train_data)
    image_augment = ImageAugment(size=image_size, seed=seed) if args.image_augment else None
    text_augment = (
        TextAugment(alias_choice=True, whole_word_mask_p=args.caption_mask_probability, seed=seed)
        if args.text_augment
        else None
    )
    return AugmentedPairs(dataset, image_augment, text_augment, seed=seed, limit=args.max_train_samples)


def filter_rows(dataset, spec: str, source: str):
    """Keep the rows whose metadata column equals a value: `"skin_tone=false"` (case-insensitive
    string comparison, so booleans and numbers work as written). Raises ValueError naming the column
    when it is missing and when no row is left."""
    column, sep, value = spec.partition("=")
    column, value = column.strip(), value.strip().lower()
    if not sep or not column:
        raise ValueError(f"--train_filter {spec!r}: expected column=value, e.g. skin_tone=false")
    table = dataset.hf_dataset
    if column not in table.column_names:
        raise ValueError(f"--train_filter {spec!r}: {source} has no column {column!r}; columns: {table.column_names}")
    keep = [i for i, v in enumerate(table[column]) if str(v).lower() == value]
    if not keep:
        raise ValueError(f"--train_filter {spec!r}: no row of {source} has {column} = {value!r}")
    dataset.hf_dataset = table.select(keep)
    return dataset


def make_dataloader(dataset: AugmentedPairs, processor, batch_size: int, seed: int, num_workers: int):
    """DataLoader over `dataset` with the `oner.data` collator (drops damaged samples)."""
    sampler = EpochSampler(len(dataset), seed=seed)
    collator = ImageTextCollator(processor, stats=dataset.stats)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collator,
        drop_last=True,  # every rank and micro-batch the same size: gathers need equal shapes
        num_workers=num_workers,
        persistent_workers=False,  # workers are re-forked each epoch and see the new epoch number
    ), sampler
