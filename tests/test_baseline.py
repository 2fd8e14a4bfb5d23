"""The two-tower baseline behind OneR's interface: `oner.baseline.CLIPAsOneR` and its training wrapper."""

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY

from modeling_oner.modeling_oner import FEATURES_AS_OUTPUT


def _tensor(out, field="pooler_output"):
    return getattr(out, field) if FEATURES_AS_OUTPUT else out


@pytest.fixture
def clip_and_batch():
    from modeling_oner import OneRConfig
    from oner.baseline import build_clip

    config = OneRConfig.from_preset("tiny", **TINY)
    torch.manual_seed(0)
    model, processor = build_clip(config)
    ids = torch.randint(1000, 2000, (3, 8))
    ids[:, -1] = model.clip.config.text_config.eos_token_id
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "pixel_values": torch.randn(3, 3, config.image_size, config.image_size)}
    return config, model.eval(), batch


def test_the_adapter_reads_like_a_oner_model(clip_and_batch):
    config, model, batch = clip_and_batch
    pixels, text = batch["pixel_values"], {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        image = model.get_image_features(pixel_values=pixels)
        words = model.get_text_features(**text)
        patches = model.get_patch_features(pixels)
        joint = model.get_multimodal_features(pixel_values=pixels, **text)
        # The installed transformers' convention, as OneR's (an output object under 5, a tensor under 4.x).
        assert isinstance(image, torch.Tensor) != FEATURES_AS_OUTPUT
        torch.testing.assert_close(_tensor(image), _tensor(model.clip.get_image_features(pixel_values=pixels)))
        # `embed` gives the same embeddings as plain tensors: what the training code reads.
        torch.testing.assert_close(model.embed(pixel_values=pixels), _tensor(image))
        torch.testing.assert_close(model.embed(**text), _tensor(words))
        late = F.normalize(_tensor(image).float(), dim=-1) + F.normalize(_tensor(words).float(), dim=-1)
        torch.testing.assert_close(_tensor(joint), late)
        torch.testing.assert_close(model.embed(pixel_values=pixels, **text), late)
    grid = config.image_size // config.patch_size
    assert _tensor(patches, "last_hidden_state").shape == (3, grid * grid, config.projection_dim)
    if FEATURES_AS_OUTPUT:
        torch.testing.assert_close(patches.pooler_output, image.pooler_output)
    # What evaluation reads from a model's config, and the temperature training clamps.
    assert (model.config.image_size, model.config.patch_size) == (config.image_size, config.patch_size)
    assert model.config.projection_dim == config.projection_dim
    assert model.logit_scale is model.clip.logit_scale
    assert getattr(model.config, "pooling", None) is None  # a OneR-only field reads as absent
    assert model.config._attn_implementation == model.clip.config._attn_implementation
    with pytest.raises(ValueError, match="no attention between its towers"):
        model.embed(pixel_values=pixels, cross_modal_attention=True, **text)


def test_the_training_wrapper_trains_the_clip_weights(clip_and_batch):
    from oner.objectives import Objective, ObjectiveConfig
    from oner.training.pretrainer import OneRPretrainer

    _, model, batch = clip_and_batch
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # --gradient_checkpointing
    assert model.clip.vision_model.encoder.gradient_checkpointing and model.clip.text_model.encoder.gradient_checkpointing
    pretrainer = OneRPretrainer(model.train(), ObjectiveConfig(weights={"itc": 1.0}))
    features = pretrainer(**batch)
    assert set(features) == {"image", "text", "logit_scale"}
    torch.testing.assert_close(features["image"].norm(dim=-1), torch.ones(3))
    loss, parts = Objective(ObjectiveConfig(weights={"itc": 1.0}))(features)
    loss.backward()
    assert model.clip.logit_scale.grad is not None
    assert model.clip.vision_model.embeddings.patch_embedding.weight.grad.abs().sum() > 0
    assert model.clip.text_projection.weight.grad.abs().sum() > 0


def test_the_saved_folder_is_a_plain_clip_model(tmp_path):
    from transformers import AutoModel, CLIPModel

    from modeling_oner import OneRConfig
    from oner.baseline import build_clip, save_clip_folder

    model, processor = build_clip(OneRConfig.from_preset("tiny", **TINY))
    folder = save_clip_folder(model, processor, tmp_path / "clip")
    loaded = AutoModel.from_pretrained(folder)
    assert type(loaded) is CLIPModel
    torch.testing.assert_close(loaded.logit_scale, model.logit_scale)



def test_the_adapter_rebuilds_from_its_config_and_copies(clip_and_batch):
    """`type(model)(model.config)`, as for a PreTrainedModel (the training loop's final save), and
    `copy.deepcopy` (the EMA target) both give a model of the same shape."""
    import copy

    from oner.baseline import CLIPAsOneR

    _, model, batch = clip_and_batch
    fresh = CLIPAsOneR(model.config)
    assert fresh.state_dict().keys() == model.state_dict().keys()
    fresh.load_state_dict(model.state_dict())
    twin = copy.deepcopy(model)
    with torch.no_grad():
        expected = model.embed(pixel_values=batch["pixel_values"])
        torch.testing.assert_close(fresh.embed(pixel_values=batch["pixel_values"]), expected)
        torch.testing.assert_close(twin.embed(pixel_values=batch["pixel_values"]), expected)
    assert twin.config.image_size == model.config.image_size

