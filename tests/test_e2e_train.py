"""The real commands: kill -9 and resume equals an uninterrupted run; `accelerate launch` with 2 processes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
OVERRIDES = ",".join(f"{k}={v}" for k, v in TINY.items())
pytestmark = pytest.mark.slow


def command(data, out, *extra, launcher=(PYTHON,)):
    return [*launcher, str(REPO / "train.py"), "--train_data", str(data), "--output_dir", str(out),
            "--config_overrides", OVERRIDES, "--per_device_batch_size", "8", "--warmup_steps", "3",
            "--do_eval", "false", "--report_to", "none", "--logging_steps", "1", *extra]


def env():
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def test_killed_and_resumed_run_equals_uninterrupted_run(pairs_dir, tmp_path):
    # MLM (global RNG), the EMA target (registered state), a worker process and several epochs:
    # everything a resume must restore.
    extra = ["--max_steps", "36", "--checkpointing_steps", "6", "--objective", "xmc+cmc+mlm:0.2",
             "--momentum", "0.9", "--dataloader_num_workers", "1"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    uninterrupted = subprocess.run(command(pairs_dir, full, *extra), check=True, env=env(), capture_output=True,
                                   text=True)
    assert "estimated: 36 steps take about" in uninterrupted.stdout  # said once the speed is known

    proc = subprocess.Popen(command(pairs_dir, cut, *extra), env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    target = cut / "checkpoints" / "checkpoint-12"
    deadline = time.monotonic() + 120
    while not target.is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (cut / "model.safetensors").exists()
    # The SAME command again: it finds the checkpoints and continues.
    resumed = subprocess.run(command(pairs_dir, cut, *extra), env=env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Checkpoint detected, resuming training at" in resumed.stdout and "resumed from" in resumed.stdout

    a, b = load_file(full / "model.safetensors"), load_file(cut / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=0), name
    # the log shows every step exactly once, with the same losses
    log_a = [json.loads(x) for x in (full / "training_log.jsonl").read_text().splitlines()]
    log_b = [json.loads(x) for x in (cut / "training_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log_b] == list(range(1, 37))
    assert [round(r["loss"], 5) for r in log_a] == [round(r["loss"], 5) for r in log_b]


def test_accelerate_launch_runs_two_real_processes(pairs_dir, tmp_path):
    out = tmp_path / "two"
    launcher = (ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no")
    result = subprocess.run(command(pairs_dir, out, "--max_steps", "3", "--checkpointing_steps", "3",
                                    launcher=launcher), env=env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 process(es), 16 pairs per step" in result.stdout
    checkpoint = out / "checkpoints" / "checkpoint-3"
    assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()
    assert (out / "model.safetensors").is_file()
