"""``shapes3d``: a procedural, seeded data set of solid shapes in noisy volumes.

Each volume holds ``count`` solids of one class (sphere, cube, torus, octahedron ...)
with a random position, size, orientation and brightness, in a background of smooth
low-frequency intensity variation plus Gaussian noise: the textbook setting of
volumetric segmentation (a bright or dark structure in noisy tissue), small enough to
train a 3D network on a laptop. A voxel mask marks the solid: 0 background,
``class + 1`` on its voxels.

Rasterisation is exact: a voxel belongs to a solid iff its centre
``(z + 0.5, y + 0.5, x + 0.5)`` lies inside the continuous solid, tested in the solid's
own rotated frame (a sphere by distance, a cube by the largest coordinate, an
octahedron by the sum of coordinates, a torus by its implicit equation, a cylinder by
radius and height). The same boolean raster paints the volume and the mask, and every
solid differs from the background's local level by at least 50 grey levels.

Training augments with flips along every axis only (the ``flips`` policy): a shift with
zero padding cuts solids at the border of a 16-voxel volume and paints a false edge, and
cost the 3D U-Net a tenth of its validation mIoU in a measured pair of runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ._registry import register_dataset
from ._types import Samples, convert_channels, spatial_size

__all__ = ["shapes3d", "SOLIDS", "rasterise_solid", "rotation"]

_TORUS_TUBE = 0.35  # the tube's radius as a share of the torus's outer radius
_CYLINDER_HALF_HEIGHT = 0.8  # half-height over the radius
_MIN_CONTRAST = 50.0  # grey levels between a solid and the background under it


def _sphere(p: np.ndarray) -> np.ndarray:
    return (p**2).sum(-1) <= 1.0


def _cube(p: np.ndarray) -> np.ndarray:
    return np.abs(p).max(-1) <= 1.0 / math.sqrt(3)  # circumradius 1


def _octahedron(p: np.ndarray) -> np.ndarray:
    return np.abs(p).sum(-1) <= 1.0


def _torus(p: np.ndarray) -> np.ndarray:
    ring = 1.0 - _TORUS_TUBE  # the tube's centre line, so the outer radius is 1
    from_ring = np.sqrt(p[..., 1] ** 2 + p[..., 2] ** 2) - ring
    return from_ring**2 + p[..., 0] ** 2 <= _TORUS_TUBE**2


def _cylinder(p: np.ndarray) -> np.ndarray:
    r = 1.0 / math.hypot(1.0, _CYLINDER_HALF_HEIGHT)  # circumradius 1
    round_ = p[..., 1] ** 2 + p[..., 2] ** 2 <= r * r
    return round_ & (np.abs(p[..., 0]) <= _CYLINDER_HALF_HEIGHT * r)


# Unit solids (circumradius 1) as inside-tests of points in their own frame, ``[..., 3]``
# with coordinates (z, y, x).
SOLIDS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "sphere": _sphere,
    "cube": _cube,
    "torus": _torus,
    "octahedron": _octahedron,
    "cylinder": _cylinder,
}


def rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3D rotation matrix (Shoemake 1992, "Uniform random rotations":
    a uniform unit quaternion)."""
    u1, u2, u3 = rng.random(3)
    a, b = math.sqrt(1 - u1), math.sqrt(u1)
    w, x, y, z = (a * math.sin(2 * math.pi * u2), a * math.cos(2 * math.pi * u2),
                  b * math.sin(2 * math.pi * u3), b * math.cos(2 * math.pi * u3))
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def rasterise_solid(kind: str, size: Sequence[int], center: Sequence[float], radius: float,
                    rot: np.ndarray | None = None) -> np.ndarray:
    """Boolean ``[D, H, W]`` raster of one solid: True where a voxel centre is inside.

    Args:
        kind: a key of :data:`SOLIDS`.
        size: ``(D, H, W)``.
        center: ``(z, y, x)`` in voxels; voxel ``(i, j, k)`` is centred at
            ``(i + .5, j + .5, k + .5)``.
        radius: circumradius in voxels.
        rot: ``3 x 3`` rotation of the solid (identity when None).

    Example:
        >>> from cnnkit.data.shapes3d import rasterise_solid
        >>> int(rasterise_solid("cube", (16, 16, 16), (8, 8, 8), 6 * 3 ** 0.5).sum())
        1728
    """
    if kind not in SOLIDS:
        raise ValueError(f"unknown solid {kind!r}; choose from {', '.join(SOLIDS)}")
    out = np.zeros(tuple(size), dtype=bool)
    box, inside = _raster_box(kind, size, center, radius, np.eye(3) if rot is None else rot)
    out[box] = inside
    return out


def _raster_box(kind, size, center, radius, rot):
    # Test the voxels of the solid's bounding box only, in the solid's own frame.
    lo = [max(0, math.floor(c - radius)) for c in center]
    hi = [min(n, math.ceil(c + radius) + 1) for c, n in zip(center, size, strict=True)]
    axes = [np.arange(a, b) + 0.5 - c for a, b, c in zip(lo, hi, center, strict=True)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1)  # [d, h, w, 3]
    local = grid @ rot / radius  # rows of rot are the solid's axes: p_local = R^T p
    return tuple(slice(a, b) for a, b in zip(lo, hi, strict=True)), SOLIDS[kind](local)


