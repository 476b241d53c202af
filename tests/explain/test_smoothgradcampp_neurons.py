"""Smooth Grad-CAM++ for chosen neurons (Omeiza et al. 2019) against plain autograd."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import cnnkit
import cnnkit.explain

NEURONS = [(1, 2, 3), (4, 5, 5)]


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
               for m in model.modules())


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    return cnnkit.create_model("tinyvgg", num_classes=4, img_size=16).double().eval()


def _reference(model: nn.Module, x: torch.Tensor, n: int, noise: float, seed: int,
               ) -> torch.Tensor:
    """From scratch: split the net at relu_1_2 (A, 16x16) and relu_2_2 (the neurons, 8x8),
    one autograd.grad per noisy image, average A, g, g^2, g^3, then Grad-CAM++."""
    f = model.features
    eps = torch.randn((x.shape[0], n, *x.shape[1:]), generator=torch.Generator().manual_seed(
        seed), dtype=x.dtype)
    maps = []
    for b in range(x.shape[0]):
        sigma = noise * (x[b].max() - x[b].min())
        sums = [0.0, 0.0, 0.0, 0.0]
        for s in range(n):
            xs = (x[b] + sigma * eps[b, s])[None]
            with torch.no_grad():
                a = f[:4](xs.clone())
            a = a.clone().requires_grad_(True)
            out = f[4:9](a.clone())
            score = sum(out[0, c, i, j] for c, i, j in NEURONS)
            (g,) = torch.autograd.grad(score, a)
            for k, t in enumerate((a.detach(), g, g ** 2, g ** 3)):
                sums[k] = sums[k] + t[0] / n
        act, d1, d2, d3 = sums
        denom = 2 * d2 + act.sum((1, 2), keepdim=True) * d3
        alpha = torch.where(denom != 0, d2 / torch.where(denom != 0, denom, 1.0), 0.0)
        w = (alpha * d1.clamp_min(0)).sum((1, 2))
        maps.append((w[:, None, None] * act).sum(0).clamp_min(0))
    return torch.stack(maps)


def test_neuron_maps_match_autograd_reference(model):
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    exp = cnnkit.explain.create("smoothgradcam++", model, layer="features.relu_1_2",
                                neurons=NEURONS, n_samples=3, noise=0.1, seed=7,
                                internal_batch_size=4)
    model.train()
    model.fc.weight.requires_grad_(False)
    maps = exp(x, [[0, 3], [1, 2]])
    assert model.training and not model.fc.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    model.eval().fc.weight.requires_grad_(True)
    assert _no_hooks(model)
    assert maps.shape == (2, 2, 16, 16)
    ref = _reference(model, x, n=3, noise=0.1, seed=7)
    assert ref.abs().max() > 0
    torch.testing.assert_close(maps[:, 0], ref, rtol=1e-10, atol=1e-12)
    # the neurons, not the class, are explained: every target gets the same map,
    # and single-target calls agree with the K-target call
    torch.testing.assert_close(maps[:, 1], ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(exp(x, 2), maps[:, 0])
    # and it is not the class map of the same layer
    cls = cnnkit.explain.create("smoothgradcam++", model, layer="features.relu_1_2",
                                n_samples=3, noise=0.1, seed=7)(x, 0)
    assert not torch.allclose(cls, ref)


def test_neuron_options_are_validated(model):
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="explained layer itself"):
        cnnkit.explain.create("smoothgradcam++", model, neurons=[(0, 0, 0)])
    with pytest.raises(ValueError, match="neurons must be"):
        cnnkit.explain.create("smoothgradcam++", model, layer="features.relu_1_2",
                              neurons=[(0, 0)])
    bad = cnnkit.explain.create("smoothgradcam++", model, layer="features.relu_1_2",
                                neurons=[(0, 9, 0)], n_samples=1)
    with pytest.raises(ValueError, match="out of range"):
        bad(x)
    late = cnnkit.explain.create("smoothgradcam++", model, layer="features.relu_2_2",
                                 neuron_layer="features.relu_1_2", neurons=[(0, 1, 1)],
                                 n_samples=1)
    with pytest.raises(ValueError, match="do not depend on layer"):
        late(x)
    assert _no_hooks(model)
