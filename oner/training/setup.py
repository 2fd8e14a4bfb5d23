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
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DynamoBackend, TorchDynamoPlugin, set_seed

from modeling_oner import OneRConfig, OneRModel
from oner.baseline import build_clip
from oner.objectives import Objective, ObjectiveConfig
from processing_oner import build_processor

from .checkpointing import (
    TrainState,
    check_checkpoint,
    list_checkpoints,
    load_process_state,
    resolve_resume,
    settings_differences,
    settings_to_match,
)
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


class UserError(Exception):
    """Bad input (data, resume folder, flags): reported as one line, exit status 1, nothing written."""


@dataclass(frozen=True)
class Compute:
    """How this run computes, chosen for the machine (see `oner.training.runtime`); the `compute:` line
    says it and `training_summary.json` records the precision and attention."""

    threads: int
    threads_reason: str
    mixed_precision: str
    mixed_precision_reason: str
    attn_implementation: str
    attn_reason: str

    @classmethod
    def choose(cls, args) -> "Compute":
        """Threads (set now, before torch works), precision and attention from the flags and the machine."""
        device_type = _device_type()
        threads, threads_reason = configure_threads(args.num_threads)
        return cls(threads, threads_reason, *choose_mixed_precision(args.mixed_precision, device_type),
                   *choose_attn_implementation(args.attn_implementation, device_type))


def make_accelerator(args, compute: Compute) -> Accelerator:
    """The run's Accelerator, in the precision `compute` chose."""
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
        mixed_precision=compute.mixed_precision,
        log_with=log_with,
        project_dir=args.output_dir,
        # Our scheduler counts optimizer updates, whatever the number of processes.
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
        # None: accelerate's own dynamo setting (launch flags, config file, ACCELERATE_DYNAMO_* variables).
        dynamo_plugin=TorchDynamoPlugin(backend=args.torch_compile_backend,
                                        use_regional_compilation=args.torch_compile_regional)
        if args.torch_compile else None,
    )


def _device_type() -> str:
    if not has_accelerator_device():
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "other"


@dataclass(frozen=True)
class ModelSource:
    """What the model was built from: its preset (the one a loaded model's sizes match, or "custom"),
    and, for `--model_name_or_path`, the folder or Hub id it continues (`base_model`: a Hub id, for the
    model card)."""

    preset: str
    continued_from: str | None = None
    base_model: str | None = None


@dataclass
class BuiltModel:
    """`build_model`'s result: the training wrapper, the model it wraps (what is saved), the processor,
    the OneR config (for a CLIP baseline, the one it was sized from) and where the model came from."""

    pretrainer: torch.nn.Module
    model: torch.nn.Module
    processor: object
    config: OneRConfig
    source: ModelSource


def build_model(args, objective: ObjectiveConfig, attn_implementation: str | None) -> BuiltModel:
    """The model for `--architecture oner|clip`, in its training wrapper.

    A fresh model from `--preset` + `--config_overrides` with the objective's scoring settings in its
    config (`ObjectiveConfig.model_settings`: the sigmoid loss's bias, a fixed temperature), or, with
    `--model_name_or_path`, the saved model and its processor given those settings
    (`oner.training.pretrained`). A fixed temperature's logit scale is frozen. Raises UserError for a
    source that cannot be used.
    """
    if args.model_name_or_path:
        model, processor, config, source = load_source_model(args, attn_implementation)
        adopt_model_settings(model, objective.model_settings)
    else:
        config = OneRConfig.from_preset(args.preset, **{**args.model_overrides, **objective.model_settings})
        # Training-time only: transformers does not save it, so a loaded model picks its own (sdpa).
        config._attn_implementation = attn_implementation
        if args.architecture == "clip":  # the two-tower baseline, behind the same interface (oner.baseline)
            model, processor = build_clip(config)
        else:
            model, processor = OneRModel(config), build_processor(config)
        source = ModelSource(preset=args.preset)
    if objective.temperature is not None:
        model.logit_scale.requires_grad_(False)
    pretrainer = OneRPretrainer(model, objective)
    if args.gradient_checkpointing:
        # Non-reentrant checkpointing works with DDP and with parameters unused by some passes.
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return BuiltModel(pretrainer, model, processor, config, source)


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


