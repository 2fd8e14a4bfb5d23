"""train.py's machinery: flags, feature-cached accumulation, NaN guard, bad input, relaunches, evaluation during
training, CLIP baseline."""

import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import TINY, reset_accelerate

OVERRIDES = ",".join(f"{k}={v}" for k, v in TINY.items())
REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    """A 48-pair imagefolder of coloured shapes (metadata.jsonl with file_name + text)."""
    root = tmp_path_factory.mktemp("pairs")
    colours = ["red", "green", "blue", "yellow", "black", "purple", "orange", "pink"]
    shapes = ["square", "circle", "bar", "dot", "frame", "cross"]
    rows = []
    for i, (c, s) in enumerate((c, s) for c in colours for s in shapes):
        image = Image.new("RGB", (24, 24), "white")
        from PIL import ImageDraw

        draw = ImageDraw.Draw(image)
        box = [(4, 4, 20, 20), (6, 6, 18, 18), (2, 10, 22, 14), (10, 10, 14, 14), (2, 2, 22, 22), (10, 2, 14, 22)]
        (draw.ellipse if s in ("circle", "dot") else draw.rectangle)(box[shapes.index(s)], outline=c, fill=c if s != "frame" else None)
        image.save(root / f"{i:03d}.png")
        rows.append({"file_name": f"{i:03d}.png", "text": f"a {c} {s}"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def tiny_args(data, out, *extra):
    return ["--train_data", str(data), "--output_dir", str(out), "--config_overrides", OVERRIDES,
            "--per_device_batch_size", "8", "--warmup_steps", "2", "--logging_steps", "1", "--do_eval", "false",
            "--report_to", "none", "--dataloader_num_workers", "0", *extra]


# --------------------------------------------------------------------------- flags


def test_no_arguments_is_the_tiny_embedded_config():
    from oner.training import parse_args

    default = vars(parse_args([]))
    from_file = vars(parse_args(["--config", str(REPO / "configs" / "tiny-embedded.yaml")]))
    from_file.pop("config")
    default.pop("config")
    assert default.pop("explicit_flags") == []  # what was given differs (the file gives every key); the values do not
    assert "preset" in from_file.pop("explicit_flags")
    assert default == from_file
    assert default["preset"] == "tiny" and default["train_data"] == "embedded"
    assert default["max_steps"] == 2600 and default["max_train_minutes"] is None and default["objective"] == "xmc+cmc+quad:0.25"
    assert (default["xmc_form"], default["cmc_context"], default["cmc_fraction"]) == ("cross-pair", "mosaic", 0.5)


def test_the_default_step_count_gives_way_to_a_budget_or_epochs_the_user_gives(tmp_path):
    from oner.training import parse_args

    assert parse_args(["--max_train_minutes", "5"]).max_steps is None  # a time budget sets the schedule
    assert parse_args(["--num_train_epochs", "2"]).max_steps is None
    assert parse_args(["--epochs", "2"]).max_steps is None  # open_clip's name for it, too
    assert parse_args(["--max-train-minutes", "2"]).max_steps is None  # and the hyphenated spelling
    both = parse_args(["--max_train_minutes", "5", "--max_steps", "100"])
    assert (both.max_steps, both.max_train_minutes) == (100, 5)  # both given: whichever ends first
    config = tmp_path / "budget.yaml"
    config.write_text("max_train_minutes: 3\n")
    assert parse_args(["--config", str(config)]).max_steps is None


def test_paper_config_parses():
    from oner.training import parse_args

    args = parse_args(["--config", str(REPO / "configs" / "base-patch16-224-cc3m.yaml")])
    assert args.preset == "base-patch16-224" and args.mixed_precision == "bf16" and args.num_train_epochs == 40
    assert (args.eval_strategy, args.eval_steps, args.eval_suites_max_items) == ("steps", 1000, 500)
    assert parse_args([]).eval_strategy == "no"  # the default run does not evaluate while it trains
    assert parse_args(["--eval_strategy", "steps", "--logging_steps", "7"]).eval_steps == 7  # the Trainer's default


def test_flags_override_the_config_file(tmp_path):
    from oner.objectives import ObjectiveConfig
    from oner.training import parse_args

    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"learning_rate": 0.01, "objective": "itc"}))
    args = parse_args(["--config", str(cfg), "--objective", "xmc:2+cic"])
    assert args.learning_rate == 0.01 and ObjectiveConfig.from_flags(args).weights == {"xmc": 2.0, "cic": 1.0}


