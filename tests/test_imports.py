"""The package layers hold: `lint-imports` keeps pyproject's contracts, and no module imports itself round."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tuning", "fer_model", "cluster")


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()"],
                          cwd=cwd, env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                          timeout=120)


def test_the_import_contracts_are_kept():
    proc = _lint(ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_an_upward_import_breaks_the_layers(tmp_path):
    """The contracts can fail: names importing the pipeline (an arrow from the bottom layer to the top) is caught."""
    for name in (*PACKAGES, "pyproject.toml"):
        src = ROOT / name
        (shutil.copytree(src, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__")) if src.is_dir()
         else shutil.copy(src, tmp_path / name))
    with open(tmp_path / "tuning" / "names.py", "a") as f:
        f.write("\nimport tuning.pipeline  # noqa\n")
    proc = _lint(tmp_path)
    assert proc.returncode == 1 and "BROKEN" in proc.stdout.upper(), proc.stdout[-3000:]
    assert "tuning.names -> tuning.pipeline" in proc.stdout


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in list(edges):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_cycle():
    """Imports inside functions count too (grimp reads every import statement)."""
    graph = grimp.build_graph(*PACKAGES)
    edges = {m: {d for d in graph.find_modules_directly_imported_by(m) if d.split(".")[0] in PACKAGES and d != m}
             for m in graph.modules if m.split(".")[0] in PACKAGES}
    assert sum(map(len, edges.values())) > 150  # the graph was read (213 arrows when this was written)
    assert _cycles(edges) == []


def test_the_cycle_finder_finds_one():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
