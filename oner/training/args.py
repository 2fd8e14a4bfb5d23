"""Command-line flags of `train.py`, in the style of transformers' and accelerate's examples.

Precedence: built-in defaults (= the embedded default run, also written out in
`configs/tiny-embedded.yaml`) < a `--config` YAML/JSON file < flags on the command line.
An unknown flag, an unknown key in the config file or an unknown objective term ends the program
with one clear message and exit status 2 (argparse's convention).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from accelerate.utils import DynamoBackend

from oner.flags import accept_aliases, dests_by_name
from oner.objectives import ObjectiveConfig, flag_name

ARCHITECTURES = ("oner", "clip")
PRESETS = ("tiny", "small", "base-patch16-224")
MIXED_PRECISION = ("no", "fp32", "bf16", "fp16")
# The embedded default trains a fixed number of steps, not a time budget, so that the same command
# gives the same model on every CPU: 13.5 minutes on 2 cores of an AMD EPYC with AVX-512 BF16,
# longer without native bf16 (docs/training.md).
DEFAULT_MAX_STEPS = 2600
EVAL_STRATEGIES = ("no", "steps", "epoch")
#: Other tools' names for flags that mean the same here (transformers' TrainingArguments and example
#: scripts; open_clip's training flags, whose hyphens `accept_aliases` accepts). Not aliased, as they
#: mean something else: open_clip's --precision (amp/pure bf16, not autocast only), --lr-scheduler
#: (other choices), --save-frequency (epochs), --logs, transformers' --bf16/--fp16 (booleans; use
#: --mixed_precision bf16|fp16). docs/training.md lists them all.
ALIASES = {
    "--per_device_batch_size": ["--per_device_train_batch_size", "--batch_size"],
    # The same optimizer steps and effective batch as transformers' accumulation, with the whole
    # accumulated batch's loss (negatives from every micro-batch), as open_clip's --accum-freq.
    "--accum_freq": ["--gradient_accumulation_steps"],
    "--checkpoints_total_limit": ["--save_total_limit"],
    "--checkpointing_steps": ["--save_steps"],
    "--text_column": ["--caption_column", "--csv_caption_key"],
    "--image_column": ["--csv_img_key"],
    "--train_data": ["--dataset_name", "--train_file"],
    "--hub_private": ["--hub_private_repo"],
    "--learning_rate": ["--lr"],
    "--num_train_epochs": ["--epochs"],
    "--warmup_steps": ["--warmup"],
    "--weight_decay": ["--wd"],
    "--adam_beta1": ["--beta1"],
    "--adam_beta2": ["--beta2"],
    "--adam_epsilon": ["--eps"],
    "--max_grad_norm": ["--grad_clip_norm"],
    "--gradient_checkpointing": ["--grad_checkpointing"],
    "--dataloader_num_workers": ["--workers"],
    "--resume_from_checkpoint": ["--resume"],
}


def _bool(value: str) -> bool:
    """`--flag`, `--flag true`, `--flag false` (and config files' real booleans)."""
    if isinstance(value, bool):
        return value
    lowered = str(value).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _flag(parser, name: str, default: bool, help: str) -> None:
    parser.add_argument(name, type=_bool, nargs="?", const=True, default=default, help=help)


def add_objective_flags(group) -> None:
    """One flag per field of `ObjectiveConfig`, with its default, choices and help: the objective's
    settings have one source, and `ObjectiveConfig.from_flags` reads them back."""
    for setting in dataclasses.fields(ObjectiveConfig):
        meta, name = setting.metadata, "--" + flag_name(setting)
        default = ObjectiveConfig().weights if setting.default is dataclasses.MISSING else setting.default
        if setting.name == "weights":
            default = "+".join(term if weight == 1 else f"{term}:{weight:g}" for term, weight in default.items())
        if isinstance(default, bool):
            _flag(group, name, default, meta["help"])
        else:
            group.add_argument(name, type=meta["type"] or type(default), default=default, choices=meta["choices"],
                               help=meta["help"])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Pretrain OneR (or the CLIP two-tower baseline). With no arguments: the tiny preset on the "
        "embedded Twemoji pairs for 2,600 steps (about 15 minutes on 2 cores with bf16), then evaluation and a complete model folder.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("setup")
    g.add_argument("--config", default=None, help="YAML or JSON file of flag values; flags given here override it")
    g.add_argument("--preset", default="tiny", choices=PRESETS, help="model size (OneRConfig.from_preset)")
    g.add_argument("--architecture", default="oner", choices=ARCHITECTURES,
                   help="oner, or clip: transformers' CLIPModel with each tower sized like the preset (ITC only)")
    g.add_argument("--config_overrides", default=None,
                   help="override preset fields, as transformers' run_clm: 'hidden_size=128,num_hidden_layers=2'")
    g.add_argument("--model_name_or_path", default=None,
                   help="start from this trained model instead of a fresh one: a folder saved by train.py or a Hub id "
                   "(owner/name); its processor too, with a fresh optimizer and schedule. An explicit --preset and "
                   "--config_overrides must agree with it (only attention_dropout may change)")
    g.add_argument("--revision", default=None,
                   help="branch, tag or commit of the --model_name_or_path Hub repository (default: main)")
    g.add_argument("--output_dir", default="outputs/oner-tiny-embedded", help="model folder, checkpoints and logs")
    g.add_argument("--seed", type=int, default=0)

    g = p.add_argument_group("data")
    g.add_argument("--train_data", default="embedded",
                   help="'embedded' (Twemoji pairs), an imagefolder (metadata.jsonl/csv), a save_to_disk folder, data files "
                   "(.tar webdataset, .parquet, .jsonl, .csv: one file, a glob, a brace range '/data/{00000..00331}.tar' "
                   "or a folder of them) or a Hub data set id")
    g.add_argument("--dataset_config_name", default=None, help="configuration of a Hub data set")
    g.add_argument("--dataset_revision", default=None, help="commit, branch or tag of a Hub data set")
    _flag(g, "--streaming", None, "read the data as a stream, without converting it first. Unset: streams .tar and "
          ".parquet shards and Hub data sets, reads the rest map-style")
    g.add_argument("--shuffle_buffer", type=int, default=1000,
                   help="rows in a stream's shuffle buffer, per process and loader worker (kept in checkpoints)")
    g.add_argument("--image_column", default=None, help="image column (auto-detected when omitted)")
    g.add_argument("--text_column", default=None, help="caption column (auto-detected when omitted)")
    g.add_argument("--max_train_samples", type=int, default=None, help="use only the first N pairs")
    g.add_argument("--train_filter", default=None,
                   help="keep only rows whose metadata column has this value, e.g. skin_tone=false (the embedded set's "
                   "skin-tone variants are half its rows but 5 recolourings of ~400 concepts)")
    _flag(g, "--image_augment", True, "random resized crop, flip where meaning allows, colour jitter, blur")
    _flag(g, "--text_augment", True, "pick one of a pair's captions and whole-word-mask it (see --caption_mask_probability)")
    g.add_argument("--augment_backend", default="tensor", choices=("pil", "tensor"),
                   help="tensor: images cached as uint8 tensors and each batch cropped, flipped, jittered and normalised "
                   "at once (needed by the style augmentations below); pil: each image augmented with PIL as it is "
                   "loaded (the same draws; the same model within seed noise, docs/data.md)")
    g.add_argument("--color_jitter", type=float, default=0.2,
                   help="brightness, contrast and saturation factors drawn from [1 - x, 1 + x] (--image_augment)")
    g.add_argument("--hue_jitter", type=float, default=0.0,
                   help="hue rotation drawn from [-x, x] turns, 0.5 = any hue (tensor backend) [ours]")
    g.add_argument("--greyscale_probability", type=float, default=0.0, help="images made grey (tensor backend)")
    g.add_argument("--randconv_probability", type=float, default=0.0,
                   help="images passed through a random convolution mixed with themselves (RandConv, Xu et al. "
                   "ICLR 2021; tensor backend)")
    g.add_argument("--outline_probability", type=float, default=0.0,
                   help="images given a dark, broken outline along colour edges (tensor backend) [ours]")
    _flag(g, "--style_keeps_named_colours", True,
          "hue, greyscale and RandConv leave alone the pairs whose captions name a colour or skin tone [ours]")
    g.add_argument("--caption_mask_probability", type=float, default=0.0,
                   help="words of the training caption replaced by [MASK] as augmentation [code]")
    g.add_argument("--dataloader_num_workers", type=int, default=0,
                   help="loader processes; 0 loads in the training process (cheap for the embedded data, and no worker competes with the compute threads)")

    add_objective_flags(p.add_argument_group("objective"))

    g = p.add_argument_group("optimisation")
    g.add_argument("--max_steps", type=int, default=DEFAULT_MAX_STEPS,
                   help="optimizer steps: the schedule's length. The default is the embedded run's fixed length (the "
                   "same model on every CPU); it gives way to --num_train_epochs or --max_train_minutes when those "
                   "are given without --max_steps")
    g.add_argument("--num_train_epochs", type=float, default=None, help="passes over the data, when --max_steps is not given")
    g.add_argument("--max_train_minutes", type=float, default=None,
                   help="wall-clock budget of the training loop; alone (without --max_steps / --num_train_epochs) it "
                   "sets the schedule, decaying the learning rate on time")
    g.add_argument("--per_device_batch_size", type=int, default=128, help="pairs per micro-batch per process")
    g.add_argument("--accum_freq", type=int, default=1,
                   help="micro-batches per step, with feature caching: negatives from ALL micro-batches (GradCache). As "
                   "--gradient_accumulation_steps: the same steps and effective batch, and the loss of the whole "
                   "accumulated batch rather than a sum of per-micro-batch losses")
    g.add_argument("--learning_rate", type=float, default=1e-3)
    g.add_argument("--weight_decay", type=float, default=0.1)
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.98)
    g.add_argument("--adam_epsilon", type=float, default=1e-6)
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="0 disables clipping")
    g.add_argument("--lr_scheduler_type", default="cosine", choices=("cosine", "linear", "constant"))
    g.add_argument("--warmup_steps", type=int, default=50)
    g.add_argument("--mixed_precision", default=None, choices=MIXED_PRECISION,
                   help="fp32 = no. Unset: what accelerate config / accelerate launch --mixed_precision chose, else "
                   "bf16 where the device computes it natively (GPUs with bf16, CPUs with AVX-512 BF16 or AMX), else fp32")
    g.add_argument("--attn_implementation", default=None, choices=("eager", "sdpa"),
                   help="attention kernel for training. Unset: eager on CPUs (SDPA's CPU backward is slow), sdpa on GPUs")
    _flag(g, "--torch_compile", False, "compile the training pass with torch.compile, through accelerate. false: "
          "accelerate's own setting applies (accelerate launch --dynamo_backend ...; off by default)")
    g.add_argument("--torch_compile_backend", default="inductor",
                   help="torch.compile backend for --torch_compile (accelerate's dynamo backends: inductor, eager, ...)")
    _flag(g, "--torch_compile_regional", True, "with --torch_compile: compile one transformer layer and reuse it for "
          "the others (accelerate's regional compilation: about half the compile time of the whole pass) [ours]")
    g.add_argument("--num_threads", type=int, default=None,
                   help="torch CPU threads per process. Unset: OMP_NUM_THREADS, except accelerate launch's default 1, "
                   "which becomes the cores per local process")
    _flag(g, "--gradient_checkpointing", False, "recompute activations in the backward pass (less memory, ~30%% slower)")
    g.add_argument("--max_nonfinite_steps", type=int, default=5,
                   help="stop after this many consecutive steps with a NaN/inf loss or gradient (each is skipped)")

    g = p.add_argument_group("checkpoints and tracking")
    g.add_argument("--checkpointing_steps", type=int, default=100, help="save a resumable checkpoint every N steps; 0 = never")
    g.add_argument("--checkpoints_total_limit", type=int, default=2, help="keep the last N checkpoints")
    g.add_argument("--resume_from_checkpoint", default=None,
                   help="'latest' or a checkpoint folder. Unset: the latest checkpoint in --output_dir, if any")
    _flag(g, "--overwrite_output_dir", False, "start over in an --output_dir that holds checkpoints or a finished run: "
          "its checkpoints are deleted (without it a relaunch continues from the latest checkpoint)")
    g.add_argument("--logging_steps", type=int, default=10)
    g.add_argument("--report_to", default="tensorboard", help="accelerate trackers: tensorboard, all or none")

    g = p.add_argument_group("evaluation and sharing")
    _flag(g, "--do_eval", True, "run the benchmark suites on the final model folder")
    g.add_argument("--eval_max_items", type=int, default=None, help="cap each evaluation suite (quick runs)")
    g.add_argument("--eval_strategy", default=None, choices=EVAL_STRATEGIES,
                   help="evaluate during training: every --eval_steps steps, at the end of each epoch, or never. "
                   "Unset: steps when --eval_steps is given, else no")
    g.add_argument("--eval_steps", type=int, default=None,
                   help="steps between evaluations during training (default with --eval_strategy steps: --logging_steps)")
    g.add_argument("--eval_suites", default="retrieval_openmoji,classification_group",
                   help="comma-separated suites of the evaluation during training (oner-eval's names); the final "
                   "evaluation runs all")
    g.add_argument("--eval_suites_max_items", type=int, default=256,
                   help="cap each suite of the evaluation during training (a fixed-seed subset)")
    _flag(g, "--push_to_hub", False, "upload the final folder with oner.hub.push_folder")
    g.add_argument("--hub_model_id", default=None, help="owner/name on the Hub (needed with --push_to_hub)")
    _flag(g, "--hub_private", False, "create the Hub repository as private")
    return accept_aliases(p, ALIASES)


