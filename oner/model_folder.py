"""Writing and completing OneR model folders: weights, config, processor and remote code
(`save_model_folder`), then its evaluation and model card (`complete_folder`), which `train.py` and
`oner-push` both call."""

import json
from pathlib import Path

import torch

from modeling_oner import OneRConfig, OneRModel
from processing_oner import OneRProcessor, build_processor

# Files every saved folder must hold to load with trust_remote_code=True where this package is absent.
REMOTE_CODE_FILES = ("configuration_oner.py", "modeling_oner.py", "processing_oner.py")
# What a training run wrote about itself; the model card reads it.
SUMMARY_FILE = "training_summary.json"


def save_model_folder(model: OneRModel, processor: OneRProcessor, output_dir: str | Path) -> Path:
    """Save model, processor and their code so the folder loads with the Auto classes anywhere."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    # transformers 4.57 reads the image processor from preprocessor_config.json and cannot load the
    # "TokenizersBackend" class name that 5.x writes; both cost nothing to provide.
    processor.image_processor.save_pretrained(output_dir)
    tokenizer_config = output_dir / "tokenizer_config.json"
    settings = json.loads(tokenizer_config.read_text())
    if settings.get("tokenizer_class") == "TokenizersBackend":
        settings["tokenizer_class"] = "PreTrainedTokenizerFast"
        tokenizer_config.write_text(json.dumps(settings, indent=2) + "\n")
    missing = [name for name in REMOTE_CODE_FILES if not (output_dir / name).is_file()]
    if missing:
        raise RuntimeError(f"save_pretrained did not ship {missing}: are the classes registered for auto classes?")
    return output_dir


def init_model_folder(config: OneRConfig, output_dir: str | Path, seed: int = 0) -> Path:
    """A freshly initialised model and its matching processor, saved as a complete folder."""
    torch.manual_seed(seed)
    model = OneRModel(config)
    return save_model_folder(model, build_processor(config), output_dir)


def complete_folder(output_dir: str | Path, training: dict | None = None, evaluate: bool = True,
                    max_items: int | None = None) -> dict:
    """Evaluate a model folder (`eval_results.json`/`.md`) and write its card (`README.md`).

    `training` defaults to the folder's `training_summary.json` (empty for a folder that never
    trained, e.g. from `oner-init`); without `evaluate` the card uses the folder's existing
    `eval_results.json`, if any. Returns the metrics.
    """
    from oner.evaluation import run_benchmark
    from oner.model_card import write_model_card

    output_dir = Path(output_dir)
    if training is None:
        summary = output_dir / SUMMARY_FILE
        training = json.loads(summary.read_text()) if summary.is_file() else {}
    metrics: dict = {}
    if evaluate:
        metrics = run_benchmark(output_dir, output_dir=output_dir, max_items=max_items)
        table = output_dir / "eval_results.md"
        if table.is_file():
            print(table.read_text())
    elif (output_dir / "eval_results.json").is_file():
        metrics = json.loads((output_dir / "eval_results.json").read_text())
    print(f"model card: {write_model_card(output_dir, metrics, training)}")
    return metrics
