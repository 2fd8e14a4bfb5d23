"""Training-side data adapter around `oner.data`: per-sample seeded augmentation, an epoch sampler
for map-style data, and `StreamingPairs` for shards streamed without conversion.

Two augmentation backends (`--augment_backend`): `pil` augments each sample with PIL in
`__getitem__` and the processor converts the batch; `tensor` keeps each image as a uint8 tensor of
one size (cached for map-style data), draws the same per-sample choices in `__getitem__`, and
`TensorBatchCollator` augments and normalises the whole batch at once (`oner.data.TensorAugment`).

Why not hand `ImageAugment`/`TextAugment` to the collator directly: their random generators would
advance inside DataLoader workers (copies) and be skipped over by `skip_first_batches`, so a
resumed run would see different augmentations. Here each sample's randomness is a pure function of
`(seed, epoch, index)`, which makes a killed-and-resumed run bit-identical with any worker count.
"""

from __future__ import annotations

import hashlib
import itertools
from typing import Any

import numpy as np
import torch

from oner.data import ImageAugment, ImageTextCollator, TextAugment, flip_allowed, load_image_text_dataset
from oner.data.augment import SampleDraws, StyleAugment, TensorAugment
from oner.data.pairs import decode_and_count
from oner.data.stats import DataStats


# Decoded samples kept in memory, per loading process, up to this many bytes of pixels: the embedded
# data (about 60 MB decoded) is decoded once instead of once per epoch; a large data set fills the
# budget and the rest is decoded on every visit, as before.
DECODED_CACHE_BYTES = 1 << 30


class AugmentedPairs(torch.utils.data.Dataset):
    """Wraps a map-style `ImageTextDataset`; item `i` of epoch `e` is augmented with RNG `(seed, e, i)`.

    Items are `{"image": PIL, "text": str, "captions": [str]}` or `None` for a damaged sample (the
    collator drops and counts it). With `tensor_augment` (the tensor backend; `image_augment` is then
    unused) items are `{"pixels": uint8 (3, S, S), "draws": SampleDraws, "text", "captions"}` for
    `TensorBatchCollator`. Decoded samples (or their uint8 pixels) are cached (see
    `DECODED_CACHE_BYTES`); damaged ones are not, so each visit counts them again, as without the cache.
    """

    def __init__(
        self,
        dataset,
        image_augment: ImageAugment | None,
        text_augment: TextAugment | None,
        seed: int = 0,
        limit: int | None = None,
        tensor_augment: TensorAugment | None = None,
    ):
        self.dataset = dataset
        self.image_augment = image_augment
        self.text_augment = text_augment
        self.tensor_augment = tensor_augment
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
            if sample is not None and self.tensor_augment is not None:
                sample = with_pixels(sample, self.tensor_augment)
            if sample is not None and self._decoded_bytes < DECODED_CACHE_BYTES:
                self._decoded[index] = sample
                self._decoded_bytes += _pixel_bytes(sample)
        return sample

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        index = int(index)
        sample = self._decoded_sample(index)
        if sample is None:
            return None
        allow_flip = self._flip_allowed.get(index)
        if allow_flip is None:
            allow_flip = self._flip_allowed[index] = flip_allowed(sample["captions"])
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return augmented(sample, self.image_augment, self.text_augment, allow_flip, rng, self.tensor_augment)


def with_pixels(sample: dict, tensor_augment: TensorAugment) -> dict:
    """A decoded sample with its image replaced by the tensor backend's uint8 pixels and source size."""
    pixels, source_size = tensor_augment.to_pixels(sample["image"])
    return {"pixels": pixels, "source_size": source_size, "text": sample["text"], "captions": sample["captions"]}


def _pixel_bytes(sample: dict) -> int:
    if "pixels" in sample:
        return sample["pixels"].numel()
    width, height = sample["image"].size
    return width * height * len(sample["image"].getbands())


