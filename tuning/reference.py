"""`python -m tuning.reference > docs/flags.md`: every flag of the tuning commands, written from their parsers.

The parsers are where a flag lives (a search flag: its `SearchOptions` field); this page is made from
them, and tests/test_docs.py fails while it differs from what this prints.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("tuning.grid", "tuning.search", "tuning.final", "tuning.promote", "tuning.predict", "tuning.serve")


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _flag(action: argparse.Action) -> str:
    """``--epochs N``, ``--scheduler {asha,none}``, ``--resume``; a positional as its name."""
    if not action.option_strings:
        return f"`{action.metavar or action.dest}`"
    names = ", ".join(f"`{o}`" for o in action.option_strings)
    if action.nargs == 0:
        return names
    if action.choices:
        return f"{names} {{{','.join(map(str, action.choices))}}}"
    return f"{names} {action.metavar or {int: 'N', float: 'X'}.get(action.type, 'VALUE')}"


def markdown() -> str:
    """The page: per command, its flags by group, with their help (defaults included)."""
    out = ["# Flags of the tuning commands", "",
           "Generated from the commands' parsers by `python -m tuning.reference > docs/flags.md` (tests/test_docs.py "
           "checks it is current). What they do, with examples: [commands.md](commands.md).", ""]
    for name in COMMANDS:
        parser = importlib.import_module(name).build_parser()
        formatter = parser._get_formatter()
        out += [f"## `python -m {name}`", ""]
        for group in parser._action_groups:
            actions = [a for a in group._group_actions if a.help != argparse.SUPPRESS and "--help" not in a.option_strings]
            if not actions:
                continue
            out += [f"**{group.title}**", "", "| flag | meaning |", "|---|---|"]
            out += [f"| {_flag(a)} | {_cell(formatter._expand_help(a) if a.help else '')} |" for a in actions]
            out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(markdown())
