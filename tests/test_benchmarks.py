"""The benchmark scripts' --quick modes run and write their outputs (not how fast anything is)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def _run(args, env=None, timeout=240):
    proc = subprocess.run([PY, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_speed_quick(tmp_path):
    _run(["benchmarks/speed.py", "--quick", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "speed.json").read_text())
    for dtype in ("fp32", "bf16"):
        assert set(data["train"][dtype]) == {"oner_itc", "oner_full", "clip"}
        assert all(v["pairs_per_s"] > 0 for v in data["train"][dtype].values())
        assert data["train_step_flops"][dtype]["oner_full"] > data["train_step_flops"][dtype]["oner_itc"] > 0
    assert data["matmul_peak_flops"]["fp32"] > 0
    assert len(data["derived"]["targets"]) == 4
    assert "| target |" in (tmp_path / "speed.md").read_text()
    assert (tmp_path / "speed_batch.png").stat().st_size > 1000


def test_gpu_script_on_cpu(tmp_path):
    _run(["benchmarks/gpu.py", "--quick", "--device", "cpu", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "gpu.json").read_text())
    assert set(data["train"]) == {"oner_itc", "oner_full", "clip"}
    assert data["measured_bf16_matmul_peak_tflops"] > 0
    assert (tmp_path / "gpu.md").is_file()


@pytest.fixture(scope="module")
def small_embedded(tmp_path_factory):
    from oner.data import build_embedded_dataset

    return build_embedded_dataset(root=tmp_path_factory.mktemp("emb") / "e", limit=40, progress=False)


def test_quality_quick_and_resume(tmp_path, small_embedded):
    out = tmp_path / "q"
    args = ["benchmarks/quality.py", "--quick", "--out", str(out), "--data-home", str(small_embedded)]
    _run(args)
    lines = [json.loads(x) for x in (out / "quality_runs.jsonl").read_text().splitlines()]
    assert [r["config"] for r in lines] == ["clip (two towers, ITC)", "oner xmc+cmc"]
    assert all(r["returncode"] == 0 and r["steps"] >= 1 for r in lines)
    for r in lines:  # every suite of run_benchmark's default set gave its metric, CLIP included
        assert all(v is not None for v in r["metrics"].values()), r["metrics"]
    summary = json.loads((out / "quality.json").read_text())
    assert set(summary["configs"]) == {"clip (two towers, ITC)", "oner xmc+cmc"}
    assert "| oner xmc+cmc |" in (out / "quality.md").read_text()
    assert (out / "quality_ablation.png").stat().st_size > 1000
    # Resumable: a second call finds both runs done and trains nothing.
    proc = _run(args)
    assert "[quality] " not in proc.stdout.split("Values in %")[0]
    assert len((out / "quality_runs.jsonl").read_text().splitlines()) == 2
