"""`oner-eval MODEL_DIR [--suite NAME ...]`: the OneR benchmark from the command line.

`oner-eval MODEL_DIR --dataset wds/NAME --dataset_root DIR --task zeroshot_classification --output FILE`:
the standard benchmarks in clip_benchmark's layouts and records (`oner.evaluation.standard`).

Exit status: 0 on success, 2 on bad input (not a model folder, empty data, unknown suite, class
names or templates), with a one-line message on stderr.
"""

from __future__ import annotations

import argparse
import os
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
    user.add_argument("--split", default=None, help="default: train (user data), test (--dataset)")

    cls = p.add_argument_group("user data: zero-shot classification of a labelled image folder")
    cls.add_argument("--classification-folder", default=None, metavar="DIR",
                     help="DIR/<class>/<images>; one sub-folder per class")
    cls.add_argument("--class-names", default=None,
                     help="comma-separated names in sorted sub-folder order, a text file (one per line) or "
                     "a .json file (a list, or {sub-folder: name}); default: the sub-folder names")
    cls.add_argument("--template", action="append", default=None, metavar="TEMPLATE",
                     help="prompt template with one '{}' (repeatable), or a text file with one per line; "
                     "default: 'a photo of a {}.'")
    _add_standard_arguments(p)
    return accept_aliases(p, ALIASES)


def _add_standard_arguments(p: argparse.ArgumentParser) -> None:
    """clip_benchmark's `eval` flags (its underscore spellings), for the standard benchmarks."""
    from .standard_data import SHORTCUTS, TASKS

    std = p.add_argument_group("standard benchmarks (clip_benchmark's layouts, tasks and JSON records)")
    std.add_argument("--dataset", nargs="+", default=None, metavar="NAME",
                     help=f"wds/NAME (clip_benchmark's webdataset layout), a shortcut ({', '.join(SHORTCUTS)}: "
                     "clip-benchmark/wds_<name> on the Hub, online only), any name with --dataset_root, or a .txt file "
                     "of names")
    std.add_argument("--dataset_root", default=None, metavar="ROOT",
                     help="a folder (ROOT/<split>/nshards.txt + .tar shards, class sub-folders, metadata.jsonl), "
                     "a brace range of .tar shards, a CSV/JSONL table, or a Hub data set owner/name[@revision]; "
                     "may hold {dataset} / {dataset_cleaned}")
    std.add_argument("--task", default="auto", choices=("auto",) + TASKS)
    std.add_argument("--recall_k", nargs="+", type=int, default=[1, 5, 10], metavar="K")
    std.add_argument("--output", default=None, metavar="FILE",
                     help="the JSON record; may hold {dataset} {model} {pretrained} {task} {language} "
                     "(default: OUTPUT_DIR/standard_results/{dataset}_{task}.json)")
    std.add_argument("--language", default="en", help="recorded; picks clip_benchmark's <language>_*.json data")
    std.add_argument("--custom_classname_file", default=None, metavar="FILE",
                     help="class names: one per line, a JSON list, or clip_benchmark's {dataset: [names]} JSON")
    std.add_argument("--custom_template_file", default=None, metavar="FILE",
                     help="templates with {c}: one per line, a JSON list, or clip_benchmark's {dataset: [...]} JSON")
    std.add_argument("--image_root", default=None, metavar="DIR",
                     help="folder the image paths of a table are relative to (default: the table's folder)")


def run_standard_from_args(args: argparse.Namespace) -> int:
    """`--dataset ...`: evaluate, write one record per set, print a table (main process)."""
    from accelerate import PartialState

    from .records import records_table
    from .standard import run_standard
    from .standard_data import read_names_file

    if args.suite or args.retrieval_data or args.classification_folder:
        from .context import BenchmarkError

        raise BenchmarkError("--dataset runs the standard benchmarks alone; run --suite / user data separately")
    class_names = read_names_file(args.custom_classname_file)
    if class_names is None and args.class_names:
        from .classification import read_lines_or_json

        class_names = read_lines_or_json(args.class_names)
    templates = read_names_file(args.custom_template_file)
    if templates is None:
        templates = _templates(args.template)
    written = run_standard(args.model_dir, args.dataset, args.dataset_root, task=args.task, split=args.split or "test",
                           recall_k=args.recall_k, output=args.output, output_dir=args.output_dir,
                           batch_size=args.batch_size, progress=not args.no_progress, max_items=args.max_items,
                           language=args.language, class_names=class_names, templates=templates,
                           image_root=args.image_root)
    if PartialState().is_main_process:
        print(records_table(written), end="")
        for record in written:
            print(f"wrote {record['_path']}")
    return 0


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
        suites.append(user_retrieval_suite(args.retrieval_data, args.image_column, args.text_column,
                                           args.split or "train"))
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
    if args.dataset:
        try:
            return run_standard_from_args(args)
        except (BenchmarkError, FileNotFoundError, ValueError) as e:
            if os.environ.get("RANK", "0") == "0":  # under accelerate launch every process stops; one says why
                print(f"oner-eval: error: {e}", file=sys.stderr)
            return 2
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
