"""A folder saved with transformers 5 still loads and gives the same outputs under transformers 4.57.

Builds a second venv (torch 2.13.0 + transformers 4.57.*, cached in `.venv-transformers-4.57/`)
on first use; about a minute, once.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

PROJECT_ROOT = Path(__file__).resolve().parents[1]
COMPAT_VENV = PROJECT_ROOT / ".venv-transformers-4.57"

LOAD_AS_USER = """
import json, sys, torch
from PIL import Image
from transformers import AutoModel, AutoProcessor, pipeline, __version__
folder = sys.argv[1]
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
inputs = processor(text=["a red apple", "a dog"], images=[Image.new("RGB", (40, 30), "red")] * 2)
with torch.no_grad():
    logits = model(**inputs).logits_per_image
ranked = pipeline("zero-shot-image-classification", model=folder, trust_remote_code=True)(
    Image.new("RGB", (40, 30), "red"), candidate_labels=["a red apple", "a dog"])
print(json.dumps({"version": __version__, "logits": logits.tolist(), "labels": sorted(r["label"] for r in ranked)}))
"""


def _compat_python() -> Path:
    python = COMPAT_VENV / "bin" / "python"
    if not python.exists():
        pip = [str(COMPAT_VENV / "bin" / "pip"), "install", "-q", "--disable-pip-version-check"]
        try:
            subprocess.run([sys.executable, "-m", "venv", str(COMPAT_VENV)], check=True, timeout=120)
            subprocess.run([*pip, "torch==2.13.0"], check=True, timeout=600)
            subprocess.run([*pip, "transformers==4.57.*", "pillow", "numpy"], check=True, timeout=600)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
            subprocess.run(["rm", "-rf", str(COMPAT_VENV)])
            pytest.skip(f"could not build a transformers 4.57 venv from the package registry: {error}")
    return python


@pytest.mark.slow
def test_folder_saved_with_transformers_5_loads_under_4_57(tmp_path, tiny_model, tiny_processor):
    from oner.model_folder import save_model_folder

    folder = save_model_folder(tiny_model, tiny_processor, tmp_path / "model")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [str(_compat_python()), "-c", LOAD_AS_USER, str(folder)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    user = json.loads(result.stdout.strip().splitlines()[-1])
    assert user["version"].startswith("4.57")
    inputs = tiny_processor(text=["a red apple", "a dog"], images=[Image.new("RGB", (40, 30), "red")] * 2)
    with torch.no_grad():
        expected = tiny_model(**inputs).logits_per_image
    torch.testing.assert_close(torch.tensor(user["logits"]), expected, atol=1e-5, rtol=1e-5)
    assert user["labels"] == ["a dog", "a red apple"]
