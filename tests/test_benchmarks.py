"""The benchmark scripts' --quick modes run and write their outputs (not how fast anything is)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
QUICK_OVERRIDES = ("hidden_size=32,intermediate_size=64,num_hidden_layers=1,num_attention_heads=2,projection_dim=32,"
                   "image_size=32,patch_size=8,max_position_embeddings=16")


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


def test_speed_times_train_py_own_step(monkeypatch):
    """speed.py's trainers run train.py's `optimisation_step` (no copy of the step), bf16 as accelerate's
    autocast around the forward, and read --overrides as train.py reads --config_overrides."""
    import oner.training.loop as loop
    from oner.training.args import parse_overrides

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import speed

    assert speed.parse_overrides is parse_overrides
    calls = []
    real_step = loop.optimisation_step
    monkeypatch.setattr(loop, "optimisation_step", lambda *a, **k: calls.append(a[0]) or real_step(*a, **k))
    cfg = speed.oner_config("tiny", parse_overrides(QUICK_OVERRIDES))
    batch = speed.make_batch(cfg, 4)
    for kind, objective in (("oner", "xmc+cmc"), ("clip", None)):
        trainer = speed.Trainer(kind, kind, cfg, objective, precision="bf16")
        dtypes = []
        projection = trainer.model.head if kind == "oner" else trainer.model.clip.visual_projection
        projection.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
        before = [p.detach().clone() for p in trainer.params]
        assert torch.isfinite(trainer.step(batch))
        assert calls[-1] is trainer.pretrainer and dtypes and set(dtypes) == {torch.bfloat16}
        assert any(not torch.equal(b, p) for b, p in zip(before, trainer.params))  # AdamW stepped
    speed.reset_accelerate()


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
    lines = [json.loads(x) for x in (out / "ablation_runs.jsonl").read_text().splitlines()]
    rows = ["clip (two towers, ITC)", "oner xmc (cross-pair)"]
    assert [r["config"] for r in lines] == rows
    assert all(r["machine"]["cpu_model"] and "git_commit" in r["machine"] for r in lines)  # each run names its machine
    assert all(r["returncode"] == 0 and r["steps"] >= 1 for r in lines)
    for r in lines:  # every suite of run_benchmark's default set gave its metric, CLIP included
        assert all(v is not None for v in r["metrics"].values()), r["metrics"]
    assert "gap/modality_probe_acc" in lines[1]["final_gap"]  # OneR logs its modality-gap statistics
    assert "--xmc_form cross-pair" in lines[1]["command"]  # the row's flags reach train.py
    summary = json.loads((out / "ablation.json").read_text())
    assert set(summary["configs"]) == set(rows)
    row = next(line for line in (out / "ablation.md").read_text().splitlines() if line.startswith("| oner xmc (cross-pair) |"))
    assert "±" not in row  # one seed: no spread shown
    assert (out / "ablation.png").stat().st_size > 1000
    # Resumable: a second call finds both runs done and trains nothing.
    proc = _run(args)
    assert "[quality] " not in proc.stdout.split("Values in %")[0]
    assert len((out / "ablation_runs.jsonl").read_text().splitlines()) == 2
    # Equal steps instead of equal time: new runs (the bound differs), each exactly that many steps.
    _run([*args, "--max-steps", "2", "--configs", "oner xmc (cross-pair)"])
    by_steps = [json.loads(x) for x in (out / "ablation_runs.jsonl").read_text().splitlines()][2:]
    assert [(r["max_steps"], r["steps"], r["budget_minutes"]) for r in by_steps] == [(2, 2, None)]
    assert "--max_steps 2" in by_steps[0]["command"] and "--max_train_minutes" not in by_steps[0]["command"]
    table = (out / "ablation.md").read_text()
    assert "2 steps per run (equal steps" in table and "| clip (two towers, ITC) |" not in table  # one bound a table


def test_loop_speed_quick(tmp_path, small_embedded):
    _run(["benchmarks/loop_speed.py", "--quick", "--precisions", "bf16", "no", "--out", str(tmp_path)],
         env={"ONER_DATA_HOME": str(small_embedded)})
    data = json.loads((tmp_path / "loop_speed.json").read_text())
    assert [r["bare_step"]["mixed_precision"] for r in data["runs"]] == ["bf16", "no"]
    for run in data["runs"]:
        assert run["bare_pairs_per_s"] > 0 and run["loop_pairs_per_s"] > 0 and run["loop"]["loader_pairs_per_s"] > 0
        assert run["bare_step"]["flops_per_step"] > 0 and 0 < run["fraction_of_peak"]
        profile = run["bare_step"]["profile"]
        # every op of the step sits in one of train.py's phases, and the kinds share all op time (how the
        # phases share it is a timing: a micro model's backward measured 3.8% to over 5% on one machine)
        assert profile["phase_share"]["other"] < 0.01 and profile["phase_share"]["forward"] > 0
        assert profile["phase_share"]["backward"] > 0 and profile["phase_share"]["optimizer"] > 0
        assert abs(sum(profile["phase_share"].values()) - 1) < 1e-6
        assert abs(sum(profile["kind_share_of_op_time"].values()) - 1) < 1e-6
        assert profile["kind_share_of_op_time"]["matrix products"] > 0
        assert run["bare_step"]["page_faults_per_step"] >= 0 and run["bare_step"]["system_ms_per_step"] >= 0
    assert run["matmul_peak_dtype"] == "float32" and data["runs"][0]["matmul_peak_dtype"] == "bfloat16"
    md = (tmp_path / "loop_speed.md").read_text()
    assert "loop / bare step" in md and "page faults" in md and "| phase: backward |" in md and "**bf16**" in md and "**no**" in md


def test_compile_speed_runs_train_py_both_ways(tmp_path, small_embedded):
    train_args = (f"--config_overrides {QUICK_OVERRIDES} --per_device_batch_size 8 --logging_steps 1 "
                  "--torch_compile_backend eager")  # eager: dynamo traces, no code is generated
    # 40 steps: the training log keeps tenths of a second, and a micro step takes milliseconds
    _run(["benchmarks/compile_speed.py", "--variants", "eager", "regional", "--rounds", "1", "--steps", "40",
          "--train-args", train_args, "--out", str(tmp_path)], env={"ONER_DATA_HOME": str(small_embedded)})
    rows = [json.loads(line) for line in (tmp_path / "compile_speed_runs.jsonl").read_text().splitlines()]
    assert [(r["variant"], r["steps"], r["batch"]) for r in rows] == [("eager", 40, 8), ("regional", 40, 8)]
    assert all(r["steady_pairs_per_s"] > 0 and r["startup_s"] >= 0 for r in rows)
    assert "| regional | 1 | 40 |" in (tmp_path / "compile_speed.md").read_text()


def test_joint_ceiling_measures_every_query(tmp_path, small_embedded, tiny_model_dir):
    _run(["benchmarks/joint_ceiling.py", "--model", str(tiny_model_dir), "--sizes", "32", "--max-items", "6",
          "--data-home", str(small_embedded), "--out", str(tmp_path)])
    data = json.loads((tmp_path / "joint_ceiling.json").read_text())
    assert data["n_queries"] >= 6 and len(data["R@1"]) == 10
    assert all(0.0 <= v <= 1.0 for v in data["R@1"].values())
    assert "| name + 0.5 x the crop as seen in a 32 px composite |" in (tmp_path / "joint_ceiling.md").read_text()


def test_joint_ceiling_pointing_pool_and_resolution(monkeypatch):
    from PIL import Image

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from joint_ceiling import at_resolution, pointed_patches

    patches = torch.eye(3)[None].repeat(2, 1, 1)  # 3 orthogonal unit patches
    texts = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    torch.testing.assert_close(pointed_patches(patches, texts, temperature=1e-3), texts)  # a sharp map: the pointed patch
    even = pointed_patches(patches, texts, temperature=1e6)  # a flat map: the mean of the patches
    torch.testing.assert_close(even, torch.full((2, 3), 3 ** -0.5))
    stripes = Image.frombytes("L", (8, 8), bytes([0, 255] * 32))
    assert at_resolution(stripes, 128).tobytes() == stripes.tobytes()  # full resolution keeps every pixel
    blurred = at_resolution(stripes, 32).tobytes()  # a quarter of the resolution cannot hold 1 px stripes
    assert max(blurred) - min(blurred) < 128


def test_loader_speed_quick(tmp_path, small_embedded):
    _run(["benchmarks/loader_speed.py", "--quick", "--out", str(tmp_path)], env={"ONER_DATA_HOME": str(small_embedded)})
    data = json.loads((tmp_path / "loader_speed.json").read_text())
    assert set(data["pairs_per_s"]) == {"pil", "tensor"} and min(data["pairs_per_s"].values()) > 0
    assert data["tensor_over_pil"] > 0 and "tensor / pil" in (tmp_path / "loader_speed.md").read_text()


def test_step_cost_vs_commit_compares_two_trees(tmp_path, small_embedded):
    tiny = ("--config_overrides hidden_size=32,intermediate_size=64,num_hidden_layers=1,num_attention_heads=2,"
            "projection_dim=32,image_size=16,patch_size=8,max_position_embeddings=16 --per_device_batch_size 8")
    out = tmp_path / "cost.jsonl"
    proc = subprocess.run(["bash", "benchmarks/step_cost_vs_commit.sh"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "ONER_DATA_HOME": str(small_embedded), "COMMIT": "HEAD",
                                            "ROUNDS": "1", "SHORT": "1", "LONG": "3", "TRAIN_ARGS": tiny,
                                            "OUT": str(out)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["tree"].split(" ")[0] for r in rows] == ["HEAD", "this"] and all(r["steps"] == 2 for r in rows)
    # the per-step costs of two tiny steps are start-up noise: only their presence is checked
    assert all(isinstance(r[k], float) for r in rows for k in ("cpu_s_per_step", "wall_s_per_step", "loadavg"))
