"""Streamed training data: brace-range shards read by two processes, killed and resumed, every sample
trained on exactly once; the same data as parquet and a save_to_disk folder; bad sources refused
before anything is written; the stream's position and augmentation independent of workers."""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY, free_port, reset_accelerate
from stream_shards import LOGGING_LAUNCHER, write_shards

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
OVERRIDES = ",".join(f"{k}={v}" for k, v in TINY.items())
BATCH = 64  # 16 shards x 320 good pairs: 40 batches per process with 2 processes, 80 with one


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from oner.data import build_embedded_dataset

    root = tmp_path_factory.mktemp("stream")
    embedded = build_embedded_dataset(root / "embedded", seed=0, progress=False, limit=40)
    keys = write_shards(root / "shards", embedded)
    return root / "shards", keys


def train_flags(data, out, *extra):
    return ["--train_data", str(data), "--output_dir", str(out), "--config_overrides", OVERRIDES,
            "--per_device_batch_size", str(BATCH), "--num_train_epochs", "1", "--max_steps", "1000",
            "--warmup_steps", "2", "--shuffle_buffer", "100", "--do_eval", "false", "--report_to", "none",
            "--logging_steps", "5", *extra]


def read_key_log(prefix: Path, process: int) -> list[dict]:
    file = Path(f"{prefix}.{process}")
    return [json.loads(line) for line in file.read_text().splitlines()] if file.is_file() else []


def assert_each_key_once(trained: list[str], keys: dict) -> None:
    assert not set(trained) & set(keys["damaged"]), "a damaged sample was trained on"
    assert len(trained) == len(set(trained)), "a sample was trained on twice"
    assert sorted(trained) == sorted(keys["good"]), f"{len(set(keys['good']) - set(trained))} samples lost"


def env(**extra):
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "OMP_NUM_THREADS": "1",
            **extra}


