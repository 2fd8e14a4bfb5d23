"""OneRModel: one shared tower for every input kind, CLIP-compatible outputs, attention and precision switches."""

import pytest
import torch

from transformers.modeling_outputs import BaseModelOutputWithPooling

from modeling_oner import OneRConfig, OneRModel
from modeling_oner.modeling_oner import FEATURES_AS_OUTPUT, OneREncoderLayer


def _pooled(out):
    """The `(batch, projection_dim)` embedding of a `get_image/text/multimodal_features` result, after
    checking that it follows the installed transformers' convention (an output object in 5.x)."""
    if FEATURES_AS_OUTPUT:
        assert isinstance(out, BaseModelOutputWithPooling), type(out)
        return out.pooler_output
    assert isinstance(out, torch.Tensor), type(out)
    return out


def _patches(out):
    """The `(batch, num_patches, projection_dim)` patches of a `get_patch_features` result (see `_pooled`)."""
    if FEATURES_AS_OUTPUT:
        assert isinstance(out, BaseModelOutputWithPooling), type(out)
        return out.last_hidden_state
    assert isinstance(out, torch.Tensor), type(out)
    return out


def _inputs(config, batch=3, length=5, pad_last=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch, 3, config.image_size, config.image_size, generator=generator)
    input_ids = torch.randint(1000, 2000, (batch, length), generator=generator)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    attention_mask[-1, length - pad_last :] = 0
    input_ids[attention_mask == 0] = config.pad_token_id
    return pixel_values, input_ids, attention_mask


def _sequence_lengths_seen_by_layers(model, call):
    """Runs `call` and returns the sequence length every shared layer saw, in call order."""
    seen = []
    hooks = [
        layer.register_forward_hook(lambda module, args, out: seen.append((id(module), args[0].shape[1])))
        for layer in model.encoder.layers
    ]
    try:
        call()
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def test_only_the_embedders_are_modality_specific(tiny_model):
    modality_words = ("image", "text", "vision", "patch", "token")
    specific = [name for name, _ in tiny_model.named_parameters() if any(w in name for w in modality_words)]
    assert specific and all(name.startswith("embeddings.") for name in specific), specific
    # exactly one tower and one head
    assert len([m for m in tiny_model.modules() if isinstance(m, OneREncoderLayer)]) == tiny_model.config.num_hidden_layers
    assert sum(1 for name, _ in tiny_model.named_modules() if name == "head") == 1


def test_same_layers_encode_images_texts_and_joint_sequences(tiny_model, tiny_config):
    pixel_values, input_ids, attention_mask = _inputs(tiny_config)
    layer_ids = [id(layer) for layer in tiny_model.encoder.layers]
    n_patches, length = tiny_config.num_patches, input_ids.shape[1]
    with torch.no_grad():
        image = _sequence_lengths_seen_by_layers(tiny_model, lambda: tiny_model.get_image_features(pixel_values))
        text = _sequence_lengths_seen_by_layers(
            tiny_model, lambda: tiny_model.get_text_features(input_ids, attention_mask)
        )
        joint = _sequence_lengths_seen_by_layers(
            tiny_model, lambda: tiny_model.get_multimodal_features(input_ids, pixel_values, attention_mask)
        )
    assert [m for m, _ in image] == [m for m, _ in text] == [m for m, _ in joint] == layer_ids
    assert {n for _, n in image} == {1 + n_patches}
    assert {n for _, n in text} == {1 + length}
    # ONE joint sequence per pair, not two encodings fused afterwards
    assert {n for _, n in joint} == {1 + n_patches + length}


