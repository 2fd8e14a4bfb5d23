"""A folder saved with transformers 5 still loads and gives the same outputs under transformers 4.57,
and OneR's `get_*_features` return what `CLIPModel`'s return under each version.

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


# Written as a CLIP user writes it: the same code runs on a CLIPModel and on a OneR folder loaded
# with AutoModel, under whichever transformers the interpreter has. For each feature method the
# model has it records the return type and the embedding read the CLIP way (`pooler_output` of
# transformers 5's output object, or 4.x's tensor).
CLIP_STYLE_FEATURES = """
import json, sys, torch
from transformers import AutoModel, CLIPConfig, CLIPModel, __version__
oner_folder, inputs_file = sys.argv[1], sys.argv[2]
inputs = {k: torch.tensor(v) for k, v in json.load(open(inputs_file)).items()}
layer = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
clip = CLIPModel(CLIPConfig(
    text_config=dict(layer, vocab_size=int(inputs["input_ids"].max()) + 1,
                     max_position_embeddings=inputs["input_ids"].shape[1]),
    vision_config=dict(layer, image_size=inputs["pixel_values"].shape[-1], patch_size=4),
    projection_dim=8,
)).eval()
oner = AutoModel.from_pretrained(oner_folder, trust_remote_code=True).eval()

def features(model):
    calls = {
        "get_image_features": lambda: model.get_image_features(pixel_values=inputs["pixel_values"]),
        "get_text_features": lambda: model.get_text_features(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]),
        "get_multimodal_features": lambda: model.get_multimodal_features(**inputs),
        "get_patch_features": lambda: model.get_patch_features(pixel_values=inputs["pixel_values"]),
    }
    seen = {}
    for name, call in calls.items():
        if not hasattr(model, name):
            continue
        with torch.no_grad():
            out = call()
        emb = out if isinstance(out, torch.Tensor) else out.pooler_output
        seen[name] = {"type": type(out).__name__, "embedding": emb.tolist()}
        if name == "get_patch_features":
            seen[name]["patches"] = (out if isinstance(out, torch.Tensor) else out.last_hidden_state).tolist()
    return seen

print(json.dumps({"version": __version__, "clip": features(clip), "oner": features(oner)}))
"""


@pytest.mark.parametrize("version", ["installed", pytest.param("4.57", marks=pytest.mark.slow)])
def test_feature_methods_return_what_clip_returns(version, tmp_path, tiny_model, tiny_processor):
    from oner.model_folder import save_model_folder

    folder = save_model_folder(tiny_model, tiny_processor, tmp_path / "model")
    images = [Image.new("RGB", (40, 30), "red"), Image.new("RGB", (20, 20), "blue")]
    inputs = dict(tiny_processor(text=["a red apple", "a blue square"], images=images))
    (tmp_path / "inputs.json").write_text(json.dumps({k: v.tolist() for k, v in inputs.items()}))
    python = sys.executable if version == "installed" else str(_compat_python())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [python, "-c", CLIP_STYLE_FEATURES, str(folder), str(tmp_path / "inputs.json")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    user = json.loads(result.stdout.strip().splitlines()[-1])
    clip, oner = user["clip"], user["oner"]

    major = int(user["version"].split(".")[0])
    if version == "4.57":
        assert user["version"].startswith("4.57")
    expected_type = "BaseModelOutputWithPooling" if major >= 5 else "Tensor"
    assert set(clip) == {"get_image_features", "get_text_features"}
    assert {v["type"] for v in clip.values()} == {expected_type}  # what CLIP does under this version ...
    assert {name: v["type"] for name, v in oner.items()} == dict.fromkeys(  # ... OneR does, for all four
        ["get_image_features", "get_text_features", "get_multimodal_features", "get_patch_features"], expected_type
    )
    # The embeddings read the CLIP way are OneR's own, under either version.
    with torch.no_grad():
        expected = {
            "get_image_features": tiny_model.embed(pixel_values=inputs["pixel_values"]),
            "get_text_features": tiny_model.embed(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]),
            "get_multimodal_features": tiny_model.embed(**inputs),
            "get_patch_features": tiny_model.embed(pixel_values=inputs["pixel_values"]),
        }
        patches = tiny_model.project(tiny_model.forward_features(pixel_values=inputs["pixel_values"]).last_hidden_state[:, 1:])
    for name, value in expected.items():
        if name == "get_patch_features" and major < 5:
            continue  # 4.x: the tensor IS the patches; there is no pooled image embedding beside them
        torch.testing.assert_close(torch.tensor(oner[name]["embedding"]), value, atol=1e-5, rtol=1e-5, msg=name)
    assert torch.tensor(oner["get_patch_features"]["patches"]).shape == (2, tiny_model.config.num_patches,
                                                                          tiny_model.config.projection_dim)
    torch.testing.assert_close(torch.tensor(oner["get_patch_features"]["patches"]), patches, atol=1e-5, rtol=1e-5)
