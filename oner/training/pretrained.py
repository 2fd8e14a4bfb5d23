"""`--model_name_or_path`: start a run from a trained model instead of a freshly initialised one.

The source is a model folder saved by `train.py` (`oner.model_folder.save_model_folder`, or
`oner.baseline.save_clip_folder` for `--architecture clip`) or a Hub id with an optional
`--revision`. Model and processor are loaded with transformers' own `from_pretrained` of THIS
project's classes (`OneRModel` / `OneRProcessor`, or `CLIPModel` / `CLIPProcessor`), never with
`trust_remote_code`: the training loop needs the project's `OneRModel` (its feature methods, the
pretrainer's hooks), and a training job should not run Python downloaded with the weights. The
folder written at the end ships the project's current code, as every run's folder does.

What is refused, each with one message (`SourceError`, which `train()` reports as a UserError: exit
status 1, before anything is written):

- a path that does not exist, a file, a folder without `config.json` (a training checkpoint gets a
  hint to use `--resume_from_checkpoint`), a model that is neither OneR nor the CLIP baseline, a
  OneR model with `--architecture clip` or the reverse, weights that do not cover the model;
- a Hub id that is not valid, that does not exist, that lacks the revision, or that cannot be
  downloaded (offline mode and not in the local cache; no network);
- `--revision` with a local folder (a folder has no revisions);
- a preset given explicitly (command line or `--config` file) whose fields, as `--config_overrides`
  amend them, differ from the loaded model's, and `--config_overrides` of any field whose value
  differs from the loaded model's, except `ADJUSTABLE_FIELDS` (applied to the loaded model). A
  preset left at its default never conflicts. The rule is deliberately simple: the loaded
  model keeps its architecture, and initialisation fields (`initializer_range`,
  `logit_scale_init_value`, ...) would have no effect on loaded weights, so changing them is refused
  rather than silently ignored. Overrides that restate the model's own values are accepted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from oner.data.pairs import looks_like_local_path

#: `--config_overrides` fields that may differ from the loaded model's: they change training, not
#: the weights' meaning (OneR only; a CLIP baseline takes none).
ADJUSTABLE_FIELDS = ("attention_dropout",)


class SourceError(ValueError):
    """`--model_name_or_path` / `--revision` / preset / overrides cannot give a model to train."""


@dataclass
class Source:
    """Where the starting model comes from, and its `config.json`."""

    name: str  # as given on the command line
    revision: str | None
    local: bool
    config: dict

    @property
    def label(self) -> str:
        """`owner/name@revision`, `owner/name` or the folder, for messages, the summary and the card."""
        return f"{self.name}@{self.revision}" if self.revision else self.name

    @property
    def load_from(self) -> str:
        """What `from_pretrained` gets: the folder (with `~` expanded) or the Hub id."""
        return str(Path(self.name).expanduser()) if self.local else self.name

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")


def resolve_source(name: str, revision: str | None = None) -> Source:
    """Find `name` (a local folder, else a Hub id) and read its `config.json`; `SourceError` if that fails."""
    path = Path(name).expanduser()
    if path.exists():
        if revision:
            raise SourceError(f"--revision {revision}: {name} is a local folder, which has no revisions "
                              "(--revision pins a Hub repository)")
        if not path.is_dir():
            raise SourceError(f"--model_name_or_path {name} is a file, not a model folder")
        config_file = path / "config.json"
        if not config_file.is_file():
            hint = ("; it looks like a training checkpoint: continue that run with --resume_from_checkpoint"
                    if (path / "train_state.json").is_file() else "")
            raise SourceError(f"--model_name_or_path {name} is not a model folder: it has no config.json "
                              f"(expected a folder saved by train.py, oner-init or save_pretrained){hint}")
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise SourceError(f"--model_name_or_path {name}: config.json cannot be read ({e})") from None
        return Source(name, None, True, config if isinstance(config, dict) else {})
    if looks_like_local_path(name):
        raise SourceError(f"--model_name_or_path {name} does not exist")
    return Source(name, revision, False, _hub_config(name, revision))


def _hub_config(repo_id: str, revision: str | None) -> dict:
    """`config.json` of a Hub model (from the local cache when offline), or a SourceError saying why not."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f" at revision {revision}" if revision else ""
    try:
        file = hf_hub_download(repo_id, "config.json", revision=revision)
    except HFValidationError:
        raise SourceError(f"--model_name_or_path {repo_id} is neither an existing local folder nor a valid Hub "
                          "model id (owner/name)") from None
    except LocalEntryNotFoundError as e:
        if constants.HF_HUB_OFFLINE:
            raise SourceError(
                f"--model_name_or_path {repo_id} is not an existing local folder, and as a Hub id it cannot be "
                f"downloaded: offline mode is on (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE) and {repo_id}{at} is not "
                "in the local Hugging Face cache; download it while online or give a local folder"
            ) from None
        raise SourceError(f"--model_name_or_path {repo_id}: cannot reach the Hub to download it, and it is not in "
                          f"the local cache ({e})") from None
    except RevisionNotFoundError:
        raise SourceError(f"--revision {revision}: the Hub repository {repo_id} has no such branch, tag or commit") from None
    except RepositoryNotFoundError:
        raise SourceError(f"--model_name_or_path {repo_id} is not an existing local folder, and there is no Hub model "
                          f"{repo_id} (or it is private or gated: log in with `hf auth login`)") from None
    except EntryNotFoundError:
        raise SourceError(f"--model_name_or_path {repo_id}{at} has no config.json: not a transformers model") from None
    except OSError as e:  # other HTTP errors (HfHubHTTPError is an OSError), disk errors
        raise SourceError(f"--model_name_or_path {repo_id}{at}: cannot download its config.json ({e})") from None
    try:
        config = json.loads(Path(file).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SourceError(f"--model_name_or_path {repo_id}{at}: config.json cannot be read ({e})") from None
    return config if isinstance(config, dict) else {}


def source_config(source: Source, architecture: str):
    """The loaded model's `OneRConfig` (for a CLIP baseline: the OneR config it was sized from)."""
    from modeling_oner import OneRConfig

    expected = "clip" if architecture == "clip" else "oner"
    if source.model_type != expected:
        if source.model_type in ("oner", "clip"):
            other = "oner" if source.model_type == "oner" else "clip"
            raise SourceError(f"--model_name_or_path {source.label} holds a {source.model_type} model; "
                              f"train it with --architecture {other}")
        raise SourceError(f"--model_name_or_path {source.label} holds a {source.model_type or 'unknown'!s} model "
                          "(config.json's model_type), not a OneR model or the CLIP baseline of --architecture clip")
    try:
        if expected == "oner":
            return OneRConfig.from_dict(dict(source.config))
        from transformers import CLIPConfig

        from oner.baseline import oner_config_of_clip

        return oner_config_of_clip(CLIPConfig.from_dict(dict(source.config)))
    except (TypeError, ValueError, KeyError) as e:
        raise SourceError(f"--model_name_or_path {source.label}: its config.json is not usable ({e})") from None


def check_agreement(loaded, preset: str | None, overrides: dict, architecture: str, label: str) -> dict:
    """Refuse a preset or overrides that contradict the loaded config; return the overrides to apply.

    Args:
        loaded: the source's `OneRConfig` (`source_config`).
        preset: the preset the user GAVE (command line or config file), or None when it is only the
            default: a default never conflicts.
        overrides: parsed `--config_overrides`.
    """
    from modeling_oner import ONER_PRESETS

    from oner.baseline import CLIP_FIELDS

    relevant = set(CLIP_FIELDS) if architecture == "clip" else set(loaded.to_dict())
    problems = []
    if preset is not None:
        # The preset as the overrides amend it, as when the model was made: its other fields must agree.
        differ = [f"{k} {getattr(loaded, k)!r} (preset {v!r})" for k, v in ONER_PRESETS[preset].items()
                  if k in relevant and k not in overrides and not _same(getattr(loaded, k), v)]
        if differ:
            problems.append(f"--preset {preset} (given on the command line or in the --config file) describes "
                            f"another model: {', '.join(differ)}; leave --preset out to train the model as it is")
    apply = {}
    for key, value in overrides.items():
        if key in ADJUSTABLE_FIELDS and architecture != "clip":
            apply[key] = value
        elif key not in relevant:
            problems.append(f"--config_overrides {key}={value}: a CLIP baseline has no such field")
        elif not _same(getattr(loaded, key, None), value):
            problems.append(f"--config_overrides {key}={value}: the model has {key}={getattr(loaded, key, None)!r}, "
                            f"and a loaded model keeps its architecture (only {', '.join(ADJUSTABLE_FIELDS)} "
                            "may change)")
    if problems:
        raise SourceError(f"cannot continue from {label}: " + "; ".join(problems))
    return apply


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return float(a) == float(b)
    return a == b


def preset_name(config, architecture: str) -> str:
    """The preset the loaded model has the sizes of, else `"custom"` (the summary's `preset`)."""
    from modeling_oner import ONER_PRESETS

    from oner.baseline import CLIP_FIELDS

    for name, fields in ONER_PRESETS.items():
        if all(_same(getattr(config, k), v) for k, v in fields.items() if architecture != "clip" or k in CLIP_FIELDS):
            return name
    return "custom"


def load_pretrained(source: Source, architecture: str, attn_implementation: str | None, apply: dict):
    """`(model, processor)` from `source`, in fp32 for training (a CLIP baseline behind
    `oner.baseline.CLIPAsOneR`); `SourceError` when they do not load."""
    import torch

    where = {"revision": source.revision} if source.revision else {}
    kwargs = dict(where, dtype=torch.float32, output_loading_info=True, **apply)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if architecture == "clip":
        from transformers import CLIPModel as model_class
        from transformers import CLIPProcessor as processor_class
    else:
        from modeling_oner import OneRModel as model_class
        from processing_oner import OneRProcessor as processor_class
    try:
        model, info = model_class.from_pretrained(source.load_from, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise SourceError(f"--model_name_or_path {source.label}: cannot load the model ({e})") from None
    missing = sorted(info.get("missing_keys") or [])
    mismatched = [m[0] if isinstance(m, tuple) else m for m in info.get("mismatched_keys") or []]  # (name, shapes)
    if missing or mismatched:
        raise SourceError(f"--model_name_or_path {source.label}: its weights do not cover the model (missing "
                          f"{missing[:5]}, wrong shape {mismatched[:5]}); it would train from partly random weights")
    try:
        processor = processor_class.from_pretrained(source.load_from, **where)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SourceError(f"--model_name_or_path {source.label}: cannot load its processor ({e})") from None
    if architecture != "clip" and processor.image_size != model.config.image_size:
        raise SourceError(f"--model_name_or_path {source.label}: its processor makes {processor.image_size} px "
                          f"images but the model takes {model.config.image_size} px")
    if architecture == "clip":
        from oner.baseline import CLIPAsOneR

        model = CLIPAsOneR(model)  # training reads the baseline through OneR's interface, as `build_clip` gives it
    return model, processor
