"""Input-gradient methods: saliency, gradient x input, SmoothGrad, Integrated Gradients."""

import pytest
import torch
from torch import nn

from cnnkit.explain import create
from cnnkit.explain.gradient import input_gradients
from cnnkit.models import create_model

METHODS = {
    "saliency": {},
    "gradient_x_input": {},
    "smoothgrad": dict(n_samples=4, seed=3, internal_batch_size=5),
    "integrated_gradients": dict(steps=8, internal_batch_size=6),
}


def _no_hooks(model):
    return all(not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                    or m._backward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("name", list(METHODS))
def test_shapes_multi_target_and_state_restored(name):
    model = create_model("tinyvgg", num_classes=5, img_size=16).double()
    model.train()
    model.features.conv_1_1.weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    explainer = create(name, model, **METHODS[name])
    targets = torch.tensor([[1, 0, 3], [4, 4, 2]])
    many = explainer(x, target=targets)
    assert many.shape == (2, 3, 16, 16)
    assert torch.isfinite(many).all() and many.abs().sum() > 0
    for k in range(3):  # each of the K maps equals a single-target call
        one = explainer(x, target=targets[:, k])
        assert one.shape == (2, 16, 16)
        torch.testing.assert_close(many[:, k], one)
    assert _no_hooks(model)
    assert all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags


def _linear(in_chans, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(in_chans * 16, 3)).double().eval()


def test_linear_model_saliency_is_the_weights_and_gxi_is_w_times_x():
    model = _linear(1)
    w = model[1].weight.detach().view(3, 1, 4, 4)
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    sal = create("saliency", model, abs=False)(x, target=[[0, 2], [1, 1]])
    torch.testing.assert_close(sal, torch.stack([w[[0, 2], 0], w[[1, 1], 0]]), rtol=0, atol=0)
    gxi = create("gradient_x_input", model)(x, target=[2, 0])
    torch.testing.assert_close(gxi, torch.stack([w[2, 0] * x[0, 0], w[0, 0] * x[1, 0]]))
    # three channels: per-channel gradients are the weights; the default map is max_c |w_c|
    model = _linear(3)
    w = model[1].weight.detach().view(3, 3, 4, 4)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    targets = torch.tensor([[1], [2]])
    torch.testing.assert_close(input_gradients(model, x, targets)[:, 0], w[[1, 2]])
    torch.testing.assert_close(create("saliency", model)(x, [1, 2]), w[[1, 2]].abs().amax(1))
    torch.testing.assert_close(create("saliency", model, abs=False, reduce="sum")(x, [1, 2]),
                               w[[1, 2]].sum(1))
    torch.testing.assert_close(create("gradient_x_input", model)(x, [1, 2]),
                               (w[[1, 2]] * x).sum(1))
    # IG of a linear model is exactly w * (x - baseline), at any step count
    base = torch.randn(3, 4, 4, dtype=torch.float64)
    ig = create("integrated_gradients", model, baseline=base, steps=3)(x, [1, 2])
    torch.testing.assert_close(ig, (w[[1, 2]] * (x - base)).sum(1))


def _relu_cnn():
    """A small ReLU CNN. The head's weights are made positive so each logit responds
    coherently to the image: with random signs f(x) - f(baseline) is a near-cancelling sum,
    and the quadrature error from the ReLU kinks, however small, is large *relative* to it."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    ).double().eval()
    with torch.no_grad():
        model[-1].weight.abs_()
    return model


@pytest.mark.parametrize("method", ["riemann_trapezoid", "gausslegendre"])
@pytest.mark.parametrize("baseline", ["zeros", "tensor"])
def test_integrated_gradients_completeness(method, baseline):
    model = _relu_cnn()
    x = torch.randn(3, 3, 12, 12, dtype=torch.float64)
    base = torch.zeros(3, 12, 12, dtype=torch.float64) if baseline == "zeros" else \
        0.5 * torch.randn(3, 12, 12, dtype=torch.float64)
    ig = create("integrated_gradients", model, steps=64, method=method,
                baseline=None if baseline == "zeros" else base)
    targets = torch.tensor([[0, 3], [1, 2], [2, 0]])
    attr = ig(x, targets)
    with torch.no_grad():
        expected = (model(x) - model(base.expand_as(x))).gather(1, targets)
    total = attr.sum((-1, -2))
    assert expected.abs().min() > 1e-3  # the check is relative: the difference must be real
    torch.testing.assert_close(total, expected, rtol=0.01, atol=0)


def test_integrated_gradients_chunking_and_memory_bound():
    model = _relu_cnn()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    sizes = []
    model.register_forward_pre_hook(lambda _m, a: sizes.append(a[0].shape[0]))
    chunked = create("integrated_gradients", model, steps=16, internal_batch_size=7)(x, 1)
    # only internal_batch_size images enter the network at once
    assert max(sizes) == 7 and sum(sizes) == 3 * 16  # given targets: no extra forward
    whole = create("integrated_gradients", model, steps=16, internal_batch_size=1000)(x, 1)
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-12)


def test_smoothgrad_zero_noise_is_saliency_and_seed_is_deterministic():
    model = _relu_cnn()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    sal = create("saliency", model)(x, [[0, 1], [2, 3]])
    sg0 = create("smoothgrad", model, noise=0.0, n_samples=3)(x, [[0, 1], [2, 3]])
    torch.testing.assert_close(sg0, sal)
    a = create("smoothgrad", model, n_samples=6, seed=7)(x)
    b = create("smoothgrad", model, n_samples=6, seed=7, internal_batch_size=5)(x)
    c = create("smoothgrad", model, n_samples=6, seed=8)(x)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a, create("saliency", model)(x))


class _Square(nn.Module):
    """S_k(x) = sum x^2 for every class: the gradient is 2x, so SmoothGrad's is 2(x + mean eps)."""

    def forward(self, x):
        return (x ** 2).flatten(1).sum(1, keepdim=True).expand(-1, 2)


def test_smoothgrad_noise_scale_is_a_fraction_of_the_value_range():
    x = torch.rand(1, 1, 16, 16, dtype=torch.float64) * 4 - 1
    span = float(x.max() - x.min())
    n, noise = 400, 0.15
    sg = create("smoothgrad", _Square(), n_samples=n, noise=noise, abs=False,
                internal_batch_size=400)(x, 0)
    mean_eps = (sg - 2 * x[:, 0]) / 2  # 256 draws of N(0, sigma^2 / n)
    expected_std = noise * span / n ** 0.5
    assert 0.8 < float(mean_eps.std()) / expected_std < 1.2
    assert abs(float(mean_eps.mean())) < 4 * expected_std / 16


def test_invalid_options_name_the_fix():
    model = _relu_cnn()
    with pytest.raises(ValueError, match="choose 'riemann_trapezoid' or 'gausslegendre'"):
        create("integrated_gradients", model, method="simpson")
    with pytest.raises(ValueError, match="choose from"):
        create("saliency", model, reduce="median")
    with pytest.raises(ValueError, match="does not broadcast"):
        create("integrated_gradients", model, baseline=torch.zeros(2, 8, 8))(
            torch.randn(1, 3, 8, 8, dtype=torch.float64))
