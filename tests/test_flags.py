"""One flag spelling across the command-line tools, with other tools' names as aliases (oner.flags)."""

import argparse

import pytest

from oner.flags import accept_aliases
from oner.training.args import ALIASES, build_parser, parse_args

# A value each aliased train.py flag accepts (by dest).
VALUES = {
    "per_device_batch_size": "8", "accum_freq": "2", "checkpoints_total_limit": "3", "checkpointing_steps": "7",
    "text_column": "caption", "image_column": "img", "train_data": "some/folder", "hub_private": "true",
    "learning_rate": "0.002", "num_train_epochs": "3", "warmup_steps": "5", "weight_decay": "0.05",
    "adam_beta1": "0.8", "adam_beta2": "0.9", "adam_epsilon": "1e-8", "max_grad_norm": "0.5",
    "gradient_checkpointing": "true", "dataloader_num_workers": "2", "resume_from_checkpoint": "latest",
}


def _dest(flag: str) -> str:
    return flag[2:]


def test_every_alias_has_a_test_value():
    assert {_dest(flag) for flag in ALIASES} == set(VALUES)


@pytest.mark.parametrize("canonical,alias", [(c, a) for c, names in ALIASES.items() for a in names])
def test_train_alias_parses_as_its_flag(canonical, alias):
    value = VALUES[_dest(canonical)]
    expected = vars(parse_args([canonical, value]))
    assert vars(parse_args([alias, value])) == expected
    assert vars(parse_args(["--" + alias[2:].replace("_", "-"), value])) == expected  # open_clip's spelling
    assert expected[_dest(canonical)] != vars(parse_args([]))[_dest(canonical)]  # the value did arrive


def test_transformers_names_from_the_issue_parse():
    args = parse_args(["--per_device_train_batch_size", "16", "--gradient_accumulation_steps", "4",
                       "--save_total_limit", "5", "--caption_column", "text", "--hub_private_repo"])
    assert (args.per_device_batch_size, args.accum_freq, args.checkpoints_total_limit, args.text_column,
            args.hub_private) == (16, 4, 5, "text", True)
    assert {"per_device_batch_size", "accum_freq", "checkpoints_total_limit", "text_column",
            "hub_private"} <= set(args.explicit_flags)


def test_open_clip_names_parse():
    args = parse_args(["--batch-size", "32", "--lr", "5e-4", "--epochs", "2", "--warmup", "10", "--wd", "0.2",
                       "--accum-freq", "2", "--train-data", "x/{0..3}.tar", "--grad-checkpointing", "--workers", "1"])
    assert (args.per_device_batch_size, args.learning_rate, args.num_train_epochs, args.warmup_steps,
            args.weight_decay, args.accum_freq, args.train_data, args.gradient_checkpointing,
            args.dataloader_num_workers) == (32, 5e-4, 2.0, 10, 0.2, 2, "x/{0..3}.tar", True, 1)


def test_config_file_takes_aliases_and_hyphens(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("per_device_train_batch_size: 12\nsave-total-limit: 4\nlearning_rate: 0.01\n")
    args = parse_args(["--config", str(config)])
    assert (args.per_device_batch_size, args.checkpoints_total_limit, args.learning_rate) == (12, 4, 0.01)
    assert {"per_device_batch_size", "checkpoints_total_limit"} <= set(args.explicit_flags)
    config.write_text("per_device_eval_batch_size: 12\n")
    with pytest.raises(SystemExit) as e:
        parse_args(["--config", str(config)])
    assert e.value.code == 2


def test_train_help_lists_aliases_in_underscores_and_says_hyphens_work():
    text = build_parser().format_help()
    for canonical, names in ALIASES.items():
        assert all(f"{name}" in text for name in [canonical, *names]), canonical
    assert "--per_device_batch_size, --per_device_train_batch_size, --batch_size" in text
    assert "--output-dir" not in text.split("Every flag")[0]  # hyphen twins are not listed one by one
    assert "also accepted with hyphens" in text


def test_eval_flags_both_spellings_and_aliases():
    from oner.evaluation.cli import build_parser as eval_parser

    p = eval_parser()
    underscored = vars(p.parse_args(["m", "--output_dir", "o", "--max_items", "3", "--no_progress",
                                     "--batch_size", "4", "--data_root", "d"]))
    hyphenated = vars(p.parse_args(["m", "--output-dir", "o", "--max-items", "3", "--no-progress",
                                    "--batch-size", "4", "--data-root", "d"]))
    assert underscored == hyphenated
    assert (underscored["output_dir"], underscored["max_items"], underscored["no_progress"]) == ("o", 3, True)
    aliased = vars(p.parse_args(["m", "--output_dir", "o", "--max_eval_samples", "3", "--no_progress",
                                 "--per_device_eval_batch_size", "4", "--data_root", "d"]))
    assert aliased == underscored
    assert p.parse_args(["m", "--caption_column", "c"]).text_column == "c"


def test_init_flags_both_spellings():
    from oner.init_model import parse_args as init_args

    a = init_args(["--output_dir", "x", "--hidden_size", "32", "--no_modality_embeddings"])
    b = init_args(["--output-dir", "x", "--hidden-size", "32", "--no-modality-embeddings"])
    assert vars(a) == vars(b) and (a.output_dir, a.hidden_size, a.no_modality_embeddings) == ("x", 32, True)


def test_push_flags_both_spellings_and_alias():
    from oner.hub import build_parser as push_parser

    p = push_parser()
    expected = vars(p.parse_args(["m", "o/n", "--private", "--space", "o/s"]))
    assert vars(p.parse_args(["m", "o/n", "--hub_private_repo", "--space", "o/s"])) == expected
    assert vars(p.parse_args(["m", "o/n", "--hub-private-repo", "--space", "o/s"])) == expected
    assert expected["private"] is True and expected["space_id"] == "o/s"


def test_aliases_that_clash_or_name_no_flag_are_refused():
    p = argparse.ArgumentParser()
    p.add_argument("--output_dir")
    p.add_argument("--out")
    with pytest.raises(ValueError, match="would name two flags"):
        accept_aliases(p, {"--output_dir": ["--out"]})
    with pytest.raises(ValueError, match="unknown flags"):
        accept_aliases(argparse.ArgumentParser(), {"--nothing": ["--x"]})


def test_docs_list_every_alias():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    for names in ALIASES.values():
        for name in names:
            assert f"`{name}`" in text or f"`--{name[2:].replace('_', '-')}`" in text, name
