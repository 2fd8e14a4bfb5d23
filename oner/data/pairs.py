"""Image-text pairs from any source, for training and evaluation.

``load_image_text_dataset`` turns a source string into a torch data set yielding
``{"image": PIL.Image (RGB), "text": str, "captions": list[str]}``:

- ``"embedded"`` / ``"embedded:twemoji"`` / ``"embedded:openmoji"`` / ``"embedded:composites"``
  (the embedded set, built on first use);
- a folder with ``metadata.jsonl`` or ``metadata.csv`` (a ``datasets`` imagefolder);
- a ``.csv`` file with an image path column (relative to the CSV's folder) and a caption column;
- data files: webdataset ``.tar``, ``.parquet`` (both streamed by default), ``.jsonl`` or
  ``.csv`` (an image path column, relative to the file's folder, or an image bytes column), named
  as one file, a glob, a brace range (``'/data/{00000..00331}.tar'``) or a folder of them;
- a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``;
- a Hub data set name, with an optional configuration and revision (only when online; streamed
  by default).

Images are decoded here, not by ``datasets``, so that a damaged file is caught, counted in a
``DataStats`` by kind and skipped instead of crashing the run. A map-style data set cannot drop an
index, so ``__getitem__`` returns ``None`` for a damaged sample and ``ImageTextCollator`` drops it.
"""

from __future__ import annotations

import glob as globlib
import io
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from PIL import Image, UnidentifiedImageError

from processing_oner.processing_oner import pil_to_rgb

from .embedded import SPLITS, build_embedded_dataset
from .stats import DataStats

IMAGE_COLUMNS = ("image", "jpg", "png", "jpeg", "webp", "img")
TEXT_COLUMNS = ("text", "caption", "txt", "captions", "sentence", "label_text")
_SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
SAVED_STREAM_SHARDS = 64  # a streamed save_to_disk folder is cut into this many shards (at most)