def _load_config_file(path: str) -> dict:
    file = Path(path).expanduser()
    if not file.is_file():
        raise SystemExit(f"train.py: error: --config {path}: no such file")
    text = file.read_text(encoding="utf-8")
    try:
        if file.suffix.lower() == ".json":
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except Exception as e:  # yaml.YAMLError, json.JSONDecodeError
        raise SystemExit(f"train.py: error: --config {path}: not valid {'JSON' if file.suffix == '.json' else 'YAML'}: {e}")
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise SystemExit(f"train.py: error: --config {path}: expected a mapping of flag names to values")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse flags (and `--config`), validate them, and return the namespace.

    Exits with status 2 and one message on any error (unknown flag or config key, bad value,
    unknown objective term).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    values = {}
    if first.config:
        values = _load_config_file(first.config)
        dests = dests_by_name(parser)  # a key may be any spelling or alias of a flag
        unknown = sorted(k for k in values if k.replace("-", "_") not in dests)
        if unknown:
            parser.error(f"--config {first.config}: unknown keys {unknown}")
        defaults = {dests[k.replace("-", "_")]: v for k, v in values.items() if dests[k.replace("-", "_")] != "config"}
        # Values from the file go through the same type checks as flags.
        for action in parser._actions:
            if action.dest in defaults and action.type is not None and defaults[action.dest] is not None:
                try:
                    defaults[action.dest] = action.type(defaults[action.dest])
                except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
                    parser.error(f"--config {first.config}: {action.dest}: {e}")
            if (action.dest in defaults and action.choices and defaults[action.dest] is not None
                    and defaults[action.dest] not in action.choices):
                parser.error(f"--config {first.config}: {action.dest} must be one of {list(action.choices)}")
        parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    args.explicit_flags = _explicit_flags(argv, values)
    _validate(parser, args)
    return args


