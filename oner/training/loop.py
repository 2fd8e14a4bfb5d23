"""The training loop behind `train.py`: setup, steps, checkpoints, final folder, evaluation, card, push.

Everything runs under one `accelerate.Accelerator`, so the same code serves `python train.py`
(one process), `accelerate launch train.py` and multi-GPU / multi-node launches.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, broadcast, send_to_device, set_seed
from tqdm.auto import tqdm

from oner.losses import clamp_logit_scale_
from oner.objectives import Objective, ObjectiveConfig

from .args import parse_args
from .checkpointing import (TrainState, check_checkpoint, list_checkpoints, load_process_state, resolve_resume,
                            save_checkpoint)
from .data import StreamingPairs, make_dataloader, make_stream_loader, open_train_data
from .mlm import subword_table, whole_word_mask
from .pretrainer import EMATarget, OneRPretrainer
from .runtime import choose_attn_implementation, choose_mixed_precision, configure_threads
from .sharding import (
    build_model_for_saving,
    check_supported,
    configure_deepspeed_clipping,
    engine,
    gathered_model_state_dict,
    needs_vector_scalars,
    parameter_value,
    promote_scalar_parameters,
    requested_engine,
    weights_are_finite,
)
from .step import forward_backward
from .tracking import PLOT_NAME, TrainingLog, format_eta, plot_loss_curve

# Settings that must match between a checkpoint and the run resuming it.
RESUME_MUST_MATCH = ("preset", "config_overrides", "architecture", "objective", "per_device_batch_size", "accum_freq",
                     "pairwise_loss", "xmc_form", "cmc_context", "cmc_fraction", "temperature",
                     "model_name_or_path", "revision")


class UserError(Exception):
    """Bad input (data, resume folder, flags): reported as one line, exit status 1, nothing written."""


def main(argv: list[str] | None = None) -> int:
    """Entry point of `train.py`; returns the process exit status."""
    args = parse_args(argv)
    try:
        return train(args)
    except UserError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 1


# ---------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------


def make_accelerator(args) -> Accelerator:
    """The run's Accelerator; `args.mixed_precision` is resolved here (see `oner.training.runtime`)."""
    device_type = _device_type()
    args.mixed_precision, args.mixed_precision_reason = choose_mixed_precision(args.mixed_precision, device_type)
    args.attn_implementation, args.attn_reason = choose_attn_implementation(args.attn_implementation, device_type)
    log_with = None
    if args.report_to not in ("none", "", None):
        from accelerate.utils import is_tensorboard_available

        if args.report_to == "tensorboard" and not is_tensorboard_available():
            print("tensorboard is not installed: metrics go to the training log only", file=sys.stderr)
        else:
            log_with = args.report_to
    return Accelerator(
        # Without an accelerator device, `accelerate launch --multi_gpu` starts N processes that each
        # believe they are alone unless the Accelerator is told to run on the CPU (then: MULTI_CPU, gloo).
        cpu=not _has_accelerator_device(),
        mixed_precision=args.mixed_precision,
        log_with=log_with,
        project_dir=args.output_dir,
        # Our scheduler counts optimizer updates, whatever the number of processes.
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )


def _device_type() -> str:
    if not _has_accelerator_device():
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "other"


def _has_accelerator_device() -> bool:
    if hasattr(torch, "accelerator"):  # torch >= 2.6: CUDA, XPU, MPS, ...
        return torch.accelerator.is_available()
    return torch.cuda.is_available()


