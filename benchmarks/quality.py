#!/usr/bin/env python
"""The paper's claims in miniature: OneR vs the two-tower CLIP baseline, and the objective ablation,
on the embedded benchmark at an EQUAL wall-clock training budget per run, several seeds.

Every run is `python train.py ...` (the project's own training code, as a subprocess), then the
benchmark: `oner.evaluation.run_benchmark`, run by train.py's own `--do_eval` for both architectures
(a CLIPModel folder goes through `oner.baseline.CLIPAsOneR`).

Two grids (`GRIDS`): `ablation` (the objectives, on the current default recipe) and `recipe` (size,
resolution, batch, learning rate). Results are written incrementally, one JSON line per finished
run, to `benchmarks/results/<grid>_runs.jsonl`; a rerun skips runs already there (resumable, e.g.
under `nohup`). The summary (`<grid>.json`, `<grid>.md`, `<grid>.png`) is rebuilt after every run.

    nohup python benchmarks/quality.py --grid ablation --budget-minutes 5 --seeds 0 1 2 &   # 2 runs at a time, 1 thread each
    python benchmarks/quality.py --grid recipe --budget-minutes 5 --seeds 0
    python benchmarks/quality.py --grid ablation --report-only            # rebuild the tables
    touch benchmarks/results/quality.pause                                # pause before the next run starts
    python benchmarks/quality.py --quick --out outputs/quality-quick      # seconds: the test
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, loadavg, machine, write_json  # noqa: E402

# Grids: row name -> train.py flags. Every run starts from train.py's defaults (= the embedded default,
# configs/tiny-embedded.yaml), so the ablation always measures the current default recipe and each row
# names only what it changes.
SMALL = (
    "hidden_size=128,intermediate_size=512,num_attention_heads=4,projection_dim=128,image_size=32,patch_size=4,pooling=mean"
)
GRIDS: dict[str, dict[str, dict]] = {
    # The objective ablation of docs/benchmarks.md: the paper's rows (naive ITC, XMC, +CIC, +CMC), the
    # XMC forms, the CMC fraction, against the two-tower baseline. Each row names its whole objective,
    # so the table stays valid when train.py's default objective changes.
    "ablation": {
        "clip (two towers, ITC)": dict(architecture="clip", objective="itc"),
        "oner itc (naive)": dict(objective="itc"),
        "oner itc, [CLS] pooling": dict(objective="itc", config_overrides="pooling=cls"),
        "oner xmc (same-pair)": dict(objective="xmc", xmc_form="same-pair"),
        "oner xmc (same-pair, T=0.2)": dict(objective="xmc", xmc_form="same-pair", temperature=0.2),
        "oner xmc (cross-pair)": dict(objective="xmc", xmc_form="cross-pair"),
        "oner xmc+cic (cross-pair)": dict(objective="xmc+cic", xmc_form="cross-pair"),
        "oner xmc+cmc (cross-pair)": dict(objective="xmc+cmc", xmc_form="cross-pair"),
        "oner xmc+cmc (cross-pair, mosaic, cmc on 50%)": dict(objective="xmc+cmc", xmc_form="cross-pair",
                                                              cmc_context="mosaic", cmc_fraction=0.5),
        "oner itc+cmc": dict(objective="itc+cmc", cmc_fraction=1.0),
        "oner itc+cmc (cmc on 25%)": dict(objective="itc+cmc", cmc_fraction=0.25),
        # Joint queries that need the image, and the patch-level target (docs/method.md).
        "oner xmc+cmc (image target)": dict(objective="xmc+cmc", cmc_target="image"),
        "oner xmc+cmc (image target, shared-text negatives)": dict(objective="xmc+cmc", cmc_target="image",
                                                                   joint_negatives="shared_text"),
        "oner xmc+cmc (image target, shared-text negatives, margin 0.1)": dict(
            objective="xmc+cmc", cmc_target="image", joint_negatives="shared_text", joint_margin=0.1),
        "oner xmc+cmc+quad": dict(objective="xmc+cmc+quad"),
        "oner xmc+cmc+quad:0.25": dict(objective="xmc+cmc+quad:0.25"),
        "oner xmc+cmc+quad:0.25 (image target, shared-text negatives, margin 0.1)": dict(
            objective="xmc+cmc+quad:0.25", cmc_target="image", joint_negatives="shared_text", joint_margin=0.1),
        # The default on a CPU without native bf16: the same steps in fp32 should give the same model.
        "oner xmc+cmc+quad:0.25, fp32": dict(objective="xmc+cmc+quad:0.25", mixed_precision="no"),
        # The default with batched tensor augmentation (cached uint8 images): the faster loader, same model?
        "oner xmc+cmc+quad:0.25, tensor augmentation": dict(objective="xmc+cmc+quad:0.25", augment_backend="tensor"),
    },
    # Size, resolution, batch, learning rate and data at equal wall-clock (a preset chosen by
    # time-to-quality), with the naive ITC objective and mean pooling.
    "recipe": {
        "w128 L2 32px/4 b128 lr1e-3": dict(config_overrides=SMALL + ",num_hidden_layers=2", per_device_batch_size=128,
                                           learning_rate=1e-3),
        "w128 L4 32px/4 b128 lr1e-3": dict(config_overrides=SMALL, per_device_batch_size=128, learning_rate=1e-3),
        "w128 L4 32px/4 b128 lr2e-3": dict(config_overrides=SMALL, per_device_batch_size=128, learning_rate=2e-3),
        "w128 L4 32px/4 b64 lr1e-3": dict(config_overrides=SMALL, per_device_batch_size=64, learning_rate=1e-3),
        "w128 L4 32px/4 b128 lr1e-3 no skin-tone variants": dict(config_overrides=SMALL, per_device_batch_size=128,
                                                                 learning_rate=1e-3, train_filter="skin_tone=false"),
        "w128 L4 32px/4 b128 lr1e-3 no caption masking": dict(config_overrides=SMALL, per_device_batch_size=128,
                                                              learning_rate=1e-3, caption_mask_probability=0.0),
        "w192 L4 32px/4 b128 lr1e-3": dict(config_overrides=SMALL.replace("hidden_size=128", "hidden_size=192")
                                           .replace("intermediate_size=512", "intermediate_size=768")
                                           .replace("num_attention_heads=4", "num_attention_heads=3"),
                                           per_device_batch_size=128, learning_rate=1e-3),
        "w128 L4 48px/6 b128 lr1e-3": dict(config_overrides=SMALL.replace("image_size=32", "image_size=48")
                                           .replace("patch_size=4", "patch_size=6"),
                                           per_device_batch_size=128, learning_rate=1e-3),
    },
}
QUICK_ROWS = ["clip (two towers, ITC)", "oner xmc (cross-pair)"]

# (column, suite, metric): what goes into the table (everything is kept in the JSON lines).
METRICS = [
    ("openmoji i2t R@1", "retrieval_openmoji", "i2t_R@1"),
    ("openmoji i2t R@5", "retrieval_openmoji", "i2t_R@5"),
    ("openmoji i2t R@10", "retrieval_openmoji", "i2t_R@10"),
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
    ("name-only R@1", "multimodal_retrieval", "text_only_R@1"),
]
METRIC_SOURCE = {col: (suite, metric) for col, suite, metric in METRICS}
# The summary score used to rank objectives: mean of these (all held-out style or emergent).
SCORE = ["openmoji i2t R@5", "openmoji t2i R@5", "zs names100 top1", "zs group top1", "pointing",
         "text-guided pointing", "multimodal R@5"]

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


def same_bound(runs: list[dict], args) -> list[dict]:
    """The runs made under this call's bound (equal time OR equal steps): one table never mixes the two."""
    return [r for r in runs if r.get("max_steps") == args.max_steps
            and (args.max_steps or r.get("budget_minutes") == args.budget_minutes)]


