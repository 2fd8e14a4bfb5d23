"""OneR data: the embedded emoji data set, user image-text data, augmentations, damage counting.

Public API (imported lazily so that ``import oner.data`` stays cheap):

- ``build_embedded_dataset(root=None, seed=0, progress=True, limit=None) -> Path``
- ``load_image_text_dataset(source, *, image_column=None, text_column=None, split="train", streaming=None)``
- ``ImageTextCollator(processor, stats=None)``
- ``ImageAugment``, ``TextAugment``, ``flip_allowed``, ``colour_allowed``
- ``TensorAugment``, ``StyleAugment``: the batched augmentation backend and its style augmentations
- ``DataStats``, ``DAMAGE_KINDS``
- ``load_concepts``
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "build_embedded_dataset": "embedded",
    "default_root": "embedded",
    "read_manifest": "embedded",
    "SPLITS": "embedded",
    "load_image_text_dataset": "pairs",
    "decode_image": "pairs",
    "decode_and_count": "pairs",
    "looks_like_local_path": "pairs",
    "ImageTextDataset": "pairs",
    "ImageTextIterableDataset": "pairs",
    "ImageTextCollator": "pairs",
    "DamagedSample": "pairs",
    "ImageAugment": "augment",
    "TextAugment": "augment",
    "flip_allowed": "augment",
    "colour_allowed": "augment",
    "TensorAugment": "augment",
    "StyleAugment": "augment",
    "DataStats": "stats",
    "DAMAGE_KINDS": "stats",
    "Concept": "concepts",
    "load_concepts": "concepts",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    """Import the submodule that defines ``name`` on first use."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'oner.data' has no attribute {name!r}")
    module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
    return getattr(module, name)
