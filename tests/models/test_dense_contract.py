"""Every registered dense model speaks the dense contract (models/_dense.py)."""

import pytest
import torch

from cnnkit.analysis import summary
from cnnkit.models import create_model, list_models, model_info
from cnnkit.models._dense import DenseModel

SEGMENT = [m for m in list_models(task="segment") if m != "unet3d"]  # 3D: its own test
SUPERRES = list_models(task="superres")
# Small but real configurations so the whole registry runs in seconds on 2 cores.
SMALL = {"unet": {"width": 8, "depth": 2}, "segnet": {"width": 8, "depth": 3},
         "deeplabv3": {"backbone": "resnet18"}, "deeplabv3plus": {"backbone": "resnet18"},
         "fcn32s": {"backbone": "resnet18"}, "fcn16s": {"backbone": "resnet18"},
         "fcn8s": {"backbone": "resnet18"}}


def test_dense_tasks_registered():
    assert {"unet", "unet_small", "segnet", "fcn8s", "deeplabv3", "deeplabv3plus",
            "unet3d"} <= set(SEGMENT) | {"unet3d"}
    assert SUPERRES == ["espcn"]
    assert all(model_info(m).task == "segment" for m in SEGMENT)


@pytest.mark.parametrize("name", SEGMENT)
def test_segmenter_contract(name):
    torch.manual_seed(0)
    m = create_model(name, num_classes=3, in_chans=3, img_size=64, **SMALL.get(name, {})).eval()
    assert isinstance(m, DenseModel) and m.task == "segment" and m.scale == 1
    assert m.num_classes == 3 and m.default_cfg["task"] == "segment"
    for f in m.feature_info:
        m.get_submodule(f["module"])
    m.get_submodule(m.cam_layer)
    # Any multiple of the stride, not only the construction size, at input resolution.
    for h, w in ((64, 64), (2 * m.size_multiple, 3 * m.size_multiple)):
        x = torch.randn(2, 3, h, w, requires_grad=True)
        out = m(x)
        assert out.shape == (2, 3, h, w) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert summary(m, (3, 64, 64)).total_macs > 0


@pytest.mark.parametrize("name", SUPERRES)
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_superres_contract(name, scale):
    m = create_model(name, in_chans=3, scale=scale).eval()
    assert m.task == "superres" and m.scale == scale and m.size_multiple == 1
    out = m(torch.rand(1, 3, 10, 7))
    assert out.shape == (1, 3, 10 * scale, 7 * scale)
