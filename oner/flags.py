"""One flag spelling across the command-line tools (`train.py`, `oner-eval`, `oner-init`, `oner-push`).

Every long flag is spelt with underscores, as transformers' example scripts spell theirs
(`--output_dir`), and is accepted with hyphens too, as open_clip and accelerate spell theirs
(`--output-dir`). `accept_aliases` also adds other tools' names for a flag that means the same
(`--per_device_train_batch_size` for `--per_device_batch_size`). `--help` lists each flag with its
aliases, underscore spellings only, and says once that hyphens work.
"""

from __future__ import annotations

import argparse

HYPHENS_NOTE = "Every flag is also accepted with hyphens for underscores (--output-dir = --output_dir)."


def _underscored(option: str) -> str:
    return "--" + option[2:].replace("-", "_")


def _hyphenated(option: str) -> str:
    return "--" + option[2:].replace("_", "-")


class _UnderscoreHelp(argparse.HelpFormatter):
    """Shows a flag's underscore spellings only (its hyphen twins would double every line of --help),
    with the value's name once: `--lr, --learning_rate LEARNING_RATE`."""

    def _format_action_invocation(self, action):
        if not action.option_strings:
            return super()._format_action_invocation(action)
        shown = ", ".join(s for s in action.option_strings if not s.startswith("--") or s == _underscored(s))
        if action.nargs == 0:
            return shown
        return f"{shown} {self._format_args(action, self._get_default_metavar_for_optional(action))}"


def accept_aliases(parser: argparse.ArgumentParser, aliases: dict[str, list[str]] | None = None,
                   ) -> argparse.ArgumentParser:
    """Give every long flag of `parser` its underscore spelling first and its hyphen spelling too, and
    add `aliases` ({canonical flag: [other tools' names]}) to the flags they name.

    Call it once, after the last `add_argument`. The dest (the namespace attribute) stays what the
    canonical flag made it. A clash (two flags claiming one spelling, an alias of an unknown flag)
    raises ValueError: it is a programming error, caught by the tests.
    """
    aliases = aliases or {}
    by_option = parser._option_string_actions  # shared by the parser and its argument groups
    unknown = [flag for flag in aliases if flag not in by_option and _hyphenated(flag) not in by_option]
    if unknown:
        raise ValueError(f"aliases of unknown flags {unknown}")
    for action in list(parser._actions):
        longs = [s for s in action.option_strings if s.startswith("--")]
        if not longs or longs == ["--help"]:
            continue
        names = [s for s in action.option_strings if not s.startswith("--")]
        spellings = []
        for option in longs + [a for flag in longs for a in aliases.get(_underscored(flag), [])]:
            for spelling in (_underscored(option), _hyphenated(option)):
                if spelling not in spellings:
                    spellings.append(spelling)
        for spelling in spellings:
            owner = by_option.get(spelling)
            if owner is not None and owner is not action:
                raise ValueError(f"{spelling} would name two flags ({owner.dest}, {action.dest})")
            by_option[spelling] = action
        action.option_strings = spellings + names
    if not issubclass(parser.formatter_class, _UnderscoreHelp):
        parser.formatter_class = type("UnderscoreHelp", (_UnderscoreHelp, parser.formatter_class), {})
    parser.epilog = f"{parser.epilog}\n\n{HYPHENS_NOTE}" if parser.epilog else HYPHENS_NOTE
    return parser


def dests_by_name(parser: argparse.ArgumentParser) -> dict[str, str]:
    """{flag name without `--`, underscored: dest} for every spelling and alias: config-file keys."""
    return {option[2:].replace("-", "_"): action.dest for action in parser._actions
            for option in action.option_strings if option.startswith("--")}
