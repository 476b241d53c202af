"""FCN-32s/16s/8s and DeepLabv3/v3+: shapes, strides, mechanisms, published counts, training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cnnkit.models.deeplab  # noqa: F401  (registers the builders)
import cnnkit.models.fcn  # noqa: F401
from cnnkit.analysis import summary
from cnnkit.models import create_model, list_models
from cnnkit.models.deeplab import ASPP, aspp_rates
from cnnkit.models.fcn import BilinearUpsample, bilinear_kernel, learned_upsample

SEGMENTERS = ["fcn32s", "fcn16s", "fcn8s", "deeplabv3", "deeplabv3plus"]
# Small, CPU-cheap configurations of every builder.
SMALL = {
    "fcn32s": dict(backbone="resnet18", img_size=64),
    "fcn16s": dict(backbone="vgg16", img_size=32, stem="small", head_width=16),
    "fcn8s": dict(backbone="resnet18", img_size=64),
    "deeplabv3": dict(backbone="resnet18", img_size=64, stem="imagenet"),
    "deeplabv3plus": dict(backbone="resnet18", img_size=32, stem="small"),
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def conv_params(c_in: int, c_out: int, k: int, bias: bool) -> int:
    return c_in * c_out * k * k + (c_out if bias else 0)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_registered_as_segmenters() -> None:
    assert set(SEGMENTERS) <= set(list_models(task="segment"))
    assert not set(SEGMENTERS) & set(list_models(task="classify"))


@pytest.mark.parametrize("name", SEGMENTERS)
def test_output_shape_and_contract(name: str) -> None:
    model = create_model(name, num_classes=5, **SMALL[name]).eval()
    m, side = model.size_multiple, SMALL[name]["img_size"]
    with torch.no_grad():
        for h, w in [(side, side), (side + 2 * m, side + m)]:  # non-square, any multiple
            out = model(torch.randn(2, 3, h, w))
            assert out.shape == (2, 5, h, w) and torch.isfinite(out).all()
    assert model.task == "segment" and model.scale == 1 and model.num_classes == 5
    assert model.default_cfg["task"] == "segment" and model.default_cfg["num_classes"] == 5
    assert "Chen" in model.default_cfg["paper"] or "Long" in model.default_cfg["paper"]
    for f in model.feature_info:
        model.get_submodule(f["module"])
    model.get_submodule(model.cam_layer)
    # The classifier head of the backbone is gone: only what the dense model runs is kept.
    assert not any(k.startswith(("backbone.model.fc.", "backbone.model.classifier."))
                   for k in model.state_dict())


@pytest.mark.parametrize("name", SEGMENTERS)
def test_summary_runs(name: str) -> None:
    model = create_model(name, num_classes=5, **SMALL[name])
    s = summary(model, (3, 32, 32) if SMALL[name]["img_size"] == 32 else (3, 64, 64))
    assert s.total_macs > 0 and s.total_params == n_params(model)
    assert s.output_shape[1:] == (5, *s.input_size[1:])


# ---- FCN (Long, Shelhamer and Darrell 2015)

def test_bilinear_kernel_is_analytic() -> None:
    row = torch.tensor([0.25, 0.75, 0.75, 0.25])
    assert torch.equal(bilinear_kernel(2), row[:, None] * row[None, :])
    k8 = bilinear_kernel(8)
    assert k8.shape == (16, 16) and torch.allclose(k8.sum(), torch.tensor(64.0))  # factor^2


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_transposed_conv_upsampling_is_bilinear_in_the_interior(factor: int) -> None:
    # A smooth input (no border artefacts from the interpolation itself).
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 9), torch.linspace(0, 1, 11), indexing="ij")
    x = torch.stack([torch.sin(3 * yy) * torch.cos(2 * xx), yy * xx, yy - xx])[None] + 1.0
    ref = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
    with torch.no_grad():
        learned = learned_upsample(3, factor)(x)
        fixed = BilinearUpsample(3, factor)(x)
    assert learned.shape == fixed.shape == ref.shape == (1, 3, 9 * factor, 11 * factor)
    inner = (..., slice(factor, -factor), slice(factor, -factor))  # the border sees zeros
    torch.testing.assert_close(learned[inner], ref[inner], atol=1e-5, rtol=0)
    torch.testing.assert_close(fixed[inner], ref[inner], atol=1e-5, rtol=0)
    assert not torch.allclose(learned[..., 0, 0], ref[..., 0, 0])  # the border does differ


def test_fcn_upsamplers_learned_except_the_last() -> None:
    model = create_model("fcn8s", num_classes=5, backbone="resnet18", img_size=64)
    # Intermediate 2x layers are learned (Caffe layout 5x5x4x4, no bias); the final
    # 8x upsampling stays fixed bilinear, as the paper: it has no parameters.
    assert model.upscore2.weight.shape == (5, 5, 4, 4) and model.upscore2.bias is None
    assert model.upscore2.weight.requires_grad
    assert model.upscore_pool4.weight.shape == (5, 5, 4, 4)
    assert model.upscore.factor == 8 and n_params(model.upscore) == 0
    assert torch.equal(model.upscore2.weight[1, 1], bilinear_kernel(2))
    assert torch.equal(model.upscore2.weight[1, 2], torch.zeros(4, 4))


def _randomise_scores(model: nn.Module) -> None:
    # Larger score weights than the near-zero start, so every skip visibly contributes.
    for name in ("score_fr", "score_pool4", "score_pool3"):
        if hasattr(model, name):
            nn.init.normal_(getattr(model, name).weight, std=0.1)


@pytest.mark.parametrize(("name", "skips"), [("fcn32s", set()), ("fcn16s", {"score_pool4"}),
                                             ("fcn8s", {"score_pool4", "score_pool3"})])
def test_fcn_skip_fusion(name: str, skips: set[str]) -> None:
    model = create_model(name, num_classes=3, backbone="resnet18", img_size=64).eval()
    assert {n for n in ("score_pool4", "score_pool3") if hasattr(model, n)} == skips
    _randomise_scores(model)
    # Each score layer reads its own stride: 1x1 convs on 512 (s32), 256 (s16), 128 (s8).
    assert model.score_fr.in_channels == 512
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        base = model(x)
        for skip in skips:
            conv = getattr(model, skip)
            conv.bias.add_(1.0)
            changed = model(x)
            conv.bias.sub_(1.0)
            assert not torch.allclose(changed, base), skip
    if "score_pool3" in skips:
        assert model.score_pool3.in_channels == 128 and model.score_pool4.in_channels == 256


def test_fcn_fresh_scores_near_zero_but_gradients_flow() -> None:
    model = create_model("fcn8s", num_classes=3, backbone="resnet18", img_size=64).eval()
    for name in ("score_fr", "score_pool4", "score_pool3"):
        conv = getattr(model, name)
        assert conv.weight.std() < 0.02 and torch.equal(conv.bias, torch.zeros(3))
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    model(x).square().mean().backward()
    assert x.grad.abs().sum() > 0


def test_fcn_vgg16_parameter_count_matches_paper() -> None:
    """Long et al. 2015, Table 1: FCN-VGG16 has 134M parameters (21 PASCAL classes)."""
    with torch.device("meta"):
        fcn32, fcn8 = create_model("fcn32s"), create_model("fcn8s")
    # VGG-16's 13 convolutions: torchvision's 138,357,544 minus its three dense layers.
    vgg_convs = 138_357_544 - (25088 * 4096 + 4096 + 4096 * 4096 + 4096 + 4096 * 1000 + 1000)
    assert vgg_convs == 14_714_688
    head = conv_params(512, 4096, 7, True) + conv_params(4096, 4096, 1, True)  # fc6, fc7
    expected32 = vgg_convs + head + conv_params(4096, 21, 1, True)  # + score_fr
    # FCN-8s adds score_pool4, score_pool3 and two learned 4x4 upsamplings (no bias).
    expected8 = (expected32 + conv_params(512, 21, 1, True) + conv_params(256, 21, 1, True)
                 + 2 * 21 * 21 * 4 * 4)
    assert n_params(fcn32) == expected32 == 134_346_581
    assert n_params(fcn8) == expected8 == 134_376_863
    assert round(n_params(fcn32) / 1e6) == round(n_params(fcn8) / 1e6) == 134
    assert fcn32.size_multiple == 32 and fcn32.head[0].kernel_size == (7, 7)


def test_fcn_head_width_and_small_inputs() -> None:
    model = create_model("fcn8s", num_classes=4, backbone="vgg16", img_size=64, head_width=32)
    assert model.head[0].out_channels == 32 and model.head[0].padding == (3, 3)
    with torch.no_grad():  # pool5 is 2x2 here: the padded 7x7 fc6 still works
        assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 4, 64, 64)
    plain = create_model("fcn8s", num_classes=4, backbone="resnet18", img_size=64)
    assert isinstance(plain.head, nn.Identity)  # non-VGG backbones score their last stage


def test_fcn_bad_options_raise() -> None:
    with pytest.raises(ValueError, match="head_width"):
        create_model("fcn8s", backbone="resnet18", img_size=64, head_width=-1)


# ---- DeepLab (Chen et al. 2017, 2018)

@pytest.mark.parametrize(("output_stride", "rates"), [(16, (6, 12, 18)), (8, (12, 24, 36))])
def test_aspp_rates(output_stride: int, rates: tuple[int, int, int]) -> None:
    assert aspp_rates(output_stride) == rates
    with torch.device("meta"):
        model = create_model("deeplabv3", output_stride=output_stride)
    branches = model.aspp.convs
    assert len(branches) == 5  # 1x1, three atrous 3x3, image pooling
    assert branches[0][0].kernel_size == (1, 1)
    assert tuple(b[0].dilation[0] for b in branches[1:4]) == rates
    assert all(b[0].kernel_size == (3, 3) and b[0].padding == b[0].dilation
               for b in branches[1:4])
    assert isinstance(branches[4].pool, nn.AdaptiveAvgPool2d)
    assert model.aspp.project[0][0].in_channels == 5 * 256
    assert model.backbone.reductions[-1] == output_stride


def test_aspp_branch_delta_response() -> None:
    # A delta through the rate-6 branch's convolution lights exactly the 9 taps 6 apart.
    aspp = ASPP(1, (6, 12, 18), out_chs=1)
    conv = aspp.convs[1][0]
    with torch.no_grad():
        conv.weight.fill_(1.0)
        x = torch.zeros(1, 1, 25, 25)
        x[0, 0, 12, 12] = 1.0
        hits = conv(x)[0, 0].nonzero().tolist()
    assert sorted(hits) == sorted([12 + 6 * i, 12 + 6 * j] for i in (-1, 0, 1) for j in (-1, 0, 1))


def test_doubled_rates_keep_the_field_of_view() -> None:
    # The paper doubles the rates at output stride 8 so each branch sees the same image
    # extent: receptive field of the rate-18 (os16) and rate-36 (os8) branches is equal.
    fields = {}
    for os_ in (16, 8):
        model = create_model("deeplabv3", num_classes=3, backbone="resnet18", img_size=64,
                             stem="imagenet", output_stride=os_)
        rows = {r.name: r for r in summary(model, (3, 64, 64)).rows}
        fields[os_] = (rows["aspp.convs.3.0"].receptive_field, rows["aspp.convs.3.0"].jump)
    # ResNet-18's layer4 field is 435 pixels (unchanged by dilation); the last atrous
    # branch adds 2 * rate * stride = 2 * 18 * 16 = 2 * 36 * 8 = 576.
    assert fields[16] == (435 + 576, 16) and fields[8] == (435 + 576, 8)


def test_deeplabv3_parameter_count_against_torchvision() -> None:
    """torchvision's deeplabv3_resnet50 (21 classes) publishes num_params 42,004,074.

    That number (torchvision/models/segmentation/deeplabv3.py, DeepLabV3_ResNet50_Weights)
    includes the auxiliary FCNHead on layer3 and a 3x3 conv-BN-ReLU that torchvision's
    DeepLabHead adds after ASPP; the paper has neither (ASPP projection, then the 1x1
    classifier). Removing both gives the paper's configuration.
    """
    aux = conv_params(1024, 256, 3, False) + 2 * 256 + conv_params(256, 21, 1, True)
    extra_conv = conv_params(256, 256, 3, False) + 2 * 256
    assert aux == 2_365_205
    with torch.device("meta"):
        v3 = create_model("deeplabv3")
        v3plus = create_model("deeplabv3plus")
    assert n_params(v3) == 42_004_074 - aux - extra_conv == 39_048_533
    # v3+: 1x1 reduce to 48 (+BN), two 3x3 convs of 256 (+BN) on 256 + 48 channels.
    decoder = (conv_params(256, 48, 1, False) + 2 * 48 + conv_params(304, 256, 3, False)
               + 2 * 256 + conv_params(256, 256, 3, False) + 2 * 256)
    assert n_params(v3plus) == n_params(v3) + decoder
    assert v3plus.reduce[0].out_channels == 48 and v3plus.backbone.reductions == [4, 16]


def test_deeplabv3plus_decoder_uses_low_level_features() -> None:
    model = create_model("deeplabv3plus", num_classes=3, backbone="resnet18", img_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        base = model(x)
        model.reduce[1].bias.add_(1.0)  # shift the 48 low-level channels
        assert not torch.allclose(model(x), base)


def test_deeplab_trains_with_a_batch_of_one() -> None:
    # The image-pooling branch sees one 1x1 map: plain BatchNorm would raise in training.
    model = create_model("deeplabv3", num_classes=3, backbone="resnet18", img_size=64).train()
    out = model(torch.randn(1, 3, 64, 64))
    out.sum().backward()
    assert out.shape == (1, 3, 64, 64) and model.aspp.convs[4].conv[0].weight.grad is not None


def test_deeplab_bad_options_raise() -> None:
    with pytest.raises(ValueError, match="output_stride must be 16 or 8"):
        create_model("deeplabv3", backbone="resnet18", img_size=32, output_stride=32)
    with pytest.raises(ValueError, match="ResNet backbone"):
        create_model("deeplabv3", backbone="vgg16", img_size=32)


def test_deeplabv3plus_overfits_eight_shapes() -> None:
    from cnnkit.data import load_data

    d = load_data("shapes", n=8, size=32)
    x = d.images.float() / 255.0
    x = (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True)
    y = d.masks.long()
    # The ImageNet stem at 32x32 (decoder on 8x8, ASPP on 2x2): 0.16 GMACs per image.
    # The small stem costs 2.5 GMACs per image (dilated layer4 and the decoder at 32x32),
    # too slow for a unit test on 2 CPU cores; its forward is covered above.
    model = create_model("deeplabv3plus", num_classes=5, backbone="resnet18", img_size=32,
                         stem="imagenet", drop_rate=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        out = model(x)
        loss = F.cross_entropy(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(1.61, abs=0.3)  # ln 5: the classifier starts near uniform
    assert losses[-1] < 0.1 * losses[0]
    pred, shape_pixels = out.argmax(1), y > 0
    # 87% of the pixels are background, so "all background" scores 0.87: beat it clearly,
    # and get most shape pixels (class included) right.
    assert (pred == y).float().mean() > 0.93
    assert (pred[shape_pixels] == y[shape_pixels]).float().mean() > 0.5
