#!/usr/bin/env python
"""The paper's claims in miniature: OneR vs the two-tower CLIP baseline, and the objective ablation,
on the embedded benchmark at an EQUAL wall-clock training budget per run, several seeds.

Every run is `python train.py ...` (the project's own training code, as a subprocess), then the
benchmark: `oner.evaluation.run_benchmark`, run by train.py's own `--do_eval` for both architectures
(a CLIPModel folder goes through `oner.evaluation.clip_baseline.clip_adapter`).

Results are written incrementally, one JSON line per finished run, to
`benchmarks/results/quality_runs.jsonl`; a rerun skips runs already there (resumable). The summary
(`quality.json`, `quality.md`, `quality_ablation.png`) is rebuilt from the lines after every run.

    python benchmarks/quality.py --budget-minutes 1.25 --seeds 0 1 2      # the grid (about an hour)
    python benchmarks/quality.py --report-only                            # rebuild the tables
    touch benchmarks/results/quality.pause                                # pause between runs (speed.py runs quiet)
    python benchmarks/quality.py --quick --out /tmp/q                     # seconds: the test
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, loadavg, machine, write_json  # noqa: E402

# name -> train.py settings. Order matters: `xmc+cmc+ema` reads the steps reached by `xmc+cmc`.
CONFIGS: dict[str, dict] = {
    "clip (two towers, ITC)": dict(architecture="clip", objective="itc"),
    "oner itc (naive)": dict(objective="itc"),
    "oner xmc": dict(objective="xmc"),
    "oner xmc+cic": dict(objective="xmc+cic"),
    "oner xmc+cmc": dict(objective="xmc+cmc"),
    "oner xmc+cic+cmc": dict(objective="xmc+cic+cmc"),
    "oner xmc+cmc+ema": dict(objective="xmc+cmc", momentum=0.99),
    "oner xmc+cmc+mlm": dict(objective="xmc+cmc+mlm"),
    # Not in the paper's ablation: ITC's direct alignment plus the mixup terms (added after the grid
    # showed XMC alone aligning nothing at this scale).
    "oner itc+xmc+cmc": dict(objective="itc+xmc+cmc"),
}
QUICK_CONFIGS = ["clip (two towers, ITC)", "oner xmc+cmc"]

# (column, suite, metric): what goes into the table (everything is kept in the JSON lines).
METRICS = [
    ("openmoji i2t R@1", "retrieval_openmoji", "i2t_R@1"),
    ("openmoji i2t R@5", "retrieval_openmoji", "i2t_R@5"),
    ("openmoji t2i R@1", "retrieval_openmoji", "t2i_R@1"),
    ("openmoji t2i R@5", "retrieval_openmoji", "t2i_R@5"),
    ("twemoji i2t R@1", "retrieval_twemoji", "i2t_R@1"),
    ("twemoji t2i R@1", "retrieval_twemoji", "t2i_R@1"),
    ("zs group top1", "classification_group", "top1"),
    ("zs names100 top1", "classification_names100", "top1"),
    ("pointing", "pointing_game", "pointing_accuracy"),
    ("text-guided pointing", "text_guided_pointing", "pointing_accuracy"),
    ("multimodal R@1", "multimodal_retrieval", "R@1"),
    ("multimodal R@5", "multimodal_retrieval", "R@5"),
]
# The summary score used to rank objectives: mean of these (all held-out style or emergent).
SCORE = ["openmoji i2t R@5", "openmoji t2i R@5", "zs names100 top1", "zs group top1", "pointing",
         "text-guided pointing", "multimodal R@5"]

# A small model so that a short budget still trains: 2 cores, shared with other work.
DEFAULT_OVERRIDES = ("hidden_size=64,intermediate_size=256,num_hidden_layers=4,num_attention_heads=2,projection_dim=64,"
                     "image_size=32,patch_size=4")
QUICK_OVERRIDES = ("hidden_size=32,intermediate_size=64,num_hidden_layers=1,num_attention_heads=2,projection_dim=32,"
                   "image_size=32,patch_size=8,max_position_embeddings=16")


def run_key(name: str, seed: int) -> str:
    return f"{name}|seed={seed}"


def read_runs(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line cut by a kill: that run is redone
    return out


def train_command(name: str, seed: int, args, run_dir: Path, max_steps: int | None) -> list[str]:
    cfg = CONFIGS[name]
    arch = cfg.get("architecture", "oner")
    cmd = [
        sys.executable, str(ROOT / "train.py"),
        "--architecture", arch,
        "--objective", cfg["objective"],
        "--seed", str(seed),
        "--output_dir", str(run_dir),
        "--max_train_minutes", str(args.budget_minutes),
        "--per_device_batch_size", str(args.batch_size),
        "--config_overrides", args.overrides,
        "--report_to", "none",
        "--checkpointing_steps", "0",
        "--logging_steps", "5",
        "--warmup_steps", str(args.warmup_steps),
        "--dataloader_num_workers", str(args.workers),
        "--do_eval", "true",
    ]
    if args.eval_max_items:
        cmd += ["--eval_max_items", str(args.eval_max_items)]
    if args.max_train_samples:
        cmd += ["--max_train_samples", str(args.max_train_samples)]
    if cfg.get("momentum"):
        cmd += ["--momentum", str(cfg["momentum"])]
    if max_steps:
        cmd += ["--max_steps", str(max_steps)]
    return cmd


def ema_steps(runs: list[dict], seed: int, budget: float) -> int:
    """`--momentum` needs a schedule length: the steps `oner xmc+cmc` reached in the same budget
    (same seed if done, else any), times 0.8 for the EMA encoder's extra no-grad passes."""
    base = [r for r in runs if r["config"] == "oner xmc+cmc" and r.get("steps") and r.get("budget_minutes") == budget]
    same = [r for r in base if r["seed"] == seed]
    pick = same or base
    if not pick:
        return max(int(20 * budget), 5)
    return max(int(0.8 * pick[0]["steps"]), 5)