def load_source_model(args, attn_implementation: str | None):
    """`(model, processor, config, source)` of `--model_name_or_path`, after checking the preset and
    overrides against it (see `oner.training.pretrained` for what is refused and why)."""
    from .pretrained import SourceError, check_agreement, load_pretrained, preset_name, resolve_source, source_config

    try:
        source = resolve_source(args.model_name_or_path, args.revision)
        config = source_config(source, args.architecture)
        preset = args.preset if "preset" in args.explicit_flags else None
        apply = check_agreement(config, preset, args.model_overrides, args.architecture, source.label)
        model, processor = load_pretrained(source, args.architecture, attn_implementation, apply)
    except SourceError as e:
        raise UserError(str(e)) from None
    for key, value in apply.items():
        setattr(config, key, value)
    built_from = ModelSource(preset=preset_name(config, args.architecture), continued_from=source.label,
                             base_model=None if source.local else args.model_name_or_path)
    return model, processor, config, built_from


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


def check_resume_compatible(settings: dict, checkpoint: Path, num_processes: int, detected: bool = False) -> dict:
    """The checkpoint's `train_state.json`, once its settings are known to match this run's `settings`
    (`checkpointing.settings_to_match`; `detected`: found in --output_dir rather than named, which the
    refusal says)."""
    state = check_checkpoint(checkpoint)
    diffs = settings_differences(state.get("args", {}), settings)
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
class TrainData:
    """The training pairs and their loader: prepared by accelerate for map-style data, a torchdata
    `StatefulDataLoader` for a stream (`streamed`, whose length is unknown: `batches_per_epoch` None)."""

    dataset: torch.utils.data.Dataset
    loader: object
    streamed: bool
    batches_per_epoch: int | None
    counts: TrainedDataCounts  # samples read and skipped, over the whole run (a resume included)


@dataclass(frozen=True)
class Resume:
    """Where this launch starts: a checkpoint (None: from scratch), whether it was found in
    --output_dir rather than named, and its epoch and step."""

    checkpoint: Path | None = None
    detected: bool = False
    epoch: int = 0  # the epoch the checkpoint was taken in (a stream's position is its own)
    start_step: int = 0


@dataclass
class Run:
    """Everything the loop needs, built by `setup`: the flags and what setup resolved from them
    (`compute`, `source`), the model (`model` unwrapped, OneR or the CLIP adapter; `pretrainer` its
    accelerate-prepared training wrapper), the objective, the data, the optimisation and the position."""

    args: object
    accelerator: Accelerator
    compute: Compute
    source: ModelSource
    pretrainer: torch.nn.Module
    model: torch.nn.Module
    model_class: type  # what the final folder is built from (FSDP2 changes the prepared module's class)
    processor: object
    config: OneRConfig
    objective: Objective
    subwords: torch.Tensor | None  # the MLM term's whole-word table; None without it
    ema: EMATarget | None
    data: TrainData
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    state: TrainState
    resume: Resume
    log: TrainingLog

    @property
    def output_dir(self) -> Path:
        return Path(self.args.output_dir)

    @property
    def global_batch(self) -> int:
        return self.args.per_device_batch_size * self.args.accum_freq * self.accelerator.num_processes