def train_command(flags: dict, seed: int, args, run_dir: Path) -> list[str]:
    """`python train.py` with the run's flags; everything else is train.py's default."""
    cmd = [
        sys.executable, str(ROOT / "train.py"),
        "--seed", str(seed),
        "--output_dir", str(run_dir),
        "--overwrite_output_dir",  # every grid run starts fresh (a run cut short is redone whole)
        *(["--max_steps", str(args.max_steps)] if args.max_steps else ["--max_train_minutes", str(args.budget_minutes)]),
        "--report_to", "none",
        "--checkpointing_steps", "0",
        "--do_eval", "true",
    ]
    if args.eval_max_items:
        cmd += ["--eval_max_items", str(args.eval_max_items)]
    for key, value in {**flags, **args.extra_flags}.items():  # --quick shrinks every row
        cmd += [f"--{key}", str(value)]
    return cmd


def run_dir_name(name: str, seed: int) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in name) + f"-s{seed}"


def one_run(name: str, seed: int, args) -> dict:
    run_dir = Path(args.workdir) / run_dir_name(name, seed)
    cmd = train_command(args.rows[name], seed, args, run_dir)
    env = dict(os.environ)
    # Threads per run: two runs side by side get one each (two 2-thread runs on 2 cores spin-wait on
    # each other, docs/benchmarks.md); train.py takes an explicit OMP_NUM_THREADS as given.
    env["OMP_NUM_THREADS"] = str(args.threads)
    if args.data_home:
        env["ONER_DATA_HOME"] = str(args.data_home)
    load_before, facts = loadavg(), machine()
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    (run_dir).mkdir(parents=True, exist_ok=True)
    (run_dir / "train_stdout.txt").write_text(proc.stdout[-20000:] + "\n--- stderr ---\n" + proc.stderr[-20000:])
    record = {"config": name, "seed": seed, "key": run_key(name, seed), "budget_minutes": args.budget_minutes,
              "max_steps": args.max_steps, "flags": args.rows[name], "command": " ".join(cmd[1:]), "returncode": proc.returncode,
              "wall_s": round(wall, 1), "threads": args.threads, "jobs": args.jobs,
              "loadavg_before": load_before, "loadavg_after": loadavg(), "run_dir": str(run_dir),
              # each run names its own machine and code: a results file may gather runs from several
              "machine": {k: facts[k] for k in ("cpu_model", "avx512_bf16", "amx_bf16", "nproc", "torch", "git_commit")}}
    if proc.returncode != 0:
        record["error"] = proc.stderr[-2000:]
        return record
    summary = json.loads((run_dir / "training_summary.json").read_text())
    record.update(steps=summary.get("steps"), train_minutes=summary.get("train_minutes"),
                  final_loss=summary.get("final_loss"), mixed_precision=summary.get("mixed_precision"))
    log = [json.loads(line) for line in (run_dir / "training_log.jsonl").read_text().splitlines() if line.strip()]
    if log:
        record["pairs_per_s"] = log[-1].get("pairs_per_s")
        record["final_gap"] = {k: v for k, v in log[-1].items() if k.startswith("gap/")}
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