def _backgrounds(rng: np.random.Generator, n: int, size: tuple[int, ...]) -> np.ndarray:
    """float32 ``[N, D, H, W]`` smooth backgrounds: a base level plus a trilinearly
    upsampled 4x4x4 random field of +-25 levels."""
    base = rng.uniform(60, 195, n).astype(np.float32)
    field = rng.uniform(-25, 25, (n, 1, 4, 4, 4)).astype(np.float32)
    smooth = F.interpolate(torch.from_numpy(field), size=size, mode="trilinear",
                           align_corners=True)[:, 0].numpy()
    return base[:, None, None, None] + smooth


# Volumes need more steps than the task defaults give (docs/benchmarks.md, "Volumes"):
# unet3d at 16^3 reached test mIoU 0.89 after 28 epochs of AdamW, 0.83 after 24; with the
# segmentation defaults (SGD 0.05, 10 epochs) validation mIoU was 0.52 after 7 epochs.
@register_dataset(targets=("labels", "masks"),
                  recipes={"segment": {"epochs": 28, "optimizer": "adamw", "lr": 2e-3}})
def shapes3d(*, image_size: int | tuple[int, int, int] | None = None,
             channels: int | None = None, seed: int = 0, n: int = 600,
             size: int | tuple[int, int, int] = 16,
             shapes: Sequence[str] = ("sphere", "cube", "torus", "octahedron"),
             count: int = 1, noise: float = 12.0,
             radius: tuple[float, float] = (0.3, 0.45)) -> Samples:
    """Procedural solids in noisy volumes with exact voxel masks; seeded, any size.

    Args:
        image_size: volume size ``D = H = W`` or ``(D, H, W)``; overrides ``size``.
        channels: 1 (default, grey) or 3 (the grey level repeated).
        seed: the data is a pure function of the seed and the options.
        n: number of volumes; classes are balanced (``n // K`` or one more each).
        size: volume size when ``image_size`` is None.
        shapes: class names, in label order, from :data:`SOLIDS`.
        count: solids per volume, all of the volume's class (so the label stays well
            defined); each has its own position, size, orientation and brightness, they
            may overlap, and the mask is their union.
        noise: standard deviation of the Gaussian noise, in grey levels.
        radius: the range of a solid's circumradius as a share of the volume's shortest
            side (divided by ``count ** (1/3)`` for several solids), at least 3 voxels.

    Example:
        >>> from cnnkit.data.shapes3d import shapes3d
        >>> d = shapes3d(n=8, size=16)
        >>> d.input_size, d.masks.shape, d.mask_classes[:2]
        ((1, 16, 16, 16), torch.Size([8, 16, 16, 16]), ['background', 'sphere'])
    """
    dims = spatial_size(image_size if image_size is not None else size, 3)
    shapes = list(shapes)
    bad = [s for s in shapes if s not in SOLIDS]
    if bad or len(set(shapes)) < 2 or len(set(shapes)) != len(shapes):
        raise ValueError(f"shapes={shapes} is invalid; give at least two different names from "
                         f"{', '.join(SOLIDS)}")
    if n < 1 or not 1 <= count <= 255 or noise < 0:
        raise ValueError(f"n={n} must be at least 1, count={count} between 1 and 255 and "
                         f"noise={noise} not negative")
    if not 0 < radius[0] <= radius[1] <= 0.5:
        raise ValueError(f"radius={tuple(radius)} must be a range 0 < low <= high <= 0.5 "
                         "(a share of the volume's side)")
    if min(dims) < 8:
        raise ValueError(f"volume size {dims} is too small for shapes3d; give at least 8 voxels")

    # Every random number is drawn here, up front, in a fixed order.
    rng = np.random.default_rng(seed)
    k = len(shapes)
    labels = rng.permutation(np.arange(n) % k)
    side = min(dims)
    radius = np.maximum(rng.uniform(*radius, (n, count)) * side / count ** (1 / 3), 3.0)
    room = np.array(dims) - 2 * radius[..., None]
    centers = radius[..., None] + rng.random((n, count, 3)) * room
    rots = [[rotation(rng) for _ in range(count)] for _ in range(n)]
    contrast = rng.uniform(_MIN_CONTRAST, 100.0, (n, count)) * rng.choice([-1.0, 1.0],
                                                                          (n, count))
    volumes = _backgrounds(rng, n, dims)
    volumes += rng.normal(0.0, noise, volumes.shape).astype(np.float32)

    masks = np.zeros((n, *dims), dtype=np.uint8)
    for i in range(n):
        for j in range(count):
            box, inside = _raster_box(shapes[labels[i]], dims, centers[i, j], radius[i, j],
                                      rots[i][j])
            # the solid's level: the background's mean level under it, plus the contrast
            region = volumes[i][box]
            under = float(region[inside].mean()) if inside.any() else 128.0
            step = contrast[i, j]
            if not 0 <= under + step <= 255:  # brighter or darker, whichever fits in 0..255
                step = -step
            region[inside] = under + step + rng.normal(0.0, noise, int(inside.sum()))
            masks[i][box][inside] = labels[i] + 1
    images = torch.from_numpy(np.rint(volumes).clip(0, 255).astype(np.uint8))[:, None]
    images = convert_channels(images, channels)
    return Samples(images, torch.from_numpy(labels.astype(np.int64)), shapes, "shapes3d",
                   masks=torch.from_numpy(masks), augment="flips",
                   mask_classes=["background", *shapes])