def build_model(args):
    """`(pretrainer, model_to_save, processor, config)` for `--architecture oner|clip`.

    A fresh model from `--preset` + `--config_overrides`, or, with `--model_name_or_path`, the saved
    model and its processor (`oner.training.pretrained`; `config` is then the loaded model's OneR config,
    for a CLIP baseline the one it was sized from, and `args.preset` becomes the preset it matches or
    "custom"). Raises UserError for a source that cannot be used.
    """
    from modeling_oner import OneRConfig, OneRModel
    from processing_oner import build_processor

    if args.model_name_or_path:
        model, processor, config = load_source_model(args)
    else:
        config = OneRConfig.from_preset(args.preset, **args.model_overrides)
        # Training-time only: transformers does not save it, so a loaded model picks its own (sdpa).
        config._attn_implementation = args.attn_implementation
    if args.architecture == "clip":
        from oner.baseline import CLIPPretrainer, build_clip

        if not args.model_name_or_path:
            model, processor = build_clip(config)
        pretrainer = CLIPPretrainer(model)
    else:
        if not args.model_name_or_path:
            model, processor = OneRModel(config), build_processor(config)
        pretrainer = OneRPretrainer(model, objective_config(args))
    if args.gradient_checkpointing:
        # Non-reentrant checkpointing works with DDP and with parameters unused by some passes.
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return pretrainer, model, processor, config


def load_source_model(args):
    """`(model, processor, config)` of `--model_name_or_path`, after checking the preset and overrides
    against it (see `oner.training.pretrained` for what is refused and why)."""
    from .pretrained import SourceError, check_agreement, load_pretrained, preset_name, resolve_source, source_config

    try:
        source = resolve_source(args.model_name_or_path, args.revision)
        config = source_config(source, args.architecture)
        preset = args.preset if "preset" in args.explicit_flags else None
        apply = check_agreement(config, preset, args.model_overrides, args.architecture, source.label)
        model, processor = load_pretrained(source, args.architecture, args.attn_implementation, apply)
    except SourceError as e:
        raise UserError(str(e)) from None
    args.preset = preset_name(config, args.architecture)
    args.source_model = source.label
    args.source_is_local = source.local
    for key, value in apply.items():
        setattr(config, key, value)
    return model, processor, config


def objective_config(args) -> ObjectiveConfig:
    return ObjectiveConfig(
        weights=args.objective_weights,
        pairwise=args.pairwise_loss,
        local_loss=args.local_loss,
        mix_weight=args.mix_weight,
        mlm_probability=args.mlm_probability,
        momentum=args.momentum,
        xmc_form=args.xmc_form,
        cmc_fraction=args.cmc_fraction,
        temperature=args.temperature,
        cmc_context=args.cmc_context,
    )


