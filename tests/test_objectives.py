"""Each objective term: its value on hand-made features, gradients to the shared weights, the encoder passes."""

import math

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
    # every row gets the joint pass unless a test says otherwise (train.py's default is half of them)
    config = ObjectiveConfig(weights=parse_objective(objective), **{"cmc_fraction": 1.0, **config})
    pretrainer = OneRPretrainer(model.train(), config)
    batch = dict(batch)
    if "mlm" in config.weights:
        batch["mlm_input_ids"], batch["mlm_labels"] = whole_word_mask(
            batch["input_ids"], batch["attention_mask"], subword_table(tokenizer), model.config.mask_token_id
        )
    loss, parts = Objective(config)(pretrainer(**batch))
    return loss, parts, pretrainer


SHARED = ("encoder.layers.0.self_attn.qkv.weight", "head.proj.weight", "post_layernorm.weight")

# --------------------------------------------------------------------------- hand-made features
# Three pairs of unit 2-d embeddings at a logit scale of 3, the mixup at lam = 3/4 (not 1/2, so a
# swap of the image and text halves shows). The expected values below are written with plain torch,
# independently of oner.losses: cross-entropy, the mixup and the sigmoid loss spelled out.

SCALE, LAM = 3.0, 0.75


def _unit(*angles):
    """Rows (cos a, sin a)."""
    a = torch.tensor(angles)
    return torch.stack([a.cos(), a.sin()], dim=1)


def _hand_features(**extra):
    features = {"image": _unit(0.0, 1.5, 3.0), "text": _unit(0.4, 1.9, 2.5),
                "logit_scale": torch.tensor(math.log(SCALE))}
    features.update(extra)
    return features


def _ce(logits, targets):
    """The mean over rows of -sum_j targets_ij * log(softmax(logits_i)_j)."""
    e = logits.exp()
    return -(targets * (e / e.sum(dim=1, keepdim=True)).log()).sum(dim=1).mean()


def _info_nce(a, b, scale=SCALE):
    """Symmetric InfoNCE of paired rows."""
    eye = torch.eye(len(a))
    return (_ce(scale * a @ b.t(), eye) + _ce(scale * b @ a.t(), eye)) / 2


def _siglip(a, b, bias):
    """-sum_ij log sigmoid(y_ij * (SCALE * a_i . b_j + bias)) / n, y = +1 on the diagonal, -1 elsewhere."""
    y = 2 * torch.eye(len(a)) - 1
    return (1 + (-y * (SCALE * a @ b.t() + bias)).exp()).log().sum() / len(a)


def _mix(image, text, lam=LAM):
    v = lam * image + (1 - lam) * text
    return v / v.norm(dim=1, keepdim=True)


def _term_case(term):
    """(weights, features, expected unweighted value) of one term on hand-made features."""
    f = _hand_features()
    image, text = f["image"], f["text"]
    m = _mix(image, text)
    if term == "itc":
        return {"itc": 0.5}, f, _info_nce(image, text)
    if term == "xmc":  # same-pair
        return {"xmc": 0.5}, f, (_info_nce(image, m) + _info_nce(text, m)) / 2
    if term == "cic":
        f["cross"] = _unit(0.2, 1.0, 2.0)
        return {"cic": 0.5}, f, _info_nce(f["cross"], m)
    if term == "cmc":  # against the pair's mixup
        f["joint"] = _unit(0.2, 1.0, 2.0)
        return {"cmc": 0.5}, f, _info_nce(f["joint"], m)
    if term == "quad":
        # 4 regions of 2 patches each; texts 0 and 2 own two regions each, text 1 none
        f["quad"] = torch.tensor([[[1.0, 0.0], [1.0, 2.0]], [[0.0, 1.0], [-3.0, 1.0]],
                                  [[2.0, 1.0], [0.0, 1.0]], [[-1.0, 0.5], [-1.0, -0.5]]])
        f["quad_sources"] = torch.tensor([0, 2, 0, 2])
        pooled = f["quad"].mean(dim=1)
        logits = SCALE * (pooled / pooled.norm(dim=1, keepdim=True)) @ text.t()
        region_side = _ce(logits, torch.tensor([[1.0, 0, 0], [0, 0, 1], [1, 0, 0], [0, 0, 1]]))
        text_side = _ce(logits.t()[[0, 2]], torch.tensor([[0.5, 0, 0.5, 0], [0, 0.5, 0, 0.5]]))
        return {"quad": 0.5}, f, (region_side + text_side) / 2
    assert term == "mlm"  # the mean token cross-entropy of the masked tokens; itc at weight 0 is not computed
    logits, labels = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 1.0, 1.0]]), torch.tensor([0, 1, 2, 0])
    f.update(mlm_logits=logits, mlm_labels=labels)
    log_softmax = logits - logits.exp().sum(dim=1, keepdim=True).log()
    return {"itc": 0.0, "mlm": 0.5}, f, -log_softmax[torch.arange(4), labels].mean()


