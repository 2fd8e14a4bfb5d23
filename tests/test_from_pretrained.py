"""train.py --model_name_or_path: continue from a saved model; conflicting presets, offline Hub ids and
folders that are not models are refused before anything is written."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import TINY, reset_accelerate
from test_training import OVERRIDES, pairs_dir, tiny_args  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

# A first step that can be rebuilt outside the loop: no augmentation, ITC only, fp32, eager attention.
EXACT = ("--objective", "itc", "--image_augment", "false", "--text_augment", "false", "--mixed_precision", "no",
         "--attn_implementation", "eager", "--checkpointing_steps", "0")


@pytest.fixture(scope="module")
def trained_dir(pairs_dir, tmp_path_factory):  # noqa: F811
    """A model folder written by train.py (3 steps from seed 3, so unlike a fresh seed-0 model)."""
    from oner.training import main

    reset_accelerate()
    out = tmp_path_factory.mktemp("source") / "run"
    assert main(tiny_args(pairs_dir, out, "--max_steps", "3", "--seed", "3", *EXACT)) == 0
    reset_accelerate()
    return out


def first_batch(pairs_dir, processor, batch_size=8, seed=0):  # noqa: F811
    """The loop's first micro-batch, rebuilt from the files: `EpochSampler` draws
    `torch.randperm(n, generator=manual_seed(seed + epoch))` and the collator calls the processor."""
    rows = [json.loads(line) for line in (pairs_dir / "metadata.jsonl").read_text().splitlines()]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:batch_size].tolist()
    images = [Image.open(pairs_dir / rows[i]["file_name"]).convert("RGB") for i in order]
    return processor(images=images, text=[rows[i]["text"] for i in order], return_tensors="pt")


def itc_loss(model, batch) -> float:
    """Symmetric InfoNCE of the model's own normalised embeddings and logit scale, written out."""
    model.eval()
    with torch.no_grad():
        image = model.get_image_features(pixel_values=batch["pixel_values"])
        text = model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        # transformers 5 returns output objects from get_*_features (as CLIPModel does); 4.x tensors.
        z_i = F.normalize(getattr(image, "pooler_output", image), dim=-1)
        z_t = F.normalize(getattr(text, "pooler_output", text), dim=-1)
        logits = model.logit_scale.exp() * z_i @ z_t.t()
        labels = torch.arange(len(logits))
        return ((F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2).item()


# --------------------------------------------------------------------------- continuing


def test_continuing_starts_from_the_folders_weights(pairs_dir, trained_dir, tmp_path, capsys):  # noqa: F811
    from modeling_oner import OneRConfig, OneRModel
    from processing_oner import OneRProcessor

    from oner.training import main

    out = tmp_path / "continued"
    # The overrides restate the folder's own sizes (tiny_args gives them): accepted.
    assert main(tiny_args(pairs_dir, out, "--model_name_or_path", str(trained_dir), "--max_steps", "2", *EXACT)) == 0
    assert f"continuing from {trained_dir}: its weights and processor" in capsys.readouterr().out
    logged = json.loads((out / "training_log.jsonl").read_text().splitlines()[0])
    assert logged["step"] == 1

    batch = first_batch(pairs_dir, OneRProcessor.from_pretrained(trained_dir))
    expected = itc_loss(OneRModel.from_pretrained(trained_dir, attn_implementation="eager"), batch)
    assert logged["loss"] == pytest.approx(expected, abs=1e-5)
    torch.manual_seed(0)  # what the run would have trained without the flag
    fresh = itc_loss(OneRModel(OneRConfig.from_preset("tiny", **TINY)), batch)
    assert abs(fresh - expected) > 1e-3  # so the equality above says something

    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["continued_from"] == str(trained_dir) and summary["steps"] == 2
    assert summary["preset"] == "custom"  # the folder's sizes are the tiny preset with TINY overrides
    assert "base_model" not in summary  # a local folder is no Hub base model
    assert f"| continued from | {trained_dir} |" in (out / "README.md").read_text()
    args = json.loads((out / "training_args.json").read_text())
    assert args["model_name_or_path"] == str(trained_dir) and "model_name_or_path" in args["explicit_flags"]


def test_a_continued_run_resumes_only_with_its_source(pairs_dir, trained_dir, tmp_path, capsys):  # noqa: F811
    from oner.training import main

    out = tmp_path / "continued"
    common = ("--model_name_or_path", str(trained_dir), "--objective", "itc", "--checkpointing_steps", "1")
    assert main(tiny_args(pairs_dir, out, "--max_steps", "1", *common)) == 0
    reset_accelerate()
    assert main(tiny_args(pairs_dir, out, "--max_steps", "2", "--objective", "itc",
                          "--resume_from_checkpoint", "latest")) == 1
    assert "model_name_or_path: checkpoint" in capsys.readouterr().err
    reset_accelerate()
    assert main(tiny_args(pairs_dir, out, "--max_steps", "2", *common, "--resume_from_checkpoint", "latest")) == 0
    assert json.loads((out / "training_summary.json").read_text())["steps"] == 2


def test_the_clip_baseline_continues_too(pairs_dir, tmp_path):  # noqa: F811
    from transformers import CLIPModel

    from oner.training import main

    source, out = tmp_path / "clip", tmp_path / "clip-continued"
    clip = ("--architecture", "clip", "--objective", "itc", "--checkpointing_steps", "0")
    assert main(tiny_args(pairs_dir, source, "--max_steps", "1", *clip)) == 0
    reset_accelerate()
    assert main(tiny_args(pairs_dir, out, "--max_steps", "1", "--model_name_or_path", str(source), *clip)) == 0
    assert json.loads((out / "training_summary.json").read_text())["continued_from"] == str(source)
    assert isinstance(CLIPModel.from_pretrained(out), CLIPModel)


def test_a_hub_model_in_the_local_cache_loads_offline_at_its_revision(pairs_dir, tiny_model_dir, tmp_path):  # noqa: F811
    """Offline, a Hub id loads from the Hugging Face cache (here: a snapshot laid out as the Hub client
    lays it out, with the branch `v1`); the card names it as its base model."""
    import shutil

    from huggingface_hub import constants

    from oner.training import main

    repo = Path(constants.HF_HUB_CACHE) / "models--someone--oner-cached"  # conftest's temporary HF_HOME
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "v1").write_text(commit)
    try:
        out = tmp_path / "from-hub"
        assert main(tiny_args(pairs_dir, out, "--model_name_or_path", "someone/oner-cached", "--revision", "v1",
                              "--max_steps", "1", "--objective", "itc", "--checkpointing_steps", "0")) == 0
    finally:
        shutil.rmtree(repo)
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["continued_from"] == "someone/oner-cached@v1" and summary["base_model"] == "someone/oner-cached"
    card = (out / "README.md").read_text()
    assert "base_model: someone/oner-cached" in card and "| continued from | someone/oner-cached@v1 |" in card


