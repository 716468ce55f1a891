"""The documentation stays true to the code: README.md stays short, docs/commands.md names exactly the
flags each command's parser defines, every relative link (and its #anchor) resolves, and this
workspace's data path is named once, in docs/data.md (a user's clone has no ../shared)."""

from __future__ import annotations

import argparse
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
COMMANDS_MD = DOCS / "commands.md"

# `--flag` as written in prose, tables and examples: not the `---` of a table rule, not `a--b`.
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*")
HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$")
LINK = re.compile(r"\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
SHARED_TITLE = "Flags the tuning commands share"
TUNING = ("tuning.grid", "tuning.search", "tuning.final")
# Each command whose flags docs/commands.md lists; its section is the `## `python -m <module>`...` one.
COMMANDS = ("fer_model.train", "fer_model.data", *TUNING, "tuning.promote", "tuning.predict", "cluster.local")


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def prose_lines(text: str) -> list[str]:
    """The lines outside code: fenced blocks and indented (4+ spaces) blocks are dropped."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            continue
        if not fenced and not line.startswith(("    ", "\t")):
            out.append(line)
    return out


def headings(text: str) -> list[tuple[int, str]]:
    return [(len(m.group(1)), m.group(2)) for line in prose_lines(text) if (m := HEADING.match(line))]


def slug(title: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation (backticks, dots, colons...) dropped, spaces to -."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a page's headings; a repeated heading gets -1, -2... as on GitHub."""
    out: set[str] = set()
    seen: dict[str, int] = {}
    for _, title in headings(path.read_text(encoding="utf-8")):
        base = slug(title)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def section(text: str, match) -> str:
    """The text under the first level-2 heading for which `match(title)` holds, down to the next heading
    of level 2 or above (its subsections included)."""
    lines = text.splitlines()
    start = None
    fenced = False
    for i, line in enumerate(lines):
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        m = None if fenced or line.startswith(("    ", "\t")) else HEADING.match(line)
        if start is None:
            if m and len(m.group(1)) == 2 and match(m.group(2)):
                start = i
        elif m and len(m.group(1)) <= 2:
            return "\n".join(lines[start:i])
    assert start is not None, f"{COMMANDS_MD.name} has no section for it"
    return "\n".join(lines[start:])


def command_section(module: str) -> str:
    return section(COMMANDS_MD.read_text(encoding="utf-8"), lambda title: f"`python -m {module}`" in title)


def shared_section() -> str:
    return section(COMMANDS_MD.read_text(encoding="utf-8"), lambda title: title.startswith(SHARED_TITLE))


def named_flags(text: str) -> set[str]:
    return set(FLAG.findall(text)) - {"--help"}


class _Parser(Exception):
    """Carries the parser a command's `main` built, caught at `parse_args`."""


def parser_of(module: str, monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    mod = importlib.import_module(module)
    if hasattr(mod, "build_parser"):
        return mod.build_parser()

    def caught(self, *args, **kwargs):  # fer_model.data builds its parser inside main()
        raise _Parser(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", caught)
    with pytest.raises(_Parser) as got:
        mod.main([])
    return got.value.args[0]


def parser_flags(parser: argparse.ArgumentParser) -> set[str]:
    """Every long option of the parser and of its subcommands, but --help."""
    flags: set[str] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags |= parser_flags(sub)
        flags.update(o for o in action.option_strings if o.startswith("--"))
    return flags - {"--help"}


def test_readme_has_at_most_200_lines():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= 200, f"README.md has {n} lines; move detail into docs/"


def test_the_flag_reference_is_what_the_parsers_say():
    """docs/flags.md lists every flag of the tuning commands: it is made from their parsers, so a new flag
    (for the search: a new `SearchOptions` field) reaches it by running the generator, never by hand."""
    from tuning.reference import markdown

    assert (DOCS / "flags.md").read_text(encoding="utf-8") == markdown(), \
        "docs/flags.md is out of date: python -m tuning.reference > docs/flags.md"


@pytest.mark.parametrize("module", [m for m in COMMANDS if not m.startswith("tuning.")])
def test_every_flag_of_a_parser_is_in_its_commands_section(module, monkeypatch):
    """The commands whose flags docs/flags.md does not list (the tuning commands': there) are listed here."""
    documented = named_flags(command_section(module))
    missing = parser_flags(parser_of(module, monkeypatch)) - documented
    assert not missing, f"python -m {module} defines {sorted(missing)}, which docs/commands.md does not list"


@pytest.mark.parametrize("module", COMMANDS)
def test_every_flag_a_commands_section_names_exists(module, monkeypatch):
    unknown = named_flags(command_section(module)) - parser_flags(parser_of(module, monkeypatch))
    assert not unknown, f"docs/commands.md names {sorted(unknown)} for python -m {module}, which has no such flag"


def test_the_shared_flags_are_flags_of_the_grid_and_the_search(monkeypatch):
    """The shared section says tuning.grid and tuning.search take all of its flags (tuning.final a subset)."""
    shared = named_flags(shared_section())
    assert shared, "the shared-flags section names no flag"
    flags = {m: parser_flags(parser_of(m, monkeypatch)) for m in TUNING}
    for module in ("tuning.grid", "tuning.search"):
        assert not shared - flags[module], f"python -m {module} lacks {sorted(shared - flags[module])}"
    assert not shared - set().union(*flags.values())


def test_the_quick_preset_is_documented_as_it_is():
    from tuning.grid import QUICK

    as_flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items())
    assert as_flags in command_section("tuning.grid"), f"docs/commands.md should give --quick as `{as_flags}`"
    readme = README.read_text(encoding="utf-8")
    assert f"of {QUICK['epochs']} epochs on {QUICK['max_samples']:,} images" in readme


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files_that_exist(path):
    broken = []
    for line in prose_lines(path.read_text(encoding="utf-8")):
        for target in LINK.findall(re.sub(r"`[^`]*`", "``", line)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto: ...
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            if not dest.exists():
                broken.append(f"{target} (no file {dest})")
            elif ROOT not in dest.parents and dest != ROOT:
                broken.append(f"{target} (outside the repository)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{target} (no heading with anchor #{anchor} in {dest.name})")
    assert not broken, f"{path.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_workspace_data_path_is_named_once_in_docs_data():
    hits = [(p.relative_to(ROOT).as_posix(), i + 1) for p in markdown_files()
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines()) for _ in range(line.count("../shared"))]
    assert [p for p, _ in hits] == ["docs/data.md"], f"`../shared` should appear once, in docs/data.md: {hits}"


def test_the_readmes_test_command_is_the_one_ci_runs():
    """CI (.ci/run) runs the README's test command; the README's ends in exactly `python -m pytest`."""
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip() and not line.startswith("#")]
    ci_steps = [s.strip() for s in ci[-1].split("&&")]
    readme = [line.strip() for line in README.read_text(encoding="utf-8").splitlines()
              if line.startswith("    ") and "python -m pytest" in line]
    assert readme, "README.md gives no indented test command"
    steps = [s.strip() for s in readme[0].split("&&")]
    assert steps[-1] == "python -m pytest"
    it = iter(ci_steps)
    assert all(step in it for step in steps), f"README's {steps} are not among .ci/run's {ci_steps}, in order"