def make_optimizer(module: torch.nn.Module, args) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms, embeddings, [CLS], positions and the logit scale/bias."""
    decay, no_decay, seen = [], [], set()
    for name, param in module.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        if param.ndim < 2 or "embedding" in name or "logit_" in name:
            no_decay.append(param)
        else:
            decay.append(param)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
    )


def make_scheduler(optimizer, args, state: TrainState) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over `--warmup_steps`, then cosine/linear/constant decay.

    The decay runs on steps when the run has a step count (`--max_steps`, `--num_train_epochs`:
    `state.total_steps`), and on TIME when only `--max_train_minutes` bounds it: progress is the
    share of the budget used since the warm-up ended (`state.train_seconds`, restored on resume), so
    the learning rate reaches its end exactly when the budget does, however the speed varies while
    the run is on (another process on the machine, checkpoints, evaluation of a sibling run).
    """
    kind, warmup = args.lr_scheduler_type, args.warmup_steps
    budget = args.max_train_minutes * 60 if args.max_train_minutes else None

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        if state.total_steps:
            if state.total_steps <= warmup:
                return 1.0
            progress = (step - warmup) / max(state.total_steps - warmup, 1)
        elif budget:
            if state.decay_start_seconds is None:
                state.decay_start_seconds = state.train_seconds
            progress = (state.train_seconds - state.decay_start_seconds) / max(budget - state.decay_start_seconds, 1e-9)
        else:
            return 1.0
        progress = min(max(progress, 0.0), 1.0)
        return 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def planned_steps(args, batches_per_epoch: int) -> int:
    """Schedule length from --max_steps or --num_train_epochs; 0 = estimate it from the time budget."""
    if args.max_steps:
        return args.max_steps
    if args.num_train_epochs:
        return max(int(args.num_train_epochs * batches_per_epoch // args.accum_freq), 1)
    return 0


def check_resume_compatible(args, checkpoint: Path, num_processes: int) -> None:
    state = check_checkpoint(checkpoint)
    saved = state.get("args", {})
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {getattr(args, k)!r}" for k in RESUME_MUST_MATCH
             if k in saved and saved[k] != getattr(args, k)]
    if state.get("process_states") and state.get("num_processes") != num_processes:
        # Each process's part of a stream is its own: a different process count would read other shards.
        diffs.append(f"processes reading the stream: checkpoint {state.get('num_processes')}, now {num_processes}")
    if diffs:
        raise UserError(f"cannot resume from {checkpoint}: settings differ ({'; '.join(diffs)})")


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def train(args) -> int:
    threads, threads_reason = configure_threads(args.num_threads)
    accelerator = make_accelerator(args)
    set_seed(args.seed)
    is_main = accelerator.is_main_process

    # ---- validate every input BEFORE anything is written
    pretrainer, model, processor, config = build_model(args)
    try:
        dataset = open_train_data(args, seed=args.seed, image_size=config.image_size,
                                  rank=accelerator.process_index, world_size=accelerator.num_processes)
        resume = resolve_resume(args.resume_from_checkpoint, args.output_dir)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None
    if resume is not None:
        check_resume_compatible(args, resume, accelerator.num_processes)
    streamed = isinstance(dataset, StreamingPairs)
    if streamed:
        if args.num_train_epochs and not args.max_steps:
            raise UserError("--num_train_epochs on a stream: its length is unknown until it ends, so give "
                            "--max_steps too (the schedule's length; the epochs still bound the run)")
        dataloader = make_stream_loader(dataset, processor, args.per_device_batch_size, args.dataloader_num_workers)
    else:
        dataloader, _ = make_dataloader(
            dataset, processor, args.per_device_batch_size, seed=args.seed, num_workers=args.dataloader_num_workers
        )
        if len(dataloader) < accelerator.num_processes * args.accum_freq:
            raise UserError(
                f"{args.train_data}: {len(dataset)} pairs make fewer than one step of "
                f"{accelerator.num_processes * args.accum_freq * args.per_device_batch_size} pairs; lower --per_device_batch_size"
            )

    output_dir = Path(args.output_dir)
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        if resume is None and list_checkpoints(output_dir):
            print(f"{output_dir} holds checkpoints of an earlier run; this fresh run will replace them "
                  "(use --resume_from_checkpoint latest to continue it instead)")
            for old in list_checkpoints(output_dir):
                import shutil

                shutil.rmtree(old)

    objective = Objective(objective_config(args)) if args.architecture == "oner" else Objective(
        ObjectiveConfig(weights={"itc": 1.0}, pairwise=args.pairwise_loss, local_loss=args.local_loss)
    )
    # ---- sharding (FSDP / DeepSpeed, chosen by the accelerate config): see oner/training/sharding.py
    unsupported = check_supported(accelerator, args) or configure_deepspeed_clipping(accelerator, args.max_grad_norm)
    if unsupported:
        raise UserError(f"{engine(accelerator)}: {unsupported}")
    # What the final folder is built from; taken before `prepare` (FSDP2 changes the module's class).
    model_class, model_config = type(model), model.config
    n_params = sum(p.numel() for p in model.parameters())  # before FSDP leaves each process its shard
    if needs_vector_scalars(accelerator):
        promote_scalar_parameters(pretrainer)  # FSDP and DeepSpeed fail on 0-dim parameters (logit scale/bias)
    state = TrainState()
    optimizer = make_optimizer(pretrainer, args)
    scheduler = make_scheduler(optimizer, args, state)
    if streamed:  # already split between processes (split_dataset_by_node): accelerate must not shard it again
        pretrainer, optimizer, scheduler = accelerator.prepare(pretrainer, optimizer, scheduler)
        batches_per_epoch = None
    else:
        pretrainer, optimizer, dataloader, scheduler = accelerator.prepare(pretrainer, optimizer, dataloader, scheduler)
        batches_per_epoch = len(dataloader)
    accelerator.register_for_checkpointing(state)
    state.total_steps = planned_steps(args, batches_per_epoch)
    ema = None
    if args.architecture == "oner" and args.momentum > 0:
        if not state.total_steps:
            raise UserError("--momentum needs a known schedule length: give --max_steps or --num_train_epochs")
        ema = EMATarget(model, args.momentum, state.total_steps).to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    mlm = "mlm" in args.objective_weights
    subwords = subword_table(processor.tokenizer) if mlm else None

    if resume is not None:
        try:
            accelerator.load_state(str(resume))
        except Exception as e:  # a damaged file: torch/safetensors/pickle errors of many kinds
            raise UserError(f"cannot resume from {resume}: damaged checkpoint ({type(e).__name__}: {e})") from None
        if streamed:
            dataloader.load_state_dict(load_process_state(resume, accelerator.process_index))
        accelerator.print(f"resumed from {resume} at step {state.step} ({state.batches_seen} batches seen)")

    log = TrainingLog(output_dir, state.step if resume is not None else None, enabled=is_main)
    run_config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool)) or v is None}
    accelerator.init_trackers("oner", config={k: v for k, v in run_config.items() if v is not None})
    if is_main:
        (output_dir / "training_args.json").write_text(json.dumps(vars(args), indent=2, default=sorted) + "\n")

    # ---- the loop
    budget = args.max_train_minutes * 60 if args.max_train_minutes else float("inf")
    global_batch = args.per_device_batch_size * args.accum_freq * accelerator.num_processes
    if args.model_name_or_path:
        accelerator.print(f"continuing from {args.source_model}: its weights and processor, a fresh optimizer and schedule")
    accelerator.print(
        f"training {args.architecture} ({args.preset}, {n_params / 1e6:.1f}M parameters) on "
        f"{'a stream of pairs' if streamed else f'{len(dataset)} pairs'} from {args.train_data}; {accelerator.num_processes} process(es), {global_batch} pairs per step, "
        f"objective {args.objective}; engine {requested_engine(accelerator)}"
    )
    accelerator.print(f"compute: {accelerator.device}, {threads} torch thread(s) per process ({threads_reason}); "
                      f"mixed precision {args.mixed_precision} ({args.mixed_precision_reason}); "
                      f"attention {args.attn_implementation} ({args.attn_reason}); "
                      f"{args.dataloader_num_workers} data-loader worker(s)")
    bar = tqdm(total=state.total_steps or None, initial=state.step, disable=not is_main, desc="training",
               dynamic_ncols=True)
    start, start_seconds, start_step = time.monotonic(), state.train_seconds, state.step
    data_timing = {"seconds": 0.0, "pairs": 0}
    if streamed:  # the stream's own state holds its position; the epoch is in the checkpoint
        epoch, skip = (check_checkpoint(resume)["epoch"] if resume is not None else 0), 0
    else:
        epoch, skip = divmod(state.batches_seen, batches_per_epoch)
    mid_epoch = resume is not None and (streamed or skip > 0)
    pending: list[dict] = []
    stop_reason, timer = None, None
    pretrainer.train()
    while stop_reason is None:
        dataset.set_epoch(epoch)
        if streamed:
            loader = batches_while_all_have_one(dataloader, accelerator)
        else:
            loader = accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
            loader.set_epoch(epoch)
        epoch_batches = 0
        # Resuming mid-epoch: the data loader's new iterator draws its worker seed from the global RNG
        # that load_state just restored; the uninterrupted run drew it at the epoch's start, before
        # the checkpoint. `keep_rng` undoes the extra draw so the objectives' randomness (CMC mosaic
        # quadrants, MLM masks) continues exactly as without the interruption.
        for batch in timed(loader, data_timing, args.per_device_batch_size, keep_rng=mid_epoch):
            state.batches_seen += 1
            epoch_batches += 1
            if batch is None:  # every sample of the micro-batch was damaged
                continue
            batch = dict(batch) if not streamed else send_to_device(dict(batch), accelerator.device)
            if mlm:
                batch["mlm_input_ids"], batch["mlm_labels"] = whole_word_mask(
                    batch["input_ids"], batch["attention_mask"], subwords, config.mask_token_id, args.mlm_probability
                )
            pending.append(batch)
            if len(pending) < args.accum_freq:
                continue
            loss, parts, grad_norm, finite = optimisation_step(
                pretrainer, objective, pending, accelerator, optimizer, scheduler, ema, args
            )
            pending = []
            if not finite:
                state.skipped_steps += 1
                state.nonfinite_in_a_row += 1
                if engine(accelerator) == "deepspeed":
                    # DeepSpeed's engine stepped inside accelerator.backward: nothing left to skip.
                    accelerator.print(f"step {state.step + 1}: non-finite loss or gradient, and DeepSpeed has "
                                      "already applied the update: stopping")
                    stop_reason = "nonfinite"
                    break
                accelerator.print(f"step {state.step + 1}: non-finite loss or gradient, step skipped "
                                  f"({state.nonfinite_in_a_row} in a row)")
                if state.nonfinite_in_a_row >= args.max_nonfinite_steps:
                    stop_reason = "nonfinite"
                    break
                continue
            state.nonfinite_in_a_row = 0
            state.step += 1
            if ema is not None:
                ema.update(accelerator.unwrap_model(pretrainer).model, state.step)
            elapsed = synced_elapsed(accelerator, start)
            state.train_seconds = start_seconds + elapsed

            if state.step == start_step + 1:
                timer = elapsed  # the first step pays one-off costs: time from its end

            if state.step % args.logging_steps == 0 or state.step == state.total_steps:
                record = log_step(accelerator, log, state, loss, parts, grad_norm, scheduler, pretrainer,
                                  global_batch, elapsed, start_step, timer, data_timing, budget)
                bar.set_postfix_str(f"loss {record['loss']:.3f}, {record['pairs_per_s']:.0f} pairs/s, "
                                    f"ETA {format_eta(record['eta_s'])}")
            bar.update(1)

            if args.checkpointing_steps and state.step % args.checkpointing_steps == 0:
                checkpoint(accelerator, pretrainer, args, state, epoch, dataloader if streamed else None)
            if state.total_steps and state.step >= state.total_steps:
                stop_reason = "steps"
                break
            if state.train_seconds >= budget:
                stop_reason = "time"
                break
        else:
            if streamed and epoch_batches == 0:
                raise UserError(f"{args.train_data}: an epoch of the stream gave process {accelerator.process_index} "
                                f"no full batch of {args.per_device_batch_size} pairs ({dataset.stats.summary()})")
            epoch, skip, mid_epoch = epoch + 1, 0, False
            if streamed and args.num_train_epochs and epoch >= args.num_train_epochs:
                stop_reason = "epochs"
    bar.close()

    if stop_reason == "nonfinite":
        accelerator.end_training()
        accelerator.print(
            f"train.py: error: stopped after {state.nonfinite_in_a_row} consecutive steps with a NaN/inf loss or "
            f"gradient (step {state.step}); lower --learning_rate or try --mixed_precision no. The last checkpoint "
            f"holds the last finite weights.", file=sys.stderr
        )
        return 3
    if args.checkpointing_steps and state.step % args.checkpointing_steps != 0:
        checkpoint(accelerator, pretrainer, args, state, epoch, dataloader if streamed else None)
    data_stats = data_stats_of_all_processes(accelerator, dataset.stats)
    # Every process takes part in gathering the weights (FSDP shards them); the main process writes.
    weights = gathered_model_state_dict(accelerator, pretrainer)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if not is_main:
        return 0
    final_model = build_model_for_saving(model_class, model_config, weights)
    return finish(final_model, processor, args, state, dataset, log, global_batch, data_stats)


