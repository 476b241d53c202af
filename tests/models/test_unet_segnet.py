"""U-Net, 3D U-Net and SegNet: shapes, parameter counts, skips, unpooling indices, training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cnnkit.models.segnet
import cnnkit.models.unet
import cnnkit.models.unet3d  # noqa: F401  (registers the builders)
from cnnkit.analysis import summary
from cnnkit.data import load_data
from cnnkit.layers.attention import SCSE
from cnnkit.models import create_model, model_info
from cnnkit.models._dense import DenseModel
from cnnkit.models.unet import _valid_output


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def meta_model(name: str, **kwargs) -> nn.Module:
    # Parameter counts only: a meta-device build allocates and initialises nothing.
    with torch.device("meta"):
        return create_model(name, **kwargs)


def conv_count(c_in: int, c_out: int, k: int, bias: bool = True) -> int:
    return c_in * c_out * k * k + (c_out if bias else 0)


# Small configurations of every builder, with an input size each, for the contract tests.
SMALL = {
    "unet_small": (dict(num_classes=5), (3, 32, 32)),
    "unet": (dict(num_classes=5, width=4, depth=3, attn="scse"), (3, 32, 32)),
    "unet3d": (dict(num_classes=4, in_chans=1, width=4), (1, 16, 16, 16)),
    "segnet": (dict(num_classes=5, width=8, depth=3), (3, 32, 32)),
}


# --- the shared contract --------------------------------------------------------------------

@pytest.mark.parametrize("name", list(SMALL))
def test_contract_and_summary(name):
    kwargs, size = SMALL[name]
    m = create_model(name, **kwargs)
    assert isinstance(m, DenseModel) and model_info(name).task == "segment"
    assert m.task == "segment" and m.scale == 1 and m.num_classes == kwargs["num_classes"]
    assert m.default_cfg["task"] == "segment" and m.default_cfg["paper"]
    assert len(m.default_cfg["input_size"]) == len(size)
    for s in m.feature_info:
        m.get_submodule(s["module"])  # raises if the name is wrong
    m.get_submodule(m.cam_layer)
    s = summary(m, size)
    assert s.total_macs > 0 and s.total_params == n_params(m)
    assert s.output_shape == (1, kwargs["num_classes"], *size[1:])


@pytest.mark.parametrize("hw", [(32, 32), (64, 64), (32, 48)])
@pytest.mark.parametrize("name", ["unet_small", "segnet"])
def test_output_shape_2d(name, hw):
    kwargs, _ = SMALL[name]
    m = create_model(name, **kwargs).eval()
    assert all(n % m.size_multiple == 0 for n in hw)
    out = m(torch.randn(2, 3, *hw))
    assert out.shape == (2, 5, *hw) and torch.isfinite(out).all()


@pytest.mark.parametrize("dhw", [(16, 16, 16), (8, 16, 24)])
def test_unet3d_output_shape(dhw):
    m = create_model("unet3d", num_classes=4, in_chans=1, width=4).eval()
    assert m(torch.randn(1, 1, *dhw)).shape == (1, 4, *dhw)
    assert m.size_multiple == 8 and m.default_cfg["input_size"] == (1, 112, 128, 128)


@pytest.mark.parametrize("stem", ["small", "imagenet"])
def test_unet_on_resnet18_backbone(stem):
    m = create_model("unet", num_classes=5, backbone="resnet18", stem=stem, img_size=32).eval()
    assert m.size_multiple == (8 if stem == "small" else 32)
    for n in (32, 64):
        assert m(torch.randn(2, 3, n, n)).shape == (2, 5, n, n)
    # The backbone keeps torchvision's key names, so ImageNet checkpoints load.
    keys = set(m.state_dict())
    assert "encoder.model.layer4.1.conv2.weight" in keys and "encoder.model.conv1.weight" in keys
    assert [s["module"] for s in m.feature_info] == [f"encoder.model.layer{i}" for i in range(1, 5)]


def test_unet_on_backbone_with_two_stages_at_one_stride():
    # vgg16_bn's small stem has two stages at stride 1: a 1x1 conv joins them, no upsampling.
    m = create_model("unet", num_classes=3, backbone="vgg16_bn", stem="small", img_size=32).eval()
    assert m.encoder.reductions == [1, 1, 2, 4, 8]
    assert isinstance(m.up[-1], nn.Conv2d) and m.up[-1].kernel_size == (1, 1)
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 3, 32, 32)


def test_bad_options_raise():
    with pytest.raises(ValueError, match="norm"):
        create_model("unet", norm="group")
    with pytest.raises(ValueError, match="depth"):
        create_model("segnet", depth=6)
    with pytest.raises(ValueError, match="padding=False"):
        create_model("unet", backbone="resnet18", padding=False)


# --- U-Net ----------------------------------------------------------------------------------

def unet_analytic(in_chans: int, classes: int, width: int, depth: int) -> int:
    """Parameters of the plain (no-norm, biased) U-Net, derived from the paper's Fig. 1."""
    chans = [width * 2 ** i for i in range(depth + 1)]
    total = 0
    for c_in, c in zip([in_chans, *chans[:-1]], chans, strict=True):  # contracting path
        total += conv_count(c_in, c, 3) + conv_count(c, c, 3)
    for c in chans[:-1]:  # expanding path: 2x2 upconv 2c -> c, then 3x3 on the concat 2c -> c
        total += conv_count(2 * c, c, 2) + conv_count(2 * c, c, 3) + conv_count(c, c, 3)
    return total + conv_count(chans[0], classes, 1)


