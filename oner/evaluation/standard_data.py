"""Reading the standard data sets of `oner.evaluation.standard` in LAION clip_benchmark's layouts
(and the usual others), with their class names and prompt templates.

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

A `StandardSet`'s `parts` yield undecoded images (bytes, paths, datasets image dicts) and their
targets; decoding (damage skipped and counted) and encoding happen in `standard.encode_set`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from .context import BenchmarkError

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
