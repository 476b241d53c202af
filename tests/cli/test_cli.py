"""`cnnkit` end to end: help and lazy imports, listing, train -> run folder, eval, predict,
summary, user folders, and --resume after an interruption.

Most commands run in this process through ``cnnkit.cli.main.main`` (PyTorch is already
imported); a few run as ``python -m cnnkit`` to check what a user's shell sees.
"""

from __future__ import annotations

import base64
import fnmatch
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import cnnkit.training.trainer as trainer_module
from cnnkit.data import list_datasets
from cnnkit.models import create_model, list_models

SUBCOMMANDS = ["train", "eval", "predict", "summary", "bench", "models", "datasets"]


# -- help, version and lazy imports ------------------------------------------------------------

def test_importing_the_cli_does_not_import_torch():
    code = "import sys, cnnkit.cli.main; print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"


def test_help_does_not_import_torch():
    code = ("import sys\nfrom cnnkit.cli.main import main\n"
            "for argv in (['--help'], ['train', '--help'], ['summary', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit as e:\n"
            "        assert e.code == 0, e.code\n"
            "print('torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"]], ids=["cnnkit", "train"])
def test_help_in_a_subprocess_exits_zero(cnnkit_subprocess, argv):
    res = cnnkit_subprocess(*argv, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"usage: cnnkit{' train' if 'train' in argv else ''}")
    assert res.stderr == ""


def test_top_level_help_lists_every_subcommand(cli):
    code, out, _ = cli(["--help"])
    assert code == 0
    for sub in SUBCOMMANDS:
        assert f"    {sub}" in out


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_every_subcommand_has_help(cli, sub):
    code, out, err = cli([sub, "--help"])
    assert code == 0 and err == ""
    assert out.startswith(f"usage: cnnkit {sub}")


def test_train_help_documents_the_issue_flags(cli):
    _, out, _ = cli(["train", "--help"])
    for flag in ("--model", "--data", "--epochs", "--batch-size", "--lr", "--name", "--runs-dir",
                 "--resume", "--seed", "--strict", "--no-progress", "--json"):
        assert flag in out


def test_no_command_prints_help(cli):
    code, out, _ = cli([])
    assert code == 0 and out.startswith("usage: cnnkit")


def test_version(cli):
    from cnnkit import __version__

    code, out, _ = cli(["--version"])
    assert code == 0 and out.strip() == f"cnnkit {__version__}"


# -- models and datasets -----------------------------------------------------------------------

def test_models_lists_every_registered_model_with_its_description(cli):
    code, out, _ = cli(["models"])
    assert code == 0
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == list_models()
    assert all(len(line.split(maxsplit=1)) == 2 for line in lines)  # name + description
    assert {"lenet5", "tinyvgg", "resnet18"} <= {line.split()[0] for line in lines}


def test_models_filters_by_shell_pattern(cli):
    code, out, _ = cli(["models", "resnet*"])
    assert code == 0
    names = [line.split()[0] for line in out.splitlines()]
    assert "resnet18" in names and "lenet5" not in names
    assert all(fnmatch.fnmatchcase(n, "resnet*") for n in names)


def test_datasets_lists_builtins_and_user_formats(cli):
    code, out, _ = cli(["datasets"])
    assert code == 0
    builtins = list_datasets()
    assert [line.split()[0] for line in out.splitlines()[:len(builtins)]] == builtins
    assert {"digits", "shapes"} <= set(builtins)
    assert "Handwritten digits" in out
    for fmt in ("FOLDER/", ".csv", ".npz"):
        assert fmt in out


# -- train: the run folder ---------------------------------------------------------------------

def test_train_writes_the_run_folder(shared_run):
    root = shared_run.path
    for name in ("config.yaml", "model.safetensors", "model_last.safetensors",
                 "train_state.safetensors", "metrics.jsonl", "summary.json", "report.html"):
        assert (root / name).is_file(), name
    config = yaml.safe_load((root / "config.yaml").read_text())
    assert {k: config[k] for k in ("model", "data", "epochs", "batch_size", "lr", "seed",
                                   "name", "runs_dir")} == {
        "model": "tinyvgg", "data": "digits", "epochs": 2, "batch_size": 32, "lr": 0.1,
        "seed": 0, "name": "shared", "runs_dir": str(root.parent)}
    metrics = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert all(np.isfinite(m["train_loss"]) for m in metrics)
    summary = json.loads((root / "summary.json").read_text())
    assert summary["input_size"] == [1, 8, 8]
    assert summary["skipped_files"] == 0 and summary["epochs_run"] == 2
    # 10 balanced classes: chance is 0.1; two epochs of a small CNN reach far more.
    assert 0.5 < summary["test_accuracy"] <= 1.0