def test_gradients_from_each_modality_reach_every_shared_weight(tiny_model, tiny_config):
    pixel_values, input_ids, attention_mask = _inputs(tiny_config)
    tiny_model.train()
    for features in (
        lambda: tiny_model.get_image_features(pixel_values),
        lambda: tiny_model.get_text_features(input_ids, attention_mask),
    ):
        tiny_model.zero_grad()
        _pooled(features()).square().sum().backward()
        for name, parameter in tiny_model.named_parameters():
            if name.startswith(("encoder.", "post_layernorm.", "head.")):
                assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_forward_has_clip_fields_and_loss(tiny_model, tiny_config):
    pixel_values, input_ids, attention_mask = _inputs(tiny_config)
    out = tiny_model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, return_loss=True)
    assert out.logits_per_image.shape == (3, 3) and torch.equal(out.logits_per_text, out.logits_per_image.t())
    assert out.image_embeds.shape == out.text_embeds.shape == (3, tiny_config.projection_dim)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(3))
    expected = tiny_model.logit_scale.exp() * out.image_embeds @ out.text_embeds.t()
    torch.testing.assert_close(out.logits_per_image, expected)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert out.vision_model_output.last_hidden_state.shape[1] == 1 + tiny_config.num_patches
    as_tuple = tiny_model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, return_dict=False)
    torch.testing.assert_close(as_tuple[0], out.logits_per_image)


def test_l2_normalize_gives_unit_fp32_rows():
    """The project's one normalisation (model scores, training features, evaluation) works in fp32."""
    from modeling_oner.modeling_oner import l2_normalize

    x = torch.randn(4, 8).to(torch.bfloat16)
    out = l2_normalize(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(out, x.float() / x.float().norm(dim=-1, keepdim=True))


def test_forward_scores_any_number_of_texts_per_image(tiny_model, tiny_config):
    pixel_values, input_ids, attention_mask = _inputs(tiny_config)
    out = tiny_model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values[:1])
    assert out.logits_per_image.shape == (1, 3)


def test_padding_does_not_change_text_embeddings(tiny_model, tiny_config):
    _, input_ids, _ = _inputs(tiny_config, batch=1, length=4, pad_last=0)
    padded = torch.cat([input_ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0]])
    with torch.no_grad():
        short = _pooled(tiny_model.get_text_features(input_ids))
        long = _pooled(tiny_model.get_text_features(padded, mask))
    torch.testing.assert_close(short, long, atol=1e-5, rtol=1e-5)


def test_multimodal_embedding_is_not_a_mix_of_separate_encodings(tiny_model, tiny_config):
    pixel_values, input_ids, attention_mask = _inputs(tiny_config)
    with torch.no_grad():
        joint = _pooled(tiny_model.get_multimodal_features(input_ids, pixel_values, attention_mask))
        image = _pooled(tiny_model.get_image_features(pixel_values))
        text = _pooled(tiny_model.get_text_features(input_ids, attention_mask))
    assert joint.shape == image.shape
    assert not torch.allclose(joint, image, atol=1e-4) and not torch.allclose(joint, text, atol=1e-4)


def test_cross_modal_attention_lets_each_modality_see_only_the_other(tiny_config):
    config = OneRConfig(**{**tiny_config.to_dict(), "_attn_implementation": "eager"})
    model = OneRModel(config).eval()
    model.set_attn_implementation("eager")
    pixel_values, input_ids, attention_mask = _inputs(config)
    out = model.forward_features(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=pixel_values,
        cross_modal_attention=True,
        output_attentions=True,
    )
    n = config.num_patches
    images, texts = slice(1, 1 + n), slice(1 + n, None)
    for weights in out.attentions:  # (batch, heads, query, key)
        assert weights[:, :, images, images].abs().max() == 0
        assert weights[:, :, texts, texts].abs().max() == 0
        assert weights[:, :, images, 0].abs().max() == 0  # tokens do not read [CLS] either
        assert weights[-1, :, :, -2:].abs().max() == 0  # padding is never attended
        assert (weights[:, :, 0, :].sum(-1) - 1).abs().max() < 1e-5  # [CLS] reads everything
    full = model.forward_features(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
    assert not torch.allclose(full.pooler_output, out.pooler_output)


@pytest.mark.parametrize("cross", [False, True])
def test_eager_and_sdpa_agree(tiny_model, tiny_config, cross):
    pixel_values, input_ids, attention_mask = _inputs(tiny_config)
    results = {}
    for implementation in ("eager", "sdpa"):
        tiny_model.set_attn_implementation(implementation)
        with torch.no_grad():
            results[implementation] = (
                tiny_model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values).logits_per_image,
                _pooled(tiny_model.get_multimodal_features(input_ids, pixel_values, attention_mask, cross_modal_attention=cross)),
            )
    for eager, sdpa in zip(results["eager"], results["sdpa"]):
        torch.testing.assert_close(eager, sdpa, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_same_loss_and_gradients(tiny_config):
    pixel_values, input_ids, attention_mask = _inputs(tiny_config)
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = OneRModel(tiny_config).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert model.is_gradient_checkpointing
        out = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, return_loss=True)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_keeps_logits_and_scale_in_fp32(tiny_model, tiny_config, dtype):
    pixel_values, input_ids, attention_mask = _inputs(tiny_config)
    with torch.autocast("cpu", dtype=dtype):
        out = tiny_model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, return_loss=True)
    assert out.logits_per_image.dtype == torch.float32 and out.loss.dtype == torch.float32
    assert torch.isfinite(out.loss)
    reference = tiny_model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
    torch.testing.assert_close(out.logits_per_image, reference.logits_per_image, atol=0.5, rtol=0.1)


