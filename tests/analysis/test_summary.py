"""Tests of cnnkit.analysis.summary: counts against analytic formulas and published numbers,
receptive fields against closed forms and an empirical autograd reference."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import _get_current_function_mode_stack

from cnnkit.analysis import ModelSummary, summary
from cnnkit.analysis.summary import format_bytes, format_count

# --------------------------------------------------------------------------- helpers


def empirical_rf(net: nn.Module, input_size: tuple[int, int, int],
                 offsets: tuple[int, ...] = (0,), axes: tuple[int, ...] = (0, 1)
                 ) -> tuple[int, int]:
    """Receptive field measured by autograd: positive weights, zero biases, input of ones,
    backprop from a centre output pixel; the extent of the non-zero input gradient.

    Every path through a positively weighted network carries a positive product, so the
    gradient is non-zero exactly on the input pixels the output pixel depends on. With
    several ``offsets`` (pixels right/below the centre) the largest extent is returned,
    for layers whose field depends on the pixel's phase (transposed convolutions).
    Only the extents along ``axes`` (0 rows, 1 columns) are measured; the others are 0.
    """
    net = net.double().eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d)):
                m.weight.fill_(1.0 / m.weight[0].numel())
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(1.0)
                m.bias.zero_()
    best = (0, 0)
    for off in offsets:
        x = torch.ones(1, *input_size, dtype=torch.float64, requires_grad=True)
        y = net(x)
        h, w = y.shape[-2:]
        y[..., h // 2 + off, w // 2 + off].sum().backward()
        support = x.grad[0].abs().sum(0) > 0
        extent = []
        for axis in (0, 1):
            if axis not in axes:
                extent.append(0)
                continue
            idx = support.any(1 - axis).nonzero().flatten()
            # The reference is only valid if the field is not clipped by the border.
            assert idx.min() > 0 and idx.max() < support.shape[axis] - 1, "input too small"
            extent.append(int(idx.max() - idx.min() + 1))
        best = (max(best[0], extent[0]), max(best[1], extent[1]))
    return best


def as_pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


class Features(nn.Module):
    """Wraps a cnnkit classifier so that its output is the last feature map."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


def conv(cin: int, cout: int, k: int | tuple[int, int], **kw) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, **kw)


class TwoBranchAdd(nn.Module):
    """out = conv3x3(relu(a(x) + b(x))), a = two 3x3 convs (RF 5), b = one 7x7 conv (RF 7)."""

    def __init__(self) -> None:
        super().__init__()
        self.a1, self.a2 = conv(2, 4, 3, padding=1), conv(4, 4, 3, padding=1)
        self.b = conv(2, 4, 7, padding=3)
        self.out = conv(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.a2(self.a1(x)) + self.b(x)))


class OffsetBranches(nn.Module):
    """a: 3x3 conv padded 1 (pixel i sees i-1..i+1); b: 3x3 conv unpadded, then padded by 2
    at the end (pixel i sees i..i+2); their sum sees the union i-1..i+2, size 4."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = conv(1, 2, 3, padding=1), conv(1, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + F.pad(self.b(x), (0, 2, 0, 2))


class DenseConcat(nn.Module):
    """DenseNet-style concatenations: c0 (RF 3), c1 (5), cat -> 1x1 -> avgpool 2 (6, jump 2),
    c2 3x3 (6 + 2 * 2 = 10), cat with its input: 10."""

    def __init__(self) -> None:
        super().__init__()
        self.c0, self.c1 = conv(2, 3, 3, padding=1), conv(3, 3, 3, padding=1)
        self.mix, self.pool = conv(6, 4, 1), nn.AvgPool2d(2)
        self.c2 = conv(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = self.c0(x)
        x = self.pool(self.mix(torch.cat([x0, self.c1(x0)], 1)))
        return torch.cat([x, self.c2(x)], 1)


class InceptionLike(nn.Module):
    """Branches 1x1, 3x3, 1x7, avgpool3 + 1x1, concatenated (RF (3, 7)), then a 3x3 conv
    (RF (5, 9)): a non-square field."""

    def __init__(self) -> None:
        super().__init__()
        self.b1, self.b3 = conv(2, 2, 1), conv(2, 2, 3, padding=1)
        self.b7 = conv(2, 2, (1, 7), padding=(0, 3))
        self.pool, self.bp = nn.AvgPool2d(3, stride=1, padding=1), conv(2, 2, 1)
        self.out = conv(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.b1(x), self.b3(x), self.b7(x), self.bp(self.pool(x))], 1)
        return self.out(y)


def sequential_stack() -> nn.Sequential:
    # r: 3, 4 (jump 2), 4 + 2*2*2 = 12, 12 + 4*2 = 20 (jump 4), 20 + 2*4 = 28 (jump 8), 28.
    return nn.Sequential(conv(1, 2, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                         conv(2, 2, 3, padding=2, dilation=2),
                         conv(2, 2, 5, stride=2, padding=2),
                         nn.AvgPool2d(3, stride=2, padding=1), conv(2, 2, 1))


class Upsampler(nn.Module):
    """conv3x3 (3), avgpool 2 (4, jump 2), transposed conv k4 s2 p1 (each output pixel fed
    by 2 inputs: 4 + 2 = 6, jump 1), bilinear x2 (2 taps: 6 + 1 = 7, jump 1/2),
    conv3x3 (7 + 2 * 1/2 = 8)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.pool = conv(1, 2, 3, padding=1), nn.AvgPool2d(2)
        self.up = nn.ConvTranspose2d(2, 2, 4, stride=2, padding=1)
        self.c2 = conv(2, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.up(self.pool(self.c1(x)))
        return self.c2(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))


