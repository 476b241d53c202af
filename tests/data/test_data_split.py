"""Stratified splits and channel statistics."""

import pytest
import torch

from cnnkit.data import channel_stats, split_indices

COUNTS = [100, 37, 10, 3, 50, 4]  # per class; 3 and 4 are the tiny-class cases


def _labels(seed=0):
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(COUNTS)])
    return y[torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))]


def test_split_disjoint_covering_sorted():
    y = _labels()
    parts = split_indices(y, (0.7, 0.2, 0.1), seed=0)
    allidx = torch.cat(parts)
    assert torch.equal(torch.sort(allidx)[0], torch.arange(len(y)))  # disjoint and covering
    for p in parts:
        assert p.dtype == torch.int64 and torch.equal(p, torch.sort(p)[0])


@pytest.mark.parametrize("fractions", [(0.8, 0.1, 0.1), (0.7, 0.2, 0.1), (0.5, 0.25, 0.25)])
def test_split_stratified_proportions(fractions):
    y = _labels()
    parts = split_indices(y, fractions, seed=3)
    for c, n in enumerate(COUNTS):
        got = [int((y[p] == c).sum()) for p in parts]
        assert sum(got) == n
        assert all(g >= 1 for g in got)  # every class in every split (n >= 3)
        if n >= 10:
            assert all(abs(g - n * f) < 1 for g, f in zip(got, fractions, strict=True))


def test_split_deterministic_by_seed():
    y = _labels()
    a, b, c = split_indices(y, seed=5), split_indices(y, seed=5), split_indices(y, seed=6)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not torch.equal(a[1], c[1])


def test_split_zero_fraction_and_errors():
    y = _labels()
    tr, va, te = split_indices(y, (0.9, 0.1, 0.0))
    assert len(te) == 0 and len(tr) + len(va) == len(y)
    with pytest.raises(ValueError, match="sum to 1"):
        split_indices(y, (0.8, 0.1, 0.2))
    with pytest.raises(ValueError, match="three non-negative"):
        split_indices(y, (0.8, 0.2))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_channel_stats_equals_torch(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (50, 3, 9, 7), generator=g, dtype=torch.uint8)
    x[:, 1] //= 4  # channels with different statistics
    ref = x.double() / 255
    if dtype == torch.float32:
        x = x.float() / 255
    mean, std = channel_stats(x, chunk=7)  # small chunks exercise the merging
    assert mean == pytest.approx(ref.mean((0, 2, 3)).tolist(), abs=1e-6)
    assert std == pytest.approx(ref.std((0, 2, 3), correction=0).tolist(), abs=1e-6)


def test_channel_stats_small_variance_large_mean():
    # Values near 1 with a tiny spread: E[x^2] - E[x]^2 would cancel catastrophically.
    x = 1 - 1e-4 * torch.rand(40, 1, 5, 5, generator=torch.Generator().manual_seed(1))
    _, std = channel_stats(x, chunk=3)
    assert std[0] == pytest.approx(x.double().std(correction=0).item(), rel=1e-4)
