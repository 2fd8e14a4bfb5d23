"""Saved folders load with trust_remote_code where this project is absent, and keep every value."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

from modeling_oner import OneRModel
from oner.init_model import main as oner_init
from oner.model_folder import REMOTE_CODE_FILES, save_model_folder

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter that cannot import this project: its folder is off sys.path and an
# import hook refuses its packages even if they are pip-installed. It loads the folder the way a
# user does and prints the results as JSON.
USER_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys
    PROJECT = {project!r}

    class RefuseProject(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("modeling_oner", "processing_oner", "oner"):
                raise ImportError(f"{{name}} is this project's package; a user does not have it")
            return None

    sys.meta_path.insert(0, RefuseProject())
    sys.path = [p for p in sys.path if p not in ("", ".", PROJECT)]
    try:
        import modeling_oner
        raise SystemExit("the project is importable: the test would prove nothing")
    except ImportError:
        pass

    import torch
    from PIL import Image
    from transformers import AutoModel, AutoProcessor, pipeline
    from transformers.dynamic_module_utils import check_imports

    folder = sys.argv[1]
    for name in ("configuration_oner.py", "modeling_oner.py", "processing_oner.py"):
        check_imports(f"{{folder}}/{{name}}")
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    images = [Image.new("RGB", (40, 30), "red"), Image.new("RGBA", (20, 20), (0, 0, 255, 200))]
    inputs = processor(text=["a red apple", "blue square"], images=images)
    with torch.no_grad():
        out = model(**inputs)
        joint = model.get_multimodal_features(**inputs)
    classifier = pipeline("zero-shot-image-classification", model=folder, trust_remote_code=True)
    ranked = classifier(images[0], candidate_labels=["a red apple", "blue square", "dog"])
    print(json.dumps({{
        "class": type(model).__name__,
        "module": type(model).__module__,
        "logit_scale": model.logit_scale.item(),
        "logits_per_image": out.logits_per_image.tolist(),
        "joint_type": type(joint).__name__,
        "joint": joint.pooler_output.tolist(),  # transformers 5: an output object, as CLIP's
        "pipeline_labels": sorted(r["label"] for r in ranked),
        "pipeline_total": sum(r["score"] for r in ranked),
    }}))
    """
)


def _run_as_user(folder: Path) -> dict:
    script = USER_SCRIPT.format(project=str(PROJECT_ROOT))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", script, str(folder)],
        cwd=folder.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_saved_folder_loads_without_the_project_with_identical_outputs(tmp_path, tiny_model, tiny_processor):
    with torch.no_grad():
        tiny_model.logit_scale.fill_(4.0)  # a non-default value must survive
    folder = save_model_folder(tiny_model, tiny_processor, tmp_path / "model")
    for name in (*REMOTE_CODE_FILES, "config.json", "model.safetensors", "processor_config.json", "tokenizer.json"):
        assert (folder / name).is_file(), name
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForZeroShotImageClassification"] == "modeling_oner.OneRModel"
    assert json.loads((folder / "processor_config.json").read_text())["auto_map"]["AutoProcessor"] == (
        "processing_oner.OneRProcessor"
    )

    user = _run_as_user(folder)

    images = [Image.new("RGB", (40, 30), "red"), Image.new("RGBA", (20, 20), (0, 0, 255, 200))]
    inputs = tiny_processor(text=["a red apple", "blue square"], images=images)
    with torch.no_grad():
        expected = tiny_model(**inputs).logits_per_image
        joint = tiny_model.get_multimodal_features(**inputs).pooler_output
    assert user["class"] == "OneRModel" and user["module"].startswith("transformers_modules")
    assert user["logit_scale"] == pytest.approx(4.0)
    torch.testing.assert_close(torch.tensor(user["logits_per_image"]), expected, atol=1e-5, rtol=1e-5)
    assert user["joint_type"] == "BaseModelOutputWithPooling"
    torch.testing.assert_close(torch.tensor(user["joint"]), joint, atol=1e-5, rtol=1e-5)
    assert user["pipeline_labels"] == ["a red apple", "blue square", "dog"]
    assert user["pipeline_total"] == pytest.approx(1.0, abs=1e-4)


def test_every_value_survives_save_and_load(tmp_path, tiny_model, tiny_processor):
    """The transformers-5 traps: _init_weights overwriting loaded tensors, uninitialised buffers."""
    from transformers import AutoModel

    with torch.no_grad():
        tiny_model.logit_scale.fill_(4.0)
        tiny_model.embeddings.text_position_embedding.weight.mul_(3.0).add_(0.5)
        tiny_model.embeddings.cls_embedding.fill_(0.25)
        tiny_model.post_layernorm.weight.fill_(1.5)
    assert not [name for name, _ in tiny_model.named_buffers()], "a buffer would need care on load"
    folder = save_model_folder(tiny_model, tiny_processor, tmp_path / "model")
    for implementation in ("eager", "sdpa"):
        loaded = AutoModel.from_pretrained(folder, attn_implementation=implementation)
        assert loaded.logit_scale.item() == pytest.approx(4.0)
        expected = tiny_model.state_dict()
        for name, value in loaded.state_dict().items():
            torch.testing.assert_close(value, expected[name], atol=0, rtol=0, msg=name)
    position_ids = torch.tensor([[3, 2, 1, 0]])
    input_ids = torch.tensor([[2000, 2001, 2002, 2003]])
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.get_text_features(input_ids, position_ids=position_ids).pooler_output,
            tiny_model.get_text_features(input_ids, position_ids=position_ids).pooler_output,
        )


def test_missing_or_damaged_weights_are_clear_errors(tiny_model_dir):
    weights = tiny_model_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match="damaged or incomplete"):
        OneRModel.from_pretrained(tiny_model_dir)
    weights.unlink()
    with pytest.raises(OSError, match="model.safetensors"):
        OneRModel.from_pretrained(tiny_model_dir)


def test_oner_init_writes_a_complete_folder_with_overrides(tmp_path, capsys):
    from transformers import AutoConfig

    folder = tmp_path / "fresh"
    assert oner_init(["--preset", "tiny", "--output-dir", str(folder), "--image-size", "32", "--patch-size", "8",
                      "--hidden-size", "64", "--num-hidden-layers", "1", "--num-attention-heads", "2"]) == 0
    config = AutoConfig.from_pretrained(folder)
    assert (config.image_size, config.patch_size, config.hidden_size, config.num_hidden_layers) == (32, 8, 64, 1)
    assert config.intermediate_size == 512 and config.pooling == "mean"  # untouched preset fields
    assert all((folder / name).is_file() for name in REMOTE_CODE_FILES)
    assert json.loads((folder / "processor_config.json").read_text())["patch_size"] == 8
    assert oner_init(["--output-dir", str(tmp_path / "bad"), "--hidden-size", "30"]) == 2
    assert "divisible by num_attention_heads" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