def data_stats_of_all_processes(accelerator, stats) -> dict[str, int]:
    """The data counters (good and damaged samples by kind) summed over processes: each read its own part."""
    local = stats.as_dict()
    if accelerator.num_processes == 1:
        return local
    totals = accelerator.reduce(torch.tensor(list(local.values()), device=accelerator.device), reduction="sum")
    return dict(zip(local, (int(v) for v in totals.tolist())))


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
        except StopIteration:
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
    grad_norm = accelerator.clip_grad_norm_(list(pretrainer.parameters()), max_norm)
    # DeepSpeed clips and steps inside accelerator.backward; accelerate then returns the norm its
    # engine measured, or None. There is no gradient left to measure (ZeRO-2 has reduced and
    # cleared it), so None counts as unknown and the loss check alone decides.
    grad_finite = True if grad_norm is None else bool(torch.isfinite(torch.as_tensor(grad_norm)))
    # A rank whose loss is NaN poisons every rank's reduced gradients, so all ranks agree; the
    # loss flag is reduced anyway (with --local_loss each rank has its own loss).
    bad = torch.tensor(float(not (torch.isfinite(loss) and grad_finite)), device=loss.device)
    finite = accelerator.reduce(bad, reduction="sum").item() == 0
    if finite:
        optimizer.step()
        scheduler.step()
        # In place on what this process holds: the whole parameter, its FSDP shard (possibly empty),
        # or DeepSpeed's working copy (its fp32 master may exceed the bound; forwards never see it).
        clamp_logit_scale_(accelerator.unwrap_model(pretrainer).model.logit_scale)
    optimizer.zero_grad(set_to_none=True)
    return loss, parts, grad_norm, finite


