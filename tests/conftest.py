"""Test-wide settings: offline, no analytics, a temporary HF_HOME, tiny models."""

import os
import socket
import tempfile

# Set before transformers/datasets/gradio are imported by any test module.
_HF_HOME = tempfile.mkdtemp(prefix="oner-test-hf-home-")
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import pytest  # noqa: E402
import torch  # noqa: E402

def reset_accelerate() -> None:
    """accelerate keeps process-wide singletons: each in-process run of train.py builds its own Accelerator."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture
def fresh_accelerate_state():
    reset_accelerate()
    yield
    reset_accelerate()


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    """48 colour swatches with captions, as an imagefolder (metadata.jsonl); test modules may override it."""
    import json

    from PIL import Image

    root = tmp_path_factory.mktemp("pairs")
    rows = []
    for i in range(48):
        Image.new("RGB", (24, 24), (i * 5, 255 - i * 5, (i * 37) % 256)).save(root / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"colour number {i} swatch"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for servers and process groups in tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A model small enough for every test to build in milliseconds.
TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    image_size=16,
    patch_size=4,
    max_position_embeddings=16,
    projection_dim=24,
)


@pytest.fixture
def tiny_config():
    from modeling_oner import OneRConfig

    return OneRConfig.from_preset("tiny", **TINY)


@pytest.fixture
def tiny_model(tiny_config):
    from modeling_oner import OneRModel

    torch.manual_seed(0)
    return OneRModel(tiny_config).eval()


@pytest.fixture
def tiny_processor(tiny_config):
    from processing_oner import build_processor

    return build_processor(tiny_config)


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_config):
    """A complete saved model folder (weights, processor, remote code) of the tiny test model."""
    from oner.model_folder import init_model_folder

    return init_model_folder(tiny_config, tmp_path / "tiny-oner", seed=0)
