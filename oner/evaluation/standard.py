"""The benchmarks researchers report: zero-shot classification and image<->text retrieval on
standard data sets, in LAION clip_benchmark's layouts, protocols and metric names.

Sources (`open_standard_set`):

- clip_benchmark's webdataset layout: `ROOT/<split>/nshards.txt`, `ROOT/<split>/0.tar ...`,
  `ROOT/classnames.txt`, `ROOT/zeroshot_classification_templates.txt`, `ROOT/dataset_type.txt`
  (`retrieval` for caption sets); a sample is `KEY.webp|png|jpg|jpeg` plus `KEY.cls` (class index)
  or `KEY.txt` (one caption per line). ROOT is a local folder, a brace range or glob of `.tar`
  shards (the text files then sit beside the shards or one folder up), or a Hub data set repo
  (`owner/name[@revision]`, `hf://datasets/owner/name[@revision]`, or clip_benchmark's
  `https://huggingface.co/datasets/owner/name/tree/revision`), streamed shard by shard;
- an image folder, one sub-folder per class;
- a table (`.csv`, `.tsv`, `.jsonl`, `.json` list, or a folder with `metadata.jsonl`/`metadata.csv`)
  with an image path column and either a class column or captions: a list per row (the Karpathy
  Flickr30k/COCO test layout as published on the Hub, e.g. nlphuji/flickr30k's `raw` column, a
  JSON list in a CSV cell) or one row per caption (rows of the same image are grouped). A `split`
  column keeps only the rows of the requested split;
- a `datasets` Hub data set (`owner/name[@revision]` without the webdataset files), streamed, with
  the same column rules (a `ClassLabel` column brings its class names).

Shortcuts (`imagenet1k`, `cifar10`, `flickr30k`, `mscoco_captions`, ...) name clip_benchmark's
webdataset repos on the Hub (`clip-benchmark/wds_<name>`); nothing is ever fetched offline.

Protocols (those of clip_benchmark's `zeroshot_classification` and `zeroshot_retrieval`):
classification averages the normalised embeddings of a class name put into every template and
renormalises; `acc1`, `acc5` (null with fewer than 5 classes) and `mean_per_class_recall` (the
mean over classes present in the labels of each class's top-1 recall). Retrieval ranks all images
for each caption (`image_retrieval_recall@k`) and all captions for each image
(`text_retrieval_recall@k`, a hit when ANY of the image's captions is in the top k).

Under `accelerate launch` every process reads and encodes its share (whole shards when there are
enough, else every n-th sample), the embeddings are gathered and put back in the data set's order,
so the numbers equal a single process's.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from .context import BenchmarkError, EvalContext

TASKS = ("zeroshot_classification", "zeroshot_retrieval")
#: clip_benchmark's webdataset repos on the Hub live in this organisation, as `wds_<name>`.
WDS_HUB_ORG = "clip-benchmark"
#: Shortcut -> clip_benchmark's webdataset name (its `benchmark/webdatasets.txt`).
SHORTCUTS = {
    "imagenet1k": "imagenet1k", "imagenetv2": "imagenetv2", "imagenet_sketch": "imagenet_sketch",
    "imagenet-a": "imagenet-a", "imagenet-r": "imagenet-r", "imagenet-o": "imagenet-o", "objectnet": "objectnet",
    "cifar10": "vtab/cifar10", "cifar100": "vtab/cifar100", "caltech101": "vtab/caltech101",
    "dtd": "vtab/dtd", "eurosat": "vtab/eurosat", "flowers": "vtab/flowers", "pets": "vtab/pets",
    "pcam": "vtab/pcam", "resisc45": "vtab/resisc45", "svhn": "vtab/svhn", "sun397": "sun397", "cars": "cars",
    "fgvc_aircraft": "fgvc_aircraft", "mnist": "mnist", "stl10": "stl10", "gtsrb": "gtsrb",
    "country211": "country211", "renderedsst2": "renderedsst2", "fer2013": "fer2013", "voc2007": "voc2007",
    "flickr8k": "flickr8k", "flickr30k": "flickr30k", "mscoco_captions": "mscoco_captions",
}
#: Sets whose default task is retrieval (clip_benchmark's `get_dataset_default_task`).
RETRIEVAL_SETS = ("flickr8k", "flickr30k", "mscoco_captions")
WDS_IMAGE_EXTENSIONS = ("webp", "png", "jpg", "jpeg")
TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")
IMAGE_COLUMN_NAMES = ("image", "img", "jpg", "png", "webp", "jpeg", "file_name", "filename", "filepath",
                      "image_path", "path")
CAPTION_COLUMN_NAMES = ("captions", "caption", "raw", "sentences", "text", "txt")
LABEL_COLUMN_NAMES = ("label", "labels", "cls", "class", "target")


# ---------------------------------------------------------------------------------------- sets


@dataclass
class StandardSet:
    """A data set ready to evaluate.

    `parts` are callables, each yielding `(image, target)` for one shard (or the whole set):
    `image` is anything `oner.data.decode_image` takes (bytes, a path, a datasets image dict);
    `target` a class index (classification) or a list of captions (retrieval).
    """

    dataset: str
    source: str
    kind: str  # "classification" | "retrieval"
    parts: list[Callable[[], Iterator[tuple[Any, Any]]]]
    class_names: list[str] | None = None
    templates: list[str] | None = None
    size: int | None = None
    sources: dict[str, str] = field(default_factory=dict)  # where class names / templates came from
    folders: list[str] | None = None  # an image folder's sub-folders (class names may be {sub-folder: name})
    label_strings: list[str] | None = None  # a table's class column when it holds names, not indices


def short_name(dataset: str) -> str:
    """`wds/vtab/cifar10` -> `vtab/cifar10`; a shortcut -> its webdataset name; else unchanged."""
    if dataset.startswith("wds/"):
        return dataset[len("wds/"):]
    return SHORTCUTS.get(dataset, dataset)


def hub_repo_of(dataset: str) -> str:
    """clip_benchmark's Hub repo for a webdataset name: `vtab/cifar10` -> `clip-benchmark/wds_vtab-cifar10`."""
    return f"{WDS_HUB_ORG}/wds_{short_name(dataset).replace('/', '-')}"


