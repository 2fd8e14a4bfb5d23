"""Each objective term: finite loss, gradients to the shared weights, the intended encoder passes."""

import pytest
import torch

from oner.objectives import TERMS, Objective, ObjectiveConfig, mixup, parse_objective
from oner.training.mlm import subword_table, whole_word_mask
from oner.training.pretrainer import EMATarget, OneRPretrainer


@pytest.fixture
def batch(tiny_processor):
    from PIL import Image

    images = [Image.new("RGB", (20, 20), c) for c in ("red", "green", "blue", "white")]
    texts = ["a red apple", "green frog face", "blue whale spouting water", "snowman"]
    return dict(tiny_processor(text=texts, images=images, return_tensors="pt"))


def _run(model, batch, objective, tokenizer=None, **config):
    config = ObjectiveConfig(weights=parse_objective(objective), **config)
    pretrainer = OneRPretrainer(model.train(), config)
    batch = dict(batch)
    if "mlm" in config.weights:
        batch["mlm_input_ids"], batch["mlm_labels"] = whole_word_mask(
            batch["input_ids"], batch["attention_mask"], subword_table(tokenizer), model.config.mask_token_id
        )
    loss, parts = Objective(config)(pretrainer(**batch))
    return loss, parts, pretrainer


SHARED = ("encoder.layers.0.self_attn.qkv.weight", "head.proj.weight", "post_layernorm.weight")


@pytest.mark.parametrize("term", TERMS)
def test_each_term_is_finite_and_reaches_the_shared_weights(tiny_model, tiny_processor, batch, term):
    objective = term if term != "mlm" else "itc:0+mlm"  # mlm needs a contrastive partner (weight 0 is fine)
    loss, parts, _ = _run(tiny_model, batch, objective, tiny_processor.tokenizer)
    assert torch.isfinite(loss) and loss.item() > 0
    assert term in parts and torch.isfinite(parts[term])
    loss.backward()
    params = dict(tiny_model.named_parameters())
    # MLM predicts tokens from the tower's hidden states: it trains the tower, not the projection head
    shared = SHARED if term != "mlm" else ("encoder.layers.0.self_attn.qkv.weight", "embeddings.token_embedding.weight")
    for name in shared:
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, (term, name)
    if term != "mlm":  # the logit scale enters every pairwise term
        assert tiny_model.logit_scale.grad is not None


def test_sigmoid_form_and_its_bias(tiny_model, batch):
    loss, parts, pretrainer = _run(tiny_model, batch, "xmc+cmc", pairwise="sigmoid")
    loss.backward()
    assert torch.isfinite(loss) and pretrainer.logit_bias.grad is not None


def test_weights_scale_the_terms(tiny_model, batch):
    loss, parts, _ = _run(tiny_model, batch, "xmc:2+cmc:0.5")
    assert torch.allclose(loss, 2 * parts["xmc"] + 0.5 * parts["cmc"])


def _spy_encoder(model):
    """Records (sequence length, attention mask) of every pass through the shared encoder."""
    calls = []
    original = model.encoder.forward

    def spy(hidden_states, attention_mask=None, **kw):
        calls.append((hidden_states.shape[1], attention_mask))
        return original(hidden_states, attention_mask=attention_mask, **kw)

    model.encoder.forward = spy
    return calls


@pytest.mark.parametrize("term,cross", [("cmc", False), ("cic", True)])
def test_cmc_and_cic_run_the_joint_sequence(tiny_model, batch, term, cross):
    calls = _spy_encoder(tiny_model)
    _run(tiny_model, batch, term)
    n_patches, n_words = tiny_model.config.num_patches, batch["input_ids"].shape[1]
    lengths = [length for length, _ in calls]
    # image alone, text alone, then the ONE joint [CLS] + patches + words sequence
    assert lengths == [1 + n_patches, 1 + n_words, 1 + n_patches + n_words]
    mask = calls[-1][1]
    if not cross:  # CMC: full attention (only padding masked)
        assert mask is None or mask.shape[-2] == 1
        return
    # CIC: each modality attends only to the other; [CLS] to all
    mask = mask[0, 0]
    img = slice(1, 1 + n_patches)
    txt = slice(1 + n_patches, None)
    assert mask[0].sum() == 1 + n_patches + int(batch["attention_mask"][0].sum())
    assert not mask[img, img].any() and mask[img, txt][:, : int(batch["attention_mask"][0].sum())].all()
    assert not mask[txt, txt].any() and mask[txt, img].all()


def test_mixup_is_normalised_average():
    a = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    m = mixup(a, b)
    assert torch.allclose(m.norm(dim=-1), torch.ones(5))
    assert torch.allclose(m, torch.nn.functional.normalize(a + b, dim=-1), atol=1e-6)


