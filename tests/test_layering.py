"""The layout is the architecture: every import inside cnnkit points one way, read from the
source, function-level imports included (a lazy import that dodges a cycle is a design bug).

    _files, _limits  <-  layers  <-  {models, data}  <-  tasks  <-  run
        <-  {training, explain, compress, analysis}  <-  workflows  <-  web  <-  cli

A package may import its own modules and any layer below it; the packages of one layer do
not import each other. The CLI, the front door, starts the web app (``cnnkit serve``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import cnnkit

RANK = {"_files": 0, "_limits": 0, "layers": 1, "models": 2, "data": 2, "tasks": 3, "run": 4,
        "training": 5, "explain": 5, "compress": 5, "analysis": 5, "workflows": 6, "web": 7,
        "cli": 8}
PEERS_APART = {"models", "data", "training", "explain", "compress", "analysis"}
ROOT = Path(cnnkit.__file__).parent


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, cnnkit top-level part)`` of every import of cnnkit in ``path``, relative
    imports resolved against the module's package."""
    package = path.relative_to(ROOT).parts[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                names = [".".join(("cnnkit", *base, *([node.module] if node.module else [])))]
            else:
                names = [node.module or ""]
        for name in names:
            parts = name.split(".")
            if parts[0] == "cnnkit" and len(parts) > 1:
                found.append((node.lineno, parts[1]))
    return found


def test_every_import_points_down_the_layers():
    wrong = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        me = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        if me not in RANK:  # cnnkit/__init__.py and __main__.py: the lazy front door
            continue
        for line, it in _imports(path):
            if it == me or it not in RANK:
                continue
            if RANK[it] > RANK[me] or (RANK[it] == RANK[me] and me in PEERS_APART):
                wrong.append(f"{rel}:{line} ({me} -> {it})")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_every_package_has_a_rank():
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    modules = {p.stem for p in ROOT.glob("_*.py") if p.stem != "__init__" and p.stem != "__main__"}
    assert packages | modules == set(RANK)
