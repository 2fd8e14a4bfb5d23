"""Evaluation during training (`--eval_strategy steps|epoch`, `--eval_steps N`): the suites of
`--eval_suites` on a fixed-seed subset of `--eval_suites_max_items` items each, on the main process
while the others wait, logged to every tracker and to `training_log.jsonl`.

- What is evaluated is a fresh float32 copy of the model built from `gathered_model_state_dict`, the
  weights the final folder is built from. Every process takes part in gathering them (an all-gather
  under FSDP and DeepSpeed ZeRO-3; under DDP and ZeRO-2 each process already holds them), so all
  processes reach the same collective calls in the same order: none waits for one that never comes.
  The training model is never switched to eval mode nor touched.
- The copy attends with the kernel a loaded folder gets (`LOADED_ATTENTION`), so the numbers are the
  ones `oner-eval` gives on a folder saved at that step.
- Building the copy draws initial weights from the global RNG: the RNG states (torch CPU and
  accelerator, numpy, random) are put back afterwards, so a run with evaluation ends on the weights
  of the same run without it.
- The time it takes is taken off the training clock (`--max_train_minutes`, the time-based schedule,
  the throughput) by the loop, printed, and logged as `eval_seconds`.
"""

from __future__ import annotations

import contextlib
import copy
import random
import time

import numpy as np
import torch

from oner.evaluation import evaluate, is_metric

from .sharding import build_model_for_saving, gathered_model_state_dict

# What `AutoModel.from_pretrained` picks for OneR and transformers' CLIPModel (both support it).
LOADED_ATTENTION = "sdpa"


def evaluates_at_step(args, step: int) -> bool:
    return args.eval_strategy == "steps" and step % args.eval_steps == 0


def prepare_evaluation(args, accelerator) -> None:
    """Before training, with evaluation during training on: the embedded evaluation data is built
    (on the main process, once) so that no evaluation keeps the other processes waiting for it."""
    if args.eval_strategy == "no":
        return
    if accelerator.is_main_process:  # --eval_suites names suites of the embedded data set only
        from oner.evaluation.embedded_data import ensure_embedded

        ensure_embedded(None, progress=False)
    accelerator.wait_for_everyone()


@contextlib.contextmanager
def preserved_rng(device: torch.device):
    """Every global RNG the training uses is as before when the block ends."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def evaluate_during_training(run, step: int) -> float:
    """Evaluate the model of `step`; every process must call it. Returns the seconds it took here
    (waiting included), which the loop takes off its clock."""
    accelerator, args = run.accelerator, run.args
    started = time.monotonic()
    weights = gathered_model_state_dict(accelerator, run.pretrainer)  # a collective under FSDP
    if accelerator.is_main_process:
        with preserved_rng(accelerator.device):
            model = build_model_for_saving(run.model_class, copy.deepcopy(run.model.config), weights)
            next(m for m in model.modules() if hasattr(m, "set_attn_implementation")).set_attn_implementation(
                LOADED_ATTENTION)
            results = evaluate(model.to(accelerator.device), run.processor, args.eval_suite_names,
                               max_items=args.eval_suites_max_items, progress=False)
        del model, weights
        metrics = {f"eval/{suite}/{name}": float(value) for suite, values in results.items() if suite != "_meta"
                   for name, value in values.items() if is_metric(name)}
        seconds = time.monotonic() - started
        run.log.write({"step": step, **metrics, "eval_seconds": round(seconds, 2)})
        accelerator.log({**metrics, "eval_seconds": seconds}, step=step)
        shown = ", ".join(f"{k[len('eval/'):]} {v:.3f}" for k, v in metrics.items())
        accelerator.print(f"\nevaluation at step {step} ({seconds:.1f} s, not counted as training time): {shown}")
    accelerator.wait_for_everyone()
    return time.monotonic() - started
