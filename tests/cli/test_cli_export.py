"""`cnnkit export RUN --format onnx|torchscript`: a file whose outputs were checked."""

import json
import logging

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


def _onnx_export(cli, run, out):
    code, stdout, err = cli(["export", str(run), "--format", "onnx", "--out", str(out)])
    assert code == 0, err
    return stdout, err


def test_onnx_export_is_one_file_with_its_metadata_and_no_chatter(cli, shared_run, tmp_path,
                                                                  recwarn, capfd, caplog):
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from cnnkit.workflows.load import load_run

    out = tmp_path / "a" / "model.onnx"
    stdout, err = _onnx_export(cli, shared_run.path, out)
    # nothing the user cannot act on: no Python warning, no log line, no progress on stdout
    assert not [str(w.message) for w in recwarn]
    captured = capfd.readouterr()
    assert err == "" and captured.err == "" and captured.out == ""
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert stdout.count("\n") == 1 and "wrote" in stdout
    # one file, and the size printed is its size
    assert [p.name for p in out.parent.iterdir()] == ["model.onnx"]
    assert f"({out.stat().st_size / 1e6:.2f} MB" in stdout
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    run = load_run(shared_run.path)
    assert json.loads(meta["classes"]) == run.classes and len(run.classes) == 10
    assert json.loads(meta["mean"]) == pytest.approx(run.preprocess.mean)
    assert json.loads(meta["std"]) == pytest.approx(run.preprocess.std)
    assert json.loads(meta["input_size"]) == list(run.preprocess.input_size)
    assert (meta["task"], meta["model"]) == ("classify", "tinyvgg")
    assert int(meta["opset"]) >= 17 and meta["cnnkit_version"]


def test_predict_with_the_onnx_file_alone_matches_the_run(cli, shared_run, tmp_path,
                                                          image_folder):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "a" / "model.onnx"
    _onnx_export(cli, shared_run.path, out)
    alone = tmp_path / "elsewhere" / "copy.onnx"  # copied alone: nothing beside it
    alone.parent.mkdir()
    alone.write_bytes(out.read_bytes())
    out.unlink()
    files = sorted(str(p) for p in image_folder(tmp_path / "imgs", classes=3, per_class=2,
                                                 size=12).rglob("*.png"))
    code, stdout, err = cli(["predict", str(shared_run.path), *files, "--topk", "3", "--json"])
    assert code == 0, err
    want = json.loads(stdout)
    code, stdout, err = cli(["predict", str(alone), *files, "--topk", "3", "--json"])
    assert code == 0, err
    got = json.loads(stdout)
    assert [r["file"] for r in got] == files == [r["file"] for r in want]
    for g, w in zip(got, want, strict=True):
        assert [p["class"] for p in g["predictions"]] == [p["class"] for p in w["predictions"]]
        for pg, pw in zip(g["predictions"], w["predictions"], strict=True):
            assert pg["probability"] == pytest.approx(pw["probability"], abs=1e-4)
    code, text, err = cli(["predict", str(alone), *files[:2]])
    assert code == 0 and len(text.splitlines()) == 2 and text.startswith(files[0] + ": "), err
