"""Docs and docstrings work from any clone: they name only files in the repository, no machine's paths."""

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIPPED_DIRS = {".git", ".venv", ".venv-transformers-4.57", "outputs", "__pycache__", "node_modules", ".pytest_cache"}
TEXT_SUFFIXES = {".py", ".md", ".toml", ".sh", ".txt", ".cfg", ".yaml", ".yml"}
# Notes outside the repository (a workplace's shared folder), or one machine's checkout and venv.
OUTSIDE_REFERENCES = ("shared/" + "reference", "/work/", "/tmp/venv", "/home/", "/root/")
# Files whose outside reference is known and owned by an edit in flight elsewhere; each entry must
# still hold its reference (so a stale entry fails) and goes once that edit lands.


def repository_text_files():
    """Relative paths of the repository's text files (venvs, outputs and caches are not walked into)."""
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = sorted(d for d in subfolders if d not in SKIPPED_DIRS and not d.startswith(".venv"))
        for name in sorted(files):
            if Path(name).suffix in TEXT_SUFFIXES:
                yield (Path(folder) / name).relative_to(ROOT)


def test_nothing_points_outside_the_repository():
    offenders = []
    for relative in repository_text_files():
        if relative == Path(__file__).relative_to(ROOT):
            continue
        text = (ROOT / relative).read_text(encoding="utf-8", errors="replace")
        for line_number, line in enumerate(text.splitlines(), 1):
            for reference in OUTSIDE_REFERENCES:
                if reference in line:
                    offenders.append(f"{relative}:{line_number}: {reference}")
    assert not offenders, "references outside the repository:\n" + "\n".join(offenders)


def _anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


MARKDOWN = sorted(p.relative_to(ROOT) for p in [*ROOT.glob("*.md"), *ROOT.glob("docs/*.md"), *ROOT.glob("space/*.md")])


@pytest.mark.parametrize("markdown", MARKDOWN, ids=str)
def test_relative_links_reach_files_in_the_repository(markdown):
    source = ROOT / markdown
    for target in re.findall(r"\]\(([^)\s]+)\)", source.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):
            continue  # a URL
        file_part, _, anchor = target.partition("#")
        path = (source.parent / file_part).resolve() if file_part else source
        assert ROOT in path.parents and path.exists(), f"{markdown}: link {target} leaves the repository or is broken"
        if anchor and path.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", path.read_text(encoding="utf-8"), flags=re.MULTILINE)
            assert anchor in {_anchor(h) for h in headings}, f"{markdown}: no heading for #{anchor} in {file_part}"


def test_contributor_commands_are_the_readmes():
    command = "bash scripts/setup.sh --test && .venv/bin/python -m pytest -q"
    assert command in (ROOT / "README.md").read_text()
    assert command in (ROOT / "docs" / "api-brief.md").read_text()
    assert (ROOT / "scripts" / "setup.sh").is_file()


def test_readme_python_api_example_runs(tiny_model_dir, tmp_path, monkeypatch):
    """The README's Python API block, run as written on a tiny folder (transformers' API as installed)."""
    from PIL import Image

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "path/or/hub-id" in code and "apple.png" in code
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (40, 30), "red").save("apple.png")
    scope = {}
    exec(code.replace("path/or/hub-id", str(tiny_model_dir)), scope)
    config = scope["model"].config
    assert scope["probs"].shape == (2, 2)
    assert scope["joint"].shape == scope["texts"].shape == (2, config.projection_dim)
    assert scope["patches"].shape == (2, config.num_patches, config.projection_dim)


# What the docs must not say: how the project was made (who worked on it, in which sitting, for
# which ticket) instead of what it is. Name commits and dates instead.
PROVENANCE_WORDS = re.compile(r"\bsessions?\b|\bthe issue\b|\bissue \d+|\bthe lead\b|\b(?:other|another) helper"
                              r"|\bhelper's\b|\blent\b|\bno GPU was\b", re.IGNORECASE)
# Docs in the wide sense: what a user reads, runs or copies (recorded result data is not prose).
DOC_PLACES = ("README.md", "model_card.md", "docs", "configs", "benchmarks", "space")
RECORDED_DATA = {".json", ".jsonl"}
# A /tmp/ path may appear only as an example in a command line (something a reader runs), never as
# a default or a statement about one machine.
COMMAND_WORDS = ("python", "oner-", "train.py", "accelerate", "pytest", "ONER_", "gradio")


def doc_files():
    for relative in repository_text_files():
        if relative.parts[0] in DOC_PLACES and relative.suffix not in RECORDED_DATA:
            yield relative


def test_docs_speak_of_the_project_not_of_how_it_was_made():
    offenders = []
    for relative in doc_files():
        for number, line in enumerate((ROOT / relative).read_text(encoding="utf-8").splitlines(), 1):
            if PROVENANCE_WORDS.search(line):
                offenders.append(f"{relative}:{number}: {PROVENANCE_WORDS.search(line).group(0)!r}")
            if "/tmp/" in line and not any(word in line for word in COMMAND_WORDS):
                offenders.append(f"{relative}:{number}: /tmp/ outside an example command")
    assert not offenders, "\n".join(offenders)


def test_file_names_speak_of_the_project():
    names = []
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = [d for d in subfolders if d not in SKIPPED_DIRS and not d.startswith(".venv")]
        names += [(Path(folder) / name).relative_to(ROOT) for name in [*subfolders, *files]]
    offenders = [str(p) for p in names if re.search(r"session|issue|lead|helper", p.name, re.IGNORECASE)]
    assert not offenders, offenders