@pytest.mark.parametrize("argv,message", [
    (["--no_such_flag"], "unrecognized arguments"),
    (["--objective", "xmc+nope"], "unknown objective term 'nope'"),
    (["--architecture", "clip", "--objective", "xmc"], "ITC only"),
    (["--architecture", "clip", "--objective", "itc", "--pairwise_loss", "sigmoid"], "no logit bias to save"),
    (["--architecture", "clip", "--objective", "itc", "--momentum", "0.9"], "trains ITC only"),
    (["--config_overrides", "hidden_sise=3"], "known OneRConfig field"),
    (["--push_to_hub", "--hub_model_id", "not a/valid/id"], "invalid --hub_model_id"),
    (["--push_to_hub", "--hub_model_id", "someone/oner-tiny"], "no Hugging Face token"),
    (["--overwrite_output_dir", "--resume_from_checkpoint", "latest"], "give one of them"),
    (["--eval_steps", "0"], "--eval_steps must be >= 1"),
    (["--eval_strategy", "epoch", "--eval_steps", "5"], "needs --eval_strategy steps"),
    (["--eval_steps", "5", "--eval_suites", "retrieval_openmoji,nope"], "unknown suite 'nope'"),
    (["--torch_compile", "--torch_compile_backend", "nope"], "--torch_compile_backend 'nope': expected one of"),
])
def test_bad_flags_exit_with_one_message(capsys, monkeypatch, argv, message):
    from oner.training import parse_args

    monkeypatch.delenv("HF_TOKEN", raising=False)  # and HF_HOME is a fresh folder: no saved login

    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_unknown_config_key(tmp_path, capsys):
    from oner.training import parse_args

    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rate: 0.1\nlearnig_rate: 0.2\n")
    with pytest.raises(SystemExit):
        parse_args(["--config", str(cfg)])
    assert "unknown keys ['learnig_rate']" in capsys.readouterr().err


# --------------------------------------------------------------------------- accumulation


def _micro_batches(tiny_processor, n=8):
    texts = ["a red apple", "green frog", "blue whale spouting", "snowman", "hot pepper", "bee", "grapes", "fire engine"]
    g = torch.Generator().manual_seed(0)
    images = [Image.fromarray((torch.rand(20, 20, 3, generator=g) * 255).byte().numpy()) for _ in range(n)]
    return dict(tiny_processor(text=texts[:n], images=images, return_tensors="pt"))