def augmented(sample: dict, image_augment: ImageAugment | None, text_augment: TextAugment | None,
              allow_flip: bool, rng: np.random.Generator, tensor_augment: TensorAugment | None = None) -> dict[str, Any]:
    """A decoded sample after its augmentations, all drawn from `rng`: `{"image", "text", "captions"}`,
    or with `tensor_augment` (the sample from `with_pixels`) `{"pixels", "draws", "text", "captions"}`,
    the image augmented later with its batch. Both backends draw the image's choices, then the
    caption's, from the same stream (the tensor backend's style draws come last), so they pick the
    same crops, flips, jitter and captions."""
    text = sample["text"]
    if tensor_augment is not None:
        image_draws = tensor_augment.draw_image(rng, sample["source_size"], allow_flip)
        if text_augment is not None:
            text = text_augment(sample, rng=rng)
        draws = SampleDraws(sample["source_size"], image_draws, tensor_augment.draw_style(rng, sample["captions"]))
        return {"pixels": sample["pixels"], "draws": draws, "text": text, "captions": [text]}
    image = sample["image"]
    if image_augment is not None:
        image = image_augment(image, allow_flip=allow_flip, rng=rng)
    if text_augment is not None:
        text = text_augment(sample, rng=rng)
    return {"image": image, "text": text, "captions": [text]}


class TensorBatchCollator:
    """Batch the tensor backend's items: drop `None` (counted as `dropped_in_collate`), augment and
    normalise all images at once with `tensor_augment` (the processor's mean, std and rescale), and
    tokenise all captions in one processor call. Streams' items add `"sample_keys"`. Returns `None`
    when every sample of the batch was damaged (the loop skips that step)."""

    def __init__(self, processor, tensor_augment: TensorAugment, stats: DataStats | None = None):
        self.processor = processor
        self.tensor_augment = tensor_augment
        self.stats = stats if stats is not None else DataStats()
        images = processor.image_processor
        self.mean, self.std = list(images.image_mean), list(images.image_std)
        self.rescale = float(images.rescale_factor)

    def __call__(self, samples):
        good = []
        for sample in samples:
            if sample is None:
                self.stats.record("dropped_in_collate")
            else:
                good.append(sample)
        if not good:
            return None
        batch = self.processor(text=[s["text"] for s in good], return_tensors="pt", padding=True, truncation=True)
        pixels = torch.stack([s["pixels"] for s in good])
        batch["pixel_values"] = self.tensor_augment(pixels, [s["draws"] for s in good], self.mean, self.std,
                                                    self.rescale)
        if all("key" in s for s in good):
            batch["sample_keys"] = [s["key"] for s in good]
        return batch


def make_collator(dataset, processor):
    """The collator for `dataset`'s backend: `TensorBatchCollator` or the processor's `ImageTextCollator`."""
    if getattr(dataset, "tensor_augment", None) is not None:
        return TensorBatchCollator(processor, dataset.tensor_augment, stats=dataset.stats)
    return ImageTextCollator(processor, stats=dataset.stats)


class EpochSampler(torch.utils.data.Sampler[int]):
    """A fresh permutation of `range(n)` per epoch, drawn from `seed + epoch` (same on every rank).

    Accelerate shards its batches across processes and `skip_first_batches` skips whole batches,
    so the data position after a resume is exact.
    """

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed, self.epoch = n, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())


def open_train_data(args, seed: int, image_size: int, rank: int = 0, world_size: int = 1):
    """`--train_data` opened for training: `AugmentedPairs` (map-style) or this process's part of a
    stream (`StreamingPairs`), or a clear error.

    Raises `ValueError`/`FileNotFoundError` (from `oner.data`) for a missing or empty path, a missing
    shard, a glob matching nothing, a missing column or an unreachable Hub data set, and
    `ValueError` for a map-style data set with no pairs.
    """
    source = load_image_text_dataset(
        args.train_data, image_column=args.image_column, text_column=args.text_column, streaming=args.streaming,
        config_name=args.dataset_config_name, revision=args.dataset_revision,
    )
    jitter = {"color_jitter": args.color_jitter} if getattr(args, "color_jitter", None) is not None else {}
    image_augment = ImageAugment(size=image_size, seed=seed, **jitter) if args.image_augment else None
    text_augment = (
        TextAugment(alias_choice=True, whole_word_mask_p=args.caption_mask_probability, seed=seed)
        if args.text_augment
        else None
    )
    tensor_augment = None
    if getattr(args, "augment_backend", "tensor") == "tensor":
        tensor_augment = TensorAugment(image_size, image_augment, style_augment(args))
        image_augment = None  # its draws live on in tensor_augment
    if isinstance(source, torch.utils.data.IterableDataset):
        return open_stream(source, args, seed, image_augment, text_augment, rank, world_size, tensor_augment)
    if len(source) == 0:
        raise ValueError(f"{args.train_data} holds no image-text pairs")
    if args.train_filter:
        source.hf_dataset = filter_rows(source.hf_dataset, args.train_filter, args.train_data)
    return AugmentedPairs(source, image_augment, text_augment, seed=seed, limit=args.max_train_samples,
                          tensor_augment=tensor_augment)