def test_patch_features_make_a_text_to_patch_map(tiny_model, tiny_config):
    pixel_values, input_ids, attention_mask = _inputs(tiny_config)
    with torch.no_grad():
        patches = _patches(tiny_model.get_patch_features(pixel_values))
        text = _pooled(tiny_model.get_text_features(input_ids, attention_mask))
    assert patches.shape == (3, tiny_config.num_patches, tiny_config.projection_dim)
    similarity = torch.einsum(
        "bpd,bd->bp", torch.nn.functional.normalize(patches, dim=-1), torch.nn.functional.normalize(text, dim=-1)
    )
    assert similarity.shape == (3, tiny_config.num_patches) and similarity.abs().max() <= 1 + 1e-5


def test_interpolated_position_embeddings_accept_other_sizes(tiny_model, tiny_config):
    pixel_values = torch.randn(2, 3, tiny_config.image_size * 2, tiny_config.image_size * 2)
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        tiny_model.get_image_features(pixel_values)
    features = _pooled(tiny_model.get_image_features(pixel_values, interpolate_pos_encoding=True))
    assert features.shape == (2, tiny_config.projection_dim)
    same = torch.randn(2, 3, tiny_config.image_size, tiny_config.image_size)
    torch.testing.assert_close(
        _pooled(tiny_model.get_image_features(same)),
        _pooled(tiny_model.get_image_features(same, interpolate_pos_encoding=True)),
    )


@pytest.mark.parametrize("modality_embeddings,head", [(False, "linear"), (True, "mlp")])
def test_switches_for_inferred_parts(tiny_config, modality_embeddings, head):
    config = OneRConfig(**{**tiny_config.to_dict(), "use_modality_embeddings": modality_embeddings, "projection_head": head})
    model = OneRModel(config)
    assert (model.embeddings.modality_embedding is not None) == modality_embeddings
    pixel_values, input_ids, attention_mask = _inputs(config)
    out = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, return_loss=True)
    assert torch.isfinite(out.loss)


# ---------------------------------------------------------------------------- bad input
def test_bad_inputs_get_clear_errors(tiny_model, tiny_config):
    pixel_values, input_ids, attention_mask = _inputs(tiny_config)
    cases = [
        (dict(), ValueError, "pixel_values, input_ids or both"),
        (dict(pixel_values=[[1.0]]), TypeError, "torch.Tensor"),
        (dict(pixel_values=pixel_values[:, :1]), ValueError, "1 channels but the model expects 3"),
        (dict(pixel_values=pixel_values[:0]), ValueError, "empty batch"),
        (dict(pixel_values=pixel_values[0]), ValueError, "batch, channels, height, width"),
        (dict(pixel_values=pixel_values[..., :8, :8]), ValueError, "8x8 but the model expects 16x16"),
        (dict(input_ids=["a red apple"]), TypeError, "input_ids must be a torch.Tensor"),
        (dict(input_ids=input_ids.float()), TypeError, "integer token ids"),
        (dict(input_ids=torch.ones(2, 40, dtype=torch.long)), ValueError, "40 tokens long"),
        (dict(input_ids=input_ids, attention_mask=attention_mask[:, :2]), ValueError, "does not match"),
        (dict(input_ids=input_ids, attention_mask=torch.zeros_like(attention_mask)), ValueError, "no tokens"),
        (dict(input_ids=input_ids, pixel_values=pixel_values[:2], return_loss=True), ValueError, "one text per image"),
        (dict(input_ids=input_ids, return_loss=True), ValueError, "needs both"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            tiny_model(**kwargs)
    with pytest.raises(ValueError, match="one text per image: got 2 images and 3 texts"):
        tiny_model.get_multimodal_features(input_ids, pixel_values[:2], attention_mask)
    with pytest.raises(ValueError, match="joint input"):
        tiny_model.forward_features(pixel_values=pixel_values, cross_modal_attention=True)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(hidden_size=30, num_attention_heads=4), "divisible by num_attention_heads"),
        (dict(image_size=30, patch_size=4), "divisible by patch_size"),
        (dict(projection_head="transformer"), "projection_head must be one of"),
        (dict(num_hidden_layers=0), "positive integer"),
    ],
)
def test_bad_configs_get_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        OneRConfig.from_preset("tiny", **overrides)