@pytest.mark.parametrize("objective,kind", [("itc+xmc+cic+cmc+mlm:0.5", "softmax"), ("xmc+cmc", "sigmoid")])
def test_feature_cached_accumulation_equals_one_big_batch(tiny_config, tiny_processor, objective, kind):
    from accelerate import Accelerator
    from modeling_oner import OneRModel
    from oner.objectives import Objective, ObjectiveConfig, parse_objective
    from oner.training.mlm import subword_table, whole_word_mask
    from oner.training.pretrainer import OneRPretrainer
    from oner.training.step import forward_backward

    accelerator = Accelerator(cpu=True)
    big = _micro_batches(tiny_processor)
    # CMC on every row of its own pair: the rows a fraction picks and the images a mosaic borrows are
    # those of each micro-batch, which differ from the big batch's by design (the next test: a fraction).
    config = ObjectiveConfig(weights=parse_objective(objective), pairwise=kind, cmc_context="pair", cmc_fraction=1.0,
                             xmc_form="cross-pair" if kind == "softmax" else "same-pair")
    for name, value in config.model_settings.items():  # the sigmoid loss's bias, as train.py builds the model
        setattr(tiny_config, name, value)
    if "mlm" in config.weights:
        torch.manual_seed(3)
        big["mlm_input_ids"], big["mlm_labels"] = whole_word_mask(
            big["input_ids"], big["attention_mask"], subword_table(tiny_processor.tokenizer), 103, 0.3)

    def run(parts):
        torch.manual_seed(0)
        pretrainer = OneRPretrainer(OneRModel(tiny_config), config).train()
        micro = [{k: v[i::parts] if False else v[i * (8 // parts):(i + 1) * (8 // parts)] for k, v in big.items()}
                 for i in range(parts)]
        loss, terms = forward_backward(pretrainer, Objective(config), micro, accelerator)
        grads = {n: p.grad.clone() for n, p in pretrainer.named_parameters() if p.grad is not None}
        return loss, terms, grads

    loss1, terms1, grads1 = run(1)
    loss4, terms4, grads4 = run(4)  # 4 micro-batches of 2: each still sees all 8 pairs as negatives
    assert torch.allclose(loss1, loss4, atol=1e-5)
    assert set(terms1) == set(terms4)
    assert set(grads1) == set(grads4)
    for name in grads1:
        assert torch.allclose(grads1[name], grads4[name], atol=1e-5, rtol=1e-4), name


# --------------------------------------------------------------------------- runs in process


def nan_losses_on(monkeypatch, attempts: set[int]) -> None:
    """Make the objective's loss NaN on these attempted steps (1-based; one objective call a step)."""
    from oner.objectives import Objective

    real_call, calls = Objective.__call__, []

    def call(self, *args, **kwargs):
        calls.append(1)
        loss, parts = real_call(self, *args, **kwargs)
        return (loss * float("nan"), parts) if len(calls) in attempts else (loss, parts)

    monkeypatch.setattr(Objective, "__call__", call)


def test_nan_steps_are_skipped_and_never_checkpointed(pairs_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from oner.training import main

    out = tmp_path / "run"
    nan_losses_on(monkeypatch, {3})
    rc = main(tiny_args(pairs_dir, out, "--max_steps", "6", "--checkpointing_steps", "3"))
    assert rc == 0
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 6 and summary["skipped_steps"] == 1
    assert all(torch.isfinite(t).all() for t in load_file(out / "model.safetensors").values())

    out = tmp_path / "stops"
    nan_losses_on(monkeypatch, {3, 4, 5})
    rc = main(tiny_args(pairs_dir, out, "--max_steps", "8", "--max_nonfinite_steps", "3", "--checkpointing_steps", "2"))
    assert rc == 3
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-2"]  # nothing saved after the NaN steps began
    state = json.loads((out / "checkpoints" / "checkpoint-2" / "train_state.json").read_text())
    assert state["step"] == 2
    weights = load_file(out / "checkpoints" / "checkpoint-2" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert not (out / "model.safetensors").exists()


def test_missing_data_path_fails_cleanly(tmp_path, capsys):
    from oner.training import main

    out = tmp_path / "never"
    assert main(tiny_args(tmp_path / "nope", out, "--max_steps", "2")) == 1
    assert "does not exist" in capsys.readouterr().err
    assert not out.exists()


def test_empty_folder_and_missing_text_column(tmp_path, capsys):
    from oner.training import main

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(tiny_args(empty, tmp_path / "o1", "--max_steps", "2")) == 1
    assert "empty" in capsys.readouterr().err
    no_text = tmp_path / "no_text"
    no_text.mkdir()
    Image.new("RGB", (8, 8)).save(no_text / "a.png")
    (no_text / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "label": 3}) + "\n")
    assert main(tiny_args(no_text, tmp_path / "o2", "--max_steps", "2")) == 1
    assert "no text column" in capsys.readouterr().err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_damaged_resume_folder_fails_cleanly(pairs_dir, tmp_path, capsys):
    from oner.training import main

    out = tmp_path / "run"
    assert main(tiny_args(pairs_dir, out, "--max_steps", "2", "--checkpointing_steps", "2")) == 0
    log_before = (out / "training_log.jsonl").read_text()
    assert main(tiny_args(pairs_dir, out, "--max_steps", "4", "--resume_from_checkpoint", str(tmp_path / "x"))) == 1
    assert "no such folder" in capsys.readouterr().err
    checkpoint = out / "checkpoints" / "checkpoint-2"
    (checkpoint / "model.safetensors").write_bytes(b"")  # truncated weights
    assert main(tiny_args(pairs_dir, out, "--max_steps", "4", "--resume_from_checkpoint", "latest")) == 1
    assert "damaged" in capsys.readouterr().err
    (checkpoint / "train_state.json").unlink()
    assert main(tiny_args(pairs_dir, out, "--max_steps", "4", "--resume_from_checkpoint", str(checkpoint))) == 1
    assert "train_state.json is missing" in capsys.readouterr().err
    assert (out / "training_log.jsonl").read_text() == log_before  # nothing overwritten


def test_resume_with_other_settings_is_refused(pairs_dir, tmp_path, capsys):
    from oner.training import main

    out = tmp_path / "run"
    assert main(tiny_args(pairs_dir, out, "--max_steps", "2", "--checkpointing_steps", "2")) == 0
    rc = main(tiny_args(pairs_dir, out, "--max_steps", "4", "--objective", "itc", "--resume_from_checkpoint", "latest"))
    assert rc == 1 and "settings differ" in capsys.readouterr().err


def test_a_resume_may_extend_max_steps(pairs_dir, tmp_path):
    from oner.training import main

    out = tmp_path / "run"
    assert main(tiny_args(pairs_dir, out, "--max_steps", "2", "--checkpointing_steps", "2")) == 0
    assert main(tiny_args(pairs_dir, out, "--max_steps", "5", "--resume_from_checkpoint", "latest")) == 0
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 5  # the schedule is this run's, not the checkpoint's


def crash_on_step(monkeypatch, attempt: int):
    """`optimisation_step` raises KeyboardInterrupt on this attempt (1-based): a crash or a pre-emption,
    after the checkpoints before it. Returns a function that undoes it."""
    import oner.training.loop as loop

    real_step, calls = loop.optimisation_step, []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == attempt:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "optimisation_step", step)
    return lambda: monkeypatch.setattr(loop, "optimisation_step", real_step)


@pytest.mark.parametrize("backend", ["pil", "tensor"])
def test_a_relaunch_continues_from_the_latest_checkpoint(pairs_dir, tmp_path, monkeypatch, capsys, backend):
    """The SAME command after a crash resumes (no flag needed) and ends on the uninterrupted run's
    weights and summary (steps and data counts); relaunched once finished it trains nothing more;
    --overwrite_output_dir starts over; other settings are refused, and nothing is deleted."""
    from safetensors.torch import load_file

    from oner.training import main

    # 6 batches per epoch: the crash at step 5 resumes from checkpoint-3, mid-epoch, and crosses an epoch.
    flags = ("--max_steps", "7", "--checkpointing_steps", "3", "--objective", "xmc+cmc+mlm:0.2",
             "--augment_backend", backend)  # each augmentation backend resumes exactly
    whole, out = tmp_path / "whole", tmp_path / "run"
    assert main(tiny_args(pairs_dir, whole, *flags)) == 0
    undo = crash_on_step(monkeypatch, 5)
    reset_accelerate()
    with pytest.raises(KeyboardInterrupt):
        main(tiny_args(pairs_dir, out, *flags))
    undo()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-3"]
    capsys.readouterr()

    def relaunch(*extra):
        reset_accelerate()
        return main(tiny_args(pairs_dir, out, *flags, *extra))

    def summary(folder):
        return json.loads((folder / "training_summary.json").read_text())

    def assert_like_whole():
        a, b = load_file(whole / "model.safetensors"), load_file(out / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        for key in ("steps", "data_stats", "final_loss"):
            assert summary(out)[key] == summary(whole)[key], key
        assert [r["step"] for r in log(out)] == list(range(1, 8))

    assert relaunch() == 0
    printed = capsys.readouterr().out
    assert "Checkpoint detected, resuming training at" in printed and "at step 3" in printed
    assert_like_whole()
    assert summary(out)["data_stats"]["ok"] == 7 * 8  # the pairs of 7 steps, none counted twice

    # Finished: the same command again trains nothing and writes the same folder.
    assert relaunch() == 0
    assert "training is complete at step 7" in capsys.readouterr().out
    assert_like_whole()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-6", "checkpoint-7"]

    # Other settings: refused, nothing deleted.
    assert relaunch("--objective", "itc") == 1
    err = capsys.readouterr().err
    assert "settings differ" in err and "found in --output_dir" in err and "--overwrite_output_dir" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-6", "checkpoint-7"]

    # --overwrite_output_dir: a fresh run, the old checkpoints gone.
    assert relaunch("--overwrite_output_dir", "--max_steps", "2", "--objective", "itc") == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2"]
    assert summary(out)["steps"] == 2 and [r["step"] for r in log(out)] == [1, 2]


def test_a_finished_run_without_checkpoints_is_not_trained_again_silently(pairs_dir, tmp_path, capsys):
    from conftest import reset_accelerate
    from oner.training import main

    out = tmp_path / "run"
    assert main(tiny_args(pairs_dir, out, "--max_steps", "2", "--checkpointing_steps", "0")) == 0
    weights = (out / "model.safetensors").read_bytes()
    reset_accelerate()
    assert main(tiny_args(pairs_dir, out, "--max_steps", "2", "--checkpointing_steps", "0")) == 1
    assert "holds a finished training run and no checkpoint" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == weights
    reset_accelerate()
    assert main(tiny_args(pairs_dir, out, "--max_steps", "3", "--checkpointing_steps", "0",
                          "--overwrite_output_dir")) == 0


EVAL_FLAGS = ("--eval_steps", "2", "--eval_suites", "retrieval_twemoji,pointing_game", "--eval_suites_max_items", "12")


def eval_records(folder: Path) -> dict[int, dict]:
    """The evaluations during training in the training log, by step, without their duration."""
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("eval/")} for r in log(folder) if "eval_seconds" in r}


def benchmark_as_logged(model_dir: Path, out: Path) -> dict:
    """`run_benchmark` on a folder, with the evaluation during training's suites and cap, as logged."""
    from oner.evaluation import is_metric, run_benchmark

    results = run_benchmark(model_dir, suites=EVAL_FLAGS[3].split(","), max_items=int(EVAL_FLAGS[5]),
                            output_dir=out, progress=False)
    return {f"eval/{suite}/{k}": v for suite, values in results.items() if suite != "_meta"
            for k, v in values.items() if is_metric(k)}


def test_evaluation_during_training_changes_no_weight_and_logs_what_oner_eval_finds(pairs_dir, tmp_path, monkeypatch,
                                                                                    capsys):
    from safetensors.torch import load_file

    from conftest import reset_accelerate
    from oner.data import build_embedded_dataset
    from oner.training import main

    import oner.training.eval_during_training as during

    monkeypatch.setenv("ONER_DATA_HOME", str(build_embedded_dataset(tmp_path / "embedded", limit=40, progress=False)))
    flags = ("--max_steps", "4", "--checkpointing_steps", "0", "--objective", "xmc+cmc+mlm:0.2")
    assert main(tiny_args(pairs_dir, tmp_path / "off", *flags)) == 0
    reset_accelerate()
    real_evaluate = during.evaluate

    def slow_evaluate(*args, **kwargs):  # 4 s more: none of it may count as training time
        time.sleep(4)
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(during, "evaluate", slow_evaluate)
    assert main(tiny_args(pairs_dir, tmp_path / "on", *flags, *EVAL_FLAGS)) == 0
    assert "evaluation at step 2" in capsys.readouterr().out
    off, on = load_file(tmp_path / "off" / "model.safetensors"), load_file(tmp_path / "on" / "model.safetensors")
    assert all(torch.equal(off[k], on[k]) for k in off)  # the RNG and the model are as without evaluation
    logged = eval_records(tmp_path / "on")
    assert sorted(logged) == [2, 4] and logged[2] != logged[4]
    clock = {r["step"]: r["elapsed_s"] for r in log(tmp_path / "on") if "loss" in r}
    assert clock[3] - clock[2] < 3 and all(r["eval_seconds"] >= 4 for r in log(tmp_path / "on") if "eval_seconds" in r)
    assert logged[4] == benchmark_as_logged(tmp_path / "on", tmp_path / "eval")
    summary = json.loads((tmp_path / "on" / "training_summary.json").read_text())
    assert summary["final_loss"] == json.loads((tmp_path / "off" / "training_summary.json").read_text())["final_loss"]


def log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "training_log.jsonl").read_text().splitlines()]


