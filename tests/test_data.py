"""Tests of oner.data: the embedded build, every loader source, damaged samples, augmentations."""

from __future__ import annotations

import csv
import itertools
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

from oner.data import (
    DAMAGE_KINDS,
    DataStats,
    ImageAugment,
    ImageTextCollator,
    TextAugment,
    build_embedded_dataset,
    flip_allowed,
    load_concepts,
    load_image_text_dataset,
    looks_like_local_path,
    read_manifest,
)

LIMIT = 12  # concepts in the small test build


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """Offline, with a private HF_HOME and ONER_DATA_HOME for every test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("ONER_DATA_HOME", str(tmp_path / "oner-data"))


@pytest.fixture(scope="module")
def small_build(tmp_path_factory) -> Path:
    """One small embedded build shared by the tests that only read it."""
    return build_embedded_dataset(tmp_path_factory.mktemp("emb") / "embedded", seed=0, progress=False, limit=LIMIT)


def _png_bytes(color=(255, 0, 0), size=(8, 8), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def _write_good_pngs(folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        name = f"img{i}.png"
        (folder / name).write_bytes(_png_bytes((10 * i, 100, 200)))
        names.append(name)
    return names


class StandInProcessor:
    """Stands in for the OneR processor: records its inputs, returns a dict of tensors."""

    def __call__(self, text, images, return_tensors="pt", padding=True, truncation=True):
        self.text, self.images = text, images
        pixels = torch.stack([torch.from_numpy(np.asarray(im.resize((8, 8)), dtype=np.float32)) for im in images])
        return {"input_ids": torch.tensor([[len(t)] for t in text]), "pixel_values": pixels}


# ------------------------------------------------------------------------------------------------
# The embedded data set
# ------------------------------------------------------------------------------------------------


def _all_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_build_is_deterministic_and_complete(small_build, tmp_path):
    again = build_embedded_dataset(tmp_path / "again", seed=0, progress=False, limit=LIMIT)
    assert _all_bytes(small_build) == _all_bytes(again)  # same seed -> byte-identical files
    manifest = read_manifest(small_build)
    assert manifest["counts"]["twemoji"] == LIMIT
    assert manifest["counts"]["openmoji"] + manifest["openmoji_skipped_undrawable"] == LIMIT
    assert manifest["counts"]["composites"] > 0
    assert {"twemoji", "openmoji", "names"} <= set(manifest["licenses"])
    for split in ("twemoji", "openmoji", "composites"):
        rows = [json.loads(line) for line in (small_build / split / "metadata.jsonl").read_text().splitlines()]
        assert len(rows) == manifest["counts"][split]
        for row in rows:
            with Image.open(small_build / split / row["file_name"]) as im:
                assert im.mode == "RGB"  # composited on white at build time
    row = json.loads((small_build / "twemoji" / "metadata.jsonl").read_text().splitlines()[0])
    assert {"file_name", "text", "captions", "name", "group", "subgroup", "skin_tone", "codepoints"} <= set(row)
    assert row["text"] == row["captions"][0] and ":" not in row["text"] and "_" not in row["text"]


def test_other_seed_changes_only_composites(small_build, tmp_path):
    other = build_embedded_dataset(tmp_path / "seed1", seed=1, progress=False, limit=LIMIT)
    a, b = _all_bytes(small_build), _all_bytes(other)
    assert a["twemoji/metadata.jsonl"] == b["twemoji/metadata.jsonl"]
    assert a["composites/metadata.jsonl"] != b["composites/metadata.jsonl"]


def test_composite_boxes_inside_canvas_and_disjoint(small_build):
    rows = [json.loads(line) for line in (small_build / "composites" / "metadata.jsonl").read_text().splitlines()]
    for row in rows:
        assert 2 <= len(row["objects"]) <= 4
        boxes = [o["box"] for o in row["objects"]]
        for x0, y0, x1, y1 in boxes:
            assert 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 128
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
        assert any(o["name"] in row["text"] for o in row["objects"])


def test_build_is_idempotent_and_replaces_unfinished(tmp_path):
    root = tmp_path / "emb"
    build_embedded_dataset(root, progress=False, limit=3)
    stamp = (root / "manifest.json").stat().st_mtime_ns
    build_embedded_dataset(root, progress=False, limit=3)
    assert (root / "manifest.json").stat().st_mtime_ns == stamp  # not rebuilt
    # An interrupted build (no manifest) is never taken as finished.
    (root / "manifest.json").unlink()
    build_embedded_dataset(root, progress=False, limit=3)
    assert read_manifest(root)["counts"]["twemoji"] == 3
    assert not list(tmp_path.glob(".emb.*"))  # no temporary folders left behind


def test_build_refuses_foreign_folder(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "precious.txt").write_text("not ours")
    with pytest.raises(FileExistsError, match="not an embedded data set"):
        build_embedded_dataset(root, progress=False, limit=2)
    assert (root / "precious.txt").exists()


def test_concepts():
    concepts = load_concepts()
    assert len(concepts) > 3000 and any(c.skin_tone for c in concepts)
    apple = next(c for c in concepts if c.name == "red apple")
    assert apple.group == "Food & Drink"


@pytest.mark.parametrize("split", ["twemoji", "openmoji", "composites"])
def test_load_embedded_splits(small_build, monkeypatch, split):
    monkeypatch.setenv("ONER_DATA_HOME", str(small_build))
    ds = load_image_text_dataset(f"embedded:{split}")
    sample = ds[0]
    assert isinstance(sample["image"], Image.Image) and sample["image"].mode == "RGB"
    assert sample["text"] and sample["text"] == sample["captions"][0]


# ------------------------------------------------------------------------------------------------
# User data sources
# ------------------------------------------------------------------------------------------------


def test_imagefolder_jsonl(tmp_path):
    names = _write_good_pngs(tmp_path / "f", 3)
    with open(tmp_path / "f" / "metadata.jsonl", "w") as f:
        for i, n in enumerate(names):
            f.write(json.dumps({"file_name": n, "caption": f"thing {i}"}) + "\n")
    ds = load_image_text_dataset(str(tmp_path / "f"))
    assert len(ds) == 3 and ds[1]["text"] == "thing 1" and ds[1]["image"].size == (8, 8)


def test_imagefolder_metadata_csv_with_named_columns(tmp_path):
    names = _write_good_pngs(tmp_path / "f", 2)
    with open(tmp_path / "f" / "metadata.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "description"])
        for n in names:
            w.writerow([n, f"a picture {n}"])
    ds = load_image_text_dataset(str(tmp_path / "f"), text_column="description")
    assert [ds[i]["text"] for i in range(2)] == ["a picture img0.png", "a picture img1.png"]


def test_csv_of_paths_and_captions(tmp_path):
    names = _write_good_pngs(tmp_path / "imgs", 2)
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "caption"])
        for n in names:
            w.writerow([f"imgs/{n}", f"caption of {n}"])
    ds = load_image_text_dataset(str(tmp_path / "pairs.csv"), image_column="path")
    assert len(ds) == 2 and ds[0]["text"] == "caption of img0.png"


def _write_shards(folder: Path, n_shards: int, per_shard: int, damaged: dict | None = None) -> None:
    """Webdataset shards: KEY.png + KEY.txt members; ``damaged`` maps key -> (png bytes, txt)."""
    folder.mkdir(parents=True, exist_ok=True)
    damaged = damaged or {}
    for s in range(n_shards):
        with tarfile.open(folder / f"shard-{s:03d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"s{s}_{i:03d}"
                png, txt = damaged.get(key, (_png_bytes((i, s, 0)), f"sample {key}"))
                for ext, data in (("png", png), ("txt", txt.encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards_stream(tmp_path):
    _write_shards(tmp_path / "wds", n_shards=2, per_shard=3)
    ds = load_image_text_dataset(str(tmp_path / "wds" / "*.tar"))
    assert isinstance(ds, torch.utils.data.IterableDataset)
    texts = [s["text"] for s in ds]
    assert len(texts) == 6 and texts[0] == "sample s0_000"
    # The folder itself works too.
    assert len(list(load_image_text_dataset(str(tmp_path / "wds")))) == 6


def test_save_to_disk(tmp_path):
    import datasets

    names = _write_good_pngs(tmp_path / "imgs", 3)
    ds = datasets.Dataset.from_dict(
        {"image": [str(tmp_path / "imgs" / n) for n in names], "text": ["a", "b", "c"]}
    ).cast_column("image", datasets.Image())
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved"))
    loaded = load_image_text_dataset(str(tmp_path / "saved"))
    assert [loaded[i]["text"] for i in range(3)] == ["a", "b", "c"]
    with pytest.raises(ValueError, match="splits found"):
        load_image_text_dataset(str(tmp_path / "saved"), split="validation")


# ------------------------------------------------------------------------------------------------
# Damaged samples: every kind is skipped and counted, never fatal
# ------------------------------------------------------------------------------------------------


def _damaged_files(folder: Path) -> dict[str, tuple[bytes | None, str]]:
    """file name -> (bytes, caption) for one sample of each damage kind, plus two good ones."""
    good = _png_bytes(size=(16, 16))
    noisy = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(noisy, "PNG")
    return {
        "good1.png": (good, "a good one"),
        "good2.png": (good, "another good one"),
        "missing.png": (None, "file not there"),
        "empty.png": (b"", "zero bytes"),
        "text.png": (b"this is not an image at all\n", "a text file"),
        "truncated.png": (noisy.getvalue()[: len(noisy.getvalue()) // 2], "cut in half"),
        # 60x60 = 3600 pixels: more than twice MAX_IMAGE_PIXELS (1000) -> DecompressionBombError;
        "bomb_error.png": (_png_bytes(size=(60, 60)), "too many pixels"),
        # 40x40 = 1600 pixels: between 1x and 2x -> only a DecompressionBombWarning, also damage.
        "bomb_warning.png": (_png_bytes(size=(40, 40)), "a few too many pixels"),
        "nocaption.png": (good, "   "),
    }


EXPECTED_DAMAGE = {
    "missing_file": 1, "empty_file": 1, "not_an_image": 1, "truncated": 1,
    "decompression_bomb": 2, "empty_caption": 1, "unreadable": 0,
}


def _damaged_imagefolder(tmp_path: Path) -> Path:
    folder = tmp_path / "damaged"
    folder.mkdir()
    with open(folder / "metadata.jsonl", "w") as meta:
        for name, (data, caption) in _damaged_files(folder).items():
            if data is not None:
                (folder / name).write_bytes(data)
            meta.write(json.dumps({"file_name": name, "text": caption}) + "\n")
    return folder


def test_every_damage_kind_skipped_and_counted_map_style(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    folder = _damaged_imagefolder(tmp_path)
    # imagefolder refuses rows whose file is missing; use a CSV of paths for the full set.
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "text"])
        for name, (_, caption) in _damaged_files(folder).items():
            w.writerow([f"damaged/{name}", caption])
    ds = load_image_text_dataset(str(tmp_path / "pairs.csv"))
    collator = ImageTextCollator(StandInProcessor(), stats=ds.stats)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collator)
    batches = [b for b in loader if b is not None]
    assert sum(len(b["input_ids"]) for b in batches) == 2
    counts = ds.stats.as_dict()
    assert {k: counts[k] for k in DAMAGE_KINDS} == EXPECTED_DAMAGE
    assert counts["ok"] == 2 and counts["skipped"] == 7 and counts["dropped_in_collate"] == 7
    summary = ds.stats.summary()
    assert "2 ok" in summary and "7 skipped" in summary and "decompression_bomb: 2" in summary


def test_damage_in_webdataset_stream_is_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    files = _damaged_files(tmp_path)
    damaged = {f"s0_{i:03d}": (data, caption) for i, (data, caption) in
               enumerate(v for v in files.values() if v[0] is not None)}
    _write_shards(tmp_path / "wds", n_shards=1, per_shard=len(damaged), damaged=damaged)
    ds = load_image_text_dataset(str(tmp_path / "wds"))
    got = list(ds)
    counts = ds.stats.as_dict()
    assert len(got) == 2 and counts["ok"] == 2
    assert counts["decompression_bomb"] == 2 and counts["truncated"] == 1 and counts["not_an_image"] == 1
    assert counts["empty_file"] + counts["missing_file"] == 1  # an empty tar member
    assert counts["empty_caption"] == 1


def test_collator_drops_bad_items():
    stats = DataStats()
    proc = StandInProcessor()
    image = Image.new("RGB", (20, 10), "blue")
    collator = ImageTextCollator(proc, stats=stats)
    batch = collator([
        {"image": image, "text": "red apple", "captions": ["red apple", "apple"]},
        None,
        {"image": image, "text": " ", "captions": []},
        {"image": b"garbage", "text": "broken"},
    ])
    assert len(batch["input_ids"]) == 1 and proc.images[0].size == (20, 10)
    assert proc.text == ["red apple"]
    d = stats.as_dict()
    assert d["dropped_in_collate"] == 1 and d["empty_caption"] == 1 and d["not_an_image"] == 1
    assert collator([None, None]) is None


def test_stats_reject_unknown_kind():
    with pytest.raises(ValueError, match="unknown counter"):
        DataStats().record("cosmic_ray")


# ------------------------------------------------------------------------------------------------
# Bad arguments: one clear error naming the problem
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, local", [
    ("owner/name", False), ("name", False), ("owner/name.v2", False),
    ("./data", True), ("/data/x", True), ("~/x", True), ("runs/out/", True), ("a/b/c", True),
    ("C:\\data", True), ("pairs.csv", True), ("shards/train.tar", True),
])
def test_local_paths_are_told_from_hub_ids(name, local):
    assert looks_like_local_path(name) is local


def test_bad_arguments(tmp_path, small_build, monkeypatch):
    with pytest.raises(ValueError, match="source is empty"):
        load_image_text_dataset("  ")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_text_dataset(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty folder"):
        load_image_text_dataset(str(tmp_path / "empty"))
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        load_image_text_dataset(str(tmp_path / "empty.csv"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="not a data set"):
        load_image_text_dataset(str(tmp_path / "junk"))
    with pytest.raises(FileNotFoundError, match="matches no file"):
        load_image_text_dataset(str(tmp_path / "*.tar"))
    # Brace ranges (open_clip's shard convention): every shard must exist.
    (tmp_path / "shards").mkdir()
    with pytest.raises(FileNotFoundError, match=r"4 of 4 shards do not exist"):
        load_image_text_dataset(str(tmp_path / "shards" / "{0000..0003}.tar"))
    _write_shards(tmp_path / "shards", n_shards=1, per_shard=1)
    with pytest.raises(FileNotFoundError, match=r"1 of 2 shards do not exist.*shard-001.tar"):
        load_image_text_dataset(str(tmp_path / "shards" / "shard-{000..001}.tar"))
    with pytest.raises(ValueError, match="unbalanced braces"):
        load_image_text_dataset(str(tmp_path / "shards" / "shard-{000..001.tar"))
    (tmp_path / "shards" / "extra.parquet").write_bytes(b"PAR1")
    with pytest.raises(ValueError, match="mix file types"):
        load_image_text_dataset(str(tmp_path / "shards" / "*"))
    with pytest.raises(FileNotFoundError, match="offline"):
        load_image_text_dataset("someone/some-dataset")
    monkeypatch.setenv("ONER_DATA_HOME", str(small_build))
    with pytest.raises(ValueError, match="unknown embedded split 'emojipedia'"):
        load_image_text_dataset("embedded:emojipedia")


def test_missing_columns_are_listed(tmp_path):
    names = _write_good_pngs(tmp_path / "f", 1)
    (tmp_path / "f" / "metadata.jsonl").write_text(json.dumps({"file_name": names[0], "label": 3}) + "\n")
    with pytest.raises(ValueError, match=r"no text column found.*columns found: \['image', 'label'\]"):
        load_image_text_dataset(str(tmp_path / "f"))
    with pytest.raises(ValueError, match="image column 'photo' not found"):
        load_image_text_dataset(str(tmp_path / "f"), image_column="photo", text_column="label")


# ------------------------------------------------------------------------------------------------
# Augmentations
# ------------------------------------------------------------------------------------------------


def _asymmetric_image() -> Image.Image:
    arr = np.zeros((40, 60, 3), dtype=np.uint8)
    arr[:, :20] = (255, 0, 0)  # red on the left only
    arr[:, 20:] = (255, 255, 255)
    return Image.fromarray(arr)


def test_image_augment_deterministic_and_sized():
    image = _asymmetric_image()
    a = [np.asarray(ImageAugment(24, seed=5)(image)) for _ in range(2)]
    assert a[0].shape == (24, 24, 3) and np.array_equal(a[0], a[1])
    aug = ImageAugment(24, seed=5)
    outs = [np.asarray(aug(image)) for _ in range(4)]
    assert not all(np.array_equal(outs[0], o) for o in outs[1:])  # the stream advances
    # A generator passed in gives the same result for the same seed.
    g1, g2 = np.random.default_rng(7), np.random.default_rng(7)
    assert np.array_equal(np.asarray(aug(image, rng=g1)), np.asarray(aug(image, rng=g2)))


def test_flip_respects_allow_flip():
    image = _asymmetric_image()
    aug = ImageAugment(30, scale=(1.0, 1.0), ratio=(1.5, 1.5), hflip_p=1.0, color_jitter=0.0, blur_p=0.0)
    kept = np.asarray(aug(image, allow_flip=False))
    flipped = np.asarray(aug(image, allow_flip=True))
    assert kept[15, 2, 1] < 50 and flipped[15, -3, 1] < 50  # red (no green) moves to the right
    assert flip_allowed(["red apple"]) and not flip_allowed(["left arrow"])
    assert not flip_allowed(["keycap: 1"]) and not flip_allowed(["flag for France"])


def test_text_augment():
    sample = {"captions": ["face with tears of joy", "joy"]}
    runs = [[TextAugment(seed=1)(sample) for _ in range(1)] for _ in range(2)]
    assert runs[0] == runs[1]
    aug = TextAugment(whole_word_mask_p=1.0, seed=0, alias_choice=False)
    out = aug(sample).split()
    assert len(out) == 5 and out.count("[MASK]") == 4  # never every word
    assert TextAugment(whole_word_mask_p=1.0, seed=0)("joy") == "joy"  # one word: never masked
    texts = {TextAugment(seed=s, whole_word_mask_p=0.0)(sample) for s in range(20)}
    assert texts == set(sample["captions"])  # alias choice reaches every caption


def test_counts_made_in_dataloader_workers_reach_the_main_process(tmp_path):
    folder = tmp_path / "f"
    names = _write_good_pngs(folder, 4)
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_bytes(b"not an image")
    with open(folder / "metadata.jsonl", "w") as meta:
        for n in [*names, "empty.png", "text.png"]:
            meta.write(json.dumps({"file_name": n, "text": f"caption {n}"}) + "\n")
    ds = load_image_text_dataset(str(folder))
    loader = torch.utils.data.DataLoader(
        ds, batch_size=2, num_workers=2, collate_fn=ImageTextCollator(StandInProcessor(), stats=ds.stats)
    )
    kept = sum(len(b["input_ids"]) for b in loader if b is not None)
    d = ds.stats.as_dict()
    assert kept == 4 and d["ok"] == 4 and d["empty_file"] == 1 and d["not_an_image"] == 1


# ------------------------------------------------------------------------------------------------
# The batched tensor backend (--augment_backend tensor) against the PIL backend
# ------------------------------------------------------------------------------------------------


def _both_backends(images, size, n, image_augment, captions=None):
    """Each of `n` draws (seeded (0, 0, i), as AugmentedPairs seeds them) through both backends:
    PIL uint8 `(n, 3, size, size)` and the tensor backend's pixels in 0..255 (mean 0, std 1, rescale 1)."""
    from oner.data.augment import SampleDraws, TensorAugment

    tensor = TensorAugment(size, image_augment)
    pil, pixels, draws = [], [], []
    for i in range(n):
        image = images[i % len(images)]
        allow = flip_allowed(captions[i % len(captions)]) if captions else True
        cached, source_size = tensor.to_pixels(image)
        pixels.append(cached)
        draws.append(SampleDraws(source_size, tensor.draw_image(np.random.default_rng([0, 0, i]), source_size, allow), None))
        pil.append(np.asarray(image_augment(image, allow_flip=allow, rng=np.random.default_rng([0, 0, i]))))
    pil = torch.from_numpy(np.stack(pil)).permute(0, 3, 1, 2).float()
    return pil, tensor(torch.stack(pixels), draws, [0.0] * 3, [1.0] * 3, rescale=1.0)