def summarise(runs: list[dict], stem: Path, meta: dict) -> dict:
    """`<stem>.json` (means, std, n per row), `<stem>.md` (the table) and `<stem>.png`."""
    ok = [r for r in runs if r.get("returncode") == 0 and "metrics" in r]
    order = list(meta.get("rows") or [])
    names = [n for n in order if any(r["config"] == n for r in ok)]
    names += sorted({r["config"] for r in ok} - set(names))
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
            # from the stored suite results, so that a column added later covers earlier runs too
            vals = [_get(r["results"], *METRIC_SOURCE[col]) if col != "score" else r["score"] for r in rs]
            vals = [v for v in vals if v is not None]
            entry[col] = dict(zip(("mean", "std"), _mean_std(vals)))
        entry["steps"] = dict(zip(("mean", "std"), _mean_std([r["steps"] for r in rs if r.get("steps") is not None])))
        entry["train_minutes"] = dict(zip(("mean", "std"), _mean_std([r["train_minutes"] for r in rs
                                                                       if r.get("train_minutes") is not None])))
        table[n] = entry
    failed = [{"key": r["key"], "error": r.get("error", "")[-500:]} for r in runs if r.get("returncode") != 0]
    data = {"meta": meta, "chance": chance, "configs": table, "failed_runs": failed,
            "score_definition": f"mean of {SCORE}"}
    write_json(stem.with_suffix(".json"), data)
    stem.with_suffix(".md").write_text(markdown(data))
    plot(data, stem.with_suffix(".png"))
    return data


