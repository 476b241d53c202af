"""Scores of explanations: faithfulness (deletion, insertion), localisation (pointing
game, energy in mask) and the model-randomisation sanity check.

Every score takes maps ``[B, *spatial]`` at input resolution, as the explainers return
them, for inputs ``[B, C, *spatial]`` of 1, 2 or 3 spatial dims: "pixels" below are the
samples of a signal, the pixels of an image or the voxels of a volume, all ranked and
counted together.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["deletion_insertion", "pointing_game", "energy_in_mask", "rank_correlation",
           "randomization_check"]


def _auc(curve: torch.Tensor) -> torch.Tensor:
    """Area under ``[B, S+1]`` curves sampled at fractions 0, 1/S, ..., 1 (trapezoids)."""
    return torch.trapezoid(curve, dx=1.0 / (curve.shape[1] - 1), dim=1)


@torch.no_grad()
def deletion_insertion(model: nn.Module, x: torch.Tensor, maps: torch.Tensor,
                       target: torch.Tensor | None = None, steps: int = 32,
                       mode: str = "deletion", baseline: torch.Tensor | float | str = "blur",
                       batch_size: int = 64, probability: bool = True) -> dict[str, torch.Tensor]:
    """Deletion or insertion AUC (Petsiuk, Das and Saenko 2018, "RISE: Randomized Input
    Sampling for Explanation of Black-box Models", BMVC).

    Pixels are ranked by the map (highest first). *Deletion* replaces the top-ranked
    fraction ``t`` of pixels by the baseline and records the target's probability as ``t``
    goes 0 -> 1: a faithful map makes it fall fast (low AUC is good). *Insertion* starts
    from the baseline and restores the top-ranked pixels: a faithful map makes the
    probability rise fast (high AUC is good). The paper's baselines: zeros for deletion,
    a blurred copy for insertion; ``"blur"`` here is a Gaussian blur along every spatial
    axis (sigma = 5% of the longest side) and works for both.

    Args:
        model: the classifier (evaluated in eval mode; its mode is restored).
        x: inputs ``[B, C, *spatial]``.
        maps: saliency ``[B, *spatial]``.
        target: class per image ``[B]``; the predicted class when None.
        steps: number of pixel fractions after 0 (the curve has ``steps + 1`` points).
        mode: ``"deletion"`` or ``"insertion"``.
        baseline: ``"blur"``, a number, or a tensor shaped like ``x``.
        batch_size: perturbed images per forward pass.
        probability: score the softmax probability (the paper) or, if False, the logit.

    Returns:
        ``{"auc": [B], "curve": [B, steps + 1]}``.

    Example:
        >>> import torch
        >>> from cnnkit.explain.scores import deletion_insertion
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
        >>> x = torch.rand(3, 1, 16)  # signals
        >>> deletion_insertion(model, x, x[:, 0], steps=4)["curve"].shape
        torch.Size([3, 5])
    """
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    b, spatial = x.shape[0], tuple(x.shape[2:])
    if maps.shape != (b, *spatial):
        raise ValueError(f"maps must be [B, *spatial] = {[b, *spatial]}, got "
                         f"{list(maps.shape)}")
    was_training = model.training
    model.eval()
    try:
        if isinstance(baseline, str):
            if baseline != "blur":
                raise ValueError(f"baseline must be 'blur', a number or a tensor, got {baseline!r}")
            base = _blur(x, sigma=max(0.5, 0.05 * max(spatial)))
        else:
            base = torch.as_tensor(baseline, dtype=x.dtype, device=x.device).expand_as(x)
        if target is None:
            target = model(x).argmax(1)
        order = maps.reshape(b, -1).argsort(dim=1, descending=True)
        n = math.prod(spatial)
        counts = torch.linspace(0, n, steps + 1).round().long()
        # rank[b, p]: position of pixel p in the image's ordering
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(n, device=x.device).expand(b, n))
        curve = torch.empty(b, steps + 1, device=x.device)
        for i in range(b):
            keep_top = rank[i][None, :] < counts.to(x.device)[:, None]  # [S+1, n]
            mask = keep_top.view(steps + 1, 1, *spatial).to(x.dtype)
            start, end = (x[i], base[i]) if mode == "deletion" else (base[i], x[i])
            for j in range(0, steps + 1, batch_size):
                m = mask[j:j + batch_size]
                out = model(start * (1 - m) + end * m)
                out = out.softmax(1) if probability else out
                curve[i, j:j + batch_size] = out[:, target[i]]
        return {"auc": _auc(curve), "curve": curve}
    finally:
        model.train(was_training)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """A Gaussian blur of ``[B, C, *spatial]``, one 1D pass per axis (last axis first), the
    borders replicated."""
    radius = max(1, int(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    c, dims = x.shape[1], x.ndim - 2
    conv = getattr(F, f"conv{dims}d")
    y = F.pad(x, (radius, radius) * dims, mode="replicate")
    for axis in reversed(range(dims)):  # the kernel lies along this spatial axis
        shape = [1] * dims
        shape[axis] = -1
        y = conv(y, k.view(1, 1, *shape).expand(c, 1, *shape), groups=c)
    return y


def pointing_game(maps: torch.Tensor, masks: torch.Tensor, tolerance: int = 0) -> torch.Tensor:
    """Hits of the pointing game (Zhang, Bargal, Lin, Brandt, Shen and Sclaroff 2018,
    "Top-down Neural Attention by Excitation Backprop", IJCV): 1 where the map's maximum
    falls on the object mask (or within ``tolerance`` pixels of it along every axis; the
    paper uses 15 at 224 px), else 0. Ties at the maximum: any tied pixel on the mask is a
    hit.

    Args:
        maps: ``[B, *spatial]`` (1, 2 or 3 spatial dims).
        masks: ``[B, *spatial]``, non-zero on the object.
        tolerance: how far from the mask (in pixels, a cube's half side) still hits.

    Returns:
        ``[B]`` floats in {0, 1}; their mean is the pointing accuracy.
    """
    if maps.shape != masks.shape:
        raise ValueError(f"maps {list(maps.shape)} and masks {list(masks.shape)} differ in shape")
    target = (masks != 0).float()
    if tolerance > 0:
        k = 2 * tolerance + 1
        max_pool = getattr(F, f"max_pool{maps.ndim - 1}d")
        target = max_pool(target[:, None], k, stride=1, padding=tolerance)[:, 0]
    peak = maps == maps.flatten(1).max(1).values.view(-1, *[1] * (maps.ndim - 1))
    return (peak & (target > 0)).flatten(1).any(1).float()


def energy_in_mask(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Share of the map's positive energy inside the object mask (the energy-based pointing
    game of Wang et al. 2020, "Score-CAM: Score-Weighted Visual Explanations for CNNs").

    Args:
        maps: ``[B, *spatial]``.
        masks: ``[B, *spatial]``, non-zero on the object.

    Returns:
        ``[B]`` in [0, 1]; 0 for an all-zero map.
    """
    if maps.shape != masks.shape:
        raise ValueError(f"maps {list(maps.shape)} and masks {list(masks.shape)} differ in shape")
    pos = maps.clamp(min=0).flatten(1)
    inside = (pos * (masks != 0).flatten(1)).sum(1)
    return inside / pos.sum(1).clamp(min=torch.finfo(pos.dtype).tiny)


def _ranks(v: torch.Tensor) -> torch.Tensor:
    """Ranks of each row (average ranks for ties), as floats."""
    order = v.argsort(dim=1)
    ranks = torch.empty_like(v)
    ranks.scatter_(1, order, torch.arange(v.shape[1], dtype=v.dtype, device=v.device)
                   .expand_as(v).contiguous())
    # average the ranks of tied values
    out = torch.empty_like(ranks)
    for i in range(v.shape[0]):
        uniq, inv = torch.unique(v[i], return_inverse=True)
        sums = torch.zeros(len(uniq), dtype=v.dtype, device=v.device).index_add_(0, inv, ranks[i])
        cnt = torch.zeros(len(uniq), dtype=v.dtype, device=v.device).index_add_(
            0, inv, torch.ones_like(ranks[i]))
        out[i] = (sums / cnt)[inv]
    return out


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation per input of maps ``[B, *spatial]`` (ties: average ranks)."""
    ra, rb = _ranks(a.flatten(1).double()), _ranks(b.flatten(1).double())
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    den = (ra.norm(dim=1) * rb.norm(dim=1)).clamp(min=1e-12)
    return (ra * rb).sum(1) / den


def randomization_check(explain: Callable[[nn.Module], torch.Tensor], model: nn.Module,
                        seed: int = 0) -> list[tuple[str, float]]:
    """The cascading model-randomisation sanity check (Adebayo, Gilmer, Muelly, Goodfellow,
    Hardt and Kim 2018, "Sanity Checks for Saliency Maps", NeurIPS).

    The layers with parameters are re-initialised one at a time from the top (output)
    down, cumulatively, on a deep copy of the model, and after each step the maps are
    compared with the trained model's maps by Spearman rank correlation. A method that
    depends on the learned weights loses correlation as layers are randomised; one that
    stays near 1 explains the input, not the model.

    Args:
        explain: ``f(model) -> maps [B, *spatial]`` on fixed inputs, e.g.
            ``lambda m: cnnkit.explain.create("gradcam", m)(x, target)``.
        model: the trained model (not modified).
        seed: seed of the re-initialisation.

    Returns:
        ``[(layer_name, mean rank correlation)]``: first ``"trained"`` (the unchanged
        copy, 1.0 for a deterministic method), then each layer from the top down.
    """
    reference = explain(model)
    work = copy.deepcopy(model)
    layers = [(n, m) for n, m in work.named_modules()
              if hasattr(m, "reset_parameters") and any(True for _ in m.parameters(recurse=False))]
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        out = [("trained", float(rank_correlation(reference, explain(work)).mean()))]
        for name, module in reversed(layers):
            module.reset_parameters()
            out.append((name, float(rank_correlation(reference, explain(work)).mean())))
    finally:
        torch.random.set_rng_state(gen_state)
    return out
