"""ResNet, ImageNet Wide ResNets and the CIFAR WRN-d-k: counts, shapes, strides, options."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cnnkit.layers.attention import list_attn
from cnnkit.models import create_model, list_models
from cnnkit.models.resnet import BasicBlock, Bottleneck
from cnnkit.models.wide_resnet import WideResNet

# torchvision's published parameter counts at 1000 classes.
TORCHVISION_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "wide_resnet50_2": 68_883_240,
    "wide_resnet101_2": 126_886_696,
}
RESNETS = list(TORCHVISION_PARAMS)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_all_registered() -> None:
    assert set(RESNETS) | {"wide_resnet"} <= set(list_models())


@pytest.mark.parametrize("name", RESNETS)
def test_published_parameter_count(name: str) -> None:
    # Parameters on the meta device: shapes without allocation or init, so the big nets are cheap.
    with torch.device("meta"):
        model = create_model(name)
    assert n_params(model) == TORCHVISION_PARAMS[name]


def test_torchvision_layout() -> None:
    with torch.device("meta"):
        model = create_model("resnet50")
    sd = model.state_dict()
    assert sd["conv1.weight"].shape == (64, 3, 7, 7)
    assert sd["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert sd["layer1.0.downsample.1.running_var"].shape == (256,)
    assert sd["layer4.2.bn3.weight"].shape == (2048,)
    assert sd["fc.weight"].shape == (1000, 2048)
    assert "layer1.1.downsample.0.weight" not in sd  # only the first block of a stage projects
    # ResNet v1.5: the stride sits on the 3x3 conv, not on the first 1x1.
    block = model.layer2[0]
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)
    assert block.downsample[0].stride == (2, 2)
    names = [n for n, _ in model.named_children()]
    assert names == ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4",
                     "avgpool", "fc"]


def test_wide_resnet50_2_doubles_only_the_bottleneck() -> None:
    with torch.device("meta"):
        wide, base = create_model("wide_resnet50_2"), create_model("resnet50")
    assert wide.layer1[0].conv1.out_channels == 2 * base.layer1[0].conv1.out_channels == 128
    assert wide.layer1[0].conv3.out_channels == base.layer1[0].conv3.out_channels == 256


def test_resnet18_forward_224() -> None:
    model = create_model("resnet18").eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        feats = model.forward_features(x)
        logits = model.forward_head(feats)
    assert feats.shape == (1, 512, 7, 7)
    assert logits.shape == (1, 1000) and torch.isfinite(logits).all()
    assert torch.allclose(model(x), logits, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet34", "resnet50", "wide_resnet50_2"])
def test_forward_64(name: str) -> None:
    model = create_model(name, num_classes=7, img_size=64).eval()
    with torch.no_grad():
        feats = model.forward_features(torch.randn(2, 3, 64, 64))
        out = model.forward_head(feats)
        pooled = model.forward_head(feats, pre_logits=True)
    assert model.stem == "imagenet"
    assert feats.shape == (2, model.feature_info[-1]["num_chs"], 2, 2)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    assert pooled.shape == (2, model.num_features)
    assert torch.allclose(model.get_classifier()(pooled), out, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
@pytest.mark.parametrize("size, spatial", [(32, 4), (8, 1)])
def test_small_stem(name: str, size: int, spatial: int) -> None:
    model = create_model(name, num_classes=10, in_chans=1, img_size=size).eval()
    assert model.stem == "small"
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    with torch.no_grad():
        feats = model.forward_features(torch.randn(2, 1, size, size))
        out = model.forward_head(feats)
    assert feats.shape[-2:] == (spatial, spatial)
    assert out.shape == (2, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("attn", list_attn())
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_attn(name: str, attn: str) -> None:
    with torch.device("meta"):
        plain = create_model(name, num_classes=5, img_size=16)
    model = create_model(name, num_classes=5, img_size=16, attn=attn).eval()
    block_cls = BasicBlock if name == "resnet18" else Bottleneck
    blocks = [m for m in model.modules() if isinstance(m, block_cls)]
    assert all(not isinstance(b.attn, nn.Identity) for b in blocks)
    # Only the attention modules add parameters; the rest of the layout is unchanged.
    attn_params = sum(n_params(b.attn) for b in blocks)
    assert n_params(model) == n_params(plain) + attn_params
    with torch.no_grad():
        out = model(torch.randn(1, 3, 16, 16))
    assert out.shape == (1, 5) and torch.isfinite(out).all()


def test_attn_unknown_name_raises() -> None:
    with pytest.raises(ValueError):
        create_model("resnet18", img_size=32, attn="no-such-attention")


def measured_reductions(model: nn.Module, size: int, in_chans: int = 3) -> list[tuple[int, int]]:
    """(channels, input size / output size) at each feature_info module, via forward hooks."""
    modules = dict(model.named_modules())
    seen: dict[str, torch.Tensor] = {}
    handles = [modules[f["module"]].register_forward_hook(
        lambda _m, _i, out, key=f["module"]: seen.__setitem__(key, out.detach()))
        for f in model.feature_info]
    try:
        with torch.no_grad():
            model.eval()(torch.randn(1, in_chans, size, size))
    finally:
        for h in handles:
            h.remove()
    return [(seen[f["module"]].shape[1], size // seen[f["module"]].shape[-1])
            for f in model.feature_info]


@pytest.mark.parametrize("name, size, stem", [("resnet18", 64, "imagenet"),
                                              ("resnet18", 16, "small"),
                                              ("resnet50", 64, "imagenet"),
                                              ("resnet50", 16, "small")])
def test_feature_info_matches_measured(name: str, size: int, stem: str) -> None:
    model = create_model(name, num_classes=3, img_size=size, stem=stem)
    declared = [(f["num_chs"], f["reduction"]) for f in model.feature_info]
    assert measured_reductions(model, size) == declared
    first = 4 if stem == "imagenet" else 1
    assert [r for _, r in declared] == [first, 2 * first, 4 * first, 8 * first]
    assert model.cam_layer == "layer4" == model.feature_info[-1]["module"]


def test_default_cfg() -> None:
    model = create_model("resnet50", num_classes=10, img_size=(96, 128))
    cfg = model.default_cfg
    assert cfg["input_size"] == (3, 96, 128) and cfg["num_classes"] == 10
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
    assert "He" in cfg["paper"]
    gray = create_model("resnet18", in_chans=1, img_size=32).default_cfg
    assert len(gray["mean"]) == len(gray["std"]) == 1


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_zero_init_residual_blocks_start_as_shortcut(name: str) -> None:
    model = create_model(name, num_classes=4, img_size=32, zero_init_residual=True).eval()
    blocks = [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    assert len(blocks) == (8 if name == "resnet18" else 16)
    for b in blocks:
        last = b.bn2 if isinstance(b, BasicBlock) else b.bn3
        assert torch.count_nonzero(last.weight) == 0
        assert torch.all(b.bn1.weight == 1)
    # The residual branch outputs zero, so each block computes relu(shortcut(x)), with and
    # without a projection shortcut.
    with torch.no_grad():
        for b in (model.layer1[0], model.layer1[1], model.layer2[0]):
            x = torch.randn(2, b.conv1.in_channels, 8, 8)
            shortcut = x if b.downsample is None else b.downsample(x)
            assert torch.allclose(b(x), torch.relu(shortcut))
    default = create_model(name, num_classes=4, img_size=32)
    assert all(torch.all(m.weight == 1) for m in default.modules()
               if isinstance(m, nn.BatchNorm2d))


def test_reset_classifier_and_drop_rate() -> None:
    model = create_model("resnet18", num_classes=10, img_size=32, drop_rate=0.5)
    model.reset_classifier(3)
    assert model.get_classifier().out_features == 3 and model.num_classes == 3
    assert model.default_cfg["num_classes"] == 3
    x = torch.randn(2, 3, 32, 32)
    model.train()
    feats = model.forward_features(x)
    assert not torch.equal(model.forward_head(feats), model.forward_head(feats))
    model.eval()
    assert torch.equal(model.forward_head(feats), model.forward_head(feats))
    with pytest.raises(ValueError, match="drop_rate"):
        create_model("resnet18", drop_rate=1.5)


def test_bad_stem_raises() -> None:
    with pytest.raises(ValueError, match="stem"):
        create_model("resnet18", stem="cifar")


# ---- CIFAR Wide ResNet WRN-d-k ------------------------------------------------------------


def wrn_param_formula(depth: int, k: int, num_classes: int = 10, in_chans: int = 3) -> int:
    """Parameters of WRN-d-k counted by hand.

    Stem conv 3x3 in->16. In a group of width w with n blocks, the first block has
    BN(c) 2c, conv 9cw, BN(w) 2w, conv 9w^2 and a 1x1 projection cw when c != w;
    the other n-1 blocks have 4w + 18w^2. Head: BN 2*64k and a linear 64k*classes + classes.
    """
    n = (depth - 4) // 6
    total = 9 * in_chans * 16
    c = 16
    for w in (16 * k, 32 * k, 64 * k):
        total += 2 * c + 9 * c * w + 2 * w + 9 * w * w + (c * w if c != w else 0)
        total += (n - 1) * (4 * w + 18 * w * w)
        c = w
    return total + 2 * c + c * num_classes + num_classes


@pytest.mark.parametrize("depth, k, paper_millions, digits",
                         [(28, 10, 36.5, 1), (16, 4, 2.75, 2), (40, 4, 8.9, 1), (16, 8, 11.0, 1)])
def test_wrn_parameter_count(depth: int, k: int, paper_millions: float, digits: int) -> None:
    with torch.device("meta"):
        model = create_model("wide_resnet", depth=depth, widen_factor=k)
    count = n_params(model)
    assert count == wrn_param_formula(depth, k)
    # Zagoruyko and Komodakis (2016) print counts in millions to these digits.
    assert round(count / 1e6, digits) == paper_millions


def test_wrn_28_10_exact() -> None:
    assert wrn_param_formula(28, 10) == 36_479_194
    assert abs(36_479_194 - 36.5e6) / 36.5e6 < 0.005
    assert wrn_param_formula(16, 4) == 2_748_890


@pytest.mark.parametrize("depth", [27, 26, 4, 0])
def test_wrn_bad_depth_raises(depth: int) -> None:
    with pytest.raises(ValueError, match="6n"):
        create_model("wide_resnet", depth=depth)


@pytest.mark.parametrize("size", [32, 8])
def test_wrn_forward_and_feature_info(size: int) -> None:
    model = create_model("wide_resnet", depth=10, widen_factor=2, dropout=0.3, in_chans=1,
                         img_size=size)
    assert isinstance(model, WideResNet)
    declared = [(f["num_chs"], f["reduction"]) for f in model.feature_info]
    assert declared == [(32, 1), (64, 2), (128, 4)]
    assert measured_reductions(model, size, in_chans=1) == declared
    with torch.no_grad():
        out = model.eval()(torch.randn(2, 1, size, size))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert model.cam_layer == "relu"
    model.train()
    x = torch.randn(2, 1, size, size)
    assert not torch.equal(model(x), model(x))  # dropout between the convs is active


@pytest.mark.parametrize("attn", list_attn())
def test_wrn_attn(attn: str) -> None:
    with torch.device("meta"):
        plain = create_model("wide_resnet", depth=10, widen_factor=1)
    model = create_model("wide_resnet", depth=10, widen_factor=1, attn=attn).eval()
    blocks = [m for m in model.modules() if hasattr(m, "attn")]
    assert len(blocks) == 3 and all(not isinstance(b.attn, nn.Identity) for b in blocks)
    assert n_params(model) == n_params(plain) + sum(n_params(b.attn) for b in blocks)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 8, 8))
    assert out.shape == (1, 10) and torch.isfinite(out).all()


def test_wrn_reset_classifier() -> None:
    model = create_model("wide_resnet", depth=10, widen_factor=1, num_classes=100)
    assert model.default_cfg["input_size"] == (3, 32, 32)
    model.reset_classifier(5)
    assert model.get_classifier().out_features == 5 == model.default_cfg["num_classes"]
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)


# ---- output_stride: atrous ResNet (Chen et al. 2017; torchvision's replace_stride_with_dilation)

class _Features(nn.Module):
    """``forward = model.forward_features``, so summary() reports layer4's receptive field."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
