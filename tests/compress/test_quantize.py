"""Post-training int8 quantisation: BN folding, observers, int8 weights, accuracy, saving."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from torch import nn

from cnnkit.compress.quantize import (
    EntropyObserver,
    PercentileObserver,
    fold_batchnorm,
    freeze_quantized,
    load_quantized,
    quantize,
    save_quantized,
    search_calibration,
)
from cnnkit.data import load_data
from cnnkit.models import create_model


@pytest.fixture(scope="module")
def digits_model() -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A tinyvgg trained for a few seconds on digits, calibration and held-out images."""
    torch.manual_seed(0)
    data = load_data("digits")
    x = (data.images.float() / 255 - 0.5) / 0.5
    y = data.labels
    perm = torch.randperm(len(y))
    train, test = perm[:1400], perm[1400:]
    model = create_model("tinyvgg", num_classes=10, in_chans=1, img_size=8, width=16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(8):
        for idx in train[torch.randperm(len(train))].split(100):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    return model, x[train[:256]], x[test], y[test]


def _random_bn(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def test_fold_batchnorm_equals_unfused_eval_output() -> None:
    torch.manual_seed(0)
    model = _random_bn(create_model("resnet18", num_classes=10, img_size=16, stem="small"))
    x = torch.randn(4, 3, 16, 16)
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=0)
    # the original is untouched
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 20


class _SharedAndSliced(nn.Module):
    """A conv-BN pair called twice (must not be folded) and a head sliced in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32, 4), nn.Linear(4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(self.bn(self.conv(x))))
        return self.head[-1](self.head[:-1](x))  # the slice is not a registered submodule


def test_fold_batchnorm_skips_shared_modules_and_traces_slices() -> None:
    torch.manual_seed(0)
    model = _random_bn(_SharedAndSliced())
    x = torch.randn(3, 2, 4, 4)
    folded = fold_batchnorm(model)
    assert isinstance(folded.get_submodule("bn"), nn.BatchNorm2d)  # shared: left in place
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-6, rtol=0)


def _single_conv() -> nn.Module:
    conv = nn.Conv2d(1, 2, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, -2.0]).reshape(2, 1, 1, 1))
        conv.bias.zero_()
    return nn.Sequential(conv).eval()


def test_minmax_input_range_is_exact() -> None:
    x = torch.linspace(-1.0, 3.0, 64).reshape(4, 1, 4, 4)
    qmodel = quantize(_single_conv(), x, backend="x86", observer="minmax")
    state = qmodel.state_dict()
    scale = next(v for k, v in state.items() if k.endswith("input_scale_0"))
    zero_point = next(v for k, v in state.items() if k.endswith("input_zero_point_0"))
    # x86 keeps 7 bits for activations (quant range 0..127): scale = (max - min) / 127
    assert float(scale) == pytest.approx(4.0 / 127, rel=1e-6)
    assert int(zero_point) == round(1.0 / (4.0 / 127))


def test_percentile_observer_clips_a_known_outlier() -> None:
    torch.manual_seed(0)
    x = torch.rand(100_000)
    x[0] = 100.0
    obs = PercentileObserver(percentile=99.9)
    obs(x)
    t = obs.threshold()
    assert 0.99 <= t <= 1.0 + 100.0 / obs.bins  # the bulk's edge, to one bin
    scale, zero_point = obs.calculate_qparams()
    assert float(scale) == pytest.approx(t / 255, rel=1e-5)
    assert int(zero_point) == 0


def test_entropy_threshold_between_bulk_and_max() -> None:
    torch.manual_seed(0)
    x = torch.randn(200_000)
    x[0] = 10.0
    obs = EntropyObserver()
    obs(x)
    t = obs.threshold()
    bulk = float(torch.quantile(x.abs()[:100_000], 0.99))
    assert bulk <= t < 10.0
    # without outliers, on a uniform distribution, clipping only loses information
    uniform = EntropyObserver()
    uniform(torch.rand(100_000))
    assert uniform.threshold() >= 0.98


def test_int8_weights_per_channel_and_per_tensor() -> None:
    x = torch.randn(8, 1, 4, 4)
    per_channel = quantize(_single_conv(), x)
    w = per_channel.get_submodule("0").weight()
    assert w.dtype == torch.qint8
    assert w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric)
    assert w.q_per_channel_scales().numel() == 2
    # symmetric: scale = max|w_c| / 127 per output channel
    torch.testing.assert_close(w.q_per_channel_scales().float(),
                               torch.tensor([1.0, 2.0]) / 127.5, rtol=1e-2, atol=0)
    w = quantize(_single_conv(), x, per_channel=False).get_submodule("0").weight()
    assert w.dtype == torch.qint8 and w.qscheme() in (torch.per_tensor_affine,
                                                       torch.per_tensor_symmetric)


@pytest.mark.parametrize("observer", ["minmax", "percentile", "entropy"])
def test_quantised_logits_agree_with_float(digits_model, observer: str) -> None:
    model, calib, x, _ = digits_model
    qmodel = quantize(model, calib, observer=observer)
    with torch.no_grad():
        ref, out = model(x), qmodel(x)
    agreement = (ref.argmax(1) == out.argmax(1)).float().mean()
    assert agreement >= 0.95
    assert qmodel.features.conv_1_2.weight().dtype == torch.qint8


def test_search_calibration_keeps_best(digits_model) -> None:
    model, calib, x, y = digits_model
    best, table = search_calibration(model, calib, (x, y), observers=("minmax", "entropy"))
    assert [(r["observer"], r["per_channel"]) for r in table[1:]] == [
        ("minmax", True), ("minmax", False), ("entropy", True), ("entropy", False)]
    assert table[0]["observer"] == "float" and table[0]["accuracy"] > 0.85
    with torch.no_grad():
        acc = float((best(x).argmax(1) == y).float().mean())
    assert acc == pytest.approx(max(r["accuracy"] for r in table[1:]))


def test_save_load_roundtrip_without_pickle(digits_model, tmp_path) -> None:
    model, calib, x, _ = digits_model
    qmodel = quantize(model, calib, observer="entropy")
    path = save_quantized(qmodel, tmp_path / "q.safetensors")
    assert path.read_bytes()[:1] != b"\x80"  # not a pickle stream
    fresh = create_model("tinyvgg", num_classes=10, in_chans=1, img_size=8, width=16)
    loaded = load_quantized(path, fresh, x[:1])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), qmodel(x), atol=0, rtol=0)
    with safe_open(str(path), "pt") as f:  # the weights are stored as int8 codes
        assert f.get_tensor("features.conv_1_2.weight").dtype == torch.int8


def test_frozen_torchscript_gives_the_same_logits(digits_model) -> None:
    model, calib, x, _ = digits_model
    qmodel = quantize(model, calib)
    frozen = freeze_quantized(qmodel, x[:1])
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), qmodel(x), atol=0, rtol=0)


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) if x.sum() > 0 else x  # data-dependent: torch.fx cannot trace


def test_clear_errors() -> None:
    x = torch.randn(2, 1, 4, 4)
    with pytest.raises(ValueError, match="backend"):
        quantize(_single_conv(), x, backend="tpu")
    with pytest.raises(ValueError, match="observer"):
        quantize(_single_conv(), x, observer="mse")
    with pytest.raises(ValueError, match="traced"):
        quantize(_Branchy(), x)
    with pytest.raises(ValueError, match="empty"):
        quantize(_single_conv(), [])
