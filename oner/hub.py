"""Publishing to the Hugging Face Hub: `oner-push MODEL_DIR REPO_ID [--private] [--space SPACE_ID]`.

`push_folder` checks everything it can offline FIRST (a token, valid repo ids, a complete model
folder), stages exactly the files to upload in a temporary folder, then calls `create_repo` +
`upload_folder`. The README's usage snippet is then pinned to the commit that holds the weights and
code. With `space_id`, the project's `space/` folder goes up as a Gradio Space whose card's
`models:` names the model repo; the Space's variables `ONER_MODEL` and `ONER_MODEL_REVISION` pin it
to the commit just pushed, and when the model repo is private the token becomes the Space's
`HF_TOKEN` secret so the Space can read it. The token is never printed.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

from oner.bundled import project_path

#: Files of a model folder that are NOT published: training state, logs, caches.
IGNORE_PATTERNS = ("checkpoint*", "checkpoints/**", "runs/**", "logs/**", "*.pt", "*.bin.tmp", "optimizer*",
                   "scheduler*", "rng_state*", "__pycache__/**", "*.pyc", ".git*", ".cache/**", "*.lock")
REQUIRED_FILES = ("config.json", "configuration_oner.py", "modeling_oner.py", "processing_oner.py",
                  "processor_config.json", "tokenizer.json")
SPACE_DIR = project_path("space")  # the project's space/, inside the package once installed
_REVISION_LINE = re.compile(r'^(revision = )"[^"]*"', re.MULTILINE)
_REVISION_ARG = re.compile(r'(pipeline\([^)]*revision=)"[^"]*"', re.DOTALL)


class PushError(ValueError):
    """Something that must be fixed before anything is uploaded."""


def resolve_token(token: str | None = None) -> str:
    """`token`, else `HF_TOKEN`, else the saved login (`huggingface_hub.get_token` reads both)."""
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise PushError("no Hugging Face token: set HF_TOKEN, run `hf auth login`, or pass token=...")
    return token


def check_repo_id(repo_id: str, what: str = "repo id") -> str:
    """A syntactically valid `owner/name` (or `name`) Hub id, else `PushError` saying why."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(repo_id, str) or not repo_id.strip():
        raise PushError(f"empty {what}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise PushError(f"invalid {what} {repo_id!r}: {e}") from None
    return repo_id


def check_model_folder(model_dir: str | Path) -> Path:
    """A complete OneR folder: config, remote code, processor, weights. `PushError` lists what is missing."""
    path = Path(model_dir)
    if not path.is_dir():
        raise PushError(f"{model_dir} is not a folder")
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    if not any(path.glob("*.safetensors")):
        missing.append("*.safetensors (the weights)")
    if missing:
        raise PushError(f"{model_dir} is not a complete OneR model folder; missing: {missing}")
    return path


def stage_model_folder(model_dir: str | Path, dest: str | Path) -> list[str]:
    """Copy exactly what would be uploaded from `model_dir` into `dest`; return the relative paths."""
    from huggingface_hub.utils import filter_repo_objects

    src, dest = Path(model_dir), Path(dest)
    files = sorted(str(p.relative_to(src)) for p in src.rglob("*") if p.is_file())
    kept = list(filter_repo_objects(files, ignore_patterns=list(IGNORE_PATTERNS)))
    for rel in kept:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / rel, dest / rel)
    return kept


def stage_space_folder(space_dir: str | Path, dest: str | Path, model_repo_id: str) -> list[str]:
    """Copy the Space app into `dest` with its card's `models:` set to `[model_repo_id]`."""
    from huggingface_hub import SpaceCard, SpaceCardData

    src, dest = Path(space_dir), Path(dest)
    if not (src / "app.py").is_file():
        raise PushError(f"{src} is not a Space folder (no app.py)")
    shutil.copytree(src, dest, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".gradio", "flagged"))
    readme = dest / "README.md"
    if readme.is_file():
        card = SpaceCard.load(readme)
        card.data.models = [model_repo_id]
    else:
        card = SpaceCard.from_template(SpaceCardData(sdk="gradio", app_file="app.py", models=[model_repo_id]))
    card.save(str(readme))
    return sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())


def pin_revision(readme: str, revision: str) -> str:
    """The card with its usage snippets' `revision` set to `revision` (a commit hash)."""
    readme = _REVISION_LINE.sub(rf'\1"{revision}"', readme)
    return _REVISION_ARG.sub(rf'\1"{revision}"', readme)


