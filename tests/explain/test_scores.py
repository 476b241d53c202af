"""Explanation scores against hand-computed cases."""

import math

import pytest
import torch
from torch import nn

from cnnkit.explain.scores import (
    deletion_insertion,
    energy_in_mask,
    pointing_game,
    randomization_check,
    rank_correlation,
)


def linear_model() -> nn.Module:
    """logit 0 = sum of the pixels of a 1x2x2 image; logit 1 = 0."""
    lin = nn.Linear(4, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 1, 1, 1], [0, 0, 0, 0]]))
        lin.bias.zero_()
    return nn.Sequential(nn.Flatten(), lin)


X = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
T = torch.tensor([0])


def test_deletion_and_insertion_curves_by_hand():
    model = linear_model()
    good = X[:, 0]  # ranks the pixels exactly by their contribution
    d = deletion_insertion(model, X, good, T, steps=4, baseline=0.0, probability=False)
    assert d["curve"].tolist() == [[10.0, 6.0, 3.0, 1.0, 0.0]]
    assert d["auc"].item() == pytest.approx(0.25 * (8 + 4.5 + 2 + 0.5))
    i = deletion_insertion(model, X, good, T, steps=4, mode="insertion", baseline=0.0,
                           probability=False)
    assert i["curve"].tolist() == [[0.0, 4.0, 7.0, 9.0, 10.0]]
    assert i["auc"].item() == pytest.approx(6.25)
    bad = deletion_insertion(model, X, -good, T, steps=4, baseline=0.0, probability=False)
    assert bad["auc"].item() == pytest.approx(6.25)
    assert bad["auc"].item() > d["auc"].item()  # a reversed map is less faithful


def test_deletion_with_probabilities_and_chunks():
    model = linear_model()
    a = deletion_insertion(model, X, X[:, 0], T, steps=4, baseline=0.0, batch_size=2)
    expect = [1 / (1 + math.exp(-s)) for s in (10, 6, 3, 1, 0)]  # softmax of [s, 0]
    assert a["curve"][0].tolist() == pytest.approx(expect, rel=1e-6)
    with pytest.raises(ValueError, match="mode must be"):
        deletion_insertion(model, X, X[:, 0], T, mode="delete")


def test_blur_baseline_keeps_a_constant_image():
    model = linear_model()
    flat = torch.full((1, 1, 2, 2), 2.0)
    out = deletion_insertion(model, flat, torch.rand(1, 2, 2), T, steps=2, probability=False)
    assert out["curve"].flatten().tolist() == pytest.approx([8.0, 8.0, 8.0])


def test_pointing_game_and_energy_by_hand():
    masks = torch.zeros(2, 4, 4)
    masks[:, :2, :2] = 1
    maps = torch.zeros(2, 4, 4)
    maps[0, 1, 1] = 5.0   # peak on the object
    maps[1, 3, 3] = 5.0   # peak off the object
    maps[1, 0, 0] = 1.0
    assert pointing_game(maps, masks).tolist() == [1.0, 0.0]
    assert pointing_game(maps, masks, tolerance=2).tolist() == [1.0, 1.0]
    assert energy_in_mask(maps, masks).tolist() == pytest.approx([1.0, 1 / 6])
    assert energy_in_mask(torch.zeros(1, 4, 4), masks[:1]).tolist() == [0.0]


def test_rank_correlation_with_ties_by_hand():
    a = torch.tensor([[[1.0, 2.0], [2.0, 3.0]]])
    b = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    assert rank_correlation(b, b).item() == pytest.approx(1.0)
    assert rank_correlation(b, -b).item() == pytest.approx(-1.0)
    assert rank_correlation(a, b).item() == pytest.approx(4.5 / math.sqrt(4.5 * 5))


def test_randomization_check_separates_model_dependent_maps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 36, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 1, 6, 6)

    def saliency(m):
        xi = x.clone().requires_grad_(True)
        m(xi)[:, 0].sum().backward()
        return xi.grad.abs()[:, 0]

    steps = randomization_check(saliency, model)
    assert [n for n, _ in steps] == ["trained", "3", "0"]
    assert steps[0][1] == pytest.approx(1.0)
    assert steps[-1][1] < 0.9  # every layer random: the map no longer follows the model
    edge = randomization_check(lambda m: x[:, 0].abs(), model)  # ignores the model
    assert all(c == pytest.approx(1.0) for _, c in edge)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