def log_step(accelerator, log, state, loss, parts, grad_norm, scheduler, pretrainer, global_batch, elapsed,
             start_step, timer, data_timing, budget):
    loss_value = accelerator.reduce(loss.detach().float(), reduction="mean").item()
    record = {"step": state.step, "loss": loss_value}
    for name, value in parts.items():
        key = name if "/" in name else f"loss/{name}"  # modality-gap statistics come as "gap/..."
        record[key] = accelerator.reduce(value.detach().float(), reduction="mean").item()
    timed_steps = state.step - start_step - 1
    per_step = (elapsed - timer) / timed_steps if timer is not None and timed_steps > 0 else elapsed
    remaining = max(state.total_steps - state.step, 0) if state.total_steps else 0
    record.update(
        lr=scheduler.get_last_lr()[0],
        grad_norm=None if grad_norm is None else float(grad_norm),
        # a collective: under FSDP the logit scale lives in one process's shard
        temperature=1.0 / math.exp(parameter_value(accelerator, accelerator.unwrap_model(pretrainer).model.logit_scale)),
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
    log.write(record)
    return record


def checkpoint(accelerator, pretrainer, args, state, epoch, stream_loader=None) -> None:
    """A resumable checkpoint; a stream's loader adds its position on every process. Every process
    calls it: the finite check and `save_state` are collectives under sharding."""
    if not weights_are_finite(accelerator, pretrainer):
        # Never reached (non-finite steps are skipped), but a NaN must never be checkpointed.
        raise RuntimeError("refusing to checkpoint non-finite weights")
    extra = {"epoch": epoch, "batches_seen": state.batches_seen, "num_processes": accelerator.num_processes,
             "args": {k: getattr(args, k) for k in RESUME_MUST_MATCH}}
    path = save_checkpoint(accelerator, args.output_dir, state.step, extra, args.checkpoints_total_limit,
                           process_state=stream_loader.state_dict() if stream_loader is not None else None)
    accelerator.print(f"checkpoint saved: {path}")


# ---------------------------------------------------------------------------------------------
# The end: model folder, evaluation, card, push
# ---------------------------------------------------------------------------------------------


def finish(model, processor, args, state, dataset, log, global_batch: int, data_stats: dict) -> int:
    output_dir = Path(args.output_dir)
    model = model.float().eval()
    if args.architecture == "clip":
        from oner.baseline import save_clip_folder

        save_clip_folder(model, processor, output_dir)
    else:
        from oner.model_folder import save_model_folder

        save_model_folder(model, processor, output_dir)
    records = log.read()
    plot = plot_loss_curve(records, output_dir / PLOT_NAME, f"{args.architecture} {args.preset}: {args.objective}")
    last = records[-1] if records else {}
    training = {
        "architecture": args.architecture,
        "preset": args.preset,
        # --model_name_or_path: what this run continued from; a Hub id is also the card's base_model.
        "continued_from": getattr(args, "source_model", None),
        "base_model": None if getattr(args, "source_is_local", True) else args.model_name_or_path,
        "objective": args.objective,
        "xmc_form": args.xmc_form if "xmc" in args.objective_weights else None,
        "cmc_context": args.cmc_context if "cmc" in args.objective_weights else None,
        "cmc_fraction": args.cmc_fraction if "cmc" in args.objective_weights else None,
        "temperature": args.temperature,
        "pooling": getattr(model.config, "pooling", None),
        "pairwise_loss": args.pairwise_loss,
        "train_data": args.train_data,
        "pairs": None if isinstance(dataset, StreamingPairs) else len(dataset),
        "streamed": isinstance(dataset, StreamingPairs) or None,
        "steps": state.step,
        "skipped_steps": state.skipped_steps,
        "train_minutes": round(state.train_seconds / 60, 2),
        "global_batch_size": global_batch,
        "per_device_batch_size": args.per_device_batch_size,
        "accum_freq": args.accum_freq,
        "learning_rate": args.learning_rate,
        "mixed_precision": args.mixed_precision,
        "attn_implementation": args.attn_implementation,
        "seed": args.seed,
        "final_loss": last.get("loss"),
        "data_stats": data_stats,
    }
    training = {k: v for k, v in training.items() if v is not None}
    (output_dir / "training_summary.json").write_text(json.dumps(training, indent=2) + "\n")
    print(dataset.stats.summary(data_stats))
    print(f"trained {state.step} steps in {training['train_minutes']} min; final loss {training.get('final_loss')}")
    if plot:
        print(f"loss curve: {plot}")

    metrics = evaluate_folder(output_dir, args)
    write_card(output_dir, metrics, training)
    if args.push_to_hub:
        push(output_dir, args)
    print(f"\nmodel folder: {output_dir.resolve()}")
    print(f"open the demo on it:  python space/app.py --model {output_dir}")
    return 0


def evaluate_folder(output_dir: Path, args) -> dict:
    if not args.do_eval:
        return {}
    try:
        from oner.evaluation import run_benchmark
    except ImportError as e:
        print(f"evaluation unavailable: oner.evaluation cannot be imported ({e}); the model folder is saved without metrics")
        return {}
    metrics = run_benchmark(output_dir, output_dir=output_dir, max_items=args.eval_max_items)
    table = output_dir / "eval_results.md"
    if table.is_file():
        print(table.read_text())
    return metrics


def write_card(output_dir: Path, metrics: dict, training: dict) -> None:
    try:
        from oner.model_card import write_model_card
    except ImportError as e:
        print(f"model card unavailable: oner.model_card cannot be imported ({e})")
        return
    print(f"model card: {write_model_card(output_dir, metrics, training)}")


def push(output_dir: Path, args) -> None:
    try:
        from oner.hub import push_folder
    except ImportError as e:
        print(f"push unavailable: oner.hub cannot be imported ({e}); the folder stays local")
        return
    url = push_folder(output_dir, args.hub_model_id, private=args.hub_private)
    print(f"pushed to {url}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
