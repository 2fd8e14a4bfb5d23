"""The benchmarks researchers report: zero-shot classification and image<->text retrieval on
standard data sets, in LAION clip_benchmark's layouts, protocols, metric names and records.

The data sets, their class names and templates: `oner.evaluation.standard_data`. Records:
`oner.evaluation.records`. The command line: `oner-eval MODEL --dataset ...` (`cli.py`).

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

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from .context import BenchmarkError, EvalContext
from .standard_data import TASKS, StandardSet, default_task, expand_dataset_names, open_standard_set


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


def encode_set(ctx: EvalContext, ds: StandardSet, rank: int = 0, world: int = 1,
               max_items: int | None = None) -> tuple[list, Encoded]:
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
               disable=not ctx.progress, leave=False)

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
                 max_items: int | None = None, rank: int = 0, world: int = 1) -> tuple[dict, dict]:
    """(metrics, counts) of one set; every process calls it (the encoding is split, the metrics are
    computed from the gathered embeddings)."""
    from accelerate.utils import gather_object

    problem = None
    try:
        keys, mine = encode_set(ctx, ds, rank, world, max_items)
    except BenchmarkError as e:  # bad data met by one process: every process must stop, not wait for it
        problem = str(e)
    problems = [p for p in gather_object([problem]) if p]
    if problems:
        raise BenchmarkError(problems[0])
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

    from oner.training.runtime import has_accelerator_device

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
    # Without an accelerator, `accelerate launch` processes form a group only when told to run on the CPU.
    state = PartialState(cpu=not has_accelerator_device())
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