@pytest.mark.parametrize("term", TERMS)
def test_each_term_against_its_formula_on_hand_made_features(term):
    weights, features, expected = _term_case(term)
    total, parts = Objective(ObjectiveConfig(weights=weights, mix_weight=LAM, xmc_form="same-pair"))(features)
    assert parts[term].item() == pytest.approx(expected.item(), rel=1e-5)
    assert total.item() == pytest.approx(0.5 * expected.item(), rel=1e-5)
    assert "itc" not in parts or term == "itc"


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


def test_sigmoid_form_against_its_formula_and_its_bias_gradient():
    bias = torch.tensor(-1.0, requires_grad=True)
    features = _hand_features(joint=_unit(0.2, 1.0, 2.0), logit_bias=bias)
    config = ObjectiveConfig(weights=parse_objective("xmc+cmc"), pairwise="sigmoid", mix_weight=LAM, xmc_form="same-pair")
    total, parts = Objective(config)(features)
    hand_bias = torch.tensor(-1.0, requires_grad=True)
    m = _mix(features["image"], features["text"])
    xmc = (_siglip(features["image"], m, hand_bias) + _siglip(features["text"], m, hand_bias)) / 2
    cmc = _siglip(features["joint"], m, hand_bias)
    assert parts["xmc"].item() == pytest.approx(xmc.item(), rel=1e-5)
    assert parts["cmc"].item() == pytest.approx(cmc.item(), rel=1e-5)
    total.backward()
    (xmc + cmc).backward()
    assert bias.grad.item() == pytest.approx(hand_bias.grad.item(), rel=1e-5) and hand_bias.grad.abs() > 0.1


def test_the_pretrainer_passes_the_models_sigmoid_bias(tiny_config, batch):
    from modeling_oner import OneRModel

    config = ObjectiveConfig(weights=parse_objective("xmc+cmc"), pairwise="sigmoid", xmc_form="same-pair",
                             cmc_context="pair", cmc_fraction=1.0)
    for name, value in config.model_settings.items():  # the bias is the model's, built with it
        setattr(tiny_config, name, value)
    tiny_model = OneRModel(tiny_config)
    pretrainer = OneRPretrainer(tiny_model.train(), config)
    features = pretrainer(**batch)
    assert features["logit_bias"] is tiny_model.logit_bias and tiny_model.logit_bias.item() == -10.0
    loss, parts = Objective(config)(features)
    m = mixup(features["image"], features["text"])
    scale, bias = features["logit_scale"].exp(), features["logit_bias"]
    y = 2 * torch.eye(len(m)) - 1
    expected = (1 + (-y * (scale * features["joint"] @ m.t() + bias)).exp()).log().sum() / len(m)
    assert parts["cmc"].item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert tiny_model.logit_bias.grad is not None and tiny_model.logit_bias.grad.abs() > 0


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


def test_mixup_against_hand_computed_values():
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    text = torch.tensor([[0.0, 1.0], [0.6, 0.8]])
    # (1/2, 1/2) / (1/sqrt 2); (0.8, 0.4) / (0.4 sqrt 5)
    torch.testing.assert_close(mixup(image, text), torch.tensor([[0.5**0.5, 0.5**0.5], [2 / 5**0.5, 1 / 5**0.5]]))
    # lam weighs the IMAGE: (3/4, 1/4) / (sqrt 10 / 4)
    torch.testing.assert_close(mixup(image[:1], text[:1], 0.75), torch.tensor([[3 / 10**0.5, 1 / 10**0.5]]))


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
    assert not targets["image"].requires_grad and not targets["text"].requires_grad


