"""Stratified train/val/test splits and per-channel statistics for normalisation."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["split_indices", "channel_stats"]


def _counts(n: int, fractions: Sequence[float]) -> list[int]:
    """Split ``n`` by ``fractions``: largest remainders (each count within 1 of ``n * f``),
    then one sample moved to every empty split with a positive fraction while ``n`` allows."""
    exact = [n * f for f in fractions]
    counts = [math.floor(e) for e in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[:n - sum(counts)]:
        counts[i] += 1
    wanted = [i for i, f in enumerate(fractions) if f > 0]
    if n >= len(wanted):
        for i in wanted:
            if counts[i] == 0:
                counts[max(range(len(counts)), key=lambda j: counts[j])] -= 1
                counts[i] = 1
    return counts


def split_indices(labels: torch.Tensor, fractions: Sequence[float] = (0.8, 0.1, 0.1),
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stratified train/val/test indices: each class is split by ``fractions`` on its own.

    Per class, ``round``-like counts by the largest-remainder method keep every split
    within one sample of its exact share; a class with at least 3 samples (as many
    as there are positive fractions) has at least one sample in every split with a
    positive fraction, which for tiny classes wins over the proportions. The three
    index sets are disjoint, cover ``range(len(labels))``, are sorted, and depend on
    ``seed`` only (not on the device or the global RNG).

    Args:
        labels: int ``[N]`` class labels.
        fractions: (train, val, test) shares, non-negative, summing to 1; a zero share
            gives an empty split.
        seed: seed of the per-class shuffles.

    Example:
        >>> import torch
        >>> from cnnkit.data import split_indices
        >>> tr, va, te = split_indices(torch.arange(10).repeat(10), (0.8, 0.1, 0.1))
        >>> len(tr), len(va), len(te)
        (80, 10, 10)
    """
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions={fractions} must be three non-negative shares (train, val, "
                         "test) that sum to 1, e.g. (0.8, 0.1, 0.1)")
    labels = torch.as_tensor(labels).reshape(-1).cpu()
    gen = torch.Generator().manual_seed(seed)
    parts: list[list[torch.Tensor]] = [[], [], []]
    for c in torch.unique(labels).tolist():  # sorted classes: the order is fixed
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        start = 0
        for part, k in zip(parts, _counts(len(idx), fractions), strict=True):
            part.append(idx[start:start + k])
            start += k
    out = tuple(torch.sort(torch.cat(p))[0] if p else torch.empty(0, dtype=torch.long)
                for p in parts)
    return out  # type: ignore[return-value]


def channel_stats(images: torch.Tensor, chunk: int = 256) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation on the [0, 1] scale, in bounded memory.

    Over every sample and every spatial position (series, images, volumes alike).
    uint8 inputs are divided by 255. Statistics are accumulated in float64 over
    chunks of ``chunk`` samples, so memory stays at one float chunk. The standard
    deviation is the population one (``correction=0``), the convention for
    input normalisation.

    Example:
        >>> import torch
        >>> from cnnkit.data import channel_stats
        >>> mean, std = channel_stats(torch.full((2, 3, 4, 4), 255, dtype=torch.uint8))
        >>> mean, std
        ([1.0, 1.0, 1.0], [0.0, 0.0, 0.0])
    """
    if not 2 <= images.ndim <= 5 or images.shape[0] == 0:
        raise ValueError(f"channel_stats needs non-empty [N, C, *spatial] inputs, got shape "
                         f"{tuple(images.shape)}")
    scale = 255.0 if images.dtype == torch.uint8 else 1.0
    c = images.shape[1]
    # Chunks are merged with Chan et al.'s pairwise update (Chan, Golub and LeVeque 1983,
    # "Algorithms for computing the sample variance"), which stays accurate when the
    # variance is small next to the mean, unlike E[x^2] - E[x]^2.
    count, mean, m2 = 0, torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
    for x in images.split(chunk):
        x = x.to(torch.float64).div(scale).transpose(0, 1).reshape(c, -1)
        n_b = x.shape[1]
        mean_b = x.mean(1)
        m2_b = ((x - mean_b[:, None]) ** 2).sum(1)
        delta = mean_b - mean
        total = count + n_b
        mean = mean + delta * (n_b / total)
        m2 = m2 + m2_b + delta**2 * (count * n_b / total)
        count = total
    std = (m2 / count).sqrt()
    return mean.tolist(), std.tolist()
