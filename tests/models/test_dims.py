"""Models by dimension: every family that makes sense in 1D, 2D and 3D, built from one
description (``input_size = (C, *spatial)``, :mod:`cnnkit.layers.nd`).

Checked here: forward shapes, ``feature_info`` against measured shapes on every axis,
receptive fields and strides, parameter counts against hand-written formulas anchored on
published 2D counts, key-by-key kernel lifting across dimensions, and that a (d+1)-D
network whose kernels are non-zero only at the centre of the new axis computes, on an
input constant along that axis, exactly what the d-D network computes.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cnnkit.analysis import summary
from cnnkit.layers import ECA, ELA, SCSE, SpatialSE, SqueezeExcite, nd
from cnnkit.models import create_model, list_models
from cnnkit.models.densenet import DenseNet

SIZES = {1: (32,), 2: (16, 16), 3: (8, 8, 8)}  # small stems: total stride 8
CLASSIFIERS = {
    "resnet18": dict(attn="se"),
    "resnet50": {},
    "wide_resnet": dict(depth=10, widen_factor=1, attn="eca"),
    "vgg11_bn": dict(attn="scse"),
    "densenet121": {},
    "mobilenet_v1": dict(width_mult=0.25, attn="sse"),
    "mobilenet_v2": dict(width_mult=0.35, attn="ela"),
}
DENSE = {
    "unet": dict(width=4, depth=2, attn="scse"),
    "unet_small": {},
    "unet_backbone": dict(backbone="resnet18", stem="small"),
    "fcn8s": dict(backbone="resnet18", stem="small"),
    "fcn32s": dict(backbone="mobilenet_v2", stem="small"),
    "segnet": dict(width=4, depth=2),
    "deeplabv3plus": dict(backbone="resnet18", stem="small"),
}
TWO_D_ONLY = ["lenet5", "tinyvgg", "tinyvgg_wide", "allconv", "espcn"]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def meta_model(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return create_model(name, **kwargs)


def own_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The network's own modules: those outside recalibration blocks, whose gates keep one
    layout (1x1 Conv2d, channel Conv1d) in every number of dimensions."""
    gates = [n for n, m in model.named_modules()
             if isinstance(m, (SqueezeExcite, SpatialSE, SCSE, ECA, ELA))]
    return [(n, m) for n, m in model.named_modules()
            if not any(n == g or n.startswith(g + ".") for g in gates)]


def check_rank(model: nn.Module, dims: int) -> None:
    """Every convolution, transposed convolution and BatchNorm of the network has its rank."""
    kinds = [(nd.CONVS, nd.conv(dims)), (nd.CONV_TRANSPOSES, nd.conv_transpose(dims)),
             (nd.BATCH_NORMS, nd.batch_norm(dims))]
    mods = [m for _, m in own_modules(model)]
    for family, own in kinds:
        assert {type(m) for m in mods if isinstance(m, family)} <= {own}
    assert sum(isinstance(m, nd.conv(dims)) for m in mods) >= 3


def build(name: str, **kwargs) -> nn.Module:
    if name == "unet_backbone":
        name = "unet"
    return create_model(name, **kwargs)


def measured(model: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, torch.Size]:
    shapes: dict[str, torch.Size] = {}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda _m, _i, out, n=n: shapes.__setitem__(n, out.shape)) for n in names]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return shapes


def check_feature_info(model: nn.Module, size: tuple[int, ...]) -> None:
    """Every stage's channels and per-axis reduction equal the measured output's."""
    names = [f["module"] for f in model.feature_info] + [model.cam_layer]
    shapes = measured(model, torch.randn(1, *size), names)
    for f in model.feature_info:
        _, c, *spatial = shapes[f["module"]]
        assert c == f["num_chs"], f
        assert [n * f["reduction"] for n in spatial] == list(size[1:]), (f, spatial)
    assert len(shapes[model.cam_layer]) == len(size) + 1


# --- shapes and the contract -----------------------------------------------------------------

