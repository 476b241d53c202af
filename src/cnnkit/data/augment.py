"""Batched data augmentation: whole-batch tensor ops on the batch's device, any spatial dims.

Every random parameter is drawn on the CPU from one ``torch.Generator`` (a few
numbers per image) and moved to the batch's device, so an augmentation is a pure
function of the generator's state: the same on CPU and GPU, and reproducible when
training resumes. The pixel work (flip, pad, gather, grid sample) runs on the
device with no per-sample Python loop.

Flips, shifts (pad and crop) and zooms work along every spatial axis of
``[B, C, *spatial]`` batches (series, images, volumes); rotations are 2D. A policy that
cannot apply to a batch's number of axes refuses it in one line.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["Augment", "register_augment", "list_augment", "EXACT_POLICIES", "flip", "hflip",
           "vflip", "pad_crop", "random_zoom", "random_affine", "affine_transform"]

AugmentFn = Callable[[torch.Tensor, "torch.Generator | None"], torch.Tensor]
_POLICIES: dict[str, AugmentFn] = {}

# Policies that only move whole pixels (flips, integer shifts, zero or mirror fill): applied
# to an image with its label mask stacked as one more channel, they move both alike and
# never blend two class indices. Interpolating policies (digits, affine) are not in it.
EXACT_POLICIES = frozenset({"none", "flip_crop", "shapes", "flips"})


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator | None,
             device: torch.device) -> torch.Tensor:
    return (lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)).to(device)


def flip(x: torch.Tensor, axis: int, p: float = 0.5, generator: torch.Generator | None = None
         ) -> torch.Tensor:
    """Flip each sample along tensor axis ``axis`` (-1: the last) with probability ``p``."""
    flipped = (torch.rand(x.shape[0], generator=generator) < p).to(x.device)
    return torch.where(flipped.view(-1, *[1] * (x.ndim - 1)), x.flip(axis), x)


def hflip(x: torch.Tensor, p: float = 0.5, generator: torch.Generator | None = None
          ) -> torch.Tensor:
    """Flip each sample along its last axis (left-right) with probability ``p``."""
    return flip(x, -1, p, generator)


def vflip(x: torch.Tensor, p: float = 0.5, generator: torch.Generator | None = None
          ) -> torch.Tensor:
    """Flip each image upside down (its second-last axis) with probability ``p``."""
    return flip(x, -2, p, generator)


def _flip_every_axis(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    # last axis first: in 2D that is hflip then vflip, the order the 2D policies always had
    for axis in range(x.ndim - 1, 1, -1):
        x = flip(x, axis, 0.5, generator)
    return x


def pad_crop(x: torch.Tensor, pad: int = 4, mode: str = "reflect",
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Pad by ``pad`` on every spatial axis and crop back at a random offset per sample.

    The translation augmentation of Krizhevsky, Sutskever and Hinton (2012),
    "ImageNet classification with deep convolutional neural networks", in the
    pad-4 form He, Zhang, Ren and Sun (2016), "Deep residual learning for image
    recognition", use on CIFAR. Each output is the input shifted by an offset in
    ``[-pad, pad]`` along each spatial axis (a series in time, an image in y and x, a
    volume in z, y and x), the uncovered border filled by reflection or zeros.

    Args:
        mode: ``"reflect"`` or ``"zeros"``; reflection needs ``pad`` below every spatial
            size and is capped there.
    """
    if mode not in ("reflect", "zeros"):
        raise ValueError(f"unknown padding mode {mode!r}; choose 'reflect' or 'zeros'")
    sizes = x.shape[2:]
    if mode == "reflect":
        pad = min(pad, *(s - 1 for s in sizes)) if sizes else 0
    if pad <= 0 or not sizes:
        return x
    xp = F.pad(x, (pad, pad) * len(sizes), mode="reflect" if mode == "reflect" else "constant")
    b = x.shape[0]
    # offsets drawn axis by axis, first spatial axis first (dy before dx in 2D)
    starts = [torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
              for _ in sizes]
    for i, (size, start) in enumerate(zip(sizes, starts, strict=True)):
        axis = 2 + i
        index = start[:, None] + torch.arange(size, device=x.device)  # [B, size]
        view = [b] + [1] * (xp.ndim - 1)
        view[axis] = size
        shape = list(xp.shape)
        shape[axis] = size
        xp = xp.gather(axis, index.view(view).expand(shape))
    return xp


