"""Standard benchmarks in clip_benchmark's layouts (oner.evaluation.standard, records, open_clip).

The fixtures are written here in exactly the published layouts: clip_benchmark's webdataset folder
(`test/nshards.txt`, `test/0.tar ...`, `classnames.txt`, `zeroshot_classification_templates.txt`,
`dataset_type.txt`), a Karpathy-style retrieval table (one row per image, a JSON list of 5
captions, a `split` column, as nlphuji/flickr30k's CSV) and an image folder. A test double model
whose embeddings are looked up by a key (an image's red value, a text's string) gives metric values
computed by hand in the comments.
"""

import io
import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from oner.evaluation import context as context_module
from oner.evaluation.cli import main
from oner.evaluation.context import BenchmarkError
from oner.evaluation.records import RECORD_SCHEMA, read_records, validate_record
from oner.evaluation.standard_data import open_standard_set, tar_samples

REPO = Path(__file__).resolve().parent.parent
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))

# ------------------------------------------------------------------ classification: 6 classes, 7 images
CLASSES = ["cat", "dog", "car", "tree", "boat", "lamp"]
TEMPLATES = ["a photo of a {c}.", "a drawing of a {c}."]
# (label, class ranking best first) per image; the double gives image i the scores 6, 5, ... in that order.
CLS_IMAGES = [
    (0, [0, 1, 2, 3, 4, 5]),  # top-1 hit
    (0, [1, 0, 2, 3, 4, 5]),  # top-1 miss, top-5 hit
    (1, [1, 0, 2, 3, 4, 5]),  # hit
    (2, [3, 4, 5, 0, 1, 2]),  # miss, and 2 is 6th: top-5 miss
    (2, [2, 0, 1, 3, 4, 5]),  # hit
    (3, [4, 3, 0, 1, 2, 5]),  # miss, top-5 hit
    (1, [1, 2, 0, 3, 4, 5]),  # hit
]
# By hand: top-1 hits 0, 2, 4, 6 -> acc1 = 4/7; top-5 misses only image 3 -> acc5 = 6/7;
# per-class top-1 recall: cat 1/2, dog 2/2, car 1/2, tree 0/1 -> mean_per_class_recall = 2/4.
CLS_EXPECTED = {"acc1": 4 / 7, "acc5": 6 / 7, "mean_per_class_recall": 0.5}

# ------------------------------------------------------------------ retrieval: 3 images x 5 captions
# Caption t's scores against images 0, 1, 2 (a 4th component makes every caption vector unit-norm,
# so these ARE the cosines; each column's values are distinct: no ties).
CAPTION_SCORES = [
    (0.50, 0.10, 0.11), (0.20, 0.40, 0.12), (0.21, 0.13, 0.53), (0.45, 0.14, 0.15), (0.05, 0.30, 0.35),  # image 0
    (0.16, 0.35, 0.17), (0.18, 0.38, 0.19), (0.39, 0.22, 0.23), (0.24, 0.25, 0.26), (0.27, 0.37, 0.28),  # image 1
    (0.29, 0.31, 0.47), (0.32, 0.33, 0.46), (0.52, 0.34, 0.36), (0.37, 0.42, 0.06), (0.07, 0.08, 0.43),  # image 2
]
# By hand. Captions query images (image_retrieval): own image first for captions 0, 3, 5, 6, 9, 10, 11, 14
# (8/15), second for 1, 2, 8, 12 (12/15 within 2), third for 4, 7, 13.
# Images query captions (text_retrieval, a hit when ANY of the 5 is in the top k): image 0's best
# caption is 12 (image 2's), then 0 -> rank 2; image 1: 13, 1, then 6 -> rank 3; image 2: 2, then 10 -> rank 2.
RET_EXPECTED = {
    "image_retrieval_recall@1": 8 / 15, "text_retrieval_recall@1": 0.0,
    "image_retrieval_recall@2": 12 / 15, "text_retrieval_recall@2": 2 / 3,
    "image_retrieval_recall@3": 1.0, "text_retrieval_recall@3": 1.0,
}


