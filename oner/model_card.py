"""The model card of an output folder, rendered from `model_card.md` with huggingface_hub.

`write_model_card(model_dir, metrics, training)` writes `model_dir/README.md`: front matter from
`ModelCardData` (license, library, pipeline tag, data sets, tags, a `model-index` of the measured
metrics) and a body from the template. Every number comes from the arguments or from the folder's
own config and weights; nothing is typed in. `ModelCard.validate()` is never called: it posts to
the Hub.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TEMPLATE_NAME = "model_card.md"
DEFAULT_TAGS = ["oner", "vision-language", "single-tower", "contrastive-learning", "image-text-retrieval",
                "zero-shot-image-classification", "multimodal-retrieval", "emoji"]
#: Suite-name prefixes -> kind, for results that come without `_meta` (see oner.evaluation.base).
_KIND_BY_PREFIX = (("multimodal", "multimodal_retrieval"), ("retrieval", "retrieval"),
                   ("classification", "classification"), ("pointing", "localization"),
                   ("text_guided", "localization"))
#: Readable names of the Hub licence ids a card may carry (the weights' licence is the card's `license`).
LICENSE_NAMES = {"apache-2.0": "Apache License 2.0", "mit": "MIT", "cc-by-4.0": "CC-BY 4.0"}
#: What the card says about the embedded data set's sources (licences as the data set states them).
EMBEDDED_ATTRIBUTION = """\
Trained and evaluated on the OneR embedded data set, built offline by the `oner` package from pip
packages:

- **Twemoji** graphics (training images and composites), copyright 2020 Twitter, Inc and other
  contributors, licensed under [CC-BY 4.0](https://creativecommons.org/licenses/by/4.0/).
- **OpenMoji** (held-out evaluation style): all emojis designed by OpenMoji, the open-source emoji
  and icon project, licensed under [CC BY-SA 4.0](https://creativecommons.org/licenses/by-sa/4.0/).
- **Names and aliases**: Unicode CLDR names via the `emoji` package (BSD-3-Clause; CLDR under the
  Unicode License)."""


def template_path() -> Path:
    """`model_card.md`: the project root's, or the installed package's copy (oner.bundled)."""
    from oner.bundled import project_path

    path = project_path(TEMPLATE_NAME)
    if not path.is_file():
        raise FileNotFoundError(f"model card template not found at {path}")
    return path


def suite_kind(suite: str, meta: dict) -> str:
    """The suite's kind from the results' `_meta`, else from its name."""
    kind = meta.get("suites", {}).get(suite, {}).get("kind")
    if kind:
        return kind
    for prefix, k in _KIND_BY_PREFIX:
        if suite.startswith(prefix):
            return k
    return "retrieval" if "R@" in suite else "classification"


def _suite_items(metrics: dict):
    """(suite, {key: value}) pairs, without the metadata entry."""
    return [(s, m) for s, m in metrics.items() if not s.startswith("_") and isinstance(m, dict)]


def eval_results(metrics: dict) -> list:
    """One `EvalResult` per measured metric (chance levels and counts stay in the body)."""
    from huggingface_hub import EvalResult

    from oner.evaluation.base import KIND_TASKS, is_metric

    meta = metrics.get("_meta", {})
    out = []
    for suite, values in _suite_items(metrics):
        task_type, task_name = KIND_TASKS[suite_kind(suite, meta)]
        dataset = meta.get("suites", {}).get(suite, {}).get("dataset", suite)
        for key, value in values.items():
            if not is_metric(key):
                continue
            out.append(EvalResult(
                task_type=task_type, task_name=task_name,
                dataset_type="oner-embedded" if dataset.startswith("oner-embedded") else "custom",
                dataset_name=dataset, dataset_config=suite,
                metric_type=key, metric_name=f"{suite} {key}", metric_value=float(value),
            ))
    return out


def standard_eval_results(model_dir: Path) -> list:
    """One `EvalResult` per metric of the clip_benchmark records `oner-eval --dataset` wrote into
    the folder's `standard_results/` (the data set's Hub repo as its type when it came from the Hub)."""
    from huggingface_hub import EvalResult

    from oner.evaluation.base import KIND_TASKS
    from oner.evaluation.records import RECORDS_DIR, read_records

    out = []
    for r in read_records(Path(model_dir) / RECORDS_DIR):
        task_type, task_name = KIND_TASKS["retrieval" if r["task"] == "zeroshot_retrieval" else "classification"]
        source = str(r.get("source", ""))
        on_hub = source.count("/") == 1 and not Path(source).exists()
        for key, value in r["metrics"].items():
            if value is not None:
                out.append(EvalResult(
                    task_type=task_type, task_name=task_name, dataset_type=source.split("@")[0] if on_hub else "custom",
                    dataset_name=r["dataset"], dataset_split=r.get("split"), metric_type=key,
                    metric_name=f"{r['dataset']} {key}", metric_value=float(value),
                ))
    return out


def results_table(metrics: dict) -> str:
    """The Markdown table of `oner-eval` (value, chance, counts per metric)."""
    from oner.evaluation.report import markdown_table

    if not _suite_items(metrics):
        return "No evaluation results were given."
    return markdown_table(metrics)


def suite_notes(metrics: dict) -> str:
    """One line per suite saying what it measures (from the results' `_meta`)."""
    suites = metrics.get("_meta", {}).get("suites", {})
    lines = [f"- `{name}`: {info['description']} ({info['dataset']})." for name, info in suites.items()
             if name in metrics and info.get("description")]
    return "\n".join(lines)


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def training_table(training: dict) -> str:
    """Every training fact given, as a two-column table (the recipe of THIS run)."""
    rows = [(k, v) for k, v in training.items() if k not in ("repo_id", "revision", "model_name", "license",
                                                              "datasets", "tags", "base_model")]
    if not rows:
        return "No training information was given (for example a freshly initialised model)."
    lines = ["| setting | value |", "|---|---|"]
    lines += [f"| {k.replace('_', ' ')} | {_format_value(v).replace('|', '/')} |" for k, v in rows]
    return "\n".join(lines)


def _architecture(model_dir: Path) -> dict:
    """Sizes from the folder's config.json and parameter count from its safetensors header."""
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    n_params = _count_parameters(model_dir)
    return {
        "hidden_size": config.get("hidden_size"),
        "num_hidden_layers": config.get("num_hidden_layers"),
        "image_size": config.get("image_size"),
        "patch_size": config.get("patch_size"),
        "max_text_tokens": config.get("max_position_embeddings"),
        "projection_dim": config.get("projection_dim"),
        "num_parameters": f"{n_params / 1e6:.2f} M" if n_params else "an unknown number of",
    }


def _count_parameters(model_dir: Path) -> int | None:
    """Sum of tensor sizes in the folder's safetensors files (header only; no weights loaded)."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        with safe_open(str(f), framework="numpy") as st:
            for name in st.keys():
                shape = st.get_slice(name).get_shape()
                n = 1
                for d in shape:
                    n *= int(d)
                total += n
    return total


def build_card(model_dir: str | Path, metrics: dict, training: dict):
    """The rendered `ModelCard` (not written)."""
    from huggingface_hub import ModelCard, ModelCardData

    model_dir = Path(model_dir)
    training = dict(training or {})
    metrics = dict(metrics or {})
    model_name = training.get("model_name") or model_dir.name
    results = eval_results(metrics) + standard_eval_results(model_dir)
    data = ModelCardData(
        model_name=model_name,
        license=training.get("license", "apache-2.0"),
        library_name="transformers",
        pipeline_tag="zero-shot-image-classification",
        datasets=training.get("datasets", ["oner-embedded"]),
        tags=list(training.get("tags", DEFAULT_TAGS)),
        language=["en"],
        eval_results=results or None,
        base_model=training.get("base_model"),
    )
    meta = metrics.get("_meta", {})
    eval_note = ""
    if meta.get("max_items"):
        eval_note += f", at most {meta['max_items']} items per suite"
    if meta.get("embedded_limit"):
        eval_note += f", on an embedded build limited to {meta['embedded_limit']} concepts"
    return ModelCard.from_template(
        data,
        template_path=str(template_path()),
        model_name=model_name,
        repo_id=training.get("repo_id") or f"<user>/{model_name}",
        revision=training.get("revision") or "main",
        results_table=results_table(metrics),
        suite_notes=suite_notes(metrics),
        eval_note=eval_note,
        training_table=training_table(training),
        data_section=EMBEDDED_ATTRIBUTION,
        license_name=LICENSE_NAMES.get(data.license, data.license),
        **_architecture(model_dir),
    )


def write_model_card(model_dir: str | Path, metrics: dict, training: dict) -> Path:
    """Render the card into `model_dir/README.md` and return that path.

    Args:
        model_dir: a saved OneR folder (its config.json and weights give the architecture lines).
        metrics: what `run_benchmark` returned (`{suite: {metric: value}}`, optional `_meta`).
        training: facts of the run, e.g. preset, objective, steps, wall_time_s, data, batch_size,
            learning_rate, seed, hardware; optional `repo_id`, `revision`, `model_name`, `license`,
            `datasets`, `tags` steer the card itself rather than the recipe table.
    """
    card = build_card(model_dir, metrics, training)
    path = Path(model_dir) / "README.md"
    card.save(str(path))
    return path