def test_unet_paper_parameter_count():
    # The paper's network (1 input channel, 2 classes, width 64, depth 4, no norm) with
    # padding: 31,030,658 parameters. zhixuhao/unet, the widely used Keras port, reports
    # 31,031,685: the same layers (its 2x2 "up-conv" is a 2x2 conv after upsampling, with
    # the transposed conv's count) but a 3x3 conv 64 -> 2 (1,154) and a 1x1 conv 2 -> 1
    # (3) instead of our 1x1 conv 64 -> 2 (130).
    m = meta_model("unet", in_chans=1, num_classes=2, norm=None)
    assert n_params(m) == unet_analytic(1, 2, 64, 4) == 31_030_658
    assert n_params(m) == 31_031_685 - 1_154 - 3 + 130
    # Valid convolutions do not change the count.
    assert n_params(meta_model("unet", in_chans=1, norm=None, padding=False)) == 31_030_658


def test_unet_batchnorm_parameter_count():
    # BN replaces each 3x3 conv's bias by a scale and a shift: +1 parameter per channel.
    chans = [64 * 2 ** i for i in range(5)]
    bn_channels = 2 * sum(chans) + 2 * sum(chans[:-1])
    assert n_params(meta_model("unet", in_chans=1)) == 31_030_658 + bn_channels


def test_unet_paper_tile_and_overlap_tile():
    # Fig. 1: a 572x572 tile gives a 388x388 output with valid convolutions.
    assert _valid_output(572, 4) == 388
    assert _valid_output(570, 4) is None  # 566 is even but 283 is odd at the next pooling
    m = create_model("unet", in_chans=1, num_classes=3, width=4, depth=2, norm=None,
                     padding=False).eval()
    assert m.border == 12 * 4 - 8
    for hw in [(32, 32), (24, 40)]:
        assert m(torch.randn(1, 1, *hw)).shape == (1, 3, *hw)


