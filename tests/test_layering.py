"""The layout is the architecture: every import inside cnnkit points one way, read from the
source, function-level imports included (a lazy import that dodges a cycle is a design bug).
A function-level import of cnnkit (or an ``importlib.import_module`` call) says why it is
lazy in a trailing ``# lazy: <reason>``, one of LAZY_REASONS; never ``cycle``.

    _files, _limits, _lazy, _download, plugins  <-  layers  <-  {models, data}  <-  tasks  <-  run
        <-  {training, explain, compress, analysis}  <-  workflows  <-  web  <-  cli

A package may import its own modules and any layer below it; the packages of one layer do
not import each other. The CLI, the front door, starts the web app (``cnnkit serve``).
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from pathlib import Path

import cnnkit

RANK = {"_files": 0, "_limits": 0, "_lazy": 0, "_download": 0, "plugins": 0, "layers": 1,
        "models": 2, "data": 2, "tasks": 3, "run": 4,
        "training": 5, "explain": 5, "compress": 5, "analysis": 5, "workflows": 6, "web": 7,
        "cli": 8}
PEERS_APART = {"models", "data", "training", "explain", "compress", "analysis"}
ROOT = Path(cnnkit.__file__).parent
# Why an import may wait for its function: `cnnkit --help` answers without PyTorch (cli
# start-up), an extra that may be missing (optional dependency), a package's names loaded on
# first use (PEP 562), what a measuring child process loads before it forks (subprocess).
LAZY_REASONS = ("cli start-up", "optional dependency", "PEP 562", "subprocess")
LAZY = re.compile(r"#\s*lazy:\s*([^(;#]*)")


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
    modules = {p.stem for p in ROOT.glob("*.py") if p.stem != "__init__" and p.stem != "__main__"}
    assert packages | modules == set(RANK)


def _function_level_imports(path: Path) -> list[tuple[int, int, bool]]:
    """``(first line, last line, of cnnkit)`` of every import statement inside a function
    of ``path``, and of every ``importlib.import_module`` call there (counted as cnnkit's)."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if in_function and isinstance(child, ast.Import):
                ours = any(a.name.split(".")[0] == "cnnkit" for a in child.names)
                found.append((child.lineno, child.end_lineno, ours))
            elif in_function and isinstance(child, ast.ImportFrom):
                ours = bool(child.level) or (child.module or "").split(".")[0] == "cnnkit"
                found.append((child.lineno, child.end_lineno, ours))
            elif in_function and isinstance(child, ast.Call) \
                    and (ast.unparse(child.func) in ("importlib.import_module", "import_module",
                                                     "__import__")):
                found.append((child.lineno, child.end_lineno, True))
            visit(child, inside)

    visit(ast.parse(path.read_text(), str(path)), False)
    return found


def test_every_lazy_import_says_why():
    """A function-level import of cnnkit carries `# lazy: <reason>` with a reason of
    LAZY_REASONS; no `# lazy:` comment gives `cycle` as its reason or sits on a
    module-level import, where it would be stale."""
    wrong, reasons = [], Counter()
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        lines = path.read_text().splitlines()
        marked = set()
        for first, last, ours in _function_level_imports(path):
            found = [m for line in lines[first - 1:last] if (m := LAZY.search(line))]
            marked.update(i for i in range(first, last + 1) if LAZY.search(lines[i - 1]))
            if not found:
                if ours:
                    wrong.append(f"{rel}:{first}: function-level import of cnnkit without "
                                 "`# lazy: <reason>`; hoist it to the top of the file")
                continue
            reason = found[0].group(1).strip().rstrip(",")
            if "cycle" in reason.lower():
                continue  # reported below, with every other `# lazy: cycle`
            if reason not in LAZY_REASONS:
                wrong.append(f"{rel}:{first}: lazy reason {reason!r} is not one of "
                             f"{', '.join(LAZY_REASONS)}")
            else:
                reasons[reason, "cnnkit" if ours else "other"] += 1
        for i, line in enumerate(lines, 1):
            if (m := LAZY.search(line)) and "cycle" in m.group(1).lower():
                wrong.append(f"{rel}:{i}: an import made lazy to dodge a cycle; move the code "
                             "to its layer instead")
            elif m and i not in marked:
                wrong.append(f"{rel}:{i}: `# lazy:` on an import that is not function-level")
    counts = ", ".join(f"{r}: {reasons[r, 'cnnkit']} of cnnkit + {reasons[r, 'other']} other"
                       for r in LAZY_REASONS)
    assert not wrong, f"lazy imports by reason ({counts}):\n" + "\n".join(wrong)
