"""Writing and reading complete OneR model folders (weights, config, processor, remote code)."""

import json
from pathlib import Path

import torch

from modeling_oner import OneRConfig, OneRModel
from processing_oner import OneRProcessor, build_processor

# Files every saved folder must hold to load with trust_remote_code=True where this package is absent.
REMOTE_CODE_FILES = ("configuration_oner.py", "modeling_oner.py", "processing_oner.py")


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
