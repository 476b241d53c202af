"""Scores of explanations: faithfulness (deletion, insertion), localisation (pointing
game, energy in mask) and the model-randomisation sanity check.

Every score takes maps ``[B, H, W]`` at input resolution, as the explainers return them.
"""

from __future__ import annotations

import copy
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
    a blurred copy for insertion; ``"blur"`` here is a Gaussian blur (sigma = 5% of the
    image side) and works for both.

    Args:
        model: the classifier (evaluated in eval mode; its mode is restored).
        x: images ``[B, C, H, W]``.
        maps: saliency ``[B, H, W]``.
        target: class per image ``[B]``; the predicted class when None.
        steps: number of pixel fractions after 0 (the curve has ``steps + 1`` points).
        mode: ``"deletion"`` or ``"insertion"``.
        baseline: ``"blur"``, a number, or a tensor shaped like ``x``.
        batch_size: perturbed images per forward pass.
        probability: score the softmax probability (the paper) or, if False, the logit.

    Returns:
        ``{"auc": [B], "curve": [B, steps + 1]}``.
    """
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    b, c, h, w = x.shape
    if maps.shape != (b, h, w):
        raise ValueError(f"maps must be [B, H, W] = {[b, h, w]}, got {list(maps.shape)}")
    was_training = model.training
    model.eval()
    try:
        if isinstance(baseline, str):
            if baseline != "blur":
                raise ValueError(f"baseline must be 'blur', a number or a tensor, got {baseline!r}")
            base = _blur(x, sigma=max(0.5, 0.05 * max(h, w)))
        else:
            base = torch.as_tensor(baseline, dtype=x.dtype, device=x.device).expand_as(x)
        if target is None:
            target = model(x).argmax(1)
        order = maps.reshape(b, -1).argsort(dim=1, descending=True)
        n = h * w
        counts = torch.linspace(0, n, steps + 1).round().long()
        # rank[b, p]: position of pixel p in the image's ordering
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(n, device=x.device).expand(b, n))
        curve = torch.empty(b, steps + 1, device=x.device)
        for i in range(b):
            keep_top = rank[i][None, :] < counts.to(x.device)[:, None]  # [S+1, n]
            mask = keep_top.view(steps + 1, 1, h, w).to(x.dtype)
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
    radius = max(1, int(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[1]
    pad = (radius, radius, radius, radius)
    y = F.pad(x, pad, mode="replicate")
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def pointing_game(maps: torch.Tensor, masks: torch.Tensor, tolerance: int = 0) -> torch.Tensor:
    """Hits of the pointing game (Zhang, Bargal, Lin, Brandt, Shen and Sclaroff 2018,
    "Top-down Neural Attention by Excitation Backprop", IJCV): 1 where the map's maximum
    falls on the object mask (or within ``tolerance`` pixels of it; the paper uses 15 at
    224 px), else 0. Ties at the maximum: any tied pixel on the mask is a hit.

    Args:
        maps: ``[B, H, W]``.
        masks: ``[B, H, W]``, non-zero on the object.

    Returns:
        ``[B]`` floats in {0, 1}; their mean is the pointing accuracy.
    """
    if maps.shape != masks.shape:
        raise ValueError(f"maps {list(maps.shape)} and masks {list(masks.shape)} differ in shape")
    target = (masks != 0).float()
    if tolerance > 0:
        k = 2 * tolerance + 1
        target = F.max_pool2d(target[:, None], k, stride=1, padding=tolerance)[:, 0]
    peak = maps == maps.flatten(1).max(1).values.view(-1, 1, 1)
    return (peak & (target > 0)).flatten(1).any(1).float()


def energy_in_mask(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Share of the map's positive energy inside the object mask (the energy-based pointing
    game of Wang et al. 2020, "Score-CAM: Score-Weighted Visual Explanations for CNNs").

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
    """Spearman rank correlation per image of maps ``[B, H, W]`` (ties: average ranks)."""
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
        explain: ``f(model) -> maps [B, H, W]`` on fixed inputs, e.g.
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