@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("name", list(CLASSIFIERS))
def test_classifier_shapes_by_dims(name: str, dims: int) -> None:
    torch.manual_seed(0)
    size = (2, *SIZES[dims])
    model = create_model(name, num_classes=5, input_size=size, **CLASSIFIERS[name]).eval()
    assert model.default_cfg["input_size"] == size
    assert getattr(model, "stem", "small") == "small"  # smallest side < 64
    with torch.no_grad():
        feats = model.forward_features(torch.randn(3, *size))
        out = model.forward_head(feats)
    stride = 4 if name == "wide_resnet" else 8
    assert feats.shape == (3, model.num_features, *(s // stride for s in SIZES[dims]))
    assert out.shape == (3, 5) and torch.isfinite(out).all()
    check_feature_info(model, size)
    check_rank(model, dims)


@pytest.mark.parametrize("dims", [1, 3])
@pytest.mark.parametrize("name", list(DENSE))
def test_dense_shapes_by_dims(name: str, dims: int) -> None:
    torch.manual_seed(0)
    spatial = (16,) * dims if name == "unet_small" else SIZES[dims]  # depth 4: multiple 16
    size = (2, *spatial)
    model = build(name, num_classes=4, input_size=size, **DENSE[name]).eval()
    assert model.default_cfg["input_size"] == size and model.task == "segment"
    assert all(n % model.size_multiple == 0 for n in spatial)
    with torch.no_grad():
        out = model(torch.randn(2, *size))
    assert out.shape == (2, 4, *spatial) and torch.isfinite(out).all()
    for f in model.feature_info:
        model.get_submodule(f["module"])
    check_rank(model, dims)


@pytest.mark.parametrize(("name", "kwargs"), [
    ("resnet18", dict(stem="imagenet")), ("resnet50", dict(stem="imagenet", output_stride=8)),
    ("vgg11", dict(stem="imagenet")), ("densenet121", dict(stem="imagenet")),
    ("mobilenet_v2", dict(stem="imagenet", width_mult=0.35)),
])
def test_imagenet_stems_in_1d(name: str, kwargs: dict) -> None:
    model = create_model(name, num_classes=3, input_size=(2, 96), **kwargs)
    check_feature_info(model, (2, 96))
    assert model.feature_info[-1]["reduction"] == (8 if "output_stride" in kwargs else 32)


def test_stem_auto_by_the_smallest_side() -> None:
    assert meta_model("resnet18", input_size=(1, 16, 128, 128)).stem == "small"
    assert meta_model("resnet18", input_size=(1, 64, 64, 64)).stem == "imagenet"
    assert meta_model("vgg11", input_size=(1, 63)).stem == "small"
    assert meta_model("densenet121", img_size=(200, 40)).stem == "small"


@pytest.mark.parametrize("dims", [1, 3])
def test_resnet_output_stride_in_any_dims(dims: int) -> None:
    size = (1, *(64,) * dims) if dims == 1 else (1, 32, 32, 32)
    model = create_model("resnet18", input_size=size, stem="imagenet", output_stride=8)
    assert [f["reduction"] for f in model.feature_info] == [4, 8, 8, 8]
    check_feature_info(model, size)
    assert model.layer4[1].conv2.dilation == (4,) * dims


def test_unet3d_keeps_its_paper_configuration() -> None:
    m = meta_model("unet3d", input_size=(1, 16, 16, 16), width=4)
    assert m.default_cfg["input_size"] == (1, 16, 16, 16)
    assert [b.conv2.out_channels for b in m.encoder] == [8, 16, 32, 64]  # doubled before pools
    paper = meta_model("unet3d", input_size=(1, 16, 16, 16), width=32)  # Cicek et al.'s Fig. 1
    assert [(b.conv1.out_channels, b.conv2.out_channels) for b in paper.encoder] == [
        (32, 64), (64, 128), (128, 256), (256, 512)]
    default = meta_model("unet3d", input_size=(1, 16, 16, 16))
    assert [b.conv2.out_channels for b in default.encoder] == [32, 64, 128, 256]  # half
    with pytest.raises(ValueError, match="3D U-Net is built in 3D only, not 2D"):
        meta_model("unet3d", input_size=(1, 16, 16))


# --- receptive fields and strides ---------------------------------------------------------------

class _Features(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_resnet18_receptive_field_is_the_same_per_axis(dims: int) -> None:
    # 7 (conv1) + 4 (max-pool at jump 2) + 4*8 + 8 + 3*16 + 16 + 3*32 + 32 + 3*64 = 435
    # along every axis, whatever the number of axes; the jump is the total stride.
    size = (1, *(64,) * dims) if dims < 3 else (1, 32, 32, 32)
    s = summary(_Features(meta_model("resnet18", input_size=size, stem="imagenet")), size)
    assert (s.receptive_field, s.jump) == (435, 32)


@pytest.mark.parametrize("dims", [1, 3])
def test_unet_receptive_field_by_dims(dims: int) -> None:
    # 13 * 2**depth - 8 per axis, as in 2D (tests/models/test_unet_segnet.py).
    size = (1, *(16,) * dims)
    s = summary(create_model("unet", width=2, depth=2, input_size=size), size)
    assert (s.receptive_field, s.jump) == (13 * 4 - 8, 1)


# --- parameter counts: hand-written formulas anchored on published 2D counts ----------------

def resnet_formula(bottleneck: bool, layers: list[int], dims: int, in_chans: int = 3,
                   classes: int = 1000, base_width: int = 64) -> int:
    """ResNet (He et al. 2016) by hand: conv weights (no bias) with k**dims taps, BN 2/channel."""
    def k(n: int) -> int:
        return n ** dims

    total = in_chans * 64 * k(7) + 2 * 64
    chs = 64
    for planes, blocks in zip((64, 128, 256, 512), layers, strict=True):
        out = planes * (4 if bottleneck else 1)
        width = planes * base_width // 64
        for b in range(blocks):
            if bottleneck:
                total += chs * width + 2 * width + width * width * k(3) + 2 * width
                total += width * out + 2 * out
            else:
                total += chs * out * k(3) + 2 * out + out * out * k(3) + 2 * out
            if b == 0 and (planes != 64 or chs != out):  # projection shortcut
                total += chs * out + 2 * out
            chs = out
    return total + chs * classes + classes


def vgg_formula(stages: list[list[int]], bn: bool, dims: int, classes: int = 1000) -> int:
    """VGG (Simonyan and Zisserman 2015) by hand, ImageNet head on a 7**dims pooled map."""
    total, c = 0, 3
    for widths in stages:
        for w in widths:
            total += c * w * 3 ** dims + w + (2 * w if bn else 0)
            c = w
    return total + (c * 7 ** dims * 4096 + 4096) + (4096 * 4096 + 4096) + 4096 * classes + classes


def densenet_formula(blocks: tuple[int, ...], dims: int, classes: int = 1000) -> int:
    """DenseNet-BC (Huang et al. 2017) by hand: growth 32, bottleneck 128, compression 0.5."""
    total, c = 3 * 64 * 7 ** dims + 2 * 64, 64
    for i, n in enumerate(blocks):
        for _ in range(n):
            total += 2 * c + c * 128 + 2 * 128 + 128 * 32 * 3 ** dims
            c += 32
        if i < len(blocks) - 1:
            total += 2 * c + c * (c // 2)
            c //= 2
    return total + 2 * c + c * classes + classes


def mobilenet_v2_formula(dims: int, classes: int = 1000) -> int:
    """MobileNetV2 (Sandler et al. 2018, Table 2) by hand, width 1."""
    total, c = 3 * 32 * 3 ** dims + 2 * 32, 32
    for t, out, n, _ in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                         (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]:
        for _ in range(n):
            hidden = c * t
            total += (c * hidden + 2 * hidden if t != 1 else 0)
            total += hidden * 3 ** dims + 2 * hidden + hidden * out + 2 * out
            c = out
    return total + c * 1280 + 2 * 1280 + 1280 * classes + classes


def unet_formula(dims: int, in_chans: int = 1, classes: int = 2, width: int = 64,
                 depth: int = 4) -> int:
    """The paper's plain U-Net (Ronneberger et al. 2015, Fig. 1) with k**dims taps."""
    def conv(c_in: int, c_out: int, k: int) -> int:
        return c_in * c_out * k ** dims + c_out

    chans = [width * 2 ** i for i in range(depth + 1)]
    total = sum(conv(a, c, 3) + conv(c, c, 3) for a, c in zip([in_chans, *chans[:-1]], chans,
                                                                strict=True))
    total += sum(conv(2 * c, c, 2) + conv(2 * c, c, 3) + conv(c, c, 3) for c in chans[:-1])
    return total + conv(chans[0], classes, 1)


FORMULAS = [  # (builder, kwargs, formula(dims), published 2D count)
    ("resnet18", {}, lambda d: resnet_formula(False, [2, 2, 2, 2], d), 11_689_512),
    ("resnet34", {}, lambda d: resnet_formula(False, [3, 4, 6, 3], d), 21_797_672),
    ("resnet50", {}, lambda d: resnet_formula(True, [3, 4, 6, 3], d), 25_557_032),
    ("wide_resnet50_2", {}, lambda d: resnet_formula(True, [3, 4, 6, 3], d, base_width=128),
     68_883_240),
    ("vgg16", {}, lambda d: vgg_formula([[64] * 2, [128] * 2, [256] * 3, [512] * 3, [512] * 3],
                                        False, d), 138_357_544),
    ("vgg11_bn", {}, lambda d: vgg_formula([[64], [128], [256] * 2, [512] * 2, [512] * 2],
                                           True, d), 132_868_840),
    ("densenet121", {}, lambda d: densenet_formula((6, 12, 24, 16), d), 7_978_856),
    ("mobilenet_v2", {}, mobilenet_v2_formula, 3_504_872),
    ("unet", dict(in_chans=1, norm=None), unet_formula, 31_030_658),
]


@pytest.mark.parametrize(("name", "kwargs", "formula", "published"), FORMULAS,
                         ids=[f[0] for f in FORMULAS])
def test_parameter_counts_by_dims(name: str, kwargs: dict, formula, published: int) -> None:
    assert formula(2) == published  # the formula is right in 2D ...
    side = {1: (224,), 2: (224, 224), 3: (224, 224, 224)}
    for dims in (1, 2, 3):  # ... and the builder follows it in 1D and 3D
        chans = kwargs.get("in_chans", 3)
        extra = {k: v for k, v in kwargs.items() if k != "in_chans"}
        model = meta_model(name, input_size=(chans, *side[dims]), **extra)
        assert n_params(model) == formula(dims), dims


def test_3d_resnet18_count_spelled_out() -> None:
    # Every kxk kernel becomes kxkxk (3x3: x3, 7x7: x7, 1x1: x1), BN and fc unchanged:
    # the 2D convolutions are 11,166,912 weights of which 3x3 hold 10,985,472 and 7x7 9,408.
    conv3, conv7, conv1 = 10_985_472, 9_408, 172_032
    rest = 11_689_512 - conv3 - conv7 - conv1  # BN (9,600) and fc (513,000)
    assert rest == 9_600 + 513_000
    expected = 3 * conv3 + 7 * conv7 + conv1 + rest
    model = meta_model("resnet18", input_size=(3, 16, 112, 112), stem="imagenet")
    assert n_params(model) == expected == 33_716_904
    expected_1d = conv3 // 3 + conv7 // 7 + conv1 + rest
    assert n_params(meta_model("resnet18", input_size=(3, 1000))) == expected_1d == 4_357_800


@pytest.mark.parametrize("name, kwargs", [
    ("resnet50", dict(attn="se")), ("wide_resnet", dict(depth=16, widen_factor=2)),
    ("vgg13_bn", dict(stem="small")), ("densenet169", dict(stem="small")),
    ("mobilenet_v1", dict(attn="eca")), ("mobilenet_v2", dict(width_mult=0.5)),
    ("unet", dict(attn="scse", width=8)), ("unet", dict(backbone="resnet18")),
    ("fcn8s", dict(backbone="resnet18")), ("segnet", {}), ("deeplabv3plus", {}),
])
def test_every_kernel_is_lifted_and_nothing_else_changes(name: str, kwargs: dict) -> None:
    # Same state_dict keys in every dims; a key's shape changes only where a convolution
    # kernel gains or loses axes (k -> kxk -> kxkxk); recalibration gates keep their layout.
    sizes = {1: (3, 128), 2: (3, 128, 128), 3: (3, 128, 128, 128)}
    ref = meta_model(name, input_size=sizes[2], **kwargs)
    ref_sd = ref.state_dict()
    kernels = {f"{n}.weight": m.kernel_size for n, m in own_modules(ref)
               if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))}
    for dims in (1, 3):
        sd = meta_model(name, input_size=sizes[dims], **kwargs).state_dict()
        assert list(sd) == list(ref_sd)
        for key, t in sd.items():
            if key in kernels:
                k = kernels[key]
                assert k[0] == k[1] and t.shape == (*ref_sd[key].shape[:2], *(k[0],) * dims), key
            else:
                assert t.shape == ref_sd[key].shape, key


# --- a (d+1)-D network on an input constant along the new axis is the d-D network ---------------

def lift(low: nn.Module, high: nn.Module) -> None:
    """Load ``low``'s weights into ``high``, which has one more (leading) spatial axis.

    A convolution's kernel goes to the centre of the new axis (zeros elsewhere), so it
    reads only the position it is centred on; a transposed convolution whose kernel
    equals its stride copies its kernel along the new axis (each output position then
    receives exactly one input position). Everything else is copied.
    """
    sd_low = low.state_dict()
    sd = {}
    modules = dict(high.named_modules())
    for key, t in high.state_dict().items():
        src = sd_low[key]
        owner = modules[key.rpartition(".")[0]]
        if t.ndim == src.ndim + 1 and key.endswith("weight"):
            new = torch.zeros_like(t)
            if isinstance(owner, nd.CONV_TRANSPOSES):
                assert owner.kernel_size[0] == owner.stride[0]
                new[:] = src.unsqueeze(2)
            else:
                new[:, :, owner.kernel_size[0] // 2] = src
            sd[key] = new
        else:
            sd[key] = src.clone()
    high.load_state_dict(sd)


def randomise_norms(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nd.BATCH_NORMS):
            c = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
            m.running_var.copy_(0.5 + torch.rand(c, generator=g))
            m.weight.data.copy_(0.5 + torch.rand(c, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(c, generator=g))


LIFTS = {  # name: (kwargs, d-D spatial size, classifier?)
    "resnet18": (dict(attn="se", num_classes=4), 16, True),
    "resnet50_imagenet": (dict(stem="imagenet", num_classes=4), 32, True),
    "wide_resnet": (dict(depth=10, widen_factor=1, attn="sse"), 8, True),
    "vgg11_bn": (dict(attn="eca", num_classes=4), 8, True),
    "densenet": (dict(num_classes=4), 8, True),
    "mobilenet_v1": (dict(width_mult=0.25, attn="scse", num_classes=4), 8, True),
    "mobilenet_v2": (dict(width_mult=0.35, attn="se", num_classes=4), 8, True),
    "unet": (dict(width=4, depth=2, attn="cse", num_classes=3), 8, False),
    "unet_resnet18": (dict(backbone="resnet18", stem="small", num_classes=3), 8, False),
}


def build_lift(name: str, input_size: tuple[int, ...], kwargs: dict) -> nn.Module:
    if name == "densenet":  # DenseNet-BC code path at a CPU-cheap size
        return DenseNet((2, 2), growth_rate=8, num_init_features=16, input_size=input_size,
                        **kwargs)
    base = {"resnet50_imagenet": "resnet50", "unet_resnet18": "unet"}.get(name, name)
    return create_model(base, input_size=input_size, **kwargs)


@pytest.mark.parametrize("low_dims", [1, 2])
@pytest.mark.parametrize("name", list(LIFTS))
def test_lifted_network_computes_the_lower_dimensional_one(name: str, low_dims: int) -> None:
    kwargs, n, _ = LIFTS[name]
    torch.manual_seed(0)
    low = build_lift(name, (2, *(n,) * low_dims), kwargs).double().eval()
    randomise_norms(low)
    high = build_lift(name, (2, n, *(n,) * low_dims), kwargs).double().eval()
    lift(low, high)
    x = torch.randn(2, 2, *(n,) * low_dims, dtype=torch.float64)
    x_high = x.unsqueeze(2).expand(2, 2, n, *(n,) * low_dims).contiguous()
    with torch.no_grad():
        y, y_high = low(x), high(x_high)
    if y.ndim == 2:  # logits
        torch.testing.assert_close(y_high, y)
    else:  # dense predictions: every slice along the new axis is the d-D prediction
        torch.testing.assert_close(y_high, y.unsqueeze(2).expand_as(y_high))
    assert y.abs().max() > 1e-3  # not a trivially zero network


def test_lift_breaks_if_a_kernel_is_off_centre() -> None:
    # The identity above is not automatic: one kernel moved off the centre slice changes it.
    torch.manual_seed(0)
    kwargs, n, _ = LIFTS["resnet18"]
    low = build_lift("resnet18", (2, n, n), kwargs).double().eval()
    high = build_lift("resnet18", (2, n, n, n), kwargs).double().eval()
    lift(low, high)
    with torch.no_grad():
        w = high.layer2[0].conv2.weight
        w.copy_(torch.roll(w, 1, dims=2))
    x = torch.randn(2, 2, n, n, dtype=torch.float64)
    with torch.no_grad():
        assert not torch.allclose(high(x.unsqueeze(2).expand(2, 2, n, n, n).contiguous()), low(x))


# --- input_size through create_model ------------------------------------------------------------

@pytest.mark.parametrize("name", list_models())
def test_input_size_equals_the_two_part_form(name: str) -> None:
    plain = meta_model(name)
    size = tuple(plain.default_cfg["input_size"])
    same = meta_model(name, input_size=size)
    assert repr(same) == repr(plain)
    assert [(k, v.shape) for k, v in same.state_dict().items()] == \
        [(k, v.shape) for k, v in plain.state_dict().items()]
    assert tuple(same.default_cfg["input_size"]) == size


@pytest.mark.parametrize("name", ["resnet18", "vgg11", "unet_small", "fcn8s"])
def test_img_size_with_one_or_three_entries_builds_1d_or_3d(name: str) -> None:
    for spatial in [(96,), (64, 64, 64)]:
        a = meta_model(name, in_chans=2, img_size=spatial)
        b = meta_model(name, input_size=(2, *spatial))
        assert a.default_cfg["input_size"] == (2, *spatial)
        assert [(k, v.shape) for k, v in a.state_dict().items()] == \
            [(k, v.shape) for k, v in b.state_dict().items()]


@pytest.mark.parametrize("name", TWO_D_ONLY)
@pytest.mark.parametrize("size", [(1, 64), (1, 16, 16, 16)])
def test_two_d_only_families_refuse_other_dims(name: str, size: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=f"{name.removesuffix('_wide')} is built in 2D only") \
            as err:
        create_model(name, input_size=size)
    assert "\n" not in str(err.value)
    assert meta_model(name, input_size=(1, 32, 32)).default_cfg["input_size"] == (1, 32, 32)


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(input_size=(3, 8, 8, 8, 8)), "4 spatial dims"),
    (dict(input_size=(3, 32, 0)), "positive"),
    (dict(input_size=(3, 32, 32), in_chans=1), "disagrees"),
])
def test_bad_input_sizes(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        create_model("resnet18", **kwargs)