class DamagedSample(Exception):
    """A sample that cannot be used; ``kind`` is one of ``stats.DAMAGE_KINDS``."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


# ----------------------------------------------------------------------------------------------
# Decoding one sample
# ----------------------------------------------------------------------------------------------


def _read_bytes(value: Any) -> tuple[bytes | None, Image.Image | None]:
    """Bytes (or an already decoded image) from a path, bytes, a datasets Image dict or a PIL image."""
    if isinstance(value, Image.Image):
        return None, value
    if isinstance(value, dict):  # datasets.Image(decode=False): {"bytes": ..., "path": ...}
        if value.get("bytes") is not None:
            return value["bytes"], None
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), None
    if isinstance(value, (str, os.PathLike)) and str(value):
        path = Path(value)
        if not path.is_file():
            raise DamagedSample("missing_file", str(path))
        try:
            return path.read_bytes(), None
        except OSError as e:
            raise DamagedSample("unreadable", f"{path}: {e}") from None
    raise DamagedSample("missing_file", f"no image in {type(value).__name__}")


def decode_image(value: Any) -> Image.Image:
    """Decode an image fully into RGB on white, or raise ``DamagedSample`` with the kind of damage.

    Decompression bombs count as damage whether PIL warns (more than ``MAX_IMAGE_PIXELS``) or
    refuses (more than twice that).
    """
    data, image = _read_bytes(value)
    if image is None:
        if len(data) == 0:
            raise DamagedSample("empty_file")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                image = Image.open(io.BytesIO(data))
                image.load()  # decode now: truncation only shows while reading pixel data
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
                raise DamagedSample("decompression_bomb", str(e)) from None
            except UnidentifiedImageError as e:
                raise DamagedSample("not_an_image", str(e)) from None
            except (OSError, SyntaxError, ValueError, EOFError) as e:
                kind = "truncated" if "truncated" in str(e).lower() or isinstance(e, EOFError) else "unreadable"
                raise DamagedSample(kind, str(e)) from None
    try:
        return pil_to_rgb(image)  # transparency on white: what the model sees at inference
    except (OSError, ValueError) as e:
        raise DamagedSample("unreadable", str(e)) from None


def _clean_captions(value: Any) -> list[str]:
    """Non-empty, stripped captions from a string, a list of strings or None."""
    if value is None:
        return []
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    items = [value] if isinstance(value, str) else list(value)
    return [str(c).strip() for c in items if c is not None and str(c).strip()]


def make_sample(row: dict, image_column: str, text_column: str) -> dict:
    """``{"image", "text", "captions"}`` from one raw row, or raise ``DamagedSample``.

    The caption is checked first: an empty caption is cheaper to find than a broken image.
    """
    captions = _clean_captions(row.get(text_column))
    if "captions" in row and text_column != "captions":
        extra = _clean_captions(row["captions"])
        captions = captions + [c for c in extra if c not in captions]
    if not captions:
        raise DamagedSample("empty_caption")
    image = decode_image(row.get(image_column))
    return {"image": image, "text": captions[0], "captions": captions}


def decode_and_count(row: dict, image_column: str, text_column: str, stats: DataStats, *,
                     count_ok: bool = True) -> dict | None:
    """``make_sample(row, ...)``, counted in ``stats``: the sample (counted ``ok``), or ``None`` with its
    damage counted by kind. Every reader decodes through this, so all count damage alike.

    ``count_ok=False`` for a second look at a sample a reader already counted (the collator's).
    """
    try:
        sample = make_sample(row, image_column, text_column)
    except DamagedSample as e:
        stats.record(e.kind)
        return None
    if count_ok:
        stats.record("ok")
    return sample


# ----------------------------------------------------------------------------------------------
# Torch data sets
# ----------------------------------------------------------------------------------------------


class ImageTextDataset(torch.utils.data.Dataset):
    """Map-style view of a ``datasets.Dataset``; a damaged item is counted and returned as ``None``."""

    def __init__(self, hf_dataset, image_column: str, text_column: str, stats: DataStats | None = None,
                 base_dir: str | Path | None = None) -> None:
        self.hf_dataset = hf_dataset
        self.image_column = image_column
        self.text_column = text_column
        self.stats = stats if stats is not None else DataStats()
        # CSV paths are relative to the CSV's folder, not to the current directory.
        self.base_dir = Path(base_dir) if base_dir is not None else None

    def __len__(self) -> int:
        return len(self.hf_dataset)

    def _resolve(self, row: dict) -> dict:
        value = row.get(self.image_column)
        if self.base_dir is not None and isinstance(value, str) and value and not os.path.isabs(value):
            row = dict(row)
            row[self.image_column] = str(self.base_dir / value)
        return row

    def __getitem__(self, index: int) -> dict | None:
        row = self._resolve(self.hf_dataset[int(index)])
        return decode_and_count(row, self.image_column, self.text_column, self.stats)

    @property
    def column_names(self) -> list[str]:
        return list(self.hf_dataset.column_names)


class ImageTextIterableDataset(torch.utils.data.IterableDataset):
    """Streaming view of a ``datasets.IterableDataset``; damaged samples are counted and skipped.

    Iteration inside DataLoader workers is split by ``datasets`` itself (by shard).
    """

    def __init__(self, hf_dataset, image_column: str, text_column: str, stats: DataStats | None = None) -> None:
        self.hf_dataset = hf_dataset
        self.image_column = image_column
        self.text_column = text_column
        self.stats = stats if stats is not None else DataStats()

    def __iter__(self) -> Iterator[dict]:
        for row in self.hf_dataset:
            sample = decode_and_count(row, self.image_column, self.text_column, self.stats)
            if sample is not None:
                yield sample

    def set_epoch(self, epoch: int) -> None:
        """Forward to ``datasets`` so that shuffling buffers change per epoch."""
        if hasattr(self.hf_dataset, "set_epoch"):
            self.hf_dataset.set_epoch(epoch)

    @property
    def column_names(self) -> list[str]:
        return list(self.hf_dataset.column_names or [])


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------


def _pick_column(columns: Sequence[str], wanted: str | None, candidates: Sequence[str], what: str) -> str:
    """``wanted`` if it is a column, else the first candidate present (case-insensitive)."""
    if wanted is not None:
        if wanted in columns:
            return wanted
        raise ValueError(f"{what} column {wanted!r} not found; columns found: {list(columns)}")
    lowered = {c.lower(): c for c in columns}
    for name in candidates:
        if name in lowered:
            return lowered[name]
    raise ValueError(
        f"no {what} column found (looked for {list(candidates)}); columns found: {list(columns)}; "
        f"pass {what}_column=..."
    )


def _no_decode(hf_dataset, column: str):
    """Keep image bytes/paths undecoded so that a damaged image reaches our own decoder."""
    import datasets

    features = getattr(hf_dataset, "features", None)
    if features is not None and isinstance(features.get(column), datasets.Image):
        return hf_dataset.cast_column(column, datasets.Image(decode=False))
    return hf_dataset


def _wrap(hf_dataset, image_column, text_column, base_dir=None):
    """Pick columns and wrap into the map-style or streaming torch data set."""
    import datasets

    columns = list(hf_dataset.column_names or [])
    if not columns and isinstance(hf_dataset, datasets.IterableDataset):
        # Some streaming builders only know their columns after the first example.
        columns = list(next(iter(hf_dataset)).keys())
    image_column = _pick_column(columns, image_column, IMAGE_COLUMNS, "image")
    text_column = _pick_column(columns, text_column, TEXT_COLUMNS, "text")
    hf_dataset = _no_decode(hf_dataset, image_column)
    if isinstance(hf_dataset, datasets.IterableDataset):
        return ImageTextIterableDataset(hf_dataset, image_column, text_column)
    return ImageTextDataset(hf_dataset, image_column, text_column, base_dir=base_dir)


def _select_split(obj, split: str, source: str):
    """One split of a DatasetDict (or the data set itself), with a clear error for a wrong name."""
    import datasets

    if isinstance(obj, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split not in obj:
            raise ValueError(f"split {split!r} not in {source}; splits found: {list(obj)}")
        return obj[split]
    return obj


def _load_embedded(source: str):
    """``embedded[:split]``: build the embedded set if needed and read one split as an imagefolder."""
    _, _, name = source.partition(":")
    name = name or "twemoji"
    if name not in SPLITS:
        raise ValueError(f"unknown embedded split {name!r}; choose one of {list(SPLITS)}")
    from .embedded import EMBEDDED_VERSION, default_root, read_manifest

    root = default_root()
    manifest = read_manifest(root)
    # Any finished build at the root is used as is (also a small one made with ``limit``);
    # otherwise build the full set there.
    if manifest is None or manifest.get("version") != EMBEDDED_VERSION:
        root = build_embedded_dataset(root)
    return root / name


#: Data files a source may name directly, by suffix, and the ``datasets`` builder that reads them.
SHARD_BUILDERS = {".tar": "webdataset", ".parquet": "parquet", ".jsonl": "json", ".json": "json",
                  ".csv": "csv", ".tsv": "csv"}
#: Shard formats streamed by default (``streaming=None``): web-scale data comes in these.
STREAMED_BY_DEFAULT = ("webdataset", "parquet")


def expand_shards(source: str) -> list[str]:
    """The data files a source names, in order: a brace range (open_clip's and webdataset's
    ``'/data/{00000..00331}.tar'``, expanded with ``braceexpand``), a glob, or one file. Returns ``[]``
    when the source is none of these (a folder, a Hub name).

    Raises ``ValueError`` for unbalanced braces or a range that expands to nothing, and
    ``FileNotFoundError`` naming the missing files when a brace range or glob names files that do
    not exist: a missing shard is an error, never a silently smaller data set.
    """
    if "{" in source or "}" in source:
        from braceexpand import UnbalancedBracesError, braceexpand

        try:
            names = list(braceexpand(source))
        except UnbalancedBracesError as e:
            raise ValueError(f"{source!r}: unbalanced braces in the shard range ({e})") from None
        if not names:
            raise ValueError(f"{source!r}: the brace range expands to no file name")
        files, missing = [], []
        for name in names:
            found = sorted(globlib.glob(name)) if any(ch in name for ch in "*?[") else ([name] if Path(name).is_file() else [])
            (files.extend(found) if found else missing.append(name))
        if missing:
            raise FileNotFoundError(f"{source!r}: {len(missing)} of {len(names)} shards do not exist "
                                    f"(first: {missing[:3]})")
        return files
    if any(ch in source for ch in "*?["):
        files = sorted(f for f in globlib.glob(source) if Path(f).is_file())
        if not files:
            raise FileNotFoundError(f"the pattern {source!r} matches no file")
        return files
    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() in SHARD_BUILDERS:
        return [str(path)]
    if path.is_dir() and _folder_kind(path) == "shards":
        return _folder_shards(path)
    return []


def _folder_shards(path: Path) -> list[str]:
    """The shard files of a folder: all ``.tar`` files, else all ``.parquet``, else all ``.jsonl``."""
    for suffix in (".tar", ".parquet", ".jsonl"):
        files = sorted(str(p) for p in path.glob(f"*{suffix}"))
        if files:
            return files
    return []


def shard_builder(files: Sequence[str], source: str) -> str:
    """The one ``datasets`` builder that reads all ``files``; ValueError for mixed or unknown types."""
    suffixes = sorted({Path(f).suffix.lower() for f in files})
    builders = {SHARD_BUILDERS.get(s) for s in suffixes}
    if None in builders:
        raise ValueError(f"{source}: unsupported file type {suffixes}; expected one of {sorted(SHARD_BUILDERS)}")
    if len(builders) > 1:
        raise ValueError(f"{source}: the shards mix file types {suffixes}; use one format per source")
    return builders.pop()


def _is_offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


def load_image_text_dataset(
    source: str,
    *,
    image_column: str | None = None,
    text_column: str | None = None,
    split: str = "train",
    streaming: bool | None = None,
    config_name: str | None = None,
    revision: str | None = None,
):
    """Open ``source`` (see module doc) as an ``ImageTextDataset`` (map-style) or, for streams,
    an ``ImageTextIterableDataset``. Both carry ``.stats`` (a ``DataStats``).

    ``streaming=None`` means: stream webdataset and parquet shards and Hub data sets, read
    everything else map-style. ``config_name`` and ``revision`` select a Hub data set's
    configuration and commit/branch/tag. Columns are auto-detected when not given (image:
    image/jpg/png/jpeg/webp; text: text/caption/txt/captions). Raises ``ValueError`` /
    ``FileNotFoundError`` naming the problem for a missing or empty path, a missing shard of a
    brace range, a glob matching nothing, missing columns, an unknown ``embedded:`` split, or a Hub
    name offline.
    """
    import datasets

    if not isinstance(source, (str, os.PathLike)) or not str(source).strip():
        raise ValueError("source is empty: give 'embedded', a folder, a .csv, .tar shards, or a Hub name")
    source = str(source)

    if source == "embedded" or source.startswith("embedded:"):
        source = str(_load_embedded(source))

    files = expand_shards(source)
    path = Path(source).expanduser()

    if files:
        builder = shard_builder(files, source)
        stream = builder in STREAMED_BY_DEFAULT if streaming is None else bool(streaming)
        if len(files) == 1 and Path(files[0]).stat().st_size == 0:
            raise ValueError(f"{files[0]} is empty")
        options = {"sep": "\t"} if files[0].lower().endswith(".tsv") else {}
        ds = datasets.load_dataset(builder, data_files={split: files}, split=split, streaming=stream, **options)
        if builder in ("csv", "json"):  # image paths in a table are relative to the table's folder
            base = Path(files[0]).parent
            if stream:
                return _wrap(ds.map(_absolute_paths(base, image_column)), image_column, text_column)
            return _wrap(ds, image_column, text_column, base_dir=base)
        return _wrap(ds, image_column, text_column)

    if path.is_file():
        if path.stat().st_size == 0:
            raise ValueError(f"{path} is empty")
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; expected one of {sorted(SHARD_BUILDERS)}")

    if path.is_dir():
        kind = _folder_kind(path)
        if kind == "saved":
            obj = _select_split(datasets.load_from_disk(str(path)), split, source)
            if streaming:
                # Enough shards for split_dataset_by_node to give each process whole shards.
                obj = obj.to_iterable_dataset(num_shards=max(1, min(len(obj), SAVED_STREAM_SHARDS)))
            return _wrap(obj, image_column, text_column)
        if kind == "imagefolder":
            ds = datasets.load_dataset("imagefolder", data_dir=str(path), split=split, streaming=bool(streaming))
            return _wrap(ds, image_column, text_column)
        if not any(path.iterdir()):
            raise ValueError(f"{path} is an empty folder")
        raise ValueError(
            f"{path} is not a data set: expected metadata.jsonl or metadata.csv (imagefolder), "
            ".tar/.parquet/.jsonl shards, or a save_to_disk folder; found "
            f"{sorted(p.name for p in path.iterdir())[:10]}"
        )

    if looks_like_local_path(source):
        raise FileNotFoundError(f"{source} does not exist")
    if _is_offline():
        raise FileNotFoundError(
            f"{source!r} is not a local path, and the Hub cannot be reached offline "
            "(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set); give a local folder, CSV or .tar shards"
        )
    ds = datasets.load_dataset(source, config_name, split=split, revision=revision,
                               streaming=True if streaming is None else bool(streaming))
    return _wrap(ds, image_column, text_column)


#: Suffixes that make a name a file name: the data files above, and images.
_FILE_SUFFIXES = (*SHARD_BUILDERS, ".png", ".jpg")


def looks_like_local_path(name: str) -> bool:
    """Whether a name that does not exist was meant as a local path rather than a Hub id ("name" or
    "owner/name"), for a "does not exist" error instead of a Hub look-up.

    A Hub id never starts with ".", "/" or "~", never ends with "/", and holds no backslash and at most
    one "/"; a name ending in a data or image file's suffix is taken for a mistyped file (a Hub repository
    named like a file is allowed, but unheard of). Used for data sources and model sources alike.
    """
    return (
        name.startswith((".", "/", "~"))
        or name.endswith("/")
        or name.count("/") > 1
        or "\\" in name
        or Path(name).suffix.lower() in _FILE_SUFFIXES
    )


def _folder_kind(path: Path) -> str:
    """What a folder holds: 'saved', 'imagefolder', 'shards' (.tar/.parquet/.jsonl files) or 'unknown'."""
    if any((path / m).is_file() for m in _SAVED_MARKERS):
        return "saved"
    if (path / "metadata.jsonl").is_file() or (path / "metadata.csv").is_file():
        return "imagefolder"
    if _folder_shards(path):
        return "shards"
    return "unknown"


def _absolute_paths(base: Path, image_column: str | None) -> Callable[[dict], dict]:
    """A ``map`` function making relative image paths in a streamed CSV absolute."""
    def fix(row: dict) -> dict:
        for col in ([image_column] if image_column else IMAGE_COLUMNS):
            value = row.get(col)
            if isinstance(value, str) and value and not os.path.isabs(value):
                row[col] = str(base / value)
        return row
    return fix


# ----------------------------------------------------------------------------------------------
# Collation
# ----------------------------------------------------------------------------------------------


class ImageTextCollator:
    """Batch samples for the model: drop ``None`` and damaged items (counted), call the processor.

    ``processor(text=[...], images=[...], return_tensors="pt", padding=True, truncation=True)`` is
    called on the surviving samples; samples with a ``"key"`` add ``"sample_keys"`` (a list) to the
    batch. Samples arrive augmented (``oner.training.data`` draws each one's augmentation). Returns
    ``None`` when every sample of the batch was damaged: the training loop should skip that step.
    """

    def __init__(self, processor: Callable[..., Any], stats: DataStats | None = None) -> None:
        self.processor = processor
        self.stats = stats if stats is not None else DataStats()

    def _check(self, sample: Any) -> dict | None:
        """A usable sample, or None (counted) for None, an empty caption or a non-image."""
        if sample is None:
            self.stats.record("dropped_in_collate")
            return None
        # The reader counted this sample as ok already; here only damage it let through counts.
        decoded = decode_and_count(sample, "image", "text", self.stats, count_ok=False)
        return None if decoded is None else {**sample, **decoded}

    def __call__(self, samples: Sequence[dict | None]):
        good = [s for s in (self._check(s) for s in samples) if s is not None]
        if not good:
            return None
        batch = self.processor(text=[s["text"] for s in good], images=[s["image"] for s in good],
                               return_tensors="pt", padding=True, truncation=True)
        if all("key" in s for s in good):  # streams name their samples: the loop can tell which it trained on
            batch["sample_keys"] = [s["key"] for s in good]
        return batch