def test_presets():
    tiny, small = OneRConfig.from_preset("tiny"), OneRConfig.from_preset("small")
    base = OneRConfig.from_preset("base-patch16-224")
    assert (base.hidden_size, base.num_hidden_layers, base.num_attention_heads) == (768, 12, 12)
    assert (base.image_size, base.patch_size, base.num_patches, base.max_position_embeddings) == (224, 16, 196, 78)
    assert (tiny.hidden_size, tiny.num_hidden_layers, tiny.image_size, tiny.num_patches) == (128, 2, 32, 64)
    assert (small.hidden_size, small.num_hidden_layers, small.image_size) == (256, 4, 64)
    assert {tiny.pooling, small.pooling, base.pooling} == {"mean"}
    assert OneRConfig().pooling == "cls"  # the class default: folders saved before pooling existed load unchanged
    with pytest.raises(ValueError, match="unknown preset"):
        OneRConfig.from_preset("huge")


# --------------------------------------------------------------------------- pooling


@pytest.mark.parametrize("pooling", ["mean", "cls+mean"])
def test_pooling_of_each_input_kind(tiny_config, pooling):
    from modeling_oner import OneRModel

    torch.manual_seed(0)
    tiny_config.pooling = pooling
    model = OneRModel(tiny_config).eval()
    pixels = torch.randn(2, 3, tiny_config.image_size, tiny_config.image_size)
    ids = torch.randint(1000, 2000, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    with torch.no_grad():
        image = model.forward_features(pixel_values=pixels)
        text = model.forward_features(input_ids=ids, attention_mask=mask)
        joint = model.forward_features(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    n_patches = tiny_config.num_patches

    def expected(out, mean):
        return mean if pooling == "mean" else (out.last_hidden_state[:, 0] + mean) / 2

    patch_mean = image.last_hidden_state[:, 1:].mean(1)
    torch.testing.assert_close(image.pooler_output, expected(image, patch_mean))
    word_mean = torch.stack([text.last_hidden_state[0, 1:].mean(0), text.last_hidden_state[1, 1:5].mean(0)])
    torch.testing.assert_close(text.pooler_output, expected(text, word_mean))  # padding excluded
    joint_patches = joint.last_hidden_state[:, 1 : 1 + n_patches].mean(1)
    joint_words = torch.stack([joint.last_hidden_state[0, 1 + n_patches :].mean(0),
                               joint.last_hidden_state[1, 1 + n_patches : 1 + n_patches + 4].mean(0)])
    torch.testing.assert_close(joint.pooler_output, expected(joint, (joint_patches + joint_words) / 2))
    # the global embedding is the patch embeddings' mean (linear head): the map and the score agree
    if pooling == "mean":
        torch.testing.assert_close(_pooled(model.get_image_features(pixel_values=pixels)),
                                   _patches(model.get_patch_features(pixel_values=pixels)).mean(1), atol=1e-5, rtol=1e-5)


def test_mean_pooling_trains_every_patch_token(tiny_config):
    from modeling_oner import OneRModel

    tiny_config.pooling = "mean"
    model = OneRModel(tiny_config)
    pixels = torch.randn(2, 3, tiny_config.image_size, tiny_config.image_size, requires_grad=True)
    _pooled(model.get_image_features(pixel_values=pixels)).sum().backward()
    # every patch of the input receives gradient through its own token, not only through attention to [CLS]
    per_patch = pixels.grad.abs().unfold(2, tiny_config.patch_size, tiny_config.patch_size).unfold(
        3, tiny_config.patch_size, tiny_config.patch_size).sum(dim=(0, 1, 4, 5))
    assert (per_patch > 0).all()


def test_pooling_survives_save_and_load_and_bad_values_are_named(tiny_config, tmp_path):
    from modeling_oner import OneRConfig, OneRModel

    tiny_config.pooling = "cls+mean"
    OneRModel(tiny_config).save_pretrained(tmp_path)
    assert OneRModel.from_pretrained(tmp_path).config.pooling == "cls+mean"
    with pytest.raises(ValueError, match="pooling"):
        OneRConfig.from_preset("tiny", pooling="max")


def test_config_checks_run_wherever_a_model_is_built(tiny_model_dir):
    """from_pretrained's keyword overrides are set after OneRConfig.__init__; the model checks again."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(tiny_model_dir, trust_remote_code=True, hidden_size=100, num_attention_heads=3)
    with pytest.raises(ValueError, match="divisible by num_attention_heads"):
        AutoModel.from_config(config, trust_remote_code=True)
    config = AutoConfig.from_pretrained(tiny_model_dir, trust_remote_code=True, pooling="max")
    with pytest.raises(ValueError, match="pooling must be one of"):
        AutoModel.from_config(config, trust_remote_code=True)
    from modeling_oner import OneRConfig

    with pytest.raises(ValueError, match="num_attention_heads must be a positive integer"):
        OneRConfig.from_preset("tiny", num_attention_heads=0)  # named, not a ZeroDivisionError


# --------------------------------------------------------------------------- get_*_features return types
# CLIPModel's get_image/text_features return a BaseModelOutputWithPooling under transformers 5 (a
# tensor under 4.x); OneR's four methods follow the installed version. The cross-version check
# against a real CLIPModel, loaded as a user loads it, is in tests/test_transformers_4_57.py.


def _feature_calls(model, config):
    """`{method: (call, old tensor value, encoder output)}` for the four methods on one batch; the old
    value is what the method returned before OneR followed transformers 5 (projection of the pool)."""
    pixel_values, input_ids, attention_mask = _inputs(config)
    image = model.forward_features(pixel_values=pixel_values)
    text = model.forward_features(input_ids=input_ids, attention_mask=attention_mask)
    joint = model.forward_features(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
    return {
        "get_image_features": (lambda **kw: model.get_image_features(pixel_values, **kw),
                               model.project(image.pooler_output), image),
        "get_text_features": (lambda **kw: model.get_text_features(input_ids, attention_mask, **kw),
                              model.project(text.pooler_output), text),
        "get_multimodal_features": (lambda **kw: model.get_multimodal_features(input_ids, pixel_values, attention_mask, **kw),
                                    model.project(joint.pooler_output), joint),
        "get_patch_features": (lambda **kw: model.get_patch_features(pixel_values, **kw),
                               model.project(image.last_hidden_state[:, 1:]), image),
    }


@pytest.mark.skipif(not FEATURES_AS_OUTPUT, reason="transformers 4.x: the methods return tensors")
@torch.no_grad()
def test_features_are_output_objects_under_transformers_5(tiny_model, tiny_config):
    for name, (call, old, encoder) in _feature_calls(tiny_model, tiny_config).items():
        out = call()
        assert type(out) is BaseModelOutputWithPooling, name
        if name == "get_patch_features":
            # last_hidden_state: the projected patches (what the method returned before);
            # pooler_output: the image embedding of the same pass.
            assert out.last_hidden_state.shape == (3, tiny_config.num_patches, tiny_config.projection_dim)
            torch.testing.assert_close(out.last_hidden_state, old)
            torch.testing.assert_close(out.pooler_output, tiny_model.get_image_features(_inputs(tiny_config)[0]).pooler_output)
        else:
            assert out.pooler_output.shape == (3, tiny_config.projection_dim), name
            torch.testing.assert_close(out.pooler_output, old, msg=name)
            torch.testing.assert_close(out.last_hidden_state, encoder.last_hidden_state, msg=name)
        assert out.hidden_states is None and out.attentions is None, name


@pytest.mark.skipif(not FEATURES_AS_OUTPUT, reason="transformers 4.x: the methods return tensors")
@torch.no_grad()
def test_features_take_clip_options_under_transformers_5(tiny_model, tiny_config):
    tiny_model.set_attn_implementation("eager")  # sdpa returns no attention weights
    layers = tiny_config.num_hidden_layers
    for name, (call, old, _) in _feature_calls(tiny_model, tiny_config).items():
        out = call(output_hidden_states=True, output_attentions=True)
        assert len(out.hidden_states) == layers + 1 and len(out.attentions) == layers, name
        as_tuple = call(return_dict=False)  # CLIP's @can_return_tuple: the non-None fields in order
        assert isinstance(as_tuple, tuple) and len(as_tuple) == 2, name
        torch.testing.assert_close(as_tuple[0 if name == "get_patch_features" else 1], old, msg=name)
    tiny_model.config.return_dict = False
    assert isinstance(tiny_model.get_image_features(_inputs(tiny_config)[0]), tuple)


@torch.no_grad()
def test_features_are_the_old_tensors_under_transformers_4(tiny_model, tiny_config, monkeypatch):
    """The 4.x branch, exercised here by flipping the switch (a real 4.57 run is in test_transformers_4_57.py)."""
    import modeling_oner.modeling_oner as module

    monkeypatch.setattr(module, "FEATURES_AS_OUTPUT", False)
    for name, (call, old, _) in _feature_calls(tiny_model, tiny_config).items():
        out = call(output_hidden_states=True, return_dict=True)  # CLIP 4.x options are accepted and ignored
        assert type(out) is torch.Tensor, name
        torch.testing.assert_close(out, old, msg=name)


@torch.no_grad()
def test_features_are_not_normalised_and_forward_normalises_them(tiny_model, tiny_config):
    pixel_values, input_ids, attention_mask = _inputs(tiny_config)
    image = _pooled(tiny_model.get_image_features(pixel_values))
    text = _pooled(tiny_model.get_text_features(input_ids, attention_mask))
    patches = _patches(tiny_model.get_patch_features(pixel_values))
    for raw in (image, text, patches):
        assert not torch.allclose(raw.norm(dim=-1), torch.ones(raw.shape[:-1]), atol=1e-3)
    out = tiny_model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
    torch.testing.assert_close(out.image_embeds, torch.nn.functional.normalize(image, dim=-1))
    torch.testing.assert_close(out.text_embeds, torch.nn.functional.normalize(text, dim=-1))


@torch.no_grad()
def test_embed_is_the_tensor_behind_get_features(tiny_model, tiny_config):
    """`embed` (the training code's entry) returns tensors under every version, equal to the public methods'."""
    pixel_values, input_ids, attention_mask = _inputs(tiny_config)
    pairs = [
        (tiny_model.embed(pixel_values=pixel_values), tiny_model.get_image_features(pixel_values)),
        (tiny_model.embed(input_ids=input_ids, attention_mask=attention_mask),
         tiny_model.get_text_features(input_ids, attention_mask)),
        (tiny_model.embed(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                          cross_modal_attention=True),
         tiny_model.get_multimodal_features(input_ids, pixel_values, attention_mask, cross_modal_attention=True)),
    ]
    for tensor, features in pairs:
        assert type(tensor) is torch.Tensor
        torch.testing.assert_close(tensor, _pooled(features))


def test_features_follow_the_installed_clip():
    """FEATURES_AS_OUTPUT agrees with what the installed transformers' CLIPModel returns."""
    from transformers import CLIPConfig, CLIPModel

    clip = CLIPModel(CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=100, max_position_embeddings=8),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=8, patch_size=4),
        projection_dim=8,
    )).eval()
    with torch.no_grad():
        out = clip.get_image_features(pixel_values=torch.randn(1, 3, 8, 8))
    assert isinstance(out, BaseModelOutputWithPooling) == FEATURES_AS_OUTPUT


