"""Training log (JSON lines), loss-curve PNG and the progress-bar text."""

from __future__ import annotations

import json
from pathlib import Path

LOG_NAME = "training_log.jsonl"
PLOT_NAME = "loss_curve.png"


class TrainingLog:
    """Appends one JSON object per logged step to `<output_dir>/training_log.jsonl` (main process only).

    On resume the lines after the resumed step are dropped, so the log (and the plot) never shows a
    step twice.
    """

    def __init__(self, output_dir: str | Path, resume_step: int | None, enabled: bool):
        self.path = Path(output_dir) / LOG_NAME
        self.enabled = enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        else:
            kept = [r for r in self.read() if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def plot_loss_curve(records: list[dict], path: str | Path, title: str) -> Path | None:
    """Loss (and each objective term) against step, saved as a PNG; None when there is nothing to plot."""
    points = [r for r in records if "loss" in r]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    steps = [r["step"] for r in points]
    ax.plot(steps, [r["loss"] for r in points], label="total loss", linewidth=2)
    terms = sorted({k[5:] for r in points for k in r if k.startswith("loss/")})
    for term in terms:
        ax.plot(steps, [r.get(f"loss/{term}", float("nan")) for r in points], label=term, linewidth=1, alpha=0.8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def format_eta(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    return f"{seconds // 60}:{seconds % 60:02d}"