def push_folder(
    model_dir: str | Path,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    space_id: str | None = None,
    api=None,
) -> str:
    """Upload a model folder (weights, code, processor, card) to `repo_id`; optionally the demo Space.

    Every check (token, repo ids, folder completeness) runs before the first request. `api` is an
    `HfApi`-like object (tests pass a double). Returns the model repo's URL.
    """
    from huggingface_hub import HfApi

    check_repo_id(repo_id)
    if space_id is not None:
        check_repo_id(space_id, "Space id")
    model_dir = check_model_folder(model_dir)
    token = resolve_token(token)
    api = api if api is not None else HfApi()

    with tempfile.TemporaryDirectory(prefix="oner-push-") as tmp:
        staged = Path(tmp) / "model"
        stage_model_folder(model_dir, staged)
        space_staged = None
        if space_id is not None:
            space_staged = Path(tmp) / "space"
            stage_space_folder(SPACE_DIR, space_staged, repo_id)

        url = api.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
        commit = api.upload_folder(folder_path=str(staged), repo_id=repo_id, repo_type="model", token=token,
                                   commit_message="Upload OneR model (weights, remote code, processor, card)")
        revision = getattr(commit, "oid", None)
        _pin_card(api, staged, repo_id, token, revision)
        if space_staged is not None:
            if not revision:
                raise RuntimeError(f"the Hub returned no commit id for {repo_id}: cannot pin the Space to it")
            api.create_repo(space_id, token=token, private=private, repo_type="space", space_sdk="gradio",
                            exist_ok=True)
            configure_space(api, space_id, repo_id, revision, token)
            api.upload_folder(folder_path=str(space_staged), repo_id=space_id, repo_type="space", token=token,
                              commit_message=f"OneR demo serving {repo_id}@{revision[:12]}")
    return str(url)


def configure_space(api, space_id: str, repo_id: str, revision: str, token: str) -> None:
    """Point the Space at `repo_id` at commit `revision`; give it read access if the model is private.

    Sets the Space variables `ONER_MODEL` and `ONER_MODEL_REVISION` (read by `space/oner_demo.py`)
    and, when the model repo is private (as the Hub reports it, whatever `--private` said), the
    Space secret `HF_TOKEN`, which `from_pretrained` inside the Space picks up. Done before the Space's
    files go up, so its first build already has them.
    """
    api.add_space_variable(space_id, "ONER_MODEL", repo_id, description="the model this Space serves",
                           token=token)
    api.add_space_variable(space_id, "ONER_MODEL_REVISION", revision,
                           description=f"the commit of {repo_id} this Space serves (set by oner-push)", token=token)
    if api.model_info(repo_id, token=token).private:
        api.add_space_secret(space_id, "HF_TOKEN", token,
                             description=f"read access to the private model {repo_id} (set by oner-push)",
                             token=token)


def _pin_card(api, staged: Path, repo_id: str, token: str, oid: str | None) -> None:
    """Second commit: the README's usage pinned to the commit that holds the weights and code."""
    readme = staged / "README.md"
    if not oid or not readme.is_file():
        return
    pinned = pin_revision(readme.read_text(encoding="utf-8"), oid)
    if pinned == readme.read_text(encoding="utf-8"):
        return
    readme.write_text(pinned, encoding="utf-8")
    api.upload_file(path_or_fileobj=str(readme), path_in_repo="README.md", repo_id=repo_id, repo_type="model",
                    token=token, commit_message=f"Model card: pin usage to revision {oid[:12]}")


def publish(output_dir: str | Path, repo_id: str, private: bool = False, space_id: str | None = None) -> str:
    """Upload the folder (and, with `space_id`, the demo Space serving it); prints and returns the URL."""
    url = push_folder(output_dir, repo_id, private=private, space_id=space_id)
    print(f"pushed {output_dir} to {url}")
    if space_id:
        print(f"Space: https://huggingface.co/spaces/{space_id}")
    return url


def build_parser() -> argparse.ArgumentParser:
    from oner.flags import accept_aliases

    parser = argparse.ArgumentParser(prog="oner-push", description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", help="a saved OneR model folder (with its README.md card)")
    parser.add_argument("repo_id", help="the model repository, e.g. your-name/oner-tiny")
    parser.add_argument("--private", action="store_true", help="create private repositories")
    parser.add_argument("--space", dest="space_id", default=None, metavar="SPACE_ID",
                        help="also publish the space/ demo as a Gradio Space serving the model")
    return accept_aliases(parser, {"--private": ["--hub_private_repo"]})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from oner.model_folder import complete_folder

    try:
        check_repo_id(args.repo_id)
        if args.space_id is not None:
            check_repo_id(args.space_id, "Space id")
        model_dir = check_model_folder(args.model_dir)
        if not (model_dir / "README.md").is_file():
            # A folder whose run did not finish (or from oner-init): the card train.py would have
            # written, from its training_summary.json and eval_results.json where they exist.
            complete_folder(model_dir, evaluate=False)
        publish(model_dir, args.repo_id, private=args.private, space_id=args.space_id)
    except PushError as e:
        print(f"oner-push: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