def _explicit_flags(argv: list[str], config_values: dict) -> list[str]:
    """Names (dests) of the flags the user gave, on the command line or in the `--config` file, as
    opposed to argparse defaults: e.g. `--preset` must match a `--model_name_or_path` model only when
    given. Sorted, so that `training_args.json` records it as a list."""
    probe = build_parser()
    for action in probe._actions:
        action.default = argparse.SUPPRESS  # absent flags then leave no attribute
    given, _ = probe.parse_known_args(argv)
    dests = dests_by_name(probe)
    return sorted((set(vars(given)) | {dests[k.replace("-", "_")] for k in config_values}) - {"config"})


def _validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    explicit = set(args.explicit_flags)
    if "max_steps" not in explicit and explicit & {"num_train_epochs", "max_train_minutes"}:
        args.max_steps = None  # the user's epochs or time budget, not the default step count, set the schedule
    try:
        objective = ObjectiveConfig.from_flags(args)
    except ValueError as e:
        parser.error(f"objective settings: {e}" if not str(e).startswith("--") else str(e))
    if args.architecture == "clip" and set(objective.weights) != {"itc"}:
        parser.error(f"--architecture clip trains with ITC only (two towers have no joint pass); got --objective {args.objective}")
    if args.architecture == "clip" and args.pairwise_loss == "sigmoid":
        parser.error("--architecture clip trains transformers' CLIPModel, which has no logit bias to save for the "
                     "sigmoid loss: train the baseline with --pairwise_loss softmax")
    if args.architecture == "clip" and args.momentum > 0:
        parser.error("--momentum makes the mixup targets of XMC/CIC/CMC; --architecture clip trains ITC only")
    if args.mixed_precision == "fp32":
        args.mixed_precision = "no"
    backends = [b.value.lower() for b in DynamoBackend if b is not DynamoBackend.NO]
    if args.torch_compile_backend.lower() not in backends:
        parser.error(f"--torch_compile_backend {args.torch_compile_backend!r}: expected one of {', '.join(backends)}")
    for name in ("per_device_batch_size", "accum_freq", "max_nonfinite_steps", "logging_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    for name in ("max_steps", "max_train_samples"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.max_train_minutes is not None and args.max_train_minutes <= 0:
        parser.error("--max_train_minutes must be > 0")
    if args.checkpointing_steps < 0 or args.checkpoints_total_limit < 1:
        parser.error("--checkpointing_steps must be >= 0 and --checkpoints_total_limit >= 1")
    if args.overwrite_output_dir and args.resume_from_checkpoint:
        parser.error("--overwrite_output_dir starts over and --resume_from_checkpoint continues: give one of them")
    _validate_eval(parser, args)
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id owner/name")
    if args.push_to_hub:
        # Fail before training, not after it: a bad repo id or a missing token is known now.
        from oner.hub import PushError, check_repo_id, resolve_token

        try:
            check_repo_id(args.hub_model_id, "--hub_model_id")
            resolve_token()
        except PushError as e:
            parser.error(f"--push_to_hub: {e}")
    if args.revision is not None and not args.model_name_or_path:
        parser.error("--revision pins the --model_name_or_path Hub repository; give --model_name_or_path too")
    if args.model_name_or_path is not None and not str(args.model_name_or_path).strip():
        parser.error("--model_name_or_path is empty")
    if args.num_threads is not None and args.num_threads < 1:
        parser.error("--num_threads must be >= 1")
    if args.shuffle_buffer < 1:
        parser.error("--shuffle_buffer must be >= 1")
    if args.dataloader_num_workers < 0:
        parser.error("--dataloader_num_workers must be >= 0")
    _validate_augment(parser, args)
    try:
        args.model_overrides = parse_overrides(args.config_overrides)
    except ValueError as e:
        parser.error(f"--config_overrides: {e}")


def _validate_eval(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Resolve `--eval_strategy` (unset: steps when `--eval_steps` is given, as users of transformers' Trainer
    expect) and `--eval_steps`; `args.eval_suite_names` is the list of suites."""
    if args.eval_steps is not None and args.eval_steps < 1:
        parser.error("--eval_steps must be >= 1")
    if args.eval_suites_max_items < 1:
        parser.error("--eval_suites_max_items must be >= 1")
    if args.eval_strategy is None:
        args.eval_strategy = "steps" if args.eval_steps is not None else "no"
    elif args.eval_strategy != "steps" and args.eval_steps is not None:
        parser.error(f"--eval_steps {args.eval_steps} needs --eval_strategy steps (got {args.eval_strategy})")
    if args.eval_strategy == "steps" and args.eval_steps is None:
        args.eval_steps = args.logging_steps  # transformers' Trainer does the same
    args.eval_suite_names = [s.strip() for s in str(args.eval_suites).split(",") if s.strip()]
    if args.eval_strategy != "no":
        from oner.evaluation import BenchmarkError, resolve_suites

        try:
            resolve_suites(args.eval_suite_names)
        except BenchmarkError as e:
            parser.error(f"--eval_suites: {e}")


def _validate_augment(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not 0 <= args.color_jitter < 1:
        parser.error(f"--color_jitter must be in [0, 1), got {args.color_jitter}")
    if not 0 <= args.hue_jitter <= 0.5:
        parser.error(f"--hue_jitter must be in [0, 0.5] turns, got {args.hue_jitter}")
    style = ("hue_jitter", "greyscale_probability", "randconv_probability", "outline_probability")
    for name in style[1:]:
        if not 0 <= getattr(args, name) <= 1:
            parser.error(f"--{name} must be a probability in [0, 1], got {getattr(args, name)}")
    asked = [f"--{name}" for name in style if getattr(args, name)]
    if asked and args.augment_backend != "tensor":
        parser.error(f"{', '.join(asked)}: the style augmentations run in the batched path; add --augment_backend tensor")


def parse_overrides(text: str | None) -> dict:
    """`'hidden_size=128,projection_head=mlp'` -> `{"hidden_size": 128, "projection_head": "mlp"}` (validated against OneRConfig)."""
    from modeling_oner import OneRConfig

    if not text:
        return {}
    known = set(OneRConfig().to_dict())
    out = {}
    for item in str(text).split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in known:
            raise ValueError(f"{item!r} is not field=value with a known OneRConfig field")
        for cast in (int, float):
            try:
                out[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            out[key] = {"true": True, "false": False}.get(value.lower(), value)
    return out
