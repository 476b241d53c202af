"""VGG, All-CNN-C, DenseNet and MobileNet V1/V2: parameter counts, shapes, stems, attention."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cnnkit.layers.attention import create_attn, list_attn
from cnnkit.models import create_model

# Parameter counts at 1000 classes, as published with torchvision's ImageNet weights.
PUBLISHED = {
    "vgg11": 132_863_336, "vgg11_bn": 132_868_840, "vgg13": 133_047_848,
    "vgg13_bn": 133_053_736, "vgg16": 138_357_544, "vgg16_bn": 138_365_992,
    "vgg19": 143_667_240, "vgg19_bn": 143_678_248,
    "densenet121": 7_978_856, "densenet169": 14_149_480, "densenet201": 20_013_928,
    "mobilenet_v2": 3_504_872,
}
SMALL_STEM_MODELS = [*PUBLISHED, "mobilenet_v1"]
POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
         nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
         nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
         nn.LPPool1d, nn.LPPool2d, nn.FractionalMaxPool2d, nn.FractionalMaxPool3d)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def meta_model(name: str, **kwargs) -> nn.Module:
    # Shapes only: a meta-device build skips initialising up to 143M parameters.
    with torch.device("meta"):
        return create_model(name, **kwargs)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_parameter_counts(name):
    assert n_params(meta_model(name)) == PUBLISHED[name]


def mobilenet_v1_params(alpha: float, num_classes: int = 1000, in_chans: int = 3) -> int:
    """Howard et al. (2017), Table 1, counted by hand: conv weights (no bias) + BN (2/channel)."""
    widths = [int(w * alpha) for w in (32, 64, 128, 128, 256, 256, 512, 512, 512, 512, 512,
                                       512, 1024, 1024)]
    total = in_chans * widths[0] * 9 + 2 * widths[0]  # 3x3 stem conv + BN
    for cin, cout in zip(widths, widths[1:], strict=False):
        total += cin * 9 + 2 * cin  # 3x3 depthwise + BN
        total += cin * cout + 2 * cout  # 1x1 pointwise + BN
    return total + widths[-1] * num_classes + num_classes


@pytest.mark.parametrize("alpha", [1.0, 0.75, 0.5, 0.25])
def test_mobilenet_v1_parameter_formula(alpha):
    assert n_params(meta_model("mobilenet_v1", width_mult=alpha)) == mobilenet_v1_params(alpha)
    assert n_params(meta_model("mobilenet_v1", num_classes=10, in_chans=1, width_mult=alpha)) \
        == mobilenet_v1_params(alpha, 10, 1)


def test_mobilenet_v1_matches_paper_count():
    # The paper (Table 8) reports 4.2M parameters for 1.0 MobileNet-224.
    assert abs(mobilenet_v1_params(1.0) - 4.2e6) / 4.2e6 < 0.01


def allconv_params(num_classes: int, in_chans: int) -> int:
    """All-CNN-C by hand: 3x3 convs 96, 96, 96, 192, 192, 192, 192, 1x1 192, 1x1 classes."""
    convs = [(in_chans, 96, 9), (96, 96, 9), (96, 96, 9), (96, 192, 9), (192, 192, 9),
             (192, 192, 9), (192, 192, 9), (192, 192, 1), (192, num_classes, 1)]
    return sum(cin * cout * k + cout for cin, cout, k in convs)


@pytest.mark.parametrize("num_classes,in_chans", [(10, 3), (100, 3), (10, 1)])
def test_allconv_parameter_formula(num_classes, in_chans):
    model = create_model("allconv", num_classes=num_classes, in_chans=in_chans)
    assert n_params(model) == allconv_params(num_classes, in_chans)


def test_allconv_matches_paper_count():
    # Springenberg et al. (2015), Table 3: All-CNN-C has "1.3 M" parameters.
    assert 1.3e6 <= allconv_params(10, 3) < 1.4e6


def test_allconv_is_pooling_free_and_averages_a_6x6_map():
    model = create_model("allconv").eval()
    pools = [name for name, m in model.named_modules() if isinstance(m, POOLS)]
    assert pools == ["global_pool"]
    strided = [name for name, m in model.named_modules()
               if isinstance(m, nn.Conv2d) and m.stride == (2, 2)]
    assert strided == ["features.conv3", "features.conv6"]
    with torch.no_grad():
        feats = model.forward_features(torch.randn(2, 3, 32, 32))
        class_maps = model.classifier(feats)
    assert feats.shape == (2, 192, 6, 6)  # the paper's global average over 6x6
    assert class_maps.shape == (2, 10, 6, 6)
    # Eval mode, default head (no ReLU on the class maps): logits = mean of the class maps;
    # the paper's head (head_relu=True) averages the rectified maps.
    torch.testing.assert_close(model.forward_head(feats), class_maps.mean((2, 3)))
    paper = create_model("allconv", head_relu=True).eval()
    paper.load_state_dict(model.state_dict())
    torch.testing.assert_close(paper.forward_head(feats), class_maps.relu().mean((2, 3)))


def test_allconv_dropout_follows_the_paper():
    model = create_model("allconv")
    drops = {name: m.p for name, m in model.named_modules() if isinstance(m, nn.Dropout)}
    assert drops == {"features.drop_in": 0.2, "features.drop3": 0.5, "features.drop6": 0.5}


@pytest.mark.parametrize("name,kwargs,size", [
    ("vgg11_bn", dict(stem="small"), 16),
    ("allconv", dict(head_relu=False), 16),
    ("densenet121", dict(stem="small", drop_rate=0.1), 8),
    ("mobilenet_v1", dict(stem="small", width_mult=0.5), 16),
    ("mobilenet_v2", dict(stem="small", width_mult=0.5), 16),
])
def test_forward_backward(name, kwargs, size):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, **kwargs).train()
    out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 7)
    torch.nn.functional.cross_entropy(out, torch.tensor([1, 6])).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("name", SMALL_STEM_MODELS)
def test_small_stem_8x8(name):
    model = create_model(name, num_classes=5, img_size=8).eval()
    assert model.stem == "small"  # resolved from stem="auto" below 64 pixels
    with torch.no_grad():
        feats = model.forward_features(torch.randn(2, 3, 8, 8))
        out = model.forward_head(feats)
    assert feats.shape[-2:] == (1, 1)  # total stride 8
    assert out.shape == (2, 5) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["vgg11", "densenet121", "mobilenet_v1", "mobilenet_v2"])
def test_small_stem_32x32(name):
    model = create_model(name, num_classes=10, img_size=32).eval()
    with torch.no_grad():
        feats = model.forward_features(torch.randn(2, 3, 32, 32))
        out = model.forward_head(feats)
    assert feats.shape[-2:] == (4, 4)
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_stem_resolution_and_size_errors():
    assert meta_model("vgg16", img_size=224).stem == "imagenet"
    assert meta_model("densenet121", img_size=(32, 48)).stem == "small"
    assert meta_model("mobilenet_v2", img_size=32, stem="imagenet").stem == "imagenet"
    for name in ("vgg11", "densenet121", "mobilenet_v1", "mobilenet_v2"):
        with pytest.raises(ValueError, match="too small"):
            meta_model(name, img_size=16, stem="imagenet")
    with pytest.raises(ValueError, match="stem"):
        meta_model("vgg11", stem="cifar")


@pytest.fixture(scope="module")
def vgg11_imagenet() -> nn.Module:
    return create_model("vgg11", num_classes=1000).eval()


FEATURE_CASES = [
    ("vgg11_bn", dict(stem="small"), (8, 16)),
    ("vgg11", dict(stem="small", attn="se"), (8, 16)),
    ("allconv", {}, (8, 16)),
    ("densenet121", dict(stem="imagenet"), (32, 64)),
    ("densenet121", dict(stem="small"), (8, 16)),
    ("mobilenet_v1", dict(stem="imagenet", width_mult=0.25), (32, 64)),
    ("mobilenet_v1", dict(stem="small", width_mult=0.25), (8, 16)),
    ("mobilenet_v2", dict(stem="imagenet", width_mult=0.5), (32, 64)),
    ("mobilenet_v2", dict(stem="small", width_mult=0.5, attn="eca"), (8, 16)),
]


def check_feature_info(model: nn.Module, hw: tuple[int, int]) -> None:
    """feature_info channels and reductions equal the shapes measured by forward hooks."""
    names = [info["module"] for info in model.feature_info] + [model.cam_layer]
    shapes: dict[str, torch.Size] = {}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda _m, _i, out, n=n: shapes.__setitem__(n, out.shape)) for n in names]
    try:
        with torch.no_grad():
            model.forward_features(torch.randn(1, 3, *hw))
    finally:
        for h in handles:
            h.remove()
    for info in model.feature_info:
        _, c, h, w = shapes[info["module"]]
        assert c == info["num_chs"], info
        assert (hw[0] // h, hw[1] // w) == (info["reduction"],) * 2, info
        assert (h * info["reduction"], w * info["reduction"]) == hw, info
    reductions = [info["reduction"] for info in model.feature_info]
    assert reductions == sorted(reductions)
    assert len(shapes[model.cam_layer]) == 4
    assert shapes[model.cam_layer][1] == model.feature_info[-1]["num_chs"]


@pytest.mark.parametrize("name,kwargs,hw", FEATURE_CASES)
def test_feature_info_matches_hooks(name, kwargs, hw):
    model = create_model(name, img_size=hw, **kwargs).eval()
    check_feature_info(model, hw)


def test_vgg_imagenet_feature_info_and_head(vgg11_imagenet):
    model = vgg11_imagenet
    check_feature_info(model, (32, 64))
    assert [i["reduction"] for i in model.feature_info] == [2, 4, 8, 16, 32]
    assert isinstance(model.get_submodule(model.cam_layer), nn.ReLU)
    assert model.cam_layer == "features.19"  # torchvision's last ReLU of vgg11
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert model.forward_head(feats, pre_logits=True).shape == (2, 4096)
        assert model(x).shape == (2, 1000)
    assert model.get_classifier() is model.classifier[6]


@pytest.mark.parametrize("name,kwargs,pre_dim", [
    ("vgg13", dict(img_size=32), 512),
    ("allconv", {}, 192),
    ("densenet121", dict(img_size=8), 1024),
    ("mobilenet_v1", dict(img_size=8), 1024),
    ("mobilenet_v2", dict(img_size=8), 1280),
])
def test_reset_classifier_and_pre_logits(name, kwargs, pre_dim):
    model = create_model(name, **kwargs).eval()
    size = model.default_cfg["input_size"]
    x = torch.randn(2, *size)
    model.reset_classifier(3)
    assert model.num_classes == model.default_cfg["num_classes"] == 3
    with torch.no_grad():
        feats = model.forward_features(x)
        assert model.forward_head(feats, pre_logits=True).shape == (2, pre_dim)
        assert model(x).shape == (2, 3)
    head = model.get_classifier()
    assert (head.out_features if isinstance(head, nn.Linear) else head.out_channels) == 3


ATTN_MODELS = [("vgg11", 5), ("mobilenet_v1", 13), ("mobilenet_v2", 17)]


@pytest.mark.parametrize("attn", list_attn())
@pytest.mark.parametrize("name,n_blocks", ATTN_MODELS)
def test_attention_blocks(name, n_blocks, attn):
    kwargs = dict(num_classes=4, img_size=16, stem="small")
    if name != "vgg11":
        kwargs["width_mult"] = 0.5
    torch.manual_seed(0)
    base = create_model(name, **kwargs)
    model = create_model(name, attn=attn, **kwargs).train()
    block_type = type(create_attn(attn, 64))
    blocks = [m for m in model.modules() if type(m) is block_type]
    assert len(blocks) == n_blocks
    assert n_params(model) == n_params(base) + sum(n_params(b) for b in blocks)
    out = model(torch.randn(2, 3, 16, 16))
    assert out.shape == (2, 4) and torch.isfinite(out).all()
    out.sum().backward()
    for block in blocks:
        assert all(p.grad is not None for p in block.parameters())
    check_feature_info(model.eval(), (8, 16))


def test_attn_none_keeps_torchvision_layout():
    for name in ("vgg11", "mobilenet_v2"):
        plain = meta_model(name).state_dict().keys()
        assert list(meta_model(name, attn=None).state_dict()) == list(plain)
        assert list(meta_model(name, attn="none").state_dict()) == list(plain)


@pytest.mark.parametrize("alpha", [0.25, 0.5, 0.75])
def test_mobilenet_v1_width_scaling(alpha):
    # Every V1 width times alpha is a multiple of 8, so widths scale exactly: pointwise
    # weights scale by alpha^2, depthwise/BN/stem by alpha, so the body is in [a^2, a].
    base = n_params(meta_model("mobilenet_v1").features)
    ratio = n_params(meta_model("mobilenet_v1", width_mult=alpha).features) / base
    assert alpha ** 2 <= ratio <= alpha
    assert ratio < 1.1 * alpha ** 2  # pointwise convs dominate: roughly alpha^2


def conv_widths(features: nn.Module) -> list[int]:
    return [m.out_channels for m in features.modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("alpha", [0.35, 0.5, 0.75, 1.4])
def test_mobilenet_v2_width_scaling(alpha):
    base = meta_model("mobilenet_v2").features[:-1]  # the last 1x1 conv keeps >= 1280
    scaled_model = meta_model("mobilenet_v2", width_mult=alpha)
    scaled = scaled_model.features[:-1]
    widths = conv_widths(scaled)
    assert all(w % 8 == 0 for w in widths)
    # Rounding to multiples of 8 gives each layer its own effective factor a_i;
    # each parameter tensor scales by a_i (depthwise, BN, stem) or a_i * a_j (1x1).
    factors = [w / w0 for w, w0 in zip(widths, conv_widths(base), strict=True)]
    lo, hi = min(factors), max(factors)
    assert lo >= 0.9 * alpha  # make_divisible never rounds below 90%
    ratio = n_params(scaled) / n_params(base)
    assert min(lo, lo * lo) <= ratio <= max(hi, hi * hi)
    assert abs(ratio / alpha ** 2 - 1) < 0.25  # roughly alpha^2
    assert scaled_model.num_features == (1792 if alpha > 1 else 1280)
