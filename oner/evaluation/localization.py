"""Zero-shot localization on composites: the pointing game, its text-guided variant, heatmaps.

Patches and texts live in one space, so `cos(patch_k, text)` over the patch grid is a
localization map with no extra module. The map "points" at its argmax patch; the query is a hit
when that patch's centre, mapped back to the composite's pixels, lies inside the named object's
box. Two chance levels: a uniformly random patch, and a random patch ON SOME OBJECT (the one to
beat; see `pointing_chances`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .base import Suite
from .context import EvalContext, open_image

# The heatmaps' colour map, the demo's too (space/oner_demo.py's `_RAMP` samples it): perceptually
# uniform and readable in grey and by colour-blind readers, unlike jet.
HEATMAP_COLORMAP = "viridis"
from .embedded_data import read_split


def patch_centres(grid: int, image_size: int, width: int, height: int) -> np.ndarray:
    """`(grid*grid, 2)` patch centres (x, y) in ORIGINAL image pixels, row-major like the model.

    Assumes the processor's CLIP pipeline: resize the shorter side to `image_size`, centre-crop
    `image_size x image_size`.
    """
    patch = image_size / grid
    scale = image_size / min(width, height)
    off_x = (width * scale - image_size) / 2
    off_y = (height * scale - image_size) / 2
    rows, cols = np.divmod(np.arange(grid * grid), grid)
    x = ((cols + 0.5) * patch + off_x) / scale
    y = ((rows + 0.5) * patch + off_y) / scale
    return np.stack([x, y], axis=1)


def description_of(obj: dict) -> str | None:
    """A text that describes an object WITHOUT being its name: the first alias whose words are
    neither the name's words reordered nor a superset of them ("tram car" -> "train"). None if
    the object has no such alias."""
    def words(s: str) -> set[str]:
        return set(re.findall(r"\w+", s.lower()))

    name_words = words(obj["name"])
    for alias in obj.get("captions", [])[1:]:
        w = words(alias)
        if w and w != name_words and not name_words <= w:
            return alias
    return None


def composite_queries(rows: list[dict], text_guided: bool) -> list[tuple[int, str, list[float]]]:
    """(composite index, query text, box) for every object; text-guided: its description."""
    out = []
    for i, row in enumerate(rows):
        for obj in row["objects"]:
            text = description_of(obj) if text_guided else obj["name"]
            if text:
                out.append((i, text, [float(v) for v in obj["box"]]))
    return out


def in_box(points: np.ndarray, box) -> np.ndarray:
    """`(n, 2)` points -> `(n,)` booleans inside the half-open box (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    return (points[:, 0] >= x0) & (points[:, 0] < x1) & (points[:, 1] >= y0) & (points[:, 1] < y1)


def pointing_chances(centres: np.ndarray, box, all_boxes: list) -> tuple[float, float]:
    """(uniform, object-aware) chance of hitting `box` with one patch.

    Uniform: a random patch. Object-aware: a random patch among those on ANY object, i.e. a model
    that finds objects against the white background but cannot tell which one the text names.
    Even a random network separates drawn pixels from blank ones, so the object-aware level is the
    one to beat.
    """
    target = in_box(centres, box)
    on_object = np.any([in_box(centres, b) for b in all_boxes], axis=0)
    aware = target[on_object].mean() if on_object.any() else target.mean()
    return float(target.mean()), float(aware)


def pointing_game(ctx: EvalContext, rows: list[dict], queries: list[tuple[int, str, list[float]]],
                  desc: str, n_heatmaps: int = 0) -> dict[str, float | int]:
    """Pointing accuracy (shipped `pointing_game` metric), its chance level and counts; writes
    `n_heatmaps` example heatmaps under `ctx.output_dir/heatmaps/` when an output folder is set."""
    from .metrics import load_metric

    from PIL import Image

    paths = [r["path"] for r in rows]
    patches = ctx.encode_patches(paths, desc="composite patches", cache_key=("composites", tuple(paths)))
    texts = ctx.encode_texts([q[1] for q in queries], desc=f"{desc} queries")
    sizes = {}
    points, boxes, chance = [], [], []
    maps = []
    for qi, (img, _, box) in enumerate(queries):
        if img not in sizes:
            with Image.open(paths[img]) as im:
                sizes[img] = im.size
        centres = patch_centres(ctx.grid_size, ctx.image_size, *sizes[img])
        sims = (patches[img] @ texts[qi]).numpy()  # (num_patches,) cosine similarities
        points.append(centres[int(sims.argmax())].tolist())
        boxes.append(box)
        chance.append(pointing_chances(centres, box, [o["box"] for o in rows[img]["objects"]]))
        if qi < n_heatmaps:
            maps.append(sims)
    out: dict[str, float | int] = dict(load_metric("pointing_game").compute(predictions=points, references=boxes))
    uniform, aware = np.mean(chance, axis=0).tolist()
    out["chance_pointing_accuracy"] = aware  # the level to beat: see pointing_chances
    out["chance_uniform_pointing_accuracy"] = uniform
    out["n_queries"] = len(queries)
    out["n_images"] = len({q[0] for q in queries})
    if maps and ctx.output_dir is not None:
        files = [save_heatmap(ctx, paths[queries[i][0]], queries[i][1], queries[i][2], maps[i], points[i],
                              Path(ctx.output_dir) / "heatmaps" / f"{desc}_{i:02d}.png")
                 for i in range(len(maps))]
        ctx.artifacts[desc] = [str(f) for f in files]
    return out


def save_heatmap(ctx: EvalContext, image_path: str, query: str, box: list[float], sims: np.ndarray,
                 point: list[float], out_path: Path) -> Path:
    """The composite, the softmax-over-patches map upsampled bicubically on top (as the paper's
    scripts), the object's box (green) and the pointed patch (red cross); saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    image = np.asarray(open_image(image_path))
    h, w = image.shape[:2]
    grid = ctx.grid_size
    prob = torch.softmax(torch.from_numpy(sims).float() * ctx.model.logit_scale.exp().item(), dim=0)
    heat = torch.nn.functional.interpolate(prob.reshape(1, 1, grid, grid), size=(h, w), mode="bicubic",
                                           align_corners=False)[0, 0].clamp(min=0).numpy()
    fig, ax = plt.subplots(figsize=(3, 3.3), dpi=100)
    ax.imshow(image)
    ax.imshow(heat, cmap=HEATMAP_COLORMAP, alpha=0.45)
    x0, y0, x1, y1 = box
    ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="lime", linewidth=2))
    ax.plot([point[0]], [point[1]], marker="x", color="red", markersize=10, markeredgewidth=2)
    ax.set_title(query[:40], fontsize=9)
    ax.axis("off")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, bbox_inches="tight")
    plt.close(fig)
    return out_path


@dataclass
class PointingGame(Suite):
    """Pointing game on the embedded composites; `text_guided` queries with descriptions."""

    text_guided: bool = False
    n_heatmaps: int = 4

    def run(self, ctx: EvalContext) -> dict[str, float | int]:
        rows = ctx.cap(read_split(ctx.data_root, "composites"))
        queries = composite_queries(rows, self.text_guided)
        if not queries:
            from .context import BenchmarkError

            raise BenchmarkError(f"{self.name}: the composites give no query (no object has a description)")
        return pointing_game(ctx, rows, queries, desc=self.name, n_heatmaps=self.n_heatmaps)