def resnet18_or_skip(**kwargs) -> nn.Module:
    from cnnkit.models import create_model, list_models

    if "resnet18" not in list_models():
        pytest.skip("cnnkit.models has no resnet18 registered yet")
    return create_model("resnet18", **kwargs)


def resnet18_macs_analytic(img: int = 224, num_classes: int = 1000) -> tuple[int, int]:
    """(conv + fc MACs, BatchNorm MACs) of ResNet-18 (He, Zhang, Ren and Sun 2016, "Deep
    Residual Learning for Image Recognition"), from the architecture table:
    h x w x C_out x C_in x k^2 per convolution, one MAC per element per BatchNorm."""
    size = (img + 2 * 3 - 7) // 2 + 1  # 7x7 stride-2 stem
    macs = size * size * 64 * 3 * 7 * 7
    bn = size * size * 64
    size = (size + 2 - 3) // 2 + 1  # 3x3 stride-2 max-pool
    cin = 64
    for stage, cout in enumerate((64, 128, 256, 512)):
        if stage:
            size = (size + 2 - 3) // 2 + 1
            macs += size * size * cout * cin  # 1x1 stride-2 projection shortcut
            bn += size * size * cout
        macs += size * size * cout * cin * 9 + 3 * size * size * cout * cout * 9
        bn += 4 * size * size * cout  # two blocks of two conv-BN pairs
        cin = cout
    return macs + 512 * num_classes, bn


# --------------------------------------------------------------------------- formatting


def test_format_count_and_bytes() -> None:
    assert format_count(11_689_512) == "11.69 M"
    assert format_count(1_814_073_344) == "1.81 G"
    assert format_count(512) == "512"
    assert format_count(999_999) == "1.00 M"
    assert format_count(1_500) == "1.50 K"
    assert format_bytes(3_211_264) == "3.21 MB"
    assert format_bytes(100) == "100 B"


# --------------------------------------------------------------------------- counts


def test_macs_of_each_layer_kind() -> None:
    # grouped conv: 8x8 outputs x 8 channels x (4 / 2) x 9
    s = summary(nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2), (4, 16, 16))
    assert s.total_macs == 8 * 8 * 8 * 2 * 9 and s.output_shape == (1, 8, 8, 8)
    # transposed conv: per INPUT element, C_out / groups x 16
    s = summary(nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1), (8, 8, 8))
    assert s.total_macs == 8 * 8 * 8 * 4 * 16 and s.output_shape == (1, 4, 16, 16)
    # conv1d and conv3d: inputs (C, L) and (C, D, H, W)
    assert summary(nn.Conv1d(2, 3, 5), (2, 20)).total_macs == 16 * 3 * 2 * 5
    assert summary(nn.Conv3d(1, 2, 3), (1, 6, 6, 6)).total_macs == 4 ** 3 * 2 * 27
    # linear: rows x in x out, and everything scales with the batch
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.BatchNorm1d(5), nn.ReLU())
    assert summary(net, (3, 2, 2), batch_size=3).total_macs == 3 * 12 * 5 + 3 * 5  # + BN
    assert [r.macs for r in summary(net, (3, 2, 2)).rows] == [0, 60, 5, 0]