def one_run(name: str, seed: int, args, runs: list[dict]) -> dict:
    run_dir = Path(args.workdir) / f"{name.replace(' ', '_').replace('(', '').replace(')', '').replace(',', '')}-s{seed}"
    max_steps = ema_steps(runs, seed, args.budget_minutes) if CONFIGS[name].get("momentum") else None
    cmd = train_command(name, seed, args, run_dir, max_steps)
    env = dict(os.environ)
    # One thread per process: on a shared 2-core machine two OpenMP threads spin-wait on each other
    # whenever another process holds a core; measured 10-20x slower steps at load 6 (docs/benchmarks.md).
    env["OMP_NUM_THREADS"] = str(args.threads)
    if args.data_home:
        env["ONER_DATA_HOME"] = str(args.data_home)
    load_before = loadavg()
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    (run_dir).mkdir(parents=True, exist_ok=True)
    (run_dir / "train_stdout.txt").write_text(proc.stdout[-20000:] + "\n--- stderr ---\n" + proc.stderr[-20000:])
    record = {"config": name, "seed": seed, "key": run_key(name, seed), "budget_minutes": args.budget_minutes,
              "command": " ".join(cmd[1:]), "returncode": proc.returncode, "wall_s": round(wall, 1),
              "loadavg_before": load_before, "loadavg_after": loadavg(), "run_dir": str(run_dir)}
    if proc.returncode != 0:
        record["error"] = proc.stderr[-2000:]
        return record
    summary = json.loads((run_dir / "training_summary.json").read_text())
    record.update(steps=summary.get("steps"), train_minutes=summary.get("train_minutes"),
                  final_loss=summary.get("final_loss"), max_steps=max_steps)
    results = json.loads((run_dir / "eval_results.json").read_text())
    record["eval_s"] = results.get("_meta", {}).get("seconds")
    record["results"] = {k: v for k, v in results.items() if not k.startswith("_")}
    record["metrics"] = {col: _get(results, suite, metric) for col, suite, metric in METRICS}
    record["score"] = _score(record["metrics"])
    return record


def _get(results: dict, suite: str, metric: str) -> float | None:
    value = results.get(suite, {}).get(metric)
    return None if value is None else float(value)