def _ramp_image(width=60, height=40) -> Image.Image:
    """R grows left to right, G top to bottom: an output's pixels tell which box it was cropped from."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, np.full_like(x, 128)], -1).round().astype(np.uint8))


def _crop_estimates(batch, width=60, height=40):
    """(area fraction, aspect, mirrored) of each output of `_ramp_image`, read from its ramps."""
    out = batch.shape[-1]
    r, g = batch[:, 0], batch[:, 1]
    dx = (r[:, :, -1] - r[:, :, 0]).mean(1)  # signed: negative when mirrored
    dy = (g[:, -1, :] - g[:, 0, :]).mean(1)
    w = dx.abs() / 255 * (width - 1) * out / (out - 1)
    h = dy / 255 * (height - 1) * out / (out - 1)
    return (w * h / (width * height)).numpy(), (w / h).numpy(), (dx < 0).numpy()


def test_tensor_backend_crops_and_flips_as_pil_does():
    """Crop area, aspect and flip rate, read back from the output pixels, follow the same
    distribution in both backends (and each output matches its PIL twin), flips only where allowed."""
    aug = ImageAugment(24, color_jitter=0.0, blur_p=0.0)
    captions = ["red apple", "left arrow"]  # every second sample may not be mirrored
    pil, tensor = _both_backends([_ramp_image()], 24, 400, aug, captions)
    (area_p, aspect_p, flip_p), (area_t, aspect_t, flip_t) = _crop_estimates(pil), _crop_estimates(tensor)
    assert 0.55 < area_p.min() and area_p.max() < 1.05 and 0.7 < aspect_p.min() and aspect_p.max() < 1.4
    for p, t in ((area_p, area_t), (np.log(aspect_p), np.log(aspect_t))):
        assert abs(p.mean() - t.mean()) < 0.01 and abs(p.std() - t.std()) < 0.01
        assert np.abs(np.quantile(p, [0.1, 0.5, 0.9]) - np.quantile(t, [0.1, 0.5, 0.9])).max() < 0.02
        assert np.abs(p - t).max() < 0.05  # sample by sample, too
    assert not flip_p[1::2].any() and not flip_t[1::2].any()
    assert 0.4 < flip_t[::2].mean() < 0.6 and np.array_equal(flip_p, flip_t)


def test_tensor_backend_colour_statistics_match_pil(small_build):
    """Brightness, contrast and saturation of jittered, blurred crops of the embedded emoji: the same
    distribution in both backends; pixel by pixel within resampling error."""
    ds = load_image_text_dataset(str(small_build / "twemoji"))
    images = [ds[i]["image"] for i in range(len(ds))]
    aug = ImageAugment(32, color_jitter=0.4, blur_p=0.3)
    pil, tensor = _both_backends(images, 32, 300, aug)

    def stats(x):
        return {"brightness": x.mean((1, 2, 3)), "contrast": x.std((1, 2, 3)),
                "saturation": (x.amax(1) - x.amin(1)).mean((1, 2))}

    for name, p in stats(pil).items():
        t = stats(tensor)[name]
        assert abs(p.mean() - t.mean()) < 1.5, name  # of 255
        assert abs(p.std() - t.std()) < 0.05 * p.std(), name
        assert (p - t).abs().mean() < 1.5, name
    assert (pil - tensor).abs().mean() < 3.0  # resampling differences at edges only


def test_tensor_backend_colour_jitter_is_pils_arithmetic():
    from oner.data.augment import AugmentParams, _color_jitter

    rng = np.random.default_rng(1)
    arrays = rng.integers(0, 256, (16, 12, 12, 3), dtype=np.uint8)
    params, expected = [], []
    for a in arrays:
        order, factors = tuple(int(i) for i in rng.permutation(3)), tuple(float(f) for f in rng.uniform(0.3, 1.7, 3))
        params.append(AugmentParams((0, 0, 12, 12), False, (order, factors), None))
        image = Image.fromarray(a)
        for i in order:
            image = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)[i](image).enhance(factors[i])
        expected.append(np.asarray(image))
    got = _color_jitter(torch.from_numpy(arrays).permute(0, 3, 1, 2).float(), params)
    assert np.array_equal(got.permute(0, 2, 3, 1).numpy(), np.stack(expected))


def test_tensor_backend_without_augmentation_is_the_processor(tiny_processor):
    from oner.data.augment import SampleDraws, TensorAugment

    rng = np.random.default_rng(0)
    square = [Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)) for _ in range(3)]
    wide = [Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)), _ramp_image()]
    tensor = TensorAugment(tiny_processor.image_size)
    images = tiny_processor.image_processor
    for batch, atol in ((square, 1e-5), (wide, None)):
        cached = [tensor.to_pixels(image) for image in batch]
        pixels = torch.stack([p for p, _ in cached])
        draws = [SampleDraws(size, tensor.draw_image(rng, size, True), tensor.draw_style(rng)) for _, size in cached]
        got = tensor(pixels, draws, images.image_mean, images.image_std, images.rescale_factor)
        expected = tiny_processor(images=batch)["pixel_values"]
        assert got.shape == expected.shape == (len(batch), 3, 16, 16)
        if atol:
            torch.testing.assert_close(got, expected, atol=atol, rtol=0)
        else:  # the processor resizes, then crops; the cache crops, then resizes
            assert (got - expected).abs().mean() < 0.05


def _style_batch(style, n=6, size=16, seed=0):
    from oner.data.augment import SampleDraws, StyleAugment, TensorAugment

    images = [_asymmetric_image(), Image.new("RGB", (20, 20), (250, 200, 30))] * (n // 2)
    tensor = TensorAugment(size, ImageAugment(size), StyleAugment(**style))
    pixels, draws = [], []
    for i, image in enumerate(images):
        cached, source = tensor.to_pixels(image)
        rng = np.random.default_rng([seed, 0, i])
        pixels.append(cached)
        draws.append(SampleDraws(source, tensor.draw_image(rng, source, True), tensor.draw_style(rng)))
    mean, std = [0.5, 0.4, 0.3], [0.25, 0.25, 0.25]
    return tensor(torch.stack(pixels), draws, mean, std), torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)


@pytest.mark.parametrize("style", [{"hue": 0.5}, {"greyscale_p": 1.0}, {"randconv_p": 1.0}, {"outline_p": 1.0}])
def test_style_augmentations(style):
    """Each style switch: the batch keeps its shape, equals itself for the same seeds, changes with
    the seed, differs from the switch off, and is the switch off at strength 0."""
    off, mean, std = _style_batch({})
    on = _style_batch(style)[0]
    assert on.shape == off.shape == (6, 3, 16, 16)
    assert torch.equal(on, _style_batch(style)[0]) and not torch.equal(on, _style_batch(style, seed=1)[0])
    assert not torch.equal(on, off)
    assert torch.equal(_style_batch({name: 0.0 for name in style})[0], off)
    real = on * std + mean  # back to [0, 1]
    assert real.min() >= -1e-5 and real.max() <= 1 + 1e-5
    if "greyscale_p" in style:
        assert torch.allclose(real[:, 0], real[:, 1], atol=1e-5) and torch.allclose(real[:, 1], real[:, 2], atol=1e-5)
    if "outline_p" in style:  # a flat image has no edge to outline
        assert torch.equal(on[1::2], off[1::2]) and not torch.equal(on[0::2], off[0::2])


def test_style_augment_rejects_bad_strengths():
    from oner.data.augment import StyleAugment

    with pytest.raises(ValueError, match="hue"):
        StyleAugment(hue=0.7)
    with pytest.raises(ValueError, match="randconv_p"):
        StyleAugment(randconv_p=1.5)
    with pytest.raises(ValueError, match="randconv_kernel_sizes"):
        StyleAugment(randconv_kernel_sizes=(2,))


def _train_args(data: str, **extra):
    from oner.training.args import parse_args

    flags = ["--train_data", data, "--augment_backend", "tensor"]
    for name, value in extra.items():
        flags += [f"--{name}", str(value)]
    return parse_args(flags)


def test_tensor_backend_loader_is_independent_of_workers(small_build, tiny_processor):
    """The map-style loader: batches of the processor's shapes, the same captions as the PIL backend
    draws, and the same batches with 0 or 2 loader workers."""
    from oner.training.data import make_dataloader, open_train_data

    data = str(small_build / "twemoji")

    def first_batches(num_workers, backend="tensor"):
        args = _train_args(data, randconv_probability=0.5, greyscale_probability=0.5, augment_backend=backend) \
            if backend == "tensor" else _train_args(data, augment_backend="pil")
        dataset = open_train_data(args, seed=3, image_size=16)
        loader = make_dataloader(dataset, tiny_processor, 4, seed=3, num_workers=num_workers)
        loader.sampler.set_epoch(1)
        dataset.set_epoch(1)
        return list(itertools.islice(loader, 2))

    quiet, workers, pil = first_batches(0), first_batches(2), first_batches(0, "pil")
    for a, b, c in zip(quiet, workers, pil):
        assert a["pixel_values"].shape == c["pixel_values"].shape == (4, 3, 16, 16)
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["input_ids"], b["input_ids"])
        assert torch.equal(a["input_ids"], c["input_ids"])  # the same captions drawn
    assert not torch.equal(quiet[0]["pixel_values"], quiet[1]["pixel_values"])


def test_tensor_backend_streams(tmp_path, tiny_processor):
    from oner.training.data import make_stream_loader, open_train_data

    _write_shards(tmp_path / "wds", n_shards=2, per_shard=6)
    stream = open_train_data(_train_args(str(tmp_path / "wds"), outline_probability=1.0), seed=0, image_size=16)
    batches = list(make_stream_loader(stream, tiny_processor, batch_size=4, num_workers=0))
    assert len(batches) == 3 and all(b["pixel_values"].shape == (4, 3, 16, 16) for b in batches)
    assert sorted(k for b in batches for k in b["sample_keys"]) == sorted(f"s{s}_{i:03d}" for s in range(2) for i in range(6))


@pytest.mark.parametrize("flags, message", [
    (["--augment_backend", "pil", "--randconv_probability", "0.5"], "add --augment_backend tensor"),
    (["--augment_backend", "tensor", "--greyscale_probability", "2"], "--greyscale_probability must be a probability"),
    (["--augment_backend", "tensor", "--hue_jitter", "0.8"], "--hue_jitter must be in"),
    (["--color_jitter", "1"], "--color_jitter must be in"),
    (["--augment_backend", "numpy"], "invalid choice"),
])
def test_augment_flags_are_checked(flags, message, capsys):
    from oner.training.args import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args(flags)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_colour_changes_spare_captions_that_name_a_colour():
    from oner.data import colour_allowed
    from oner.data.augment import StyleAugment

    assert colour_allowed(["lollipop"]) and not colour_allowed(["red apple"])
    assert not colour_allowed(["lollipop", "waving hand: medium-light skin tone"])
    style = StyleAugment(hue=0.5, greyscale_p=1.0, randconv_p=1.0, outline_p=1.0)
    named = style.draw(np.random.default_rng(0), 8, allow_colour=False)
    free = style.draw(np.random.default_rng(0), 8, allow_colour=True)
    assert (named.hue, named.greyscale, named.randconv) == (0.0, False, None) and named.outline is not None
    assert free.hue != 0 and free.greyscale and free.randconv is not None
    np.testing.assert_array_equal(named.outline[2], free.outline[2])  # the outline is drawn as before
    unguarded = StyleAugment(hue=0.5, keep_named_colours=False).draw(np.random.default_rng(0), 8, allow_colour=False)
    assert unguarded.hue == free.hue


def test_train_filter_keeps_the_same_rows_of_a_table_and_of_a_stream():
    import datasets

    from oner.training.data import filter_rows

    table = datasets.Dataset.from_dict({"text": ["a", "b", "c", "d"], "skin_tone": ["true", "false", "FALSE", "yes"]})
    kept = filter_rows(table, "skin_tone = False", "toy")
    streamed = filter_rows(table.to_iterable_dataset(), "skin_tone=false", "toy")
    assert kept["text"] == [row["text"] for row in streamed] == ["b", "c"]
    for source in (table, table.to_iterable_dataset()):
        with pytest.raises(ValueError, match="toy has no column 'tone'"):
            filter_rows(source, "tone=false", "toy")
    with pytest.raises(ValueError, match="no row of toy has skin_tone = 'maybe'"):
        filter_rows(table, "skin_tone=maybe", "toy")
    with pytest.raises(ValueError, match="expected column=value"):
        filter_rows(table, "skin_tone", "toy")
    flags = datasets.Dataset.from_dict({"text": ["a", "b"], "flag": [True, False]})
    assert filter_rows(flags, "flag=False", "toy")["text"] == ["b"]  # booleans compare as written