def setup(args) -> Run:
    """Build the run for `args`; raises `UserError` for bad input before anything is written."""
    compute = Compute.choose(args)
    accelerator = make_accelerator(args, compute)
    set_seed(args.seed)
    memory = keep_freed_memory() if accelerator.device.type == "cpu" else None

    # ---- validate every input BEFORE anything is written
    objective = Objective(ObjectiveConfig.from_flags(args))
    built = build_model(args, objective.config, compute.attn_implementation)
    dataset, loader = open_data(args, built, accelerator)
    checkpoint, detected = choose_resume(args)
    resumed_state = (check_resume_compatible(settings_to_match(args, built.source.preset), checkpoint,
                                             accelerator.num_processes, detected) if checkpoint is not None else {})
    # ---- sharding (FSDP / DeepSpeed, chosen by the accelerate config): see oner/training/sharding.py
    unsupported = check_supported(accelerator, args) or configure_deepspeed_clipping(accelerator, args.max_grad_norm)
    if unsupported:
        raise UserError(f"{engine(accelerator)}: {unsupported}")
    if accelerator.is_main_process:
        start_output_dir(args)

    model, n_params = built.model, sum(p.numel() for p in built.model.parameters())  # before FSDP shards it
    model_class = type(model)  # before `prepare`: FSDP2 changes the class
    if needs_vector_scalars(accelerator):
        promote_scalar_parameters(built.pretrainer)  # FSDP and DeepSpeed fail on 0-dim parameters (logit scale/bias)
    state = TrainState()
    optimizer = make_optimizer(built.pretrainer, args)
    scheduler = make_scheduler(optimizer, args, state)
    streamed = isinstance(dataset, StreamingPairs)
    if streamed:  # already split between processes (split_dataset_by_node): accelerate must not shard it again
        pretrainer, optimizer, scheduler = accelerator.prepare(built.pretrainer, optimizer, scheduler)
    else:
        pretrainer, optimizer, loader, scheduler = accelerator.prepare(built.pretrainer, optimizer, loader, scheduler)
    data = TrainData(dataset, loader, streamed, None if streamed else len(loader),
                     TrainedDataCounts(dataset.stats, resumed_state.get("data_stats")))
    accelerator.register_for_checkpointing(state)
    state.total_steps = planned_steps(args, data.batches_per_epoch)
    ema = None
    if args.momentum > 0:
        if not state.total_steps:
            raise UserError("--momentum needs a known schedule length: give --max_steps or --num_train_epochs")
        ema = EMATarget(model, args.momentum, state.total_steps).to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    if checkpoint is not None:
        restore(accelerator, data, state, args, checkpoint, detected)

    run = Run(args=args, accelerator=accelerator, compute=compute, source=built.source, pretrainer=pretrainer,
              model=model, model_class=model_class, processor=built.processor, config=built.config, objective=objective,
              subwords=subword_table(built.processor.tokenizer) if "mlm" in objective.config.weights else None,
              ema=ema, data=data, optimizer=optimizer, scheduler=scheduler, state=state,
              resume=Resume(checkpoint, detected, resumed_state.get("epoch", 0), state.step),
              log=TrainingLog(Path(args.output_dir), state.step if checkpoint is not None else None,
                              enabled=accelerator.is_main_process))
    start_tracking(run)
    prepare_evaluation(args, accelerator)
    announce(run, n_params, memory)
    return run


def open_data(args, built: BuiltModel, accelerator) -> tuple[torch.utils.data.Dataset, object]:
    """The training pairs and their (not yet prepared) loader; UserError for data that cannot train."""
    try:
        dataset = open_train_data(args, seed=args.seed, image_size=built.config.image_size,
                                  rank=accelerator.process_index, world_size=accelerator.num_processes)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None
    if isinstance(dataset, StreamingPairs):
        if args.num_train_epochs and not args.max_steps:
            raise UserError("--num_train_epochs on a stream: its length is unknown until it ends, so give "
                            "--max_steps too (the schedule's length; the epochs still bound the run)")
        return dataset, make_stream_loader(dataset, built.processor, args.per_device_batch_size,
                                           args.dataloader_num_workers)
    loader = make_dataloader(dataset, built.processor, args.per_device_batch_size, seed=args.seed,
                             num_workers=args.dataloader_num_workers)
    if len(loader) < accelerator.num_processes * args.accum_freq:
        raise UserError(
            f"{args.train_data}: {len(dataset)} pairs make fewer than one step of "
            f"{accelerator.num_processes * args.accum_freq * args.per_device_batch_size} pairs; lower --per_device_batch_size"
        )
    return dataset, loader


def start_output_dir(args) -> None:
    """Main process: the output folder exists; with --overwrite_output_dir an earlier run's checkpoints go."""
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if args.overwrite_output_dir and list_checkpoints(output_dir):
        print(f"--overwrite_output_dir: deleting the checkpoints of an earlier run in {output_dir}")
        for old in list_checkpoints(output_dir):
            shutil.rmtree(old)