def test_bf16_eager_attention_matches_an_fp32_softmax_in_value_and_gradient():
    """The eager kernel's softmax runs in bf16 under bf16 autocast (no fp32 copy of the scores): its
    output and gradients stay within bf16 rounding of the fp32-softmax attention it replaced."""
    import torch.nn.functional as F

    from modeling_oner.modeling_oner import eager_attention_forward

    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 9, 8) for _ in range(3))
    mask = torch.ones(3, 1, 1, 9, dtype=torch.bool)
    mask[1, ..., 6:] = False  # a padded sequence
    module = torch.nn.Module().eval()

    def fp32_softmax_reference(q, k, v):
        scores = torch.matmul(q, k.transpose(-1, -2)) * 8**-0.5
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(weights, v).transpose(1, 2)

    outputs, grads = [], []
    for attention in (lambda q, k, v: eager_attention_forward(module, q, k, v, mask, 8**-0.5)[0],
                      fp32_softmax_reference):
        leaves = [t.clone().to(torch.bfloat16).requires_grad_(True) for t in (q, k, v)]
        out = attention(*leaves)
        out.float().pow(2).sum().backward()
        outputs.append(out.float())
        grads.append([t.grad.float() for t in leaves])
    torch.testing.assert_close(outputs[0], outputs[1], atol=2e-2, rtol=2e-2)
    for new, old in zip(*grads):
        torch.testing.assert_close(new, old, atol=5e-2, rtol=5e-2)
    assert outputs[0][1, 6:].abs().sum() > 0 and torch.isfinite(outputs[0]).all()


