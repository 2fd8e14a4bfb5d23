#!/usr/bin/env python
"""How much can a composite's pixels add to the name in a joint query? A ceiling, from a trained model.

The multimodal suite's query is a composite (a 128 px canvas of 2-4 emoji) plus one object's name;
the answer is that object's own Twemoji image. A joint query can only beat the name alone if the
object's pixels, as the model sees them inside the composite, say something the name does not. This
script measures that with the model's own embeddings, no training:

- joint / name-only: the suite's two queries (`get_multimodal_features`, `get_text_features`);
- patches where the name points: the composite's patch embeddings pooled by a softmax of their
  similarity to the name (the text-guided pointing map), alone and added to the name;
- the object's own crop (its box in the composite) as an image query, alone and added to the name
  (late fusion, weights 0.5 and 1): the best any use of the object's pixels could do;
- the same crop at the resolution it has when the composite is seen at S px (shrunk by S/128, then
  enlarged back): what a model with S px input could at best get from the composite.

    python benchmarks/joint_ceiling.py --model outputs/oner-tiny-embedded
    python benchmarks/joint_ceiling.py --model DIR --sizes 32 64 --max-items 200

Writes `joint_ceiling.json` and `.md` into `--out` (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, machine, write_json  # noqa: E402

sys.path.insert(0, str(ROOT))
from oner.evaluation.context import EvalContext, l2_normalize, rank, recall_metrics  # noqa: E402
from oner.evaluation.embedded_data import ensure_embedded, read_split  # noqa: E402

COMPOSITE_SIZE = 128  # the embedded composites' canvas (oner.data.embedded)


def at_resolution(crop: Image.Image, seen_at: int) -> Image.Image:
    """`crop` with only the pixels it keeps when its 128 px composite is resized to `seen_at` px."""
    scale = seen_at / COMPOSITE_SIZE
    small = crop.resize((max(1, round(crop.width * scale)), max(1, round(crop.height * scale))), Image.BICUBIC)
    return small.resize(crop.size, Image.BICUBIC)


def pointed_patches(patches: torch.Tensor, texts: torch.Tensor, temperature: float) -> torch.Tensor:
    """`(n, p, d)` normalised patch embeddings, `(n, d)` texts -> `(n, d)`: the patches weighted by a
    softmax over their similarity to the text (the text-guided pointing map), normalised."""
    weights = torch.softmax(torch.einsum("npd,nd->np", patches, texts) / temperature, dim=1)
    return l2_normalize(torch.einsum("np,npd->nd", weights, patches))


def measure(model_dir: Path, sizes: list[int], max_items: int | None, data_root: Path | None) -> dict:
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(model_dir, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    root = ensure_embedded(data_root, progress=False)
    ctx = EvalContext(model, processor, progress=False, max_items=max_items, data_root=root)
    gallery = read_split(root, "twemoji")
    by_name: dict[str, list[int]] = {}
    for i, row in enumerate(gallery):
        by_name.setdefault(row["name"], []).append(i)
    composites, names, crops, relevant = [], [], [], []
    for row in ctx.cap(read_split(root, "composites")):  # the suite's queries, in its order
        canvas = Image.open(row["path"]).convert("RGB")
        for obj in row["objects"]:
            if obj["name"] in by_name:
                composites.append(row["path"])
                names.append(obj["name"])
                crops.append(canvas.crop(tuple(obj["box"])))
                relevant.append(by_name[obj["name"]])
    keys = ctx.encode_images([r["path"] for r in gallery])

    def r_at_1(queries: torch.Tensor) -> float:
        return recall_metrics(rank(l2_normalize(queries), keys, 10), relevant, len(keys), prefix="")["R@1"]

    name = ctx.encode_texts(names)
    pointed = pointed_patches(ctx.encode_patches(composites), name, temperature=0.1)
    rows = {
        "joint query (the suite)": r_at_1(ctx.encode_multimodal(composites, names)),
        "name only": r_at_1(name),
        "patches where the name points": r_at_1(pointed),
        "name + 0.25 x patches where it points": r_at_1(name + 0.25 * pointed),
    }
    for label, images in [("the object's crop", crops)] + [(f"the crop as seen in a {s} px composite",
                                                              [at_resolution(c, s) for c in crops]) for s in sizes]:
        crop = ctx.encode_images(images)
        rows[f"{label}, alone"] = r_at_1(crop)
        rows[f"name + 0.5 x {label}"] = r_at_1(name + 0.5 * crop)
        rows[f"name + {label}"] = r_at_1(name + crop)
    return {"model": str(model_dir), "image_size": int(model.config.image_size), "n_queries": len(names),
            "n_gallery": len(keys), "R@1": rows, "machine": machine()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="a trained model folder")
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 48, 64, 96],
                   help="composite resolutions (px) to simulate for the crop")
    p.add_argument("--max-items", type=int, default=None, help="at most this many composites")
    p.add_argument("--data-home", type=Path, default=None, help="the embedded data's folder (default: its cache)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    data = measure(args.model, args.sizes, args.max_items, args.data_home)
    lines = [f"`python benchmarks/joint_ceiling.py --model {args.model}`: {data['n_queries']} composite+name queries, "
             f"{data['n_gallery']} gallery images, a model of {data['image_size']} px input. R@1 in %.", "",
             "| query | R@1 |", "|---|---:|"]
    lines += [f"| {label} | {100 * value:.1f} |" for label, value in data["R@1"].items()]
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "joint_ceiling.json", data)
    (args.out / "joint_ceiling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
