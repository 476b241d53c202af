"""`cnnkit export RUN --format onnx|torchscript`: a file whose outputs were checked."""

import json

import pytest


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_run(cli, shared_run, tmp_path, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    out = tmp_path / ("model.onnx" if fmt == "onnx" else "model.pt")
    code, stdout, err = cli(["export", str(shared_run.path), "--format", fmt, "--out", str(out),
                             "--json"])
    assert code == 0, err
    res = json.loads(stdout)
    assert res["path"] == str(out) and out.is_file() and res["max_abs_diff"] < 1e-4


def test_export_bad_run(cli, one_line_error, tmp_path):
    code, _, err = cli(["export", str(tmp_path / "nope")])
    assert "not found" in one_line_error(code, err)
