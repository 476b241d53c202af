"""Layer masking (Balasubramanian and Feizi 2023) and occlusion with masking="layer"."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import cnnkit
from cnnkit.explain.layer_masking import layer_masked_forward, layer_masking, neighbour_pad


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
               for m in model.modules())


@pytest.fixture
def tinyvgg() -> nn.Module:
    torch.manual_seed(0)
    return cnnkit.create_model("tinyvgg", num_classes=4, img_size=16).double().eval()


def _edge_model() -> nn.Module:
    """Two horizontal-derivative filters (+ and -) without padding, ReLU, global mean: a
    uniform image scores exactly 0, any vertical edge scores > 0."""
    conv = nn.Conv2d(1, 2, 3, padding=0, bias=False)
    k = torch.tensor([[-1.0, 0.0, 1.0]] * 3)
    with torch.no_grad():
        conv.weight.copy_(torch.stack([k, -k])[:, None])
    return nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).double().eval()


def test_all_ones_mask_is_the_plain_forward(tinyvgg):
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    ref = tinyvgg(x)
    out = layer_masked_forward(tinyvgg, x, torch.ones(16, 16))
    assert torch.equal(out, ref)
    assert _no_hooks(tinyvgg)
    resnet = cnnkit.create_model("resnet18", num_classes=3, img_size=32).double().eval()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    assert torch.equal(layer_masked_forward(resnet, x, torch.ones(1, 32, 32)), resnet(x))
    assert _no_hooks(resnet)


def test_hidden_region_is_zero_at_every_masked_layer(tinyvgg):
    # Hide columns 0..11 of 16. A 3x3/pad-1 conv keeps an output column visible when any
    # of its 3 input columns is, so the hidden band shrinks by one column per conv and a
    # 2x2 pool keeps column j hidden iff columns 2j and 2j+1 both are:
    # conv 0..10, conv 0..9, pool 0..4, conv 0..3, conv 0..2, pool 0..0.
    hidden_cols = {"features.conv_1_1": 11, "features.conv_1_2": 10, "features.max_pool_1": 5,
                   "features.conv_2_1": 4, "features.conv_2_2": 3, "features.max_pool_2": 1}
    mask = torch.ones(16, 16)
    mask[:, :12] = 0
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64) + 1.0  # strictly positive input
    seen: dict[str, torch.Tensor] = {}
    with layer_masking(tinyvgg, mask):
        # registered after the masking hooks, so these see the masked outputs
        handles = [tinyvgg.get_submodule(n).register_forward_hook(
            lambda _m, _i, o, n=n: seen.__setitem__(n, o.clone())) for n in hidden_cols]
        tinyvgg(x)
        for h in handles:
            h.remove()
    for name, ncols in hidden_cols.items():
        act = seen[name]
        assert act[..., :ncols].abs().max() == 0, name
    # and not everything is zero: the visible part still carries signal
    assert seen["features.conv_1_1"][..., 11:].abs().sum() > 0
    assert _no_hooks(tinyvgg)


def test_hidden_pixels_do_not_influence_the_output(tinyvgg):
    # What is hidden must not matter: changing hidden pixels leaves the output unchanged.
    mask = torch.ones(16, 16)
    mask[3:11, 2:9] = 0
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    y = x.clone()
    y[..., 3:11, 2:9] = torch.randn(2, 3, 8, 7, dtype=torch.float64) * 10
    a, b = layer_masked_forward(tinyvgg, x, mask), layer_masked_forward(tinyvgg, y, mask)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert not torch.allclose(tinyvgg(x), tinyvgg(y))


def test_occluder_edge_no_response_with_layer_masking():
    model = _edge_model()
    x = torch.ones(1, 1, 12, 12, dtype=torch.float64)
    mask = torch.ones(12, 12)
    mask[4:8, 4:8] = 0
    assert model(x).abs().max() == 0  # uniform image: no edge
    grey = x.clone()
    grey[..., 4:8, 4:8] = 0.5
    assert model(grey).min() > 0  # the grey square's edges respond
    assert layer_masked_forward(model, x, mask).abs().max() == 0
    assert _no_hooks(model)


def test_neighbour_pad_fills_from_visible_neighbours():
    x = torch.arange(16, dtype=torch.float64).view(1, 1, 4, 4)
    mask = torch.ones(1, 1, 4, 4, dtype=torch.float64)
    mask[..., 1, 1] = 0
    out = neighbour_pad(x, mask, 1)
    nb = [0, 1, 2, 4, 6, 8, 9, 10]  # the 8 visible neighbours of pixel (1, 1)
    assert out[0, 0, 1, 1] == pytest.approx(sum(nb) / 8)
    keep = mask.bool()
    assert torch.equal(out[keep], x[keep])


def test_occlusion_layer_masking_matches_manual_scores(tinyvgg):
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    occ = cnnkit.explain.create("occlusion", tinyvgg, window=8, stride=8, masking="layer")
    tinyvgg.train()
    tinyvgg.fc.weight.requires_grad_(False)
    maps = occ(x, [[0, 2]])
    assert maps.shape == (1, 2, 16, 16)
    assert tinyvgg.training and not tinyvgg.fc.weight.requires_grad
    tinyvgg.eval().fc.weight.requires_grad_(True)
    assert _no_hooks(tinyvgg)
    base = tinyvgg(x)
    for i in (0, 8):
        for j in (0, 8):
            mask = torch.ones(16, 16)
            mask[i:i + 8, j:j + 8] = 0
            drop = base - layer_masked_forward(tinyvgg, x, mask)
            torch.testing.assert_close(maps[0, :, i + 3, j + 3], drop[0, [0, 2]])
    # K targets at once equal single-target calls
    single = occ(x, 2)
    torch.testing.assert_close(maps[:, 1], single)


def test_occlusion_layer_vs_input_masking_on_edge_model():
    model = _edge_model()
    x = torch.ones(2, 1, 12, 12, dtype=torch.float64)
    layer = cnnkit.explain.create("occlusion", model, window=4, stride=4, masking="layer")
    grey = cnnkit.explain.create("occlusion", model, window=4, stride=4, baseline=0.5)
    assert layer(x, 0).abs().max() == 0
    assert grey(x, 0).abs().max() > 0


def test_bad_mask_and_option_raise(tinyvgg):
    with pytest.raises(ValueError, match="mask of shape"):
        layer_masked_forward(tinyvgg, torch.rand(1, 3, 16, 16, dtype=torch.float64),
                             torch.ones(8, 8))
    assert _no_hooks(tinyvgg)
    with pytest.raises(ValueError, match="masking must be"):
        cnnkit.explain.create("occlusion", tinyvgg, masking="grey")
