"""Layer types by number of spatial dimensions, the builders' input-size helper, and the
recalibration blocks in 1D and 3D against matrix-form references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.layers import create_attn, list_attn, nd, resolve_input_size, spatial_dims

# The table the module must reproduce, written out by hand.
EXPECTED = {
    "conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d),
    "conv_transpose": (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d),
    "batch_norm": (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d),
    "instance_norm": (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d),
    "max_pool": (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d),
    "avg_pool": (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d),
    "adaptive_avg_pool": (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d),
    "adaptive_max_pool": (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d),
    "max_unpool": (nn.MaxUnpool1d, nn.MaxUnpool2d, nn.MaxUnpool3d),
    "dropout": (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d),
}


@pytest.mark.parametrize("name", list(EXPECTED))
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_layer_types(name: str, dims: int) -> None:
    assert getattr(nd, name)(dims) is EXPECTED[name][dims - 1]


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_types_accept_their_own_rank_only(dims: int) -> None:
    x = torch.randn(2, 4, *(6,) * dims)
    assert nd.conv(dims)(4, 5, 3, padding=1)(x).shape == (2, 5, *(6,) * dims)
    assert nd.max_pool(dims)(2)(x).shape == (2, 4, *(3,) * dims)
    # interp_mode is the mode F.interpolate accepts for this rank (and only for it).
    assert F.interpolate(x, scale_factor=2, mode=nd.interp_mode(dims)).shape[2:] == (12,) * dims
    other = torch.randn(2, 4, *(6,) * (dims % 3 + 1))
    with pytest.raises((NotImplementedError, ValueError)):
        F.interpolate(other, scale_factor=2, mode=nd.interp_mode(dims))
    assert nd.spatial_axes(x) == tuple(range(2, 2 + dims))


@pytest.mark.parametrize("bad", [0, 4, -1, "2", 2.0, True, None])
def test_unknown_dims_name_the_valid_ones(bad: object) -> None:
    for factory in (nd.conv, nd.batch_norm, nd.interp_mode, nd.check_dims):
        with pytest.raises(ValueError, match="1, 2 or 3"):
            factory(bad)


@pytest.mark.parametrize(("kwargs", "expected"), [
    (dict(input_size=(1, 100)), (1, (100,))),
    (dict(input_size=[3, 32, 48]), (3, (32, 48))),
    (dict(input_size=torch.Size([2, 8, 16, 16])), (2, (8, 16, 16))),
    (dict(), (3, (224, 224))),
    (dict(in_chans=1), (1, (224, 224))),
    (dict(img_size=32), (3, (32, 32))),
    (dict(img_size=(64,), in_chans=12), (12, (64,))),
    (dict(img_size=[8, 16, 16]), (3, (8, 16, 16))),
    (dict(input_size=(1, 8, 8, 8), in_chans=1, img_size=8), (1, (8, 8, 8))),
    (dict(input_size=(1, 8, 16), img_size=(8, 16)), (1, (8, 16))),
    (dict(img_size=16, default=(1, 112, 128, 128)), (1, (16, 16, 16))),  # a cube in 3D
])
def test_resolve_input_size(kwargs: dict, expected: tuple) -> None:
    assert resolve_input_size(**kwargs) == expected


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(input_size=(3, 8, 8, 8, 8)), "4 spatial dims"),
    (dict(input_size=(3,)), "0 spatial dims"),
    (dict(input_size=(3, 0, 8)), "positive int, got 0"),
    (dict(input_size=(3, 8.0, 8)), "positive int"),
    (dict(input_size=(True, 8, 8)), "positive int"),
    (dict(input_size="3x8x8"), "sequence of ints"),
    (dict(img_size=(8, 8, 8, 8)), "4 entries"),
    (dict(img_size=-2), "positive int, got -2"),
    (dict(in_chans=0), "in_chans must be a positive int"),
    (dict(input_size=(3, 8, 8), in_chans=1), "in_chans=1 disagrees"),
    (dict(input_size=(3, 8, 8), img_size=16), "img_size=16 disagrees"),
    (dict(input_size=(3, 8, 8), img_size=(8, 8, 8)), "disagrees"),
    (dict(input_size=(3, 64), dims=(2,), family="lenet5"), "lenet5 is built in 2D only, not 1D"),
    (dict(img_size=(4, 4), dims=(3,), family="3D U-Net"), "3D U-Net is built in 3D only"),
])
def test_resolve_input_size_errors_are_one_line(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match) as err:
        resolve_input_size(**kwargs)
    assert "\n" not in str(err.value)


def test_spatial_dims() -> None:
    assert [spatial_dims(s) for s in [(1, 5), (3, 4, 4), (2, 3, 4, 5)]] == [1, 2, 3]
    with pytest.raises(ValueError, match="give \\(C, L\\), \\(C, H, W\\) or \\(C, D, H, W\\)"):
        spatial_dims((1, 2, 3, 4, 5))


# --- recalibration blocks in every number of dimensions ----------------------------------

def _input(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (0.5 + torch.rand(*shape, generator=g, dtype=torch.float64)) * \
        torch.where(torch.rand(*shape, generator=g) < 0.5, -1.0, 1.0).double()


@pytest.mark.parametrize("name", list_attn())
@pytest.mark.parametrize("spatial", [(7,), (3, 4, 5)])
def test_blocks_in_1d_and_3d(name: str, spatial: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    block = create_attn(name, 16)
    x = torch.randn(2, 16, *spatial, requires_grad=True)
    out = block(x)
    assert out.shape == x.shape
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters())


@pytest.mark.parametrize("name", [n for n in list_attn() if n != "ela"])
def test_a_volume_of_depth_one_is_the_image(name: str) -> None:
    # Channel gates come from means over all positions and sSE gates each position alone,
    # so an image and the same image as a volume of depth 1 (or a 1 x W image as a
    # signal) are gated alike. (ELA adds one factor per axis, so it is checked below.)
    torch.manual_seed(0)
    block = create_attn(name, 12).double().eval()
    x = _input(2, 12, 5, 6)
    with torch.no_grad():
        torch.testing.assert_close(block(x[:, :, None]), block(x)[:, :, None])
        torch.testing.assert_close(block(x[:, :, :1]), block(x[:, :, 0])[:, :, None])


def test_se_3d_matches_matrix_form() -> None:
    block = create_attn("se", 32, reduction=4).double().eval()
    x = _input(3, 32, 2, 3, 4)
    w1, b1 = block.fc1.weight.flatten(1), block.fc1.bias
    w2, b2 = block.fc2.weight.flatten(1), block.fc2.bias
    s = x.flatten(2).mean(2)  # [N, C]
    gate = torch.sigmoid(torch.relu(s @ w1.T + b1) @ w2.T + b2)
    with torch.no_grad():
        torch.testing.assert_close(block(x), x * gate[:, :, None, None, None])


def test_sse_1d_is_a_per_position_gate() -> None:
    block = create_attn("sse", 8).double().eval()
    x = _input(2, 8, 11)
    w, b = block.conv.weight.flatten(), block.conv.bias
    gate = torch.sigmoid(torch.einsum("ncl,c->nl", x, w) + b)  # [N, L]
    with torch.no_grad():
        torch.testing.assert_close(block(x), x * gate[:, None])


@pytest.mark.parametrize("spatial", [(9,), (4, 5, 6)])
def test_ela_is_a_product_of_per_axis_strip_gates(spatial: tuple[int, ...]) -> None:
    # Reference written from the paper's recipe: per axis, the mean over the other axes,
    # the shared depthwise Conv1d, GroupNorm and sigmoid; the gate is their product.
    torch.manual_seed(0)
    block = create_attn("ela", 16, kernel_size=3).double().eval()
    x = _input(2, 16, *spatial)
    conv, gn = block.conv, block.gn
    gate = torch.ones_like(x)
    axes = list(range(2, x.ndim))
    for axis in axes:
        others = [a for a in axes if a != axis]
        strip = x.mean(others) if others else x
        g = torch.sigmoid(F.group_norm(F.conv1d(strip, conv.weight, padding=1, groups=16),
                                       gn.num_groups, gn.weight, gn.bias, gn.eps))
        shape = [2, 16] + [x.shape[a] if a == axis else 1 for a in axes]
        gate = gate * g.reshape(shape)
    with torch.no_grad():
        torch.testing.assert_close(block(x), x * gate)
