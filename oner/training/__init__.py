"""Pretraining machinery behind `train.py`: flags, data adapter, steps (with feature caching),
checkpoints, tracking. The objectives live in `oner.objectives`, the distributed loss in `oner.losses`."""

from .args import build_parser, parse_args
from .loop import main, train

__all__ = ["build_parser", "parse_args", "main", "train"]