def test_unet_valid_output_is_aligned_with_input():
    # Overlap-tile: output pixel (i, j) must be centred on input pixel (i, j). An impulse
    # changes the output only inside the receptive field around it (valid convolutions,
    # so no border effects reach the centre).
    m = create_model("unet", in_chans=1, num_classes=2, width=4, depth=2, norm=None,
                     padding=False).eval()
    with torch.no_grad():
        for p in m.parameters():  # positive weights: the impulse propagates everywhere
            p.copy_(p.abs())
        x = torch.zeros(1, 1, 96, 96)
        base = m(x)
        x[0, 0, 48, 48] = 1.0
        diff = (m(x) - base).abs().sum((0, 1))
    rows = diff.sum(1).nonzero().flatten()
    cols = diff.sum(0).nonzero().flatten()
    field = 13 * 4 - 8  # receptive field of the depth-2 U-Net
    for idx in (rows, cols):
        lo, hi = idx.min().item(), idx.max().item()
        assert hi - lo + 1 <= field
        assert abs((lo + hi) / 2 - 48) <= 2  # centred up to the pooling's parity


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_unet_receptive_field_covers_full_depth(depth):
    # Through the bottleneck: 3x3 convs add 4 * 2**i (encoder, decoder) and 4 * 2**depth,
    # pools 2**i, 2x2 upconvs nothing: 1 + 9 (2**d - 1) + 4 * 2**d = 13 * 2**d - 8.
    # Without the deepest level the field would stop at 13 * 2**(d-1) - 8.
    m = create_model("unet", depth=depth, width=4)
    s = summary(m, (3, 64, 64))
    assert s.receptive_field == 13 * 2 ** depth - 8 and s.jump == 1
    assert m.size_multiple == 2 ** depth


