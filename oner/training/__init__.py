"""Pretraining machinery behind `train.py`: flags, data adapter, the wrapper DDP wraps (`pretrainer`:
features of a micro-batch, the EMA target), the MLM head and masking (`mlm`), steps (with feature
caching), checkpoints, tracking. The objective terms live in `oner.objectives`, the distributed loss
in `oner.losses`."""

from .args import build_parser, parse_args
from .loop import main, train

__all__ = ["build_parser", "parse_args", "main", "train"]