def test_functional_convs_are_counted() -> None:
    class StdConv(nn.Module):  # a leaf that calls F.conv2d itself (no nn.Conv2d inside)
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(6, 3, 5, 5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w = (self.weight - self.weight.mean()) / self.weight.std()
            return F.conv2d(x, w, stride=2, padding=2)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = StdConv()
            self.head = nn.Parameter(torch.randn(4, 6))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(self.conv(x).mean((2, 3)), self.head)  # linear outside a leaf

    s = summary(Net(), (3, 16, 16))
    assert [(r.name, r.params, r.macs) for r in s.rows] == [("conv", 450, 8 * 8 * 6 * 3 * 25)]
    assert s.total_macs == 8 * 8 * 6 * 3 * 25 + 6 * 4 and s.total_params == 450 + 24
    assert s.rows[0].receptive_field == 5 and s.rows[0].jump == 2


def test_reused_module_gives_two_rows_and_params_once() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(self.c(x))

    s = summary(Twice(), (2, 5, 5))
    assert [r.name for r in s.rows] == ["c", "c"]
    assert [r.params for r in s.rows] == [2 * 2 * 9 + 2, 0]
    assert s.total_params == 2 * 2 * 9 + 2
    assert s.total_macs == 2 * (25 * 2 * 2 * 9)
    assert [r.receptive_field for r in s.rows] == [3, 5]


def test_activation_memory_is_analytic() -> None:
    net = nn.Sequential(nn.Conv2d(1, 4, 1), nn.Conv2d(4, 8, 1), nn.Conv2d(8, 2, 1))
    s = summary(net, (1, 8, 8))
    px = 8 * 8 * 4  # float32 bytes per channel
    assert [r.activation_bytes for r in s.rows] == [4 * px, 8 * px, 2 * px]
    assert s.total_activation_bytes == 14 * px
    # input + the two maps alive while conv 2 runs (conv 1's output freed afterwards)
    assert s.peak_activation_bytes == (1 + 4 + 8) * px


def test_resnet18_matches_published_and_analytic_counts() -> None:
    model = resnet18_or_skip()
    s = summary(model, (3, 224, 224))
    assert isinstance(s, ModelSummary)
    assert s.total_params == 11_689_512 == sum(p.numel() for p in model.parameters())
    assert s.total_params == sum(r.params for r in s.rows)
    conv_fc, bn = resnet18_macs_analytic()
    assert conv_fc == 1_814_073_344  # torchvision's "1.81 GFLOPS" (conv + fc)
    assert s.total_macs == conv_fc + bn == 1_816_557_056
    assert s.total_macs == sum(r.macs for r in s.rows)
    assert s.output_shape == (1, 1000)
    # every conv row against h_out * w_out * C_out * C_in / groups * k^2 from the module
    modules = dict(model.named_modules())
    for row in s.rows:
        m = modules[row.name]
        if isinstance(m, nn.Conv2d):
            expect = math.prod(row.output_shape) * m.in_channels // m.groups
            assert row.macs == expect * math.prod(m.kernel_size), row.name
        elif isinstance(m, nn.BatchNorm2d):
            assert row.macs == math.prod(row.output_shape), row.name
    # the well-known theoretical receptive field of ResNet-18's last stage: 435, jump 32;
    # the pooled output sees the whole 7x7 map: 435 + 6 * 32
    last_conv = [r for r in s.rows if r.name.startswith("layer4")][-1]
    assert (last_conv.receptive_field, last_conv.jump) == (435, 32)
    assert s.receptive_field == 435 + 6 * 32
    text = str(s)
    assert "11.69 M" in text and "1.82 G" in text and "3.21 MB" in text  # conv1: 64x112x112
    assert len(text.splitlines()) == len(s.rows) + 4 + 5


def test_to_dict_is_json_safe() -> None:
    s = summary(InceptionLike(), (2, 16, 16))
    d = s.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["total_params"] == s.total_params and len(d["rows"]) == len(s.rows)
    assert d["rows"][-1]["receptive_field"] == [5, 9]


# --------------------------------------------------------------------------- receptive fields


@pytest.mark.parametrize("n", [1, 2, 5])
def test_stacked_3x3_convs_have_rf_2n_plus_1(n: int) -> None:
    net = nn.Sequential(*[nn.Conv2d(1, 1, 3, padding=1) for _ in range(n)])
    s = summary(net, (1, 12, 12))
    assert [r.receptive_field for r in s.rows] == [2 * i + 3 for i in range(n)]
    assert all(r.jump == 1 for r in s.rows)


def test_stride2_pools_double_the_jump() -> None:
    s = summary(nn.Sequential(*[nn.MaxPool2d(2) for _ in range(4)]), (1, 32, 32))
    assert [(r.receptive_field, r.jump) for r in s.rows] == [(2 ** k, 2 ** k) for k in (1, 2, 3, 4)]


@pytest.mark.parametrize("make, input_size, expected, offsets", [
    (sequential_stack, (1, 64, 64), (28, 28), (0,)),
    (TwoBranchAdd, (2, 24, 24), (9, 9), (0,)),
    (OffsetBranches, (1, 12, 12), (4, 4), (0,)),
    (DenseConcat, (2, 24, 24), (10, 10), (0,)),
    (InceptionLike, (2, 16, 20), (5, 9), (0,)),
    (Upsampler, (1, 16, 16), (8, 8), (0, 1)),
])
def test_rf_matches_autograd_reference(make, input_size, expected, offsets) -> None:
    s = summary(make(), input_size)
    assert as_pair(s.receptive_field) == expected
    assert empirical_rf(make(), input_size, offsets) == expected


def test_rf_of_resnet18_small_stem_matches_autograd_reference() -> None:
    model = Features(resnet18_or_skip(img_size=32))
    # closed form: stem 3x3 (+2), then per stage a first conv at the old jump and three at
    # the new one, each adding 2 * jump: 1 + 2 + 4*2 + (2 + 3*4) + (4 + 3*8) + (8 + 3*16)
    closed = 1 + 2 + 8 + (2 + 12) + (4 + 24) + (8 + 48)
    s = summary(model, (3, 32, 32))
    assert (s.receptive_field, s.jump) == (closed, 8) == (109, 8)
    # Autograd along each axis on a thin input (cheap, and the other axis may be clipped).
    tall = empirical_rf(model, (3, 128, 16), axes=(0,))
    wide = empirical_rf(model, (3, 16, 128), axes=(1,))
    assert (tall[0], wide[1]) == (109, 109)


# --------------------------------------------------------------------------- hygiene


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_model_is_left_untouched() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(), nn.ReLU())
    net.train()
    net[2].eval()  # mixed flags must come back exactly
    before = {k: v.clone() for k, v in net.state_dict().items()}
    flags = [m.training for m in net.modules()]
    s = summary(net, (3, 8, 8), batch_size=2)
    assert s.total_params == sum(p.numel() for p in net.parameters())
    assert [m.training for m in net.modules()] == flags
    assert _no_hooks(net)
    # batch norm ran in eval mode: running statistics unchanged
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not _get_current_function_mode_stack()


