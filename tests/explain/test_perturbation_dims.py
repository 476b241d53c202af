"""Occlusion and layer masking on signals and volumes, against hand-written loops."""

from __future__ import annotations

import itertools

import pytest
import torch
from nd_nets import gap_net, inputs
from torch import nn

from cnnkit.explain import create
from cnnkit.explain.layer_masking import layer_masked_forward, neighbour_pad


def _hand_occlusion(model: nn.Module, x: torch.Tensor, target: int, starts: list[list[int]],
                    window: tuple[int, ...], baseline: float) -> torch.Tensor:
    """Occlusion by the definition, one occluded input per forward: each element's mean drop
    of the target score over the windows covering it. ``starts``: per axis, by hand."""
    maps = torch.zeros(x.shape[0], *x.shape[2:], dtype=x.dtype)
    count = torch.zeros(x.shape[2:], dtype=x.dtype)
    with torch.no_grad():
        for b in range(x.shape[0]):
            full = model(x[b:b + 1])[0, target]
            for corner in itertools.product(*starts):
                box = tuple(slice(i, i + w) for i, w in zip(corner, window, strict=True))
                hidden = x[b:b + 1].clone()
                hidden[(0, slice(None), *box)] = baseline
                maps[(b, *box)] += full - model(hidden)[0, target]
                if b == 0:
                    count[box] += 1
    return maps / count


def _tiny(dims: int, length: int) -> nn.Module:
    torch.manual_seed(4)
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
    return nn.Sequential(conv(2, 3, 2), nn.ReLU(), nn.Flatten(),
                         nn.Linear(length, 3)).double().eval()


def test_occlusion_1d_equals_the_hand_loop():
    x = torch.randn(2, 2, 12, dtype=torch.float64)
    model = _tiny(1, 3 * 11)
    got = create("occlusion", model, window=3, stride=2, baseline=0.5,
                 internal_batch_size=4)(x, 1)
    # every 2, then 9: the window flush with the end
    expect = _hand_occlusion(model, x, 1, [[0, 2, 4, 6, 8, 9]], (3,), 0.5)
    assert got.shape == (2, 12)
    torch.testing.assert_close(got, expect)
    assert (expect != 0).all()


def test_occlusion_3d_windows_and_strides_per_axis_equal_the_hand_loop():
    x = torch.randn(1, 2, 3, 4, 5, dtype=torch.float64)
    model = _tiny(3, 3 * 2 * 3 * 4)
    got = create("occlusion", model, window=(1, 2, 3), stride=(1, 2, 2))(x, 2)
    expect = _hand_occlusion(model, x, 2, [[0, 1, 2], [0, 2], [0, 2]], (1, 2, 3), 0.0)
    assert got.shape == (1, 3, 4, 5)
    torch.testing.assert_close(got, expect)
    # an int is every axis: (2, 2, 2) windows every (1, 1, 1), the last flush per axis
    cube = create("occlusion", model, window=2, stride=1)(x, 2)
    torch.testing.assert_close(cube, _hand_occlusion(model, x, 2, [[0, 1], [0, 1, 2],
                                                                   [0, 1, 2, 3]], (2, 2, 2), 0))


def test_window_sizes_must_fit_the_input_dims():
    net = gap_net(1)
    occ = create("occlusion", net, window=(2, 2), stride=1)
    with pytest.raises(ValueError, match=r"window \(2, 2\) has 2 sizes but the input has 1 "
                                         r"spatial dims; give an int \(every axis\) or 1 sizes"):
        occ(inputs(1), 0)
    occ = create("occlusion", gap_net(3), window=2, stride=(1, 2))
    with pytest.raises(ValueError, match=r"stride \(1, 2\) has 2 sizes .* has 3 spatial dims"):
        occ(inputs(3), 0)
    with pytest.raises(ValueError, match="window must be positive"):
        create("occlusion", net, window=(2, 0))
    with pytest.raises(ValueError, match="stride must be positive"):
        create("occlusion", net, stride=(1, 1, 1, 1))
    with pytest.raises(ValueError, match=r"stride \(4,\) is longer than the window \(3,\)"):
        create("occlusion", net, window=3, stride=4)(inputs(1), 0)  # 3 of 12 never hidden


@pytest.mark.parametrize("dims", [1, 3])
def test_layer_masking_all_visible_is_the_plain_forward(dims):
    net, x = gap_net(dims), inputs(dims)
    with torch.no_grad():
        plain = net(x)
        masked = layer_masked_forward(net, x, torch.ones(x.shape[2:]))
    torch.testing.assert_close(masked, plain)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())


@pytest.mark.parametrize("dims", [1, 3])
def test_hidden_elements_do_not_influence_the_output(dims):
    net, x = gap_net(dims), inputs(dims)
    mask = torch.ones(x.shape[2:])
    hidden = (slice(1, 4),) * dims
    mask[hidden] = 0
    changed = x.clone()
    changed[(slice(None), slice(None), *hidden)] += 10 * torch.randn_like(
        changed[(slice(None), slice(None), *hidden)])
    with torch.no_grad():
        a = layer_masked_forward(net, x, mask)
        b = layer_masked_forward(net, changed, mask[None].expand(2, *mask.shape))
        plain = net(changed)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(plain, net(x))  # without the mask the change shows


def test_neighbour_pad_1d_and_3d_by_hand():
    x = torch.tensor([[[1.0, 2.0, 7.0, 9.0, 5.0]]], dtype=torch.float64)
    mask = torch.tensor([[[1.0, 1.0, 0.0, 0.0, 1.0]]], dtype=torch.float64)
    # one round: 2 -> mean of its visible neighbours {2}, 3 -> {5}; hidden values never used
    assert neighbour_pad(x, mask, 1).tolist() == [[[1.0, 2.0, 2.0, 5.0, 5.0]]]
    vol = torch.zeros(1, 1, 3, 3, 3, dtype=torch.float64)
    vol[0, 0, 0, 0, 0], vol[0, 0, 2, 2, 2] = 4.0, 8.0
    vis = torch.zeros_like(vol)
    vis[0, 0, 0, 0, 0] = vis[0, 0, 2, 2, 2] = 1
    out = neighbour_pad(vol, vis, 1)
    assert out[0, 0, 1, 1, 1] == 6.0  # the centre touches both corners of the 3x3x3 cube
    assert out[0, 0, 0, 1, 1] == 4.0 and out[0, 0, 2, 1, 2] == 8.0 and out[0, 0, 0, 2, 0] == 0


def test_masks_must_have_the_inputs_spatial_shape():
    net, x = gap_net(3), inputs(3)
    with pytest.raises(ValueError, match=r"mask of shape \(4, 6\) does not fit inputs"):
        layer_masked_forward(net, x, torch.ones(4, 6))
    assert all(not m._forward_pre_hooks for m in net.modules())
