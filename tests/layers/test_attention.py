"""Recalibration blocks: each block's defining property, checked against an independent
reference or an invariant, plus registry behaviour and shape/gradient checks over every name."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cnnkit.layers import (
    ECA,
    ELA,
    SCSE,
    ChannelSE,
    SpatialSE,
    SqueezeExcite,
    create_attn,
    eca_kernel_size,
    list_attn,
    register_attn,
)


def _input(*shape: int, seed: int = 0) -> torch.Tensor:
    """Double-precision input bounded away from zero, so ``out / x`` recovers the gate."""
    g = torch.Generator().manual_seed(seed)
    magnitude = 0.5 + torch.rand(*shape, generator=g, dtype=torch.float64)
    sign = torch.where(torch.rand(*shape, generator=g) < 0.5, -1.0, 1.0).double()
    return magnitude * sign


def _gate(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return block(x) / x


# --- registry -----------------------------------------------------------------------------

def test_list_attn_names():
    assert list_attn() == ["cse", "eca", "ela", "scse", "se", "sse"]


@pytest.mark.parametrize("name", [None, "none", "None"])
def test_create_attn_none_is_identity(name):
    assert isinstance(create_attn(name, 16), nn.Identity)


def test_create_attn_builds_the_registered_class_with_options():
    expected = {"se": SqueezeExcite, "cse": ChannelSE, "sse": SpatialSE, "scse": SCSE,
                "eca": ECA, "ela": ELA}
    for name, cls in expected.items():
        assert type(create_attn(name, 32)) is cls
    assert type(create_attn("SE", 32)) is SqueezeExcite
    assert create_attn("se", 64, reduction=4).fc1.out_channels == 16
    assert create_attn("scse", 16, combine="max").combine == "max"
    assert create_attn("eca", 64, kernel_size=9).conv.kernel_size == (9,)


def test_create_attn_unknown_name_suggests_nearest():
    with pytest.raises(ValueError, match="did you mean: eca") as err:
        create_attn("ecaa", 16)
    assert "cse, eca, ela, scse, se, sse" in str(err.value)


def test_create_attn_unknown_option():
    with pytest.raises(ValueError, match="no option gamma.*reduction"):
        create_attn("se", 16, gamma=2)


@pytest.mark.parametrize("name", ["se", "SE", "none"])
def test_register_twice_raises(name):
    with pytest.raises(ValueError, match="already registered"):
        register_attn(name, SqueezeExcite)
    assert list_attn() == ["cse", "eca", "ela", "scse", "se", "sse"]


@pytest.mark.parametrize("bad", [
    lambda: SqueezeExcite(0),
    lambda: SqueezeExcite(16, reduction=0),
    lambda: SCSE(16, combine="mul"),
    lambda: ECA(16, kernel_size=4),
    lambda: ELA(16, kernel_size=6),
    lambda: ELA(16, num_groups=0),
])
def test_invalid_arguments_raise_value_error(bad):
    with pytest.raises(ValueError):
        bad()


# --- every block --------------------------------------------------------------------------

@pytest.mark.parametrize("name", list_attn())
def test_shape_and_gradients(name):
    torch.manual_seed(0)
    block = create_attn(name, 32)
    x = torch.randn(2, 32, 5, 7, requires_grad=True)
    out = block(x)
    assert out.shape == x.shape
    (out * torch.randn_like(out)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for pname, p in block.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", list_attn())
def test_batch_permutation_equivariance(name):
    torch.manual_seed(0)
    block = create_attn(name, 32).double().eval()
    x = _input(5, 32, 4, 6)
    perm = torch.tensor([3, 0, 4, 2, 1])
    with torch.no_grad():
        torch.testing.assert_close(block(x[perm]), block(x)[perm])


@pytest.mark.parametrize("name", list_attn())
def test_tiny_spatial_maps(name):
    # Late stages of small-input models reach 1x1 maps; GroupNorm over a length-1 strip
    # must still give finite gates.
    out = create_attn(name, 16)(torch.randn(2, 16, 1, 1))
    assert out.shape == (2, 16, 1, 1) and torch.isfinite(out).all()


# --- SE / cSE -----------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [SqueezeExcite, ChannelSE])
def test_se_gate_is_per_channel_in_unit_interval(cls):
    torch.manual_seed(0)
    block = cls(24).double()
    x = _input(3, 24, 5, 6)
    g = _gate(block, x)
    assert ((g > 0) & (g < 1)).all()
    torch.testing.assert_close(g, g[:, :, :1, :1].expand_as(g))


@pytest.mark.parametrize("cls", [SqueezeExcite, ChannelSE])
def test_se_matches_matrix_form_reference(cls):
    torch.manual_seed(0)
    block = cls(24).double()
    x = _input(3, 24, 5, 6)
    w1, b1 = block.fc1.weight.flatten(1), block.fc1.bias
    w2, b2 = block.fc2.weight.flatten(1), block.fc2.bias
    z = x.flatten(2).sum(2) / (5 * 6)
    s = torch.sigmoid(torch.relu(z @ w1.T + b1) @ w2.T + b2)
    with torch.no_grad():
        torch.testing.assert_close(block(x), x * s[:, :, None, None])


@pytest.mark.parametrize(("cls", "channels", "kwargs", "hidden"), [
    (SqueezeExcite, 64, {}, 8),          # 64 // 16 = 4, floored at 8
    (SqueezeExcite, 256, {}, 16),
    (SqueezeExcite, 512, {"reduction": 4}, 128),
    (SqueezeExcite, 4, {}, 8),
    (SqueezeExcite, 64, {"hidden_channels": 6}, 6),
    (ChannelSE, 64, {}, 32),             # cSE bottleneck C/2, no floor of 8
    (ChannelSE, 6, {}, 3),
])
def test_se_hidden_width_and_parameter_count(cls, channels, kwargs, hidden):
    block = cls(channels, **kwargs)
    assert block.fc1.out_channels == hidden
    assert sum(p.numel() for p in block.parameters()) == 2 * channels * hidden + hidden + channels
    assert set(block.state_dict()) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}


# --- sSE / scSE ---------------------------------------------------------------------------

def test_sse_gate_is_per_pixel_shared_by_channels():
    torch.manual_seed(0)
    block = SpatialSE(12).double()
    x = _input(2, 12, 4, 5)
    g = _gate(block, x)
    assert ((g > 0) & (g < 1)).all()
    torch.testing.assert_close(g, g[:, :1].expand_as(g))
    q = torch.einsum("c,nchw->nhw", block.conv.weight.flatten(), x) + block.conv.bias
    torch.testing.assert_close(g[:, 0], torch.sigmoid(q).detach())


@pytest.mark.parametrize(("combine", "op"), [("add", torch.add), ("max", torch.maximum)])
def test_scse_combines_independent_cse_and_sse(combine, op):
    torch.manual_seed(0)
    block = SCSE(16, combine=combine).double()
    cse, sse = ChannelSE(16).double(), SpatialSE(16).double()
    cse.load_state_dict(block.cse.state_dict())
    sse.load_state_dict(block.sse.state_dict())
    x = _input(2, 16, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(block(x), op(cse(x), sse(x)))


# --- ECA ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("channels", "k"), [
    # t = (log2 C + 1) / 2, truncated, even -> next odd (worked by hand).
    (1, 1),      # t = 0.5 -> 0 -> 1
    (16, 3),     # 2.5 -> 2 -> 3
    (32, 3),     # 3.0 -> 3
    (64, 3),     # 3.5 -> 3
    (128, 5),    # 4.0 -> 4 -> 5
    (256, 5),    # 4.5 -> 4 -> 5
    (512, 5),    # 5.0 -> 5
    (1024, 5),   # 5.5 -> 5
    (2048, 7),   # 6.0 -> 6 -> 7
])
def test_eca_kernel_size_and_parameter_count(channels, k):
    assert eca_kernel_size(channels) == k
    assert sum(p.numel() for p in ECA(channels).parameters()) == k


def test_eca_kernel_size_other_gamma_b():
    assert eca_kernel_size(64, gamma=1, b=0) == 7   # t = 6 -> 7
    assert eca_kernel_size(256, gamma=4, b=4) == 3  # t = 3


@pytest.mark.parametrize("kernel_size", [None, 5])
def test_eca_is_local_cross_channel_interaction(kernel_size):
    torch.manual_seed(0)
    block = ECA(32, kernel_size=kernel_size).double()
    k = block.conv.kernel_size[0]
    assert k == (3 if kernel_size is None else 5)
    x = _input(2, 32, 3, 3)
    i = 10
    bumped = x.clone()
    bumped[:, i] += 1.0  # shifts channel i's pooled descriptor only
    changed = (_gate(block, bumped) - _gate(block, x)).abs().amax((0, 2, 3)) > 1e-9
    expected = torch.tensor([abs(i - j) <= k // 2 for j in range(32)])
    assert torch.equal(changed, expected)


def test_eca_matches_loop_reference():
    torch.manual_seed(0)
    block = ECA(10, kernel_size=5).double()
    x = _input(2, 10, 3, 4)
    w = block.conv.weight.flatten().tolist()
    z = x.mean((2, 3))
    ref = torch.zeros_like(z)
    for j in range(10):  # zero padding: neighbours outside [0, C) contribute nothing
        for t, wt in enumerate(w):
            src = j + t - 2
            if 0 <= src < 10:
                ref[:, j] += wt * z[:, src]
    torch.testing.assert_close(_gate(block, x), torch.sigmoid(ref)[:, :, None, None]
                               .expand_as(x))


# --- ELA ----------------------------------------------------------------------------------

def test_ela_gate_factorises_into_row_and_column_parts():
    torch.manual_seed(0)
    block = ELA(16).double()
    with torch.no_grad():  # non-trivial GroupNorm affine, so the gates are not symmetric
        block.gn.weight.normal_()
        block.gn.bias.normal_()
    x = _input(2, 16, 6, 9)
    g = _gate(block, x)
    assert ((g > 0) & (g < 1)).all()
    sv = torch.linalg.svdvals(g)  # [N, C, min(H, W)], one spatial matrix per channel
    assert (sv[..., 1:] <= 1e-10 * sv[..., :1]).all()
    assert (sv[..., 0] > 0).all()


def test_ela_gate_depends_only_on_strip_means():
    torch.manual_seed(0)
    block = ELA(16).double()
    x = _input(2, 16, 4, 6)
    checker = (torch.arange(4)[:, None] + torch.arange(6)[None]) % 2 * 2.0 - 1.0
    d = checker.double() * 0.3  # every row and every column of d sums to zero
    torch.testing.assert_close(_gate(block, x + d), _gate(block, x))


@pytest.mark.parametrize(("channels", "groups"), [(64, 16), (32, 16), (24, 12), (18, 9),
                                                  (7, 7), (1, 1)])
def test_ela_groupnorm_groups_and_shared_conv(channels, groups):
    block = ELA(channels)
    assert block.gn.num_groups == groups
    # One depthwise kernel of 7 per channel shared by both directions, plus GN affine.
    assert sum(p.numel() for p in block.parameters()) == channels * 7 + 2 * channels
