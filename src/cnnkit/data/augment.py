"""Batched data augmentation: whole-batch tensor ops on the batch's device.

Every random parameter is drawn on the CPU from one ``torch.Generator`` (a few
numbers per image) and moved to the batch's device, so an augmentation is a pure
function of the generator's state: the same on CPU and GPU, and reproducible when
training resumes. The pixel work (flip, pad, gather, grid sample) runs on the
device with no per-sample Python loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["Augment", "register_augment", "list_augment", "EXACT_POLICIES", "hflip", "vflip",
           "pad_crop", "random_affine", "affine_transform"]

AugmentFn = Callable[[torch.Tensor, "torch.Generator | None"], torch.Tensor]
_POLICIES: dict[str, AugmentFn] = {}

# Policies that only move whole pixels (flips, integer shifts, zero or mirror fill): applied
# to an image with its label mask stacked as one more channel, they move both alike and
# never blend two class indices. Interpolating policies (digits, affine) are not in it.
EXACT_POLICIES = frozenset({"none", "flip_crop", "shapes", "flips"})


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator | None,
             device: torch.device) -> torch.Tensor:
    return (lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)).to(device)


def hflip(x: torch.Tensor, p: float = 0.5, generator: torch.Generator | None = None
          ) -> torch.Tensor:
    """Flip each image left-right with probability ``p``."""
    flip = (torch.rand(x.shape[0], generator=generator) < p).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def vflip(x: torch.Tensor, p: float = 0.5, generator: torch.Generator | None = None
          ) -> torch.Tensor:
    """Flip each image upside down with probability ``p``."""
    flip = (torch.rand(x.shape[0], generator=generator) < p).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-2), x)


def pad_crop(x: torch.Tensor, pad: int = 4, mode: str = "reflect",
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Pad by ``pad`` pixels and crop back to the input size at a random offset per image.

    The translation augmentation of Krizhevsky, Sutskever and Hinton (2012),
    "ImageNet classification with deep convolutional neural networks", in the
    pad-4 form He, Zhang, Ren and Sun (2016), "Deep residual learning for image
    recognition", use on CIFAR. Each output is the input shifted by ``(dy, dx)`` in
    ``[-pad, pad]``, the uncovered border filled by reflection or zeros.

    Args:
        mode: ``"reflect"`` or ``"zeros"``; reflection needs ``pad < H, W`` and is
            capped there.
    """
    if mode not in ("reflect", "zeros"):
        raise ValueError(f"unknown padding mode {mode!r}; choose 'reflect' or 'zeros'")
    b, c, h, w = x.shape
    if mode == "reflect":
        pad = min(pad, h - 1, w - 1)
    if pad <= 0:
        return x
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect" if mode == "reflect" else "constant")
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
    rows = dy[:, None] + torch.arange(h, device=x.device)  # [B, H]
    cols = dx[:, None] + torch.arange(w, device=x.device)  # [B, W]
    x = xp.gather(2, rows[:, None, :, None].expand(b, c, h, w + 2 * pad))
    return x.gather(3, cols[:, None, None, :].expand(b, c, h, w))


