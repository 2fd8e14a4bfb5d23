"""Build hook: the model card template and the Space travel inside the installed package.

`model_card.md` and `space/` live at the project root (the Space is uploaded from there, and the
template is edited there). A wheel copies them into `oner/_bundled/`, where `oner.bundled` finds
them after a non-editable install; a source checkout or an editable install reads the root's
copies. One copy in the repository, so nothing can drift. Everything else is in pyproject.toml.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
BUNDLED = ("model_card.md", "space")  # keep in step with oner/bundled.py and MANIFEST.in
SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", ".gradio", "flagged")


class BuildPyWithBundled(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads the project root itself
        target = Path(self.build_lib) / "oner" / "_bundled"
        for name in BUNDLED:
            source = ROOT / name
            if source.is_dir():
                shutil.copytree(source, target / name, ignore=SKIP, dirs_exist_ok=True)
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target / name)


setup(cmdclass={"build_py": BuildPyWithBundled})
