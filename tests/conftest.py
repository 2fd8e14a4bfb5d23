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