@pytest.mark.slow
def test_two_processes_stream_brace_shards_killed_and_resumed_each_key_once(shards, tmp_path):
    folder, keys = shards
    out, log = tmp_path / "run", tmp_path / "keys"
    launcher_script = tmp_path / "launch_logged.py"
    launcher_script.write_text(LOGGING_LAUNCHER)
    launch = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
              str(launcher_script)]
    flags = train_flags(f"{folder}/{{00000..00015}}.tar", out, "--checkpointing_steps", "10")

    # 1. killed with SIGKILL (the whole launch) once process 0 has trained step 25: checkpoint-20 survives.
    killed = subprocess.run(launch + flags, env=env(KEY_LOG=f"{log}-killed", KILL_AT_STEP="25"),
                            capture_output=True, text=True, start_new_session=True, timeout=300)
    assert killed.returncode != 0, "the run was meant to be killed"
    checkpoints = sorted((out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert checkpoints and checkpoints[-1].name == "checkpoint-20", killed.stderr[-3000:]
    assert (checkpoints[-1] / "process_state_0.pt").is_file() and (checkpoints[-1] / "process_state_1.pt").is_file()

    # 2. the same command again resumes: the epoch ends after 40 steps in all.
    launch[launch.index("--main_process_port") + 1] = str(free_port())
    resumed = subprocess.run(launch + flags, env=env(KEY_LOG=f"{log}-resumed"),
                             capture_output=True, text=True, start_new_session=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Checkpoint detected" in resumed.stdout and "resumed from" in resumed.stdout
    assert "2 process(es)" in resumed.stdout

    trained = []
    for process in (0, 1):
        before = read_key_log(Path(f"{log}-killed"), process)
        after = read_key_log(Path(f"{log}-resumed"), process)
        assert len(before) >= 20 and len(after) == 20 and all(r["finite"] for r in before + after)
        # The steps after checkpoint-20 died with the run: the resumed run trains them again.
        trained += [k for r in before[:20] + after for k in r["keys"]]
    assert_each_key_once(trained, keys)
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 40 and summary["streamed"] is True and summary["global_batch_size"] == 2 * BATCH
    # The whole epoch's counts: checkpoint-20's, restored, and the resumed run's, over both processes.
    stats = summary["data_stats"]
    assert (stats["ok"], stats["truncated"], stats["empty_caption"]) == (len(keys["good"]), 16, 16)


@pytest.mark.slow
def test_two_process_stream_resumes_at_an_epoch_boundary_and_mid_epoch_to_the_same_run(shards, tmp_path):
    """8 shards of 40 good + 2 damaged pairs, 2 processes of 8 pairs a step: 20 steps an epoch. Resumed
    from checkpoint-20 (the end of epoch 1: the stream has nothing left of it) and from checkpoint-15,
    both end on the uninterrupted run's weights and summary: 30 steps, and the data counts of the
    whole run (restored from the checkpoint, summed over processes)."""
    from safetensors.torch import load_file

    folder = shards[0].parent / "small"
    write_shards(folder, shards[0].parent / "embedded", n_shards=8, per_shard=40)

    def launch(out, *extra):
        command = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
                   str(REPO / "train.py"), "--train_data", f"{folder}/{{00000..00007}}.tar", "--output_dir", str(out),
                   "--config_overrides", OVERRIDES, "--per_device_batch_size", "8", "--max_steps", "30",
                   "--checkpointing_steps", "5", "--checkpoints_total_limit", "10", "--warmup_steps", "2",
                   "--shuffle_buffer", "20", "--do_eval", "false", "--report_to", "none", "--logging_steps", "5",
                   *extra]
        result = subprocess.run(command, env=env(), capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        return json.loads((out / "training_summary.json").read_text()), load_file(out / "model.safetensors")

    whole_summary, whole = launch(tmp_path / "whole")
    assert whole_summary["steps"] == 30 and whole_summary["data_stats"]["ok"] == 30 * 16
    # epoch 1 read whole (its 16 damaged samples), then 10 steps of epoch 2
    assert whole_summary["data_stats"]["truncated"] >= 8 and whole_summary["data_stats"]["empty_caption"] >= 8
    checkpoints = tmp_path / "whole" / "checkpoints"
    assert json.loads((checkpoints / "checkpoint-20" / "train_state.json").read_text())["epoch"] == 0
    for step in (20, 15):
        summary, weights = launch(tmp_path / f"from-{step}", "--resume_from_checkpoint", str(checkpoints / f"checkpoint-{step}"))
        assert {k: summary[k] for k in ("steps", "data_stats")} == {k: whole_summary[k] for k in ("steps", "data_stats")}
        for name in whole:
            assert torch.equal(whole[name], weights[name]), (step, name)


def _logged_run(monkeypatch, tmp_path, data, *extra) -> tuple[int, list[str], dict]:
    """train.py in this process on `data` for one epoch; the sample keys of every trained step."""
    import oner.training.loop as loop

    reset_accelerate()
    trained = []
    real_step = loop.optimisation_step

    def logged(pretrainer, objective, micro_batches, *args, **kwargs):
        trained.extend(k for b in micro_batches for k in b["sample_keys"])
        return real_step(pretrainer, objective, micro_batches, *args, **kwargs)

    monkeypatch.setattr(loop, "optimisation_step", logged)
    out = tmp_path / "out"
    status = loop.main(train_flags(data, out, "--checkpointing_steps", "0", *extra))
    summary = json.loads((out / "training_summary.json").read_text()) if status == 0 else {}
    return status, trained, summary


def _rows(folder: Path) -> list[dict]:
    """The shards' rows as `{"key", "image": {"bytes"}, "text"}` (what a parquet export holds)."""
    import datasets

    files = sorted(str(p) for p in folder.glob("*.tar"))
    table = datasets.load_dataset("webdataset", data_files={"train": files}, split="train")
    table = table.cast_column("png", datasets.Image(decode=False))
    return [{"key": r["__key__"], "image": {"bytes": r["png"]["bytes"], "path": None}, "text": r["txt"]} for r in table]


@pytest.mark.slow
def test_parquet_shards_and_saved_folder_stream_each_key_once(shards, tmp_path, monkeypatch):
    import datasets

    folder, keys = shards
    rows = _rows(folder)
    features = datasets.Features({"key": datasets.Value("string"), "image": datasets.Image(),
                                  "text": datasets.Value("string")})
    parquet = tmp_path / "parquet"
    parquet.mkdir()
    for part in range(4):
        datasets.Dataset.from_list(rows[part::4], features=features).to_parquet(str(parquet / f"part-{part}.parquet"))
    status, trained, summary = _logged_run(monkeypatch, tmp_path / "p", str(parquet / "part-{0..3}.parquet"))
    assert status == 0 and summary["streamed"] is True
    assert_each_key_once(trained, keys)
    assert summary["data_stats"]["truncated"] == 16 and summary["data_stats"]["empty_caption"] == 16

    saved = tmp_path / "saved"
    datasets.Dataset.from_list(rows, features=features).save_to_disk(str(saved))
    status, trained, summary = _logged_run(monkeypatch, tmp_path / "s", saved, "--streaming", "true")
    assert status == 0 and summary["streamed"] is True
    assert_each_key_once(trained, keys)


def _bad_run(tmp_path, *flags) -> tuple[int, str]:
    from oner.training import main

    reset_accelerate()
    out = tmp_path / "never"
    status = main(["--output_dir", str(out), "--config_overrides", OVERRIDES, "--do_eval", "false",
                   "--report_to", "none", *flags])
    assert not out.exists(), "nothing may be written for bad input"
    return status


@pytest.mark.parametrize("source, message", [
    ("{folder}/{{00020..00023}}.tar", "4 of 4 shards do not exist"),
    ("{folder}/*.tgz", "matches no file"),
    ("{folder}/{{00000..00001.tar", "unbalanced braces"),
    ("someone/some-web-dataset", "cannot be reached offline"),
])
def test_bad_stream_sources_fail_before_training(shards, tmp_path, capsys, source, message):
    folder, _ = shards
    assert _bad_run(tmp_path, "--train_data", source.format(folder=folder)) == 1
    assert message in capsys.readouterr().err


def test_parquet_without_the_named_columns_fails_before_training(tmp_path, capsys):
    import datasets

    datasets.Dataset.from_dict({"photo": [b"x"], "caption": ["a cat"]}).to_parquet(str(tmp_path / "p.parquet"))
    assert _bad_run(tmp_path, "--train_data", str(tmp_path / "p.parquet"), "--image_column", "image") == 1
    assert "image column 'image' not found; columns found: ['photo', 'caption']" in capsys.readouterr().err


def test_epochs_of_a_stream_need_a_step_count(shards, tmp_path, capsys):
    folder, _ = shards
    assert _bad_run(tmp_path, "--train_data", str(folder), "--num_train_epochs", "1") == 1
    assert "give --max_steps too" in capsys.readouterr().err


def test_hub_dataset_config_and_revision_reach_datasets(monkeypatch):
    import datasets

    from oner.data import load_image_text_dataset

    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        return datasets.Dataset.from_dict({"image": [b"x"], "text": ["a cat"]})

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    load_image_text_dataset("someone/pairs", config_name="en", revision="v1.0")
    assert calls == [("someone/pairs", "en", {"split": "train", "revision": "v1.0", "streaming": True})]


# --------------------------------------------------------------------------- StreamingPairs itself


def _stream(folder, buffer_size=50, workers_seed=0):
    from types import SimpleNamespace

    from oner.training.data import open_train_data

    args = SimpleNamespace(train_data=str(folder), image_column=None, text_column=None, streaming=None,
                           dataset_config_name=None, dataset_revision=None, image_augment=True, text_augment=True,
                           caption_mask_probability=0.3, train_filter=None, max_train_samples=None,
                           shuffle_buffer=buffer_size, augment_backend="pil")  # PIL samples: an "image" each
    return open_train_data(args, seed=workers_seed, image_size=16)


def test_stream_state_mid_epoch_resumes_exactly(shards):
    folder, _ = shards
    whole = [s["key"] for s in _stream(folder)]
    first = _stream(folder)
    iterator = iter(first)
    head = [next(iterator)["key"] for _ in range(700)]
    state = first.state_dict()
    assert len(state["buffer"]) == 50
    again = _stream(folder)
    again.load_state_dict(state)
    assert head + [s["key"] for s in again] == whole
    assert len(whole) == 5120 and len(set(whole)) == 5120


def test_augmentation_does_not_depend_on_loader_workers(shards):
    folder, _ = shards

    def samples(workers: int) -> dict:
        stream = _stream(f"{folder}/{{00000..00001}}.tar")  # 2 shards: one per worker
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
        return {s["key"]: (np.asarray(s["image"]), s["text"]) for s in loader}

    alone, two = samples(0), samples(2)
    assert alone.keys() == two.keys() and len(alone) == 640
    for key in alone:
        assert np.array_equal(alone[key][0], two[key][0]) and alone[key][1] == two[key][1], key


def test_the_cc3m_config_streams_its_shards_as_written(tmp_path, monkeypatch):
    """configs/base-patch16-224-cc3m.yaml's own brace range, rooted in a temporary folder."""
    from oner.training import parse_args
    from oner.training.data import StreamingPairs, open_train_data

    args = parse_args(["--config", str(REPO / "configs" / "base-patch16-224-cc3m.yaml")])
    assert args.train_data == "/data/cc3m/{00000..00331}.tar" and args.max_steps and args.num_train_epochs
    import io
    import tarfile

    folder = tmp_path / "data" / "cc3m"
    folder.mkdir(parents=True)
    for shard in range(332):  # one unread sample each: only the shard list matters here
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for ext, data in (("jpg", b"not decoded here"), ("txt", b"a caption")):
                info = tarfile.TarInfo(f"{shard:05d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    args.train_data = str(tmp_path) + args.train_data
    stream = open_train_data(args, seed=0, image_size=16, rank=1, world_size=4)
    assert isinstance(stream, StreamingPairs)
    assert stream.source.hf_dataset.n_shards == 83  # 332 shards over 4 processes, whole shards each


def test_stream_position_inside_loader_workers_resumes_exactly(shards):
    """Two loader workers, each with its own buffer and position, through StatefulDataLoader."""
    from modeling_oner import OneRConfig
    from processing_oner import build_processor

    from oner.training.data import make_stream_loader

    folder, _ = shards
    processor = build_processor(OneRConfig.from_preset("tiny", **TINY))

    def loader():
        return make_stream_loader(_stream(f"{folder}/{{00000..00003}}.tar"), processor, batch_size=32, num_workers=2)

    def keys(batches, n=None):
        return [tuple(b["sample_keys"]) for b in itertools.islice(batches, n)]

    whole = keys(loader())
    first = loader()
    head = keys(first, 7)
    again = loader()
    again.load_state_dict(first.state_dict())
    assert head + keys(again) == whole and len(whole) == 40  # 1280 pairs, none lost or repeated


@pytest.mark.slow
def test_stream_resumed_mid_epoch_ends_on_the_weights_of_an_uninterrupted_run(shards, tmp_path, monkeypatch):
    """Position, shuffle buffer, augmentation and the objectives' randomness all continue exactly."""
    from safetensors.torch import load_file

    import oner.training.loop as loop

    folder, _ = shards
    data = f"{folder}/{{00000..00003}}.tar"
    flags = ["--max_steps", "12", "--checkpointing_steps", "5", "--per_device_batch_size", "32"]

    def run(out, *extra, stop_after=None):
        reset_accelerate()
        real_step, steps = loop.optimisation_step, []

        def step(*args, **kwargs):
            if stop_after is not None and len(steps) == stop_after:
                raise KeyboardInterrupt  # the crash, after checkpoint-5, before step 7's update
            steps.append(1)
            return real_step(*args, **kwargs)

        monkeypatch.setattr(loop, "optimisation_step", step)
        try:
            return loop.main(train_flags(data, out, *flags, *extra))
        except KeyboardInterrupt:
            return None
        finally:
            monkeypatch.setattr(loop, "optimisation_step", real_step)

    assert run(tmp_path / "whole") == 0
    assert run(tmp_path / "cut", stop_after=6) is None
    assert run(tmp_path / "cut", "--resume_from_checkpoint", "latest") == 0
    whole, cut = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    for name in whole:
        assert torch.equal(whole[name], cut[name]), name


def test_a_finished_stream_relaunched_trains_nothing_more(shards, tmp_path, capsys):
    """Ended by its epochs between checkpoints: the final checkpoint holds the epoch after the last."""
    from safetensors.torch import load_file

    from oner.training import main

    folder, _ = shards
    out = tmp_path / "run"
    flags = train_flags(f"{folder}/{{00000..00001}}.tar", out, "--checkpointing_steps", "7")  # 10 steps an epoch
    reset_accelerate()
    assert main(flags) == 0
    before = (json.loads((out / "training_summary.json").read_text()), load_file(out / "model.safetensors"))
    assert before[0]["steps"] == 10
    reset_accelerate()
    assert main(flags) == 0
    assert "training is complete at step 10 (all epochs done)" in capsys.readouterr().out
    summary, weights = json.loads((out / "training_summary.json").read_text()), load_file(out / "model.safetensors")
    assert summary["steps"] == 10 and summary["data_stats"] == before[0]["data_stats"]
    assert all(torch.equal(weights[k], before[1][k]) for k in weights)


def test_each_epoch_reads_the_shards_in_a_new_order(shards):
    folder, _ = shards

    def first_shards(epoch: int) -> list[str]:
        stream = _stream(folder)
        stream.set_epoch(epoch)
        return sorted({s["key"][:5] for s in itertools.islice(stream, 300)})

    orders = [first_shards(epoch) for epoch in range(3)]
    assert orders[0] != orders[1] and orders[1] != orders[2]
    assert first_shards(1) == orders[1]  # and the same order again for the same (seed, epoch)