def test_with_targets_the_mixup_and_the_image_target_come_from_them():
    """The EMA target encoder's embeddings build the mixup (and CMC's image target); the online
    embeddings are scored against them, with gradient only on the online side."""
    targets = {"image": _unit(0.3, 1.1, 2.2), "text": _unit(0.8, 1.4, 2.8)}
    m = _mix(targets["image"], targets["text"])
    features = _hand_features(joint=_unit(0.2, 1.0, 2.0))
    features["image"].requires_grad_(True)
    config = ObjectiveConfig(weights={"xmc": 1.0, "cmc": 1.0}, momentum=0.9, mix_weight=LAM, xmc_form="same-pair")
    total, parts = Objective(config)(features, targets)
    expected = (_info_nce(features["image"], m) + _info_nce(features["text"], m)) / 2
    assert parts["xmc"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert parts["cmc"].item() == pytest.approx(_info_nce(features["joint"], m).item(), rel=1e-5)
    total.backward()
    assert features["image"].grad.abs().sum() > 0
    config = ObjectiveConfig(weights={"cmc": 1.0}, cmc_target="image", momentum=0.9)
    _, parts = Objective(config)(features, targets)
    assert parts["cmc"].item() == pytest.approx(_info_nce(features["joint"], targets["image"]).item(), rel=1e-5)


# --------------------------------------------------------------------------- XMC forms, CMC fraction, temperature


def _orthogonal_modalities(n=8, d=32, seed=0):
    """Images in the first half of the coordinates, texts in the second: separable, nothing aligned."""
    g = torch.Generator().manual_seed(seed)
    z_i = torch.nn.functional.normalize(torch.cat([torch.randn(n, d // 2, generator=g), torch.zeros(n, d // 2)], 1), dim=-1)
    z_t = torch.nn.functional.normalize(torch.cat([torch.zeros(n, d // 2), torch.randn(n, d // 2, generator=g)], 1), dim=-1)
    return z_i, z_t


def _xmc(form, z_i, z_t, logit_scale):
    config = ObjectiveConfig(weights={"xmc": 1.0}, xmc_form=form)
    _, parts = Objective(config)({"image": z_i, "text": z_t, "logit_scale": torch.tensor(logit_scale)})
    return parts["xmc"].item()


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


def test_cross_pair_xmc_targets_are_lam_on_column_i_and_the_rest_on_column_i_plus_1():
    """m_i mixes image i and text i+1 (cyclically); it is scored against the images and against the
    texts with soft targets lam on column i and 1 - lam on column i + 1, in both directions."""
    features = _hand_features()
    image, text = features["image"].requires_grad_(True), features["text"].requires_grad_(True)
    m = _mix(image, text[[1, 2, 0]])
    targets = torch.tensor([[LAM, 1 - LAM, 0.0], [0.0, LAM, 1 - LAM], [1 - LAM, 0.0, LAM]])

    def soft(keys, targets):
        return (_ce(SCALE * m @ keys.t(), targets) + _ce(SCALE * keys @ m.t(), targets.t())) / 2

    expected = (soft(image, targets) + soft(text, targets)) / 2
    # the case tells the targets apart: with 1 - lam on column i - 1 instead the value differs
    assert abs(expected.item() - ((soft(image, targets.t()) + soft(text, targets.t())) / 2).item()) > 0.01
    config = ObjectiveConfig(weights={"xmc": 1.0}, xmc_form="cross-pair", mix_weight=LAM)
    total, parts = Objective(config)(features)
    assert parts["xmc"].item() == pytest.approx(expected.item(), rel=1e-5)
    total.backward()
    assert image.grad.abs().sum() > 0 and text.grad.abs().sum() > 0


def test_cmc_fraction_runs_the_joint_pass_on_part_of_the_batch(tiny_model, batch):
    seen = []
    hook = tiny_model.encoder.register_forward_hook(lambda m, inp, out: seen.append(tuple(inp[0].shape)))
    config = ObjectiveConfig(weights=parse_objective("xmc+cmc"), cmc_fraction=0.5)
    features = OneRPretrainer(tiny_model.train(), config)(**batch)
    hook.remove()
    joint_len = 1 + tiny_model.config.num_patches + batch["input_ids"].shape[1]
    assert [s[0] for s in seen if s[1] == joint_len] == [2]  # 2 of the 4 pairs got the joint pass
    assert features["joint_rows"].tolist() == [0, 1]
    loss, parts = Objective(config)(features)
    f = {k: v.detach() for k, v in features.items()}
    m = mixup(f["image"], f["text"])  # CMC's targets: the mixups of those 2 pairs only
    assert parts["cmc"].item() == pytest.approx(_info_nce(f["joint"], m[:2], f["logit_scale"].exp()).item(), rel=1e-5)
    loss.backward()
    assert tiny_model.encoder.layers[0].self_attn.qkv.weight.grad.abs().sum() > 0


def test_cmc_on_some_rows_against_hand_computed_values():
    """`joint_rows`: the joint embeddings of rows 0 and 1 only; their targets (mixup or image) and
    the captions of the margin are those rows'."""
    joint = _unit(0.2, 1.0)
    features = _hand_features(joint=joint, joint_rows=torch.tensor([0, 1]))
    image, text = features["image"], features["text"]
    _, parts = Objective(ObjectiveConfig(weights={"cmc": 1.0}, mix_weight=LAM))(features)
    assert parts["cmc"].item() == pytest.approx(_info_nce(joint, _mix(image, text)[:2]).item(), rel=1e-5)
    config = ObjectiveConfig(weights={"cmc": 1.0}, cmc_target="image", joint_margin=0.5)
    _, parts = Objective(config)(features)
    gain = (joint * image[:2]).sum(1) - (text[:2] * image[:2]).sum(1)  # cos(z_J, z_I) - cos(z_T, z_I)
    hinge = (0.5 - gain).clamp(min=0).mean()
    assert parts["joint/image_gain"].item() == pytest.approx(gain.mean().item(), rel=1e-5)
    assert parts["joint/margin_hinge"].item() == pytest.approx(hinge.item(), rel=1e-5) and hinge > 0.05
    assert parts["cmc"].item() == pytest.approx((_info_nce(joint, image[:2]) + hinge).item(), rel=1e-5)


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

    # images (1, 0), (0.6, 0.8); captions their mirror images through the y axis
    z_i = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    z_t = torch.tensor([[-1.0, 0.0], [-0.6, 0.8]])
    gap = modality_gap(z_i, z_t)
    assert gap["gap/centroid_distance"].item() == pytest.approx(1.6)  # |(0.8, 0.4) - (-0.8, 0.4)|
    assert gap["gap/pair_cosine"].item() == pytest.approx((-1.0 + 0.28) / 2)
    assert gap["gap/modality_probe_acc"].item() == 1.0  # the sign of x tells them apart
    z_i, z_t = _orthogonal_modalities(n=16)
    assert modality_gap(z_i, z_t)["gap/modality_probe_acc"] == 1.0
    mixed = modality_gap(z_i, z_i)  # the same vectors: nothing tells the modalities apart
    assert mixed["gap/centroid_distance"] < 1e-6 and mixed["gap/modality_probe_acc"] <= 0.5
    assert mixed["gap/pair_cosine"].item() == pytest.approx(1.0, abs=1e-5)


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
    config = ObjectiveConfig(weights=parse_objective("xmc+cmc"), xmc_form="cross-pair", cmc_context="mosaic",
                             cmc_fraction=1.0)
    features = OneRPretrainer(tiny_model.train(), config)(**batch)
    assert len(seen) == 1 and seen[0].shape == batch["pixel_values"].shape
    assert not torch.equal(seen[0], batch["pixel_values"])  # the joint pass saw mosaics, not the pair's image
    loss, parts = Objective(config)(features)
    # CMC's target stays the pair's own (same-pair) mixup, whatever XMC's form and the joint pass's context
    f = {k: v.detach() for k, v in features.items()}
    expected = _info_nce(f["joint"], mixup(f["image"], f["text"]), f["logit_scale"].exp())
    assert parts["cmc"].item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert tiny_model.head.proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="cmc_context"):
        ObjectiveConfig(weights={"cmc": 1.0}, cmc_context="grid")


def test_the_sigmoid_bias_is_saved_with_the_model_and_used_by_its_scores(tiny_config, tmp_path, batch):
    from modeling_oner import OneRModel

    torch.manual_seed(0)
    objective = ObjectiveConfig(weights={"itc": 1.0}, pairwise="sigmoid")
    model = OneRModel(tiny_config)
    assert model.logit_bias is None  # a softmax-trained (or older) model has no bias
    with pytest.raises(ValueError, match="needs a model with a logit bias"):
        OneRPretrainer(model, objective)
    assert objective.model_settings == {"logit_bias_init": -10.0}
    for name, value in objective.model_settings.items():  # what train.py sets before it builds the model
        setattr(tiny_config, name, value)
    model = OneRModel(tiny_config)
    pretrainer = OneRPretrainer(model, objective)
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


# --------------------------------------------------------------------------- joint target, shared-text negatives, quad


@pytest.fixture
def batch6(tiny_processor):
    """Six pairs: enough for the mosaic's shared-text negatives (pair i+1's mosaic must not hold image i)."""
    g = torch.Generator().manual_seed(0)
    from PIL import Image

    images = [Image.fromarray((torch.rand(20, 20, 3, generator=g) * 255).byte().numpy()) for _ in range(6)]
    texts = ["a red apple", "green frog face", "blue whale spouting water", "snowman", "hot pepper", "bee"]
    return dict(tiny_processor(text=texts, images=images, return_tensors="pt"))


def test_quadrant_pool_against_a_hand_computed_example():
    from oner.objectives import quadrant_pool

    # a 4x4 grid, row-major, patch k holds the value k in both of its 2 channels
    patches = torch.arange(16, dtype=torch.float32)[None, :, None].expand(1, 16, 2)
    pooled = quadrant_pool(patches, 4)
    # top-left {0,1,4,5}, top-right {2,3,6,7}, bottom-left {8,9,12,13}, bottom-right {10,11,14,15}
    assert pooled.shape == (1, 4, 2)
    assert pooled[0, :, 0].tolist() == [2.5, 4.5, 10.5, 12.5] and torch.equal(pooled[..., 0], pooled[..., 1])
    with pytest.raises(ValueError, match="even patch grid"):
        quadrant_pool(torch.zeros(1, 9, 2), 3)
    with pytest.raises(ValueError, match="4x4 grid"):
        quadrant_pool(torch.zeros(1, 15, 2), 4)


def test_mosaic_sources_name_the_image_in_each_quadrant():
    from oner.objectives import mosaic

    torch.manual_seed(1)
    n, size = 6, 8
    images = torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 3, size, size).contiguous()
    out, sources = mosaic(images, return_sources=True)
    assert sources.shape == (n, 4) and sources.dtype == torch.long
    for i in range(n):
        quadrants = [out[i, 0, r : r + 4, c : c + 4] for r in (0, 4) for c in (0, 4)]  # row-major
        assert [float(q.mean()) for q in quadrants] == sources[i].float().tolist()
        assert i in sources[i].tolist()
    torch.manual_seed(1)
    assert torch.equal(mosaic(images), out)  # the same draw with or without the sources


def test_region_text_loss_against_a_hand_computed_example():
    import math

    from oner.losses import region_text_loss

    from oner.objectives import region_logits

    texts = torch.eye(3)  # text 2 owns no region
    regions = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [1.0, 0, 0]])
    sources = torch.tensor([0, 1, 0])
    logits = region_logits(regions[:, None], texts, torch.tensor(0.0))  # one patch a region; scale 1: cosines
    assert torch.equal(logits, regions @ texts.t())
    loss = region_text_loss(logits, sources)
    e = math.e
    region_side = -math.log(e / (e + 2))  # every region: its text at cosine 1, two others at 0
    text0 = -(0.5 * math.log(e / (2 * e + 1)) * 2)  # text 0 owns regions 0 and 2: half the target on each
    text1 = -math.log(e / (e + 2))
    assert loss.item() == pytest.approx((region_side + (text0 + text1) / 2) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="one text per region"):
        region_text_loss(logits, sources[:2])


def test_text_softmax_pooling_scores_a_region_by_the_patches_that_show_the_text():
    """PACL's pooling against a hand-computed case: a region of two patches, one exactly a text's
    direction and one orthogonal to both texts. Mean pooling dilutes the match (cosine 1/sqrt(2));
    the text-conditioned softmax at scale t weighs the matching patch by e^t / (e^t + 1)."""
    import math

    from oner.objectives import region_logits

    texts = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])
    region = torch.tensor([[[2.0, 0, 0], [0, 0, 3.0]]])  # (1 region, 2 patches, d); lengths do not matter
    scale = math.log(4.0)
    mean = region_logits(region, texts, torch.tensor(scale), "mean")
    assert mean[0].tolist() == pytest.approx([4.0 * 2 / math.sqrt(13), 0.0], abs=1e-6)  # normalize((2, 0, 3) / 2)
    soft = region_logits(region, texts, torch.tensor(scale), "text_softmax")
    w = math.exp(4.0) / (math.exp(4.0) + 1)  # weight of the matching patch for text 0
    assert soft[0, 0].item() == pytest.approx(4.0 * w / math.sqrt(w**2 + (1 - w) ** 2), rel=1e-5)
    assert soft[0, 1].item() == pytest.approx(0.0, abs=1e-6)  # both patches orthogonal to text 1
    with pytest.raises(ValueError, match="quad pooling"):
        region_logits(region, texts, torch.tensor(scale), "max")


# Two pairs in 3-d: images e1, e2; captions normalize(e_k + e3), at cosine 1/sqrt(2) to their own image
# and 0 to the other.
_IMAGES = torch.eye(3)[:2]
_CAPTIONS = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]) / 2**0.5


def _cmc(joint, joint_negative=None, scale=10.0, **config):
    """CMC against the image target on the two pairs above: (loss, parts)."""
    config = ObjectiveConfig(weights={"cmc": 1.0}, cmc_target="image", **config)
    features = {"image": _IMAGES, "text": _CAPTIONS, "joint": joint, "logit_scale": torch.tensor(math.log(scale))}
    if joint_negative is not None:
        features["joint_negative"] = joint_negative
    total, parts = Objective(config)(features)
    return total.item(), parts


def test_the_text_only_shortcut_cannot_minimise_the_shared_text_loss():
    """The modality shortcut, constructed: the joint embedding IS the caption's, whatever the picture.
    At scale s, with c = s / sqrt(2) its logit to its own image:

    - plain in-batch negatives: the captions tell the images apart, ln(1 + e^-c) in both directions;
    - the same caption over a context without the image as a negative (the same embedding again):
      each image sees its joint embedding twice, (ln(1 + e^-c) + ln(2 + 2 e^-c)) / 2 >= ln(2) / 2;
    - a joint embedding that carries the named image (e_k) against that negative:
      (ln(1 + e^-s) + ln(1 + 2 e^-s + e^(c - s))) / 2, near 0 as s grows."""
    for s in (10.0, 100.0):
        c = s / 2**0.5
        shortcut_plain, _ = _cmc(_CAPTIONS, scale=s)
        assert shortcut_plain == pytest.approx(math.log1p(math.exp(-c)), rel=1e-4, abs=1e-7)
        shortcut_shared, _ = _cmc(_CAPTIONS, _CAPTIONS, scale=s, joint_negatives="shared_text")
        expected = (math.log1p(math.exp(-c)) + math.log(2 + 2 * math.exp(-c))) / 2
        assert shortcut_shared == pytest.approx(expected, rel=1e-5)
        assert shortcut_shared >= math.log(2) / 2
        uses_image, _ = _cmc(_IMAGES, _CAPTIONS, scale=s, joint_negatives="shared_text")
        expected = (math.log1p(math.exp(-s)) + math.log(1 + 2 * math.exp(-s) + math.exp(c - s))) / 2
        assert uses_image == pytest.approx(expected, rel=1e-4, abs=1e-7)
    assert uses_image < 1e-6 < math.log(2) / 2 <= shortcut_shared  # at s = 100


def test_the_joint_margin_holds_the_text_only_embedding_to_the_margin():
    plain, _ = _cmc(_CAPTIONS)
    shortcut, parts = _cmc(_CAPTIONS, joint_margin=0.2)
    assert parts["joint/image_gain"].abs() < 1e-6  # the caption alone: nothing gained over it
    assert parts["joint/margin_hinge"].item() == pytest.approx(0.2, abs=1e-6)
    assert shortcut == pytest.approx(plain + 0.2, abs=1e-6)
    uses_image, parts = _cmc(_IMAGES, joint_margin=0.1)
    assert parts["joint/image_gain"].item() == pytest.approx(1 - 0.5**0.5, abs=1e-6)  # cos 1 against cos 1/sqrt(2)
    assert parts["joint/margin_hinge"] == 0 and uses_image == pytest.approx(_cmc(_IMAGES)[0], abs=1e-7)
    # the caption's side of the margin is a reference: the hinge never moves the text
    text = _CAPTIONS.clone().requires_grad_(True)
    joint = _CAPTIONS.clone().requires_grad_(True)
    features = {"image": _IMAGES, "text": text, "joint": joint, "logit_scale": torch.tensor(math.log(10.0))}
    with_margin, _ = Objective(ObjectiveConfig(weights={"cmc": 1.0}, cmc_target="image", joint_margin=0.2))(features)
    without, _ = Objective(ObjectiveConfig(weights={"cmc": 1.0}, cmc_target="image"))(features)
    (with_margin - without).backward()
    assert text.grad is None and joint.grad.abs().sum() > 0


def test_image_target_and_shared_text_negatives_in_the_pretrainer(tiny_model, batch6):
    seen = []
    original = tiny_model.embed

    def spy(**kwargs):
        if "input_ids" in kwargs and "pixel_values" in kwargs:
            seen.append(kwargs["pixel_values"])
        return original(**kwargs)

    tiny_model.embed = spy
    torch.manual_seed(0)
    loss, parts, pretrainer = _run(tiny_model, batch6, "xmc+cmc", cmc_context="mosaic", cmc_target="image",
                                   joint_negatives="shared_text", joint_margin=0.1)
    assert len(seen) == 2  # the joint pass and its shared-text negative
    assert torch.equal(seen[1], seen[0].roll(-1, dims=0))  # caption i over pair i+1's mosaic
    assert {"cmc", "joint/image_gain", "joint/margin_hinge"} <= set(parts)
    loss.backward()
    assert torch.isfinite(loss) and tiny_model.encoder.layers[0].self_attn.qkv.weight.grad.abs().sum() > 0
    features = pretrainer(**batch6)
    assert features["joint_negative"].shape == features["joint"].shape == (6, tiny_model.config.projection_dim)
    small = {k: v[:4] for k, v in batch6.items()}
    with pytest.raises(ValueError, match="joint_negatives 'shared_text' needs at least 5"):
        pretrainer(**small)


def test_quad_term_pools_the_mosaic_patches_the_pointing_game_reads(tiny_model, batch6):
    from oner.objectives import mosaic, quadrant_patches

    config = ObjectiveConfig(weights=parse_objective("xmc+quad:0.5"), cmc_fraction=1.0)
    assert config.passes == {"image", "text", "quad"}
    pretrainer = OneRPretrainer(tiny_model, config)
    torch.manual_seed(0)
    features = pretrainer(**batch6)
    n, d = 6, tiny_model.config.projection_dim
    grid = tiny_model.config.image_size // tiny_model.config.patch_size
    k = (grid // 2) ** 2
    assert features["quad"].shape == (4 * n, k, d) and features["quad_sources"].shape == (4 * n,)
    # the same quadrant tokens as the public patch map (the pointing game's) of the same mosaics
    torch.manual_seed(0)
    mosaics, sources = mosaic(batch6["pixel_values"], return_sources=True)
    patches = tiny_model.get_patch_features(pixel_values=mosaics)
    patches = patches if torch.is_tensor(patches) else patches.last_hidden_state
    expected = quadrant_patches(patches, grid).flatten(0, 1)
    torch.testing.assert_close(features["quad"], expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(features["quad_sources"], sources.flatten())
    loss, parts = Objective(config)(features)
    assert torch.allclose(loss, parts["xmc"] + 0.5 * parts["quad"])
    loss.backward()
    assert tiny_model.embeddings.patch_embedding.weight.grad.abs().sum() > 0
    # the text-conditioned pooling: a different value, gradients to the patches and the temperature
    tiny_model.zero_grad()
    softmax_config = ObjectiveConfig(weights=parse_objective("quad"), quad_pooling="text_softmax")
    torch.manual_seed(0)
    soft_loss, soft_parts = Objective(softmax_config)(OneRPretrainer(tiny_model, softmax_config)(**batch6))
    assert torch.isfinite(soft_loss) and not torch.isclose(soft_parts["quad"], parts["quad"])
    soft_loss.backward()
    assert tiny_model.embeddings.patch_embedding.weight.grad.abs().sum() > 0 and tiny_model.logit_scale.grad is not None


def test_feature_cached_accumulation_shifts_the_quadrant_sources(tiny_model, batch6):
    """Two micro-batches of 3: each one's quadrant sources index ITS captions; the cached step must
    shift them to rows of the whole step (checked against the loss on features shifted by hand)."""
    from accelerate import Accelerator

    from oner.training.step import forward_backward

    config = ObjectiveConfig(weights=parse_objective("itc+quad"))
    pretrainer = OneRPretrainer(tiny_model.train(), config)
    micro = [{k: v[i * 3:(i + 1) * 3] for k, v in batch6.items()} for i in range(2)]
    torch.manual_seed(0)
    loss, parts = forward_backward(pretrainer, Objective(config), micro, Accelerator(cpu=True))
    torch.manual_seed(0)
    with torch.no_grad():
        f = [pretrainer(**m) for m in micro]
    joined = {k: torch.cat([f[0][k], f[1][k]]) for k in ("image", "text", "quad")}
    joined["quad_sources"] = torch.cat([f[0]["quad_sources"], f[1]["quad_sources"] + 3])
    joined["logit_scale"] = f[0]["logit_scale"]
    _, expected = Objective(config)(joined)
    assert parts["quad"].item() == pytest.approx(expected["quad"].item(), rel=1e-5)


@pytest.mark.parametrize("setting,message", [
    (dict(cmc_target="text"), "cmc_target"),
    (dict(joint_negatives="hard"), "joint_negatives"),
    (dict(joint_negatives="shared_text", pairwise="sigmoid"), "softmax"),
    (dict(joint_margin=-0.1), "joint_margin"),
    (dict(joint_margin=float("nan")), "joint_margin"),
    (dict(weights={"quad": 1.0}, pairwise="sigmoid"), "quad"),
    (dict(weights={"quad": 1.0}, quad_pooling="max"), "quad_pooling"),
])
def test_bad_joint_settings_name_the_option(setting, message):
    setting = {"weights": {"cmc": 1.0}, **setting}
    with pytest.raises(ValueError, match=message):
        ObjectiveConfig(**setting)


def test_joint_flags_reach_the_run_and_its_checkpoint(pairs_dir, tmp_path, capsys, fresh_accelerate_state):
    """The new settings: parsed and validated as flags, run end to end with feature caching, written to
    the run summary, saved in the checkpoint, and a resume with another value is refused."""
    import json

    from conftest import TINY
    from oner.training import main, parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--joint_margin", "-1"])
    assert exit_info.value.code == 2 and "joint_margin" in capsys.readouterr().err
    overrides = ",".join(f"{k}={v}" for k, v in TINY.items())
    common = ["--train_data", str(pairs_dir), "--output_dir", str(tmp_path / "run"), "--config_overrides", overrides,
              "--per_device_batch_size", "6", "--accum_freq", "2", "--warmup_steps", "1", "--logging_steps", "1",
              "--do_eval", "false", "--report_to", "none", "--checkpointing_steps", "2",
              "--objective", "xmc+cmc+quad:0.5", "--cmc_target", "image", "--joint_margin", "0.1",
              "--quad_pooling", "text_softmax"]
    assert main([*common, "--joint_negatives", "shared_text", "--max_steps", "2"]) == 0
    summary = json.loads((tmp_path / "run" / "training_summary.json").read_text())
    assert (summary["cmc_target"], summary["joint_negatives"], summary["joint_margin"], summary["quad_pooling"]) == (
        "image", "shared_text", 0.1, "text_softmax")
    log = [json.loads(line) for line in (tmp_path / "run" / "training_log.jsonl").read_text().splitlines()]
    assert all("loss/quad" in r and "joint/image_gain" in r for r in log)
    capsys.readouterr()
    rc = main([*common, "--joint_negatives", "batch", "--max_steps", "4", "--resume_from_checkpoint", "latest"])
    assert rc == 1 and "joint_negatives" in capsys.readouterr().err
