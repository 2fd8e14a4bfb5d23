"""Pretraining machinery behind `train.py`: flags (`args`), building a run (`setup`), the loop with
its step, NaN guard and checkpoints (`loop`, `step`, `checkpointing`), the end of a run (`finish`:
folder, evaluation, card, push; shared with `oner-push`), data (`data`: map-style and streamed),
the wrapper DDP wraps (`pretrainer`: features of a micro-batch, the EMA target), the MLM head and
masking (`mlm`), sharding (`sharding`), continuing from a trained model (`pretrained`), threads and
precision (`runtime`), tracking. The objective terms live in `oner.objectives`, the distributed loss
in `oner.losses`."""

from .args import build_parser, parse_args
from .loop import main, train

__all__ = ["build_parser", "parse_args", "main", "train"]
