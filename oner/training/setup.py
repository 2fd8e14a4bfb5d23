"""Setting up a training run: flags resolved against the machine, the model (fresh, continued from a
folder, or the CLIP baseline behind the same interface), data, optimizer, schedule, accelerate's
preparation and sharding, and a resumed checkpoint's state. `setup(args)` does all of it, checking
every input before anything is written, and returns the `Run` that `oner.training.loop` trains.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed

from modeling_oner import OneRConfig, OneRModel
from oner.baseline import build_clip
from oner.objectives import Objective, ObjectiveConfig
from processing_oner import build_processor

from .checkpointing import TrainState, check_checkpoint, list_checkpoints, load_process_state, resolve_resume
from .data import StreamingPairs, TrainedDataCounts, make_dataloader, make_stream_loader, open_train_data
from .eval_during_training import prepare_evaluation
from oner.model_folder import SUMMARY_FILE
from .mlm import subword_table
from .pretrainer import EMATarget, OneRPretrainer
from .runtime import (
    choose_attn_implementation,
    choose_mixed_precision,
    configure_threads,
    cpu_slow_paths,
    has_accelerator_device,
    keep_freed_memory,
)
from .sharding import (
    check_supported,
    configure_deepspeed_clipping,
    engine,
    needs_vector_scalars,
    promote_scalar_parameters,
    requested_engine,
)
from .tracking import TrainingLog

# Settings that must match between a checkpoint and the run resuming it.
RESUME_MUST_MATCH = ("preset", "config_overrides", "architecture", "objective", "per_device_batch_size", "accum_freq",
                     "pairwise_loss", "xmc_form", "cmc_context", "cmc_fraction", "temperature",
                     "cmc_target", "joint_negatives", "joint_margin", "quad_pooling",
                     "model_name_or_path", "revision")


class UserError(Exception):
    """Bad input (data, resume folder, flags): reported as one line, exit status 1, nothing written."""


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
        cpu=not has_accelerator_device(),
        mixed_precision=args.mixed_precision,
        log_with=log_with,
        project_dir=args.output_dir,
        # Our scheduler counts optimizer updates, whatever the number of processes.
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )


def _device_type() -> str:
    if not has_accelerator_device():
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "other"


def build_model(args, objective: ObjectiveConfig):
    """`(pretrainer, model_to_save, processor, config)` for `--architecture oner|clip`.

    A fresh model from `--preset` + `--config_overrides` with the objective's scoring settings in its
    config (`ObjectiveConfig.model_settings`: the sigmoid loss's bias, a fixed temperature), or, with
    `--model_name_or_path`, the saved model and its processor given those settings
    (`oner.training.pretrained`; `config` is then the loaded model's OneR config, for a CLIP baseline
    the one it was sized from, and `args.preset` becomes the preset it matches or "custom"). A fixed
    temperature's logit scale is frozen. Raises UserError for a source that cannot be used.
    """

    if args.model_name_or_path:
        model, processor, config = load_source_model(args)
        adopt_model_settings(model, objective.model_settings)
    else:
        config = OneRConfig.from_preset(args.preset, **{**args.model_overrides, **objective.model_settings})
        # Training-time only: transformers does not save it, so a loaded model picks its own (sdpa).
        config._attn_implementation = args.attn_implementation
        if args.architecture == "clip":  # the two-tower baseline, behind the same interface (oner.baseline)
            model, processor = build_clip(config)
        else:
            model, processor = OneRModel(config), build_processor(config)
    if objective.temperature is not None:
        model.logit_scale.requires_grad_(False)
    pretrainer = OneRPretrainer(model, objective)
    if args.gradient_checkpointing:
        # Non-reentrant checkpointing works with DDP and with parameters unused by some passes.
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return pretrainer, model, processor, config


def adopt_model_settings(model, settings: dict[str, float]) -> None:
    """Give a loaded model the objective's scoring settings (`ObjectiveConfig.model_settings`), in its
    config and in its weights, as a fresh model would be built with them: a logit bias it lacks starts
    at its init, and a fixed temperature replaces the learned scale it was saved with."""
    for name, value in settings.items():
        setattr(model.config, name, value)
    if "logit_bias_init" in settings and getattr(model, "logit_bias", None) is None:
        model.logit_bias = torch.nn.Parameter(torch.tensor(settings["logit_bias_init"]))
    if "logit_scale_init_value" in settings:
        with torch.no_grad():
            model.logit_scale.fill_(settings["logit_scale_init_value"])


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


# Devices with a fused AdamW kernel in torch (torch.optim.adamw; checked again when it steps).
_FUSED_ADAMW_DEVICES = ("cpu", "cuda", "xpu", "mps")


def make_optimizer(module: torch.nn.Module, args) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms, embeddings, [CLS], positions and the logit scale/bias.

    torch's fused AdamW (one kernel per parameter, on CPUs and GPUs alike) where every parameter is
    on a device it supports: the default per-parameter loop makes about eight passes over each
    parameter, which for the tiny preset (3.9M of its 4.3M entries in the token table) cost 3-7% of a CPU step.
    """
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
        fused=all(p.device.type in _FUSED_ADAMW_DEVICES and p.dtype.is_floating_point for p in decay + no_decay),
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


OVERWRITE_HINT = ("relaunch with the settings it was trained with, choose another --output_dir, or add "
                  "--overwrite_output_dir to start over (its checkpoints are then deleted)")


def choose_resume(args) -> tuple[Path | None, bool]:
    """`(checkpoint, detected)`: the checkpoint this run continues from, or None to start fresh.

    `--resume_from_checkpoint` names it; without it, the latest checkpoint in `--output_dir` is taken
    (`detected`), as transformers' example scripts do, so relaunching the same command after a crash
    or a pre-emption continues the run. `--overwrite_output_dir` starts over instead. A folder that
    holds a finished run but no checkpoint (`--checkpointing_steps 0`) is refused rather than
    silently trained again. Raises UserError, before anything is written.
    """
    output_dir = Path(args.output_dir)
    if args.overwrite_output_dir:
        return None, False
    try:
        if args.resume_from_checkpoint is not None:
            return resolve_resume(args.resume_from_checkpoint, output_dir), False
        if list_checkpoints(output_dir):
            return resolve_resume("latest", output_dir), True
    except (FileNotFoundError, ValueError) as e:
        detected = "" if args.resume_from_checkpoint is not None else (
            " (the latest checkpoint in --output_dir: resume from another with --resume_from_checkpoint PATH, "
            "or add --overwrite_output_dir to start over)")
        raise UserError(f"{e}{detected}") from None
    if (output_dir / SUMMARY_FILE).is_file():
        raise UserError(f"{output_dir} holds a finished training run and no checkpoint to continue from: add "
                        "--overwrite_output_dir to train again from scratch and replace it, or choose another --output_dir")
    return None, False


def check_resume_compatible(args, checkpoint: Path, num_processes: int, detected: bool = False) -> dict:
    """The checkpoint's `train_state.json`, once its settings are known to match this run's
    (`detected`: found in --output_dir rather than named, which the refusal says)."""
    state = check_checkpoint(checkpoint)
    saved = state.get("args", {})
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {getattr(args, k)!r}" for k in RESUME_MUST_MATCH
             if k in saved and saved[k] != getattr(args, k)]
    if state.get("process_states") and state.get("num_processes") != num_processes:
        # Each process's part of a stream is its own: a different process count would read other shards.
        diffs.append(f"processes reading the stream: checkpoint {state.get('num_processes')}, now {num_processes}")
    if diffs:
        found = f"; it was found in --output_dir: {OVERWRITE_HINT}" if detected else ""
        raise UserError(f"cannot resume from {checkpoint}: settings differ ({'; '.join(diffs)}){found}")
    return state