def test_clip_baseline_trains_and_loads(pairs_dir, tmp_path):
    from transformers import AutoModel, AutoProcessor

    from oner.training import main

    out = tmp_path / "clip"
    clip = ("--architecture", "clip", "--objective", "itc", "--checkpointing_steps", "2", "--gradient_checkpointing")
    assert main(tiny_args(pairs_dir, out, *clip, "--max_steps", "2")) == 0
    # The adapter's CLIPModel weights go into the checkpoint and come back from it.
    rc = main(tiny_args(pairs_dir, out, *clip, "--max_steps", "4", "--resume_from_checkpoint", "latest"))
    assert rc == 0
    log = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in log]  # the resumed run continues from step 2
    assert steps[:3] == [1, 2, 3] and steps == list(range(1, len(steps) + 1)) and all(r["loss"] > 0 for r in log)
    model, processor = AutoModel.from_pretrained(out), AutoProcessor.from_pretrained(out)
    assert type(model).__name__ == "CLIPModel"
    assert model.config.vision_config.hidden_size == TINY["hidden_size"] == model.config.text_config.hidden_size
    inputs = processor(text=["a red square"], images=[Image.new("RGB", (30, 30), "red")], return_tensors="pt")
    assert inputs["input_ids"][0, -1].item() == model.config.text_config.eos_token_id  # [SEP] appended
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits_per_image).all()