def _score(metrics: dict) -> float | None:
    vals = [metrics.get(c) for c in SCORE]
    vals = [v for v in vals if v is not None]
    return sum(vals) / len(vals) if vals else None


def _mean_std(xs: list[float]) -> tuple[float, float]:
    if not xs:
        return float("nan"), float("nan")
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def summarise(runs: list[dict], out: Path, meta: dict) -> dict:
    """quality.json (means, std, n per config), quality.md (the table) and quality_ablation.png."""
    ok = [r for r in runs if r.get("returncode") == 0 and "metrics" in r]
    names = [n for n in CONFIGS if any(r["config"] == n for r in ok)]
    chance = {}
    for r in ok:
        for col, suite, metric in METRICS:
            c = r["results"].get(suite, {}).get(f"chance_{metric}")
            if c is not None:
                chance[col] = c
    table = {}
    for n in names:
        rs = [r for r in ok if r["config"] == n]
        entry = {"n_seeds": len(rs), "seeds": sorted(r["seed"] for r in rs)}
        for col, _, _ in METRICS + [("score", None, None)]:
            vals = [r["metrics"][col] if col != "score" else r["score"] for r in rs]
            vals = [v for v in vals if v is not None]
            entry[col] = dict(zip(("mean", "std"), _mean_std(vals)))
        entry["steps"] = dict(zip(("mean", "std"), _mean_std([r["steps"] for r in rs if r.get("steps") is not None])))
        entry["train_minutes"] = dict(zip(("mean", "std"), _mean_std([r["train_minutes"] for r in rs
                                                                       if r.get("train_minutes") is not None])))
        table[n] = entry
    failed = [{"key": r["key"], "error": r.get("error", "")[-500:]} for r in runs if r.get("returncode") != 0]
    data = {"meta": meta, "chance": chance, "configs": table, "failed_runs": failed,
            "score_definition": f"mean of {SCORE}"}
    write_json(out / "quality.json", data)
    (out / "quality.md").write_text(markdown(data))
    plot(data, out / "quality_ablation.png")
    return data


