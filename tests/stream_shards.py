"""Webdataset shards for the streaming tests, written from a small embedded build, with damage.

Every sample has a unique key (`<shard>-<index>`); the last two of each shard are damaged (a
truncated PNG, an empty caption), so each shard holds `per_shard` good pairs.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path


def write_shards(folder: Path, embedded_root: Path, n_shards: int = 16, per_shard: int = 320) -> dict:
    """Write `n_shards` tar files; returns `{"good": [keys], "damaged": [keys]}`."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in (embedded_root / "twemoji" / "metadata.jsonl").read_text().splitlines()]
    images = [(embedded_root / "twemoji" / r["file_name"]).read_bytes() for r in rows]
    good, damaged = [], []
    for s in range(n_shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i in range(per_shard + 2):
                key = f"{s:05d}-{i:04d}"
                k = (s * per_shard + i) % len(rows)
                png, caption = images[k], rows[k]["text"]
                if i == per_shard:
                    png = png[: len(png) // 2]  # truncated
                elif i == per_shard + 1:
                    caption = "  "  # empty
                (damaged if i >= per_shard else good).append(key)
                for ext, data in (("png", png), ("txt", caption.encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return {"good": good, "damaged": damaged}


# Run train.py with every trained step's sample keys logged per process, and (optionally) the
# whole launch killed with SIGKILL once process 0 has trained a given step: the crash the
# checkpoints must survive. Used as `accelerate launch <this script> <train.py flags>`.
LOGGING_LAUNCHER = '''
import json, os, signal, sys
import oner.training.loop as loop

real_step = loop.optimisation_step
log_prefix, kill_at = os.environ["KEY_LOG"], int(os.environ.get("KILL_AT_STEP", "0"))
steps = 0

def logged_step(pretrainer, objective, micro_batches, accelerator, *args, **kwargs):
    global steps
    out = real_step(pretrainer, objective, micro_batches, accelerator, *args, **kwargs)
    steps += 1
    keys = [key for batch in micro_batches for key in batch["sample_keys"]]
    with open(f"{log_prefix}.{accelerator.process_index}", "a") as f:
        f.write(json.dumps({"finite": bool(out[3]), "keys": keys}) + "\\n")
    if kill_at and steps == kill_at and accelerator.is_main_process:
        os.killpg(os.getpgid(0), signal.SIGKILL)
    return out

loop.optimisation_step = logged_step
sys.exit(loop.main())
'''
