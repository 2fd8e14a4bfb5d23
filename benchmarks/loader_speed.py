#!/usr/bin/env python
"""The training data loader alone, PIL against the batched tensor backend, side by side.

train.py's own `open_train_data` + `make_dataloader` (its flags, seed, batch size, model image
size and processor) are built once per `--augment_backend`, then iterated in turns (pil, tensor,
pil, tensor, ...) so both see the same machine load. A first whole epoch per backend decodes and
caches the images (reported apart as "first pass"); then each turn reads `--batches` batches from
the cache. No model, no training step.

    python benchmarks/loader_speed.py                          # train.py's defaults
    python benchmarks/loader_speed.py --train-args "--randconv_probability 0.5"
    python benchmarks/loader_speed.py --quick                  # seconds (the test)

Writes `loader_speed.json` and `loader_speed.md` into `--out` (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, loadavg, machine, median, write_json  # noqa: E402

BACKENDS = ("pil", "tensor")


def make_loader(train_argv: list[str], backend: str):
    """train.py's data loader for `train_argv` with `--augment_backend backend`."""
    from oner.training.args import parse_args
    from oner.training.data import make_dataloader, open_train_data
    from oner.training.runtime import configure_threads
    from oner.objectives import ObjectiveConfig
    from oner.training.setup import build_model

    args = parse_args([*train_argv, "--augment_backend", backend])
    configure_threads(args.num_threads)
    built = build_model(args, ObjectiveConfig.from_flags(args), attn_implementation=None)
    processor, config = built.processor, built.config
    dataset = open_train_data(args, seed=args.seed, image_size=config.image_size)
    loader = make_dataloader(dataset, processor, args.per_device_batch_size, seed=args.seed,
                             num_workers=args.dataloader_num_workers)
    return loader, dataset, args


def read_batches(loader, dataset, batches: int, epoch: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) to read `batches` batches of a fresh epoch. The
    CPU time is what the loader costs whatever else the machine runs (with 0 loader workers)."""
    loader.sampler.set_epoch(epoch)
    dataset.set_epoch(epoch)
    start, cpu = time.perf_counter(), time.process_time()
    for i, batch in enumerate(loader):
        if i + 1 >= batches:
            break
    return time.perf_counter() - start, time.process_time() - cpu


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-args", default="", help="train.py flags for both backends (default: its defaults)")
    p.add_argument("--batches", type=int, default=20, help="batches per turn")
    p.add_argument("--turns", type=int, default=5, help="turns per backend after the first pass")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--quick", action="store_true", help="a few small batches (the test)")
    args = p.parse_args(argv)
    train_argv = shlex.split(args.train_args)
    if args.quick:
        train_argv += ["--per_device_batch_size", "8", "--max_train_samples", "64"]
        args.batches, args.turns = 4, 2
    load_start = loadavg()
    loaders = {backend: make_loader(train_argv, backend) for backend in BACKENDS}
    batch = loaders["pil"][2].per_device_batch_size
    cold = {b: read_batches(*loaders[b][:2], len(loaders[b][0]), epoch=0) for b in BACKENDS}
    warm: dict[str, list[tuple[float, float]]] = {b: [] for b in BACKENDS}
    for turn in range(args.turns):
        for backend in BACKENDS:
            warm[backend].append(read_batches(*loaders[backend][:2], args.batches, epoch=turn + 1))
    pairs = {b: batch * args.batches / median([wall for wall, _ in warm[b]]) for b in BACKENDS}
    cpu_pairs = {b: batch * args.batches / median([cpu for _, cpu in warm[b]]) for b in BACKENDS}
    cold_pairs = {b: batch * len(loaders[b][0]) / cold[b][0] for b in BACKENDS}
    result = {
        "machine": machine(), "loadavg_at_start": load_start, "loadavg_at_end": loadavg(),
        "command": "python benchmarks/loader_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "train_args": train_argv, "batch_size": batch, "batches_per_turn": args.batches, "turns": args.turns,
        "seconds_per_turn": warm, "cold_seconds": cold,
        "pairs_per_s": pairs, "pairs_per_cpu_s": cpu_pairs, "cold_pairs_per_s": cold_pairs,
        "tensor_over_pil": pairs["tensor"] / pairs["pil"], "tensor_over_pil_cpu": cpu_pairs["tensor"] / cpu_pairs["pil"],
    }
    out = Path(args.out)
    write_json(out / "loader_speed.json", result)
    md = (
        f"`{result['command']}`; machine load {load_start} at start, {result['loadavg_at_end']} at end; batch {batch}, "
        f"{args.batches} batches a turn, median of {args.turns} turns a backend, taken in turns.\n\n"
        "| augment backend | pairs/s (cached images) | pairs per CPU second | pairs/s (first pass: decode + cache) |\n"
        "|---|---:|---:|---:|\n"
        + "".join(f"| {b} | {pairs[b]:.0f} | {cpu_pairs[b]:.0f} | {cold_pairs[b]:.0f} |\n" for b in BACKENDS)
        + f"\ntensor / pil = {result['tensor_over_pil']:.2f} (wall clock), {result['tensor_over_pil_cpu']:.2f} (CPU time)\n"
    )
    (out / "loader_speed.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
