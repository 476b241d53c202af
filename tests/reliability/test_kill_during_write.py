"""The reliability catalogue, SIGKILL while a run writes (issue 12, point 11): killed at any
of its writes (before a temporary is renamed into place, or right after), a run leaves no
half file, and ``--resume`` (or, before the first epoch, a re-run of its name) ends exactly
where an uninterrupted run ends: the same weights, bit for bit, and the same metrics.

The kill comes from inside: the child process wraps ``os.replace`` (every file of a run
is published by it, see :mod:`cnnkit._files`) and sends itself SIGKILL at the n-th write
of one file, so the point is exact and the test repeatable.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

ARGS = ["train", "--model", "lenet5", "--data", "digits", "--epochs", "3", "--batch-size", "128",
        "--lr", "0.05", "--seed", "0", "--no-progress"]
TIMING = {"samples_per_s", "epoch_time_s", "train_time_s"}

KILLER = r"""
import os, signal, sys
target, when, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
real, seen = os.replace, [0]

def replace(src, dst, *args, **kwargs):
    if os.path.basename(os.fspath(dst)) != target:
        return real(src, dst, *args, **kwargs)
    seen[0] += 1
    if seen[0] == nth and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst, *args, **kwargs)
    if seen[0] == nth and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)

os.replace = replace
from cnnkit.cli.main import main
sys.exit(main(sys.argv[4:]))
"""


def _cnnkit(*argv: str, kill: tuple[str, str, int] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", KILLER, *map(str, kill), *argv] if kill else \
        [sys.executable, "-m", "cnnkit", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run (with the same thread count as the killed ones)."""
    runs = tmp_path_factory.mktemp("reference")
    res = _cnnkit(*ARGS, "--name", "run", "--runs-dir", str(runs))
    assert res.returncode == 0, res.stderr
    return runs / "run"


def _metrics(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if k not in TIMING} for m in rows]


def _same_run(run, reference):
    for name in ("model.safetensors", "model_last.safetensors"):
        a, b = load_file(run / name), load_file(reference / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert _metrics(run) == _metrics(reference)
    ours, theirs = (json.loads((r / "summary.json").read_text()) for r in (run, reference))
    for key in ("test_accuracy", "test_loss", "best_epoch", "best_val_accuracy", "epochs_run"):
        assert ours[key] == theirs[key], key
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]


# (file, before/after its rename, which write): every file an epoch writes, in order, and the
# end of the run; "before" leaves a temporary and the old file, "after" the new file only.
KILLS = [("model.safetensors", "before", 1), ("model_last.safetensors", "after", 1),
         ("train_state.safetensors", "before", 1), ("train_state.safetensors", "after", 2),
         ("metrics.jsonl", "before", 2), ("model_last.safetensors", "before", 3),
         ("summary.json", "before", 1), ("report.html", "after", 1)]


@pytest.mark.parametrize("kill", KILLS, ids=[f"{f}-{w}-{n}" for f, w, n in KILLS])
def test_a_run_killed_while_writing_resumes_to_the_uninterrupted_result(tmp_path, reference,
                                                                        kill):
    killed = _cnnkit(*ARGS, "--name", "run", "--runs-dir", str(tmp_path), kill=kill)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run = tmp_path / "run"
    resumed = _cnnkit("train", "--resume", str(run), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    _same_run(run, reference)


def test_a_run_killed_while_writing_its_config_is_taken_over_by_a_rerun(tmp_path, reference):
    killed = _cnnkit(*ARGS, "--name", "run", "--runs-dir", str(tmp_path),
                     kill=("config.yaml", "before", 1))
    assert killed.returncode == -signal.SIGKILL
    run = tmp_path / "run"
    assert [p.name for p in run.iterdir() if not p.name.endswith(".tmp")] == [".lock"]
    rerun = _cnnkit(*ARGS, "--name", "run", "--runs-dir", str(tmp_path))
    assert rerun.returncode == 0, rerun.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # the same folder, no run-2
    _same_run(run, reference)
