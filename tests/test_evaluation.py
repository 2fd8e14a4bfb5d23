"""oner-eval: every suite on a small embedded build, user-data suites, bad input, helpers."""

import json
import shutil

import numpy as np
import pytest

from oner.evaluation import DEFAULT_SUITES, run_benchmark
from oner.evaluation.base import is_metric
from oner.evaluation.cli import main
from oner.evaluation.localization import description_of, patch_centres, pointing_chances
from oner.evaluation.report import chance_of


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from oner.data import build_embedded_dataset

    return build_embedded_dataset(root=tmp_path_factory.mktemp("embedded") / "e", limit=40, progress=False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from conftest import TINY
    from modeling_oner import OneRConfig
    from oner.model_folder import init_model_folder

    return init_model_folder(OneRConfig.from_preset("tiny", **TINY), tmp_path_factory.mktemp("m") / "tiny", seed=0)


@pytest.fixture(scope="module")
def fresh_results(model_dir, data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    return run_benchmark(model_dir, data_root=data_root, output_dir=out, batch_size=32, progress=False), out


def test_default_suites_write_json_markdown_and_heatmaps(fresh_results):
    results, out = fresh_results
    assert [k for k in results if k != "_meta"] == list(DEFAULT_SUITES)
    saved = json.loads((out / "eval_results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    table = (out / "eval_results.md").read_text()
    assert "| retrieval_openmoji | i2t_R@1 |" in table and "| pointing_game | pointing_accuracy |" in table
    for suite in ("pointing_game", "text_guided_pointing"):
        files = results["_meta"]["heatmaps"][suite]
        assert len(files) == 4 and all((out / "heatmaps").joinpath(f.split("/")[-1]).stat().st_size > 0 for f in files)
    for suite, metrics in results.items():
        if suite == "_meta":
            continue
        for key, value in metrics.items():
            if is_metric(key):
                assert 0.0 <= value <= 1.0, (suite, key)
                assert chance_of(metrics, key) is not None, (suite, key)  # every number has its chance level


def test_fresh_model_is_near_chance(fresh_results):
    results, _ = fresh_results
    gaps = [value - chance_of(m, key) for s, m in results.items() if s != "_meta"
            for key, value in m.items() if is_metric(key)]
    # Individual numbers are noisy on 40 concepts; on average a random network sits at chance.
    assert abs(float(np.mean(gaps))) < 0.08, gaps
    assert max(gaps) < 0.3, gaps


def test_retrieval_counts_several_captions_per_image(fresh_results, data_root):
    results, _ = fresh_results
    r = results["retrieval_openmoji"]
    assert r["n_captions"] > r["n_images"]  # aliases are extra captions
    assert r["chance_t2i_R@1"] == pytest.approx(1 / r["n_images"])
    assert r["chance_i2t_R@1"] > 1 / r["n_captions"]  # several relevant captions per image


def test_max_items_caps_each_suite(model_dir, data_root, tmp_path):
    results = run_benchmark(model_dir, suites=["retrieval_twemoji", "classification_group", "pointing_game"],
                            data_root=data_root, output_dir=tmp_path, progress=False, max_items=7)
    assert results["retrieval_twemoji"]["n_images"] == 7
    assert results["classification_group"]["n_images"] == 7
    assert results["pointing_game"]["n_images"] == 7


def test_the_clip_baseline_runs_through_the_same_suites(data_root, tmp_path):
    """train.py --architecture clip saves a plain CLIPModel; run_benchmark evaluates it with the same code."""
    from conftest import TINY
    from modeling_oner import OneRConfig
    from oner.baseline import build_clip, save_clip_folder

    model, processor = build_clip(OneRConfig.from_preset("tiny", **TINY))
    folder = save_clip_folder(model, processor, tmp_path / "clip")
    results = run_benchmark(folder, data_root=data_root, output_dir=tmp_path, progress=False, max_items=6)
    assert [k for k in results if k != "_meta"] == list(DEFAULT_SUITES)
    assert 0.0 <= results["pointing_game"]["pointing_accuracy"] <= 1.0
    assert (tmp_path / "eval_results.md").is_file()


def test_cli_runs_and_prints_the_table(model_dir, data_root, tmp_path, capsys):
    code = main([str(model_dir), "--suite", "multimodal_retrieval", "--data-root", str(data_root), "--output-dir",
                 str(tmp_path), "--max-items", "5", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| multimodal_retrieval | R@1 |" in printed and "text_only_R@1" in printed
    assert (tmp_path / "eval_results.json").is_file()


def _user_images(data_root, n=6):
    """A few (path, name) pairs of real embedded images, to build user-data layouts from."""
    rows = [json.loads(line) for line in (data_root / "openmoji" / "metadata.jsonl").read_text().splitlines()]
    return [(data_root / "openmoji" / r["file_name"], r["name"]) for r in rows[:n]]


def test_user_retrieval_on_a_csv_skips_damaged_files(model_dir, data_root, tmp_path):
    from oner.evaluation import user_retrieval_suite

    lines = ["image,caption"]
    for i, (path, name) in enumerate(_user_images(data_root)):
        shutil.copy(path, tmp_path / f"{i}.png")
        lines.append(f"{i}.png,{name}")
    (tmp_path / "broken.png").write_bytes(b"")  # zero bytes: skipped and counted
    lines.append("broken.png,a broken file")
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    suite = user_retrieval_suite(str(tmp_path / "pairs.csv"))
    results = run_benchmark(model_dir, suites=[suite], output_dir=tmp_path / "out", progress=False)
    assert results["retrieval_user"]["n_images"] == 6
    assert results["retrieval_user"]["n_skipped"] == 1
    assert results["_meta"]["data_root"] is None  # the embedded set was not needed


def _class_folder(data_root, root):
    for i, (path, _) in enumerate(_user_images(data_root)):
        (root / f"class_{i % 3}").mkdir(parents=True, exist_ok=True)
        shutil.copy(path, root / f"class_{i % 3}" / f"{i}.png")
    return root


def test_folder_classification_with_names_and_templates(model_dir, data_root, tmp_path, capsys):
    folder = _class_folder(data_root, tmp_path / "imgs")
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"class_0": "a cat", "class_1": "a dog", "class_2": "a flag"}))
    code = main([str(model_dir), "--classification-folder", str(folder), "--class-names", str(names),
                 "--template", "a drawing of {}", "--template", "an emoji of {}", "--output-dir", str(tmp_path),
                 "--no-progress"])
    assert code == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "eval_results.json").read_text())["classification_user"]
    assert result["n_classes"] == 3 and result["n_templates"] == 2 and result["n_images"] == 6
    assert result["chance_top1"] == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--suite", "no_such_suite"], "unknown suite 'no_such_suite'"),
        (["--class-names", "x,y,z", "--classification-folder", "{folder}"], None),
        (["--class-names", "a,b", "--classification-folder", "{folder}"], "2 class names given for 3 sub-folders"),
        (["--class-names", "{unknown_json}", "--classification-folder", "{folder}"], "unknown classes ['class_9']"),
        (["--template", "no placeholder", "--classification-folder", "{folder}"], "exactly one '{}'"),
        (["--retrieval-data", "{empty}"], "no usable image-caption pair"),
    ],
)
def test_cli_bad_input_exits_non_zero_with_a_message(model_dir, data_root, tmp_path, capsys, extra, message):
    folder = _class_folder(data_root, tmp_path / "imgs")
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"class_0": "a", "class_1": "b", "class_2": "c", "class_9": "d"}))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metadata.jsonl").write_text(json.dumps({"file_name": "missing.png", "text": "nothing"}) + "\n")
    args = [a.format(folder=folder, unknown_json=unknown, empty=empty) if "{" in a and "{}" not in a else a
            for a in extra]
    code = main([str(model_dir), *args, "--data-root", str(data_root), "--output-dir", str(tmp_path / "o"),
                 "--no-progress"])
    if message is None:  # a valid call in the same family, so the failures above are about their argument
        assert code == 0
        return
    assert code == 2
    assert message in capsys.readouterr().err


