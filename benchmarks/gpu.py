#!/usr/bin/env python
"""GPU speed check (one script, well under 10 minutes on one GPU): the `base-patch16-224` preset
(ViT-B/16 width, 224 px, 78 text tokens) in bf16 autocast, training-step throughput and MFU against
the bf16 matmul peak measured in the same run, OneR (ITC and the full objective) vs
transformers' CLIPModel with each tower of the same shape.

    python benchmarks/gpu.py                          # on a GPU machine: writes gpu.json / gpu.md
    python benchmarks/gpu.py --quick --device cpu     # seconds, a 32-wide model: the test

Same measurement code as benchmarks/speed.py (alternating models, medians, FlopCounterMode).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, median, write_json  # noqa: E402

import torch  # noqa: E402

from speed import Trainer, alternate, make_batch, matmul_peak, oner_config, training_flops  # noqa: E402

from oner.training.args import parse_overrides  # noqa: E402  (train.py's --config_overrides)

QUICK_OVERRIDES = ("hidden_size=32,intermediate_size=64,num_hidden_layers=1,num_attention_heads=2,projection_dim=32,"
                   "image_size=32,patch_size=8,max_position_embeddings=16")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--preset", default="base-patch16-224")
    p.add_argument("--overrides", default="")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--peak-n", type=int, default=8192)
    p.add_argument("--max-minutes", type=float, default=9.0, help="stop adding repeats after this wall time")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.overrides = args.overrides or QUICK_OVERRIDES
        args.preset, args.batch_size, args.repeats, args.steps, args.peak_n = "tiny", 8, 2, 1, 256
        if args.device == "cpu":
            torch.set_num_threads(1)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu (and --quick) on a CPU machine", file=sys.stderr)
        return 2
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    start = time.time()
    from oner.objectives import PAPER_OBJECTIVE

    cfg = oner_config(args.preset, parse_overrides(args.overrides))
    dtype = torch.bfloat16
    peak = matmul_peak(dtype, args.peak_n, device=args.device)
    trainers = [Trainer("oner_itc", "oner", cfg, "itc", precision="bf16", device=args.device),
                Trainer("oner_full", "oner", cfg, PAPER_OBJECTIVE, precision="bf16", device=args.device),
                Trainer("clip", "clip", cfg, precision="bf16", device=args.device)]
    batch = make_batch(cfg, args.batch_size, device=args.device)
    times = alternate(trainers, "step", lambda _: batch, args.repeats, args.steps)
    flops = {t.name: training_flops(t, batch) for t in trainers}
    peak = max(peak, matmul_peak(dtype, args.peak_n, device=args.device))
    rows = {}
    for t in trainers:
        s = median(times[t.name])
        rows[t.name] = {"params_m": t.n_params / 1e6, "s_per_step": s, "pairs_per_s": args.batch_size / s,
                        "tflop_per_step": flops[t.name] / 1e12, "achieved_tflops": flops[t.name] / s / 1e12,
                        "mfu_vs_measured_bf16_peak": flops[t.name] / s / peak}
    mem = None
    if args.device.startswith("cuda"):
        mem = {"max_memory_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
               "gpu": torch.cuda.get_device_name()}
    result = {"machine": machine(), "device": args.device, "gpu": mem, "preset": args.preset,
              "overrides": args.overrides, "batch_size": args.batch_size, "precision": "bf16 autocast",
              "measured_bf16_matmul_peak_tflops": peak / 1e12, "train": rows,
              "oner_itc_over_clip": rows["oner_itc"]["pairs_per_s"] / rows["clip"]["pairs_per_s"],
              "full_cost_over_itc": rows["oner_itc"]["pairs_per_s"] / rows["oner_full"]["pairs_per_s"],
              "wall_s": round(time.time() - start, 1), "command": "python benchmarks/gpu.py " + " ".join(argv)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "gpu.json", result)
    lines = [f"Device {args.device} {mem['gpu'] if mem else ''}; preset {args.preset} {args.overrides}; batch "
             f"{args.batch_size}; bf16 autocast; measured bf16 matmul peak {peak / 1e12:.1f} TFLOP/s.", "",
             "| model | params (M) | pairs/s | TFLOP/step | achieved TFLOP/s | MFU (measured peak) |",
             "|---|---:|---:|---:|---:|---:|"]
    for k, r in rows.items():
        lines.append(f"| {k} | {r['params_m']:.1f} | {r['pairs_per_s']:.1f} | {r['tflop_per_step']:.3f} | "
                     f"{r['achieved_tflops']:.2f} | {100 * r['mfu_vs_measured_bf16_peak']:.1f}% |")
    lines += ["", f"OneR-ITC / CLIP pairs/s: {result['oner_itc_over_clip']:.2f}; full objective costs "
              f"{result['full_cost_over_itc']:.2f}x an ITC step; wall {result['wall_s']} s."]
    (out / "gpu.md").write_text("\n".join(lines) + "\n")
    print((out / "gpu.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
