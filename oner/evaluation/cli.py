"""`oner-eval MODEL_DIR [--suite NAME ...]`: the OneR benchmark from the command line.

Exit status: 0 on success, 2 on bad input (not a model folder, empty data, unknown suite, class
names or templates), with a one-line message on stderr.
"""

from __future__ import annotations

import argparse
import sys

from oner.flags import accept_aliases
from oner.progress import quiet_library_bars

#: Other tools' names for flags that mean the same here (transformers' example scripts).
ALIASES = {"--batch_size": ["--per_device_eval_batch_size"], "--max_items": ["--max_eval_samples"],
           "--text_column": ["--caption_column"]}


def build_parser() -> argparse.ArgumentParser:
    from . import DEFAULT_SUITES, embedded_suites

    names = sorted(embedded_suites())
    p = argparse.ArgumentParser(
        prog="oner-eval",
        description="Evaluate a OneR model folder: retrieval, zero-shot classification, localization, "
        "multimodal retrieval. Writes eval_results.json and eval_results.md.",
    )
    p.add_argument("model_dir", help="a saved OneR model folder (oner-init, train.py, save_pretrained)")
    p.add_argument("--suite", action="append", default=None, metavar="NAME",
                   help=f"suite to run (repeatable). Embedded: {', '.join(names)}. "
                   f"Default: {', '.join(DEFAULT_SUITES)} (or none when user data is given)")
    p.add_argument("--data-root", default=None, help="the embedded data set folder (built there if missing)")
    p.add_argument("--output-dir", default=None, help="where to write the results (default: MODEL_DIR)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-items", type=int, default=None, help="cap items per suite (fast checks)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    user = p.add_argument_group("user data: retrieval on any image-caption set")
    user.add_argument("--retrieval-data", default=None, metavar="SOURCE",
                      help="imagefolder with metadata.jsonl/csv, a CSV, webdataset .tar shards, a save_to_disk folder")
    user.add_argument("--image-column", default=None)
    user.add_argument("--text-column", default=None)
    user.add_argument("--split", default="train")

    cls = p.add_argument_group("user data: zero-shot classification of a labelled image folder")
    cls.add_argument("--classification-folder", default=None, metavar="DIR",
                     help="DIR/<class>/<images>; one sub-folder per class")
    cls.add_argument("--class-names", default=None,
                     help="comma-separated names in sorted sub-folder order, a text file (one per line) or "
                     "a .json file (a list, or {sub-folder: name}); default: the sub-folder names")
    cls.add_argument("--template", action="append", default=None, metavar="TEMPLATE",
                     help="prompt template with one '{}' (repeatable), or a text file with one per line; "
                     "default: 'a photo of a {}.'")
    return accept_aliases(p, ALIASES)


def _templates(values: list[str] | None) -> list[str] | None:
    """Repeated --template values; a value naming a file contributes its lines."""
    from pathlib import Path

    if values is None:
        return None
    out = []
    for v in values:
        path = Path(v).expanduser()
        if "{}" not in v and path.is_file():
            out.extend(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
        else:
            out.append(v)
    return out


def suites_from_args(args: argparse.Namespace) -> list | None:
    """The suite list for `run_benchmark`: named suites plus any user-data suites."""
    from . import folder_classification_suite, user_retrieval_suite
    from .classification import read_lines_or_json

    suites: list = list(args.suite or [])
    if args.retrieval_data:
        suites.append(user_retrieval_suite(args.retrieval_data, args.image_column, args.text_column, args.split))
    if args.classification_folder:
        suites.append(folder_classification_suite(args.classification_folder, read_lines_or_json(args.class_names),
                                                  _templates(args.template)))
    elif args.class_names or args.template:
        from .context import BenchmarkError

        raise BenchmarkError("--class_names and --template need --classification_folder")
    return suites or None


def main(argv: list[str] | None = None) -> int:
    from . import markdown_table, run_benchmark
    from .context import BenchmarkError
    from .report import JSON_NAME

    args = build_parser().parse_args(argv)
    quiet_library_bars()  # outside a terminal: plain lines only (oner.progress)
    try:
        results = run_benchmark(
            args.model_dir,
            suites=suites_from_args(args),
            data_root=args.data_root,
            output_dir=args.output_dir,
            batch_size=args.batch_size,
            progress=not args.no_progress,
            max_items=args.max_items,
        )
    except (BenchmarkError, FileNotFoundError) as e:
        print(f"oner-eval: error: {e}", file=sys.stderr)
        return 2
    print(markdown_table(results), end="")
    out = args.output_dir or args.model_dir
    print(f"wrote {out}/{JSON_NAME} and eval_results.md ({results['_meta']['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