@pytest.mark.parametrize("output_stride", [16, 8])
def test_output_stride_keeps_layout(name: str, output_stride: int) -> None:
    with torch.device("meta"):
        plain, atrous = create_model(name), create_model(name, output_stride=output_stride)
    plain_sd, atrous_sd = plain.state_dict(), atrous.state_dict()
    assert list(atrous_sd) == list(plain_sd)
    assert all(atrous_sd[k].shape == v.shape for k, v in plain_sd.items())
    assert n_params(atrous) == TORCHVISION_PARAMS[name]


@pytest.mark.parametrize(("output_stride", "reductions", "spatial"),
                         [(32, [4, 8, 16, 32], 2), (16, [4, 8, 16, 16], 4),
                          (8, [4, 8, 8, 8], 8)])
def test_output_stride_spatial_size(output_stride: int, reductions: list[int],
                                    spatial: int) -> None:
    model = create_model("resnet18", img_size=64, stem="imagenet", output_stride=output_stride)
    assert [f["reduction"] for f in model.feature_info] == reductions
    assert [r for _, r in measured_reductions(model, 64)] == reductions
    with torch.no_grad():
        feats = model.eval().forward_features(torch.randn(1, 3, 64, 64))
    assert feats.shape == (1, 512, spatial, spatial)  # os=16 on 64x64: 4x4 layer4 maps


