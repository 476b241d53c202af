"""``shapes``: a procedural, seeded data set of geometric shapes on textured backgrounds.

Each image shows ``count`` filled shapes of one class (circle, square, triangle,
star ...) with a random colour, position, size and rotation on a random textured
background (smooth value noise, stripes or a checkerboard in two random colours).
A pixel mask marks the shape: 0 background, ``class + 1`` on the shape's pixels.

Rasterisation is exact and anti-aliasing-free: a pixel belongs to a shape iff its
centre ``(col + 0.5, row + 0.5)`` lies inside the continuous shape (circles by
distance, polygons by the even-odd crossing rule). The same boolean raster paints
the image and the mask, and every shape colour is kept at least 40 luma levels
away from every background colour of its image, so the mask is exactly the set
of pixels that have the shape's colour, in RGB and in grayscale alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ._registry import register_dataset
from ._types import ImageData, convert_channels, to_size

__all__ = ["shapes", "SHAPE_KINDS", "BACKGROUNDS", "rasterise"]

_LUMA = np.array([0.299, 0.587, 0.114])
_STAR_INNER = 0.5  # inner/outer radius of the star; 0.38 is the pentagram, 0.5 keeps it bold
_CROSS_ARM = 0.35  # half-width of a cross's arm relative to its half-length
_MIN_CONTRAST = 40.0  # luma levels between a shape colour and any background colour


def _regular(k: int, start: float) -> np.ndarray:
    a = start + 2 * math.pi * np.arange(k) / k
    return np.stack([np.cos(a), np.sin(a)], 1)


def _star() -> np.ndarray:
    a = -math.pi / 2 + math.pi * np.arange(10) / 5
    r = np.where(np.arange(10) % 2 == 0, 1.0, _STAR_INNER)
    return np.stack([r * np.cos(a), r * np.sin(a)], 1)


def _cross() -> np.ndarray:
    a, b = _CROSS_ARM, 1.0
    pts = np.array([(a, b), (a, a), (b, a), (b, -a), (a, -a), (a, -b),
                    (-a, -b), (-a, -a), (-b, -a), (-b, a), (-a, a), (-a, b)])
    return pts / math.hypot(a, b)  # circumradius 1 like every other shape


# Unit polygons (circumradius 1, image coordinates: y points down); None is the circle.
SHAPE_KINDS: dict[str, np.ndarray | None] = {
    "circle": None,
    "square": _regular(4, math.pi / 4),
    "triangle": _regular(3, -math.pi / 2),
    "star": _star(),
    "pentagon": _regular(5, -math.pi / 2),
    "hexagon": _regular(6, 0.0),
    "cross": _cross(),
}
BACKGROUNDS = ("mixed", "noise", "stripes", "checker", "plain")


def rasterise(kind: str, height: int, width: int, center: tuple[float, float], radius: float,
              angle: float = 0.0) -> np.ndarray:
    """Boolean ``[height, width]`` raster of one shape: True where a pixel centre is inside.

    Args:
        kind: a key of :data:`SHAPE_KINDS`.
        center: ``(x, y)`` in pixels; pixel ``(row, col)`` is centred at ``(col + .5, row + .5)``.
        radius: circumradius in pixels (a square's side is ``radius * sqrt(2)``).
        angle: rotation in radians.

    Example:
        >>> int(rasterise("square", 32, 32, (16, 16), 10 * 2 ** 0.5, angle=0.0).sum())
        400
    """
    if kind not in SHAPE_KINDS:
        raise ValueError(f"unknown shape {kind!r}; choose from {', '.join(SHAPE_KINDS)}")
    out = np.zeros((height, width), dtype=bool)
    (y0, y1, x0, x1), inside = _raster_box(kind, height, width, center, radius, angle)
    out[y0:y1, x0:x1] = inside
    return out


def _raster_box(kind, height, width, center, radius, angle):
    # Rasterise inside the shape's bounding box only: a few thousand pixels, not H * W.
    cx, cy = center
    x0, x1 = max(0, math.floor(cx - radius)), min(width, math.ceil(cx + radius) + 1)
    y0, y1 = max(0, math.floor(cy - radius)), min(height, math.ceil(cy + radius) + 1)
    xs, ys = np.arange(x0, x1) + 0.5, np.arange(y0, y1) + 0.5
    unit = SHAPE_KINDS[kind]
    if unit is None:
        inside = (xs[None, :] - cx) ** 2 + (ys[:, None] - cy) ** 2 <= radius * radius
        return (y0, y1, x0, x1), inside
    c, s = math.cos(angle), math.sin(angle)
    verts = radius * unit @ np.array([[c, s], [-s, c]]) + np.array([cx, cy])
    ax, ay = verts[:, 0:1], verts[:, 1:2]  # [V, 1]
    bx, by = np.concatenate([ax[1:], ax[:1]]), np.concatenate([ay[1:], ay[:1]])
    # Even-odd rule: count the edges a ray from each pixel centre towards +x crosses.
    spans = (ay > ys) != (by > ys)  # [V, h]: the edge spans this row's height
    with np.errstate(divide="ignore", invalid="ignore"):
        x_cross = ax + (ys - ay) * (bx - ax) / (by - ay)  # [V, h]
    crossings = spans[:, :, None] & (xs[None, None, :] < x_cross[:, :, None])  # [V, h, w]
    return (y0, y1, x0, x1), crossings.sum(0) % 2 == 1


def _luma(c: np.ndarray) -> np.ndarray:
    return c @ _LUMA


def _backgrounds(kinds, params, c1, c2, h, w) -> np.ndarray:
    """uint8 ``[B, 3, H, W]`` backgrounds ``c1 + t * (c2 - c1)`` for a chunk of images."""
    # NumPy float32, single-threaded on purpose: these are many small array ops, where
    # a thread pool's synchronisation costs more than it saves on a busy machine.
    b = len(kinds)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + np.float32(0.5)
    t = np.zeros((b, h, w), dtype=np.float32)
    noise = kinds == "noise"
    if noise.any():  # smooth value noise: a 4x4 random grid upsampled bilinearly
        grid = torch.from_numpy(params["grid"][noise])[:, None]
        up = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=True)[:, 0].numpy()
        lo, hi = up.min((1, 2), keepdims=True), up.max((1, 2), keepdims=True)
        t[noise] = (up - lo) / np.maximum(hi - lo, 1e-6)
    stripes = kinds == "stripes"
    if stripes.any():
        th, f, ph = (params[k][stripes, None, None].astype(np.float32)
                     for k in ("theta", "freq", "phase"))
        proj = (xx * np.cos(th) + yy * np.sin(th)) * np.float32(2 * math.pi / min(h, w))
        t[stripes] = np.sin(f * proj + ph) > 0
    checker = kinds == "checker"
    if checker.any():
        cell, ox, oy = (params[k][checker, None, None].astype(np.float32)
                        for k in ("cell", "ox", "oy"))
        t[checker] = ((xx + ox) // cell + (yy + oy) // cell) % 2
    lo = c1.astype(np.float32)[:, :, None, None]
    d = (c2 - c1).astype(np.float32)[:, :, None, None]
    bg = lo + t[:, None] * d
    return np.rint(bg, out=bg).clip(0, 255, out=bg).astype(np.uint8)


def _shape_colours(rng: np.random.Generator, c1: np.ndarray, c2: np.ndarray,
                   count: int) -> np.ndarray:
    """Random shape colours ``[N, count, 3]`` at least 40 luma levels from the background."""
    lmin = np.minimum(_luma(c1), _luma(c2))[:, None] - _MIN_CONTRAST
    lmax = np.maximum(_luma(c1), _luma(c2))[:, None] + _MIN_CONTRAST
    col = rng.integers(0, 256, (len(c1), count, 3)).astype(np.float64)
    for _ in range(20):  # rejection sampling; the few left are set to black or white
        bad = (_luma(col) > lmin) & (_luma(col) < lmax)
        if not bad.any():
            break
        col[bad] = rng.integers(0, 256, (int(bad.sum()), 3))
    bad = (_luma(col) > lmin) & (_luma(col) < lmax)
    # The background's luma range is at most 100 wide, so black or white always qualifies.
    col[bad] = np.where((lmin >= 0) & bad, 0.0, 255.0)[bad][:, None]
    return col.astype(np.uint8)


@register_dataset(targets=("labels", "masks"))
def shapes(*, image_size: int | tuple[int, int] | None = None, channels: int | None = None,
           seed: int = 0, n: int = 3000, size: int | tuple[int, int] = 64,
           shapes: Sequence[str] = ("circle", "square", "triangle", "star"), count: int = 1,
           background: str = "mixed") -> ImageData:
    """Procedural shapes on textured backgrounds with exact pixel masks; RGB, seeded, any size.

    Args:
        image_size: image size; overrides ``size``.
        channels: 1 for grayscale (luma), 3 (default) for RGB.
        seed: the data is a pure function of the seed and the options.
        n: number of images; classes are balanced (``n // K`` or one more each).
        size: image size ``H = W`` or ``(H, W)`` when ``image_size`` is None.
        shapes: class names, in label order, from :data:`SHAPE_KINDS`.
        count: shapes per image. With ``count > 1`` all shapes of an image are of
            the image's class (so the label stays well defined); each has its own
            colour, position, size and rotation, they may overlap, and the mask is
            their union.
        background: ``"mixed"`` (noise, stripes or checker at random), one of those
            three, or ``"plain"`` (one colour).
    """
    h, w = to_size(image_size if image_size is not None else size)
    shapes = list(shapes)
    bad = [s for s in shapes if s not in SHAPE_KINDS]
    if bad or len(set(shapes)) < 2 or len(set(shapes)) != len(shapes):
        raise ValueError(f"shapes={shapes} is invalid; give at least two different names from "
                         f"{', '.join(SHAPE_KINDS)}")
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}; choose from {', '.join(BACKGROUNDS)}")
    if n < 1 or not 1 <= count <= 255:
        raise ValueError(f"n={n} must be at least 1 and count={count} between 1 and 255")
    if min(h, w) < 8:
        raise ValueError(f"image size {(h, w)} is too small for shapes; give at least 8 pixels")

    # Every random number is drawn here, up front, so the data does not depend on chunking.
    rng = np.random.default_rng(seed)
    k = len(shapes)
    labels = rng.permutation(np.arange(n) % k)
    radius = np.maximum(rng.uniform(0.12, 0.3, (n, count)) * min(h, w) / math.sqrt(count), 2.0)
    cx = radius + rng.random((n, count)) * (w - 2 * radius)
    cy = radius + rng.random((n, count)) * (h - 2 * radius)
    angle = rng.uniform(0, 2 * math.pi, (n, count))
    kinds = (rng.choice(np.array(BACKGROUNDS[1:4]), n) if background == "mixed"
             else np.full(n, background))
    side = min(h, w)
    params = {"grid": rng.random((n, 4, 4)).astype(np.float32),
              "theta": rng.uniform(0, math.pi, n), "freq": rng.uniform(1.5, 5.0, n),
              "phase": rng.uniform(0, 2 * math.pi, n),
              "cell": rng.integers(max(2, side // 16), max(3, side // 4) + 1, n).astype(np.float32),
              "ox": rng.uniform(0, side, n), "oy": rng.uniform(0, side, n)}
    c1 = rng.integers(0, 256, (n, 3)).astype(np.float64)
    c2 = np.clip(c1 + rng.uniform(-100, 100, (n, 3)), 0, 255)  # keeps the luma range <= 100
    colours = _shape_colours(rng, c1, c2, count)

    images = np.empty((n, 3, h, w), dtype=np.uint8)
    masks = np.empty((n, h, w), dtype=np.uint8)
    for start in range(0, n, 256):  # chunks bound the float background buffers
        sl = slice(start, min(n, start + 256))
        idx = np.zeros((sl.stop - start, h, w), dtype=np.uint8)  # j + 1 where shape j is
        for i in range(sl.start, sl.stop):
            for j in range(count):
                (y0, y1, x0, x1), inside = _raster_box(
                    shapes[labels[i]], h, w, (cx[i, j], cy[i, j]), radius[i, j], angle[i, j])
                idx[i - start, y0:y1, x0:x1][inside] = j + 1
        out = _backgrounds(kinds[sl], {k_: v[sl] for k_, v in params.items()}, c1[sl], c2[sl],
                           h, w)
        for j in range(count):  # later shapes are painted over earlier ones
            np.copyto(out, colours[sl, j, :, None, None], where=idx[:, None] == j + 1)
        images[sl] = out
        masks[sl] = (idx > 0) * (labels[sl, None, None] + 1).astype(np.uint8)

    images = convert_channels(torch.from_numpy(images), channels)
    return ImageData(images, torch.from_numpy(labels.astype(np.int64)), shapes, "shapes",
                     masks=torch.from_numpy(masks), augment="shapes",
                     mask_classes=["background", *shapes])
