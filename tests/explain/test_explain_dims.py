"""Every explainer on signals, images and volumes: inputs ``[B, C, *spatial]`` with 1, 2 or
3 spatial dims give maps ``[B, *spatial]``.

The references are independent of the explainers: a net lifted one dimension up (size-1
kernels on a new leading axis) must give every method's map of the original net; an
affine net's gradient is read off its outputs on the basis inputs; Grad-CAM is rebuilt
from a hook and autograd; Integrated Gradients must be complete.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from nd_nets import FAST, gap_net, inputs, lift
from torch import nn

import cnnkit
from cnnkit.explain import create, list_methods
from cnnkit.layers.nd import adaptive_avg_pool, conv

METHODS = list_methods()
TARGETS = [[0, 2], [3, 1]]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("name", METHODS)
def test_maps_have_the_input_shape_and_k_targets_equal_single_calls(name, dims):
    net, x = gap_net(dims), inputs(dims)
    explainer = create(name, net, **FAST.get(name, {}))
    multi = explainer(x, TARGETS)
    assert multi.shape == (2, 2, *x.shape[2:]) and multi.dtype == x.dtype
    assert torch.isfinite(multi).all()
    for k in range(2):
        single = explainer(x, torch.tensor(TARGETS)[:, k])
        assert single.shape == (2, *x.shape[2:])
        torch.testing.assert_close(multi[:, k], single)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())


LIFTED = {name: (name, FAST.get(name, {})) for name in METHODS} | {
    "occlusion-layer-masking": ("occlusion", dict(window=3, stride=2, masking="layer")),
    "smoothgradcam++-channels": ("smoothgradcam++", dict(n_samples=2, channels=[1, 4])),
}


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("name, options", LIFTED.values(), ids=LIFTED.keys())
def test_a_net_lifted_one_dim_up_gives_the_same_map(name, options, dims):
    """A 3D net with (1, k, k) kernels on a depth-1 volume is the 2D net on the image (and a
    2D net with (1, k) kernels on a height-1 image the 1D net on the signal): every
    method's map must be the same, through the other dimension's interpolation, pooling,
    windows and masks."""
    net, x = gap_net(dims), inputs(dims)
    up = lift(net)
    with torch.no_grad():
        torch.testing.assert_close(up(x[:, :, None]), net(x))
    low = create(name, net, **options)(x, TARGETS)
    high = create(name, up, **options)(x[:, :, None], TARGETS)
    assert high.shape == (2, 2, 1, *x.shape[2:])
    scale = float(low.abs().max())
    assert scale > 0  # a map with something in it
    torch.testing.assert_close(high[:, :, 0], low, rtol=1e-6, atol=1e-9 * scale)


class _AffineNet(nn.Module):
    """conv (no activation) + global average pooling + linear: an affine function."""

    def __init__(self, dims: int) -> None:
        super().__init__()
        self.conv = conv(dims)(2, 3, 3, padding=1)
        self.fc = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean(tuple(range(2, x.ndim))))


def _basis_gradient(net: nn.Module, shape: tuple[int, ...], c: int) -> torch.Tensor:
    """``d net(x)[c] / dx`` ``[C, *spatial]`` of an affine net, read off its outputs on the
    unit inputs: ``f(e_i) - f(0)`` (exact for an affine map, no autograd involved)."""
    n = math.prod(shape)
    basis = torch.eye(n, dtype=torch.float64).view(n, *shape)
    with torch.no_grad():
        out = net(basis)[:, c] - net(torch.zeros(1, *shape, dtype=torch.float64))[0, c]
    return out.view(shape)


@pytest.mark.parametrize("dims", [1, 3])
def test_affine_net_maps_are_its_analytic_gradient(dims):
    torch.manual_seed(0)
    net = _AffineNet(dims).double().eval()
    x = inputs(dims)
    grad = _basis_gradient(net, tuple(x.shape[1:]), 2)  # [C, *spatial]
    assert grad.abs().min() < grad.abs().max() / 2  # the borders differ (zero padding)
    sal = create("saliency", net)(x, 2)
    torch.testing.assert_close(sal, grad.abs().amax(0).expand_as(sal))
    torch.testing.assert_close(create("saliency", net, abs=False, reduce="sum")(x, 2),
                               grad.sum(0).expand_as(sal))
    gxi = (grad * x).sum(1)
    torch.testing.assert_close(create("gradient_x_input", net)(x, 2), gxi)
    torch.testing.assert_close(create("integrated_gradients", net, steps=3)(x, 2), gxi)
    noisy = create("smoothgrad", net, n_samples=3, noise=0.5)(x, 2)
    torch.testing.assert_close(noisy, sal)  # the gradient of an affine net is constant
    torch.testing.assert_close(create("guided_backprop", net)(x, 2), sal)  # no ReLU


def _relu_net(dims: int) -> nn.Module:
    """A small ReLU CNN whose head weights are positive, so that f(x) - f(baseline) is not
    a near-cancelling sum (the quadrature error at the ReLU kinks is judged relative to
    it, as in test_gradient)."""
    torch.manual_seed(0)
    net = nn.Sequential(conv(dims)(2, 16, 3, padding=1), nn.ReLU(),
                        conv(dims)(16, 16, 3, stride=2, padding=1), nn.ReLU(),
                        adaptive_avg_pool(dims)(1), nn.Flatten(), nn.Linear(16, 4)).double()
    with torch.no_grad():
        net[-1].weight.abs_()
    return net.eval()


@pytest.mark.parametrize("dims", [1, 3])
@pytest.mark.parametrize("method", ["riemann_trapezoid", "gausslegendre"])
def test_integrated_gradients_completeness(dims, method):
    net, x = _relu_net(dims), inputs(dims)
    base = 0.5 * torch.randn(x.shape[1:], dtype=x.dtype, generator=torch.Generator()
                             .manual_seed(2))
    ig = create("integrated_gradients", net, steps=64, method=method, baseline=base)
    attr = ig(x, TARGETS)
    with torch.no_grad():
        expected = (net(x) - net(base.expand_as(x))).gather(1, torch.tensor(TARGETS))
    assert expected.abs().min() > 1e-3  # the check is relative: the difference must be real
    total = attr.sum(tuple(range(2, attr.ndim)))
    torch.testing.assert_close(total, expected, rtol=0.01, atol=0)


@pytest.mark.parametrize("dims", [1, 3])
def test_gradcam_matches_a_hook_and_autograd(dims):
    """Grad-CAM from scratch: own hook, own autograd.grad, mean over every spatial axis,
    linear or trilinear upsampling (align_corners=False, as bilinear in 2D)."""
    net, x = gap_net(dims), inputs(dims)
    layer = net.features[5]
    store = {}
    handle = layer.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    try:
        xi = x.clone().requires_grad_(True)
        logits = net(xi)
    finally:
        handle.remove()
    a = store["a"]
    (g,) = torch.autograd.grad(logits[:, 1].sum(), a)
    space = tuple(range(2, a.ndim))
    ref = torch.relu((g.mean(space, keepdim=True) * a).sum(1, keepdim=True)).detach()
    ref = F.interpolate(ref, size=x.shape[2:], mode=("linear", "", "trilinear")[dims - 1],
                        align_corners=False)[:, 0]
    out = create("gradcam", net)(x, 1)
    assert ref.abs().max() > 0
    torch.testing.assert_close(out, ref)


@pytest.fixture(scope="module")
def resnets() -> dict[tuple[int, ...], nn.Module]:
    torch.manual_seed(0)
    return {size: cnnkit.create_model("resnet18", num_classes=3, input_size=size).eval()
            for size in [(1, 32), (1, 8, 16, 16)]}


# Score-CAM's one forward per channel of a 3D ResNet-18 is too slow for a unit test; the
# tiny nets above check it in 3D.
ZOO = [(name, size) for size in [(1, 32), (1, 8, 16, 16)] for name in METHODS
       if not (name == "scorecam" and len(size) == 4)]


@pytest.mark.parametrize("name, input_size", ZOO)
def test_zoo_resnet18_in_1d_and_3d(resnets, name, input_size):
    model = resnets[input_size]
    x = torch.randn(1, *input_size, generator=torch.Generator().manual_seed(0))
    options = dict(FAST.get(name, {}))
    if name == "occlusion":
        options = dict(window=8, stride=8)
    if name == "scorecam":
        options = dict(layer="layer4", batch_size=512)
    maps = create(name, model, **options)(x, lambda y: y[:, 2])
    assert maps.shape == (1, *input_size[1:]) and torch.isfinite(maps).all()


def test_inputs_of_other_ranks_are_refused():
    net = gap_net(2)
    explainer = create("saliency", net)
    for shape in [(2, 8), (1, 2, 2, 2, 2, 2)]:
        with pytest.raises(ValueError, match=r"\[B, C, L\] \(signals\), \[B, C, H, W\]"):
            explainer(torch.zeros(shape, dtype=torch.float64))