def restore(accelerator, data: TrainData, state: TrainState, args, checkpoint: Path, detected: bool) -> None:
    """Load a checkpoint's state (weights, optimizer, schedule, RNG, a stream's position) into the run."""
    try:
        accelerator.load_state(str(checkpoint))
    except Exception as e:  # a damaged file: torch/safetensors/pickle errors of many kinds
        raise UserError(f"cannot resume from {checkpoint}: damaged checkpoint ({type(e).__name__}: {e})") from None
    if data.streamed:
        data.loader.load_state_dict(load_process_state(checkpoint, accelerator.process_index))
    # The schedule's length is this run's (a resume may extend --max_steps), not the checkpoint's.
    state.total_steps = planned_steps(args, data.batches_per_epoch)
    if detected:  # transformers' example scripts' words
        accelerator.print(f"Checkpoint detected, resuming training at {checkpoint}. To avoid this behavior, change "
                          "the --output_dir or add --overwrite_output_dir to train from scratch.")
    accelerator.print(f"resumed from {checkpoint} at step {state.step} ({state.batches_seen} batches seen)")


def start_tracking(run: Run) -> None:
    """The trackers' run config and `training_args.json`: the flags, and what setup resolved from them."""
    args, accelerator = run.args, run.accelerator
    resolved = {**dataclasses.asdict(run.compute), "preset": run.source.preset,
                "continued_from": run.source.continued_from}
    run_config = {k: v for k, v in {**vars(args), **resolved}.items()
                  if isinstance(v, (int, float, str, bool))}
    accelerator.init_trackers("oner", config=run_config)
    if accelerator.is_main_process:
        record = {**vars(args), "resolved": resolved}
        (run.output_dir / "training_args.json").write_text(json.dumps(record, indent=2, default=sorted) + "\n")


def compile_note(accelerator: Accelerator, args) -> str:
    """What the `compute:` line says of torch.compile: nothing when the step runs eagerly."""
    plugin = accelerator.state.dynamo_plugin
    if plugin.backend == DynamoBackend.NO:
        return ""
    what = ("regional: one transformer layer compiled, reused for the others" if plugin.use_regional_compilation
            else "the whole training pass: minutes of compiling on a CPU")
    source = "--torch_compile" if args.torch_compile else "accelerate's dynamo setting"
    return f"; torch.compile {plugin.backend.value.lower()} ({what}; {source}; the first steps wait for the compiler)"


def announce(run: Run, n_params: int, memory: str | None) -> None:
    """The lines that say what this run is and how it computes (and what it costs on this CPU)."""
    args, accelerator, compute, source = run.args, run.accelerator, run.compute, run.source
    if source.continued_from:
        accelerator.print(f"continuing from {source.continued_from}: its weights and processor, a fresh optimizer "
                          "and schedule")
    accelerator.print(
        f"training {args.architecture} ({source.preset}, {n_params / 1e6:.1f}M parameters) on "
        f"{'a stream of pairs' if run.data.streamed else f'{len(run.data.dataset)} pairs'} from {args.train_data}; "
        f"{accelerator.num_processes} process(es), {run.global_batch} pairs per step, "
        f"objective {args.objective}; engine {requested_engine(accelerator)}"
    )
    accelerator.print(f"compute: {accelerator.device}, {compute.threads} torch thread(s) per process "
                      f"({compute.threads_reason}); mixed precision {compute.mixed_precision} "
                      f"({compute.mixed_precision_reason}); attention {compute.attn_implementation} "
                      f"({compute.attn_reason}); {args.dataloader_num_workers} data-loader worker(s)"
                      + compile_note(accelerator, args) + (f"; {memory}" if memory else ""))
    if accelerator.device.type == "cpu" and accelerator.is_main_process:
        for warning in cpu_slow_paths(compute.mixed_precision, compute.attn_implementation, compute.threads):
            accelerator.print(f"compute: WARNING: {warning}")