def markdown(data: dict) -> str:
    cols = [c for c, _, _ in METRICS]
    lines = ["| config | seeds | steps | minutes | " + " | ".join(cols) + " | score |",
             "|---|---:|---:|---:|" + "---:|" * (len(cols) + 1)]
    for n, e in data["configs"].items():
        spread = e["n_seeds"] > 1  # one seed has no spread to show
        cells = [(f"{100 * e[c]['mean']:.1f}" + (f" ± {100 * e[c]['std']:.1f}" if spread else ""))
                 if not math.isnan(e[c]["mean"]) else "" for c in cols + ["score"]]
        minutes = e.get("train_minutes", {}).get("mean", float("nan"))
        steps = f"{e['steps']['mean']:.0f}" + (f" ± {e['steps']['std']:.0f}" if spread else "")
        lines.append(f"| {n} | {e['n_seeds']} | {steps} | {minutes:.1f} | "
                     + " | ".join(cells[:-1]) + f" | {cells[-1]} |")
    ch = data.get("chance", {})
    lines.append("| *chance* | | | | " + " | ".join(f"{100 * ch[c]:.1f}" if c in ch else "" for c in cols) + " | |")
    meta = data.get("meta", {})
    bound = (f"{meta['max_steps']} steps per run (equal steps; the minutes column is each run's training time)"
             if meta.get("max_steps") else f"budget {meta.get('budget_minutes')} min of training per run")
    return ("Values in %, mean ± sample std over seeds; steps = optimizer steps reached. "
            f"Grid `{meta.get('grid')}`: {bound}, "
            f"{meta.get('jobs')} run(s) at a time with {meta.get('threads')} thread(s) each; every run is train.py's "
            f"default plus its row's flags; eval on {meta.get('eval_max_items') or 'all'} items per suite. "
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
    fig.suptitle(f"OneR grid '{meta.get('grid')}' at equal wall-clock budget ({meta.get('budget_minutes')} min/run), "
                 "mean ± std over seeds", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", default="ablation", choices=list(GRIDS), help="which table to fill")
    p.add_argument("--budget-minutes", type=float, default=5.0, help="training wall-clock per run (train.py --max_train_minutes)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="equal STEPS instead of equal time: every run trains this many steps (train.py --max_steps); "
                   "the table then compares at equal steps, and its time column is each run's own")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--configs", nargs="+", default=None, help="a subset of the grid's rows")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (2 cores: 2 runs of 1 thread, or 1 of 2)")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of each run (default: cores / jobs)")
    p.add_argument("--eval-max-items", type=int, default=None, help="train.py --eval_max_items (per suite); default: all")
    p.add_argument("--data-home", default=None, help="ONER_DATA_HOME for the runs (default: the usual root)")
    p.add_argument("--workdir", default=None,
                   help="run folders (models, logs); default: outputs/quality-runs in the project (--quick: OUT/runs)")
    p.add_argument("--out", default=None, help="where <grid>_runs.jsonl / .json / .md / .png go (default benchmarks/results)")
    p.add_argument("--report-only", action="store_true", help="only rebuild the summary from the JSON lines")
    p.add_argument("--quick", action="store_true", help="2 rows, 1 seed, a 32-wide model, seconds of training (the test)")
    args = p.parse_args(argv)

    out = Path(args.out) if args.out else RESULTS
    args.rows = dict(GRIDS[args.grid])
    args.extra_flags = {}
    if args.quick:
        args.budget_minutes = 0.05
        args.seeds = [0]
        args.configs = args.configs or [r for r in QUICK_ROWS if r in args.rows] or list(args.rows)[:2]
        args.extra_flags = dict(config_overrides=QUICK_OVERRIDES, per_device_batch_size=8, warmup_steps=1,
                                max_train_samples=32, logging_steps=1)
        args.eval_max_items = 8
        args.jobs = 1
        args.workdir = args.workdir or str(out / "runs")
    args.workdir = args.workdir or str(ROOT / "outputs" / "quality-runs")
    args.threads = args.threads or max((os.cpu_count() or 2) // args.jobs, 1)
    names = args.configs or list(args.rows)
    for n in names:
        if n not in args.rows:
            p.error(f"unknown row {n!r} of grid {args.grid!r}; choose from {list(args.rows)}")
    runs_path = out / f"{args.grid}_runs.jsonl"
    if args.max_steps:
        args.budget_minutes = None  # the runs are bounded by steps only
    meta = {"grid": args.grid, "rows": list(args.rows), "budget_minutes": args.budget_minutes,
            "max_steps": args.max_steps, "jobs": args.jobs,
            "threads": args.threads, "eval_max_items": args.eval_max_items, "seeds": args.seeds,
            "machine": machine(),
            "command": "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    stem = out / args.grid
    if args.report_only:
        summarise(same_bound(read_runs(runs_path), args), stem, meta)
        print(stem.with_suffix(".md").read_text())
        return 0

    out.mkdir(parents=True, exist_ok=True)
    pause = out / "quality.pause"
    done = {r["key"] for r in read_runs(runs_path) if r.get("returncode") == 0
            and r.get("budget_minutes") == args.budget_minutes and r.get("max_steps") == args.max_steps}
    todo = [(n, seed) for seed in args.seeds for n in names if run_key(n, seed) not in done]  # seed-major
    lock = threading.Lock()

    def run_and_record(item):
        name, seed = item
        while pause.exists():
            time.sleep(10)
        print(f"[quality] {name} seed {seed} (budget {args.budget_minutes} min, load {loadavg()})", flush=True)
        try:
            record = one_run(name, seed, args)
        except Exception as e:  # one broken run must not end the grid
            import traceback

            record = {"config": name, "seed": seed, "key": run_key(name, seed), "returncode": -1,
                      "budget_minutes": args.budget_minutes, "wall_s": 0.0,
                      "error": "".join(traceback.format_exception(e))[-2000:]}
        with lock:
            with runs_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            print(f"[quality]   {name} seed {seed} -> rc {record['returncode']}, steps {record.get('steps')}, "
                  f"score {record.get('score')}, wall {record['wall_s']} s", flush=True)
            summarise(same_bound(read_runs(runs_path), args), stem, meta)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(run_and_record, todo))
    data = summarise(same_bound(read_runs(runs_path), args), stem, meta)
    print(stem.with_suffix(".md").read_text())
    return 1 if data["failed_runs"] else 0


if __name__ == "__main__":
    sys.exit(main())
