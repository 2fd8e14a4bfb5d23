"""Result records in clip_benchmark's schema: one JSON object per (model, data set, task).

clip_benchmark's `eval` writes `{"dataset", "model", "pretrained", "task", "metrics", "language"}`
and its `build` command turns a folder of them into one CSV row each (the metrics and every other
top-level field become columns). OneR writes the same keys, so its rows drop into such a table, plus
its own top-level fields (counts, split, source, seconds, where class names and templates came from).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

#: The record's JSON Schema (draft 2020-12): clip_benchmark's keys are required; OneR's own are optional.
RECORD_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "clip_benchmark result record (as written by oner-eval)",
    "type": "object",
    "required": ["dataset", "model", "pretrained", "task", "metrics", "language"],
    "properties": {
        "dataset": {"type": "string"},
        "model": {"type": "string"},
        "pretrained": {"type": "string"},
        "task": {"enum": ["zeroshot_classification", "zeroshot_retrieval"]},
        "metrics": {"type": "object", "additionalProperties": {"type": ["number", "null"]}},
        "language": {"type": "string"},
        "split": {"type": "string"},
        "source": {"type": "string"},
        "n_images": {"type": "integer"},
        "n_captions": {"type": "integer"},
        "n_classes": {"type": "integer"},
        "n_templates": {"type": "integer"},
        "n_skipped": {"type": "integer"},
        "seconds": {"type": "number"},
        "num_processes": {"type": "integer"},
    },
}
#: Metric keys per task (retrieval's depend on --recall_k).
CLASSIFICATION_METRICS = ("acc1", "acc5", "mean_per_class_recall")
RETRIEVAL_PREFIXES = ("image_retrieval_recall@", "text_retrieval_recall@")
#: Where `oner-eval --dataset` writes records without `--output` (under the model folder), and where
#: the model card looks for them.
RECORDS_DIR = "standard_results"
DEFAULT_OUTPUT = "{dataset}_{task}.json"


def make_record(dataset: str, model: str, pretrained: str, task: str, metrics: dict, language: str = "en",
                **extra) -> dict:
    """clip_benchmark's keys first, then OneR's fields (None values left out)."""
    record = {"dataset": dataset, "model": model, "pretrained": pretrained, "task": task,
              "metrics": {k: (None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v))
                          for k, v in metrics.items()},
              "language": language}
    record.update({k: v for k, v in extra.items() if v is not None})
    return record


def _type_ok(value, kind) -> bool:
    kinds = kind if isinstance(kind, list) else [kind]
    checks = {"string": lambda v: isinstance(v, str), "object": lambda v: isinstance(v, dict),
              "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "null": lambda v: v is None}
    return any(checks[k](value) for k in kinds)


def validate_record(record: dict) -> None:
    """Check `record` against `RECORD_SCHEMA` and the task's metric names; ValueError lists every problem."""
    problems = [f"missing {k!r}" for k in RECORD_SCHEMA["required"] if k not in record]
    for key, rule in RECORD_SCHEMA["properties"].items():
        if key not in record:
            continue
        value = record[key]
        if "enum" in rule and value not in rule["enum"]:
            problems.append(f"{key}={value!r} is not one of {rule['enum']}")
        if "type" in rule and not _type_ok(value, rule["type"]):
            problems.append(f"{key} should be {rule['type']}, got {type(value).__name__}")
    metrics = record.get("metrics")
    if isinstance(metrics, dict):
        bad = [k for k, v in metrics.items() if not _type_ok(v, ["number", "null"])]
        problems += [f"metric {k!r} is not a number" for k in bad]
        if record.get("task") == "zeroshot_classification":
            missing = [k for k in CLASSIFICATION_METRICS if k not in metrics]
            problems += [f"classification record lacks {k!r}" for k in missing]
        elif record.get("task") == "zeroshot_retrieval":
            for prefix in RETRIEVAL_PREFIXES:
                if not any(k.startswith(prefix) for k in metrics):
                    problems.append(f"retrieval record has no {prefix}k metric")
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not 0.0 <= v <= 1.0:
                problems.append(f"metric {k!r}={v} is outside [0, 1]")
    if problems:
        raise ValueError("not a clip_benchmark record: " + "; ".join(problems))


def model_name(model) -> str:
    """The record's `model` (clip_benchmark's architecture column): `OneR-<preset>` when the config
    matches a preset, else the sizes, e.g. `OneR-h768-L12-p16-224`; `CLIP-...` for the baseline."""
    cfg = model.config
    family = "CLIP" if getattr(cfg, "model_type", "oner") != "oner" or type(model).__name__ == "CLIPAsOneR" else "OneR"
    if family == "OneR":
        from modeling_oner.configuration_oner import ONER_PRESETS

        for name, preset in ONER_PRESETS.items():
            if all(getattr(cfg, k, None) == v for k, v in preset.items()):
                return f"OneR-{name}"
    return f"{family}-h{cfg.hidden_size}-L{cfg.num_hidden_layers}-p{cfg.patch_size}-{cfg.image_size}"


def output_path(template: str | None, output_dir: str | Path, record: dict) -> Path:
    """`template` formatted as clip_benchmark does (`{dataset}`, `{model}`, `{pretrained}`, `{task}`,
    `{language}`; `/` in names -> `_`), or `output_dir/standard_results/{dataset}_{task}.json`."""
    slug = {k: str(record[k]).replace("/", "_") for k in ("dataset", "model", "task", "language")}
    pretrained = str(record["pretrained"]).rstrip("/")
    slug["pretrained"] = os.path.basename(pretrained) if os.path.exists(pretrained) else pretrained.replace("/", "_")
    if template is None:
        return Path(output_dir) / RECORDS_DIR / DEFAULT_OUTPUT.format(**slug)
    try:
        return Path(template.format(**slug)).expanduser()
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"--output {template!r}: unknown field {e}; use {{dataset}}, {{model}}, {{pretrained}}, "
                         "{task}, {language}") from None


def write_record(record: dict, path: str | Path) -> Path:
    """Write `record` as JSON atomically (a temporary file renamed over `path`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({k: v for k, v in record.items() if not k.startswith("_")}, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    return path


def read_records(folder: str | Path) -> list[dict]:
    """The valid records among `folder`'s `*.json` files, sorted by data set then task (others ignored)."""
    out = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            validate_record(record)
        except (ValueError, OSError):
            continue
        out.append(record)
    return sorted(out, key=lambda r: (r["dataset"], r["task"]))


def records_table(records: list[dict]) -> str:
    """A Markdown table: data set, task, metric, value in percent, and the counts."""
    lines = ["| dataset | task | metric | value (%) | n |", "|---|---|---|---:|---|"]
    for r in records:
        counts = ", ".join(f"{k[2:]}={r[k]}" for k in ("n_images", "n_captions", "n_classes", "n_skipped") if k in r)
        for key, value in r["metrics"].items():
            shown = "" if value is None else f"{100 * value:.2f}"
            lines.append(f"| {r['dataset']} | {r['task']} | {key} | {shown} | {counts} |")
    return "\n".join(lines) + "\n"
