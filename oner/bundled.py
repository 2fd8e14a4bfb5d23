"""Project files that the package reads at run time: the model card template and the Space.

They live at the project root (`model_card.md`, `space/`). A wheel carries them inside the package
as `oner/_bundled/` (setup.py's build step copies them there), so a non-editable `pip install .`
can render a card and stage a Space; a source checkout or an editable install reads the root.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

BUNDLED_DIR = "_bundled"  # beside this module, not named like it
NAMES = ("model_card.md", "space")


def project_path(name: str) -> Path:
    """The file or folder `name` (one of `NAMES`): the installed package's copy where there is one,
    else the source checkout's. Callers check that it exists (it is absent from a package built
    without setup.py's build step) and say so in their own words."""
    if name not in NAMES:
        raise ValueError(f"{name!r} is not one of the bundled project files {NAMES}")
    installed = resources.files("oner") / BUNDLED_DIR / name
    if installed.is_file() or installed.is_dir():
        return Path(str(installed))  # a wheel installs onto the file system (never zipped)
    return Path(__file__).resolve().parent.parent / name
