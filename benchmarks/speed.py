#!/usr/bin/env python
"""Speed: OneR against transformers' own CLIPModel sized to match, in ONE process, alternating.

What is timed (medians over repeats; the order of the models rotates every repeat):

- training step = train.py's own `oner.training.loop.optimisation_step` (forward + objective +
  backward, NaN/inf check, grad-norm clip, AdamW with train.py's parameter groups and defaults,
  scheduler, logit-scale clamp), in pairs/s, for: OneR + naive ITC, OneR + the full objective
  (`oner.objectives.PAPER_OBJECTIVE`, xmc+cmc), CLIPModel + its contrastive loss (train.py's
  `--architecture clip` path: `oner.baseline.CLIPAsOneR` in `OneRPretrainer` + ITC);
- inference: image embeddings/s and text embeddings/s (`get_image_features` / `get_text_features`);
- memory: parameter + gradient + AdamW state bytes (exact), and the peak RSS growth over the first
  two training steps of a freshly built model in a child process (Linux `VmHWM` after resetting it
  through `/proc/self/clear_refs`; torch's CPU allocations are plain malloc/mmap, invisible to
  tracemalloc): activations, gradients and AdamW state;
- FLOPs of one training step's forward + backward from `torch.utils.flop_counter.FlopCounterMode`
  (matmuls, convolutions, attention), hence achieved FLOP/s, against the fp32 / bf16 matmul peak
  measured in the same run (square matmuls, best of several);
- fp32 and bf16 autocast (an Accelerator with `--mixed_precision no` / `bf16`, as train.py's: bf16
  autocast around the pretrainer's forward);
- "equal work": the matched CLIPModel has the same tower shape, so the same FLOPs per pair as OneR
  with ITC (both run one image sequence and one text sequence through a tower of that shape) and
  about twice the transformer parameters. A second comparison gives OneR twice the layers (equal
  transformer parameters, twice the FLOPs per pair). Both readings are reported.

    python benchmarks/speed.py                 # tiny preset, batch 64: a few minutes on 2 cores
    python benchmarks/speed.py --quick         # seconds (the test)

Writes `speed.json`, `speed.md`, `speed_batch.png` (throughput vs batch size) and
`speed_profile.txt` (torch.profiler top ops) into `--out` (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, loadavg, machine, median, reset_accelerate, write_json  # noqa: E402

import torch  # noqa: E402

from oner.training.args import parse_overrides  # noqa: E402  (train.py's --config_overrides)

PRECISIONS = ("fp32", "bf16")


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def oner_config(preset: str, overrides: dict):
    from modeling_oner import OneRConfig

    return OneRConfig.from_preset(preset, **overrides)


class Trainer:
    """One model behind train.py's own step: its pretrainer, objective, optimizer, scheduler and
    `oner.training.loop.optimisation_step`, under an Accelerator of one precision.

    `precision` "bf16" is `--mixed_precision bf16`: accelerate wraps the pretrainer's forward in
    bf16 autocast, as in train.py; "fp32" runs without. The optimizer settings are train.py's defaults.
    """

    def __init__(self, name: str, kind: str, cfg, objective: str | None = None, precision: str = "fp32",
                 device: str = "cpu"):
        from oner.objectives import Objective, ObjectiveConfig, parse_objective
        from oner.training.args import parse_args
        from oner.training.checkpointing import TrainState
        from oner.training.setup import make_optimizer, make_scheduler
        from oner.training.pretrainer import OneRPretrainer

        self.name, self.kind, self.objective_spec, self.precision = name, kind, objective, precision
        if kind == "clip":  # the baseline behind OneR's interface, as train.py --architecture clip builds it
            from oner.baseline import build_clip

            self.model, _ = build_clip(cfg)
            oc = ObjectiveConfig(weights={"itc": 1.0})
        else:
            from modeling_oner import OneRModel

            self.model = OneRModel(cfg)
            oc = ObjectiveConfig(weights=parse_objective(objective))
        self.pretrainer = OneRPretrainer(self.model, oc)
        self.objective = Objective(oc)
        self.args = parse_args([])
        self.accelerator = accelerator_for(precision, device)
        state = TrainState()
        state.total_steps = 10**9  # the learning rate stays at its warm-up start: nothing to time there
        optimizer = make_optimizer(self.pretrainer, self.args)
        scheduler = make_scheduler(optimizer, self.args, state)
        self.pretrainer, self.optimizer, self.scheduler = self.accelerator.prepare(self.pretrainer, optimizer, scheduler)
        self.device = self.accelerator.device
        self.pretrainer.train()
        self.params = [p for p in self.pretrainer.parameters() if p.requires_grad]
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.attn = getattr(self.model.config, "_attn_implementation", None)

    def forward_backward(self, batch):
        """train.py's forward + objective + backward of one step (`oner.training.step.forward_backward`)."""
        from oner.training.step import forward_backward

        return forward_backward(self.pretrainer, self.objective, [batch], self.accelerator)

    def step(self, batch):
        """train.py's whole step: forward, backward, NaN/inf check, clip, AdamW, scheduler, logit-scale clamp."""
        from oner.training.loop import optimisation_step

        loss, _, _, _ = optimisation_step(self.pretrainer, self.objective, [batch], self.accelerator, self.optimizer,
                                          self.scheduler, None, self.args)
        return loss

    @torch.inference_mode()
    def image_features(self, batch):
        with self.accelerator.autocast():
            return self.model.get_image_features(pixel_values=batch["pixel_values"])

    @torch.inference_mode()
    def text_features(self, batch):
        with self.accelerator.autocast():
            return self.model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    def state_bytes(self) -> int:
        """Parameters + gradients + AdamW's two moments, fp32."""
        return 4 * 4 * sum(p.numel() for p in self.params)


