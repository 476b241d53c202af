"""Volumes end to end from the command line (issue 13, point 8): a 3D U-Net run and a 3D
ResNet run train on shapes3d, then eval, predict and explain NIfTI files, summary, export
and compress; a predicted mask keeps the source volume's affine."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

nib = pytest.importorskip("nibabel")

TINY = ["--data", "shapes3d", "--epochs", "1", "--data-opt", "n=24", "--data-opt", "size=8",
        "--amp", "off", "--no-progress"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cli):
    root = tmp_path_factory.mktemp("volumes")
    for name, args in (("seg", ["--task", "segment", "--model", "unet3d", "--model-opt", "width=4",
                                "--model-opt", "depth=2"]),
                       ("cls", ["--model", "resnet18", "--batch-size", "8"])):
        code, _, err = cli(["train", *TINY, *args, "--runs-dir", str(root), "--name", name])
        assert code == 0, err
    return root


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    """A shapes3d volume as a NIfTI file with a non-trivial affine (2 mm voxels, shifted)."""
    from cnnkit.data import load_data

    d = load_data("shapes3d", n=4, size=8, seed=5)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = (-10, 4, 7)
    path = tmp_path_factory.mktemp("vol") / "case01.nii.gz"
    data = d.images[0, 0].numpy().transpose(2, 1, 0)  # (z, y, x) -> nibabel's (x, y, z)
    nib.save(nib.Nifti1Image(data.astype(np.uint8), affine), str(path))
    return path


def test_eval_gives_the_tasks_metric(cli, runs):
    for name, key in (("seg", "test_miou"), ("cls", "test_accuracy")):
        code, out, err = cli(["eval", str(runs / name), "--json"])
        assert code == 0, err
        assert 0.0 <= json.loads(out)[key] <= 1.0


def test_predict_writes_a_mask_volume_with_the_sources_affine(cli, runs, volume, tmp_path):
    import cnnkit

    out = tmp_path / "pred"
    code, _, err = cli(["predict", str(runs / "seg"), str(volume), "--out", str(out)])
    assert code == 0, err
    mask = nib.load(str(out / "case01_mask.nii.gz"))
    np.testing.assert_array_equal(mask.affine, nib.load(str(volume)).affine)
    run = cnnkit.load_run(runs / "seg")
    x = run.preprocess(str(volume))[None]
    with torch.no_grad():
        expected = run.model(x).argmax(1)[0].numpy().transpose(2, 1, 0)
    np.testing.assert_array_equal(np.asarray(mask.dataobj), expected)
    assert (out / "case01_overlay.png").is_file() or list(out.glob("case01*.png"))


def test_explain_a_volume_gives_a_map_of_its_shape(cli, runs, volume, tmp_path):
    for name in ("seg", "cls"):
        out = tmp_path / name
        code, _, err = cli(["explain", str(runs / name), str(volume), "--method", "gradcam",
                            "--out", str(out)])
        assert code == 0, err
        m = np.load(out / "case01_gradcam.npy")
        assert m.shape == (8, 8, 8) and np.isfinite(m).all()
        assert (out / "case01_gradcam.png").is_file() and (out / "grid.png").is_file()


def test_summary_export_and_prune(cli, runs, tmp_path):
    code, out, err = cli(["summary", str(runs / "cls")])
    assert code == 0, err
    assert "1x8x8x8" in out.replace(" ", "") or "[1, 1, 8, 8, 8]" in out
    pytest.importorskip("onnxruntime")
    code, out, err = cli(["export", str(runs / "seg"), "--format", "onnx", "--out",
                          str(tmp_path / "seg.onnx")])
    assert code == 0, err
    code, out, err = cli(["compress", str(runs / "cls"), "--prune", "0.5", "--out",
                          str(tmp_path / "cls-small"), "--no-progress", "--json"])
    assert code == 0, err
    rows = json.loads(out)["models"]
    assert rows["pruned"]["params"] < rows["original"]["params"] / 2
