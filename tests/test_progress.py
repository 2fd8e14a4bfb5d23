"""Progress output fit for a file (oner.progress): bars in a terminal, plain lines elsewhere."""

import os
import subprocess
import sys
from pathlib import Path

from conftest import TINY
from oner import progress as progress_module
from oner.progress import PlainProgress, progress

REPO = Path(__file__).resolve().parents[1]
ESCAPES = ("\x1b[", "\r")


def test_outside_a_terminal_outer_loops_write_a_line_per_item(capsys):
    bar = progress(["a", "b", "c"], desc="oner-eval", unit="suites")
    assert isinstance(bar, PlainProgress)
    assert list(bar) == ["a", "b", "c"]
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" (")[0] for line in lines] == ["oner-eval: 1/3 suites", "oner-eval: 2/3 suites",
                                                      "oner-eval: 3/3 suites"]


def test_outside_a_terminal_training_writes_a_line_per_logging_step(capsys):
    bar = progress(total=6, initial=0, desc="training", unit="steps", every_item=False)
    for step in range(1, 7):
        bar.update(1)
        if step % 2 == 0:
            bar.set_postfix_str(f"loss {step}")
    bar.close()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("training: 2/6 steps (") and lines[0].endswith("loss 2")
    assert lines[2].startswith("training: 6/6 steps (")


def test_inner_loops_and_disabled_bars_are_silent(capsys):
    assert list(progress(range(3), desc="inner", lines=False)) == [0, 1, 2]
    bar = progress(total=2, desc="other process", disable=True)
    bar.update(2)
    bar.set_postfix_str("x")
    assert capsys.readouterr().out == ""


def test_a_terminal_gets_tqdm(monkeypatch):
    from tqdm.auto import tqdm

    monkeypatch.setattr(progress_module, "in_terminal", lambda: True)
    bar = progress(range(2), desc="x", file=open(os.devnull, "w"))
    assert isinstance(bar, tqdm)
    bar.close()


def test_in_terminal_is_false_for_files(tmp_path, monkeypatch):
    with open(tmp_path / "log", "w") as file:
        monkeypatch.setattr(sys, "stdout", file)
        assert not progress_module.in_terminal()


def _run_logged(command: list[str], log: Path, env: dict) -> str:
    with open(log, "w") as file:
        result = subprocess.run(command, stdout=file, stderr=subprocess.STDOUT, env=env, timeout=300, cwd=REPO)
    text = log.read_text()
    assert result.returncode == 0, text[-3000:]
    return text


def test_logged_run_and_evaluation_hold_no_escape_codes(pairs_dir, tmp_path, capsys):
    """The data build, `train.py ... > log 2>&1` and `oner-eval ... > log`: plain lines, no bars, no cursor codes."""
    from oner.data import build_embedded_dataset

    build_embedded_dataset(root=tmp_path / "emb", limit=40)  # stdout is pytest's capture, not a terminal
    captured = capsys.readouterr()
    build = captured.out + captured.err
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "ONER_DATA_HOME": str(tmp_path / "emb")}
    overrides = ",".join(f"{k}={v}" for k, v in TINY.items())
    train = _run_logged([sys.executable, "train.py", "--train_data", str(pairs_dir), "--output_dir",
                         str(tmp_path / "out"), "--config_overrides", overrides, "--per_device_batch_size", "8",
                         "--warmup_steps", "2", "--max_steps", "6", "--logging_steps", "2", "--eval_max_items", "4",
                         "--report_to", "none"], tmp_path / "train.log", env)
    evaluate = _run_logged([sys.executable, "-m", "oner.evaluation.cli", str(tmp_path / "out"), "--max_items", "4",
                            "--output_dir", str(tmp_path / "eval")], tmp_path / "eval.log", env)
    for name, text in (("build", build), ("train", train), ("eval", evaluate)):
        assert not [e for e in ESCAPES if e in text], f"{name} log holds escape codes:\n{text[-2000:]}"
    stages = [line for line in build.splitlines() if line.startswith("building the OneR embedded data set: ")]
    assert [line.rsplit(", ", 1)[1].split(":")[0] for line in stages] == ["twemoji", "openmoji", "composites"]
    steps = [line for line in train.splitlines() if line.startswith("training: ")]
    assert [line.split(" (")[0] for line in steps] == ["training: 2/6 steps", "training: 4/6 steps", "training: 6/6 steps"]
    assert all("loss" in line for line in steps)
    for text in (train, evaluate):
        suites = [line for line in text.splitlines() if line.startswith("oner-eval: ")]
        assert len(suites) == 7 and suites[-1].startswith("oner-eval: 7/7 suites")
