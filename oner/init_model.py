"""`oner-init`: write a freshly initialised, complete OneR model folder from a preset."""

import argparse
import sys

from modeling_oner import ONER_PRESETS, OneRConfig

from .flags import accept_aliases
from .model_folder import init_model_folder

# Flags that override preset fields: (flag, config field, type).
OVERRIDES = [
    ("--image_size", "image_size", int),
    ("--patch_size", "patch_size", int),
    ("--hidden_size", "hidden_size", int),
    ("--num_hidden_layers", "num_hidden_layers", int),
    ("--num_attention_heads", "num_attention_heads", int),
    ("--intermediate_size", "intermediate_size", int),
    ("--projection_dim", "projection_dim", int),
    ("--max_position_embeddings", "max_position_embeddings", int),
    ("--projection_head", "projection_head", str),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="oner-init", description=__doc__)
    parser.add_argument("--preset", default="tiny", choices=sorted(ONER_PRESETS))
    parser.add_argument("--output_dir", required=True, help="folder to write (created if missing)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no_modality_embeddings", action="store_true", help="turn off the image/text type embedding"
    )
    for flag, field, kind in OVERRIDES:
        parser.add_argument(flag, dest=field, type=kind, default=None, help=f"override the preset's {field}")
    return accept_aliases(parser).parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = {field: getattr(args, field) for _, field, _ in OVERRIDES if getattr(args, field) is not None}
    if args.no_modality_embeddings:
        overrides["use_modality_embeddings"] = False
    try:
        config = OneRConfig.from_preset(args.preset, **overrides)
    except ValueError as error:
        print(f"oner-init: {error}", file=sys.stderr)
        return 2
    folder = init_model_folder(config, args.output_dir, seed=args.seed)
    print(f"wrote a freshly initialised OneR ({args.preset}) to {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