def caption(t: int) -> str:
    return f"a picture described by caption number {t}"


def png(red: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (red, 40, 90)).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------- the double


class KeyedModel(torch.nn.Module):
    """Image embedding = `images[red value]`; text embedding = `texts[string]` (via KeyedProcessor)."""

    def __init__(self, images: dict[int, list[float]], texts: dict[str, list[float]]):
        super().__init__()
        self.images, self.text_list = images, list(texts)
        self.text_table = torch.tensor([texts[t] for t in self.text_list], dtype=torch.float32)
        dim = self.text_table.shape[1]
        self.config = SimpleNamespace(projection_dim=dim, hidden_size=dim, num_hidden_layers=1, patch_size=1,
                                      image_size=8, model_type="oner")
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def get_image_features(self, pixel_values):
        return torch.tensor([self.images[int(r)] for r in pixel_values[:, 0].tolist()], dtype=torch.float32)

    def get_text_features(self, input_ids, attention_mask=None):
        return self.text_table[input_ids[:, 0]]


class KeyedProcessor:
    def __init__(self, model: KeyedModel):
        self.index = {t: i for i, t in enumerate(model.text_list)}

    def __call__(self, images=None, text=None, **kwargs):
        if images is not None:
            return {"pixel_values": torch.tensor([[im.getpixel((0, 0))[0]] for im in images])}
        ids = torch.tensor([[self.index[t]] for t in text])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def classification_double():
    images = {}
    for i, (_, ranking) in enumerate(CLS_IMAGES):
        scores = [0.0] * len(CLASSES)
        for pos, c in enumerate(ranking):
            scores[c] = float(len(CLASSES) - pos)
        images[i] = scores
    texts = {t.format(c=name): [float(j == c) for j in range(len(CLASSES))]
             for c, name in enumerate(CLASSES) for t in TEMPLATES}
    return KeyedModel(images, texts)


def retrieval_double():
    images = {i: [float(j == i) for j in range(4)] for i in range(3)}
    texts = {}
    for t, row in enumerate(CAPTION_SCORES):
        texts[caption(t)] = [*row, math.sqrt(1 - sum(v * v for v in row))]
    return KeyedModel(images, texts)


@pytest.fixture(autouse=True)
def _own_accelerate_state(fresh_accelerate_state):
    """Each run builds its PartialState; none is left behind for other tests."""
    yield


@pytest.fixture
def use_double(monkeypatch):
    """Make `oner-eval` load the given double instead of a model folder."""
    def install(model):
        monkeypatch.setattr(context_module, "load_model_and_processor",
                            lambda model_dir, device=None: (model, KeyedProcessor(model)))
    return install


# ---------------------------------------------------------------------------------------- fixtures


