"""Resumable checkpoints: `accelerator.save_state` into a temporary folder renamed into place.

Layout: `<output_dir>/checkpoints/checkpoint-<step>/` with accelerate's files (model, optimizer,
scheduler, RNG states, registered objects) plus `train_state.json` (step, data position, ...),
written last. A crash while saving leaves only `.tmp-checkpoint-*`, which is never picked up.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "train_state.json"


class TrainState:
    """Counters that a resume must restore; registered with `accelerator.register_for_checkpointing`.

    - `step`: optimizer updates done; `batches_seen`: micro-batches consumed in total (the data position);
    - `total_steps`: the schedule's length in steps; 0 when only a time budget bounds the run;
    - `decay_start_seconds`: training time at the end of the warm-up, where a time-based decay starts;
    - `skipped_steps` / `nonfinite_in_a_row`: the NaN/inf guard's counters;
    - `train_seconds`: training time so far, for the time budget across resumes.
    """

    def __init__(self) -> None:
        self.step = 0
        self.batches_seen = 0
        self.total_steps = 0
        self.decay_start_seconds: float | None = None
        self.skipped_steps = 0
        self.nonfinite_in_a_row = 0
        self.train_seconds = 0.0

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


# Settings that must match between a checkpoint and the run resuming it: a checkpoint records them
# (`settings_to_match`, saved under "args" in train_state.json) and a resume compares them.
RESUME_MUST_MATCH = ("preset", "config_overrides", "architecture", "objective", "per_device_batch_size", "accum_freq",
                     "pairwise_loss", "xmc_form", "cmc_context", "cmc_fraction", "temperature",
                     "cmc_target", "joint_negatives", "joint_margin", "quad_pooling",
                     "model_name_or_path", "revision")


def settings_to_match(args, preset: str) -> dict:
    """This run's `RESUME_MUST_MATCH` settings; `preset` is the model's (a loaded model's is the one its
    sizes match, not the flag's default)."""
    return {k: preset if k == "preset" else getattr(args, k) for k in RESUME_MUST_MATCH}


def settings_differences(saved: dict, now: dict) -> list[str]:
    """`"name: checkpoint X, now Y"` for each setting a checkpoint recorded that this run changes."""
    return [f"{k}: checkpoint {saved[k]!r}, now {now[k]!r}" for k in RESUME_MUST_MATCH if k in saved and saved[k] != now[k]]


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def resolve_resume(value: str | None, output_dir: str | Path) -> Path | None:
    """The checkpoint folder to resume from, validated; None for a fresh run.

    Raises `FileNotFoundError` / `ValueError` with a clear message for `latest` without any
    checkpoint, a missing folder, or a damaged one.
    """
    if value is None:
        return None
    if value == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(
                f"--resume_from_checkpoint latest: no checkpoint in {checkpoints_dir(output_dir)}"
            )
        path = found[-1]
    else:
        path = Path(value).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"--resume_from_checkpoint {value}: no such folder")
    check_checkpoint(path)
    return path


def check_checkpoint(path: Path) -> dict:
    """Validate a checkpoint folder and return its `train_state.json`; ValueError naming what is wrong."""
    state_file = path / STATE_FILE
    try:
        state = json.loads(state_file.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} is not a complete checkpoint: {STATE_FILE} is missing") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is damaged: {STATE_FILE} is unreadable ({e})") from None
    for name in state.get("files", []):
        file = path / name
        if not file.is_file() or file.stat().st_size == 0:
            raise ValueError(f"{path} is damaged: {name} is missing or empty")
    return state


def process_state_file(process_index: int) -> str:
    return f"process_state_{process_index}.pt"


def load_process_state(checkpoint: Path, process_index: int) -> dict:
    """What `save_checkpoint(..., process_state=...)` wrote for this process (a stream's position)."""
    file = Path(checkpoint) / process_state_file(process_index)
    if not file.is_file():
        raise ValueError(f"{checkpoint} holds no stream position for process {process_index}")
    import torch

    return torch.load(file, map_location="cpu", weights_only=False)


def save_checkpoint(accelerator, output_dir: str | Path, step: int, extra: dict, limit: int,
                    process_state: dict | None = None) -> Path:
    """Save the whole training state for `step`; keep the newest `limit` checkpoints.

    Every process must call this (accelerate writes one RNG file per process). `process_state` is
    this process's own state beyond accelerate's (a stream's position: each process reads its own
    part), written by each process as `process_state_<index>.pt`. The folder appears under its
    final name only once complete: saved as `.tmp-checkpoint-<step>`, then renamed.
    """
    root = checkpoints_dir(output_dir)
    tmp = root / f".tmp-checkpoint-{step}"
    final = root / f"checkpoint-{step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if process_state is not None:
        import torch

        torch.save(process_state, tmp / process_state_file(accelerator.process_index))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        state = {"step": step, "files": files, "process_states": process_state is not None, **extra}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2, default=str) + "\n")
        with open(tmp / STATE_FILE) as f:
            os.fsync(f.fileno())
        if final.exists():  # a re-run reaching the same step: replace the old one
            shutil.rmtree(final)
        os.rename(tmp, final)
        for old in list_checkpoints(output_dir)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