def test_report_embeds_png_figures(shared_run):
    html = (shared_run.path / "report.html").read_text()
    chunks = html.split("data:image/png;base64,")[1:]
    assert len(chunks) == 3  # curves, confusion matrix, sample predictions
    for chunk in chunks:
        png = base64.b64decode(chunk.split("'", 1)[0])
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_train_output_goes_to_the_right_streams(shared_run):
    summary = json.loads((shared_run.path / "summary.json").read_text())
    # stdout: only the result; stderr: the run line and one line per epoch.
    assert shared_run.out.splitlines() == [
        f"test_accuracy {summary['test_accuracy']:.4f} ({summary['num_samples']['test']} test "
        f"samples); run saved in {shared_run.path} (report.html)"]
    assert "epoch   1/2" in shared_run.err and "epoch   2/2" in shared_run.err
    assert "Traceback" not in shared_run.err


# -- eval, predict, summary on the shared run --------------------------------------------------

def test_eval_json_reproduces_the_test_accuracy(cli, shared_run):
    summary = json.loads((shared_run.path / "summary.json").read_text())
    code, out, _ = cli(["eval", str(shared_run.path), "--json"])
    assert code == 0
    result = json.loads(out)
    assert result["test_accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-6)
    assert result["num_samples"] == summary["num_samples"]["test"]
    code, out, _ = cli(["eval", str(shared_run.path)])
    assert code == 0 and out.startswith(f"test_accuracy {summary['test_accuracy']:.4f}")


def test_eval_last_weights(cli, shared_run):
    code, out, _ = cli(["eval", str(shared_run.path), "--weights", "last", "--json"])
    assert code == 0 and 0.0 <= json.loads(out)["test_accuracy"] <= 1.0


def _reference_probs(run_dir, images: np.ndarray) -> torch.Tensor:
    """Softmax of the run's best weights on uint8 [N, 8, 8] digits, computed without cnnkit's
    run loading or preprocessing: raw safetensors, the stored mean/std, the registry."""
    with safe_open(str(run_dir / "model.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["cnnkit"])
    c, h, w = meta["input_size"]
    model = create_model(meta["model"], num_classes=len(meta["classes"]), in_chans=c,
                         img_size=(h, w))
    model.load_state_dict(load_file(str(run_dir / "model.safetensors")))
    x = (torch.from_numpy(images).float()[:, None] / 255 - meta["mean"][0]) / meta["std"][0]
    with torch.no_grad():
        return model.eval()(x).softmax(1)


@pytest.fixture(scope="module")
def digit_files(tmp_path_factory):
    """40 digits as 8x8 PNGs in <label>/ subfolders (lossless: uint8 gray, native size)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images[:40] * (255 / 16)).astype(np.uint8)
    labels = bunch.target[:40]
    root = tmp_path_factory.mktemp("digit_files")
    paths = []
    for i, (img, label) in enumerate(zip(images, labels, strict=True)):
        (root / str(label)).mkdir(exist_ok=True)
        paths.append(root / str(label) / f"{i}.png")
        Image.fromarray(img, "L").save(paths[-1])
    return root, paths, images, labels


def test_predict_matches_an_independent_forward_pass(cli, shared_run, digit_files):
    _, paths, images, labels = digit_files
    files = [str(p) for p in paths[:6]]
    code, out, _ = cli(["predict", str(shared_run.path), *files, "--topk", "3", "--json"])
    assert code == 0
    results = json.loads(out)
    ref = _reference_probs(shared_run.path, images[:6])
    top = ref.topk(3, dim=1)
    assert [r["file"] for r in results] == files
    for n, r in enumerate(results):
        assert [p["class"] for p in r["predictions"]] == [str(i) for i in top.indices[n].tolist()]
        got = [p["probability"] for p in r["predictions"]]
        assert got == pytest.approx(top.values[n].tolist(), abs=1e-5)
    # plain output: one line per file, "file: class prob, ..."
    code, out, _ = cli(["predict", str(shared_run.path), *files[:2]])
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{files[0]}: ") and lines[0].count(",") == 2


def test_predict_topk_is_capped_by_the_class_count(cli, shared_run, digit_files):
    _, paths, _, _ = digit_files
    code, out, _ = cli(["predict", str(shared_run.path), str(paths[0]), "--topk", "50", "--json"])
    assert code == 0
    preds = json.loads(out)[0]["predictions"]
    probs = [p["probability"] for p in preds]
    assert len(preds) == 10 and sorted(probs, reverse=True) == probs
    assert sum(probs) == pytest.approx(1.0, abs=1e-5)


def test_eval_on_a_folder_matches_an_independent_forward_pass(cli, shared_run, digit_files):
    root, _, images, labels = digit_files
    code, out, _ = cli(["eval", str(shared_run.path), "--data", str(root), "--json"])
    assert code == 0
    result = json.loads(out)
    ref_acc = float((_reference_probs(shared_run.path, images).argmax(1).numpy()
                     == labels).mean())
    assert result["num_samples"] == 40
    assert result["test_accuracy"] == pytest.approx(ref_acc, abs=1e-6)
    assert ref_acc > 0.5


def test_summary_resnet18_published_numbers(cli):
    # He et al. 2016: 11.69 M parameters; 1.82 G MACs with the BatchNorm affine maps.
    code, out, _ = cli(["summary", "resnet18", "--input", "3x224x224"])
    assert code == 0
    assert "11.69 M" in out and "1.82 G" in out


def test_summary_of_a_run_uses_its_model_and_input_size(cli, shared_run):
    summary = json.loads((shared_run.path / "summary.json").read_text())
    code, out, _ = cli(["summary", str(shared_run.path), "--json"])
    assert code == 0
    result = json.loads(out)
    assert result["input_size"] == [1, 8, 8]
    assert result["total_params"] == summary["params"]
    assert result["output_shape"] == [1, 10]


def test_summary_input_builds_the_model_for_that_size(cli):
    code, out, _ = cli(["summary", "lenet5", "--input", "3x32x32", "--num-classes", "7",
                        "--json"])
    assert code == 0
    result = json.loads(out)
    assert result["input_size"] == [3, 32, 32] and result["output_shape"] == [1, 7]
    ref = create_model("lenet5", num_classes=7, in_chans=3, img_size=(32, 32))
    assert result["total_params"] == sum(p.numel() for p in ref.parameters())


# -- user folders ------------------------------------------------------------------------------

def test_train_on_a_folder_mixing_modes_with_corrupt_files(cli, tmp_path, image_folder):
    data = image_folder(tmp_path / "mixed", modes=("L", "RGB", "RGBA", "P"))
    (data / "class0" / "broken.png").write_bytes(b"this is not a png")
    good = (data / "class1" / "0.png").read_bytes()
    (data / "class1" / "truncated.png").write_bytes(good[: len(good) // 3])
    code, out, err = cli(["train", "--model", "lenet5", "--data", str(data), "--epochs", "1",
                          "--runs-dir", str(tmp_path / "runs"), "--no-progress", "--json"])
    assert code == 0, err
    summary = json.loads(out)  # --json: stdout holds the JSON and nothing else
    assert summary["skipped_files"] == 2
    assert summary["input_size"] == [3, 12, 12]  # colour wins; gray, RGBA and P converted
    assert sum(summary["num_samples"].values()) == 3 * 8
    assert summary["classes"] == ["class0", "class1", "class2"]
    saved = json.loads((tmp_path / "runs" / f"lenet5-{data.name}" / "summary.json").read_text())
    assert saved == summary
    warnings = [line for line in err.splitlines() if "warning:" in line]
    assert len(warnings) == 1 and "skipped 2 unreadable image(s)" in warnings[0]
    assert "Traceback" not in err


# -- resume ------------------------------------------------------------------------------------

def _assert_same_weights(a, b):
    for name in ("model.safetensors", "model_last.safetensors"):
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), (name, k)


def _val_history(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(m["epoch"], m["train_loss"], m["val_accuracy"]) for m in map(json.loads, lines)]


def test_resume_after_interrupt_equals_uninterrupted(cli, tmp_path, shared_run, shared_args,
                                                     monkeypatch):
    """Ctrl-C right after epoch 1 is saved, then --resume (without --epochs: the run must
    end at its own 2 epochs) gives the very weights of the uninterrupted shared run."""
    real_write = trainer_module.atomic_write

    def write_then_interrupt(path, data):
        real_write(path, data)
        if str(path).endswith("metrics.jsonl"):
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer_module, "atomic_write", write_then_interrupt)
    code, _, err = cli(["train", *shared_args, "--name", "cut", "--runs-dir", str(tmp_path)])
    monkeypatch.undo()
    run = tmp_path / "cut"
    assert code == 130
    assert f"--resume {run}" in err and "Traceback" not in err
    assert len(_val_history(run)) == 1 and not (run / "summary.json").exists()

    code, _, err = cli(["train", "--resume", str(run), "--no-progress"])
    assert code == 0, err
    assert _val_history(run) == _val_history(shared_run.path)
    _assert_same_weights(run, shared_run.path)

    # --epochs raises the length of a finished run: one more epoch, same run folder.
    code, out, err = cli(["train", "--resume", str(run), "--epochs", "3", "--no-progress",
                          "--json"])
    assert code == 0, err
    assert json.loads(out)["epochs_run"] == 3
    assert [e for e, _, _ in _val_history(run)] == [1, 2, 3]


def test_resume_after_sigint_in_a_subprocess(cli, tmp_path, shared_run, shared_args):
    """A real Ctrl-C (SIGINT) after the first checkpoint: exit 130, a resume hint, no
    traceback; then --resume RUN (a name inside --runs-dir) finishes the run exactly."""
    run = tmp_path / "sig"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cnnkit", "train", *shared_args, "--name", "sig",
         "--runs-dir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # the thread count of this process, which trained shared_run: reductions split
        # across threads differently round differently, and the test compares bit for bit
        env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    deadline = time.monotonic() + 90
    while not (run / "metrics.jsonl").exists() and proc.poll() is None:
        assert time.monotonic() < deadline, "no epoch finished in 90 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err

    code, _, err = cli(["train", "--resume", "sig", "--runs-dir", str(tmp_path),
                        "--no-progress"])
    assert code == 0, err
    assert _val_history(run) == _val_history(shared_run.path)
    _assert_same_weights(run, shared_run.path)
