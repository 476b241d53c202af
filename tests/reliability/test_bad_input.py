"""The reliability catalogue, bad input: `cnnkit` answers with one line on stderr saying what is
wrong and what to do, exit code 2, never a traceback. Includes a NaN loss before and after the
first finished epoch."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import cnnkit.training.optim as optim_module

# -- usage errors (argparse): one line too -----------------------------------------------------

USAGE_ERRORS = {
    "epochs-not-int": (["train", "--epochs", "x"], ["--epochs", "'x'", "cnnkit train --help"]),
    "epochs-zero": (["train", "--epochs", "0"], ["--epochs", "at least 1"]),
    "batch-negative": (["train", "--batch-size", "-4"], ["--batch-size", "at least 1"]),
    "lr-negative": (["train", "--lr", "-1"], ["--lr", "above 0"]),
    "lr-nan": (["train", "--lr", "nan"], ["--lr", "finite"]),
    "lr-inf": (["train", "--lr", "inf"], ["--lr", "finite"]),
    "label-smoothing": (["train", "--label-smoothing", "1.5"], ["--label-smoothing", "below 1"]),
    "grad-clip": (["train", "--grad-clip", "-1"], ["--grad-clip", "above 0"]),
    "weight-decay": (["train", "--weight-decay", "-0.1"], ["--weight-decay", "at least 0"]),
    "early-stopping": (["train", "--early-stopping", "0"], ["--early-stopping", "at least 1"]),
    "image-size": (["train", "--image-size", "0"], ["--image-size", "at least 1"]),
    "optimizer": (["train", "--optimizer", "adam"], ["invalid choice", "sgd", "adamw"]),
    "channels": (["train", "--channels", "2"], ["--channels", "1, 3"]),
    "model-opt": (["train", "--model-opt", "width"], ["KEY=VALUE", "'width'"]),
    "unknown-flag": (["train", "--epoch", "3", "--bogus"], ["unrecognized", "--bogus"]),
    "unknown-command": (["fit"], ["invalid choice", "'fit'", "train"]),
    "eval-no-run": (["eval"], ["required", "RUN"]),
    "predict-no-files": (["predict", "runs/x"], ["required", "FILES"]),
    "topk-zero": (["predict", "runs/x", "a.png", "--topk", "0"], ["--topk", "at least 1"]),
    "input-one-number": (["summary", "resnet18", "--input", "3"], ["CxHxW", "CxL", "'3'"]),
    "input-five-numbers": (["summary", "resnet18", "--input", "1x2x3x4x5"], ["CxDxHxW"]),
    "input-words": (["summary", "resnet18", "--input", "axbxc"], ["CxHxW", "'axbxc'"]),
    "input-zero": (["summary", "resnet18", "--input", "0x32x32"], ["positive", "'0x32x32'"]),
    "input-negative": (["summary", "resnet18", "--input", "3x-8x8"], ["positive"]),
    "num-classes": (["summary", "resnet18", "--num-classes", "0"], ["--num-classes"]),
}


@pytest.mark.parametrize("argv, needles", USAGE_ERRORS.values(), ids=USAGE_ERRORS.keys())
def test_usage_errors_are_one_line(cli, one_line_error, argv, needles):
    line = one_line_error(*cli(argv)[::2])
    for needle in needles:
        assert needle in line


def test_usage_error_in_a_subprocess(cnnkit_subprocess, one_line_error):
    res = cnnkit_subprocess("train", "--epochs", "x", timeout=60)
    assert res.stdout == ""
    assert "expected an integer" in one_line_error(res.returncode, res.stderr)


def test_bad_model_in_a_subprocess(cnnkit_subprocess, one_line_error):
    res = cnnkit_subprocess("train", "--model", "resnet19", "--no-progress", timeout=120)
    line = one_line_error(res.returncode, res.stderr)
    assert "unknown model 'resnet19'" in line and "resnet18" in line


# -- train: bad models and data ----------------------------------------------------------------

def test_unknown_model_suggests_the_nearest(cli, one_line_error, tmp_path):
    line = one_line_error(*cli(["train", "--model", "resnet19", "--runs-dir",
                                str(tmp_path)])[::2])
    assert "unknown model 'resnet19'" in line and "did you mean: resnet18" in line
    assert "cnnkit models" in line
    assert not any(tmp_path.iterdir())  # nothing written for a run that never started


def test_unknown_model_in_summary(cli, one_line_error):
    line = one_line_error(*cli(["summary", "tinyvg"])[::2])
    assert "unknown model 'tinyvg'" in line and "tinyvgg" in line


def test_unknown_dataset_suggests_the_nearest(cli, one_line_error, tmp_path):
    line = one_line_error(*cli(["train", "--model", "lenet5", "--data", "digit",
                                "--runs-dir", str(tmp_path)])[::2])
    assert "unknown data set 'digit'" in line and "did you mean: digits" in line


@pytest.mark.parametrize("case", ["missing", "empty", "one-class", "no-subfolders", "file"])
def test_bad_data_paths(cli, one_line_error, tmp_path, image_folder, case):
    data = tmp_path / "data"
    if case == "empty":
        data.mkdir()
    elif case == "one-class":
        image_folder(data, classes=1, per_class=3)
    elif case == "no-subfolders":
        image_folder(tmp_path / "tmp", classes=1, per_class=3)
        shutil.move(tmp_path / "tmp" / "class0", data)
    elif case == "file":
        data = tmp_path / "data.txt"
        data.write_text("hello")
    line = one_line_error(*cli(["train", "--model", "lenet5", "--data", str(data),
                                "--runs-dir", str(tmp_path / "runs"), "--no-progress"])[::2])
    expected = {"missing": ("does not exist", "folder/.csv/.npz"),
                "empty": ("contains no images", "subfolder"),
                "one-class": ("one class subfolder ('class0')", "at least two"),
                "no-subfolders": ("has 3 images but no class subfolders", "move them"),
                "file": ("cannot read data", "give a folder")}[case]
    for needle in expected:
        assert needle in line
    assert not (tmp_path / "runs").exists()


def test_npz_with_huge_values_is_refused(cli, one_line_error, tmp_path):
    x = np.full((20, 8, 8), 1e30, dtype=np.float32)
    np.savez(tmp_path / "huge.npz", x=x, y=np.arange(20) % 2)
    line = one_line_error(*cli(["train", "--model", "lenet5", "--data",
                                str(tmp_path / "huge.npz"), "--runs-dir", str(tmp_path)])[::2])
    assert "float images span" in line and "[0, 1]" in line


def test_strict_stops_at_a_corrupt_image(cli, one_line_error, tmp_path, image_folder):
    data = image_folder(tmp_path / "data")
    (data / "class1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    line = one_line_error(*cli(["train", "--model", "lenet5", "--data", str(data), "--strict",
                                "--runs-dir", str(tmp_path / "runs"), "--no-progress"])[::2])
    assert "broken.png" in line and "strict" in line


def test_folder_of_only_corrupt_images(cli, one_line_error, tmp_path):
    for c in ("a", "b"):
        (tmp_path / "data" / c).mkdir(parents=True)
        (tmp_path / "data" / c / "x.png").write_bytes(b"not an image")
    line = one_line_error(*cli(["train", "--model", "lenet5", "--data", str(tmp_path / "data"),
                                "--runs-dir", str(tmp_path / "runs"), "--no-progress"])[::2])
    assert "none of the 2 image files" in line


def test_runs_dir_that_is_a_file(cli, one_line_error, tmp_path):
    (tmp_path / "runs").write_text("")
    line = one_line_error(*cli(["train", "--model", "lenet5", "--runs-dir",
                                str(tmp_path / "runs")])[::2])
    assert "is a file, not a folder" in line


def test_unavailable_device(cli, one_line_error, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    line = one_line_error(*cli(["train", "--model", "lenet5", "--device", "cuda",
                                "--runs-dir", str(tmp_path)])[::2])
    assert "CUDA is not available" in line and "--device cpu" in line


# -- train: non-finite loss --------------------------------------------------------------------

NAN_MESSAGE = re.compile(r"loss became NaN or infinite at epoch (\d+), step (\d+) "
                         r"\(global step (\d+)\)")


def test_nan_loss_in_the_first_epoch(cli, one_line_error, tmp_path):
    code, _, err = cli(["train", "--model", "lenet5", "--lr", "1e30", "--epochs", "2",
                        "--batch-size", "128", "--runs-dir", str(tmp_path), "--no-progress"])
    line = one_line_error(code, err)
    match = NAN_MESSAGE.search(line)
    assert match and match.group(1) == "1" and int(match.group(2)) >= 1
    assert "no epoch had finished" in line
    assert f"cnnkit train --resume {tmp_path / 'lenet5-digits'} --lr 1e+29 --grad-clip 1" in line
    run = tmp_path / "lenet5-digits"  # the default name: <model>-<data>
    assert (run / "config.yaml").is_file()
    assert not (run / "model_last.safetensors").exists()


def test_nan_loss_after_an_epoch_keeps_the_last_good_checkpoint(cli, one_line_error, tmp_path,
                                                                monkeypatch):
    """The built-in schedules never jump, so swap in one that multiplies the learning rate
    by 1e30 from the first step of epoch 2: a real divergence the trainer must catch."""
    real_factor = optim_module.lr_factor

    def explode_in_epoch_2(step, total, warmup, schedule):
        return real_factor(step, total, warmup, schedule) * (1e30 if step >= total // 2 else 1)

    monkeypatch.setattr(optim_module, "lr_factor", explode_in_epoch_2)
    code, _, err = cli(["train", "--model", "lenet5", "--epochs", "2", "--batch-size", "128",
                        "--name", "nan", "--runs-dir", str(tmp_path), "--no-progress"])
    monkeypatch.undo()
    line = one_line_error(code, err)
    match = NAN_MESSAGE.search(line)
    assert match and match.group(1) == "2"
    steps_per_epoch = 1438 // 128  # digits' training split, drop_last
    assert int(match.group(3)) == steps_per_epoch + int(match.group(2))
    run = tmp_path / "nan"
    assert f"last good checkpoint is kept in {run / 'model_last.safetensors'}" in line
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(m)["epoch"] for m in lines] == [1]
    last = load_file(str(run / "model_last.safetensors"))
    assert all(torch.isfinite(t).all() for t in last.values())
    # the kept checkpoint is usable: eval loads it; resuming would diverge again, so the
    # run is only evaluated here
    code, out, _ = cli(["eval", str(run), "--weights", "last", "--json"])
    assert code == 0 and json.loads(out)["test_accuracy"] >= 0.0


# -- resume misuse -----------------------------------------------------------------------------

def test_resume_a_missing_run(cli, one_line_error, tmp_path):
    line = one_line_error(*cli(["train", "--resume", str(tmp_path / "nope")])[::2])
    assert "not found" in line and "runs/<name>" in line


def test_resume_refuses_changed_settings(cli, one_line_error, shared_run):
    """A resume may change how long and how fast a run learns, never what it learns from."""
    line = one_line_error(*cli(["train", "--resume", str(shared_run.path), "--lr", "0.5",
                                "--model", "lenet5", "--seed", "0"])[::2])
    assert "so --model, --seed cannot be given" in line and "--lr, --grad-clip" in line


# -- eval / predict / summary ------------------------------------------------------------------

@pytest.mark.parametrize("command", ["eval", "predict", "summary"])
def test_missing_run(cli, one_line_error, tmp_path, command, image_folder):
    image = image_folder(tmp_path / "img", classes=1, per_class=1) / "class0" / "0.png"
    argv = {"eval": ["eval", str(tmp_path / "nope")],
            "predict": ["predict", str(tmp_path / "nope"), str(image)],
            "summary": ["summary", str(tmp_path / "nope")]}[command]
    line = one_line_error(*cli(argv)[::2])
    if command == "summary":  # not a run folder, so it is read as a model name
        assert "unknown model" in line and "cnnkit models" in line
    else:
        assert "not found (no such folder)" in line and "runs/<name>" in line


def test_eval_on_a_folder_that_is_not_a_run(cli, one_line_error, tmp_path):
    line = one_line_error(*cli(["eval", str(tmp_path)])[::2])
    assert "has no config.yaml" in line


def test_eval_on_a_truncated_checkpoint(cli, one_line_error, tmp_path, shared_run):
    run = shutil.copytree(shared_run.path, tmp_path / "run")
    data = (run / "model.safetensors").read_bytes()
    (run / "model.safetensors").write_bytes(data[:100])
    line = one_line_error(*cli(["eval", str(run)])[::2])
    assert "not a readable safetensors file" in line and "retrain" in line


def test_eval_on_data_with_other_classes(cli, one_line_error, tmp_path, shared_run,
                                         image_folder):
    data = image_folder(tmp_path / "data", size=8)
    line = one_line_error(*cli(["eval", str(shared_run.path), "--data", str(data)])[::2])
    assert "class0, class1, class2 are not among the run's classes" in line


@pytest.mark.parametrize("case", ["missing", "corrupt", "folder", "text"])
def test_predict_bad_files(cli, one_line_error, tmp_path, shared_run, case):
    target = tmp_path / "x.png"
    if case == "corrupt":
        target.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    elif case == "folder":
        target = tmp_path
    elif case == "text":
        target = shared_run.path / "config.yaml"
    line = one_line_error(*cli(["predict", str(shared_run.path), str(target)])[::2])
    expected = {"missing": ("does not exist", "check the path"),
                "corrupt": ("cannot read image", "x.png"),
                "folder": ("is a folder", "/*.png"),
                "text": ("cannot read image", "config.yaml")}[case]
    for needle in expected:
        assert needle in line


@pytest.mark.parametrize("size, needles", [
    ("3x8x8", ["takes 1-channel images", "--input 1xHxW"]),
    ("1x2x2", ["cannot take input 1x2x2", "--input"]),
], ids=["channels", "too-small"])
def test_summary_of_a_run_with_a_wrong_input(cli, one_line_error, shared_run, size, needles):
    line = one_line_error(*cli(["summary", str(shared_run.path), "--input", size])[::2])
    for needle in needles:
        assert needle in line


def test_summary_input_too_small_for_the_model(cli, one_line_error):
    line = one_line_error(*cli(["summary", "tinyvgg", "--input", "1x2x2"])[::2])
    assert "too small" in line


def test_models_pattern_without_match(cli, one_line_error):
    line = one_line_error(*cli(["models", "zzz*"])[::2])
    assert "no model matches 'zzz*'" in line and "cnnkit models" in line


@pytest.mark.parametrize("case", ["missing", "corrupt", "no-metadata", "bad-metadata"])
def test_predict_with_a_bad_onnx_file(cli, one_line_error, tmp_path, image_folder, case):
    pytest.importorskip("onnxruntime")
    model = tmp_path / "model.onnx"
    if case == "corrupt":
        model.write_bytes(b"\x08\x07 not a protobuf of a model")
    elif case in ("no-metadata", "bad-metadata"):  # an ONNX model that cnnkit did not describe
        from cnnkit.compress.export import export

        meta = {"cnnkit_version": "0", "task": "classify", "model": "x", "input_size": "[1, 4]",
                "mean": "[0.5]", "std": "[0.0]", "classes": '["a", "b"]'}
        export(torch.nn.Linear(4, 2), torch.randn(2, 1, 4), model,
               metadata=meta if case == "bad-metadata" else None)
    image = next(image_folder(tmp_path / "imgs", classes=1, per_class=1).rglob("*.png"))
    line = one_line_error(*cli(["predict", str(model), str(image)])[::2])
    expected = {"missing": ("model.onnx", "does not exist", "cnnkit export"),
                "corrupt": ("not a readable ONNX model", "export the run again"),
                "no-metadata": ("no cnnkit metadata", "task", "cnnkit export RUN --format onnx"),
                "bad-metadata": ("metadata is inconsistent", "export the run again")}[case]
    for needle in expected:
        assert needle in line


# -- explain options and predict/explain inputs (folders, globs) ------------------------------

@pytest.mark.parametrize("opt, needles", [
    ("windw=3", ["unknown option 'windw'", "occlusion: window, stride"]),
    ("window", ["KEY=VALUE", "'window'"]),
    ("1x=2", ["KEY=VALUE", "option name"]),
    ("window=0", ["window must be positive"]),
    ("masking=paint", ["masking must be 'input' or 'layer'"]),
], ids=["unknown-key", "no-value", "bad-key", "bad-value", "bad-choice"])
def test_explain_bad_opt(cli, one_line_error, tmp_path, shared_run, image_folder, opt, needles):
    image = next(image_folder(tmp_path / "img", classes=1, per_class=1, size=8).rglob("*.png"))
    out = tmp_path / "ex"
    line = one_line_error(*cli(["explain", str(shared_run.path), str(image), "--method",
                                "occlusion", "--opt", opt, "--out", str(out)])[::2])
    for needle in needles:
        assert needle in line
    assert not out.exists()  # nothing written for a call that never started


@pytest.mark.parametrize("command", ["predict", "explain"])
@pytest.mark.parametrize("case", ["empty-folder", "folder-of-text", "only-subfolders",
                                  "glob-no-match", "glob-only-folders"])
def test_predict_and_explain_bad_inputs(cli, one_line_error, tmp_path, shared_run, image_folder,
                                        command, case):
    target = tmp_path / "in"
    target.mkdir()
    if case == "folder-of-text":
        (target / "notes.txt").write_text("no image")
    elif case == "only-subfolders":  # in/class0/0.png: folders are not searched recursively
        image_folder(target, classes=1, per_class=1, size=8)
    elif case == "glob-only-folders":
        (target / "x.png").mkdir()
    given = str(target / "*.png") if case.startswith("glob") else str(target)
    line = one_line_error(*cli([command, str(shared_run.path), given])[::2])
    if case.startswith("glob"):
        assert f"the pattern {given!r} matches no files" in line and "quote it" in line
    else:
        assert "is a folder with no image or volume files" in line
        assert "subfolders are not searched" in line and "/*.png" in line


# -- config files and plugins (issue 14): one line naming the file, the key and the fix ---------

BAD_CONFIG_FILES = {
    "unknown-key": ("epochs: 2\nepoch: 3\n", ["unknown key 'epoch'", "bad.yaml",
                                              "valid keys: task, model"]),
    "wrong-type": ("epochs: two\n", ["bad.yaml", "'epochs'", "an integer"]),
    "python-tag": ("epochs: !!python/object/apply:os.system ['echo owned']\n",
                   ["bad.yaml", "not valid YAML"]),
    "a-list": ("- epochs\n- 2\n", ["bad.yaml", "not a mapping"]),
    "not-yaml": ("epochs: [2\n", ["bad.yaml", "not valid YAML", "--print-config"]),
    "missing-plugin": ("plugins: [no_such_plugin_mod]\n", ["bad.yaml", "no_such_plugin_mod",
                                                            "PYTHONPATH"]),
    "bad-value": ("optimizer: adam\n", ["bad.yaml", "optimizer", "sgd, adamw"]),
}


@pytest.mark.parametrize("case", list(BAD_CONFIG_FILES))
def test_a_bad_config_file_is_one_line(cli, one_line_error, tmp_path, capfd, case):
    text, needles = BAD_CONFIG_FILES[case]
    (tmp_path / "bad.yaml").write_text(text)
    line = one_line_error(*cli(["train", "--config", str(tmp_path / "bad.yaml"),
                                "--runs-dir", str(tmp_path / "runs")])[::2])
    for needle in needles:
        assert needle in line, (needle, line)
    assert not (tmp_path / "runs").exists()
    assert "owned" not in capfd.readouterr().out  # no YAML tag ran a command


def test_a_missing_config_file_and_a_missing_plugin_are_one_line(cli, one_line_error, tmp_path):
    line = one_line_error(*cli(["train", "--config", str(tmp_path / "none.yaml")])[::2])
    assert "none.yaml" in line and "does not exist" in line and "--print-config" in line
    line = one_line_error(*cli(["train", "--plugin", "no_such_plugin_mod", "--epochs", "1"])[::2])
    assert "no_such_plugin_mod" in line and "--plugin" in line


def test_a_logger_without_its_package_is_refused_before_training(cli, one_line_error, tmp_path,
                                                                  monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)
    line = one_line_error(*cli(["train", "--logger", "csv,wandb", "--epochs", "1",
                                "--runs-dir", str(tmp_path / "runs")])[::2])
    assert "--logger wandb" in line and "pip install wandb" in line
    assert not any((tmp_path / "runs").glob("*/config.yaml"))  # no run was left behind


def test_explain_opt_of_the_wrong_kind(cli, one_line_error, tmp_path, shared_run, image_folder):
    image = next(image_folder(tmp_path / "img", classes=1, per_class=1, size=8).rglob("*.png"))
    out = tmp_path / "ex"
    line = one_line_error(*cli(["explain", str(shared_run.path), str(image), "--method",
                                "occlusion", "--opt", "window=abc", "--out", str(out)])[::2])
    assert "occlusion: bad option value in window='abc'" in line and "2,3" in line
    assert not out.exists()
