"""ONNX and TorchScript export reproduce the model's outputs (checked by their runtimes)."""

import json
import logging
import sys
import warnings

import pytest
import torch
from torch import nn

from cnnkit.compress.export import export
from cnnkit.models import create_model


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_matches_model(tmp_path, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxscript")
        pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = create_model("tinyvgg", num_classes=4, in_chans=1, img_size=16)
    path = tmp_path / ("m.onnx" if fmt == "onnx" else "m.pt")
    res = export(model, torch.randn(2, 1, 16, 16), path, format=fmt)
    assert res["checked_with"] and res["max_abs_diff"] < 1e-4 and res["bytes"] > 1000
    # one self-contained file (ONNX: weights inside, no .data beside it), nothing else left
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert res["bytes"] == path.stat().st_size > sum(p.numel() * 4 for p in model.parameters())


def test_export_never_replaces_a_file_unless_asked(tmp_path):
    model = create_model("tinyvgg", num_classes=4, in_chans=1, img_size=16)
    path = tmp_path / "m.pt"
    path.write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="m.pt exists"):
        export(model, torch.randn(2, 1, 16, 16), path, format="torchscript")
    assert path.read_bytes() == b"mine"
    export(model, torch.randn(2, 1, 16, 16), path, format="torchscript", overwrite=True)
    assert path.read_bytes() != b"mine" and len(list(tmp_path.iterdir())) == 1
    with pytest.raises(ValueError, match="does not end in .onnx"):
        export(model, torch.randn(2, 1, 16, 16), tmp_path / "m.safetensors", format="onnx")


class Wrong(nn.Module):
    """Its traced graph freezes a Python branch on the example's batch size, so the traced
    file computes something else on another batch: the check must catch it."""

    def forward(self, x):
        return x * 2 if x.shape[0] == 2 else x


def test_export_detects_mismatch(tmp_path):
    with pytest.raises(ValueError, match="differ from the model's"):
        export(Wrong(), torch.randn(2, 3), tmp_path / "w.pt", format="torchscript")
    assert not any(tmp_path.iterdir())  # a file that failed its check is not left behind


def test_export_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown export format"):
        export(Wrong(), torch.randn(2, 3), tmp_path / "w", format="tflite")


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
@pytest.mark.parametrize("name,kwargs", [
    ("resnet18", dict(num_classes=3, input_size=(1, 32))),
    ("unet3d", dict(num_classes=3, input_size=(1, 8, 8, 8), width=2)),
], ids=["resnet18_1d", "unet3d"])
def test_export_matches_model_in_1d_and_3d(tmp_path, fmt, name, kwargs):
    if fmt == "onnx":
        pytest.importorskip("onnxscript")
        pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = create_model(name, **kwargs).eval()
    path = tmp_path / ("m.onnx" if fmt == "onnx" else "m.pt")
    res = export(model, torch.randn(2, *kwargs["input_size"]), path, format=fmt)
    assert res["checked_with"] and res["max_abs_diff"] < 1e-4


def test_onnx_metadata_and_quiet_export(tmp_path, recwarn, capfd, caplog):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    model = create_model("tinyvgg", num_classes=4, in_chans=1, img_size=16)
    meta = {"task": "classify", "classes": '["a", "b", "c", "d"]'}
    export(model, torch.randn(2, 1, 16, 16), tmp_path / "m.onnx", metadata=meta)
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert props == {**meta, "opset": props["opset"]} and int(props["opset"]) >= 17
    assert not [str(w.message) for w in recwarn]
    assert capfd.readouterr() == ("", "")  # no progress lines
    # the exporter logs "torchvision is not installed" four times per export, through logging
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_real_warning_still_reaches_the_user(tmp_path):
    pytest.importorskip("onnxscript")

    class Warns(nn.Module):
        def forward(self, x):
            warnings.warn("the user's own warning", UserWarning, stacklevel=1)
            return x * 2

    with pytest.warns(UserWarning, match="the user's own warning"):
        export(Warns(), torch.randn(2, 3), tmp_path / "w.onnx")


def test_onnx_over_two_gigabytes_is_refused(tmp_path, monkeypatch):
    pytest.importorskip("onnxscript")
    # 2 GB of weights, scaled down (the package's `export` function hides the module's name)
    monkeypatch.setattr(sys.modules["cnnkit.compress.export"], "ONNX_FILE_LIMIT", 1000)
    model = create_model("tinyvgg", num_classes=4, in_chans=1, img_size=16)
    with pytest.raises(ValueError, match=r"over ONNX's 2 GB limit.*--format torchscript"):
        export(model, torch.randn(2, 1, 16, 16), tmp_path / "m.onnx")
    assert not any(tmp_path.iterdir())


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_torchscript_keeps_the_metadata(tmp_path):
    model = create_model("tinyvgg", num_classes=4, in_chans=1, img_size=16)
    export(model, torch.randn(2, 1, 16, 16), tmp_path / "m.pt", format="torchscript",
           metadata={"task": "classify"})
    extra = {"metadata.json": ""}
    torch.jit.load(str(tmp_path / "m.pt"), _extra_files=extra)
    assert json.loads(extra["metadata.json"]) == {"task": "classify"}
