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
  measured in the same run;
- where the bare step's time goes (`torch.profiler`): shares by phase (train.py's `oner:*` scopes:
  forward, objective, backward, clip, optimizer) and by kind of op (matrix products, casts and
  copies, memory fills, optimizer kernels, element-wise).

    python benchmarks/loop_speed.py                       # train.py's defaults, ~2 min when quiet
    python benchmarks/loop_speed.py --train-args "--objective itc+xmc+cmc"
    python benchmarks/loop_speed.py --precisions bf16 no  # both precisions, one after the other
    python benchmarks/loop_speed.py --quick               # seconds (the test)

Writes `loop_speed.json` and `loop_speed.md` into `--out` (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, loadavg, machine, median, reset_accelerate, write_json  # noqa: E402

import torch  # noqa: E402


# What each aten op's own (self) time counts as; everything else is element-wise work.
OP_KINDS = {
    "matrix products": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::mkldnn_convolution",
                        "aten::convolution_backward", "aten::_scaled_dot_product", "aten::linear"),
    "casts and copies": ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::contiguous", "aten::cat"),
    "memory (fill, zero, allocate)": ("aten::fill_", "aten::zero_", "aten::zeros", "aten::empty"),
    "optimizer kernels": ("aten::_fused_adamw", "aten::_foreach_"),
}
PHASES = ("forward", "objective", "backward", "clip", "optimizer")


def op_kind(name: str) -> str:
    for kind, prefixes in OP_KINDS.items():
        if name.startswith(prefixes):
            return kind
    return "element-wise and other ops"


def profile_shares(step, steps: int) -> dict:
    """Shares of a profiled step's op time by phase (the `oner:*` scopes of train.py's step) and by
    kind of op (each op's self time), plus the share of the wall time spent outside any op (Python,
    dispatch, the profiler's own cost)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        wall_us = (time.perf_counter() - start) * 1e6
    by_phase = dict.fromkeys([*PHASES, "other"], 0.0)
    by_kind = dict.fromkeys([*OP_KINDS, "element-wise and other ops"], 0.0)
    for event in prof.events():
        if event.device_type != DeviceType.CPU or not event.name.startswith("aten::"):
            continue
        phase, parent = "other", event.cpu_parent
        while parent is not None:  # the innermost oner:* scope the op ran in
            if parent.name.startswith("oner:"):
                phase = parent.name[len("oner:"):]
                break
            parent = parent.cpu_parent
        by_phase[phase] += event.self_cpu_time_total
        by_kind[op_kind(event.name)] += event.self_cpu_time_total
    in_ops = sum(by_kind.values())
    return {
        "steps": steps, "wall_ms_per_step": wall_us / steps / 1e3,
        "phase_share": {k: v / in_ops for k, v in by_phase.items()},
        "kind_share_of_op_time": {k: v / in_ops for k, v in by_kind.items()},
        "outside_ops_share_of_wall": max(1 - in_ops / wall_us, 0.0),
    }


def bare_step(train_argv: list[str], repeats: int, calls: int, profile_steps: int = 0) -> dict:
    """Seconds per `optimisation_step` on one real batch, and the step's FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    from oner.objectives import Objective, ObjectiveConfig
    from oner.training.args import parse_args
    from oner.training.loop import optimisation_step
    from oner.training.setup import Compute, build_model, make_accelerator, make_optimizer, make_scheduler
    from oner.training.checkpointing import TrainState
    from oner.training.data import make_dataloader, open_train_data
    from oner.training.runtime import keep_freed_memory

    args = parse_args(train_argv)
    compute = Compute.choose(args)
    keep_freed_memory()  # as train.py's setup does on a CPU
    reset_accelerate()
    accelerator = make_accelerator(args, compute)
    objective = Objective(ObjectiveConfig.from_flags(args))
    built = build_model(args, objective.config, compute.attn_implementation)
    pretrainer, processor, config = built.pretrainer, built.processor, built.config
    dataset = open_train_data(args, seed=args.seed, image_size=config.image_size)
    loader = make_dataloader(dataset, processor, args.per_device_batch_size, seed=args.seed, num_workers=0)
    batch = dict(next(iter(loader)))
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
    usage = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            step()
        times.append((time.perf_counter() - t) / calls)
    after = resource.getrusage(resource.RUSAGE_SELF)
    # Page faults and kernel time per step: freed memory faulted in again shows here (keep_freed_memory).
    faults_per_step = (after.ru_minflt - usage.ru_minflt) / (repeats * calls)
    system_ms_per_step = 1e3 * (after.ru_stime - usage.ru_stime) / (repeats * calls)
    profile = profile_shares(step, profile_steps) if profile_steps else None
    counter = FlopCounterMode(display=False)
    with counter:
        with accelerator.autocast():
            features = pretrainer(**batch)
            loss, _ = objective(features)
        accelerator.backward(loss)
    optimizer.zero_grad(set_to_none=True)
    return {"seconds_per_step": median(times), "all_seconds": times, "flops_per_step": int(counter.get_total_flops()),
            "batch_size": args.per_device_batch_size, "mixed_precision": compute.mixed_precision,
            "attn_implementation": compute.attn_implementation, "threads": compute.threads, "profile": profile,
            "page_faults_per_step": faults_per_step, "system_ms_per_step": system_ms_per_step}


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