def test_oner_run_writes_the_folder(pairs_dir, tmp_path, monkeypatch, capsys):
    from transformers import AutoModel

    from oner.training import main, runtime

    # as on a CPU without native bf16: the compute line warns instead of training slowly in silence
    monkeypatch.setattr(runtime, "matmul_speedup", lambda dtype: 0.08)
    out = tmp_path / "oner"
    rc = main(tiny_args(pairs_dir, out, "--max_steps", "3", "--checkpointing_steps", "0", "--objective",
                        "xmc+cmc+mlm:0.2", "--accum_freq", "2", "--mixed_precision", "bf16",
                        "--gradient_checkpointing"))
    assert rc == 0
    printed = capsys.readouterr().out
    assert "compute: WARNING: bf16 matrix products run at 0.08x the fp32 speed" in printed
    if sys.platform.startswith("linux") and not any(k.startswith("MALLOC_") for k in os.environ):
        assert "malloc keeps up to 1024 MiB of freed memory" in printed  # oner.training.runtime.keep_freed_memory
    for name in ("model.safetensors", "config.json", "modeling_oner.py", "loss_curve.png", "training_log.jsonl",
                 "training_summary.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    model = AutoModel.from_pretrained(out, trust_remote_code=True)
    assert 0 <= model.logit_scale.item() <= 4.6052


@pytest.mark.parametrize("how", ["--torch_compile", "accelerate's dynamo setting"])
def test_a_compiled_run_saves_the_plain_model(pairs_dir, tmp_path, monkeypatch, capsys, how):
    """torch.compile wraps the pretrainer (its state-dict keys gain `_orig_mod.`); the folder holds the
    plain model, every weight under its own name. The `eager` backend traces without generating code."""
    from transformers import AutoModel

    from oner.training import main

    flags = ["--torch_compile", "--torch_compile_backend", "eager"] if how == "--torch_compile" else []
    if how != "--torch_compile":
        monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "eager")  # what `accelerate launch --dynamo_backend` sets
    out = tmp_path / "compiled"
    assert main(tiny_args(pairs_dir, out, "--max_steps", "2", "--checkpointing_steps", "2", *flags)) == 0
    printed = capsys.readouterr().out
    kind = "regional: one transformer layer compiled" if flags else "the whole training pass"
    assert f"torch.compile eager ({kind}" in printed and f"; {how};" in printed
    model, info = AutoModel.from_pretrained(out, trust_remote_code=True, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weight

    monkeypatch.delenv("ACCELERATE_DYNAMO_BACKEND", raising=False)  # its checkpoint resumes without compiling
    reset_accelerate()  # a relaunch is a new process: no accelerator state (and its dynamo plugin) carried over
    assert main(tiny_args(pairs_dir, out, "--max_steps", "3", "--checkpointing_steps", "0")) == 0
    printed = capsys.readouterr().out
    assert "resumed from" in printed and "torch.compile" not in printed


# --------------------------------------------------------------------------- the time budget


def _time_budget_scheduler(state, minutes=1.0, warmup=2):
    from types import SimpleNamespace

    from oner.training.setup import make_scheduler

    args = SimpleNamespace(lr_scheduler_type="cosine", warmup_steps=warmup, max_train_minutes=minutes)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return make_scheduler(optimizer, args, state)


def test_a_time_budget_decays_the_learning_rate_on_time_and_a_resume_keeps_it():
    from oner.training.checkpointing import TrainState

    state = TrainState()
    scheduler = _time_budget_scheduler(state)
    lrs = []
    for step in range(1, 8):
        state.train_seconds = 10.0 * step  # 10 s per step: the 60 s budget ends at step 6
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    # steps 1-2 warm up; the decay starts at the first step after it (20 s) and ends with the budget (60 s)
    assert state.decay_start_seconds == 20.0
    assert lrs[1] == pytest.approx(1.0) and lrs[1] > lrs[2] > lrs[3] > lrs[4] > 0
    assert lrs[3] == pytest.approx(0.5)  # 40 s: half of the decay's 40 s
    assert lrs[5] == pytest.approx(0.0, abs=1e-12) and lrs[6] == pytest.approx(0.0, abs=1e-12)
    # A resumed run: a fresh state and scheduler loaded from the saved ones give the same learning rate.
    saved_state, saved_scheduler = state.state_dict(), scheduler.state_dict()
    state.train_seconds = 35.0
    resumed_state = TrainState()
    resumed_state.load_state_dict({**saved_state, "train_seconds": 35.0})
    resumed = _time_budget_scheduler(resumed_state)
    resumed.load_state_dict(saved_scheduler)
    scheduler.step(), resumed.step()
    assert resumed.get_last_lr() == scheduler.get_last_lr()
    assert 0 < resumed.get_last_lr()[0] < 1


def test_a_step_count_keeps_the_step_schedule():
    from oner.training.checkpointing import TrainState

    state = TrainState()
    state.total_steps = 12
    scheduler = _time_budget_scheduler(state, warmup=2)
    for step in range(12):
        state.train_seconds = 1000.0  # past the time budget: irrelevant when the step count is known
        scheduler.step()
    assert scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-9)
    assert state.decay_start_seconds is None


