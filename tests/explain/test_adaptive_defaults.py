"""Defaults that adapt to the input (occlusion window, SmoothGrad noise, IG steps), the
warning on maps that show nothing, and the options each method takes."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from cnnkit.explain import create, list_methods
from cnnkit.explain.checks import degenerate
from cnnkit.explain.options import method_options, split_options
from cnnkit.explain.perturbation import default_window
from cnnkit.models import create_model


def _digits_net() -> nn.Module:
    """The default digits run's model: tinyvgg on 1x8x8."""
    torch.manual_seed(0)
    return create_model("tinyvgg", num_classes=10, in_chans=1, img_size=8).eval()


def _relu_cnn() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).double().eval()
    with torch.no_grad():
        net[-1].weight.abs_()  # coherent logits: S(x) - S(x') is no near-cancelling sum
    return net


def _quiet(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a degenerate-map warning fails the test
        return fn(*args)


# -- occlusion ------------------------------------------------------------------------------

def test_default_window_rule_in_every_dimension():
    assert default_window((8, 8)) == ((2, 2), (1, 1))
    assert default_window((64,)) == ((13,), (6,))
    assert default_window((2, 40, 27)) == ((1, 8, 5), (1, 4, 2))
    for spatial in [(1,), (3, 3), (8, 8), (5, 100, 7), (224, 224)]:
        window, stride = default_window(spatial)
        for n, w, s in zip(spatial, window, stride, strict=True):
            assert 1 <= s <= w <= n and (w < n or n < 3)  # never the whole side (n >= 3)
            assert w == max(1, round(n / 5))


def test_occlusion_on_an_8x8_digit_is_not_constant():
    """The complaint: the old default window 8 covered the whole digit, so every pixel got
    the same drop. The adapted window (2x2) localises."""
    net = _digits_net()
    x = torch.rand(2, 1, 8, 8)
    occ = create("occlusion", net)
    maps = _quiet(occ, x, 3)
    assert maps.shape == (2, 8, 8)
    assert degenerate(maps) is None
    assert (maps.flatten(1).amax(1) - maps.flatten(1).amin(1) > 0).all()
    # equal to the same explainer with the rule's window and stride given
    torch.testing.assert_close(maps, create("occlusion", net, window=2, stride=1)(x, 3))
    assert occ.sizes((8, 8)) == ((2, 2), (1, 1))


def test_occlusion_window_covering_the_input_warns_with_the_fix():
    net = _digits_net()
    with pytest.warns(UserWarning) as record:
        maps = create("occlusion", net, window=8)(torch.rand(2, 1, 8, 8), 3)
    assert degenerate(maps) == "constant"
    (w,) = [r for r in record if "occlusion" in str(r.message)]
    text = str(w.message)
    assert "\n" not in text
    assert "occlusion window 8x8 covers the whole 8x8 input" in text
    assert "--opt window=2" in text


def test_occlusion_given_window_gets_half_of_it_as_stride():
    occ = create("occlusion", _digits_net(), window=(4, 2))
    assert occ.sizes((8, 6)) == ((4, 2), (2, 1))
    assert occ.sizes((3, 6)) == ((3, 2), (1, 1))  # cut to the input, then halved


# -- SmoothGrad ----------------------------------------------------------------------------

def test_smoothgrad_noise_follows_each_inputs_range():
    """sigma = 0.15 (max - min) of each input: a model that reads x / s, given s * x, sees
    exactly the same noisy inputs as the plain model given x, so its map is the plain map
    divided by s (the gradient's chain rule), for any scale s."""
    net = _relu_cnn()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    plain = create("smoothgrad", net, n_samples=6, seed=1, abs=False, reduce="sum")(x, 1)
    assert create("smoothgrad", net).noise == 0.15
    for s in (1e-3, 255.0):
        scaled = nn.Sequential(_Scale(1 / s), net)
        got = create("smoothgrad", scaled, n_samples=6, seed=1, abs=False, reduce="sum")(
            s * x, 1)
        torch.testing.assert_close(got * s, plain)
    # a fixed sigma would not do that: the per-input range really is used
    x2 = x.clone()
    x2[1] *= 10
    a = create("smoothgrad", net, n_samples=6, seed=1, abs=False, reduce="sum")(x2, 1)
    b = create("smoothgrad", scaled := nn.Sequential(_Scale(0.1), net), n_samples=6, seed=1,
               abs=False, reduce="sum")(x2, 1)
    assert scaled is not None and not torch.allclose(a[1], b[1] * 10)


class _Scale(nn.Module):
    def __init__(self, s: float) -> None:
        super().__init__()
        self.s = s

    def forward(self, x):
        return x * self.s


# -- Integrated Gradients --------------------------------------------------------------------

@pytest.mark.parametrize("method", ["riemann_trapezoid", "gausslegendre"])
def test_integrated_gradients_default_steps_meet_the_tolerance(method):
    net = _relu_cnn()
    x = torch.randn(3, 3, 10, 10, dtype=torch.float64)
    targets = torch.tensor([[0, 3], [1, 2], [2, 0]])
    ig = create("integrated_gradients", net, method=method)
    attr = _quiet(ig, x, targets)
    with torch.no_grad():
        want = (net(x) - net(torch.zeros_like(x))).gather(1, targets)
    assert want.abs().min() > 1e-3
    error = (attr.sum((-1, -2)) - want).abs()
    assert ig.tolerance == 0.05  # Sundararajan et al. 2017, Sec. 4: within 5%
    assert (error <= 0.05 * want.abs() + 1e-6 * (want.abs() + 1)).all()
    assert ig.steps_used in (17, 33, 65, 129, 257, 513)
    # a tighter tolerance takes at least as many points, and meets its own bound
    tight = create("integrated_gradients", net, method=method, tolerance=2e-3)
    attr2 = _quiet(tight, x, targets)
    assert tight.steps_used >= ig.steps_used
    assert ((attr2.sum((-1, -2)) - want).abs() <= 2e-3 * want.abs() + 1e-6 * (want.abs() + 1)
            ).all()


def test_integrated_gradients_nested_points_equal_a_fixed_rule():
    """The adaptive trapezoid reuses its points, and refines each input on its own: each
    input's map equals the fixed rule's map with the number of points it stopped at."""
    net = _relu_cnn()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    batch = create("integrated_gradients", net, tolerance=1e-3)(x, 1)
    for i in range(3):
        ig = create("integrated_gradients", net, tolerance=1e-3)
        one = ig(x[i:i + 1], 1)
        torch.testing.assert_close(one, batch[i:i + 1])
        fixed = create("integrated_gradients", net, steps=ig.steps_used)(x[i:i + 1], 1)
        torch.testing.assert_close(one, fixed)


def test_integrated_gradients_warns_when_max_steps_is_not_enough():
    net = _relu_cnn()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    ig = create("integrated_gradients", net, tolerance=1e-9, max_steps=17)
    with pytest.warns(UserWarning, match="completeness error .* after 17 steps"):
        ig(x, 1)
    assert ig.steps_used == 17


# -- degenerate maps -----------------------------------------------------------------------

def test_degenerate_kinds():
    assert degenerate(torch.rand(3, 4, 4)) is None
    assert degenerate(torch.zeros(2, 5)) == "all zero"
    assert degenerate(torch.full((2, 5), 3.0)) == "constant"
    bad = torch.rand(2, 5)
    bad[1, 2] = float("nan")
    assert degenerate(bad) == "NaN or inf"
    bad[1, 2] = float("inf")
    assert degenerate(bad) == "NaN or inf"
    mixed = torch.rand(3, 5)
    mixed[2] = 0
    assert degenerate(mixed) == "all zero"  # one map of the batch is enough


class _Blind(nn.Module):
    """A classifier whose gradient is ``slope`` everywhere: 0 (blind to its input) or NaN."""

    def __init__(self, slope: float = 0.0) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([1.0, 2.0]))
        self.slope = slope

    def forward(self, x):
        return self.bias.expand(x.shape[0], 2) + self.slope * x.flatten(1).sum(1, keepdim=True)