# -- signals and volumes: every score counts all spatial elements ----------------------

def _sum_model(n: int) -> nn.Module:
    """logit 0 = the sum of the n input elements; logit 1 = 0."""
    lin = nn.Linear(n, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.stack([torch.ones(n), torch.zeros(n)]))
        lin.bias.zero_()
    return nn.Sequential(nn.Flatten(), lin)


@pytest.mark.parametrize("shape", [(1, 1, 4), (1, 1, 2, 2, 2)])
def test_deletion_and_insertion_on_signals_and_volumes_by_hand(shape):
    n = math.prod(shape)
    x = torch.arange(1.0, n + 1).view(shape)
    good = x[:, 0]  # ranks the elements by their contribution
    d = deletion_insertion(_sum_model(n), x, good, T, steps=n, baseline=0.0,
                           probability=False)
    total = n * (n + 1) / 2
    removed = [sum(range(n, n - k, -1)) for k in range(n + 1)]  # the k largest removed
    assert d["curve"][0].tolist() == [total - r for r in removed]
    i = deletion_insertion(_sum_model(n), x, good, T, steps=n, mode="insertion",
                           baseline=0.0, probability=False)
    assert i["curve"][0].tolist() == [float(r) for r in removed]
    with pytest.raises(ValueError, match=r"maps must be \[B, \*spatial\]"):
        deletion_insertion(_sum_model(n), x, good[:, None], T)


@pytest.mark.parametrize("shape", [(2, 3, 9), (1, 2, 7, 7, 8)])
def test_blur_keeps_a_constant_input_and_is_separable(shape):
    from cnnkit.explain.scores import _blur

    flat = torch.full(shape, 2.0, dtype=torch.float64)
    torch.testing.assert_close(_blur(flat, 1.0), flat)
    delta = torch.zeros(shape, dtype=torch.float64)
    centre = tuple(s // 2 for s in shape[2:])
    delta[(0, 0, *centre)] = 1.0
    out = _blur(delta, 1.0)[0, 0]
    t = torch.arange(-3, 4, dtype=torch.float64)
    k = torch.exp(-t**2 / 2)
    k = k / k.sum()
    # the response to a unit impulse is the outer product of the 1D kernels
    outer = k
    for _ in range(len(centre) - 1):
        outer = outer[..., None] * k
    window = tuple(slice(c - 3, c + 4) for c in centre)  # the impulse is 3+ from the borders
    torch.testing.assert_close(out[window], outer)
    assert out.sum().item() == pytest.approx(1.0)


def test_pointing_game_and_energy_on_signals_and_volumes():
    masks1 = torch.zeros(2, 10)
    masks1[:, 2:4] = 1
    maps1 = torch.zeros(2, 10)
    maps1[0, 3], maps1[1, 7] = 5.0, 5.0
    assert pointing_game(maps1, masks1).tolist() == [1.0, 0.0]
    assert pointing_game(maps1, masks1, tolerance=4).tolist() == [1.0, 1.0]
    assert pointing_game(maps1, masks1, tolerance=3).tolist() == [1.0, 0.0]
    masks3 = torch.zeros(1, 3, 4, 4)
    masks3[0, 1, 1:3, 1:3] = 1
    inside = torch.rand(1, 3, 4, 4) * masks3  # a map that lies inside the mask
    assert energy_in_mask(inside, masks3).item() == pytest.approx(1.0)
    assert pointing_game(inside, masks3).item() == 1.0
    spread = torch.ones(1, 3, 4, 4)
    assert energy_in_mask(spread, masks3).item() == pytest.approx(4 / 48)
    corner = torch.zeros(1, 3, 4, 4)
    corner[0, 2, 3, 3] = 1.0  # one voxel diagonally 1 step (in depth) + 1 + 1 away
    assert pointing_game(corner, masks3).item() == 0.0
    assert pointing_game(corner, masks3, tolerance=1).item() == 1.0
    assert rank_correlation(inside, inside).item() == pytest.approx(1.0)