def test_feature_cached_accumulation_with_a_cmc_fraction(tiny_config, tiny_processor):
    """With --cmc_fraction the joint pass covers the first rows of EACH micro-batch; its targets must be
    those rows' mixups. Checked against one batch reordered so that the same pairs come first."""
    from accelerate import Accelerator
    from modeling_oner import OneRModel
    from oner.objectives import Objective, ObjectiveConfig, parse_objective
    from oner.training.pretrainer import OneRPretrainer
    from oner.training.step import forward_backward

    accelerator = Accelerator(cpu=True)
    big = _micro_batches(tiny_processor)
    # terms that do not depend on the order of the pairs: same-pair XMC, CMC on each pair's own image
    config = ObjectiveConfig(weights=parse_objective("xmc+cmc"), cmc_fraction=0.5, xmc_form="same-pair",
                             cmc_context="pair")

    def run(micro):
        torch.manual_seed(0)
        pretrainer = OneRPretrainer(OneRModel(tiny_config), config).train()
        loss, _ = forward_backward(pretrainer, Objective(config), micro, accelerator)
        return loss, {n: p.grad.clone() for n, p in pretrainer.named_parameters() if p.grad is not None}

    cached_loss, cached_grads = run([{k: v[i * 2:(i + 1) * 2] for k, v in big.items()} for i in range(4)])
    order = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])  # rows 0, 2, 4, 6 are each micro-batch's first row
    single_loss, single_grads = run([{k: v[order] for k, v in big.items()}])
    assert torch.allclose(cached_loss, single_loss, atol=1e-5)
    for name in single_grads:
        assert torch.allclose(cached_grads[name], single_grads[name], atol=1e-5, rtol=1e-4), name


