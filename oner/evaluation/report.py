"""Writing the results: `eval_results.json` (everything) and `eval_results.md` (a table)."""

from __future__ import annotations

import json
from pathlib import Path

from .base import is_metric

JSON_NAME = "eval_results.json"
MARKDOWN_NAME = "eval_results.md"


def chance_of(metrics: dict, key: str) -> float | None:
    """The chance level recorded for metric `key` (text-only recalls share the joint query's)."""
    if f"chance_{key}" in metrics:
        return metrics[f"chance_{key}"]
    if key.startswith("text_only_") and f"chance_{key[len('text_only_'):]}" in metrics:
        return metrics[f"chance_{key[len('text_only_'):]}"]
    return None


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}"


def markdown_table(results: dict) -> str:
    """One row per measured metric: suite, metric, value %, chance %, and the suite's counts."""
    lines = [
        "| suite | metric | value (%) | chance (%) | n |",
        "|---|---|---:|---:|---|",
    ]
    for suite, metrics in results.items():
        if suite.startswith("_"):
            continue
        counts = ", ".join(f"{k[2:]}={v}" for k, v in metrics.items() if k.startswith("n_"))
        for key, value in metrics.items():
            if is_metric(key):
                lines.append(f"| {suite} | {key} | {_pct(value)} | {_pct(chance_of(metrics, key))} | {counts} |")
    return "\n".join(lines) + "\n"


def write_results(results: dict, output_dir: str | Path) -> tuple[Path, Path]:
    """Write both files into `output_dir`; return their paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path = output_dir / JSON_NAME
    json_path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    meta = results.get("_meta", {})
    header = f"# OneR benchmark: {meta.get('model', '')}\n\n"
    header += ("Values and chance levels in percent; chance = the expected score of a random ranking "
               "(or a random patch, for the pointing game).\n\n")
    md_path = output_dir / MARKDOWN_NAME
    md_path.write_text(header + markdown_table(results), encoding="utf-8")
    return json_path, md_path