# ---------------------------------------------------------------------------- the model's named pieces
# Small examples worked out by hand for the module functions OneRModel is built from.


def _sequence_of_cls_two_patches_three_words():
    """`(2, 6, 2)` states `[CLS] + 2 patches + 3 words` and their key mask; the second text's last word is padding."""
    one_example = [[10.0, 10.0], [1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 4.0], [0.0, 6.0]]
    padded_example = [[10.0, 10.0], [1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 4.0], [100.0, 100.0]]
    key_mask = torch.tensor([[True] * 6, [True] * 5 + [False]])
    return torch.tensor([one_example, padded_example]), key_mask


def test_pool_sequence_by_hand():
    from modeling_oner.modeling_oner import pool_sequence

    states, key_mask = _sequence_of_cls_two_patches_three_words()
    # Joint: patch mean (2, 0) and word mean (0, 4) -> (1, 2); the padded row's words (0, 2), (0, 4) -> (0, 3).
    mean = torch.tensor([[1.0, 2.0], [1.0, 1.5]])
    torch.testing.assert_close(pool_sequence(states, key_mask, "mean", num_image_tokens=2), mean)
    torch.testing.assert_close(pool_sequence(states, key_mask, "cls+mean", num_image_tokens=2), (10.0 + mean) / 2)
    torch.testing.assert_close(pool_sequence(states, key_mask, "cls", num_image_tokens=2), states[:, 0])
    # Read as text only, the same five tokens are one modality weighted by count: (4, 12) / 5 and (4, 6) / 4.
    torch.testing.assert_close(pool_sequence(states, key_mask, "mean"), torch.tensor([[0.8, 2.4], [1.0, 1.5]]))