def test_hooks_removed_when_forward_raises() -> None:
    class Boom(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("boom")

    net = nn.Sequential(nn.Conv2d(1, 1, 3), Boom()).train()
    with pytest.raises(RuntimeError, match="boom"):
        summary(net, (1, 8, 8))
    assert _no_hooks(net)
    assert all(m.training for m in net.modules())
    assert not _get_current_function_mode_stack()


@pytest.mark.parametrize("bad", [(3, 0, 8), (8, 8), (1, 2, 3, 4, 5), (3, 8.0, 8), "3x8x8"])
def test_bad_input_size_raises(bad) -> None:
    net = nn.Conv2d(3, 1, 1)
    if bad == (8, 8):  # (C, L) is a valid 1-d input; a Conv2d then fails in torch itself
        with pytest.raises(RuntimeError):
            summary(net, bad)
        assert _no_hooks(net)
        return
    with pytest.raises(ValueError, match="input_size"):
        summary(net, bad)


def test_bad_batch_size_raises() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        summary(nn.Conv2d(3, 1, 1), (3, 8, 8), batch_size=0)


# --------------------------------------------------------------------------- dense models


def test_rf_through_crops_and_unpooling() -> None:
    from cnnkit.models import create_model

    # A crop (x[..., a:b, c:d]) only shifts the field: U-Net's valid-convolution form with
    # cropped skips sees exactly what its padded form sees, 13 * 2^d - 8 pixels.
    for depth in (1, 2):
        valid = create_model("unet", num_classes=2, width=4, depth=depth, padding=False,
                             norm=None)
        same = create_model("unet", num_classes=2, width=4, depth=depth)
        assert summary(valid, (3, 64, 64)).receptive_field == 13 * 2 ** depth - 8
        assert summary(same, (3, 64, 64)).receptive_field == 13 * 2 ** depth - 8
    # Max-unpooling puts each pooled value back at one pixel of its window: nearest
    # upsampling, so SegNet's field is bounded (not the whole image) and bounds autograd's.
    seg = create_model("segnet", num_classes=2, width=4, depth=2).eval()
    rf = summary(seg, (3, 64, 64)).receptive_field
    measured = empirical_rf(seg, (3, 64, 64), (0,))
    assert measured[0] <= rf < 64
