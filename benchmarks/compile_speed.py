#!/usr/bin/env python
"""Does `--torch_compile` pay for its compile time? train.py itself, eager against compiled, in turns.

Each run is `python train.py` (the default recipe unless `--train-args` says otherwise) for `--steps`
steps without evaluation, with a fresh, empty inductor cache (`TORCHINDUCTOR_CACHE_DIR`), so the
compile time is the one a user's first run pays. From the run's own training log:

- startup: seconds to the first logged step (compiling happens during the first steps);
- steady pairs/s: from the first logged step to the last (compiled code only);
- total: the training seconds of the whole run, and the step count at which the compiled run's
  total equals the eager one's (break-even), from the two speeds.

    python benchmarks/compile_speed.py                              # 300 steps, 2 rounds, ~40 min
    python benchmarks/compile_speed.py --variants eager regional --rounds 1 --steps 40   # minutes

Results are appended to `compile_speed_runs.jsonl` (one line per run, with load and commit) and
summarised in `compile_speed.md`, in `--out` (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, loadavg, machine, median  # noqa: E402

VARIANTS = {
    "eager": [],
    "regional": ["--torch_compile", "--torch_compile_regional", "true"],
    "full": ["--torch_compile", "--torch_compile_regional", "false"],
}


def run_once(variant: str, args) -> dict:
    with tempfile.TemporaryDirectory(prefix="oner-compile-") as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "train.py", "--max_steps", str(args.steps), "--do_eval", "false",
               "--report_to", "none", "--checkpointing_steps", "0", "--num_threads", str(args.threads),
               "--output_dir", str(out), *VARIANTS[variant], *shlex.split(args.train_args)]
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(Path(tmp) / "inductor-cache"),
               "OMP_NUM_THREADS": str(args.threads)}
        load_start, started = loadavg(), time.time()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.time() - started
        if proc.returncode != 0:
            raise SystemExit(f"{variant}: train.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        log = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
        batch = json.loads((out / "training_summary.json").read_text())["global_batch_size"]
    logged = [r for r in log if "elapsed_s" in r]
    first, last = logged[0], logged[-1]
    if last["elapsed_s"] <= first["elapsed_s"]:  # the log keeps tenths of a second
        raise SystemExit(f"{variant}: steps {first['step']}-{last['step']} took under 0.1 s; give more --steps")
    steady = (last["step"] - first["step"]) * batch / (last["elapsed_s"] - first["elapsed_s"])
    return {"variant": variant, "steps": last["step"], "batch": batch, "threads": args.threads,
            "train_args": args.train_args,
            "startup_s": first["elapsed_s"], "first_logged_step": first["step"], "steady_pairs_per_s": steady,
            "train_s": last["elapsed_s"], "wall_s": wall, "final_loss": last["loss"],
            "loadavg_start": load_start, "loadavg_end": loadavg(), "machine": machine()}


def summarise(rows: list[dict], out: Path) -> None:
    by_variant: dict[str, list[dict]] = {}
    for r in rows:
        by_variant.setdefault(r["variant"], []).append(r)
    eager = by_variant.get("eager")
    lines = ["| variant | runs | steps | startup s (to the first logged step) | steady pairs/s | train s | "
             "loss at the end | break-even step vs eager |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, rs in by_variant.items():
        startup = median(r["startup_s"] for r in rs)
        speed = median(r["steady_pairs_per_s"] for r in rs)
        even = ""
        if eager and name != "eager":
            eager_speed = median(r["steady_pairs_per_s"] for r in eager)
            eager_startup = median(r["startup_s"] for r in eager)
            batch = rs[0]["batch"]
            saved_per_step = batch / eager_speed - batch / speed
            even = f"{(startup - eager_startup) / saved_per_step:.0f}" if saved_per_step > 0 else "never"
        lines.append(f"| {name} | {len(rs)} | {rs[0]['steps']} | {startup:.1f} | {speed:.0f} | "
                     f"{median(r['train_s'] for r in rs):.1f} | "
                     f"{median(r['final_loss'] for r in rs):.3f} | {even} |")
    loads = [r["loadavg_start"][0] for r in rows] + [r["loadavg_end"][0] for r in rows]
    text = (f"`python benchmarks/compile_speed.py` runs, medians over rounds; {rows[0]['machine']['cpu_model']}; "
            f"{rows[0]['threads']} thread(s); 1-minute load {min(loads):.1f}-{max(loads):.1f}.\n\n" + "\n".join(lines) + "\n")
    (out / "compile_speed.md").write_text(text)
    print(text)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--train-args", default="", help="more train.py flags, one string")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    runs_file = args.out / "compile_speed_runs.jsonl"
    for round_ in range(args.rounds):
        for variant in args.variants:
            row = {**run_once(variant, args), "round": round_}
            print(json.dumps(row), flush=True)
            with runs_file.open("a") as f:
                f.write(json.dumps(row) + "\n")
    summarise([json.loads(line) for line in runs_file.read_text().splitlines()], args.out)


if __name__ == "__main__":
    main()