def test_cli_rejects_a_folder_that_is_not_a_model(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    assert main([str(tmp_path), "--no-progress"]) == 2
    assert "is not a model folder" in capsys.readouterr().err
    assert main([str(tmp_path / "missing"), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_empty_embedded_split_is_an_error(model_dir, tmp_path, capsys):
    from oner.data import build_embedded_dataset

    root = build_embedded_dataset(root=tmp_path / "none", limit=0, progress=False)
    assert main([str(model_dir), "--suite", "retrieval_openmoji", "--data-root", str(root), "--no-progress"]) == 2
    assert "is empty" in capsys.readouterr().err


def test_encoders_read_both_feature_conventions(tiny_model, tiny_processor, monkeypatch):
    """transformers 5's output objects and 4.x's (or older folders') tensors give the same embeddings;
    the patches come from `last_hidden_state`, never from the pooled `pooler_output`."""
    import torch
    from PIL import Image

    from oner.evaluation.context import EvalContext

    images = [Image.new("RGB", (20, 20), c) for c in ("red", "blue", "green")]
    texts = ["red", "a blue square", "green leaf"]

    def encode():
        ctx = EvalContext(model=tiny_model, processor=tiny_processor, batch_size=2, progress=False)
        return (ctx.encode_images(images), ctx.encode_texts(texts), ctx.encode_patches(images),
                ctx.encode_multimodal(images, texts))

    objects = encode()
    assert objects[2].shape == (3, tiny_model.config.num_patches, tiny_model.config.projection_dim)
    for name, field in (("get_image_features", "pooler_output"), ("get_text_features", "pooler_output"),
                        ("get_multimodal_features", "pooler_output"), ("get_patch_features", "last_hidden_state")):
        method = getattr(tiny_model, name)
        monkeypatch.setattr(tiny_model, name, lambda *a, _m=method, _f=field, **k: getattr(_m(*a, **k), _f))
    for with_objects, with_tensors in zip(objects, encode()):
        torch.testing.assert_close(with_tensors, with_objects)


def test_patch_centres_follow_resize_and_centre_crop():
    # 2x2 grid on a 16 px model; a 32x32 image is scaled by 1/2, so centres sit at 8 and 24.
    assert patch_centres(2, 16, 32, 32).tolist() == [[8, 8], [24, 8], [8, 24], [24, 24]]
    # 64x32 (wide): scaled to 32x16, centre-cropped to 16x16, so x is offset by 8 resized px = 16 px.
    assert patch_centres(2, 16, 64, 32)[0].tolist() == [24, 8]


def test_pointing_chances_and_descriptions():
    centres = patch_centres(4, 16, 16, 16)  # 16 patch centres at 2, 6, 10, 14
    target, other = [0, 0, 8, 8], [8, 8, 16, 16]
    uniform, aware = pointing_chances(centres, target, [target, other])
    assert uniform == pytest.approx(4 / 16) and aware == pytest.approx(4 / 8)
    assert description_of({"name": "tram car", "captions": ["tram car", "train"]}) == "train"
    assert description_of({"name": "ogre", "captions": ["ogre", "japanese ogre"]}) is None
    assert description_of({"name": "woman vampire", "captions": ["woman vampire", "vampire woman"]}) is None


def test_seeded_subset_is_fixed_and_keeps_the_order():
    from oner.evaluation.context import seeded_subset

    items = list(range(100))
    first = seeded_subset(items, 10)
    assert first == seeded_subset(items, 10) == sorted(first) and len(set(first)) == 10
    assert first != seeded_subset(items, 10, seed=1)
    assert seeded_subset(items[:5], 10) == items[:5]  # fewer than asked: all of them


def test_open_image_composites_on_white_and_outlives_its_file(tmp_path):
    """Evaluation reads images with the processor's conversion (`pil_to_rgb`): transparency on white."""
    from PIL import Image

    from oner.evaluation.context import open_image

    Image.new("RGBA", (6, 4), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    Image.new("RGB", (6, 4), "blue").save(tmp_path / "blue.png")
    clear, blue = open_image(tmp_path / "clear.png"), open_image(tmp_path / "blue.png")
    assert clear.mode == blue.mode == "RGB"
    assert clear.getpixel((1, 1)) == (255, 255, 255) and blue.getpixel((1, 1)) == (0, 0, 255)