@pytest.mark.parametrize("value, kind", [(0.0, "all zero"), (float("nan"), "NaN or inf")])
def test_degenerate_maps_warn_in_one_line_naming_the_method(value, kind):
    with pytest.warns(UserWarning) as record:
        create("saliency", _Blind(value))(torch.rand(2, 1, 6, 6), 1)
    (w,) = record
    text = str(w.message)
    assert text.startswith("saliency: 2 of 2 maps are " + kind) and "\n" not in text
    assert "try another method" in text


def test_informative_maps_do_not_warn():
    _quiet(create("saliency", _relu_cnn()), torch.rand(2, 3, 8, 8, dtype=torch.float64), 1)


# -- options -------------------------------------------------------------------------------

def test_every_method_lists_its_options():
    for name in list_methods():
        opts = method_options(name)
        assert "model" not in opts and "layer" not in opts and "self" not in opts
    assert method_options("occlusion") == ["window", "stride", "baseline",
                                           "internal_batch_size", "masking"]
    assert "steps" in method_options("integrated_gradients")
    assert method_options("gradcam") == []
    with pytest.raises(ValueError, match="unknown explanation method 'oclusion'"):
        method_options("oclusion")


def test_options_go_to_the_methods_that_take_them():
    got = split_options(["saliency", "occlusion", "smoothgrad"], {"window": 3, "abs": False})
    assert got == {"saliency": {"abs": False}, "occlusion": {"window": 3},
                   "smoothgrad": {"abs": False}}
    with pytest.raises(ValueError) as e:
        split_options(["occlusion"], {"windw": 3})
    text = str(e.value)
    assert "unknown option 'windw'" in text and "window, stride, baseline" in text
