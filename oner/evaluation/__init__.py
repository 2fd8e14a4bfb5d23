"""The OneR benchmark (`oner-eval`): retrieval, zero-shot classification, localization and
multimodal retrieval, on the embedded emoji data set or on user data.

`run_benchmark(model_dir, ...)` loads the model exactly as a user does (`AutoModel` /
`AutoProcessor` with `trust_remote_code=True`), runs the suites, writes `eval_results.json` and
`eval_results.md`, and returns `{suite: {metric: number}}` plus a `"_meta"` entry. See
docs/evaluation.md for each suite's protocol.

The standard benchmarks (zero-shot classification and retrieval on ImageNet, COCO, Flickr30k, ...
in LAION clip_benchmark's layouts and records): `standard.run_standard` (`oner-eval MODEL --dataset
...`), the readers in `standard_data`, the records in `records`, and open_clip's model interface
in `open_clip`.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Sequence

from .base import KIND_TASKS, Suite, is_metric
from .classification import EMOJI_TEMPLATES, EmbeddedClassification, FolderClassification
from .context import BenchmarkError, EvalContext, load_model_and_processor
from .localization import PointingGame
from .multimodal import MultimodalRetrieval
from .report import JSON_NAME, MARKDOWN_NAME, markdown_table, write_results
from .retrieval import EmbeddedRetrieval, ImageTextRetrieval

_OPENMOJI = "oner-embedded/openmoji (held-out style)"


def embedded_suites() -> dict[str, Suite]:
    """Every suite on the embedded data set, by name (a fresh set of objects each call)."""
    suites = [
        EmbeddedRetrieval("retrieval_openmoji", "retrieval", _OPENMOJI,
                          "image<->text R@1/5/10 on OpenMoji renders; captions = CLDR name + aliases",
                          split="openmoji"),
        EmbeddedRetrieval("retrieval_twemoji", "retrieval", "oner-embedded/twemoji (training style)",
                          "the same on Twemoji, the training style: a sanity line, not a zero-shot score",
                          split="twemoji"),
        EmbeddedClassification("classification_group", "classification", _OPENMOJI,
                               "OpenMoji images into the emoji groups, prompt-template ensemble",
                               field_name="group"),
        EmbeddedClassification("classification_names100", "classification", _OPENMOJI,
                               "OpenMoji images into 100 emoji names (fixed seed), prompt-template ensemble",
                               field_name="name", n_classes=100),
        EmbeddedClassification("classification_subgroup", "classification", _OPENMOJI,
                               "OpenMoji images into the emoji sub-groups (Unicode blocks), template ensemble",
                               field_name="subgroup"),
        PointingGame("pointing_game", "localization", "oner-embedded/composites",
                     "argmax of text-to-patch cosine inside the named object's box (object name as query)"),
        PointingGame("text_guided_pointing", "localization", "oner-embedded/composites",
                     "the pointing game with an alias that is not the name as query (definition queries)",
                     text_guided=True),
        MultimodalRetrieval("multimodal_retrieval", "multimodal_retrieval", "oner-embedded/composites + twemoji",
                            "composite + one object's name as ONE joint query -> that object's Twemoji image"),
    ]
    return {s.name: s for s in suites}


#: The suites run when none are named (all embedded ones except the sub-group classification,
#: whose Unicode-block classes say little about images).
DEFAULT_SUITES = (
    "retrieval_openmoji",
    "retrieval_twemoji",
    "classification_group",
    "classification_names100",
    "pointing_game",
    "text_guided_pointing",
    "multimodal_retrieval",
)


def resolve_suites(suites: Sequence[str | Suite] | None) -> list[Suite]:
    """Suite names (or configured `Suite` objects) -> suite objects; unknown names are an error."""
    available = embedded_suites()
    chosen = []
    for s in DEFAULT_SUITES if suites is None else suites:
        if isinstance(s, Suite):
            chosen.append(s)
        elif s in available:
            chosen.append(available[s])
        else:
            raise BenchmarkError(f"unknown suite {s!r}; available: {sorted(available)} (and --retrieval_data / "
                                 "--classification_folder for user data)")
    if not chosen:
        raise BenchmarkError("no suite to run")
    return chosen


def user_retrieval_suite(source: str, image_column: str | None = None, text_column: str | None = None,
                         split: str = "train", name: str = "retrieval_user") -> ImageTextRetrieval:
    """Image<->text retrieval on any source `oner.data.load_image_text_dataset` reads."""
    return ImageTextRetrieval(name, "retrieval", str(source), "image<->text R@1/5/10 on user data",
                              source=str(source), image_column=image_column, text_column=text_column, split=split)


def folder_classification_suite(folder: str | Path, class_names=None, templates: Sequence[str] | None = None,
                                name: str = "classification_user") -> FolderClassification:
    """Zero-shot classification of `folder/<class>/<images>`; `class_names` None, a list or a dict."""
    from .classification import check_templates

    templates = tuple(check_templates(templates)) if templates is not None else ("a photo of a {}.",)
    return FolderClassification(name, "classification", str(folder), "zero-shot classification of a labelled "
                                "image folder, prompt-template ensemble", folder=str(folder),
                                class_names=class_names, templates=templates)


def _needs_embedded(suites: list[Suite]) -> bool:
    return any(not isinstance(s, (ImageTextRetrieval, FolderClassification)) for s in suites)


def run_benchmark(
    model_dir: str | Path,
    suites: Sequence[str | Suite] | None = None,
    data_root: str | Path | None = None,
    output_dir: str | Path | None = None,
    batch_size: int = 64,
    progress: bool = True,
    max_items: int | None = None,
) -> dict:
    """Run the OneR benchmark on the model in `model_dir`.

    Args:
        model_dir: a saved OneR folder (or a Hub id when online).
        suites: names from `embedded_suites()` and/or configured `Suite` objects
            (`ImageTextRetrieval`, `FolderClassification` for user data); None = `DEFAULT_SUITES`.
        data_root: the embedded data set; a finished build there is used as it is, otherwise it is
            built there (None: `oner.data.default_root()`).
        output_dir: where `eval_results.json`, `eval_results.md` and `heatmaps/` go (default `model_dir`).
        batch_size: images/texts per forward pass.
        progress: progress bars in a terminal, one plain line per suite otherwise (oner.progress).
        max_items: at most this many items (images, composites or queries) per suite, a fixed-seed subset.

    Returns:
        `{suite: {metric: float, "chance_<metric>": float, "n_<count>": int}}` and `"_meta"`:
        model, data_root, device, seconds, versions, per-suite kind/dataset/description, heatmap files.
    """
    _check_sizes(batch_size, max_items)
    chosen = resolve_suites(suites)  # before loading anything: a typo fails fast
    start = time.time()
    model, processor = load_model_and_processor(model_dir)
    output_dir = Path(output_dir) if output_dir is not None else Path(model_dir)
    results = evaluate(model, processor, chosen, data_root=data_root, output_dir=output_dir, batch_size=batch_size,
                       progress=progress, max_items=max_items, model_name=str(model_dir), start=start)
    write_results(results, output_dir)
    return results


def evaluate(
    model,
    processor,
    suites: Sequence[str | Suite] | None = None,
    data_root: str | Path | None = None,
    output_dir: str | Path | None = None,
    batch_size: int = 64,
    progress: bool = True,
    max_items: int | None = None,
    model_name: str = "in memory",
    start: float | None = None,
) -> dict:
    """`run_benchmark` on a model already loaded (in eval mode, on its device): what the training
    loop's evaluation during training calls. Writes no file but the heatmaps, and those only with
    `output_dir`; `model_name` and `start` go into `"_meta"` (`start`: `time.time()` before loading)."""
    _check_sizes(batch_size, max_items)
    chosen = resolve_suites(suites)
    start = time.time() if start is None else start
    root = None
    if _needs_embedded(chosen):
        from .embedded_data import ensure_embedded

        root = ensure_embedded(data_root, progress=progress)
    ctx = EvalContext(model, processor, batch_size=batch_size, progress=progress, max_items=max_items,
                      data_root=root, output_dir=Path(output_dir) if output_dir is not None else None)

    from oner.progress import progress as progress_bar

    results: dict = {}
    suite_times = {}
    bar = progress_bar(total=len(chosen), desc="oner-eval", unit="suites", disable=not progress, every_item=False)
    for suite in chosen:
        t = time.time()
        results[suite.name] = suite.run(ctx)
        suite_times[suite.name] = round(time.time() - t, 2)
        bar.update(1)
        bar.set_postfix_str(f"{suite.name} ({suite_times[suite.name]} s)")  # outside a terminal: one line
    bar.close()
    results["_meta"] = _metadata(model_name, model, root, chosen, ctx, start, suite_times, max_items)
    return results


def _check_sizes(batch_size: int, max_items: int | None) -> None:
    if batch_size < 1:
        raise BenchmarkError(f"batch_size must be >= 1, got {batch_size}")
    if max_items is not None and max_items < 1:
        raise BenchmarkError(f"max_items must be >= 1, got {max_items}")


def _metadata(model_dir, model, root, suites, ctx, start, suite_times, max_items) -> dict:
    """What produced the numbers, stored next to them."""
    import torch
    import transformers

    from oner.data import read_manifest

    manifest = read_manifest(root) if root is not None else None
    cfg = model.config
    return {
        "model": str(model_dir),
        "model_config": {k: getattr(cfg, k, None) for k in
                         ("hidden_size", "num_hidden_layers", "image_size", "patch_size", "projection_dim")},
        "data_root": str(root) if root is not None else None,
        "embedded_counts": manifest.get("counts") if manifest else None,
        "embedded_limit": manifest.get("limit") if manifest else None,
        "max_items": max_items,
        "device": str(ctx.device),
        "seconds": round(time.time() - start, 2),
        "suite_seconds": suite_times,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "suites": {s.name: {**s.describe(), **({"data_stats": s.data_stats} if getattr(s, "data_stats", None) else {})}
                   for s in suites},
        "heatmaps": ctx.artifacts,
    }


__all__ = [
    "run_benchmark",
    "evaluate",
    "user_retrieval_suite",
    "folder_classification_suite",
    "embedded_suites",
    "resolve_suites",
    "DEFAULT_SUITES",
    "EMOJI_TEMPLATES",
    "KIND_TASKS",
    "BenchmarkError",
    "Suite",
    "EmbeddedRetrieval",
    "ImageTextRetrieval",
    "EmbeddedClassification",
    "FolderClassification",
    "PointingGame",
    "MultimodalRetrieval",
    "is_metric",
    "markdown_table",
    "JSON_NAME",
    "MARKDOWN_NAME",
]