def test_parse_objective():
    assert parse_objective("xmc+cmc") == {"xmc": 1.0, "cmc": 1.0}
    assert parse_objective("ITC:0.5 + mlm:0.1") == {"itc": 0.5, "mlm": 0.1}
    for bad, message in [("xmc+foo", "unknown objective term 'foo'"), ("", "empty"), ("xmc+xmc", "twice"),
                         ("xmc:abc", "bad weight"), ("xmc:-1", ">= 0"), ("mlm", "mlm alone")]:
        with pytest.raises(ValueError, match=message):
            parse_objective(bad)


def test_whole_word_mask_masks_whole_words(tiny_processor):
    tokenizer = tiny_processor.tokenizer
    enc = tokenizer(["snowboarder unbelievably fast", "cat"], add_special_tokens=False, padding=True,
                    return_tensors="pt")
    table = subword_table(tokenizer)
    torch.manual_seed(0)
    for _ in range(20):
        ids, labels = whole_word_mask(enc["input_ids"], enc["attention_mask"], table, 103, probability=0.5)
        for row in range(2):
            masked = labels[row] != -100
            assert masked.any()  # at least one word per caption
            assert (ids[row][masked] == 103).all() and (labels[row][masked] == enc["input_ids"][row][masked]).all()
            assert not masked[enc["attention_mask"][row] == 0].any()  # never padding
            # a continuation piece is masked exactly when the piece before it is
            for i in range(1, enc["input_ids"].shape[1]):
                if enc["attention_mask"][row, i] and table[enc["input_ids"][row, i]]:
                    assert masked[i] == masked[i - 1]


