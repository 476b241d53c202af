"""The reliability catalogue, files that a command did not create (issue 12, points 1 and 2):
no command writes over them, inside a run folder or anywhere, unless the user said so with
``--force``, and a run's own files not even then. Output folders are claimed atomically:
a command's default folder is new each time (``explanations``, ``explanations-2`` ...)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image


@pytest.fixture
def run(tmp_path, shared_run):
    return shutil.copytree(shared_run.path, tmp_path / "run")


@pytest.fixture
def digit(tmp_path):
    path = tmp_path / "digit.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8), dtype=np.uint8)).save(path)
    return path


def _bytes(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("name", ["model.safetensors", "config.yaml", "train_state.safetensors"])
def test_export_never_writes_over_a_run_file(cli, one_line_error, run, name):
    """Issue 12: `cnnkit export RUN --out RUN/model.safetensors` replaced the best weights
    with an ONNX file and exited 0."""
    before = _bytes(run)
    for force in ([], ["--force"]):
        line = one_line_error(*cli(["export", str(run), "--out", str(run / name), *force])[::2])
        assert f"{run / name} is a file of the run" in line and "--force or not" in line
    assert _bytes(run) == before


def test_export_keeps_an_existing_file_unless_forced(cli, one_line_error, run, tmp_path):
    mine = tmp_path / "mine.pt"
    mine.write_bytes(b"the user's")
    line = one_line_error(*cli(["export", str(run), "--format", "torchscript", "--out",
                                str(mine)])[::2])
    assert f"{mine} exists" in line and "--force" in line
    assert mine.read_bytes() == b"the user's"
    code, _, err = cli(["export", str(run), "--format", "torchscript", "--out", str(mine),
                        "--force"])
    assert code == 0, err
    assert mine.read_bytes() != b"the user's" and sorted(tmp_path.iterdir()) == [mine, run]


def test_export_to_the_default_file_twice(cli, one_line_error, run):
    assert cli(["export", str(run), "--format", "torchscript"])[0] == 0
    first = (run / "model.pt").read_bytes()
    line = one_line_error(*cli(["export", str(run), "--format", "torchscript"])[::2])
    assert "model.pt exists" in line
    assert (run / "model.pt").read_bytes() == first


def test_export_refuses_a_name_of_another_format(cli, one_line_error, run, tmp_path):
    line = one_line_error(*cli(["export", str(run), "--out", str(tmp_path / "m.pt")])[::2])
    assert "does not end in .onnx" in line and not (tmp_path / "m.pt").exists()


def test_explain_writes_a_new_default_folder_each_time(cli, run, digit):
    for _ in range(2):
        code, _, err = cli(["explain", str(run), str(digit), "--method", "saliency"])
        assert code == 0, err
    first, second = run / "explanations", run / "explanations-2"
    assert (first / "digit_saliency.npy").is_file() and (second / "digit_saliency.npy").is_file()


def test_explain_into_an_existing_folder_needs_force(cli, one_line_error, run, digit, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "digit_saliency.png").write_bytes(b"the user's")
    line = one_line_error(*cli(["explain", str(run), str(digit), "--method", "saliency",
                                "--out", str(out)])[::2])
    assert f"{out} exists" in line and "--force" in line
    assert (out / "digit_saliency.png").read_bytes() == b"the user's"
    code, _, err = cli(["explain", str(run), str(digit), "--method", "saliency", "--out",
                        str(out), "--force"])
    assert code == 0, err
    assert (out / "digit_saliency.png").read_bytes()[:4] == b"\x89PNG"


def test_explain_refuses_two_images_that_would_share_outputs(cli, one_line_error, run, digit,
                                                            tmp_path):
    other = tmp_path / "b" / "digit.png"
    other.parent.mkdir()
    shutil.copy(digit, other)
    line = one_line_error(*cli(["explain", str(run), str(digit), str(other), "--method",
                                "saliency", "--out", str(tmp_path / "ex")])[::2])
    assert "both be written to" in line and "digit_saliency" in line
    assert not (tmp_path / "ex").exists()  # the folder made for the failed command is gone


def test_compress_never_writes_into_an_existing_folder(cli, one_line_error, run, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    line = one_line_error(*cli(["compress", str(run), "--prune", "0.5", "--out", str(out)])[::2])
    assert f"{out} already exists" in line
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("command, name", [
    (["compress", "RUN", "--sweep"], "compress_sweep.json"),
    (["explain", "RUN", "--benchmark", "--method", "saliency"], "benchmark.json"),
], ids=["sweep", "benchmark"])
def test_a_rerun_keeps_the_earlier_results_unless_forced(cli, one_line_error, run, command,
                                                         name):
    (run / name).write_text('{"earlier": true}')
    argv = [str(run) if a == "RUN" else a for a in command]
    line = one_line_error(*cli(argv)[::2])
    assert f"{run / name} exists from an earlier" in line and "--force" in line
    assert (run / name).read_text() == '{"earlier": true}'