def test_output_stride_small_stem_divides_by_four() -> None:
    model = create_model("resnet18", img_size=32, stem="small", output_stride=16)
    assert [f["reduction"] for f in model.feature_info] == [1, 2, 4, 4]
    assert [r for _, r in measured_reductions(model, 32)] == [1, 2, 4, 4]


def test_output_stride_dilations_follow_torchvision() -> None:
    with torch.device("meta"):
        model = create_model("resnet50", output_stride=8)
    # layer3 becomes dilation 2, layer4 dilation 4; each stage's first block keeps the
    # previous stage's dilation on its 3x3 (torchvision's rule) and no conv strides.
    assert [b.conv2.dilation for b in model.layer3] == [(1, 1)] + [(2, 2)] * 5
    assert [b.conv2.dilation for b in model.layer4] == [(2, 2), (4, 4), (4, 4)]
    assert [b.conv2.padding for b in model.layer4] == [(2, 2), (4, 4), (4, 4)]
    for stage in (model.layer3, model.layer4):
        assert all(m.stride == (1, 1) for m in stage.modules() if isinstance(m, nn.Conv2d))
    assert model.layer2[0].conv2.stride == (2, 2) and model.layer2[0].conv2.dilation == (1, 1)
    assert all(m.dilation == (1, 1) for m in model.layer2.modules() if isinstance(m, nn.Conv2d))
    with torch.device("meta"):
        basic = create_model("resnet18", output_stride=16)
    assert [(b.conv1.dilation, b.conv2.dilation) for b in basic.layer4] == [
        ((1, 1), (2, 2)), ((2, 2), (2, 2))]


def test_output_stride_keeps_receptive_field() -> None:
    from cnnkit.analysis import summary

    # Dilation by the stride it replaces keeps every layer's receptive field: only the
    # jump (distance between output pixels) shrinks.
    fields = {}
    for os_ in (32, 16, 8):
        model = create_model("resnet18", img_size=64, stem="imagenet", output_stride=os_)
        s = summary(_Features(model), (3, 64, 64))
        fields[os_] = (s.receptive_field, s.jump)
    assert fields[32] == (fields[32][0], 32) and fields[16] == (fields[32][0], 16)
    assert fields[8] == (fields[32][0], 8)
    # Analytic: 7 (conv1) + 4 (max-pool at jump 2) + 4*8 (layer1) + 8 + 3*16 (layer2)
    # + 16 + 3*32 (layer3) + 32 + 3*64 (layer4) = 435 pixels.
    assert fields[32][0] == 435


def test_bad_output_stride_raises() -> None:
    with pytest.raises(ValueError, match="output_stride must be 32, 16 or 8"):
        create_model("resnet18", output_stride=4)
