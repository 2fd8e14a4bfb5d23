"""The training loop behind `train.py`: `setup` (oner.training.setup), the steps with their NaN
guard, logging and checkpoints (here), and the end of the run (oner.training.finish).

Everything runs under one `accelerate.Accelerator`, so the same code serves `python train.py`
(one process), `accelerate launch train.py` and multi-GPU / multi-node launches.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field

import torch
from accelerate.utils import broadcast, send_to_device
from torch.profiler import record_function

from oner.losses import clamp_logit_scale_
from oner.progress import progress, quiet_library_bars

from .args import parse_args
from .checkpointing import save_checkpoint, settings_to_match
from .eval_during_training import evaluate_during_training, evaluates_at_step
from .finish import finish_run
from .mlm import whole_word_mask
from .setup import Run, UserError, setup
from .sharding import build_model_for_saving, engine, gathered_model_state_dict, parameter_value, weights_are_finite
from .step import forward_backward
from .tracking import format_eta


def main(argv: list[str] | None = None) -> int:
    """Entry point of `train.py`; returns the process exit status."""
    args = parse_args(argv)
    quiet_library_bars()  # outside a terminal: plain lines only (oner.progress)
    try:
        return train(args)
    except UserError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 1


def train(args) -> int:
    """Set up, train, and finish: 0 on success, 3 when non-finite steps stopped the run."""
    run = setup(args)
    stop_reason, epoch = train_steps(run)
    accelerator, state = run.accelerator, run.state
    if stop_reason == "nonfinite":
        accelerator.end_training()
        accelerator.print(
            f"train.py: error: stopped after {state.nonfinite_in_a_row} consecutive steps with a NaN/inf loss or "
            f"gradient (step {state.step}); lower --learning_rate or try --mixed_precision no. The last checkpoint "
            f"holds the last finite weights.", file=sys.stderr
        )
        return 3
    if args.checkpointing_steps and state.step % args.checkpointing_steps != 0 and state.step != run.resume.start_step:
        checkpoint(run, epoch)
    data_stats = run.data.counts.totals(accelerator)
    # Every process takes part in gathering the weights (FSDP shards them); the main process writes.
    weights = gathered_model_state_dict(accelerator, run.pretrainer)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if not accelerator.is_main_process:
        return 0
    final_model = build_model_for_saving(run.model_class, run.model.config, weights)
    return finish_run(run, final_model, data_stats)


@dataclass
class Progress:
    """The loop's clocks and running counts for this launch (a resumed run's totals are in `TrainState`)."""

    bar: object
    budget: float  # seconds of --max_train_minutes, or infinity
    start: float  # monotonic time this launch's training started (moved on by evaluations: off the clock)
    start_seconds: float  # the run's training seconds before this launch
    start_step: int
    data_timing: dict = field(default_factory=lambda: {"seconds": 0.0, "pairs": 0})
    first_step_done: float | None = None  # seconds at the end of the first step, which pays one-off costs
    eta_announced: bool = False


def train_steps(run: Run) -> tuple[str, int]:
    """Train until the step count, the time budget, the epochs (streams) or the NaN guard stops it;
    returns why ("steps", "time", "epochs" or "nonfinite") and the epoch it stopped in."""
    args, accelerator, state, data = run.args, run.accelerator, run.state, run.data
    budget = args.max_train_minutes * 60 if args.max_train_minutes else float("inf")
    bar = progress(total=state.total_steps or None, initial=state.step, disable=not accelerator.is_main_process,
                   desc="training", unit="steps", every_item=False, dynamic_ncols=True)
    clock = Progress(bar, budget, time.monotonic(), state.train_seconds, state.step)
    if data.streamed:  # the stream's own state holds its position; the epoch is in the checkpoint
        epoch, skip = run.resume.epoch, 0
    else:
        epoch, skip = divmod(state.batches_seen, data.batches_per_epoch)
    mid_epoch = run.resume.checkpoint is not None and (data.streamed or skip > 0)
    epochs_done = bool(data.streamed and args.num_train_epochs and epoch >= args.num_train_epochs)
    stop_reason = already_finished(state, budget, epochs_done)
    if stop_reason:  # a relaunch of a finished run: its last checkpoint holds the final state
        limit = {"steps": f"all {state.total_steps} steps", "time": "the time budget", "epochs": "all epochs"}[stop_reason]
        accelerator.print(f"training is complete at step {state.step} ({limit} done): nothing left to train; "
                          "the model folder is written (and evaluated) again from the last checkpoint")
    run.pretrainer.train()
    while stop_reason is None:
        stop_reason, epoch_batches = train_epoch(run, clock, epoch, skip, mid_epoch)
        if stop_reason is not None:
            break
        run.data.counts.epoch_ended()
        # A stream resumed from a checkpoint at the very end of its epoch has nothing left of it.
        if data.streamed and epoch_batches == 0 and not mid_epoch:
            raise UserError(f"{args.train_data}: an epoch of the stream gave process {accelerator.process_index} "
                            f"no full batch of {args.per_device_batch_size} pairs ({data.dataset.stats.summary()})")
        # (an epoch that a resume found empty ended in the run that wrote the checkpoint, which evaluated it)
        if args.eval_strategy == "epoch" and epoch_batches:
            clock.start += evaluate_during_training(run, state.step)
        epoch, skip, mid_epoch = epoch + 1, 0, False
        if data.streamed and args.num_train_epochs and epoch >= args.num_train_epochs:
            stop_reason = "epochs"
    bar.close()
    return stop_reason, epoch


def train_epoch(run: Run, clock: Progress, epoch: int, skip: int, mid_epoch: bool) -> tuple[str | None, int]:
    """The steps of one epoch (from its `skip`-th batch): why training stopped in it (None: the epoch
    ended) and how many batches it read."""
    args, accelerator, state, data = run.args, run.accelerator, run.state, run.data
    data.dataset.set_epoch(epoch)
    if data.streamed:
        loader = batches_while_all_have_one(data.loader, accelerator)
    else:
        loader = accelerator.skip_first_batches(data.loader, skip) if skip else data.loader
        loader.set_epoch(epoch)
    epoch_batches, pending = 0, []
    # Resuming mid-epoch: the data loader's new iterator draws its worker seed from the global RNG
    # that load_state just restored; the uninterrupted run drew it at the epoch's start, before
    # the checkpoint. `keep_rng` undoes the extra draw so the objectives' randomness (CMC mosaic
    # quadrants, MLM masks) continues exactly as without the interruption.
    for batch in timed(loader, clock.data_timing, args.per_device_batch_size, keep_rng=mid_epoch):
        state.batches_seen += 1
        epoch_batches += 1
        if batch is None:  # every sample of the micro-batch was damaged
            continue
        batch = dict(batch) if not data.streamed else send_to_device(dict(batch), accelerator.device)
        data.counts.consume(batch)
        if run.subwords is not None:
            batch["mlm_input_ids"], batch["mlm_labels"] = whole_word_mask(
                batch["input_ids"], batch["attention_mask"], run.subwords, run.config.mask_token_id,
                run.objective.config.mlm_probability,
            )
        pending.append(batch)
        if len(pending) < args.accum_freq:
            continue
        loss, parts, grad_norm, finite = optimisation_step(
            run.pretrainer, run.objective, pending, accelerator, run.optimizer, run.scheduler, run.ema, args
        )
        pending = []
        if not finite:
            if nonfinite_step_stops(run):
                return "nonfinite", epoch_batches
            continue
        stop_reason = after_step(run, clock, epoch, loss, parts, grad_norm)
        if stop_reason:
            return stop_reason, epoch_batches
    return None, epoch_batches


def nonfinite_step_stops(run: Run) -> bool:
    """Count a skipped step with a NaN/inf loss or gradient; True when the run must stop."""
    accelerator, state = run.accelerator, run.state
    state.skipped_steps += 1
    state.nonfinite_in_a_row += 1
    if engine(accelerator) == "deepspeed":
        # DeepSpeed's engine stepped inside accelerator.backward: nothing left to skip.
        accelerator.print(f"step {state.step + 1}: non-finite loss or gradient, and DeepSpeed has "
                          "already applied the update: stopping")
        return True
    accelerator.print(f"step {state.step + 1}: non-finite loss or gradient, step skipped "
                      f"({state.nonfinite_in_a_row} in a row)")
    return state.nonfinite_in_a_row >= run.args.max_nonfinite_steps


def after_step(run: Run, clock: Progress, epoch: int, loss, parts, grad_norm) -> str | None:
    """After an applied update: the EMA target, the clock, logging, checkpoint and evaluation when due;
    "steps" or "time" when the run is done."""
    args, accelerator, state = run.args, run.accelerator, run.state
    state.nonfinite_in_a_row = 0
    state.step += 1
    if run.ema is not None:
        run.ema.update(accelerator.unwrap_model(run.pretrainer).model, state.step)
    elapsed = synced_elapsed(accelerator, clock.start)
    state.train_seconds = clock.start_seconds + elapsed
    if state.step == clock.start_step + 1:
        clock.first_step_done = elapsed  # the first step pays one-off costs: time from its end
    clock.bar.update(1)
    if state.step % args.logging_steps == 0 or state.step == state.total_steps:
        record = log_step(run, loss, parts, grad_norm, elapsed, clock)
        clock.bar.set_postfix_str(f"loss {record['loss']:.3f}, {record['pairs_per_s']:.0f} pairs/s, "
                                  f"ETA {format_eta(record['eta_s'])}")  # outside a terminal: one line
        if state.total_steps and not clock.eta_announced and state.step - clock.start_step > 20:
            clock.eta_announced = True  # once, when the speed is known: a fixed step count's time differs per CPU
            accelerator.print(f"estimated: {state.total_steps} steps take about "
                              f"{format_eta(state.train_seconds + record['eta_s'])} on this machine "
                              f"({record['pairs_per_s']:.0f} pairs/s), {format_eta(record['eta_s'])} from now")
    if args.checkpointing_steps and state.step % args.checkpointing_steps == 0:
        checkpoint(run, epoch)
    if evaluates_at_step(args, state.step):
        clock.start += evaluate_during_training(run, state.step)  # off the training clock
    if state.total_steps and state.step >= state.total_steps:
        return "steps"
    if state.train_seconds >= clock.budget:
        return "time"
    return None


def already_finished(state, budget: float, epochs_done: bool) -> str | None:
    """Why a run resumed from its last checkpoint has nothing left to train ("steps", "time", "epochs":
    a stream's, whose final checkpoint holds the epoch after its last), else None."""
    if state.total_steps and state.step >= state.total_steps:
        return "steps"
    if state.train_seconds >= budget:
        return "time"
    return "epochs" if epochs_done else None


def synced_elapsed(accelerator, start: float) -> float:
    """Seconds since `start` on the main process, the same on every process: the time-based learning
    rate and the time-budget stop must agree across ranks."""
    elapsed = time.monotonic() - start
    if accelerator.num_processes == 1:
        return elapsed
    value = torch.tensor([elapsed], dtype=torch.float64, device=accelerator.device)
    return float(broadcast(value, from_process=0).item())


def batches_while_all_have_one(loader, accelerator):
    """A stream's batches for as long as EVERY process has one: the parts of a stream differ in length
    (damaged samples, uneven shards), and a process stepping alone would wait forever for the others'
    gradients. A process that still had a batch at the end says how many pairs it left for the epoch."""
    iterator = iter(loader)
    end = object()
    while True:
        batch = next(iterator, end)
        if accelerator.num_processes > 1:
            have = torch.tensor([float(batch is not end)], device=accelerator.device)
            if accelerator.reduce(have, reduction="sum").item() < accelerator.num_processes:
                if batch is not end:
                    left = (batch["input_ids"].shape[0] if batch is not None else 0) + sum(
                        b["input_ids"].shape[0] for b in iterator if b is not None)
                    print(f"process {accelerator.process_index}: {left} pairs of this epoch left unused: "
                          "another process's part of the stream ended first")
                return
        if batch is end:
            return
        yield batch


def timed(loader, timing: dict, batch_size: int, keep_rng: bool = False):
    """Iterate `loader`, adding the time spent waiting for each batch (loading, augmenting and
    collating, when it happens in this process) to `timing["seconds"]` and its pairs to `timing["pairs"]`.

    `keep_rng`: the global CPU RNG after the first batch is what it was before the iteration started
    (the DataLoader consumes one draw when it creates its iterator)."""
    iterator = iter(loader)
    rng_state = torch.get_rng_state() if keep_rng else None
    while True:
        waited_from = time.monotonic()
        try:
            batch = next(iterator)
        except StopIteration:  # also when a stream resumed at the end of its epoch has nothing left
            if rng_state is not None:
                torch.set_rng_state(rng_state)
            return
        if rng_state is not None:
            torch.set_rng_state(rng_state)
            rng_state = None
        timing["seconds"] += time.monotonic() - waited_from
        timing["pairs"] += batch_size
        yield batch


def optimisation_step(pretrainer, objective, micro_batches, accelerator, optimizer, scheduler, ema, args):
    """Forward, backward, NaN/inf check, clip, update, clamp: `(loss, parts, grad_norm, finite)`.

    `grad_norm` is the global gradient norm before clipping (a tensor), or None when unknown.
    """
    loss, parts = forward_backward(pretrainer, objective, micro_batches, accelerator, ema=ema)
    # The norm of the GLOBAL gradient, whatever the engine: accelerate routes the complete parameter
    # list of a prepared model to FSDP's own clip_grad_norm_ (all shards; a filtered list would fall
    # back to this process's shard), and an infinite max norm only measures (--max_grad_norm 0).
    max_norm = args.max_grad_norm if args.max_grad_norm > 0 else math.inf
    with record_function("oner:clip"):  # the scopes name the phases in a profile (benchmarks/loop_speed.py)
        grad_norm = accelerator.clip_grad_norm_(list(pretrainer.parameters()), max_norm)
        # DeepSpeed clips and steps inside accelerator.backward; accelerate then returns the norm its
        # engine measured, or None. There is no gradient left to measure (ZeRO-2 has reduced and
        # cleared it), so None counts as unknown and the loss check alone decides.
        grad_finite = True if grad_norm is None else bool(torch.isfinite(torch.as_tensor(grad_norm)))
        # A rank whose loss is NaN poisons every rank's reduced gradients, so all ranks agree; the
        # loss flag is reduced anyway (with --local_loss each rank has its own loss).
        bad = torch.tensor(float(not (torch.isfinite(loss) and grad_finite)), device=loss.device)
        finite = accelerator.reduce(bad, reduction="sum").item() == 0
    with record_function("oner:optimizer"):
        if finite:
            optimizer.step()
            scheduler.step()
            # In place on what this process holds: the whole parameter, its FSDP shard (possibly empty),
            # or DeepSpeed's working copy (its fp32 master may exceed the bound; forwards never see it).
            clamp_logit_scale_(accelerator.unwrap_model(pretrainer).model.logit_scale)
        optimizer.zero_grad(set_to_none=True)
    return loss, parts, grad_norm, finite


def log_step(run: Run, loss, parts, grad_norm, elapsed: float, clock: Progress) -> dict:
    """One line of the training log (and the trackers): losses reduced over processes, speed, ETA."""
    accelerator, state, global_batch = run.accelerator, run.state, run.global_batch
    timer, data_timing, budget = clock.first_step_done, clock.data_timing, clock.budget
    loss_value = accelerator.reduce(loss.detach().float(), reduction="mean").item()
    record = {"step": state.step, "loss": loss_value}
    for name, value in parts.items():
        key = name if "/" in name else f"loss/{name}"  # modality-gap statistics come as "gap/..."
        record[key] = accelerator.reduce(value.detach().float(), reduction="mean").item()
    timed_steps = state.step - clock.start_step - 1
    per_step = (elapsed - timer) / timed_steps if timer is not None and timed_steps > 0 else elapsed
    remaining = max(state.total_steps - state.step, 0) if state.total_steps else 0
    record.update(
        lr=run.scheduler.get_last_lr()[0],
        grad_norm=None if grad_norm is None else float(grad_norm),
        # a collective: under FSDP the logit scale lives in one process's shard
        temperature=1.0 / math.exp(parameter_value(accelerator, accelerator.unwrap_model(run.pretrainer).model.logit_scale)),
        pairs_per_s=global_batch / per_step if per_step > 0 else 0.0,
        eta_s=remaining * per_step if state.total_steps or not math.isfinite(budget)
        else max(budget - state.train_seconds, 0.0),
        elapsed_s=round(state.train_seconds, 1),
        skipped_steps=state.skipped_steps,
        # The data loader's own speed (pairs per second of waiting for it, this process) and the share
        # of the run spent waiting: 0 when loader workers keep up.
        loader_pairs_per_s=data_timing["pairs"] / max(data_timing["seconds"], 1e-9),
        data_wait_fraction=data_timing["seconds"] / max(elapsed, 1e-9),
    )
    accelerator.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=state.step)
    run.log.write(record)
    return record


def checkpoint(run: Run, epoch: int) -> None:
    """A resumable checkpoint; a stream's loader adds its position on every process. Every process
    calls it: the finite check and `save_state` are collectives under sharding."""
    accelerator, state, args = run.accelerator, run.state, run.args
    if not weights_are_finite(accelerator, run.pretrainer):
        # Never reached (non-finite steps are skipped), but a NaN must never be checkpointed.
        raise RuntimeError("refusing to checkpoint non-finite weights")
    extra = {"epoch": epoch, "batches_seen": state.batches_seen, "num_processes": accelerator.num_processes,
             "data_stats": run.data.counts.totals(accelerator),  # a collective too
             "args": settings_to_match(args, run.source.preset)}
    path = save_checkpoint(accelerator, args.output_dir, state.step, extra, args.checkpoints_total_limit,
                           process_state=run.data.loader.state_dict() if run.data.streamed else None)
    accelerator.print(f"checkpoint saved: {path}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