def measure(train_argv: list[str], args, workdir: Path) -> dict:
    """Bare step (timed, then profiled and FLOP-counted) and the real loop for one set of train.py flags."""
    from speed import matmul_peak

    load_start = loadavg()
    bare = bare_step(train_argv, args.repeats, args.calls, args.profile_steps)
    loop = real_loop(train_argv, args.steps, workdir)
    dtype = torch.bfloat16 if bare["mixed_precision"] == "bf16" else torch.float32
    peak = matmul_peak(dtype)
    bare_pairs = bare["batch_size"] / bare["seconds_per_step"]
    achieved = bare["flops_per_step"] / bare["seconds_per_step"]
    return {
        "loadavg_at_start": load_start, "loadavg_at_end": loadavg(), "train_args": train_argv,
        "bare_step": bare, "loop": loop, "bare_pairs_per_s": bare_pairs, "loop_pairs_per_s": loop["pairs_per_s"],
        "loop_over_bare": loop["pairs_per_s"] / bare_pairs, "achieved_flops_per_s": achieved,
        "matmul_peak_flops_per_s": peak, "matmul_peak_dtype": str(dtype).replace("torch.", ""),
        "fraction_of_peak": achieved / peak,
    }


def markdown(result: dict) -> str:
    """One table per precision: speeds, then where the bare step's time goes."""
    parts = [f"`{result['command']}`; {result['machine']['cpu_model']}, {result['machine']['nproc']} cores."]
    for r in result["runs"]:
        bare, loop = r["bare_step"], r["loop"]
        parts.append(
            f"\n**{bare['mixed_precision']}** ({bare['threads']} thread(s), attention {bare['attn_implementation']}, "
            f"batch {bare['batch_size']}; machine load {r['loadavg_at_start']} at start, {r['loadavg_at_end']} at end)\n\n"
            "| measurement | pairs/s |\n|---|---:|\n"
            f"| bare step (`optimisation_step` on one batch) | {r['bare_pairs_per_s']:.0f} |\n"
            f"| train.py loop ({loop['step']} steps: data, logging, checkpoints) | {loop['pairs_per_s']:.0f} |\n"
            f"| data loader alone (pairs per second of waiting for it) | {loop['loader_pairs_per_s']:.0f} |\n\n"
            f"loop / bare step = {r['loop_over_bare']:.2f}; the loop waited for data "
            f"{100 * loop['data_wait_fraction']:.0f}% of the time. Bare step: {bare['flops_per_step'] / 1e9:.1f} GFLOP, "
            f"{r['achieved_flops_per_s'] / 1e9:.0f} GFLOP/s = {100 * r['fraction_of_peak']:.0f}% of the measured "
            f"{r['matmul_peak_dtype']} matmul peak ({r['matmul_peak_flops_per_s'] / 1e9:.0f} GFLOP/s); "
            f"{bare['page_faults_per_step']:.0f} page faults and {bare['system_ms_per_step']:.1f} ms of kernel time per step."
        )
        prof = bare.get("profile")
        if prof:
            rows = [f"| phase: {k} | {100 * v:.1f}% |" for k, v in prof["phase_share"].items() if v >= 0.0005]
            rows += [f"| op kind: {k} | {100 * v:.1f}% |" for k, v in prof["kind_share_of_op_time"].items()]
            parts.append(
                f"\nWhere the bare step's op time goes (torch.profiler, {prof['steps']} steps; outside any op: "
                f"{100 * prof['outside_ops_share_of_wall']:.0f}% of the wall time):\n\n"
                "| part | share of op time |\n|---|---:|\n" + "\n".join(rows)
            )
    return "\n".join(parts) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-args", default="", help="train.py flags for both measurements (default: its defaults)")
    p.add_argument("--precisions", nargs="+", default=None, choices=["bf16", "no", "fp16"],
                   help="measure each of these --mixed_precision settings in turn (default: train.py's own choice)")
    p.add_argument("--steps", type=int, default=120, help="steps of the real loop (its default checkpoints every 100)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--calls", type=int, default=4)
    p.add_argument("--profile-steps", type=int, default=5, help="bare steps under torch.profiler (0: no profile)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--quick", action="store_true", help="a tiny model, a few steps (the test)")
    args = p.parse_args(argv)
    train_argv = shlex.split(args.train_args)
    if args.quick:
        train_argv += ["--config_overrides", "hidden_size=32,intermediate_size=64,num_hidden_layers=1,"
                       "num_attention_heads=2,projection_dim=32,image_size=16,patch_size=8,max_position_embeddings=16",
                       "--per_device_batch_size", "8", "--max_train_samples", "64", "--checkpointing_steps", "3"]
        args.steps, args.repeats, args.calls, args.profile_steps = 6, 2, 2, 1
    variants = [[*train_argv, "--mixed_precision", p] for p in args.precisions] if args.precisions else [train_argv]
    runs = []
    for variant in variants:
        with tempfile.TemporaryDirectory(prefix="oner-loop-speed-") as tmp:
            runs.append(measure(variant, args, Path(tmp)))
    result = {"machine": machine(),
              "command": "python benchmarks/loop_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "runs": runs}
    out = Path(args.out)
    write_json(out / "loop_speed.json", result)
    md = markdown(result)
    (out / "loop_speed.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