def accelerator_for(precision: str, device: str = "cpu"):
    """An Accelerator as train.py's with `--mixed_precision bf16` or `no`. accelerate keeps ONE
    precision per process, so its state is reset first: build one precision's trainers, time them,
    then the other's."""
    from accelerate import Accelerator

    reset_accelerate()
    return Accelerator(cpu=torch.device(device).type == "cpu", mixed_precision="bf16" if precision == "bf16" else "no")


def make_batch(cfg, batch_size: int, seed: int = 0, device: str = "cpu") -> dict:
    g = torch.Generator().manual_seed(seed)
    length = cfg.max_position_embeddings
    ids = torch.randint(1000, 30000, (batch_size, length), generator=g)
    ids[:, -1] = 102  # [SEP]: CLIP pools its text at the first end-of-text token (a plain word for OneR)
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(batch_size, cfg.num_channels, cfg.image_size, cfg.image_size, generator=g),
    }
    return {k: v.to(device) for k, v in batch.items()}


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------


def matmul_peak(dtype, n: int = 1536, repeats: int = 5, inner: int = 4, device: str = "cpu") -> float:
    """Best FLOP/s of an n x n x n matmul (a warm-up call first)."""
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    sync(device)
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner):
            a @ b
        sync(device)
        best = max(best, 2 * n**3 * inner / (time.perf_counter() - t))
    return best


def time_calls(fn, n: int, device="cpu") -> float:
    """Seconds per call of `fn` over `n` calls."""
    sync(device)
    t = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return (time.perf_counter() - t) / n


def alternate(trainers: list, what: str, batch_of, repeats: int, calls: int) -> dict[str, list[float]]:
    """Seconds per call of `what` for each trainer; trainers alternate, their order rotates each repeat."""
    times = {t.name: [] for t in trainers}
    for t in trainers:  # warm-up: first calls pay allocation and (for AdamW) state creation
        getattr(t, what)(batch_of(t))
    for r in range(repeats):
        order = trainers[r % len(trainers):] + trainers[: r % len(trainers)]
        for t in order:
            b = batch_of(t)
            times[t.name].append(time_calls(lambda: getattr(t, what)(b), calls, t.device))
    return times


def _sdpa_cpu_fwd(q, k, v, *args, out_val=None, **kwargs):
    b, h, lq, d = q
    return 4 * b * h * lq * k[2] * d  # QK^T and PV


def _sdpa_cpu_bwd(grad_out, q, k, v, *args, out_val=None, **kwargs):
    b, h, lq, d = q
    return 8 * b * h * lq * k[2] * d  # four matmuls, torch's own convention for SDPA backward