# ---------------------------------------------------------------------------------------------
# The run, set up
# ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    """Everything the loop needs, built by `setup`. `model` is the unwrapped model (OneR or the CLIP
    adapter); `pretrainer` its accelerate-prepared training wrapper; `dataloader` is prepared by
    accelerate for map-style data and is a torchdata `StatefulDataLoader` for a stream (`streamed`)."""

    args: object
    accelerator: Accelerator
    pretrainer: torch.nn.Module
    model: torch.nn.Module
    processor: object
    config: OneRConfig
    dataset: torch.utils.data.Dataset
    dataloader: object
    streamed: bool
    batches_per_epoch: int | None
    objective: Objective
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    state: TrainState
    ema: EMATarget | None
    subwords: torch.Tensor | None  # the MLM term's whole-word table; None without it
    resume: Path | None
    log: TrainingLog
    output_dir: Path
    model_class: type  # what the final folder is built from (FSDP2 changes the prepared module's class)
    resume_epoch: int  # the epoch a resumed checkpoint was taken in (a stream's position is its own)
    global_batch: int
    start_step: int  # the step this launch starts at (a resumed checkpoint's)
    data_counts: TrainedDataCounts


def setup(args) -> Run:
    """Build the run for `args`; raises `UserError` for bad input before anything is written."""
    threads, threads_reason = configure_threads(args.num_threads)
    accelerator = make_accelerator(args)
    set_seed(args.seed)
    memory = keep_freed_memory() if accelerator.device.type == "cpu" else None

    # ---- validate every input BEFORE anything is written
    objective = Objective(ObjectiveConfig.from_flags(args))
    pretrainer, model, processor, config = build_model(args, objective.config)
    try:
        dataset = open_train_data(args, seed=args.seed, image_size=config.image_size,
                                  rank=accelerator.process_index, world_size=accelerator.num_processes)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None
    resume, detected = choose_resume(args)
    resumed_state = (check_resume_compatible(args, resume, accelerator.num_processes, detected)
                     if resume is not None else {})
    streamed = isinstance(dataset, StreamingPairs)
    if streamed:
        if args.num_train_epochs and not args.max_steps:
            raise UserError("--num_train_epochs on a stream: its length is unknown until it ends, so give "
                            "--max_steps too (the schedule's length; the epochs still bound the run)")
        dataloader = make_stream_loader(dataset, processor, args.per_device_batch_size, args.dataloader_num_workers)
    else:
        dataloader = make_dataloader(
            dataset, processor, args.per_device_batch_size, seed=args.seed, num_workers=args.dataloader_num_workers
        )
        if len(dataloader) < accelerator.num_processes * args.accum_freq:
            raise UserError(
                f"{args.train_data}: {len(dataset)} pairs make fewer than one step of "
                f"{accelerator.num_processes * args.accum_freq * args.per_device_batch_size} pairs; lower --per_device_batch_size"
            )
    # ---- sharding (FSDP / DeepSpeed, chosen by the accelerate config): see oner/training/sharding.py
    unsupported = check_supported(accelerator, args) or configure_deepspeed_clipping(accelerator, args.max_grad_norm)
    if unsupported:
        raise UserError(f"{engine(accelerator)}: {unsupported}")

    output_dir = Path(args.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        if args.overwrite_output_dir and list_checkpoints(output_dir):
            print(f"--overwrite_output_dir: deleting the checkpoints of an earlier run in {output_dir}")
            for old in list_checkpoints(output_dir):
                shutil.rmtree(old)

    model_class = type(model)  # before `prepare`: FSDP2 changes the class
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
    if args.momentum > 0:
        if not state.total_steps:
            raise UserError("--momentum needs a known schedule length: give --max_steps or --num_train_epochs")
        ema = EMATarget(model, args.momentum, state.total_steps).to(accelerator.device)
        accelerator.register_for_checkpointing(ema)

    if resume is not None:
        try:
            accelerator.load_state(str(resume))
        except Exception as e:  # a damaged file: torch/safetensors/pickle errors of many kinds
            raise UserError(f"cannot resume from {resume}: damaged checkpoint ({type(e).__name__}: {e})") from None
        if streamed:
            dataloader.load_state_dict(load_process_state(resume, accelerator.process_index))
        # The schedule's length is this run's (a resume may extend --max_steps), not the checkpoint's.
        state.total_steps = planned_steps(args, batches_per_epoch)
        if detected:  # transformers' example scripts' words
            accelerator.print(f"Checkpoint detected, resuming training at {resume}. To avoid this behavior, change "
                              "the --output_dir or add --overwrite_output_dir to train from scratch.")
        accelerator.print(f"resumed from {resume} at step {state.step} ({state.batches_seen} batches seen)")

    log = TrainingLog(output_dir, state.step if resume is not None else None, enabled=accelerator.is_main_process)
    run_config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool)) or v is None}
    accelerator.init_trackers("oner", config={k: v for k, v in run_config.items() if v is not None})
    if accelerator.is_main_process:
        (output_dir / "training_args.json").write_text(json.dumps(vars(args), indent=2, default=sorted) + "\n")

    prepare_evaluation(args, accelerator)
    global_batch = args.per_device_batch_size * args.accum_freq * accelerator.num_processes
    if args.model_name_or_path:
        accelerator.print(f"continuing from {args.source_model}: its weights and processor, a fresh optimizer and schedule")
    accelerator.print(
        f"training {args.architecture} ({args.preset}, {n_params / 1e6:.1f}M parameters) on "
        f"{'a stream of pairs' if streamed else f'{len(dataset)} pairs'} from {args.train_data}; "
        f"{accelerator.num_processes} process(es), {global_batch} pairs per step, "
        f"objective {args.objective}; engine {requested_engine(accelerator)}"
    )
    accelerator.print(f"compute: {accelerator.device}, {threads} torch thread(s) per process ({threads_reason}); "
                      f"mixed precision {args.mixed_precision} ({args.mixed_precision_reason}); "
                      f"attention {args.attn_implementation} ({args.attn_reason}); "
                      f"{args.dataloader_num_workers} data-loader worker(s)" + (f"; {memory}" if memory else ""))
    if accelerator.device.type == "cpu" and accelerator.is_main_process:
        for warning in cpu_slow_paths(args.mixed_precision, args.attn_implementation, threads):
            accelerator.print(f"compute: WARNING: {warning}")
    return Run(
        args=args, accelerator=accelerator, pretrainer=pretrainer, model=model, processor=processor, config=config,
        dataset=dataset, dataloader=dataloader, streamed=streamed, batches_per_epoch=batches_per_epoch,
        objective=objective, optimizer=optimizer, scheduler=scheduler, state=state, ema=ema,
        subwords=subword_table(processor.tokenizer) if "mlm" in objective.config.weights else None,
        resume=resume, log=log, output_dir=output_dir, model_class=model_class,
        resume_epoch=resumed_state.get("epoch", 0),
        global_batch=global_batch,
        start_step=state.step,
        data_counts=TrainedDataCounts(dataset.stats, resumed_state.get("data_stats")),
    )