def test_unet_skips_are_used():
    m = create_model("unet_small", num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    ref = m(x)
    for k, block in enumerate(m.decoder):
        skip_chs = m.feature_info[len(m.decoder) - 1 - k]["num_chs"]
        assert block.conv1.in_channels == 2 * skip_chs  # concatenation, not addition
        for half in ("skip", "up"):
            def zero(_m, args, half=half, c=skip_chs):
                y = args[0].clone()
                if half == "skip":
                    y[:, :c] = 0
                else:
                    y[:, c:] = 0
                return (y,)

            h = block.register_forward_pre_hook(zero)
            try:
                out = m(x)
            finally:
                h.remove()
            assert (out - ref).abs().max() > 1e-4, (k, half)
    assert torch.equal(m(x), ref)  # hooks gone


def test_unet_scse_blocks_and_parameters():
    width, depth = 8, 3
    plain = create_model("unet", width=width, depth=depth)
    gated = create_model("unet", width=width, depth=depth, attn="scse")
    chans = [width * 2 ** i for i in range(depth + 1)]
    gated_chs = chans + chans[:-1]  # after every encoder block (bottleneck too) and decoder block
    assert [m.cse.fc2.out_channels for m in gated.modules() if isinstance(m, SCSE)] == \
        chans + chans[-2::-1]
    # cSE: C -> C/2 -> C 1x1 convs with biases; sSE: C -> 1 1x1 conv with bias.
    extra = sum(conv_count(c, c // 2, 1) + conv_count(c // 2, c, 1) + conv_count(c, 1, 1)
                for c in gated_chs)
    assert n_params(gated) - n_params(plain) == extra
    assert isinstance(gated.encoder[0].attn, SCSE) and isinstance(gated.decoder[-1].attn, SCSE)
    assert isinstance(plain.encoder[0].attn, nn.Identity)


def test_unet_small_overfits_eight_shapes():
    d = load_data("shapes", n=8, image_size=32)
    x = d.images.float() / 255
    x = (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True)
    y = d.masks.long()
    m = create_model("unet_small", num_classes=5)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = F.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0]


# --- 3D U-Net -------------------------------------------------------------------------------

def test_unet3d_paper_channels_and_parameter_count():
    m = meta_model("unet3d", width=32)  # 3 input channels, 3 labels, depth 3: the paper's
    assert [(b.conv1.out_channels, b.conv2.out_channels) for b in m.encoder] == \
        [(32, 64), (64, 128), (128, 256), (256, 512)]
    assert [b.conv1.in_channels for b in m.decoder] == [512 + 256, 256 + 128, 128 + 64]
    assert [u.out_channels for u in m.up] == [512, 256, 128]
    # The paper: "The architecture has 19069955 parameters in total." That count has one
    # bias per 3x3x3 conv channel and no upconv biases; ours has BN's scale and shift
    # instead of the bias, and biased upconvs.
    bn = sum(n_params(x) for x in m.modules() if isinstance(x, nn.BatchNorm3d))
    conv_chs = sum(b.conv1.out_channels + b.conv2.out_channels for b in [*m.encoder, *m.decoder])
    up_bias = sum(u.bias.numel() for u in m.up)
    assert bn == 2 * conv_chs
    assert n_params(m) - bn + conv_chs - up_bias == 19_069_955


def test_unet3d_rejects_images():
    m = create_model("unet3d", in_chans=1, width=4)
    with pytest.raises(ValueError, match="D, H, W"):
        m(torch.randn(1, 1, 16, 16))


# --- SegNet ---------------------------------------------------------------------------------

def test_segnet_encoder_matches_vgg16_bn_features():
    vgg = meta_model("vgg16_bn").features.state_dict()
    seg = meta_model("segnet").encoder.state_dict()
    assert list(seg) == list(vgg)
    assert all(seg[k].shape == vgg[k].shape for k in vgg)
    pools = [i for i, m in enumerate(meta_model("segnet").encoder) if isinstance(m, nn.MaxPool2d)]
    assert pools == [6, 13, 23, 33, 43]  # torchvision's pool indices in vgg16_bn.features


def test_segnet_parameter_count():
    # Decoder: the 13 encoder convs mirrored (a stage's last conv narrows to the next
    # stage's width), every one with BN except the last, the 3x3 classifier (Caffe model).
    classes = 11
    dec = [(512, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 256),
           (256, 256), (256, 256), (256, 128), (128, 128), (128, 64), (64, 64)]
    decoder = sum(conv_count(a, b, 3) + 2 * b for a, b in dec) + conv_count(64, classes, 3)
    encoder = 14_723_136  # torchvision vgg16_bn features (14,714,688 convs + 8,448 BN)
    m = meta_model("segnet", num_classes=classes)
    assert n_params(m.encoder) == encoder and n_params(m.decoder) == decoder
    assert n_params(m) == encoder + decoder == 29_449_355


def test_segnet_unpooling_uses_encoder_argmax():
    # One stage: conv-BN-ReLU x2, pool with indices | unpool, conv-BN-ReLU, classifier.
    m = create_model("segnet", num_classes=3, width=4, depth=1).eval()
    assert isinstance(m.encoder[-1], nn.MaxPool2d) and m.encoder[-1].return_indices
    # A hand-made map replaces the pool's input: in every 2x2 window one known position
    # holds the maximum (2 + u), the three others less than 1.
    c, h, w = 4, 8, 8
    fmap = torch.rand(1, c, h, w, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(1, c, h, w, dtype=torch.bool)
    for ch in range(c):
        for a in range(h // 2):
            for b in range(w // 2):
                mask[0, ch, 2 * a + (a + ch) % 2, 2 * b + (a * b + ch) % 2] = True
    fmap[mask] += 2.0
    expected = torch.where(mask, fmap, torch.zeros(()))
    seen = {}
    handles = [m.encoder[-2].register_forward_hook(lambda _m, _i, _o: fmap),
               m.decoder[0][0].register_forward_pre_hook(
                   lambda _m, args: seen.setdefault("decoder_in", args[0].clone()))]
    try:
        out = m(torch.zeros(1, 3, h, w))
    finally:
        for hd in handles:
            hd.remove()
    # The decoder's first conv sees every pooled value exactly at its argmax, zeros elsewhere.
    assert torch.equal(seen["decoder_in"], expected)
    assert out.shape == (1, 3, h, w)
    assert not any(isinstance(x, (nn.ConvTranspose2d, nn.Upsample)) for x in m.modules())


def test_segnet_odd_sizes_are_restored():
    # The unpooling takes the pre-pool size, so odd sizes survive the round trip.
    m = create_model("segnet", num_classes=2, width=4, depth=3).eval()
    assert m(torch.randn(1, 3, 45, 61)).shape == (1, 2, 45, 61)