def test_the_default_data_trains_then_evaluates_and_writes_the_card(tmp_path, monkeypatch, capsys):
    """The README's main command in miniature: embedded data, training, every evaluation suite, the card."""
    from oner.data import build_embedded_dataset
    from oner.training import main

    monkeypatch.setenv("ONER_DATA_HOME", str(build_embedded_dataset(tmp_path / "embedded", limit=40, progress=False)))
    out = tmp_path / "run"
    rc = main(["--output_dir", str(out), "--config_overrides", OVERRIDES, "--per_device_batch_size", "8",
               "--max_steps", "3", "--warmup_steps", "1", "--report_to", "none", "--eval_max_items", "6"])
    assert rc == 0
    results = json.loads((out / "eval_results.json").read_text())
    assert {"retrieval_twemoji", "pointing_game", "multimodal_retrieval"} <= set(results)
    card = (out / "README.md").read_text()
    assert "pointing" in card.lower() and "xmc+cmc" in card  # the metrics and the recipe
    assert json.loads((out / "training_summary.json").read_text())["steps"] == 3
    printed = capsys.readouterr().out
    assert "model card:" in printed and "open the demo on it" in printed


def test_the_optimizer_is_torchs_fused_adamw_and_steps_as_the_per_parameter_loop(tiny_model):
    import copy

    from oner.training.args import parse_args
    from oner.training.setup import make_optimizer

    args = parse_args([])
    fused_model, loop_model = tiny_model, copy.deepcopy(tiny_model)
    initial = copy.deepcopy(tiny_model)
    fused = make_optimizer(fused_model, args)
    assert fused.defaults["fused"] is True  # every parameter on the CPU: one kernel per parameter
    loop = make_optimizer(loop_model, args)
    for group in loop.param_groups:
        group["fused"], group["foreach"] = None, False
    # the two groups: no weight decay on embeddings, norms, biases and the logit scale
    assert [g["weight_decay"] for g in fused.param_groups] == [args.weight_decay, 0.0]
    torch.manual_seed(0)
    for _ in range(3):
        for p, q in zip(fused_model.parameters(), loop_model.parameters()):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        fused.step()
        loop.step()
    for (name, p), q in zip(fused_model.named_parameters(), loop_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.equal(p, q) for p, q in zip(fused_model.parameters(), initial.parameters()))


# --------------------------------------------------------------------------- pinned behaviour

# The losses of the first three fp32 steps of tiny runs on `pairs_dir` (seed 0, train.py's defaults
# otherwise), as logged once `tensor` became the default augmentation backend (commit b71f69f logged
# them with `pil`: the same draws, pixels resampled differently, each loss within 1.1% of these). Code
# that reorganises the objective, the step or the model must leave them as they are; a change meant
# to alter them updates these numbers in the same commit.
PINNED_RUNS = {
    "default": ((), [3.8326964378356934, 4.033510208129883, 3.55063533782959],
                {"loss/xmc": 1.9999339580535889, "loss/cmc": 1.03839910030365, "loss/quad": 3.1774535179138184,
                 "joint/image_gain": 0.1823035031557083}),
    "mlm, feature-cached accumulation": (
        ("--objective", "xmc+cmc+quad:0.25+mlm:0.2", "--accum_freq", "2"),
        [7.413045883178711, 7.319448947906494, 7.639161586761475],
        {"loss/xmc": 2.665438652038574, "loss/cmc": 1.6727328300476074, "loss/quad": 4.041036605834961,
         "loss/mlm": 10.323076248168945}),
    "sigmoid loss, fixed temperature": (
        ("--objective", "itc", "--pairwise_loss", "sigmoid", "--temperature", "0.1", "--xmc_form", "same-pair"),
        [8.387689590454102, 4.420027732849121, 3.8074731826782227], {"loss/itc": 8.387689590454102}),
    "image target, shared-text negatives, margin": (
        ("--objective", "xmc+cmc", "--cmc_target", "image", "--joint_negatives", "shared_text", "--joint_margin", "0.1"),
        [3.7498373985290527, 3.965590000152588, 3.718977212905884],
        {"loss/cmc": 1.7499033212661743, "joint/image_gain": 0.46170860528945923}),
}
# What the sigmoid run's saved folder embeds for pairs_dir's first image and its caption (first 4 values).
PINNED_EMBEDDINGS = ([-0.2071259766817093, 0.07858738303184509, 0.008191248401999474, -0.07448626309633255],
                     [-0.36211127042770386, 0.1378539353609085, 0.13510844111442566, -0.05417213961482048])