def test_masked_mean_skips_padding_and_gives_zeros_for_an_empty_row():
    from modeling_oner.modeling_oner import masked_mean

    tokens = torch.tensor([[[2.0], [4.0], [9.0]], [[5.0], [7.0], [9.0]]])
    weights = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(masked_mean(tokens, weights), torch.tensor([[3.0], [0.0]]))


def test_sequence_modalities_and_the_cross_modal_mask_by_hand():
    from modeling_oner.modeling_oner import cross_modal_attention_mask, sequence_modalities

    assert sequence_modalities(5, 2, torch.device("cpu")).tolist() == [0, 1, 1, 2, 2]
    key_mask = torch.tensor([[True] * 5, [True] * 4 + [False]])  # [CLS] + 2 patches + 2 words
    allowed = [
        [1, 1, 1, 1, 1],  # [CLS] reads everything
        [0, 0, 0, 1, 1],  # patches read only words
        [0, 0, 0, 1, 1],
        [0, 1, 1, 0, 0],  # words read only patches
        [0, 1, 1, 0, 0],
    ]
    expected = torch.tensor([allowed, [row[:4] + [0] for row in allowed]], dtype=torch.bool)[:, None]
    mask = cross_modal_attention_mask(key_mask, num_image_tokens=2)
    assert mask.shape == (2, 1, 5, 5) and mask.dtype == torch.bool
    assert torch.equal(mask, expected)


