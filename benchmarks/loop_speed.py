#!/usr/bin/env python
"""The training loop against its own bare step, in ONE process, with train.py's own code.

- bare step: `oner.training.loop.optimisation_step` (forward, objective, backward, NaN/inf check,
  clip, AdamW, scheduler, logit-scale clamp: exactly what train.py calls each step) on one batch
  that train.py's own data loader produced, repeated; the model, objective, precision, attention
  kernel and threads come from `parse_args` + `build_model` + `make_accelerator`, as in train.py;
- loop: `oner.training.main` itself (`python train.py` in-process) for `--steps` steps with data
  loading, logging and checkpoints, read from its own training log (pairs/s after the first step,
  plus the loader's own pairs/s and the share of time spent waiting for data);
- FLOPs of the bare step (`torch.utils.flop_counter`), against the bf16 / fp32 matmul peak
  measured in the same run.

    python benchmarks/loop_speed.py                       # train.py's defaults, ~2 min when quiet
    python benchmarks/loop_speed.py --train-args "--objective itc+xmc+cmc"
    python benchmarks/loop_speed.py --quick               # seconds (the test)

Writes `loop_speed.json` and `loop_speed.md` into `--out` (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, loadavg, machine, median, reset_accelerate, write_json  # noqa: E402

import torch  # noqa: E402


def bare_step(train_argv: list[str], repeats: int, calls: int) -> dict:
    """Seconds per `optimisation_step` on one real batch, and the step's FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    from oner.objectives import Objective
    from oner.training.args import parse_args
    from oner.training.loop import optimisation_step
    from oner.training.setup import build_model, make_accelerator, make_optimizer, make_scheduler, objective_config
    from oner.training.checkpointing import TrainState
    from oner.training.data import make_dataloader, open_train_data
    from oner.training.runtime import configure_threads

    args = parse_args(train_argv)
    threads, _ = configure_threads(args.num_threads)
    reset_accelerate()
    accelerator = make_accelerator(args)
    pretrainer, model, processor, config = build_model(args)
    dataset = open_train_data(args, seed=args.seed, image_size=config.image_size)
    loader, _ = make_dataloader(dataset, processor, args.per_device_batch_size, seed=args.seed, num_workers=0)
    batch = dict(next(iter(loader)))
    objective = Objective(objective_config(args))
    optimizer = make_optimizer(pretrainer, args)
    state = TrainState()
    state.total_steps = 10**9  # a constant learning rate for timing
    scheduler = make_scheduler(optimizer, args, state)
    pretrainer, optimizer, scheduler = accelerator.prepare(pretrainer, optimizer, scheduler)
    pretrainer.train()

    def step():
        return optimisation_step(pretrainer, objective, [batch], accelerator, optimizer, scheduler, None, args)

    for _ in range(2):
        step()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            step()
        times.append((time.perf_counter() - t) / calls)
    counter = FlopCounterMode(display=False)
    with counter:
        with accelerator.autocast():
            features = pretrainer(**batch)
            loss, _ = objective(features)
        accelerator.backward(loss)
    optimizer.zero_grad(set_to_none=True)
    return {"seconds_per_step": median(times), "all_seconds": times, "flops_per_step": int(counter.get_total_flops()),
            "batch_size": args.per_device_batch_size, "mixed_precision": args.mixed_precision,
            "attn_implementation": args.attn_implementation, "threads": threads}


def real_loop(train_argv: list[str], steps: int, workdir: Path) -> dict:
    """train.py itself for `steps` steps; its own log gives pairs/s (after the first step)."""
    from oner.training import main

    reset_accelerate()
    out = workdir / "loop"
    rc = main([*train_argv, "--max_steps", str(steps), "--output_dir", str(out), "--overwrite_output_dir", "--do_eval", "false",
               "--report_to", "none", "--logging_steps", str(max(steps // 4, 1))])
    if rc != 0:
        raise RuntimeError(f"train.py exited with {rc}")
    last = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines() if line.strip()][-1]
    return {k: last[k] for k in ("step", "pairs_per_s", "loader_pairs_per_s", "data_wait_fraction")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-args", default="", help="train.py flags for both measurements (default: its defaults)")
    p.add_argument("--steps", type=int, default=120, help="steps of the real loop (its default checkpoints every 100)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--calls", type=int, default=4)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--quick", action="store_true", help="a tiny model, a few steps (the test)")
    args = p.parse_args(argv)
    train_argv = shlex.split(args.train_args)
    if args.quick:
        train_argv += ["--config_overrides", "hidden_size=32,intermediate_size=64,num_hidden_layers=1,"
                       "num_attention_heads=2,projection_dim=32,image_size=16,patch_size=8,max_position_embeddings=16",
                       "--per_device_batch_size", "8", "--max_train_samples", "64", "--checkpointing_steps", "3"]
        args.steps, args.repeats, args.calls = 6, 2, 2
    from speed import matmul_peak

    load_start = loadavg()
    with tempfile.TemporaryDirectory(prefix="oner-loop-speed-") as tmp:
        bare = bare_step(train_argv, args.repeats, args.calls)
        loop = real_loop(train_argv, args.steps, Path(tmp))
    dtype = torch.bfloat16 if bare["mixed_precision"] == "bf16" else torch.float32
    peak = matmul_peak(dtype)
    bare_pairs = bare["batch_size"] / bare["seconds_per_step"]
    achieved = bare["flops_per_step"] / bare["seconds_per_step"]
    result = {
        "machine": machine(), "loadavg_at_start": load_start, "loadavg_at_end": loadavg(),
        "command": "python benchmarks/loop_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "train_args": train_argv, "bare_step": bare, "loop": loop,
        "bare_pairs_per_s": bare_pairs, "loop_pairs_per_s": loop["pairs_per_s"],
        "loop_over_bare": loop["pairs_per_s"] / bare_pairs,
        "achieved_flops_per_s": achieved, "matmul_peak_flops_per_s": peak, "fraction_of_peak": achieved / peak,
    }
    out = Path(args.out)
    write_json(out / "loop_speed.json", result)
    md = (
        f"`{result['command']}`; machine load {load_start} at start, {result['loadavg_at_end']} at end; "
        f"{bare['threads']} thread(s), {bare['mixed_precision']}, attention {bare['attn_implementation']}, "
        f"batch {bare['batch_size']}.\n\n"
        "| measurement | pairs/s |\n|---|---:|\n"
        f"| bare step (`optimisation_step` on one batch) | {bare_pairs:.0f} |\n"
        f"| train.py loop ({loop['step']} steps: data, logging, checkpoints) | {loop['pairs_per_s']:.0f} |\n"
        f"| data loader alone (pairs per second of waiting for it) | {loop['loader_pairs_per_s']:.0f} |\n\n"
        f"loop / bare step = {result['loop_over_bare']:.2f}; the loop waited for data "
        f"{100 * loop['data_wait_fraction']:.0f}% of the time. Bare step: {bare['flops_per_step'] / 1e9:.1f} GFLOP, "
        f"{achieved / 1e9:.0f} GFLOP/s = {100 * result['fraction_of_peak']:.0f}% of the measured "
        f"{'bf16' if dtype == torch.bfloat16 else 'fp32'} matmul peak ({peak / 1e9:.0f} GFLOP/s).\n"
    )
    (out / "loop_speed.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