def test_attention_dropout_is_the_one_field_a_loaded_model_may_change(tiny_model_dir):
    from oner.training.pretrained import check_agreement, load_pretrained, resolve_source, source_config

    source = resolve_source(str(tiny_model_dir))
    config = source_config(source, "oner")
    apply = check_agreement(config, None, {**TINY, "attention_dropout": 0.1}, "oner", source.label)
    assert apply == {"attention_dropout": 0.1}
    model, processor = load_pretrained(source, "oner", "eager", apply)
    assert model.config.attention_dropout == 0.1 and processor.image_size == TINY["image_size"]
    assert check_agreement(config, "tiny", {**TINY}, "oner", source.label) == {}  # preset + overrides = the model


# --------------------------------------------------------------------------- refused before anything is written


@pytest.mark.parametrize("extra,message", [
    # tiny_args restates every preset field the folder overrides; "" drops that, leaving the preset's own sizes
    (["--preset", "small", "--config_overrides", ""],
     "--preset small (given on the command line or in the --config file) describes another model"),
    (["--preset", "small", "--config_overrides", OVERRIDES + ",pooling=cls"], "pooling=cls: the model has pooling='mean'"),
    (["--config_overrides", OVERRIDES + ",hidden_size=64"], "hidden_size=64: the model has hidden_size=32"),
    (["--config_overrides", "patch_size=8"], "patch_size=8: the model has patch_size=4"),
    (["--config_overrides", "initializer_range=0.5"], "only attention_dropout may change"),
])
def test_a_preset_or_overrides_that_contradict_the_model_are_refused(pairs_dir, tiny_model_dir, tmp_path,  # noqa: F811
                                                                     capsys, extra, message):
    from oner.training import main

    out = tmp_path / "out"
    rc = main(tiny_args(pairs_dir, out, "--model_name_or_path", str(tiny_model_dir), "--max_steps", "1", *extra))
    err = capsys.readouterr().err
    assert rc == 1 and message in err and str(tiny_model_dir) in err, err
    assert not out.exists()