def write_tar(path: Path, samples: list[dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for i, files in enumerate(samples):
            for ext, data in files.items():
                info = tarfile.TarInfo(f"s{i:05d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    root = tmp_path_factory.mktemp("standard")
    # clip_benchmark webdataset, classification: 2 shards, plus one image that does not decode.
    wds = root / "wds_cls"
    (wds / "test").mkdir(parents=True)
    samples = [{"png": png(i), "cls": str(label).encode()} for i, (label, _) in enumerate(CLS_IMAGES)]
    samples.insert(3, {"webp": b"not an image at all", "cls": b"0"})
    write_tar(wds / "test" / "0.tar", samples[:4])
    write_tar(wds / "test" / "1.tar", samples[4:])
    (wds / "test" / "nshards.txt").write_text("2\n")
    (wds / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
    (wds / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    # clip_benchmark webdataset, retrieval: one caption per line in each sample's .txt.
    wret = root / "wds_ret"
    (wret / "test").mkdir(parents=True)
    write_tar(wret / "test" / "0.tar", [{"jpg": png(i), "txt": "\n".join(caption(i * 5 + j) for j in range(5)).encode()}
                                        for i in range(3)])
    (wret / "test" / "nshards.txt").write_text("1\n")
    (wret / "dataset_type.txt").write_text("retrieval\n")
    # Karpathy-style table (nlphuji/flickr30k's CSV columns): a JSON list of 5 captions per row, a split
    # column; one extra training image that the test split must leave out.
    table = root / "flickr"
    (table / "images").mkdir(parents=True)
    rows = []
    for i in range(3):
        (table / "images" / f"{i}.jpg").write_bytes(png(i))  # PNG bytes: the name does not matter to PIL
        rows.append({"raw": json.dumps([caption(i * 5 + j) for j in range(5)]), "sentids": "[]", "split": "test",
                     "filename": f"{i}.jpg", "img_id": str(i)})
    (table / "images" / "9.jpg").write_bytes(png(9))
    rows.insert(1, {"raw": json.dumps(["a training caption"]), "sentids": "[]", "split": "train", "filename": "9.jpg",
                    "img_id": "9"})
    import csv

    with open(table / "flickr_annotations.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    # The same as one row per caption (JSONL), image paths relative to --image_root.
    with open(table / "captions.jsonl", "w") as f:
        for t in range(15):
            f.write(json.dumps({"image": f"{t // 5}.jpg", "caption": caption(t)}) + "\n")
    # Karpathy's own dataset_flickr30k.json: {"images": [{"filename", "split", "sentences": [{"raw"}]}]}.
    images = [{"filename": f"{i}.jpg", "split": "test", "sentences": [{"raw": caption(i * 5 + j)} for j in range(5)]}
              for i in range(3)]
    (table / "dataset_toy.json").write_text(json.dumps({"images": images, "dataset": "toy"}))
    # An image folder: one sub-folder per class (class names from the folder names), one broken file.
    folder = root / "folder"
    for i, (label, _) in enumerate(CLS_IMAGES):
        (folder / CLASSES[label]).mkdir(parents=True, exist_ok=True)
        (folder / CLASSES[label] / f"{i}.png").write_bytes(png(i))
    for name in CLASSES:
        (folder / name).mkdir(exist_ok=True)
    (folder / "cat" / "broken.png").write_bytes(b"")
    return SimpleNamespace(root=root, wds=wds, wret=wret, table=table, folder=folder)


def run_cli(*args) -> int:
    return main([*map(str, args), "--no-progress"])


def load(path) -> dict:
    return json.loads(Path(path).read_text())


# ---------------------------------------------------------------------------------------- tasks


def test_wds_classification_metrics_by_hand(fixtures, use_double, tmp_path):
    use_double(classification_double())
    out = tmp_path / "{dataset}_{task}.json"
    assert run_cli("unused", "--dataset", "wds/toy", "--dataset_root", fixtures.wds, "--task",
                   "zeroshot_classification", "--output", out, "--batch-size", 3) == 0
    record = load(tmp_path / "wds_toy_zeroshot_classification.json")
    assert record["metrics"] == pytest.approx(CLS_EXPECTED)
    assert (record["dataset"], record["task"], record["language"]) == ("wds/toy", "zeroshot_classification", "en")
    assert (record["n_images"], record["n_skipped"], record["n_classes"], record["n_templates"]) == (7, 1, 6, 2)
    assert record["data_stats"]["not_an_image"] == 1
    assert record["templates_source"] == "zeroshot_classification_templates.txt"
    validate_record(record)


def test_image_folder_classification_metrics_by_hand(fixtures, use_double, tmp_path):
    """Class names are the sorted sub-folder names; the double's prompts are keyed by name, so the
    hand-computed numbers hold whatever the order."""
    use_double(classification_double())
    assert run_cli("unused", "--dataset", "folder", "--dataset_root", fixtures.folder, "--custom_template_file",
                   fixtures.wds / "zeroshot_classification_templates.txt", "--output-dir", tmp_path) == 0
    record = load(tmp_path / "standard_results" / "folder_zeroshot_classification.json")
    assert record["metrics"] == pytest.approx(CLS_EXPECTED)
    assert record["n_images"] == 7 and record["n_skipped"] == 1 and record["data_stats"]["empty_file"] == 1
    assert record["class_names_source"] == "sub-folder names" and record["n_classes"] == 6


def test_karpathy_table_retrieval_metrics_by_hand(fixtures, use_double, tmp_path):
    use_double(retrieval_double())
    assert run_cli("unused", "--dataset", "flickr30k_karpathy", "--dataset_root",
                   fixtures.table / "flickr_annotations.csv", "--image_root", fixtures.table / "images",
                   "--task", "zeroshot_retrieval", "--recall_k", 1, 2, 3, "--output", tmp_path / "r.json") == 0
    record = load(tmp_path / "r.json")
    assert record["metrics"] == pytest.approx(RET_EXPECTED)
    assert (record["n_images"], record["n_captions"]) == (3, 15)  # the training row is left out
    validate_record(record)


@pytest.mark.parametrize("layout", ["captions.jsonl", "dataset_toy.json", "wds"])
def test_other_retrieval_layouts_give_the_same_numbers(fixtures, use_double, tmp_path, layout):
    use_double(retrieval_double())
    root = fixtures.wret if layout == "wds" else fixtures.table / layout
    assert run_cli("unused", "--dataset", "wds/toy_ret" if layout == "wds" else "toy", "--dataset_root", root,
                   "--image_root", fixtures.table / "images", "--recall_k", 1, 2, 3,
                   "--output", tmp_path / "r.json") == 0  # --task auto: retrieval from the layout
    record = load(tmp_path / "r.json")
    assert record["task"] == "zeroshot_retrieval" and record["metrics"] == pytest.approx(RET_EXPECTED)


def test_reader_groups_webdataset_files_by_key(fixtures):
    with open(fixtures.wds / "test" / "0.tar", "rb") as f:
        samples = list(tar_samples(f))
    assert [k for k, _ in samples] == ["s00000", "s00001", "s00002", "s00003"]
    assert set(samples[3][1]) == {"webp", "cls"}


def test_max_items_keeps_the_first_items(fixtures, use_double, tmp_path):
    use_double(classification_double())
    assert run_cli("unused", "--dataset", "wds/toy", "--dataset_root", fixtures.wds, "--max-items", 3,
                   "--output", tmp_path / "r.json") == 0
    record = load(tmp_path / "r.json")
    # The first 3 samples: images 0, 1, 2 -> hits 0 and 2.
    assert record["n_images"] == 3 and record["metrics"]["acc1"] == pytest.approx(2 / 3)


# ---------------------------------------------------------------------------------------- bad input


def test_bad_input_is_a_clear_error(fixtures, use_double, tmp_path, capsys):
    use_double(classification_double())
    bare = tmp_path / "bare"
    (bare / "test").mkdir(parents=True)
    (bare / "test" / "nshards.txt").write_text("1\n")
    (bare / "test" / "0.tar").write_bytes((fixtures.wds / "test" / "0.tar").read_bytes())
    two_names = tmp_path / "two"
    (two_names / "test").mkdir(parents=True)
    for name in ("nshards.txt", "0.tar", "1.tar"):
        (two_names / "test" / name).write_bytes((fixtures.wds / "test" / name).read_bytes())
    (two_names / "classnames.txt").write_text("cat\ndog\n")
    bad_template = tmp_path / "t.txt"
    bad_template.write_text("a photo of a cat\n")
    cases = [
        (["wds/bare", "--dataset_root", bare], "no class names"),
        (["wds/toy", "--dataset_root", fixtures.wds, "--custom_template_file", bad_template], "{c}"),
        (["imagenet1k"], "cannot be reached offline"),
        (["not_a_shortcut"], "unknown data set"),
        (["wds/toy", "--dataset_root", tmp_path / "missing"], "does not exist"),
        (["wds/toy", "--dataset_root", fixtures.wds, "--task", "zeroshot_retrieval"], "does not fit"),
        (["wds/two", "--dataset_root", two_names], "label 2 is out of range for 2 class names"),
    ]
    for args, message in cases:
        assert run_cli("unused", "--dataset", *args, "--output", tmp_path / "x.json") == 2, args
        assert message in capsys.readouterr().err, args
    assert not (tmp_path / "x.json").exists()


def test_unknown_shortcut_offline_names_the_hub_repo():
    with pytest.raises(BenchmarkError, match="clip-benchmark/wds_vtab-cifar10"):
        open_standard_set("cifar10")
    with pytest.raises(BenchmarkError, match="someone/flickr30k"):
        open_standard_set("flickr", "someone/flickr30k@main")


# ---------------------------------------------------------------------------------------- Hub sources
# The Hub is out of reach in tests: its two boundaries (HfFileSystem, datasets.load_dataset) are
# replaced by local stand-ins, so that everything after them runs as it does online.


class LocalHubFS:
    """HfFileSystem over local folders: `datasets/<repo>@<revision>/<path>` -> `repos[repo]/<path>`."""

    def __init__(self, repos: dict[str, Path]):
        self.repos, self.opened = repos, []

    def _local(self, path: str) -> Path:
        owner, name_at_revision, rel = path.removeprefix("datasets/").split("/", 2)
        self.opened.append(path)
        return self.repos[f"{owner}/{name_at_revision.split('@')[0]}"] / rel

    def read_text(self, path, encoding="utf-8"):
        local = self._local(path)
        if not local.is_file():
            raise FileNotFoundError(path)
        return local.read_text(encoding=encoding)

    def open(self, path, mode="rb", **kwargs):
        return open(self._local(path), mode)


def test_hub_webdataset_repo_is_streamed_at_its_revision(fixtures, use_double, tmp_path, monkeypatch):
    from oner.evaluation import standard_data as standard

    fs = LocalHubFS({"clip-benchmark/wds_toy": fixtures.wds})
    monkeypatch.setattr(standard, "_hub_filesystem", lambda: fs)
    monkeypatch.setattr(standard, "_is_offline", lambda: False)
    use_double(classification_double())
    assert run_cli("unused", "--dataset", "wds/toy", "--dataset_root", "clip-benchmark/wds_toy@abc123",
                   "--output", tmp_path / "r.json") == 0
    record = load(tmp_path / "r.json")
    assert record["metrics"] == pytest.approx(CLS_EXPECTED) and record["source"] == "clip-benchmark/wds_toy@abc123"
    assert "datasets/clip-benchmark/wds_toy@abc123/test/1.tar" in fs.opened
    # A shortcut without --dataset_root names clip_benchmark's repo (at its default branch).
    fs.repos["clip-benchmark/wds_vtab-cifar10"] = fixtures.wds
    assert run_cli("unused", "--dataset", "cifar10", "--output", tmp_path / "c.json") == 0
    assert load(tmp_path / "c.json")["source"] == "clip-benchmark/wds_vtab-cifar10"


def test_hub_datasets_stream_with_class_labels_and_caption_lists(fixtures, use_double, tmp_path, monkeypatch):
    import datasets

    from oner.evaluation import standard_data as standard

    def classification_rows():
        for i, (label, _) in enumerate(CLS_IMAGES):
            yield {"image": {"bytes": png(i), "path": None}, "label": label}

    def karpathy_rows():  # nlphuji/flickr30k's columns: image, caption (a list of 5), split
        yield {"image": {"bytes": png(9), "path": None}, "caption": ["a training image"], "split": "train"}
        for i in range(3):
            yield {"image": {"bytes": png(i), "path": None}, "caption": [caption(i * 5 + j) for j in range(5)],
                   "split": "test"}

    repos = {
        "someone/toy-cls": datasets.IterableDataset.from_generator(classification_rows, features=datasets.Features(
            {"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})),
        "nlphuji/toy-flickr": datasets.IterableDataset.from_generator(karpathy_rows, features=datasets.Features(
            {"image": datasets.Image(), "caption": datasets.Sequence(datasets.Value("string")),
             "split": datasets.Value("string")})),
    }
    asked = []

    def load_dataset(repo, split=None, revision=None, streaming=False):
        asked.append((repo, split, revision, streaming))
        return repos[repo]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(standard, "_is_offline", lambda: False)
    # Neither repo has the webdataset files: the datasets library streams them.
    monkeypatch.setattr(standard, "_hub_filesystem", lambda: LocalHubFS({"someone/toy-cls": tmp_path,
                                                                        "nlphuji/toy-flickr": tmp_path}))
    use_double(classification_double())
    assert run_cli("unused", "--dataset", "toy", "--dataset_root", "someone/toy-cls@v1", "--custom_template_file",
                   fixtures.wds / "zeroshot_classification_templates.txt", "--output", tmp_path / "c.json") == 0
    record = load(tmp_path / "c.json")
    assert record["metrics"] == pytest.approx(CLS_EXPECTED)
    assert record["class_names_source"] == "the data set's ClassLabel"
    use_double(retrieval_double())
    assert run_cli("unused", "--dataset", "flickr", "--dataset_root", "nlphuji/toy-flickr", "--recall_k", 1, 2, 3,
                   "--output", tmp_path / "r.json") == 0
    record = load(tmp_path / "r.json")
    assert record["metrics"] == pytest.approx(RET_EXPECTED) and record["n_images"] == 3
    assert asked == [("someone/toy-cls", "test", "v1", True), ("nlphuji/toy-flickr", "test", None, True)]


def test_no_dataset_keeps_the_emoji_parser_defaults():
    from oner.evaluation.cli import build_parser, suites_from_args

    args = build_parser().parse_args(["m"])
    assert args.dataset is None and suites_from_args(args) is None


# ---------------------------------------------------------------------------------------- records


def test_records_follow_the_schema_and_fill_the_model_card(fixtures, use_double, tmp_path, tiny_model_dir):
    use_double(retrieval_double())
    assert run_cli(tiny_model_dir, "--dataset", "wds/toy_ret", "--dataset_root", fixtures.wret, "--recall_k", 1, 2) == 0
    use_double(classification_double())
    assert run_cli(tiny_model_dir, "--dataset", "wds/toy", "--dataset_root", fixtures.wds) == 0
    records = read_records(tiny_model_dir / "standard_results")
    assert [r["task"] for r in records] == ["zeroshot_classification", "zeroshot_retrieval"]
    for r in records:
        validate_record(r)
        assert set(RECORD_SCHEMA["required"]) <= set(r)
        assert r["pretrained"] == str(tiny_model_dir) and r["model"].startswith("OneR-")
    assert records[0]["metrics"]["acc5"] == pytest.approx(6 / 7)
    with pytest.raises(ValueError, match="metrics"):
        validate_record({k: v for k, v in records[0].items() if k != "metrics"})
    with pytest.raises(ValueError, match="acc1"):
        validate_record({**records[0], "metrics": {"acc5": 0.5}})

    from oner.model_card import build_card

    card = build_card(tiny_model_dir, {}, {})
    index = card.data.eval_results
    found = {(e.dataset_name, e.metric_type): e.metric_value for e in index}
    assert found[("wds/toy", "acc1")] == pytest.approx(4 / 7)
    assert found[("wds/toy_ret", "image_retrieval_recall@1")] == pytest.approx(8 / 15)


# ---------------------------------------------------------------------------------------- real model


def _flags(fixtures, out):
    return ["--dataset", "cls", "ret", "--dataset_root", f"{fixtures.root}/links/{{dataset}}", "--recall_k", "1", "2",
            "3", "--output", f"{out}/{{dataset}}.json", "--batch-size", "2", "--no-progress"]


@pytest.fixture(scope="module")
def linked(fixtures):
    links = fixtures.root / "links"
    links.mkdir(exist_ok=True)
    for name, target in (("cls", fixtures.wds), ("ret", fixtures.table / "ret")):
        if not (links / name).exists():
            os.symlink(target, links / name)
    ret = fixtures.table / "ret"  # a folder with metadata.jsonl: a table whose paths are relative to it
    ret.mkdir(exist_ok=True)
    with open(ret / "metadata.jsonl", "w") as f:
        for i in range(3):
            (ret / f"{i}.png").write_bytes(png(i * 60))
            f.write(json.dumps({"file_name": f"{i}.png", "captions": [caption(i * 5 + j) for j in range(5)]}) + "\n")
    return fixtures


@pytest.mark.slow
def test_two_processes_give_the_single_process_numbers(linked, tiny_model_dir, tmp_path):
    from conftest import free_port

    one, two = tmp_path / "one", tmp_path / "two"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    assert main([str(tiny_model_dir), *_flags(linked, one)]) == 0
    result = subprocess.run(
        [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--main_process_port", str(free_port()), "-m", "oner.evaluation.cli",
         str(tiny_model_dir), *_flags(linked, two)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("cls", "ret"):
        a, b = load(one / f"{name}.json"), load(two / f"{name}.json")
        assert b["num_processes"] == 2 and a["num_processes"] == 1
        assert b["n_images"] == a["n_images"] and b["n_skipped"] == a["n_skipped"]
        assert b["metrics"] == pytest.approx(a["metrics"], abs=1e-6), name


# ---------------------------------------------------------------------------------------- open_clip adapter


def test_open_clip_adapter_gives_the_evaluation_embeddings(tiny_model_dir):
    from oner.evaluation.context import EvalContext, load_model_and_processor
    from oner.evaluation.open_clip import load_open_clip

    model, preprocess, tokenizer = load_open_clip(tiny_model_dir, device="cpu")
    texts = ["a red square", "a considerably longer caption about a small blue circle"]
    tokens = tokenizer(texts)
    assert tokens.dtype == torch.int64 and tokens.shape == (2, tokenizer.context_length)
    assert (tokens[0] == tokenizer.pad_token_id).any()  # padded to the context length, as open_clip's
    images = [Image.new("RGB", (20, 20), (200, 10, 10)), Image.new("RGB", (30, 20), (10, 10, 200))]
    pixels = torch.stack([preprocess(im) for im in images])
    ctx = EvalContext(*load_model_and_processor(tiny_model_dir, device="cpu"), progress=False)
    with torch.no_grad():
        image_features, text_features, scale = model(pixels, tokens)
        raw = model.encode_text(tokens)
    assert torch.allclose(text_features, ctx.encode_texts(texts), atol=1e-6)
    assert torch.allclose(image_features, ctx.embed_images(images), atol=1e-6)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(2))  # unnormalised unless asked, as open_clip
    assert float(scale) == pytest.approx(float(model.logit_scale.detach().exp()))


# ---------------------------------------------------------------------------------------- clip_benchmark


def _karpathy_loader(fixtures, preprocess, table="flickr_annotations.csv"):
    """clip_benchmark's retrieval input: batches of (pixels, [captions per image]), read from the CSV here."""
    import csv

    with open(fixtures.table / table) as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "test"]
    pixels = torch.stack([preprocess(Image.open(fixtures.table / "images" / r["filename"])) for r in rows])
    caps = [json.loads(r["raw"]) for r in rows]
    return [(pixels[:2], caps[:2]), (pixels[2:], caps[2:])]


def _clip_benchmark():
    try:
        from clip_benchmark.metrics import zeroshot_retrieval
    except ImportError as e:  # not installed: scripts/setup.sh --test installs it with --no-deps
        pytest.skip(f"clip_benchmark is not installed ({e}); `pip install --no-deps clip-benchmark==1.6.2`")
    return zeroshot_retrieval


def test_clip_benchmark_package_data_gives_names_and_templates(fixtures, tiny_model_dir, tmp_path):
    """A webdataset folder without its two text files, named as clip_benchmark names MNIST."""
    _clip_benchmark()
    bare = tmp_path / "wds_mnist"
    (bare / "test").mkdir(parents=True)
    (bare / "test" / "nshards.txt").write_text("1\n")
    (bare / "test" / "0.tar").write_bytes((fixtures.wds / "test" / "1.tar").read_bytes())
    assert run_cli(tiny_model_dir, "--dataset", "wds/mnist", "--dataset_root", bare, "--output", tmp_path / "r.json") == 0
    record = load(tmp_path / "r.json")
    assert record["class_names_source"] == "clip_benchmark en_classnames.json" and record["n_classes"] == 10
    assert record["templates_source"] == "clip_benchmark en_zeroshot_classification_templates.json"


def test_clip_benchmark_retrieval_through_the_adapter_matches(fixtures, tiny_model_dir, tmp_path):
    zeroshot_retrieval = _clip_benchmark()
    from oner.evaluation.open_clip import load_open_clip

    model, preprocess, tokenizer = load_open_clip(tiny_model_dir, device="cpu")
    theirs = zeroshot_retrieval.evaluate(model, _karpathy_loader(fixtures, preprocess), tokenizer, "cpu", amp=False,
                                         recall_k_list=[1, 2, 3])
    assert run_cli(tiny_model_dir, "--dataset", "flickr", "--dataset_root", fixtures.table / "flickr_annotations.csv",
                   "--image_root", fixtures.table / "images", "--recall_k", 1, 2, 3, "--output", tmp_path / "r.json") == 0
    assert load(tmp_path / "r.json")["metrics"] == pytest.approx(theirs, abs=1e-6)


def test_clip_benchmark_classification_through_the_adapter_matches(fixtures, tiny_model_dir, tmp_path, monkeypatch):
    """clip_benchmark's own prompt-ensemble classifier and logits, through the adapter. Its module
    imports scikit-learn (for mean_per_class_recall only): without it, it is imported against a
    stand-in. Its `accuracy` needs numpy < 2.4 (it calls float() on a 1-element array), so the
    top-k and per-class recall are read off its logits here."""
    _clip_benchmark()
    try:
        import sklearn  # noqa: F401
    except ImportError:
        stub = SimpleNamespace(balanced_accuracy_score=None, classification_report=None)
        monkeypatch.setitem(sys.modules, "sklearn", SimpleNamespace(metrics=stub))
        monkeypatch.setitem(sys.modules, "sklearn.metrics", stub)
    monkeypatch.delitem(sys.modules, "clip_benchmark.metrics.zeroshot_classification", raising=False)
    from clip_benchmark.metrics import zeroshot_classification as zc

    from oner.evaluation.open_clip import load_open_clip

    model, preprocess, tokenizer = load_open_clip(tiny_model_dir, device="cpu")
    with open(fixtures.wds / "test" / "0.tar", "rb") as f0, open(fixtures.wds / "test" / "1.tar", "rb") as f1:
        samples = [s for f in (f0, f1) for _, s in tar_samples(f) if "png" in s]
    pixels = torch.stack([preprocess(Image.open(io.BytesIO(s["png"]))) for s in samples])
    labels = torch.tensor([int(s["cls"]) for s in samples])
    loader = [(pixels[:4], labels[:4]), (pixels[4:], labels[4:])]
    classifier = zc.zero_shot_classifier(model, tokenizer, CLASSES, TEMPLATES, "cpu", amp=False)
    logits, target = zc.run_classification(model, classifier, loader, "cpu", amp=False)
    top = logits.topk(5, dim=1).indices
    predicted = top[:, 0]
    theirs = {
        "acc1": float((predicted == target).float().mean()),
        "acc5": float((top == target[:, None]).any(dim=1).float().mean()),
        "mean_per_class_recall": float(torch.stack([(predicted[target == c] == c).float().mean()
                                                    for c in target.unique()]).mean()),
    }
    assert run_cli(tiny_model_dir, "--dataset", "wds/toy", "--dataset_root", fixtures.wds,
                   "--output", tmp_path / "r.json") == 0
    assert load(tmp_path / "r.json")["metrics"] == pytest.approx(theirs, abs=1e-6)