def test_ema_target_moves_towards_the_online_model(tiny_model, batch):
    ema = EMATarget(tiny_model, momentum=0.9, total_steps=10)
    assert ema.momentum_at(0) == pytest.approx(0.9) and ema.momentum_at(10) == pytest.approx(1.0)
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.add_(1.0)
    before = ema.target.head.proj.weight.clone()
    ema.update(tiny_model, step=0)
    assert torch.allclose(ema.target.head.proj.weight, before + 0.1, atol=1e-6)
    targets = ema.encode(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    assert not targets["image"].requires_grad
    # with targets, the mixup comes from the target encoder: gradient only through the online side
    loss, _, _ = _run(tiny_model, batch, "xmc")
    config = ObjectiveConfig(weights={"xmc": 1.0}, momentum=0.9)
    pretrainer = OneRPretrainer(tiny_model, config)
    loss, parts = Objective(config)(pretrainer(**batch), targets)
    assert torch.isfinite(loss)


# --------------------------------------------------------------------------- XMC forms, CMC fraction, temperature


def _orthogonal_modalities(n=8, d=32, seed=0):
    """Images in the first half of the coordinates, texts in the second: separable, nothing aligned."""
    g = torch.Generator().manual_seed(seed)
    z_i = torch.nn.functional.normalize(torch.cat([torch.randn(n, d // 2, generator=g), torch.zeros(n, d // 2)], 1), dim=-1)
    z_t = torch.nn.functional.normalize(torch.cat([torch.zeros(n, d // 2), torch.randn(n, d // 2, generator=g)], 1), dim=-1)
    return z_i, z_t


def _xmc(form, z_i, z_t, logit_scale):
    config = ObjectiveConfig(weights={"xmc": 1.0}, xmc_form=form)
    loss, _ = Objective(config).contrastive_loss({"image": z_i, "text": z_t, "logit_scale": torch.tensor(logit_scale)})
    return loss.item()


def test_same_pair_xmc_is_solved_by_orthogonal_modalities_but_cross_pair_is_not():
    """The shortcut, constructed: each modality in its own subspace (nothing aligned). At the hottest
    learned temperature (logit scale ln 100) same-pair XMC reaches 0 without any alignment; the
    cross-pair form stays far above what alignment reaches (its floor is the targets' entropy, ln 2)."""
    z_i, z_t = _orthogonal_modalities()
    hot = 4.6  # ln 100, the clamp on the learned logit scale
    assert _xmc("same-pair", z_i, z_t, hot) < 1e-3
    assert _xmc("cross-pair", z_i, z_t, hot) > 10 * _xmc("cross-pair", z_i, z_i, hot)
    # a fixed temperature (0.2, MoCo v3) leaves same-pair XMC some pull towards alignment, cross-pair far more
    fixed = 1.6094  # ln(1 / 0.2)
    same_gain = _xmc("same-pair", z_i, z_t, fixed) - _xmc("same-pair", z_i, z_i, fixed)
    cross_gain = _xmc("cross-pair", z_i, z_t, fixed) - _xmc("cross-pair", z_i, z_i, fixed)
    assert 0 < same_gain < cross_gain


def test_cross_pair_xmc_targets_and_gradients(tiny_model, batch):
    loss, parts, _ = _run(tiny_model, batch, "xmc", xmc_form="cross-pair")
    assert torch.isfinite(loss)
    loss.backward()
    assert tiny_model.head.proj.weight.grad.abs().sum() > 0 and tiny_model.logit_scale.grad is not None


def test_cmc_fraction_runs_the_joint_pass_on_part_of_the_batch(tiny_model, batch):
    seen = []
    hook = tiny_model.encoder.register_forward_hook(lambda m, inp, out: seen.append(tuple(inp[0].shape)))
    loss, parts, _ = _run(tiny_model, batch, "xmc+cmc", cmc_fraction=0.5)
    hook.remove()
    joint_len = 1 + tiny_model.config.num_patches + batch["input_ids"].shape[1]
    assert [s[0] for s in seen if s[1] == joint_len] == [2]  # 2 of the 4 pairs got the joint pass
    loss.backward()
    assert torch.isfinite(parts["cmc"]) and tiny_model.encoder.layers[0].self_attn.qkv.weight.grad is not None


def test_fixed_temperature_freezes_the_logit_scale(tiny_model, batch):
    import math

    loss, _, pretrainer = _run(tiny_model, batch, "itc", temperature=0.2)
    assert not tiny_model.logit_scale.requires_grad
    assert math.isclose(tiny_model.logit_scale.exp().item(), 5.0, rel_tol=1e-6)
    loss.backward()
    assert tiny_model.logit_scale.grad is None


@pytest.mark.parametrize("setting,message", [
    (dict(xmc_form="mixed"), "xmc_form"),
    (dict(xmc_form="cross-pair", pairwise="sigmoid"), "softmax"),
    (dict(cmc_fraction=0.0), "cmc_fraction"),
    (dict(cmc_fraction=1.5), "cmc_fraction"),
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=2.0), "temperature"),
])
def test_bad_objective_settings_name_the_option(setting, message):
    with pytest.raises(ValueError, match=message):
        ObjectiveConfig(weights={"xmc": 1.0}, **setting)


def test_modality_gap_statistics():
    from oner.objectives import modality_gap

    z_i, z_t = _orthogonal_modalities(n=16)
    separated = modality_gap(z_i, z_t)
    assert separated["gap/modality_probe_acc"] == 1.0 and separated["gap/centroid_distance"] > 0.1
    mixed = modality_gap(z_i, z_i)  # the same vectors: nothing tells the modalities apart
    assert mixed["gap/centroid_distance"] < 1e-6 and mixed["gap/modality_probe_acc"] <= 0.5
    assert abs(mixed["gap/pair_cosine"] - 1.0) < 1e-5


def test_mosaic_puts_each_image_in_one_quadrant_among_three_others():
    from oner.objectives import mosaic

    torch.manual_seed(0)
    n, size = 5, 8
    images = torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 3, size, size).contiguous()
    out = mosaic(images)
    assert out.shape == images.shape
    for i in range(n):
        quadrants = [out[i, 0, r : r + 4, c : c + 4] for r in (0, 4) for c in (0, 4)]
        values = sorted(float(q.mean()) for q in quadrants)
        assert values == sorted(float((i + k) % n) for k in range(4))  # itself and the next three
        assert all(q.std() == 0 for q in quadrants)  # whole tiles, not blends
    with pytest.raises(ValueError, match="even"):
        mosaic(torch.zeros(2, 3, 5, 5))


def test_cmc_mosaic_feeds_the_joint_pass_and_keeps_the_pair_target(tiny_model, batch):
    seen = []
    original = tiny_model.embed

    def spy(**kwargs):
        if "input_ids" in kwargs and "pixel_values" in kwargs:  # the joint pass
            seen.append(kwargs["pixel_values"])
        return original(**kwargs)

    tiny_model.embed = spy
    loss, parts, _ = _run(tiny_model, batch, "xmc+cmc", xmc_form="cross-pair", cmc_context="mosaic")
    assert len(seen) == 1 and seen[0].shape == batch["pixel_values"].shape
    assert not torch.equal(seen[0], batch["pixel_values"])  # the joint pass saw mosaics, not the pair's image
    loss.backward()
    assert torch.isfinite(parts["cmc"]) and tiny_model.head.proj.weight.grad is not None
    with pytest.raises(ValueError, match="cmc_context"):
        ObjectiveConfig(weights={"cmc": 1.0}, cmc_context="grid")


def test_the_sigmoid_bias_is_saved_with_the_model_and_used_by_its_scores(tiny_config, tmp_path, batch):
    from modeling_oner import OneRModel

    torch.manual_seed(0)
    model = OneRModel(tiny_config)
    assert model.logit_bias is None  # a softmax-trained (or older) model has no bias
    pretrainer = OneRPretrainer(model, ObjectiveConfig(weights={"itc": 1.0}, pairwise="sigmoid"))
    assert pretrainer.logit_bias is model.logit_bias and model.logit_bias.item() == -10.0
    with torch.no_grad():
        model.logit_bias.fill_(-3.0)  # as if trained
    model.save_pretrained(tmp_path)
    loaded = OneRModel.from_pretrained(tmp_path).eval()
    assert loaded.logit_bias.item() == -3.0
    with torch.no_grad():
        out = loaded(**batch)
        unbiased = loaded.logit_scale.exp() * out.image_embeds @ out.text_embeds.t()
    torch.testing.assert_close(out.logits_per_image, unbiased - 3.0)
