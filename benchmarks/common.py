"""Shared helpers of the benchmark scripts: machine facts, timing, the CLIP evaluation adapter."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def machine() -> dict:
    """What the numbers were measured on."""
    import torch
    import transformers

    flags = cpu_flags()
    return {
        "nproc": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_model": cpu_model(),
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "loadavg_at_start": loadavg(),
        "git_commit": _git_commit(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except Exception:
        return None


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# The CLIP baseline through the OneR benchmark suites
# ---------------------------------------------------------------------------------------------


def clip_adapter(clip_model):
    """Wrap a transformers `CLIPModel` in the four methods `oner.evaluation.EvalContext` calls.

    - image / text features: CLIP's own projected embeddings;
    - patch features: the vision tower's patch tokens through its post-LayerNorm and visual
      projection (the usual way to read a "dense" CLIP map, MaskCLIP-style without its value trick);
    - multimodal features: LATE fusion, normalize(z_I) + normalize(z_T): a two-tower model has no
      joint pass, so this is the natural baseline for the composed query.
    """
    import torch
    import torch.nn.functional as F

    class _Config:
        image_size = clip_model.config.vision_config.image_size
        patch_size = clip_model.config.vision_config.patch_size

    class CLIPForOneREval(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.clip = clip_model
            self.config = _Config()
            self.logit_scale = clip_model.logit_scale  # heatmaps read the temperature

        def get_image_features(self, pixel_values, **kw):
            out = self.clip.get_image_features(pixel_values=pixel_values)
            return getattr(out, "pooler_output", out)

        def get_text_features(self, input_ids, attention_mask=None, **kw):
            out = self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
            return getattr(out, "pooler_output", out)

        def get_patch_features(self, pixel_values, **kw):
            hidden = self.clip.vision_model(pixel_values=pixel_values).last_hidden_state[:, 1:]
            return self.clip.visual_projection(self.clip.vision_model.post_layernorm(hidden))

        def get_multimodal_features(self, input_ids, pixel_values, attention_mask=None, **kw):
            image = F.normalize(self.get_image_features(pixel_values).float(), dim=-1)
            text = F.normalize(self.get_text_features(input_ids, attention_mask).float(), dim=-1)
            return image + text

    return CLIPForOneREval().eval()


def evaluate_clip_folder(model_dir: str | Path, output_dir: str | Path | None = None,
                         max_items: int | None = None, progress: bool = False) -> dict:
    """`run_benchmark`'s default suites on a saved CLIPModel folder (through [`clip_adapter`]).

    `run_benchmark` itself refuses a CLIPModel (it has no patch or multimodal features), so the
    suites are run here with the same `EvalContext`, suite objects and result writer.
    """
    import time as _time

    from transformers import AutoModel, AutoProcessor

    from oner.evaluation import resolve_suites, DEFAULT_SUITES
    from oner.evaluation.context import EvalContext
    from oner.evaluation.embedded_data import ensure_embedded
    from oner.evaluation.report import write_results

    start = _time.time()
    model = AutoModel.from_pretrained(str(model_dir))
    processor = AutoProcessor.from_pretrained(str(model_dir))
    adapter = clip_adapter(model)
    root = ensure_embedded(None, progress=progress)
    output_dir = Path(output_dir) if output_dir is not None else Path(model_dir)
    ctx = EvalContext(adapter, processor, batch_size=64, progress=progress, max_items=max_items,
                      data_root=root, output_dir=output_dir)
    results = {}
    for suite in resolve_suites(DEFAULT_SUITES):
        results[suite.name] = suite.run(ctx)
    results["_meta"] = {"model": str(model_dir), "adapter": "benchmarks.common.clip_adapter (late fusion for "
                        "multimodal, projected patch tokens for pointing)", "max_items": max_items,
                        "seconds": round(_time.time() - start, 2)}
    write_results(results, output_dir)
    return results
