"""Shared test setup, and the CLI helpers every test folder uses: an in-process runner,
a subprocess runner, tiny image folders, the bad-input contract and one shared trained run.

The helpers are handed out as fixtures (not imported): a test folder's ``conftest.py``
is also a module named ``conftest``, so ``from conftest import ...`` would be ambiguous.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from cnnkit.cli.main import main

# Under pytest-xdist each worker gets one core: two workers x two threads would
# oversubscribe the 2-core CI machine and slow everything down.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# The shared run; test_resume_* trains the same configuration again and compares weights.
SHARED_ARGS = ["--model", "tinyvgg", "--data", "digits", "--epochs", "2", "--batch-size", "32",
               "--lr", "0.1", "--seed", "0", "--no-progress"]


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``cnnkit ARGV`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse: --help, --version and usage errors
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    return code, out.getvalue(), err.getvalue()


def run_subprocess(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m cnnkit ARGV`` in a fresh interpreter."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "cnnkit", *argv], capture_output=True,
                          text=True, timeout=timeout, env=env)


def error_line(code: int, err: str) -> str:
    """Check the bad-input contract (exit 2, no traceback, one error line last) and return it."""
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert errors[0].startswith("cnnkit"), err
    return errors[0]


def pattern(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """A noisy gray image; its bright pattern (bar across, bar down, square) is the class."""
    a = rng.integers(0, 50, (size, size)).astype(np.uint8)
    lo, hi = size // 4, size - size // 4
    if label == 0:
        a[lo:hi, :] = 230
    elif label == 1:
        a[:, lo:hi] = 230
    else:
        a[lo:hi, lo:hi] = 230
    return a


def write_folder(root: Path, classes: int = 3, per_class: int = 8, size: int = 12,
                 modes: tuple[str, ...] = ("L",)) -> Path:
    """``root/<class>/<i>.png`` with class-dependent patterns, cycling through Pillow ``modes``.

    Mode "RGB" images are tinted so the folder really holds colour; "RGBA" ones get a
    partly transparent alpha; "P" ones are palette images.
    """
    rng = np.random.default_rng(0)
    for k in range(classes):
        folder = root / f"class{k}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            gray = pattern(k, size, rng)
            mode = modes[i % len(modes)]
            if mode == "RGB":
                im = Image.fromarray(np.stack([gray, gray // 2, gray // 3], -1), "RGB")
            elif mode == "RGBA":
                alpha = np.full_like(gray, 200)
                im = Image.fromarray(np.stack([gray, gray, gray, alpha], -1), "RGBA")
            else:
                im = Image.fromarray(gray, "L").convert(mode)
            im.save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def cli():
    return run_cli


class Scale(nn.Module):
    """A user's own layer with parameters, unknown to the operator registry: every
    consumer of the registry must refuse it in one line naming it."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return x * self.w


@pytest.fixture(scope="session")
def unknown_layer() -> type[nn.Module]:
    """:class:`Scale`, a layer the operator registry does not know."""
    return Scale


@pytest.fixture
def cnnkit_subprocess():
    return run_subprocess


@pytest.fixture
def one_line_error():
    return error_line


@pytest.fixture
def image_folder():
    return write_folder


@pytest.fixture
def shared_args() -> list[str]:
    return list(SHARED_ARGS)


@pytest.fixture(scope="session")
def shared_run(tmp_path_factory) -> SimpleNamespace:
    """One finished run (tinyvgg on digits, 2 epochs) for the eval/predict/summary tests.

    Attributes: ``path`` (the run folder), ``out`` and ``err`` (what ``cnnkit train`` printed).
    """
    runs = tmp_path_factory.mktemp("shared")
    code, out, err = run_cli(["train", *SHARED_ARGS, "--name", "shared", "--runs-dir", str(runs)])
    assert code == 0, err
    return SimpleNamespace(path=runs / "shared", out=out, err=err)
