"""Shared command-line plumbing: one-line errors with exit code 2, flags made from dataclasses."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from typing import Any, Callable, Sequence

from fer_model.errors import UserError

USAGE_ERROR = 2


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (no usage dump) and exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, skip: Sequence[str] = (),
                        help_for: dict[str, str] | None = None) -> None:
    """A ``--field-name`` flag per field of `cls`, defaulting to None so presets can fill the rest."""
    help_for = help_for or {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        extra = f"{help_for.get(f.name, '')} (default {default})".strip()
        if isinstance(default, bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=extra)
        else:
            kind = type(default) if default is not None else str
            parser.add_argument(flag, dest=f.name, type=kind, default=None, help=extra)


def given(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    """The flags among `names` the user actually gave."""
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run an entry point: user errors become one line and exit 2; Ctrl-C exits 130."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(main(argv) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt as exc:
        print(str(exc) or "interrupted", file=sys.stderr)
        return 130