# train.py flag -> StyleAugment field
STYLE_FLAGS = {"hue_jitter": "hue", "greyscale_probability": "greyscale_p", "randconv_probability": "randconv_p",
               "outline_probability": "outline_p", "style_keeps_named_colours": "keep_named_colours"}


def style_augment(args) -> StyleAugment:
    """The style augmentations `args` ask for (each off unless its flag is set)."""
    return StyleAugment(**{field: getattr(args, flag) for flag, field in STYLE_FLAGS.items() if hasattr(args, flag)})


def open_stream(source, args, seed, image_augment, text_augment, rank: int, world_size: int,
                tensor_augment: TensorAugment | None = None) -> StreamingPairs:
    """Shuffle the shard order per epoch, filter and cap the rows, and split them between processes."""
    from datasets.distributed import split_dataset_by_node

    stream = source.hf_dataset
    # buffer_size=1: datasets shuffles the SHARD order (anew per epoch) and nothing else; rows are
    # shuffled by StreamingPairs' buffer, whose content a checkpoint keeps.
    stream = stream.shuffle(seed=seed, buffer_size=1)
    if args.train_filter:
        stream = filter_rows(stream, args.train_filter, args.train_data)
    if args.max_train_samples:
        stream = stream.take(args.max_train_samples)
    if world_size > 1 and stream.n_shards % world_size and rank == 0:
        print(f"{args.train_data}: {stream.n_shards} shards for {world_size} processes: each process reads every "
              f"shard and keeps every {world_size}th row; a multiple of {world_size} shards reads each once")
    source.hf_dataset = split_dataset_by_node(stream, rank=rank, world_size=world_size)
    return StreamingPairs(source, image_augment, text_augment, seed=seed, buffer_size=args.shuffle_buffer, rank=rank,
                          tensor_augment=tensor_augment)


def filter_rows(table, spec: str, source: str):
    """The rows of `table` (a `datasets.Dataset` or a stream) whose metadata column equals a value:
    `"skin_tone=false"` (case-insensitive string comparison, so booleans and numbers work as written).

    Raises ValueError naming the column when it is missing (for a stream, when its columns are known
    before reading) and, for a `Dataset`, when no row is left. A stream is filtered as it is read.
    """
    import datasets

    column, value = parse_filter(spec)
    columns = list(table.column_names or [])
    if columns and column not in columns:
        raise ValueError(f"--train_filter {spec!r}: {source} has no column {column!r}; columns: {columns}")
    if isinstance(table, datasets.IterableDataset):
        return table.filter(lambda row: str(row[column]).lower() == value)
    keep = [i for i, v in enumerate(table[column]) if str(v).lower() == value]
    if not keep:
        raise ValueError(f"--train_filter {spec!r}: no row of {source} has {column} = {value!r}")
    return table.select(keep)


def parse_filter(spec: str) -> tuple[str, str]:
    """`"skin_tone=false"` -> `("skin_tone", "false")`; ValueError for anything else."""
    column, sep, value = spec.partition("=")
    column, value = column.strip(), value.strip().lower()
    if not sep or not column:
        raise ValueError(f"--train_filter {spec!r}: expected column=value, e.g. skin_tone=false")
    return column, value


def make_stream_loader(dataset: StreamingPairs, processor, batch_size: int, num_workers: int):
    """A torchdata `StatefulDataLoader` over a stream: its `state_dict()` (the stream's position in
    every worker) goes into each checkpoint, so a resumed run continues exactly where it stopped."""
    import warnings

    from torchdata.stateful_dataloader import StatefulDataLoader

    with warnings.catch_warnings():  # torchdata 0.11 calls torch.set_vital, which torch now calls deprecated
        warnings.filterwarnings("ignore", message=".*set_vital.*")
        return StatefulDataLoader(
            dataset,
            batch_size=batch_size,
            collate_fn=CountingCollator(make_collator(dataset, processor)),
            drop_last=True,  # equal shapes on every rank; a rank's last partial batch waits for no one
            num_workers=num_workers,
        )


