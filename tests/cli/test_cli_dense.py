"""`cnnkit train/eval/predict/explain/models` for segmentation and super-resolution runs."""

import json

import numpy as np
import pytest
from PIL import Image

SEG = ["--task", "segment", "--data", "shapes", "--data-opt", "n=60", "--data-opt", "size=24",
       "--model", "unet", "--model-opt", "width=4", "--model-opt", "depth=2", "--epochs", "1",
       "--batch-size", "16", "--no-progress"]
SR = ["--task", "superres", "--data", "shapes", "--data-opt", "n=40", "--data-opt", "size=24",
      "--model", "espcn", "--scale", "3", "--epochs", "1", "--batch-size", "8", "--no-progress"]


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory):
    from cnnkit.cli.main import main

    runs = tmp_path_factory.mktemp("runs")
    assert main(["train", *SEG, "--runs-dir", str(runs), "--name", "seg", "--json"]) == 0
    return runs / "seg"


def test_segment_train_writes_miou(seg_run):
    summary = json.loads((seg_run / "summary.json").read_text())
    assert summary["task"] == "segment" and 0 <= summary["test_miou"] <= 1
    assert summary["classes"][0] == "background" and len(summary["test_iou"]) == 5
    assert "Per-class test IoU" in (seg_run / "report.html").read_text()


def test_segment_eval_json_matches_summary(cli, seg_run):
    code, out, err = cli(["eval", str(seg_run), "--json"])
    assert code == 0, err
    res = json.loads(out)
    summary = json.loads((seg_run / "summary.json").read_text())
    assert res["test_miou"] == pytest.approx(summary["test_miou"], abs=1e-6)


def test_segment_predict_any_size_writes_masks(cli, seg_run, tmp_path):
    rng = np.random.default_rng(0)
    for name, size in (("small.png", (20, 30)), ("big.png", (61, 50))):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(tmp_path / name)
    out = tmp_path / "pred"
    code, stdout, err = cli(["predict", str(seg_run), str(tmp_path / "small.png"),
                             str(tmp_path / "big.png"), "--out", str(out), "--json"])
    assert code == 0, err
    res = json.loads(stdout)
    for r, size in zip(res, ((20, 30), (61, 50)), strict=True):
        mask = Image.open(r["mask"])
        assert mask.mode == "P" and mask.size == (size[1], size[0])  # the image's own size
        assert Image.open(r["overlay"]).size == (size[1], size[0])
        assert sum(r["class_fractions"].values()) == pytest.approx(1, abs=1e-4)
    code, stdout, err = cli(["predict", str(seg_run), str(tmp_path / "big.png"), "--crf",
                             "--out", str(tmp_path / "crf"), "--json"])
    assert code == 0, err
    assert Image.open(json.loads(stdout)[0]["mask"]).size == (50, 61)


def test_segment_predict_never_writes_over_earlier_predictions(cli, one_line_error, seg_run,
                                                               tmp_path):
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(img)
    for _ in range(2):  # the default folder is new each time
        code, _, err = cli(["predict", str(seg_run), str(img)])
        assert code == 0, err
    assert (seg_run / "predictions" / "x_mask.png").is_file()
    assert (seg_run / "predictions-2" / "x_mask.png").is_file()
    line = one_line_error(*cli(["predict", str(seg_run), str(img), "--out",
                                str(seg_run / "predictions")])[::2])
    assert "predictions exists" in line and "--force" in line
    code, _, err = cli(["predict", str(seg_run), str(img), "--out", str(seg_run / "predictions"),
                        "--force"])
    assert code == 0, err


def test_segment_explain(cli, seg_run, tmp_path):
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(img)
    code, _, err = cli(["explain", str(seg_run), str(img), "--method", "gradcam",
                        "--out", str(tmp_path / "ex")])
    assert code == 0, err
    assert np.load(tmp_path / "ex" / "x_gradcam.npy").shape == (24, 24)


def test_superres_train_eval_predict(cli, tmp_path):
    code, out, err = cli(["train", *SR, "--runs-dir", str(tmp_path), "--name", "sr", "--json"])
    assert code == 0, err
    summary = json.loads(out)
    assert summary["task"] == "superres" and summary["scale"] == 3
    assert summary["test_psnr"] > 0 and summary["test_psnr_bicubic"] > 0
    code, out, err = cli(["eval", str(tmp_path / "sr"), "--json"])
    assert code == 0, err
    assert json.loads(out)["test_psnr_bicubic"] == pytest.approx(summary["test_psnr_bicubic"])
    img = tmp_path / "lr.png"
    Image.fromarray(np.full((10, 13, 3), 128, np.uint8)).save(img)
    code, out, err = cli(["predict", str(tmp_path / "sr"), str(img), "--out",
                          str(tmp_path / "up")])
    assert code == 0, err
    assert Image.open(tmp_path / "up" / "lr_x3.png").size == (39, 30)


@pytest.mark.parametrize("argv, match", [
    (["train", "--task", "segment", "--data", "digits"], "has no masks"),
    (["train", "--task", "segment", "--model", "resnet18"], "is a classify model"),
    (["train", "--model", "unet"], "is a segment model"),
    (["train", "--task", "segment", "--loss", "mse"], "does not fit task segment"),
    (["train", "--task", "superres", "--scale", "1"], "scale must be an integer >= 2"),
])
def test_dense_bad_input(cli, one_line_error, tmp_path, argv, match):
    code, _, err = cli([*argv, "--runs-dir", str(tmp_path), "--epochs", "1", "--no-progress"])
    assert match in one_line_error(code, err)


def test_models_task_filter(cli):
    code, out, _ = cli(["models", "--task", "segment"])
    names = [line.split()[0] for line in out.splitlines()]
    assert code == 0 and "unet" in names and "deeplabv3" in names and "resnet18" not in names
    code, out, _ = cli(["models", "--task", "superres"])
    assert [line.split()[0] for line in out.splitlines()] == ["espcn"]


def test_summary_of_dense_models(cli, one_line_error):
    code, out, err = cli(["summary", "espcn", "--json"])
    assert code == 0, err
    res = json.loads(out)
    assert res["output_shape"] == [1, 1, 51, 51] and res["total_params"] == 22_729
    code, out, err = cli(["summary", "unet3d", "--input", "1x16x16x16"])
    assert code == 0 and "Output: [1, 3, 16, 16, 16]" in out, err
    code, out, err = cli(["summary", "resnet18", "--input", "3x16x16x16"])  # a 3D ResNet
    assert code == 0 and "Output: [1, 1000]" in out, err
    code, _, err = cli(["summary", "lenet5", "--input", "1x16x16x16"])
    assert "lenet5 is built in 2D only, not 3D" in one_line_error(code, err)