@pytest.mark.parametrize("name", list(PINNED_RUNS))
def test_the_first_logged_losses_are_pinned(pairs_dir, tmp_path, name):
    from transformers import AutoModel, AutoProcessor

    from oner.training import main

    extra, losses, terms = PINNED_RUNS[name]
    out = tmp_path / "run"
    assert main(tiny_args(pairs_dir, out, "--max_steps", "3", "--mixed_precision", "no", "--checkpointing_steps", "0",
                          *extra)) == 0
    logged = log(out)
    assert [r["loss"] for r in logged] == pytest.approx(losses, rel=1e-4)
    assert {k: logged[0][k] for k in terms} == pytest.approx(terms, rel=1e-4)
    if name.startswith("sigmoid"):  # the folder the wrapper's settings (bias, frozen scale) were saved into
        model = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
        caption = json.loads((pairs_dir / "metadata.jsonl").read_text().splitlines()[0])["text"]
        inputs = processor(text=[caption], images=[Image.open(pairs_dir / "000.png")], return_tensors="pt")
        with torch.no_grad():
            image = model.get_image_features(pixel_values=inputs["pixel_values"])
            text = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        image, text = (getattr(x, "pooler_output", x)[0, :4].tolist() for x in (image, text))
        assert (image, text) == (pytest.approx(PINNED_EMBEDDINGS[0], rel=1e-3, abs=1e-5),
                                 pytest.approx(PINNED_EMBEDDINGS[1], rel=1e-3, abs=1e-5))
        assert model.logit_scale.item() == pytest.approx(2.302585, rel=1e-6) and model.logit_bias is not None


def test_the_objective_flags_are_objective_config_fields_with_its_defaults():
    import dataclasses

    from oner.objectives import ObjectiveConfig, flag_name
    from oner.training import parse_args
    from oner.training.args import build_parser

    assert ObjectiveConfig.from_flags(parse_args([])) == ObjectiveConfig()  # train.py's defaults are the config's
    group = next(g for g in build_parser()._action_groups if g.title == "objective")
    flags = {a.dest: a for a in group._group_actions}
    assert set(flags) == {flag_name(f) for f in dataclasses.fields(ObjectiveConfig)}
    assert flags["xmc_form"].choices == ("same-pair", "cross-pair") and flags["cmc_context"].default == "mosaic"
    changed = parse_args(["--objective", "itc", "--pairwise_loss", "sigmoid", "--cmc_fraction", "0.25", "--local_loss"])
    assert ObjectiveConfig.from_flags(changed) == ObjectiveConfig(weights={"itc": 1.0}, pairwise="sigmoid",
                                                                  cmc_fraction=0.25, local_loss=True)


@pytest.mark.parametrize("argv,message", [
    (["--objective", "xmc+nope"], "--objective: unknown objective term 'nope'"),
    (["--cmc_fraction", "0"], "objective settings: cmc_fraction must be in (0, 1]"),
    (["--pairwise_loss", "sigmoid"], "objective settings: xmc_form 'cross-pair' scores soft targets"),
])
def test_a_bad_objective_setting_names_it(capsys, argv, message):
    from oner.training import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("source", ["fresh", "loaded"])
def test_the_objectives_scoring_settings_are_the_models_before_training(tiny_model_dir, source):
    """A fixed temperature and the sigmoid loss's bias are in the model (config and weights) before the
    pretrainer wraps it, for a fresh model and for one continued from a folder; the scale is frozen."""
    import math

    from oner.objectives import ObjectiveConfig
    from oner.training import parse_args
    from oner.training.setup import build_model

    flags = ["--objective", "itc", "--pairwise_loss", "sigmoid", "--temperature", "0.2"]
    flags += ["--config_overrides", OVERRIDES] if source == "fresh" else ["--model_name_or_path", str(tiny_model_dir)]
    args = parse_args(flags)
    model = build_model(args, ObjectiveConfig.from_flags(args), attn_implementation=None).model
    assert model.config.logit_bias_init == -10.0 and model.logit_bias.item() == -10.0
    assert model.config.logit_scale_init_value == pytest.approx(math.log(5.0))
    assert model.logit_scale.exp().item() == pytest.approx(5.0, rel=1e-6) and not model.logit_scale.requires_grad