def make_dataloader(dataset: AugmentedPairs, processor, batch_size: int, seed: int, num_workers: int):
    """DataLoader over `dataset` with its backend's collator (drops damaged samples). Its sampler, an
    `EpochSampler`, is `loader.sampler`; accelerate's prepared loader passes `set_epoch` on to it."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochSampler(len(dataset), seed=seed),
        collate_fn=CountingCollator(make_collator(dataset, processor)),
        drop_last=True,  # every rank and micro-batch the same size: gathers need equal shapes
        num_workers=num_workers,
        persistent_workers=False,  # workers are re-forked each epoch and see the new epoch number
    )


# ---------------------------------------------------------------------------------------------
# Data counts of the batches trained on
# ---------------------------------------------------------------------------------------------

COUNTS_KEY = "data_counts"


class CountingCollator:
    """A collator (`make_collator`'s) whose batches also carry, under `COUNTS_KEY`, the data counters of the
    process that made them (a loader worker or the training process) up to and including the
    batch: `DataStats.own_counts()`, `[row, *counters]`."""

    def __init__(self, collator: ImageTextCollator | TensorBatchCollator):
        self.collator = collator

    def __call__(self, samples):
        batch = self.collator(samples)
        if batch is not None:  # an all-damaged batch: the next batch of the same process carries its counts
            batch[COUNTS_KEY] = self.collator.stats.own_counts()
        return batch


class TrainedDataCounts:
    """The data counters (good and damaged samples by kind) of the whole run, as far as it trained.

    Loaders read ahead (accelerate's prepared loader by one batch, loader workers by their prefetch),
    so `DataStats` also counts samples no step has used yet; a checkpoint holding those would count
    them again after a resume. Instead each batch carries its maker's counts (`CountingCollator`),
    the newest per maker are kept (`consume`), and at the end of an epoch, when every sample read
    belongs to it, the counters are taken whole (`epoch_ended`). `restored`: the totals a resumed
    checkpoint holds (all processes), to which this run's are added.
    """

    def __init__(self, stats, restored: dict | None = None):
        self.stats = stats
        self.restored = dict(restored or {})
        self.by_maker: dict[int, torch.Tensor] = {}

    def consume(self, batch: dict) -> None:
        counts = batch.pop(COUNTS_KEY).cpu()
        self.by_maker[int(counts[0])] = counts[1:]

    def epoch_ended(self) -> None:
        self.by_maker = dict(enumerate(self.stats.rows()))

    def totals(self, accelerator) -> dict[str, int]:
        """Summed over processes (every process must call it: a collective) plus the restored totals."""
        local = sum(self.by_maker.values(), torch.zeros_like(self.stats.rows()[0]))
        if accelerator.num_processes > 1:
            local = accelerator.reduce(local.to(accelerator.device), reduction="sum").cpu()
        counts = self.stats.counts_dict(local)
        return {name: value + int(self.restored.get(name, 0)) for name, value in counts.items()}


# ---------------------------------------------------------------------------------------------
# Streams: shards read in order, never converted or copied
# ---------------------------------------------------------------------------------------------

KEY_COLUMNS = ("__key__", "key", "id", "uid")  # a sample's own name, when the source has one


class StreamingPairs(torch.utils.data.IterableDataset):
    """This process's part of a streamed data set: shuffled through a buffer, decoded, augmented.

    The stream (`datasets.IterableDataset`, rows still undecoded) arrives already split between
    processes (`split_dataset_by_node`: whole shards per process when their number divides the
    process count, else every n-th row) and with its shard order shuffled per epoch. Rows pass
    through a shuffle buffer of `buffer_size` rows, then are decoded; damaged ones are counted in
    `stats` and skipped, as for map-style data. Each sample's augmentation is drawn from
    `(seed, epoch, its key)`, so it does not depend on the number of processes or loader workers.

    Exact resume: `state_dict()` is the stream's position, the rows in the buffer and the buffer's
    random state, taken between batches. `datasets`' own shuffle buffer is not saved with its
    position (a resume would drop the rows in it), which is why the buffer lives here. With loader
    workers, torchdata's `StatefulDataLoader` keeps one such state per worker. In the loading
    process the position is `datasets`' own `state_dict()` (it seeks to the row). Inside a worker,
    datasets 5.2 restores a position before it splits the shards between workers and fails, so a
    worker counts the rows it read and skips that many on resume (reading, not decoding, them
    again): the order within a worker is fixed by (seed, epoch, worker), so it is the same row.
    """

    def __init__(self, source, image_augment: ImageAugment | None, text_augment: TextAugment | None,
                 seed: int = 0, buffer_size: int = 1000, rank: int = 0, tensor_augment: TensorAugment | None = None):
        self.source = source  # an oner.data ImageTextIterableDataset: columns, stats, hf_dataset
        self.image_augment = image_augment
        self.text_augment = text_augment
        self.tensor_augment = tensor_augment  # the tensor backend (then `image_augment` is None)
        self.seed, self.rank = int(seed), int(rank)
        self.buffer_size = max(int(buffer_size), 1)
        self.epoch = 0
        self._buffer: list[dict] = []
        self._rows_read = 0  # rows taken from the stream this epoch, in this worker
        self._in_worker = False
        self._rng: np.random.Generator | None = None
        self._restored: dict | None = None  # a state to continue from at the next __iter__

    @property
    def stats(self):
        return self.source.stats

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def state_dict(self) -> dict:
        if self._rng is None:  # not started, or restored and not yet resumed
            return dict(self._restored) if self._restored else {"epoch": self.epoch}
        return {"epoch": self.epoch, "rows_read": self._rows_read,
                "stream": None if self._in_worker else self.source.hf_dataset.state_dict(),
                "buffer": list(self._buffer), "rng": self._rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self._restored = state if "rows_read" in state else None

    def __iter__(self):
        stream = self.source.hf_dataset
        stream.set_epoch(self.epoch)  # a new shard order per epoch
        worker = torch.utils.data.get_worker_info()
        self._in_worker = worker is not None
        self._rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker.id if worker else 0])
        self._buffer, self._rows_read, skip = [], 0, 0
        if self._restored is not None:
            if self._in_worker:
                skip = self._rows_read = self._restored["rows_read"]
            else:
                stream.load_state_dict(self._restored["stream"])
                self._rows_read = self._restored["rows_read"]
            self._buffer = list(self._restored["buffer"])
            self._rng.bit_generator.state = self._restored["rng"]
            self._restored = None
        for row in itertools.islice(stream, skip, None):
            self._rows_read += 1
            if len(self._buffer) < self.buffer_size:
                self._buffer.append(row)
                continue
            index = int(self._rng.integers(len(self._buffer)))
            row, self._buffer[index] = self._buffer[index], row
            sample = self._sample(row)
            if sample is not None:
                yield sample
        while self._buffer:  # the stream is done: empty the buffer in random order
            row = self._buffer.pop(int(self._rng.integers(len(self._buffer))))
            sample = self._sample(row)
            if sample is not None:
                yield sample

    def _sample(self, row: dict) -> dict | None:
        """Decode and augment one row; None (counted in `stats`) when it is damaged."""
        sample = decode_and_count(row, self.source.image_column, self.source.text_column, self.stats)
        if sample is None:
            return None
        key = sample_key(row, self.source.text_column)
        rng = np.random.default_rng([self.seed, self.epoch, _key_number(key)])
        allow_flip = flip_allowed(sample["captions"])
        if self.tensor_augment is not None:
            sample = with_pixels(sample, self.tensor_augment)
        return {**augmented(sample, self.image_augment, self.text_augment, allow_flip, rng, self.tensor_augment),
                "key": key}


def sample_key(row: dict, text_column: str) -> str:
    """A row's name: its key column (webdataset's `__key__`, or key/id/uid), else its caption."""
    for column in KEY_COLUMNS:
        if row.get(column) is not None:
            return str(row[column])
    return str(row.get(text_column))


def _key_number(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
