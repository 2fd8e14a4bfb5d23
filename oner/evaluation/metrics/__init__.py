"""OneR's metrics, shipped as `evaluate` modules and loaded BY PATH so they work offline.

`evaluate.load("accuracy")` downloads a script from the Hub; `evaluate.load(<local folder>)` does not.
Each metric is a folder `<name>/` holding `<name>.py` that defines an `evaluate.Metric`.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

METRICS_DIR = Path(__file__).resolve().parent
METRIC_NAMES = ("retrieval_recall", "topk_accuracy", "pointing_game")


def metric_path(name: str) -> Path:
    """Folder of the shipped metric `name` (one of `METRIC_NAMES`)."""
    if name not in METRIC_NAMES:
        raise ValueError(f"unknown metric {name!r}; OneR ships {list(METRIC_NAMES)}")
    return METRICS_DIR / name


@lru_cache(maxsize=None)
def load_metric(name: str):
    """`evaluate.load` of a shipped metric by its folder path (no network needed)."""
    import evaluate

    return evaluate.load(str(metric_path(name)))