def random_affine(x: torch.Tensor, degrees: float = 10.0, scale: tuple[float, float] = (0.9, 1.1),
                  translate: float = 0.125, padding_mode: str = "zeros",
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Random rotation, isotropic scaling and translation per image, by bilinear resampling.

    The affine distortions of Simard, Steinkraus and Platt (2003), "Best practices
    for convolutional neural networks applied to visual document analysis".
    Rotation is uniform in ``[-degrees, degrees]`` about the centre, scale uniform in
    ``scale``, the shift uniform in ``[-translate, translate]`` times the width and
    height. One ``F.affine_grid`` / ``F.grid_sample`` call for the whole batch.

    Args:
        padding_mode: what fills pixels from outside the image: ``"zeros"``,
            ``"border"`` or ``"reflection"`` (``F.grid_sample``'s modes).
    """
    b = x.shape[0]
    ang = _uniform(b, -degrees, degrees, generator, x.device)
    s = _uniform(b, scale[0], scale[1], generator, x.device)
    tx = _uniform(b, -translate, translate, generator, x.device) * x.shape[-1]
    ty = _uniform(b, -translate, translate, generator, x.device) * x.shape[-2]
    return affine_transform(x, ang, s, tx, ty, padding_mode)


def affine_transform(x: torch.Tensor, angle: torch.Tensor, scale: torch.Tensor,
                     tx: torch.Tensor, ty: torch.Tensor, padding_mode: str = "zeros"
                     ) -> torch.Tensor:
    """Apply ``p -> scale * R(angle) p + (tx, ty)`` about the image centre, per image.

    Args:
        angle: ``[B]`` degrees; positive turns the content clockwise on screen (y points down).
        scale: ``[B]`` zoom factors (> 1 enlarges the content).
        tx, ty: ``[B]`` shifts in pixels (right, down).
        padding_mode: ``F.grid_sample``'s ``"zeros"``, ``"border"`` or ``"reflection"``.
    """
    _, _, h, w = x.shape
    rad = angle.to(torch.float64) * (math.pi / 180)
    s, tx, ty = scale.to(torch.float64), tx.to(torch.float64), ty.to(torch.float64)
    # grid_sample maps output to input, so build the inverse of p -> s R p + t in pixels
    # about the centre, then rescale to normalised coordinates (x by w/2, y by h/2).
    cos, sin = torch.cos(rad) / s, torch.sin(rad) / s
    a00, a01, a10, a11 = cos, sin, -sin, cos  # (s R)^-1 = R(-angle) / s
    bx, by = -(a00 * tx + a01 * ty), -(a10 * tx + a11 * ty)
    theta = torch.stack([torch.stack([a00, a01 * h / w, bx * 2 / w], 1),
                         torch.stack([a10 * w / h, a11, by * 2 / h], 1)], 1).to(x)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)


def register_augment(fn: AugmentFn) -> AugmentFn:
    """Register an augmentation policy ``fn(x, generator) -> x`` under its function name.

    Raises:
        ValueError: if a policy of that name is already registered.
    """
    if fn.__name__ in _POLICIES:
        raise ValueError(f"augmentation policy {fn.__name__!r} is registered twice; rename one")
    _POLICIES[fn.__name__] = fn
    return fn


def list_augment() -> list[str]:
    """Names of the augmentation policies, sorted.

    Example:
        >>> list_augment()
        ['affine', 'digits', 'flip_crop', 'none', 'shapes']
    """
    return sorted(_POLICIES)


@register_augment
def none(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """No augmentation: the batch is returned as is."""
    return x


@register_augment
def flip_crop(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Random horizontal flip, then pad 4 (reflect) and random crop (natural images)."""
    return pad_crop(hflip(x, 0.5, generator), 4, "reflect", generator)


@register_augment
def flips(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Flips both ways and nothing else (no pixel is invented: for super-resolution)."""
    return vflip(hflip(x, 0.5, generator), 0.5, generator)


@register_augment
def digits(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Small affine: +-10 degrees, scale 0.9-1.1, shift +-1/8 of size (1 px at 8x8), no flip."""
    return random_affine(x, 10.0, (0.9, 1.1), 0.125, "zeros", generator)


@register_augment
def shapes(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Flips both ways, then pad 4 with zeros and random crop (zeros: no mirrored half-shapes)."""
    return pad_crop(vflip(hflip(x, 0.5, generator), 0.5, generator), 4, "zeros", generator)


@register_augment
def affine(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Random horizontal flip, then +-15 degrees, scale 0.85-1.15, shift +-10%, reflection fill."""
    return random_affine(hflip(x, 0.5, generator), 15.0, (0.85, 1.15), 0.1, "reflection",
                         generator)


class Augment:
    """A named augmentation policy applied to float ``[B, C, H, W]`` batches.

    Args:
        policy: one of :func:`list_augment`.
        generator: CPU ``torch.Generator`` every random draw comes from; the global
            RNG when None.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> Augment("flip_crop", g)(torch.rand(8, 3, 32, 32)).shape
        torch.Size([8, 3, 32, 32])
    """

    def __init__(self, policy: str = "none", generator: torch.Generator | None = None) -> None:
        if policy not in _POLICIES:
            raise ValueError(f"unknown augmentation {policy!r}; choose from "
                             f"{', '.join(list_augment())}")
        self.policy, self.generator = policy, generator
        self._fn = _POLICIES[policy]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or not x.is_floating_point():
            raise ValueError(f"Augment needs a float [B, C, H, W] batch, got {x.dtype} of shape "
                             f"{tuple(x.shape)}; convert uint8 images with x.float() / 255")
        return self._fn(x, self.generator)

    def __repr__(self) -> str:
        return f"Augment({self.policy!r})"