def test_a_preset_from_a_config_file_counts_as_given(pairs_dir, tiny_model_dir, tmp_path, capsys):  # noqa: F811
    from oner.training import main

    config = tmp_path / "run.yaml"
    config.write_text("preset: tiny\n")  # the default's value, but written down: the folder is not tiny-sized
    out = tmp_path / "out"
    rc = main(["--config", str(config), *tiny_args(pairs_dir, out, "--model_name_or_path", str(tiny_model_dir),
                                                   "--max_steps", "1", "--config_overrides", "")])
    assert rc == 1 and "--preset tiny" in capsys.readouterr().err
    assert not out.exists()


def test_a_hub_id_offline_is_refused_naming_it(pairs_dir, tmp_path, capsys):  # noqa: F811
    from oner.training import main

    out = tmp_path / "out"
    rc = main(tiny_args(pairs_dir, out, "--model_name_or_path", "someone/oner-tiny-nowhere", "--revision", "v1",
                        "--max_steps", "1"))
    err = capsys.readouterr().err
    assert rc == 1 and "someone/oner-tiny-nowhere" in err and "offline mode is on" in err and "revision v1" in err, err
    assert not out.exists()


def _checkpoint_like(folder):
    folder.mkdir()
    (folder / "train_state.json").write_text("{}")
    return folder


def _other_model(folder):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    return folder


@pytest.mark.parametrize("make,extra,message", [
    (lambda p: p / "missing", [], "does not exist"),
    (lambda p: p.joinpath("empty").mkdir() or p / "empty", [], "is not a model folder: it has no config.json"),
    (lambda p: _checkpoint_like(p / "ckpt"), [], "continue that run with --resume_from_checkpoint"),
    (lambda p: p.joinpath("file.bin").write_bytes(b"x") and p / "file.bin", [], "is a file, not a model folder"),
    (lambda p: _other_model(p / "bert"), [], "holds a bert model"),
    ("tiny_model_dir", ["--architecture", "clip", "--objective", "itc"], "holds a oner model; train it with --architecture oner"),
    ("tiny_model_dir", ["--revision", "v1"], "is a local folder, which has no revisions"),
])
def test_a_source_that_is_not_a_usable_model_is_refused(pairs_dir, tiny_model_dir, tmp_path, capsys,  # noqa: F811
                                                        make, extra, message):
    from oner.training import main

    source = tiny_model_dir if make == "tiny_model_dir" else make(tmp_path)
    out = tmp_path / "out"
    rc = main(tiny_args(pairs_dir, out, "--model_name_or_path", str(source), "--max_steps", "1", *extra))
    err = capsys.readouterr().err
    assert rc == 1 and message in err, err
    assert not out.exists()


def test_weights_that_do_not_cover_the_model_are_refused(pairs_dir, tiny_model_dir, tmp_path, capsys):  # noqa: F811
    from safetensors.torch import load_file, save_file

    from oner.training import main

    weights = load_file(tiny_model_dir / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "head" not in k}, tiny_model_dir / "model.safetensors",
              metadata={"format": "pt"})
    out = tmp_path / "out"
    assert main(tiny_args(pairs_dir, out, "--model_name_or_path", str(tiny_model_dir), "--max_steps", "1")) == 1
    assert "its weights do not cover the model" in capsys.readouterr().err
    assert not out.exists()


def test_revision_needs_a_model(capsys):
    from oner.training import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--revision", "v1"])
    assert exit_info.value.code == 2 and "give --model_name_or_path too" in capsys.readouterr().err


@pytest.mark.parametrize("error,message", [
    ("RepositoryNotFoundError", "there is no Hub model someone/oner-gone (or it is private or gated"),
    ("RevisionNotFoundError", "--revision v9: the Hub repository someone/oner-gone has no such branch, tag or commit"),
    ("EntryNotFoundError", "someone/oner-gone at revision v9 has no config.json"),
    ("LocalEntryNotFoundError", "cannot reach the Hub to download it"),
])
def test_hub_answers_become_clear_errors(monkeypatch, error, message):
    """Online answers of the Hub client (no network here: its download function is replaced)."""
    import huggingface_hub
    from huggingface_hub import constants, errors

    from oner.training.pretrained import SourceError, resolve_source

    cls = getattr(errors, error)

    def download(*args, **kwargs):
        raise cls.__new__(cls)  # the HTTP errors need a real response to build; the class is what is read

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(SourceError, match="someone/oner-gone") as info:
        resolve_source("someone/oner-gone", "v9")
    assert message in str(info.value)
