"""Reading the embedded data set (built by `oner.data.build_embedded_dataset`) for evaluation.

Each split is an imagefolder: PNG files and `metadata.jsonl`. The benchmark reads the JSON lines
itself because it needs fields that a plain image-caption loader drops (group, sub-group, the
objects and boxes of composites).
"""

from __future__ import annotations

import json
from pathlib import Path

from .context import BenchmarkError


def ensure_embedded(data_root: str | Path | None, progress: bool = True) -> Path:
    """The embedded data set root: any finished build already at `data_root` is used as it is
    (whatever its seed or limit); otherwise the full set is built there (default root if None)."""
    from oner.data import build_embedded_dataset, default_root, read_manifest

    root = Path(data_root).expanduser() if data_root is not None else default_root()
    if read_manifest(root) is not None:
        return root
    if root.exists() and root.is_dir() and any(root.iterdir()) and not (root / "twemoji").is_dir():
        raise BenchmarkError(f"{root} is not an embedded data set build (no manifest.json); choose another --data_root")
    return build_embedded_dataset(root=root, progress=progress)


def read_split(root: Path, split: str, skin_tones: bool = False) -> list[dict]:
    """Rows of one split with an absolute `path`; skin-tone variants left out unless asked.

    Skin-tone variants look like their base emoji, so they make N-way tasks ambiguous for reasons
    that have nothing to do with the model.
    """
    meta = Path(root) / split / "metadata.jsonl"
    if not meta.is_file():
        raise BenchmarkError(f"{meta} not found: {root} holds no {split!r} split")
    rows = []
    with open(meta, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            if row.get("skin_tone") and not skin_tones:
                continue
            row["path"] = str(Path(root) / split / row["file_name"])
            rows.append(row)
    if not rows:
        raise BenchmarkError(f"the {split!r} split under {root} is empty: nothing to evaluate")
    return rows