def markdown(data: dict) -> str:
    cols = [c for c, _, _ in METRICS]
    lines = ["| config | seeds | steps | " + " | ".join(cols) + " | score |",
             "|---|---:|---:|" + "---:|" * (len(cols) + 1)]
    for n, e in data["configs"].items():
        cells = [f"{100 * e[c]['mean']:.1f} ± {100 * e[c]['std']:.1f}" if not math.isnan(e[c]["mean"]) else ""
                 for c in cols + ["score"]]
        lines.append(f"| {n} | {e['n_seeds']} | {e['steps']['mean']:.0f} ± {e['steps']['std']:.0f} | "
                     + " | ".join(cells[:-1]) + f" | {cells[-1]} |")
    ch = data.get("chance", {})
    lines.append("| *chance* | | | " + " | ".join(f"{100 * ch[c]:.1f}" if c in ch else "" for c in cols) + " | |")
    meta = data.get("meta", {})
    return ("Values in %, mean ± sample std over seeds; steps = optimizer steps reached in the budget. "
            f"Budget {meta.get('budget_minutes')} min of training per run; model overrides `{meta.get('overrides')}`; "
            f"batch {meta.get('batch_size')}; eval capped at {meta.get('eval_max_items')} items per suite. "
            f"Score = mean of {', '.join(SCORE)}.\n\n" + "\n".join(lines) + "\n")


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ["openmoji i2t R@5", "zs names100 top1", "pointing", "multimodal R@5", "score"]
    names = list(data["configs"])
    if not names:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.2), sharey=False)
    for ax, col in zip(axes, panels):
        means = [100 * data["configs"][n][col]["mean"] for n in names]
        stds = [100 * data["configs"][n][col]["std"] for n in names]
        colors = ["tab:gray" if n.startswith("clip") else "tab:blue" for n in names]
        ax.barh(range(len(names)), means, xerr=stds, color=colors, capsize=3)
        if col in data.get("chance", {}):
            ax.axvline(100 * data["chance"][col], color="red", ls="--", lw=1, label="chance")
            ax.legend(loc="lower right", fontsize=7)
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names if ax is axes[0] else [], fontsize=8)
        ax.invert_yaxis()
        ax.set_title(col + " (%)", fontsize=9)
    meta = data.get("meta", {})
    fig.suptitle(f"OneR objective ablation at equal wall-clock budget ({meta.get('budget_minutes')} min/run), "
                 "mean ± std over seeds", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-minutes", type=float, default=1.25, help="training wall-clock per run (train.py --max_train_minutes)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--configs", nargs="+", default=None, help=f"subset of: {list(CONFIGS)}")
    p.add_argument("--overrides", default=DEFAULT_OVERRIDES, help="train.py --config_overrides (model size)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each training run")
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--workers", type=int, default=1, help="train.py --dataloader_num_workers")
    p.add_argument("--eval-max-items", type=int, default=300, help="train.py --eval_max_items (per suite)")
    p.add_argument("--max-train-samples", type=int, default=None)
    p.add_argument("--data-home", default=None, help="ONER_DATA_HOME for the runs (default: the usual root)")
    p.add_argument("--workdir", default="/tmp/oner-quality-runs", help="run folders (models, logs)")
    p.add_argument("--out", default=str(RESULTS), help="where quality_runs.jsonl / .json / .md / .png go")
    p.add_argument("--report-only", action="store_true", help="only rebuild the summary from the JSON lines")
    p.add_argument("--quick", action="store_true", help="2 configs, 1 seed, a 32-wide model, seconds of training (the test)")
    args = p.parse_args(argv)

    out = Path(args.out)
    if args.quick:
        args.budget_minutes = 0.05
        args.seeds = [0]
        args.configs = args.configs or QUICK_CONFIGS
        args.overrides = QUICK_OVERRIDES
        args.batch_size = 8
        args.warmup_steps = 1
        args.workers = 0
        args.eval_max_items = 8
        args.max_train_samples = args.max_train_samples or 32
        if args.workdir == "/tmp/oner-quality-runs":
            args.workdir = str(out / "runs")
    names = args.configs or list(CONFIGS)
    for n in names:
        if n not in CONFIGS:
            p.error(f"unknown config {n!r}; choose from {list(CONFIGS)}")
    runs_path = out / "quality_runs.jsonl"
    meta = {"budget_minutes": args.budget_minutes, "overrides": args.overrides, "batch_size": args.batch_size,
            "threads": args.threads,
            "eval_max_items": args.eval_max_items, "seeds": args.seeds, "machine": machine(),
            "command": "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    if args.report_only:
        summarise(read_runs(runs_path), out, meta)
        print((out / "quality.md").read_text())
        return 0

    out.mkdir(parents=True, exist_ok=True)
    pause = out / "quality.pause"
    for seed in args.seeds:  # seed-major: a partial grid still compares every config
        for name in names:
            runs = read_runs(runs_path)
            done = {r["key"] for r in runs if r.get("returncode") == 0 and r.get("budget_minutes") == args.budget_minutes}
            if run_key(name, seed) in done:
                continue
            while pause.exists():
                time.sleep(10)
            print(f"[quality] {name} seed {seed} (budget {args.budget_minutes} min, load {loadavg()})", flush=True)
            try:
                record = one_run(name, seed, args, runs)
            except Exception as e:  # one broken run must not end the grid
                import traceback

                record = {"config": name, "seed": seed, "key": run_key(name, seed), "returncode": -1,
                          "budget_minutes": args.budget_minutes, "wall_s": 0.0,
                          "error": "".join(traceback.format_exception(e))[-2000:]}
            with runs_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            print(f"[quality]   -> rc {record['returncode']}, steps {record.get('steps')}, "
                  f"score {record.get('score')}, wall {record['wall_s']} s", flush=True)
            summarise(read_runs(runs_path), out, meta)
    data = summarise(read_runs(runs_path), out, meta)
    print((out / "quality.md").read_text())
    return 1 if data["failed_runs"] else 0


if __name__ == "__main__":
    sys.exit(main())