def test_encoder_attention_mask_hides_padding_or_is_none():
    from modeling_oner.modeling_oner import cross_modal_attention_mask, encoder_attention_mask

    no_padding = torch.ones(2, 4, dtype=torch.bool)
    assert encoder_attention_mask(no_padding, num_image_tokens=0, cross_modal_attention=False) is None
    padded = torch.tensor([[True, True, True, True], [True, True, False, False]])
    mask = encoder_attention_mask(padded, num_image_tokens=0, cross_modal_attention=False)
    assert mask.shape == (2, 1, 1, 4) and mask[:, 0, 0].tolist() == padded.tolist()
    # The CIC pass always gets its mask, with or without padding.
    cross = encoder_attention_mask(no_padding, num_image_tokens=1, cross_modal_attention=True)
    assert torch.equal(cross, cross_modal_attention_mask(no_padding, num_image_tokens=1))


def test_symmetric_contrastive_loss_by_hand():
    import math

    from modeling_oner.modeling_oner import symmetric_contrastive_loss

    logits_per_text = torch.tensor([[math.log(3), 0.0], [math.log(3), 0.0]])
    # Texts: -log(3/4) and -log(1/4); images (the transpose): -log(1/2) twice.
    expected = ((math.log(4 / 3) + math.log(4)) / 2 + math.log(2)) / 2
    loss = symmetric_contrastive_loss(logits_per_text, logits_per_text.t())
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_input_checks_name_what_is_wrong():
    from modeling_oner.modeling_oner import check_loss_pairs, check_one_text_per_image, check_text_inputs

    ids = torch.ones(3, 4, dtype=torch.long)
    mask = torch.ones(3, 4, dtype=torch.long)
    mask[1] = 0
    with pytest.raises(ValueError, match=r"batch positions \[1\] have no tokens"):
        check_text_inputs(ids, mask, max_positions=4)
    check_text_inputs(ids, None, max_positions=4)  # exactly max_positions long is fine
    with pytest.raises(ValueError, match="got 2 images and 3 texts"):
        check_one_text_per_image(num_images=2, num_texts=3)
    with pytest.raises(ValueError, match="needs both"):
        check_loss_pairs(None, torch.zeros(3, 8))
    with pytest.raises(ValueError, match="got 2 images and 3 texts"):
        check_loss_pairs(torch.zeros(2, 8), torch.zeros(3, 8))
    check_loss_pairs(torch.zeros(3, 8), torch.zeros(3, 8))


@pytest.mark.parametrize("as_output", [True, False])
def test_clip_style_features_follow_the_switch(monkeypatch, as_output):
    import modeling_oner.modeling_oner as module

    monkeypatch.setattr(module, "FEATURES_AS_OUTPUT", as_output)
    assert module.clip_style_feature_options({"output_attentions": 1}) == (
        {"output_attentions": True, "output_hidden_states": False} if as_output else {}
    )
    pooled, patches = torch.zeros(2, 8), torch.ones(2, 4, 8)

    def encoded():
        return BaseModelOutputWithPooling(last_hidden_state=torch.full((2, 5, 16), 3.0), pooler_output=torch.ones(2, 16))

    image = module.clip_style_features(encoded(), pooled, None, return_dict=True)
    patch_map = module.clip_style_features(encoded(), pooled, patches, return_dict=True)
    if not as_output:
        assert image is pooled and patch_map is patches
        return
    assert image.pooler_output is pooled and image.last_hidden_state.shape == (2, 5, 16)
    assert patch_map.pooler_output is pooled and patch_map.last_hidden_state is patches
    as_tuple = module.clip_style_features(encoded(), pooled, patches, return_dict=False)
    assert isinstance(as_tuple, tuple) and as_tuple[0] is patches and as_tuple[1] is pooled