def default_task(dataset: str, kind: str | None = None) -> str:
    """The task `--task auto` picks: retrieval for caption sets, classification otherwise."""
    if kind is not None:
        return "zeroshot_retrieval" if kind == "retrieval" else "zeroshot_classification"
    return "zeroshot_retrieval" if short_name(dataset) in RETRIEVAL_SETS else "zeroshot_classification"


def _is_offline() -> bool:
    from oner.data.pairs import _is_offline as offline

    return offline()


def _hub_ref(root: str) -> tuple[str, str | None] | None:
    """(repo id, revision) when `root` names a Hub data set, else None."""
    m = re.match(r"^https://huggingface\.co/datasets/([^/]+/[^/]+)(?:/tree/([^/]+))?/?$", root)
    if m:
        return m.group(1), m.group(2)
    if root.startswith("hf://datasets/"):
        root = root[len("hf://datasets/"):]
    elif Path(root).expanduser().exists() or root.startswith((".", "/", "~")) or root.count("/") != 1 \
            or Path(root).suffix.lower() in TABLE_SUFFIXES + (".tar",):
        return None
    repo, _, revision = root.partition("@")
    return repo.rstrip("/"), revision or None


def expand_dataset_names(names: Sequence[str]) -> list[str]:
    """`--dataset` values; a `.txt` file among them contributes one name per line (as in clip_benchmark)."""
    out = []
    for name in names:
        path = Path(name).expanduser()
        if path.suffix == ".txt" and path.is_file():
            out.extend(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
        else:
            out.append(name)
    return out


def open_standard_set(dataset: str, root: str | None = None, split: str = "test", *, task: str = "auto",
                      image_root: str | None = None, language: str = "en", class_names=None,
                      templates: Sequence[str] | None = None) -> StandardSet:
    """Resolve `dataset` (+ `root`) into a `StandardSet` with its class names and templates.

    `class_names` (a list, or clip_benchmark's {data set: list} dict) and `templates` (strings with
    `{c}`, or OneR's `{}`) override the data set's own files and an installed clip_benchmark's
    package data. Raises `BenchmarkError` naming the problem.
    """
    if root is not None:  # clip_benchmark's placeholders (replaced, not format()ted: brace ranges stay)
        root = root.replace("{dataset}", short_name(dataset)).replace("{dataset_cleaned}",
                                                                      short_name(dataset).replace("/", "-"))
    if root is None:
        if not (dataset.startswith("wds/") or dataset in SHORTCUTS):
            raise BenchmarkError(f"unknown data set {dataset!r}: give --dataset_root (a folder, shards, a table or a "
                                 f"Hub id), or use wds/NAME or a shortcut ({', '.join(sorted(SHORTCUTS))})")
        root = f"hf://datasets/{hub_repo_of(dataset)}"
    hub = _hub_ref(root)
    if hub is not None:
        if _is_offline():
            not_local = "" if root.startswith(("hf://", "https://")) else f" (no local path {root!r} exists)"
            raise BenchmarkError(
                f"{dataset!r} reads the Hub data set {hub[0]}{not_local}, which cannot be reached offline "
                "(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set): download it once (`hf download --repo-type dataset "
                f"{hub[0]} --local-dir DIR`) and pass --dataset_root DIR")
        ds = _open_hub(dataset, hub[0], hub[1], split, task)
    else:
        ds = _open_local(dataset, root, split, task, image_root)
    if ds.kind == "classification":
        _resolve_class_names(ds, class_names, language)
        _resolve_templates(ds, templates, language)
    if task != "auto" and default_task(dataset, ds.kind) != task:
        raise BenchmarkError(f"{dataset}: --task {task} does not fit this {ds.kind} set ({ds.source})")
    return ds


def _open_local(dataset: str, root: str, split: str, task: str, image_root: str | None) -> StandardSet:
    from oner.data.pairs import expand_shards

    path = Path(root).expanduser()
    if any(ch in root for ch in "{}*?["):
        try:
            shards = expand_shards(root)
        except (ValueError, FileNotFoundError) as e:
            raise BenchmarkError(f"{dataset}: {e}") from None
        folder = Path(shards[0]).parent
        meta = folder if (folder / "classnames.txt").is_file() or (folder / "dataset_type.txt").is_file() \
            else folder.parent
        return _wds_set(dataset, root, shards, _local_text(meta))
    if not path.exists():
        raise BenchmarkError(f"{dataset}: --dataset_root {root} does not exist")
    if path.is_file():
        if path.suffix.lower() not in TABLE_SUFFIXES:
            raise BenchmarkError(f"{dataset}: {root} is not a table ({', '.join(TABLE_SUFFIXES)}) nor a folder")
        return _table_set(dataset, path, split, task, image_root)
    if (path / split / "nshards.txt").is_file() or any((path / split).glob("*.tar")):
        return _wds_set(dataset, root, _wds_shards(path / split, dataset), _local_text(path))
    for name in ("metadata.jsonl", "metadata.csv"):
        if (path / name).is_file():
            return _table_set(dataset, path / name, split, task, image_root)
    if any(p.is_dir() for p in path.iterdir()):
        return _folder_set(dataset, path)
    raise BenchmarkError(f"{dataset}: {root} holds no known layout: expected {split}/nshards.txt and .tar shards "
                         "(clip_benchmark's webdataset), class sub-folders, or a table")


def _local_text(folder: Path) -> Callable[[str], str | None]:
    def read(name: str) -> str | None:
        p = folder / name
        return p.read_text(encoding="utf-8") if p.is_file() else None
    return read


def _wds_shards(split_dir: Path, dataset: str) -> list[str]:
    """`split_dir/{0..n-1}.tar` from `nshards.txt` (all `.tar` files there without it)."""
    count_file = split_dir / "nshards.txt"
    if count_file.is_file():
        n = int(count_file.read_text().strip())
        shards = [split_dir / f"{i}.tar" for i in range(n)]
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise BenchmarkError(f"{dataset}: nshards.txt says {n} shards but {missing[:3]} are missing in {split_dir}")
        return [str(s) for s in shards]
    return [str(p) for p in sorted(split_dir.glob("*.tar"), key=lambda p: (len(p.name), p.name))]  # 2 before 10


# ------------------------------------------------------------------------------- webdataset


def _wds_set(dataset: str, source: str, shards: Sequence, read_text: Callable[[str], str | None],
             open_shard: Callable[[Any], Any] | None = None) -> StandardSet:
    kind_text = read_text("dataset_type.txt")
    kind = (kind_text or "classification").strip().lower()
    if kind not in ("classification", "retrieval"):
        raise BenchmarkError(f"{dataset}: dataset_type.txt says {kind!r}; OneR evaluates classification and "
                             "retrieval sets")
    opener = open_shard or (lambda s: open(s, "rb"))
    parts = [_shard_reader(s, opener, kind, dataset) for s in shards]
    ds = StandardSet(dataset, source, kind, parts)
    if kind == "classification":
        names = read_text("classnames.txt")
        if names is not None:
            ds.class_names = [line.strip() for line in names.splitlines() if line.strip()]
            ds.sources["class_names"] = "classnames.txt"
        templates = read_text("zeroshot_classification_templates.txt")
        if templates is not None:
            ds.templates = [line.strip() for line in templates.splitlines() if line.strip()]
            ds.sources["templates"] = "zeroshot_classification_templates.txt"
    return ds


def _shard_reader(shard, opener, kind: str, dataset: str) -> Callable[[], Iterator[tuple[Any, Any]]]:
    def read() -> Iterator[tuple[Any, Any]]:
        with opener(shard) as f:
            for key, files in tar_samples(f):
                image = next((files[e] for e in WDS_IMAGE_EXTENSIONS if e in files), None)
                if kind == "retrieval":
                    text = files.get("txt", b"").decode("utf-8", errors="replace")
                    yield image, [line.strip() for line in text.splitlines() if line.strip()]
                else:
                    if "cls" not in files:
                        raise BenchmarkError(f"{dataset}: sample {key!r} of {shard} has no .cls label (a retrieval "
                                             "set needs dataset_type.txt saying 'retrieval')")
                    try:
                        label = int(files["cls"].decode().strip())
                    except (UnicodeDecodeError, ValueError):
                        raise BenchmarkError(f"{dataset}: sample {key!r} of {shard}: its .cls holds "
                                             f"{files['cls'][:20]!r}, not a class index") from None
                    yield image, label
    return read


def tar_samples(fileobj) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Webdataset samples of a tar stream: `(key, {extension: bytes})`, files grouped by the part of
    their name before the first dot of the base name, consecutive files of one key forming a sample."""
    key, files = None, {}
    with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            folder, _, base = member.name.rpartition("/")
            stem, dot, ext = base.partition(".")
            if not dot or stem.startswith("_"):
                continue
            this = f"{folder}/{stem}" if folder else stem
            if this != key and files:
                yield key, files
                files = {}
            key = this
            files[ext.lower()] = tar.extractfile(member).read()
    if files:
        yield key, files


# ------------------------------------------------------------------------------ folders, tables


def _folder_set(dataset: str, folder: Path) -> StandardSet:
    """Class sub-folders; the names default to the sub-folder names (`_` -> space)."""
    from .classification import IMAGE_EXTENSIONS, resolve_classes

    folders, names = resolve_classes(folder, None)
    files = [(p, label) for label, name in enumerate(folders)
             for p in sorted((folder / name).rglob("*")) if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not files:
        raise BenchmarkError(f"{dataset}: {folder} has no image files in its class sub-folders")
    ds = StandardSet(dataset, str(folder), "classification", [lambda: iter(files)], size=len(files))
    ds.class_names, ds.sources["class_names"] = names, "sub-folder names"
    ds.folders = folders
    return ds


def _read_table(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".csv", ".tsv"):
        return list(csv.DictReader(io.StringIO(text), delimiter="\t" if path.suffix.lower() == ".tsv" else ","))
    if path.suffix.lower() == ".json":
        rows = json.loads(text)
        rows = rows.get("images", rows) if isinstance(rows, dict) else rows  # Karpathy's dataset_*.json
        if not isinstance(rows, list):
            raise BenchmarkError(f"{path}: expected a JSON list of rows (or Karpathy's {{'images': [...]}})")
        return rows
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _pick(columns: Iterable[str], wanted: Sequence[str]) -> str | None:
    lowered = {c.lower(): c for c in columns}
    return next((lowered[w] for w in wanted if w in lowered), None)


def _captions(value: Any) -> list[str]:
    """Captions from a list, a JSON list in a string (CSV cells), Karpathy's [{'raw': ...}], or one string."""
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    items = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for item in items:
        if isinstance(item, dict):
            item = item.get("raw", item.get("caption"))
        if item is not None and str(item).strip():
            out.append(str(item).strip())
    return out


def rows_to_set(dataset: str, source: str, rows: Iterable[dict], columns: Sequence[str], split: str, task: str,
                base: Path | None = None, label_names: list[str] | None = None,
                rows_are_all: bool = True) -> StandardSet:
    """A set from table rows (a list, or a stream when `rows_are_all` is False): an image column plus
    a class column or captions; a `split` column keeps the rows of `split`."""
    image_col = _pick(columns, IMAGE_COLUMN_NAMES)
    caption_col = _pick(columns, CAPTION_COLUMN_NAMES)
    label_col = _pick(columns, LABEL_COLUMN_NAMES)
    split_col = _pick(columns, ("split",))
    if image_col is None:
        raise BenchmarkError(f"{dataset}: {source} has no image column (looked for {list(IMAGE_COLUMN_NAMES)}); "
                             f"columns: {list(columns)}")
    if task == "zeroshot_retrieval" or (task == "auto" and label_col is None):
        kind = "retrieval"
        if caption_col is None:
            raise BenchmarkError(f"{dataset}: {source} has no caption column (looked for "
                                 f"{list(CAPTION_COLUMN_NAMES)}) nor a class column; columns: {list(columns)}")
    else:
        kind = "classification"
        if label_col is None:
            raise BenchmarkError(f"{dataset}: {source} has no class column (looked for {list(LABEL_COLUMN_NAMES)}); "
                                 f"columns: {list(columns)}")

    def image_of(row):
        value = row.get(image_col)
        if base is not None and isinstance(value, str) and value and not os.path.isabs(value):
            return str(base / value)
        return value

    def kept(stream):
        return (r for r in stream if split_col is None or str(r.get(split_col)) == split)

    ds = StandardSet(dataset, source, kind, [])
    if kind == "retrieval" and rows_are_all:
        # One row per image with a caption list, or one row per caption: group by image, first-seen order.
        grouped: dict[Any, list[str]] = {}
        images = {}
        for r in kept(rows):
            value = image_of(r)
            ident = value if isinstance(value, (str, bytes)) else id(r)
            images.setdefault(ident, value)
            grouped.setdefault(ident, []).extend(_captions(r.get(caption_col)))
        items = [(images[k], caps) for k, caps in grouped.items()]
        ds.parts, ds.size = [lambda: iter(items)], len(items)
    elif kind == "retrieval":
        ds.parts = [lambda: ((image_of(r), _captions(r.get(caption_col))) for r in kept(rows))]
    else:
        if label_names is not None:
            ds.class_names, ds.sources["class_names"] = list(label_names), "the data set's ClassLabel"
        table = list(kept(rows)) if rows_are_all else None
        if table is not None and any(isinstance(r.get(label_col), str) and not r[label_col].strip().lstrip("-").isdigit()
                                     for r in table):
            ds.label_strings = sorted({str(r[label_col]).strip() for r in table})  # names, mapped to indices later

        def items():
            for r in (table if table is not None else kept(rows)):
                yield image_of(r), r.get(label_col)
        ds.parts, ds.size = [items], (len(table) if table is not None else None)
    return ds


def _table_set(dataset: str, path: Path, split: str, task: str, image_root: str | None) -> StandardSet:
    rows = _read_table(path)
    if not rows:
        raise BenchmarkError(f"{dataset}: {path} has no rows")
    columns = list(dict.fromkeys(c for r in rows[:100] for c in r))
    base = Path(image_root).expanduser() if image_root else path.parent
    ds = rows_to_set(dataset, str(path), rows, columns, split, task, base=base)
    if ds.size == 0:
        raise BenchmarkError(f"{dataset}: {path} has no row of split {split!r} (its 'split' column)")
    return ds


# ----------------------------------------------------------------------------------------- Hub


def _hub_filesystem():
    """huggingface_hub's fsspec file system (one place, so that tests can put a local one there)."""
    from huggingface_hub import HfFileSystem

    return HfFileSystem()


def _open_hub(dataset: str, repo: str, revision: str | None, split: str, task: str) -> StandardSet:
    """A Hub data set: clip_benchmark's webdataset layout when `<split>/nshards.txt` exists (shards
    streamed through `HfFileSystem`), otherwise `datasets.load_dataset(..., streaming=True)`."""
    fs = _hub_filesystem()
    prefix = f"datasets/{repo}" + (f"@{revision}" if revision else "")
    source = f"{repo}@{revision}" if revision else repo

    def read_text(name: str) -> str | None:
        try:
            return fs.read_text(f"{prefix}/{name}", encoding="utf-8")
        except FileNotFoundError:
            return None

    n = read_text(f"{split}/nshards.txt")
    if n is not None:
        shards = [f"{prefix}/{split}/{i}.tar" for i in range(int(n.strip()))]
        return _wds_set(dataset, source, shards, read_text, open_shard=lambda s: fs.open(s, "rb", block_size=1 << 24))
    import datasets

    try:
        stream = datasets.load_dataset(repo, split=split, revision=revision, streaming=True)
    except Exception as e:  # the datasets library raises many kinds for a wrong name, split or revision
        raise BenchmarkError(f"{dataset}: cannot stream the Hub data set {source} (split {split!r}): {e}") from e
    features = stream.features or {}
    columns = list(features) or list(next(iter(stream)).keys())
    label_col = _pick(columns, LABEL_COLUMN_NAMES)
    label_names = getattr(features.get(label_col), "names", None) if label_col else None
    image_col = _pick(columns, IMAGE_COLUMN_NAMES)
    if image_col and isinstance(features.get(image_col), datasets.Image):
        stream = stream.cast_column(image_col, datasets.Image(decode=False))  # our decoder counts damage
    return rows_to_set(dataset, source, stream, columns, split, task, label_names=label_names, rows_are_all=False)


# ------------------------------------------------------------------------- names and templates


def _clip_benchmark_data(language: str, what: str) -> dict | None:
    """An installed clip_benchmark's package data `<language>_<what>.json`, else None (never fetched)."""
    try:
        from importlib.resources import files

        path = files("clip_benchmark.datasets") / f"{language}_{what}.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (ModuleNotFoundError, OSError):
        return None


def _lookup(table: dict | None, dataset: str, fallback: str | None = None):
    if not table:
        return None
    name = short_name(dataset)
    for key in (dataset, name, name.split("/")[-1], fallback):
        if key is not None and key in table:
            return table[key]
    return None


def _resolve_class_names(ds: StandardSet, given, language: str) -> None:
    if isinstance(given, dict) and ds.folders and set(given) <= set(ds.folders):
        from .classification import resolve_classes

        ds.class_names = resolve_classes(Path(ds.source), given)[1]
        ds.sources["class_names"] = "given"
    elif given is not None:
        names = _lookup(given, ds.dataset) if isinstance(given, dict) else given
        if names is None:
            raise BenchmarkError(f"{ds.dataset}: the class-name file has no entry for {short_name(ds.dataset)!r}")
        ds.class_names, ds.sources["class_names"] = [str(n).strip() for n in names], "given"
        if ds.folders and len(ds.class_names) != len(ds.folders):
            raise BenchmarkError(f"{ds.dataset}: {len(ds.class_names)} class names given for {len(ds.folders)} "
                                 f"sub-folders {ds.folders}")
    elif ds.class_names is None and ds.label_strings:
        ds.class_names, ds.sources["class_names"] = list(ds.label_strings), "the table's class column"
    elif ds.class_names is None:
        names = _lookup(_clip_benchmark_data(language, "classnames"), ds.dataset)
        if names is not None:
            ds.class_names, ds.sources["class_names"] = list(names), f"clip_benchmark {language}_classnames.json"
    if not ds.class_names:
        raise BenchmarkError(f"{ds.dataset}: no class names ({ds.source} has no classnames.txt, class column names "
                             "or ClassLabel, and no installed clip_benchmark knows the set); pass "
                             "--custom_classname_file")
    if len(ds.class_names) < 2:
        raise BenchmarkError(f"{ds.dataset}: needs at least 2 classes, got {ds.class_names}")
    empty = [i for i, n in enumerate(ds.class_names) if not n]
    if empty:
        raise BenchmarkError(f"{ds.dataset}: empty class names at positions {empty}")
    if ds.label_strings:
        unknown = sorted(set(ds.label_strings) - set(ds.class_names))
        if unknown:
            raise BenchmarkError(f"{ds.dataset}: labels {unknown[:5]} are not among the class names")


def check_class_templates(templates: Sequence[str], dataset: str = "") -> list[str]:
    """clip_benchmark's templates hold `{c}`; OneR's `{}` is accepted too. Returned with `{c}`."""
    out = []
    for t in templates:
        t = t.replace("{}", "{c}") if "{c}" not in t else t
        if t.count("{c}") != 1:
            raise BenchmarkError(f"{dataset}: each template needs exactly one '{{c}}' for the class name; bad: {t!r}")
        try:
            t.format(c="x")
        except (KeyError, IndexError, ValueError) as e:
            raise BenchmarkError(f"{dataset}: template {t!r} has braces other than '{{c}}' ({e})") from None
        out.append(t)
    if not out:
        raise BenchmarkError(f"{dataset}: no prompt templates")
    return out


def _resolve_templates(ds: StandardSet, given, language: str) -> None:
    if given is not None:
        templates = _lookup(given, ds.dataset, "imagenet1k") if isinstance(given, dict) else given
        if templates is None:
            raise BenchmarkError(f"{ds.dataset}: the template file has no entry for {short_name(ds.dataset)!r}")
        ds.templates, ds.sources["templates"] = list(templates), "given"
    elif ds.templates is None:
        templates = _lookup(_clip_benchmark_data(language, "zeroshot_classification_templates"), ds.dataset,
                            "imagenet1k")
        if templates is not None:
            ds.templates = list(templates)
            ds.sources["templates"] = f"clip_benchmark {language}_zeroshot_classification_templates.json"
        else:
            ds.templates, ds.sources["templates"] = ["a photo of a {c}."], "default"
    if isinstance(ds.templates, dict):
        raise BenchmarkError(f"{ds.dataset}: class-specific prompts (a {{class: [prompts]}} dict) are not supported")
    ds.templates = check_class_templates(ds.templates, ds.dataset)


def read_names_file(value: str | None):
    """A --custom_classname_file / --custom_template_file value: a `.json` (a list, or clip_benchmark's
    {data set: list}) or a text file with one entry per line. None stays None."""
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.is_file():
        raise BenchmarkError(f"{value} is not a file")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        return json.loads(text)
    return [line.strip() for line in text.splitlines() if line.strip()]


# ------------------------------------------------------------------------------------ encoding


@dataclass
class Encoded:
    """What one process (or, after `gather`, all of them) encoded, in the data set's order."""

    image_emb: torch.Tensor  # (n, d), normalised
    targets: list  # class indices, or caption lists
    stats: dict
    caption_emb: list[torch.Tensor] | None = None  # retrieval: per sample, (its captions, d), normalised


def _my_items(ds: StandardSet, rank: int, world: int,
              max_items: int | None = None) -> Iterator[tuple[tuple[int, int], Any, Any]]:
    """`(key, image, target)` of this process's share: whole parts when there are enough, else (and
    with `max_items`, the first items of the set) every `world`-th item. Keys sort into the set's order."""
    if max_items is None and len(ds.parts) >= world:
        for p in range(rank, len(ds.parts), world):
            for i, (image, target) in enumerate(ds.parts[p]()):
                yield (p, i), image, target
        return
    n = 0
    for p, part in enumerate(ds.parts):
        for i, (image, target) in enumerate(part()):
            if max_items is not None and n >= max_items:
                return
            if n % world == rank:
                yield (p, i), image, target
            n += 1


def encode_set(ctx: EvalContext, ds: StandardSet, rank: int = 0, world: int = 1, max_items: int | None = None,
               show_progress: bool = True) -> tuple[list, Encoded]:
    """Decode and encode this process's share of `ds` in batches (damaged images skipped and counted).

    Returns (keys, Encoded) with `(n, d)` image embeddings and the targets of the kept samples.
    `max_items` keeps the first items of the set (in its order) only.
    """
    from tqdm.auto import tqdm

    from oner.data import DataStats, decode_image
    from oner.data.pairs import DamagedSample

    stats = DataStats()
    label_index = {n: i for i, n in enumerate(ds.class_names)} if ds.label_strings else None
    keys, targets, batch, embs = [], [], [], []
    total = ds.size if max_items is None else min(max_items, ds.size or max_items)
    bar = tqdm(total=None if total is None else -(-total // world), desc=ds.dataset, unit="img",
               disable=not (ctx.progress and show_progress), leave=False)

    def flush():
        if batch:
            embs.append(ctx.embed_images(batch))
            bar.update(len(batch))
            batch.clear()

    for key, image, target in _my_items(ds, rank, world, max_items):
        if ds.kind == "retrieval":
            if not target:
                stats.record("empty_caption")
                continue
        else:
            target = _label(target, label_index, ds)
        try:
            decoded = decode_image(image) if image is not None else None
        except DamagedSample as e:
            stats.record(e.kind)
            continue
        if decoded is None:
            stats.record("missing_file")
            continue
        stats.record("ok")
        keys.append(key)
        targets.append(target)
        batch.append(decoded)
        if len(batch) >= ctx.batch_size:
            flush()
    flush()
    bar.close()
    d = int(ctx.model.config.projection_dim)
    enc = Encoded(torch.cat(embs) if embs else torch.empty(0, d), targets, stats.as_dict())
    if ds.kind == "retrieval":  # each process encodes its own samples' captions too
        captions = [c for caps in targets for c in caps]
        text_emb = ctx.encode_texts(captions, desc=f"{ds.dataset} captions") if captions else torch.empty(0, d)
        enc.caption_emb = list(torch.split(text_emb, [len(caps) for caps in targets]))
    return keys, enc


def _label(value: Any, label_index: dict | None, ds: StandardSet) -> int:
    if label_index is not None:
        value = str(value).strip()
        if value in label_index:
            return label_index[value]
    try:
        label = int(value)
    except (TypeError, ValueError):
        raise BenchmarkError(f"{ds.dataset}: label {value!r} is neither a class index nor a class name") from None
    if not 0 <= label < len(ds.class_names):
        raise BenchmarkError(f"{ds.dataset}: label {label} is out of range for {len(ds.class_names)} class names")
    return label


def gather_ordered(keys: list, *columns: list) -> list[list]:
    """Every process's `columns` (lists aligned with its `keys`), concatenated over processes and put
    in key order: the whole, on every process (one process: its own lists, sorted)."""
    from accelerate.utils import gather_object

    shares = gather_object([(keys, columns)])
    order = sorted((k, s, i) for s, (ks, _) in enumerate(shares) for i, k in enumerate(ks))
    return [[shares[s][1][c][i] for _, s, i in order] for c in range(len(columns))]


def gather(keys: list, enc: Encoded) -> Encoded:
    """All processes' shares of a set in the data set's order, damage counts summed."""
    from accelerate.utils import gather_object

    captions = [t.numpy() for t in enc.caption_emb] if enc.caption_emb is not None else [None] * len(keys)
    images, targets, captions = gather_ordered(keys, list(enc.image_emb.numpy()), enc.targets, captions)
    all_stats = gather_object([enc.stats])
    stats = {name: sum(st[name] for st in all_stats) for name in enc.stats}
    image_emb = torch.from_numpy(np.stack(images)) if images else enc.image_emb[:0]
    caption_emb = [torch.from_numpy(c) for c in captions] if enc.caption_emb is not None else None
    return Encoded(image_emb, targets, stats, caption_emb)


def shared_class_embeddings(ctx: EvalContext, class_names: Sequence[str], templates: Sequence[str], rank: int = 0,
                            world: int = 1) -> torch.Tensor:
    """`(C, d)` prompt-ensemble class embeddings, each process encoding every `world`-th class."""
    from .classification import class_embeddings

    mine = list(range(rank, len(class_names), world))
    templates = [t.replace("{c}", "{}") for t in templates]  # OneR's ensemble formats with '{}'
    emb = class_embeddings(ctx, [class_names[c] for c in mine], templates) if mine else torch.empty(0)
    (rows,) = gather_ordered(mine, list(emb.numpy()))
    return torch.from_numpy(np.stack(rows))


# ------------------------------------------------------------------------------------- metrics


def classification_metrics(image_emb: torch.Tensor, class_emb: torch.Tensor, labels: Sequence[int]) -> dict:
    """clip_benchmark's `acc1`, `acc5` (None with fewer than 5 classes) and `mean_per_class_recall`
    from normalised `(n, d)` image and `(C, d)` class embeddings."""
    from .context import rank
    from .metrics import load_metric

    n_classes = class_emb.shape[0]
    ks = [1, 5] if n_classes >= 5 else [1]
    ranked = rank(image_emb, class_emb, max(ks))
    top = load_metric("topk_accuracy").compute(predictions=ranked, references=list(labels), k=ks)
    predicted = torch.tensor([r[0] for r in ranked])
    truth = torch.tensor(list(labels))
    recalls = [float((predicted[truth == c] == c).float().mean()) for c in truth.unique().tolist()]
    return {"acc1": top["top1"], "acc5": top.get("top5"), "mean_per_class_recall": sum(recalls) / len(recalls)}


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, owner: Sequence[int],
                      recall_k: Sequence[int] = (1, 5, 10)) -> dict:
    """clip_benchmark's names: `image_retrieval_recall@k` (captions query images) and
    `text_retrieval_recall@k` (images query captions; a hit when any of the image's captions is in
    the top k), from OneR's shared recall (`retrieval.recall_from_embeddings`)."""
    from .retrieval import recall_from_embeddings

    scores = recall_from_embeddings(image_emb, text_emb, list(owner), ks=list(recall_k))
    out = {}
    for k in recall_k:
        out[f"image_retrieval_recall@{k}"] = scores[f"t2i_R@{k}"]
        out[f"text_retrieval_recall@{k}"] = scores[f"i2t_R@{k}"]
    return out


def evaluate_set(ctx: EvalContext, ds: StandardSet, task: str, recall_k: Sequence[int] = (1, 5, 10),
                 max_items: int | None = None, rank: int = 0, world: int = 1,
                 show_progress: bool = True) -> tuple[dict, dict]:
    """(metrics, counts) of one set; every process calls it (the encoding is split, the metrics are
    computed from the gathered embeddings)."""
    keys, mine = encode_set(ctx, ds, rank, world, max_items, show_progress)
    enc = gather(keys, mine)
    counts = {"n_images": len(enc.targets), "n_skipped": enc.stats["skipped"], "data_stats": enc.stats}
    if not enc.targets:
        from oner.data import DataStats

        raise BenchmarkError(f"{ds.dataset}: no usable sample in {ds.source} ({DataStats().summary(enc.stats)})")
    if task == "zeroshot_classification":
        class_emb = shared_class_embeddings(ctx, ds.class_names, ds.templates, rank, world)
        counts.update(n_classes=len(ds.class_names), n_templates=len(ds.templates))
        return classification_metrics(enc.image_emb, class_emb, enc.targets), counts
    owner = [i for i, caps in enumerate(enc.targets) for _ in caps]
    counts["n_captions"] = len(owner)
    return retrieval_metrics(enc.image_emb, torch.cat(enc.caption_emb), owner, recall_k), counts


# ------------------------------------------------------------------------------------ the run


def run_standard(model_dir: str | Path, datasets: Sequence[str], dataset_root: str | None = None,
                 task: str = "auto", split: str = "test", recall_k: Sequence[int] = (1, 5, 10),
                 output: str | None = None, output_dir: str | Path | None = None, batch_size: int = 64,
                 progress: bool = True, max_items: int | None = None, language: str = "en", class_names=None,
                 templates: Sequence[str] | None = None, image_root: str | None = None) -> list[dict]:
    """Evaluate `model_dir` on each data set; write one clip_benchmark-schema record per set (main
    process) and return the records. See `oner.evaluation.records` for the record and output names."""
    from accelerate import PartialState

    from . import records
    from .context import load_model_and_processor

    if task not in ("auto",) + TASKS:
        raise BenchmarkError(f"unknown task {task!r}; choose auto, {', '.join(TASKS)}")
    if batch_size < 1 or (max_items is not None and max_items < 1):
        raise BenchmarkError("batch_size and max_items must be >= 1")
    if any(k < 1 for k in recall_k):
        raise BenchmarkError(f"recall_k values must be >= 1, got {list(recall_k)}")
    datasets = expand_dataset_names(datasets)
    if len(datasets) > 1 and output is not None and "{dataset}" not in output:
        raise BenchmarkError("--output must contain {dataset} when several data sets are evaluated")
    sets = [open_standard_set(d, dataset_root, split, task=task, image_root=image_root, language=language,
                              class_names=class_names, templates=templates) for d in datasets]
    from oner.training.setup import _has_accelerator_device

    # Without an accelerator, `accelerate launch` processes form a group only when told to run on the CPU.
    state = PartialState(cpu=not _has_accelerator_device())
    model, processor = load_model_and_processor(model_dir, device=state.device)
    ctx = EvalContext(model, processor, batch_size=batch_size, progress=progress and state.is_local_main_process,
                      max_items=max_items)
    out_dir = Path(output_dir) if output_dir is not None else Path(model_dir)
    written = []
    for ds in sets:
        set_task = default_task(ds.dataset, ds.kind) if task == "auto" else task
        start = time.time()
        metrics, counts = evaluate_set(ctx, ds, set_task, recall_k, max_items, state.process_index,
                                       state.num_processes)
        record = records.make_record(
            dataset=ds.dataset, model=records.model_name(model), pretrained=str(model_dir), task=set_task,
            metrics=metrics, language=language, split=split, source=ds.source, seconds=round(time.time() - start, 2),
            num_processes=state.num_processes, max_items=max_items, **counts,
            **{f"{k}_source": v for k, v in ds.sources.items()},
        )
        records.validate_record(record)
        if state.is_main_process:
            path = records.output_path(output, out_dir, record)
            records.write_record(record, path)
            record = {**record, "_path": str(path)}
        written.append(record)
    state.wait_for_everyone()
    return written
