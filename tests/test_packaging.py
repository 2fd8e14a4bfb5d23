"""A non-editable install: the wheel carries the model card template and the Space, and the installed
package trains, evaluates, writes the card and stages a push with them (nothing read from the checkout)."""

import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from conftest import TINY

REPO = Path(__file__).resolve().parents[1]
# What a build reads: the packages, the build files and the files they bundle.
SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "LICENSE", "model_card.md", "space", "oner",
           "modeling_oner", "processing_oner")
SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", ".gradio", "flagged")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The project built as a wheel (from a copy, so the checkout gets no build/ or egg-info) and
    installed with `pip install --target` (no dependencies: the test venv has them)."""
    tmp = tmp_path_factory.mktemp("packaging")
    source = tmp / "source"
    source.mkdir()
    for name in SOURCES:
        (shutil.copytree(REPO / name, source / name, ignore=SKIP) if (REPO / name).is_dir()
         else shutil.copy2(REPO / name, source / name))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(source)],
                   check=True, cwd=tmp, timeout=300)
    (wheel,) = (tmp / "dist").glob("oner-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(tmp / "site"), str(wheel)],
                   check=True, cwd=tmp, timeout=300)
    return wheel, tmp / "site"


def test_the_wheel_carries_the_card_template_and_the_space(installed):
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    space = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "space").rglob("*")
                   if p.is_file() and "__pycache__" not in p.parts)
    assert "oner/_bundled/model_card.md" in names
    assert {f"oner/_bundled/{p}" for p in space} <= names
    assert {"processing_oner/vocab.txt", "modeling_oner/modeling_oner.py"} <= names
    # One copy in the repository: the wheel's are the root's, byte for byte.
    with zipfile.ZipFile(wheel) as z:
        assert z.read("oner/_bundled/model_card.md") == (REPO / "model_card.md").read_bytes()
        assert z.read("oner/_bundled/space/app.py") == (REPO / "space" / "app.py").read_bytes()


SCRIPT = """
import json, sys
from pathlib import Path
import modeling_oner, oner, processing_oner
from oner import hub, model_card
from oner.training import main as train

site, out = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
for module in (oner, modeling_oner, processing_oner):
    assert Path(module.__file__).resolve().is_relative_to(site), module.__file__
assert hub.SPACE_DIR.is_relative_to(site) and model_card.template_path().is_relative_to(site)

assert train(["--train_data", sys.argv[3], "--output_dir", str(out), "--config_overrides", sys.argv[4],
              "--per_device_batch_size", "8", "--warmup_steps", "1", "--max_steps", "2", "--eval_max_items", "4",
              "--report_to", "none"]) == 0

class Commit:
    oid = "0123456789abcdef0123456789abcdef01234567"

class Api:
    staged = {}
    def create_repo(self, repo_id, **kw): return "https://huggingface.co/" + repo_id
    def upload_folder(self, *, folder_path, repo_type, **kw):
        folder = Path(folder_path)
        self.staged[repo_type] = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        return Commit()
    def upload_file(self, **kw): pass
    def add_space_variable(self, *a, **kw): pass
    def add_space_secret(self, *a, **kw): pass
    def model_info(self, repo_id, **kw): return type("Info", (), {"private": False})()

api = Api()
hub.push_folder(out, "someone/oner-tiny", space_id="someone/oner-demo", token="hf_test", api=api)
print(json.dumps(api.staged))
"""


def test_the_installed_package_trains_evaluates_and_stages_a_push(installed, pairs_dir, tmp_path):
    import json

    from oner.data import build_embedded_dataset

    _, site = installed
    data_home = build_embedded_dataset(root=tmp_path / "emb", limit=40, progress=False)
    overrides = ",".join(f"{k}={v}" for k, v in TINY.items())
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1", "ONER_DATA_HOME": str(data_home)}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(SCRIPT), str(site), str(tmp_path / "model"),
                             str(pairs_dir), overrides], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    staged = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"README.md", "eval_results.json", "model.safetensors", "modeling_oner.py"} <= set(staged["model"])
    assert {"app.py", "oner_demo.py", "README.md", "examples/openmoji_cat_face.png"} <= set(staged["space"])
    card = (tmp_path / "model" / "README.md").read_text()
    assert "A **OneR** model" in card  # rendered from the installed template