def _flop_mapping() -> dict:
    """FlopCounterMode counts no FLOPs for the CPU flash-attention kernel that SDPA uses on the CPU
    (checked on torch 2.13: 0 FLOPs); these formulas add them, full (unmasked) attention counted."""
    aten = torch.ops.aten
    out = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        out[aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_fwd
        out[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _sdpa_cpu_bwd
    return out


def training_flops(trainer: Trainer, batch) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=_flop_mapping() if trainer.device.type == "cpu" else None)
    with counter:
        trainer.forward_backward(batch)
    trainer.optimizer.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def memory_probe_main(spec: str) -> int:
    """Child process of [`peak_step_rss_fresh`]: build one model, time nothing, print its peak RSS growth."""
    import json

    d = json.loads(spec)
    if d.get("threads"):
        torch.set_num_threads(d["threads"])
    cfg = oner_config(d["preset"], d["overrides"])
    trainer = Trainer(d["name"], d["kind"], cfg, d["objective"], precision=d["dtype"])
    batch = make_batch(cfg, d["batch_size"])
    import gc

    gc.collect()
    before = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    trainer.step(batch)  # the first step also creates AdamW's state
    trainer.step(batch)
    print("MEMORY_PROBE " + json.dumps({"rss_before_mib": before / 1024,
                                        "peak_growth_mib": max(_rss_kib("VmHWM") - before, 0) / 1024}))
    return 0


def peak_step_rss_fresh(name, kind, objective, preset, overrides, batch_size, dtype_name, threads=None) -> dict | None:
    """Peak RSS growth over two training steps in a FRESH process (after the model is built): in one
    long-lived process glibc keeps freed memory, so later models would show no growth at all."""
    import json
    import subprocess

    spec = json.dumps(dict(name=name, kind=kind, objective=objective, preset=preset, overrides=overrides,
                           batch_size=batch_size, dtype=dtype_name, threads=threads))
    proc = subprocess.run([sys.executable, __file__, "--memory-probe", spec], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("MEMORY_PROBE "):
            return json.loads(line.split(" ", 1)[1])
    return None


def memory_only(args) -> int:
    """Peak RSS growth of each model's first two training steps, fresh processes -> speed_memory.json."""
    from oner.objectives import PAPER_OBJECTIVE

    overrides = parse_overrides(args.overrides)
    cfg = oner_config(args.preset, overrides)
    deep = {**overrides, "num_hidden_layers": 2 * cfg.num_hidden_layers}
    models = [("oner_itc", "oner", "itc", overrides), ("oner_full", "oner", PAPER_OBJECTIVE, overrides),
              ("clip", "clip", None, overrides), ("oner_itc_2x_layers", "oner", "itc", deep)]
    out = {"machine": machine(), "preset": args.preset, "batch_size": args.batch_size, "memory": {}}
    lines = ["| model | precision | RSS after build (MiB) | peak RSS growth, 2 fresh steps (MiB) |", "|---|---|---:|---:|"]
    for dname in ("fp32", "bf16"):
        for name, kind, objective, ov in models:
            r = peak_step_rss_fresh(name, kind, objective, args.preset, ov, args.batch_size, dname, args.threads) or {}
            out["memory"][f"{name}/{dname}"] = r
            lines.append(f"| {name} | {dname} | {r.get('rss_before_mib', float('nan')):.0f} | "
                         f"{r.get('peak_growth_mib', float('nan')):.0f} |")
    write_json(Path(args.out) / "speed_memory.json", out)
    (Path(args.out) / "speed_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def profile_step(trainer: Trainer, batch, rows: int = 18) -> str:
    from torch.profiler import ProfilerActivity, profile

    trainer.step(batch)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        trainer.step(batch)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------


def run(args) -> dict:
    torch.manual_seed(0)
    overrides = parse_overrides(args.overrides)
    cfg = oner_config(args.preset, overrides)
    deep_overrides = {**overrides, "num_hidden_layers": 2 * cfg.num_hidden_layers}
    deep_cfg = oner_config(args.preset, deep_overrides)
    from oner.objectives import PAPER_OBJECTIVE

    result = {"machine": machine(), "settings": {
        "preset": args.preset, "overrides": overrides, "batch_size": args.batch_size,
        "hidden_size": cfg.hidden_size, "layers": cfg.num_hidden_layers, "heads": cfg.num_attention_heads,
        "intermediate_size": cfg.intermediate_size, "image_size": cfg.image_size, "patch_size": cfg.patch_size,
        "image_tokens": cfg.num_patches + 1, "text_tokens": cfg.max_position_embeddings,
        "repeats": args.repeats, "steps_per_repeat": args.steps, "full_objective": PAPER_OBJECTIVE,
        "command": "python benchmarks/speed.py " + " ".join(args.argv)}}
    peaks = {"fp32": [matmul_peak(torch.float32, args.peak_n)], "bf16": [matmul_peak(torch.bfloat16, args.peak_n)]}

    batch = make_batch(cfg, args.batch_size)
    train, infer_img, infer_txt, flops, memory, sweep, prof = {}, {}, {}, {}, {}, {}, []
    for dname in PRECISIONS:  # one precision's trainers at a time (see `accelerator_for`)
        torch.manual_seed(0)
        trainers = [
            Trainer("oner_itc", "oner", cfg, "itc", precision=dname),
            Trainer("oner_full", "oner", cfg, PAPER_OBJECTIVE, precision=dname),
            Trainer("clip", "clip", cfg, precision=dname),
        ]
        if not args.quick:
            trainers.append(Trainer("oner_itc_2x_layers", "oner", deep_cfg, "itc", precision=dname))
        t = alternate(trainers, "step", lambda _: batch, args.repeats, args.steps)
        train[dname] = {k: {"s_per_step": median(v), "pairs_per_s": args.batch_size / median(v),
                            "all_s": [round(x, 4) for x in v]} for k, v in t.items()}
        ti = alternate(trainers[:1] + trainers[2:3], "image_features", lambda _: batch, args.repeats, args.steps)
        tt = alternate(trainers[:1] + trainers[2:3], "text_features", lambda _: batch, args.repeats, args.steps)
        infer_img[dname] = {k: args.batch_size / median(v) for k, v in ti.items()}
        infer_txt[dname] = {k: args.batch_size / median(v) for k, v in tt.items()}
        flops[dname] = {tr.name: training_flops(tr, batch) for tr in trainers}
        memory[dname] = {tr.name: {"state_mib": tr.state_bytes() / 2**20,
                                   **(peak_step_rss_fresh(tr.name, tr.kind, tr.objective_spec, args.preset,
                                                          deep_overrides if tr.name.endswith("2x_layers") else overrides,
                                                          args.batch_size, dname, args.threads) or {})}
                         for tr in trainers}
        print(f"[speed] {dname}: " + ", ".join(f"{k} {v['pairs_per_s']:.1f} pairs/s" for k, v in train[dname].items()),
              flush=True)

        # Throughput vs batch size (OneR ITC / full objective vs CLIP).
        sweep[dname] = {}
        for bs in args.batch_sizes:
            b = make_batch(cfg, bs)
            t = alternate(trainers[:3], "step", lambda _: b, max(args.repeats // 2, 2), max(args.steps // 2, 1))
            sweep[dname][bs] = {k: bs / median(v) for k, v in t.items()}
            print(f"[speed] sweep {dname} batch {bs}: " + ", ".join(f"{k} {v:.1f}" for k, v in sweep[dname][bs].items()),
                  flush=True)
        if not args.quick:
            for tr in trainers[:3]:
                prof.append(f"==== {tr.name} {dname} batch {args.batch_size}: one training step, top ops by self CPU time\n")
                prof.append(profile_step(tr, batch))
    peaks["fp32"].append(matmul_peak(torch.float32, args.peak_n))
    peaks["bf16"].append(matmul_peak(torch.bfloat16, args.peak_n))
    peak = {k: max(v) for k, v in peaks.items()}

    params = {tr.name: tr.n_params for tr in trainers}
    result.update(train=train, inference_images_per_s=infer_img, inference_texts_per_s=infer_txt,
                  train_step_flops=flops, memory=memory, matmul_peak_flops=peak, matmul_peak_all=peaks,
                  batch_sweep_pairs_per_s=sweep, parameters=params,
                  attention={tr.name: tr.attn for tr in trainers}, loadavg_at_end=loadavg())
    result["derived"] = derive(result, args.batch_size)
    if prof:
        (Path(args.out) / "speed_profile.txt").write_text("\n".join(prof))
    return result


def derive(r: dict, batch_size: int) -> dict:
    d = {}
    for dname in ("fp32", "bf16"):
        tr = r["train"][dname]
        pps = {k: v["pairs_per_s"] for k, v in tr.items()}
        flops = r["train_step_flops"][dname]
        x = {
            "oner_itc_over_clip_pairs_per_s": pps["oner_itc"] / pps["clip"],
            "full_cost_over_itc": pps["oner_itc"] / pps["oner_full"],
            "flops_per_pair": {k: v / batch_size for k, v in flops.items()},
            "achieved_flops_per_s": {k: flops[k] / tr[k]["s_per_step"] for k in flops},
        }
        # FLOP-normalised: pairs/s per (FLOP per pair) = achieved FLOP/s; the ratio at equal work.
        x["oner_itc_over_clip_flops_per_s"] = x["achieved_flops_per_s"]["oner_itc"] / x["achieved_flops_per_s"]["clip"]
        if "oner_itc_2x_layers" in pps:
            x["oner_2x_layers_itc_over_clip_pairs_per_s"] = pps["oner_itc_2x_layers"] / pps["clip"]
        x["mfu_vs_same_dtype_peak"] = {k: v / r["matmul_peak_flops"][dname] for k, v in x["achieved_flops_per_s"].items()}
        x["mfu_vs_fp32_peak"] = {k: v / r["matmul_peak_flops"]["fp32"] for k, v in x["achieved_flops_per_s"].items()}
        d[dname] = x
    d["bf16_over_fp32_pairs_per_s"] = {k: r["train"]["bf16"][k]["pairs_per_s"] / r["train"]["fp32"][k]["pairs_per_s"]
                                       for k in r["train"]["fp32"]}
    d["bf16_over_fp32_matmul_peak"] = r["matmul_peak_flops"]["bf16"] / r["matmul_peak_flops"]["fp32"]
    f = d["fp32"]
    d["targets"] = {
        "oner_itc >= 1.3x clip pairs/s (same shape = same FLOPs/pair)": [f["oner_itc_over_clip_pairs_per_s"], 1.3,
                                                                         f["oner_itc_over_clip_pairs_per_s"] >= 1.3],
        "full objective <= 1.8x the cost of oner_itc": [f["full_cost_over_itc"], 1.8, f["full_cost_over_itc"] <= 1.8],
        "oner_itc step >= 60% of measured fp32 matmul peak": [f["mfu_vs_same_dtype_peak"]["oner_itc"], 0.6,
                                                              f["mfu_vs_same_dtype_peak"]["oner_itc"] >= 0.6],
        "bf16 >= 1.5x fp32 (oner_itc pairs/s)": [d["bf16_over_fp32_pairs_per_s"]["oner_itc"], 1.5,
                                                 d["bf16_over_fp32_pairs_per_s"]["oner_itc"] >= 1.5],
    }
    return d


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def markdown(r: dict) -> str:
    s, m, d = r["settings"], r["machine"], r["derived"]
    lines = [
        f"Machine: {m['nproc']} cores ({m['cpu_model']}), torch {m['torch']} ({m['torch_threads']} threads), "
        f"transformers {m['transformers']}; load average at start {m['loadavg_at_start']}, at end {r['loadavg_at_end']}.",
        f"Model: preset `{s['preset']}` {s['overrides'] or ''} (width {s['hidden_size']}, {s['layers']} layers, "
        f"{s['heads']} heads, MLP {s['intermediate_size']}, {s['image_size']} px / patch {s['patch_size']} = "
        f"{s['image_tokens']} image tokens, {s['text_tokens']} text tokens), batch {s['batch_size']}; "
        f"median of {s['repeats']} repeats x {s['steps_per_repeat']} steps; attention {r['attention']}.",
        f"Measured matmul peak (same run): fp32 {r['matmul_peak_flops']['fp32'] / 1e9:.0f} GFLOP/s, "
        f"bf16 {r['matmul_peak_flops']['bf16'] / 1e9:.0f} GFLOP/s.",
        "",
        "| model | params (M) | precision | pairs/s (train) | GFLOP/pair (fwd+bwd) | achieved GFLOP/s | % of peak | "
        "peak RSS growth, 2 fresh steps (MiB) | param+grad+Adam (MiB) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for dname in ("fp32", "bf16"):
        for k, v in r["train"][dname].items():
            mem = r["memory"][dname][k]
            lines.append(
                f"| {k} | {r['parameters'][k] / 1e6:.2f} | {dname} | {v['pairs_per_s']:.1f} | "
                f"{d[dname]['flops_per_pair'][k] / 1e9:.3f} | {d[dname]['achieved_flops_per_s'][k] / 1e9:.1f} | "
                f"{100 * d[dname]['mfu_vs_same_dtype_peak'][k]:.0f} | "
                f"{mem.get('peak_growth_mib', float('nan')):.0f} | {mem['state_mib']:.0f} |")
    lines += ["", "| inference | precision | OneR | CLIPModel | ratio |", "|---|---|---:|---:|---:|"]
    for what, key in (("image embeddings/s", "inference_images_per_s"), ("text embeddings/s", "inference_texts_per_s")):
        for dname in ("fp32", "bf16"):
            o, c = r[key][dname]["oner_itc"], r[key][dname]["clip"]
            lines.append(f"| {what} | {dname} | {o:.0f} | {c:.0f} | {o / c:.2f} |")
    lines += ["", "| target | measured | wanted | met |", "|---|---:|---:|---|"]
    for name, (value, want, met) in d["targets"].items():
        lines.append(f"| {name} | {value:.2f} | {want} | {'yes' if met else 'NO'} |")
    extra = []
    for dname in ("fp32", "bf16"):
        x = d[dname]
        extra.append(f"- {dname}: OneR-ITC / CLIP pairs/s = {x['oner_itc_over_clip_pairs_per_s']:.2f}; "
                     f"achieved-FLOP/s ratio (work-normalised) = {x['oner_itc_over_clip_flops_per_s']:.2f}"
                     + (f"; OneR 2x layers (equal transformer params) / CLIP pairs/s = "
                        f"{x['oner_2x_layers_itc_over_clip_pairs_per_s']:.2f}" if "oner_2x_layers_itc_over_clip_pairs_per_s" in x else "")
                     + f"; full objective costs {x['full_cost_over_itc']:.2f}x an ITC step")
    extra.append("- bf16/fp32 training pairs/s: " + ", ".join(f"{k} {v:.2f}" for k, v in d["bf16_over_fp32_pairs_per_s"].items())
                 + f"; bf16/fp32 matmul peak {d['bf16_over_fp32_matmul_peak']:.2f}")
    return "\n".join(lines + [""] + extra) + "\n"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, dname in zip(axes, ("fp32", "bf16")):
        sweep = r["batch_sweep_pairs_per_s"][dname]
        sizes = sorted(int(b) for b in sweep)
        for name in next(iter(sweep.values())):
            ax.plot(sizes, [sweep[b][name] if b in sweep else sweep[str(b)][name] for b in sizes], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size (pairs)")
        ax.set_ylabel("training pairs/s")
        ax.set_title(f"{dname}: fwd+bwd+AdamW, {r['settings']['preset']}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{r['machine']['nproc']} cores, load {r['machine']['loadavg_at_start'][:1]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--overrides", default="", help="OneRConfig fields, 'hidden_size=128,num_hidden_layers=2'")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32, 64, 128], help="the throughput sweep")
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--steps", type=int, default=2, help="timed calls per repeat")
    p.add_argument("--peak-n", type=int, default=1536, help="matmul size of the peak measurement")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--quick", action="store_true", help="a 32-wide model, 2 repeats: seconds (the test)")
    p.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    p.add_argument("--memory-only", action="store_true", help="only the fresh-process memory probes -> speed_memory.json")
    args = p.parse_args(argv)
    if args.memory_probe:
        return memory_probe_main(args.memory_probe)
    if args.memory_only:
        return memory_only(args)
    args.argv = argv
    if args.quick:
        args.overrides = args.overrides or ("hidden_size=32,intermediate_size=64,num_hidden_layers=1,num_attention_heads=2,"
                                            "projection_dim=32,image_size=32,patch_size=8,max_position_embeddings=16")
        args.batch_size, args.batch_sizes, args.repeats, args.steps, args.peak_n = 8, [4, 8], 2, 1, 256
        args.threads = args.threads or 1  # robust to a busy machine (see docs/benchmarks.md)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    r = run(args)
    write_json(out / "speed.json", r)
    (out / "speed.md").write_text(markdown(r))
    plot(r, out / "speed_batch.png")
    print((out / "speed.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