def random_zoom(x: torch.Tensor, scale: tuple[float, float] = (0.9, 1.1),
                padding_mode: str = "zeros", generator: torch.Generator | None = None
                ) -> torch.Tensor:
    """Zoom each sample about its centre by a factor uniform in ``scale``, on every axis alike.

    Isotropic rescaling, the scale part of the affine distortions of Simard, Steinkraus
    and Platt (2003), "Best practices for convolutional neural networks applied to
    visual document analysis", for series, images and volumes: one ``F.affine_grid`` /
    ``F.grid_sample`` call for the batch ((bi/tri)linear; a series is sampled as a
    one-row image).

    Args:
        padding_mode: ``F.grid_sample``'s ``"zeros"``, ``"border"`` or ``"reflection"``.
    """
    dims = x.ndim - 2
    if dims not in (1, 2, 3):
        raise ValueError(f"zoom needs 1 to 3 spatial axes, got a batch of shape "
                         f"{tuple(x.shape)}")
    b = x.shape[0]
    inv = 1 / _uniform(b, scale[0], scale[1], generator, x.device)  # output -> input
    grid_dims = max(dims, 2)
    theta = torch.zeros(b, grid_dims, grid_dims + 1, dtype=torch.float64, device=x.device)
    for i in range(grid_dims):
        theta[:, i, i] = inv
    if dims == 1:
        theta[:, 1, 1] = 1.0  # the single row stays put
    y = x[:, :, None] if dims == 1 else x
    grid = F.affine_grid(theta.to(x), list(y.shape), align_corners=False)
    out = F.grid_sample(y, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)
    return out[:, :, 0] if dims == 1 else out


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
    _need_2d(x, "a rotation")
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


def _need_2d(x: torch.Tensor, what: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"{what} is defined for [B, C, H, W] images, not a batch of shape "
                         f"{tuple(x.shape)}; for series and volumes use an augmentation of "
                         "flips, shifts and zooms (flips, shapes, flip_crop, zoom) or none")


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
        >>> from cnnkit.data import list_augment
        >>> list_augment()
        ['affine', 'digits', 'flip_crop', 'flips', 'none', 'shapes', 'zoom']
    """
    return sorted(_POLICIES)


@register_augment
def none(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """No augmentation: the batch is returned as is."""
    return x


@register_augment
def flip_crop(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Random flip of the last axis, then pad 4 (reflect) and random crop on every axis."""
    return pad_crop(hflip(x, 0.5, generator), 4, "reflect", generator)


@register_augment
def flips(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Flips along every spatial axis and nothing else (no pixel is invented: super-resolution)."""
    return _flip_every_axis(x, generator)


@register_augment
def digits(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Small affine: +-10 degrees, scale 0.9-1.1, shift +-1/8 of size (1 px at 8x8), no flip."""
    return random_affine(x, 10.0, (0.9, 1.1), 0.125, "zeros", generator)


@register_augment
def shapes(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Flips along every axis, then pad 4 with zeros and random crop (no mirrored half-shapes)."""
    return pad_crop(_flip_every_axis(x, generator), 4, "zeros", generator)


@register_augment
def zoom(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Flips along every axis, then an isotropic zoom of 0.9-1.1 (series, images, volumes)."""
    return random_zoom(_flip_every_axis(x, generator), (0.9, 1.1), "zeros", generator)


@register_augment
def affine(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Random horizontal flip, then +-15 degrees, scale 0.85-1.15, shift +-10%, reflection fill."""
    return random_affine(hflip(x, 0.5, generator), 15.0, (0.85, 1.15), 0.1, "reflection",
                         generator)


class Augment:
    """A named augmentation policy applied to float ``[B, C, *spatial]`` batches.

    Args:
        policy: one of :func:`list_augment`.
        generator: CPU ``torch.Generator`` every random draw comes from; the global
            RNG when None.

    Example:
        >>> import torch
        >>> from cnnkit.data import Augment
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
        if not 2 <= x.ndim <= 5 or not x.is_floating_point():
            raise ValueError(f"Augment needs a float [B, C, *spatial] batch with 0 to 3 spatial "
                             f"axes, got {x.dtype} of shape {tuple(x.shape)}; convert uint8 "
                             "inputs with x.float() / 255")
        return self._fn(x, self.generator)

    def __repr__(self) -> str:
        return f"Augment({self.policy!r})"
