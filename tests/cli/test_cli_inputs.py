"""`cnnkit predict` and `cnnkit explain` inputs: files, folders and glob patterns."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cnnkit.cli.commands import input_files


@pytest.fixture
def photos(tmp_path):
    """in/: b.png, a.png, c.jpg, .hidden.png, notes.txt, sub/d.png."""
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("b.png", "a.png", "c.jpg", ".hidden.png", "sub/d.png"):
        Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(root / name)
    (root / "notes.txt").write_text("not an image")
    return root


def test_folders_are_listed_sorted_non_recursive_without_hidden_files(photos):
    assert input_files([str(photos)]) == [str(photos / n) for n in ("a.png", "b.png", "c.jpg")]


def test_globs_files_and_folders_keep_the_given_order_each_file_once(photos):
    got = input_files([str(photos / "c.jpg"), str(photos / "*.png"), str(photos),
                       str(photos / "sub" / "d.png")])
    assert got == [str(photos / n) for n in ("c.jpg", "a.png", "b.png", "sub/d.png")]
    assert input_files([str(photos / "[ab].png")]) == [str(photos / "a.png"),
                                                        str(photos / "b.png")]
    # a file given by name is taken as it is (the reader then says if it is no image)
    assert input_files([str(photos / "notes.txt")]) == [str(photos / "notes.txt")]


def test_missing_inputs_raise_with_the_fix(photos):
    with pytest.raises(FileNotFoundError, match="does not exist; check the path"):
        input_files([str(photos / "nope.png")])
    with pytest.raises(ValueError, match="matches no files"):
        input_files([str(photos / "*.bmp")])
    with pytest.raises(ValueError, match="is a folder with no image or volume files"):
        input_files([str(photos.parent)])  # holds the folder in/ only


def test_predict_a_folder_equals_predicting_its_files(cli, shared_run, photos):
    code, out, err = cli(["predict", str(shared_run.path), str(photos), "--json"])
    assert code == 0, err
    by_folder = json.loads(out)
    files = [str(photos / n) for n in ("a.png", "b.png", "c.jpg")]
    code, out, err = cli(["predict", str(shared_run.path), *files, "--json"])
    assert code == 0, err
    assert json.loads(out) == by_folder
    assert [r["file"] for r in by_folder] == files
    code, out, err = cli(["predict", str(shared_run.path), str(photos / "*.png"), "--json"])
    assert code == 0, err
    assert [r["file"] for r in json.loads(out)] == files[:2]


def test_explain_a_glob_of_two_folders_with_one_name_is_refused(cli, one_line_error, shared_run,
                                                                tmp_path):
    for sub in ("x", "y"):
        (tmp_path / sub).mkdir()
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / sub / "same.png")
    line = one_line_error(*cli(["explain", str(shared_run.path), str(tmp_path / "*" / "*.png"),
                                "--method", "saliency", "--out", str(tmp_path / "ex")])[::2])
    assert "would both be written to" in line and "same_saliency" in line
