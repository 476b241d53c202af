"""Every ``>>>`` example in a ``src/cnnkit`` docstring runs, with the standard library doctest.

One case per module. Each docstring runs in a namespace of its own, not the module's
globals, so an example that uses a name it does not import fails here as it would in a
reader's session. An optional dependency that is missing skips its module, naming the
dependency; any other import error fails the case.
"""

from __future__ import annotations

import contextlib
import doctest
import importlib
import importlib.util
import pkgutil
import sys
from pathlib import Path

import pytest
import torch

import cnnkit

# ``python -m cnnkit`` runs the CLI when imported: it has no docstring examples to run.
NOT_IMPORTED = {"cnnkit.__main__"}

# Modules whose examples still lean on the module's own globals (the function under
# test, ``torch``) instead of importing them; they are being edited elsewhere. Their
# examples run in a copy of the module's globals, so a wrong output still fails.
# Remove a module from this set once its examples import what they use.
MODULE_GLOBALS = {"cnnkit.data.shapes", "cnnkit.training.estimate"}

# Optional packages that examples call, beyond those their module imports.
EXAMPLES_NEED = {"cnnkit.workflows.onnx_predict": ("onnx", "onnxscript", "onnxruntime")}

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _has_examples(name: str) -> bool:
    """Whether the module's source holds a ``>>>``, read without importing it."""
    spec = importlib.util.find_spec(name)
    return ">>>" in Path(spec.origin).read_text(encoding="utf-8")


def _module_names() -> list[str]:
    names = ["cnnkit"]
    # onerror: a package that fails to import is reported by its own case below.
    for info in pkgutil.walk_packages(cnnkit.__path__, "cnnkit.", onerror=lambda name: None):
        if info.name not in NOT_IMPORTED:
            names.append(info.name)
    return sorted(n for n in names if _has_examples(n))


MODULES = _module_names()


def _import(name: str):
    """The module, or a skip naming the optional dependency it needs and lacks."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        missing = (e.name or "").split(".")[0]
        if not missing or missing == "cnnkit":
            raise
        pytest.skip(f"{name} needs {missing!r}, which is not installed")


@contextlib.contextmanager
def _registries_restored():
    """Undo what examples register (``@register_model`` ...): every module-level registry
    (a ``_NAME`` dict of a cnnkit module) gets its entries back, in place."""
    saved = [(d, dict(d)) for m in list(sys.modules.values())
             if getattr(m, "__name__", "").startswith("cnnkit")
             for k, d in list(vars(m).items())
             if isinstance(d, dict) and k.startswith("_") and k[1:2].isupper() and k.isupper()]
    try:
        yield
    finally:
        for d, entries in saved:
            d.clear()
            d.update(entries)


def test_modules_are_collected():
    assert {"cnnkit", "cnnkit.models._registry", "cnnkit.explain.cam"} <= set(MODULES)
    assert len(MODULES) > 90


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, tmp_path, monkeypatch):
    module = _import(name)
    for package in EXAMPLES_NEED.get(name, ()):
        pytest.importorskip(package, reason=f"the examples of {name} need {package!r}")
    globs = None if name in MODULE_GLOBALS else {}
    tests = [t for t in doctest.DocTestFinder(exclude_empty=True).find(module, name, globs=globs)
             if t.examples]
    assert tests, f"{name} has a '>>>' outside any docstring that doctest finds"
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        runner = doctest.DocTestRunner(optionflags=FLAGS)
        report: list[str] = []
        with _registries_restored():
            for test in tests:
                runner.run(test, out=report.append)
    finally:
        torch.set_num_threads(threads)
    assert runner.failures == 0, (f"{runner.failures} of {runner.tries} examples failed in "
                                  f"{name}:\n" + "".join(report))


def test_a_wrong_output_fails():
    """The runner used above reports a wrong expected output as a failure."""
    src = '''
    >>> 1 + 1
    3
    '''
    test = doctest.DocTestParser().get_doctest(src, {}, "wrong", "wrong.py", 0)
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    runner.run(test, out=lambda s: None)
    assert (runner.failures, runner.tries) == (1, 1)


def _uses_a_global_it_does_not_import():
    """
    >>> bool(FLAGS)
    True
    """


@pytest.mark.parametrize("globs,failures", [({}, 1), (globals(), 0)], ids=["own", "module"])
def test_an_example_that_does_not_import_what_it_uses_fails(globs, failures):
    """Run as above (a namespace of its own), an example leaning on its module's globals
    fails; in the module's globals it would pass."""
    [test] = doctest.DocTestFinder().find(_uses_a_global_it_does_not_import, globs=globs)
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    report: list[str] = []
    runner.run(test, out=report.append)
    assert runner.failures == failures
    assert ("NameError: name 'FLAGS' is not defined" in "".join(report)) == bool(failures)
