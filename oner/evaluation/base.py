"""The suite interface: a named, described evaluation that returns `{metric: number}`."""

from __future__ import annotations

from dataclasses import dataclass

from .context import EvalContext

#: model-index task per suite kind, used by the model card: (task type, task name).
KIND_TASKS = {
    "retrieval": ("image-text-retrieval", "Zero-shot image-text retrieval"),
    "classification": ("zero-shot-image-classification", "Zero-shot image classification"),
    "localization": ("zero-shot-object-localization", "Zero-shot object localization (pointing game)"),
    "multimodal_retrieval": ("multimodal-retrieval", "Multimodal (image+text query) retrieval"),
}


@dataclass
class Suite:
    """Base class. Subclasses set `name`, `kind` (a key of `KIND_TASKS`), `dataset`, `description`
    and implement `run(ctx) -> dict[str, float | int]`. Keys starting with `chance_` are chance
    levels; keys starting with `n_` are counts; everything else is a measured metric."""

    name: str
    kind: str
    dataset: str
    description: str

    def run(self, ctx: EvalContext) -> dict[str, float | int]:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self) -> dict[str, str]:
        """The metadata written next to the numbers."""
        return {"kind": self.kind, "dataset": self.dataset, "description": self.description}


def is_metric(key: str) -> bool:
    """A measured metric, not a chance level or a count."""
    return not key.startswith(("chance_", "n_"))
