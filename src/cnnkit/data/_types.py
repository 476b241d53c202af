"""The in-memory data container and the tensor helpers every loader shares.

Everything cnnkit trains on fits in memory as one tensor of samples ``[N, C, *spatial]``
with 0 to 3 spatial axes: series ``[N, C, L]``, images ``[N, C, H, W]``, volumes
``[N, C, D, H, W]``. Inputs are stored as uint8 where the source is 8-bit (4x smaller
than float32) and converted to float batch by batch by :class:`cnnkit.data.TensorLoader`.

:class:`Samples` is the one container of stacked tensors; a modality whose batch is not
one stacked tensor (graphs) brings its own container with the same surface
(``len``, ``subset``, ``input_size``, ``labels``) and the loader's batching hook.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cnnkit._limits import require_memory

__all__ = ["Samples", "ImageData", "IGNORE_INDEX", "MAX_SPATIAL_DIMS", "to_size",
           "spatial_size", "convert_channels", "resize_images", "resize_masks", "downscale"]

IGNORE_INDEX = 255  # mask value of unlabelled pixels (the Pascal VOC convention)
MAX_SPATIAL_DIMS = 3

# ITU-R BT.601 luma weights, the ones Pillow's ``convert("L")`` uses.
_LUMA = (0.299, 0.587, 0.114)
_SHAPES = "[N, C] features, [N, C, L] series, [N, C, H, W] images or [N, C, D, H, W] volumes"


@dataclass
class Samples:
    """Inputs ``[N, C, *spatial]``, their targets and names, held in memory.

    Attributes:
        inputs: uint8 ``[N, C, *spatial]`` in 0..255, or float32 ``[N, C, *spatial]`` in
            [0, 1], with 0 to 3 spatial axes. ``images`` is the same tensor under its 2D
            name.
        labels: int64 ``[N]``, class indices into ``classes``.
        classes: class names; ``classes[k]`` is the name of label ``k``.
        name: ``"digits"``, ``"shapes"`` or the path the data was read from.
        masks: uint8 ``[N, *spatial]`` dense labels (a pixel's or voxel's class) whose
            values index ``mask_classes`` (255: ignored), else None. ``shapes`` has 0 for
            the background and ``k + 1`` on pixels of class ``k``.
        mask_classes: names of the mask values (``["background", "circle", ...]``);
            None without masks.
        augment: name of the default augmentation policy for this data
            (see :func:`cnnkit.data.list_augment`).
        skipped: number of unreadable or corrupt files skipped while loading.
        sources: the file each sample was read from (user data), else None.
        values: float32 ``[N, K]`` real targets (regression), named by ``classes``, else
            None; ``labels`` are then all 0 (one stratum for the split).
        lengths: int64 ``[N]`` valid lengths along the last spatial axis of
            variable-length samples (series padded to one length), else None.

    Example:
        >>> import torch
        >>> from cnnkit.data import Samples
        >>> d = Samples(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 0, 1]),
        ...             ["a", "b"], "toy")
        >>> d.input_size, d.spatial_dims, d.num_classes, len(d)
        ((1, 8, 8), 2, 2, 4)
    """

    inputs: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    name: str
    masks: torch.Tensor | None = None
    augment: str = "none"
    mask_classes: list[str] | None = None
    skipped: int = 0
    sources: list[str] | None = None
    values: torch.Tensor | None = None
    lengths: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not 2 <= self.inputs.ndim <= 2 + MAX_SPATIAL_DIMS:
            raise ValueError(f"data {self.name!r}: inputs must be {_SHAPES}, got shape "
                             f"{tuple(self.inputs.shape)}; add a channel axis for one channel")
        self.labels = torch.as_tensor(self.labels).long()
        n = self.inputs.shape[0]
        if self.labels.shape != (n,):
            raise ValueError(f"data {self.name!r}: {n} samples but labels of shape "
                             f"{tuple(self.labels.shape)}; give exactly one label per sample")
        if self.masks is not None and self.masks.shape != (n, *self.inputs.shape[2:]):
            raise ValueError(f"data {self.name!r}: masks of shape {tuple(self.masks.shape)} do "
                             f"not match inputs {tuple(self.inputs.shape)}; masks are "
                             "[N, *spatial], one class per pixel or voxel")
        if self.masks is not None and self.mask_classes is None:
            top = int(self.masks[self.masks != IGNORE_INDEX].max()) if self.masks.numel() else 0
            self.mask_classes = [str(k) for k in range(top + 1)]
        if self.values is not None:
            self.values = torch.as_tensor(self.values, dtype=torch.float32)
            if self.values.ndim == 1:
                self.values = self.values[:, None]
            if self.values.ndim != 2 or len(self.values) != n:
                raise ValueError(f"data {self.name!r}: values of shape {tuple(self.values.shape)}"
                                 f" for {n} samples; give [N] or [N, K] values")
            if len(self.classes) != self.values.shape[1]:
                raise ValueError(f"data {self.name!r}: {self.values.shape[1]} values per sample "
                                 f"but {len(self.classes)} names; name each value once")
        if self.sources is not None and len(self.sources) != n:
            raise ValueError(f"data {self.name!r}: {len(self.sources)} sources for {n} samples; "
                             "give one source path per sample")
        if self.lengths is not None:
            self._check_lengths(n)

    def _check_lengths(self, n: int) -> None:
        self.lengths = torch.as_tensor(self.lengths).long()
        if self.inputs.ndim < 3:
            raise ValueError(f"data {self.name!r}: lengths need a spatial axis; [N, C] features "
                             "have none, leave lengths out")
        full = self.inputs.shape[-1]
        if self.lengths.shape != (n,) or (n and (int(self.lengths.min()) < 1
                                                  or int(self.lengths.max()) > full)):
            raise ValueError(f"data {self.name!r}: lengths must be [N] ints in 1..{full} (the "
                             f"padded length), got shape {tuple(self.lengths.shape)}; give each "
                             "sample's valid length")

    @property
    def images(self) -> torch.Tensor:
        """The inputs under their 2D name (the same tensor as :attr:`inputs`)."""
        return self.inputs

    @images.setter
    def images(self, value: torch.Tensor) -> None:
        self.inputs = value

    @property
    def input_size(self) -> tuple[int, ...]:
        """``(C, *spatial)`` of one sample: ``(C, L)``, ``(C, H, W)`` or ``(C, D, H, W)``."""
        return tuple(int(s) for s in self.inputs.shape[1:])

    @property
    def spatial_dims(self) -> int:
        """Number of spatial axes: 0 (features), 1 (series), 2 (images), 3 (volumes)."""
        return self.inputs.ndim - 2

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def subset(self, indices: torch.Tensor | Sequence[int]) -> Samples:
        """The samples at ``indices`` (every per-sample field follows), same classes and policy."""
        idx = torch.as_tensor(indices, dtype=torch.long)

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[idx]

        return Samples(
            self.inputs[idx], self.labels[idx], list(self.classes), self.name,
            masks=pick(self.masks), augment=self.augment, mask_classes=self.mask_classes,
            skipped=self.skipped,
            sources=None if self.sources is None else [self.sources[i] for i in idx.tolist()],
            values=pick(self.values), lengths=pick(self.lengths))


ImageData = Samples  # the container's name from when every sample was an image


def to_size(size: int | Sequence[int]) -> tuple[int, int]:
    """``64 -> (64, 64)``; ``(h, w)`` -> ``(h, w)``; raises ValueError on non-positive sizes."""
    h, w = spatial_size(size, 2)
    return h, w


def spatial_size(size: int | Sequence[int], dims: int) -> tuple[int, ...]:
    """A size for ``dims`` spatial axes: an int is the same size on every axis.

    Example:
        >>> from cnnkit.data._types import spatial_size
        >>> spatial_size(16, 3), spatial_size((8, 12), 2)
        ((16, 16, 16), (8, 12))
    """
    sizes = (size,) * dims if isinstance(size, int) else tuple(int(s) for s in size)
    if len(sizes) != dims or min(sizes, default=1) < 1:
        raise ValueError(f"image_size {size} must be a positive int or {dims} positive sizes "
                         f"(one per spatial axis)")
    return sizes


def convert_channels(images: torch.Tensor, channels: int | None) -> torch.Tensor:
    """Convert ``[N, C, *spatial]`` inputs between 1 (luma) and 3 (RGB) channels; keeps the dtype.

    RGB -> gray uses the ITU-R BT.601 luma weights (as Pillow's ``convert("L")``);
    gray -> RGB repeats the channel. ``channels=None`` returns the images unchanged.
    """
    if channels is None or channels == images.shape[1]:
        return images
    if channels not in (1, 3):
        raise ValueError(f"channels={channels} is not supported; give 1 (grayscale) or 3 (RGB)")
    if images.shape[1] == 1:
        return images.expand(-1, 3, *images.shape[2:]).contiguous()
    w = torch.tensor(_LUMA, dtype=torch.float32).view(1, 3, *[1] * (images.ndim - 2))
    chunks = []
    for chunk in images.split(1024):  # bounded memory: float copies one chunk at a time
        gray = (chunk.float() * w).sum(1, keepdim=True)
        chunks.append(gray.round().clamp(0, 255).to(torch.uint8)
                      if images.dtype == torch.uint8 else gray)
    return torch.cat(chunks)


def resize_images(images: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    """Resize ``[N, C, *spatial]`` so the sample covers ``size``, then centre crop; keeps the dtype.

    For a square ``size`` this is "shorter side to size, then centre crop" (a cube for
    volumes, a length for series). Images use bilinear interpolation with antialiasing
    (so downscaling does not alias); series and volumes use (tri)linear interpolation
    when enlarged and area averaging, which does not alias either, when shrunk.
    """
    dims = images.ndim - 2
    target = spatial_size(size, dims)
    now = tuple(int(v) for v in images.shape[2:])
    if now == target:
        return images
    cover, start = _cover(now, target)
    n, c = images.shape[:2]
    # float working copies a chunk at a time, a chunk at most ~256 MB: the output is the
    # one allocation that grows with the data, and it is checked first
    per_sample = c * _prod(cover) * 4
    shown = "x".join(map(str, now))
    require_memory(n * c * _prod(target) * images.element_size() + min(n, 64) * per_sample,
                   f"resizing {n} samples of {c}x{shown} to {c}x{'x'.join(map(str, target))}",
                   f"give a smaller size (the samples are {shown})")
    crop = tuple(slice(o, o + t) for o, t in zip(start, target, strict=True))
    out = []
    for chunk in images.split(max(1, min(512, 2**28 // per_sample))):
        x = _interpolate(chunk.float(), cover, shrink=_prod(cover) < _prod(now))[(..., *crop)]
        out.append(x.round().clamp(0, 255).to(torch.uint8) if images.dtype == torch.uint8
                   else x.clamp(0, 1))
    return torch.cat(out)


def _interpolate(x: torch.Tensor, size: tuple[int, ...], shrink: bool) -> torch.Tensor:
    if x.ndim == 4:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    if shrink:
        return F.interpolate(x, size=size, mode="area")
    mode = {3: "linear", 5: "trilinear"}[x.ndim]
    return F.interpolate(x, size=size, mode=mode, align_corners=False)


def _prod(sizes: Sequence[int]) -> int:
    out = 1
    for v in sizes:
        out *= int(v)
    return out


def _cover(now: Sequence[int], target: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    # The scaled size that covers ``target`` (one scale for every axis), and the start of
    # the centre crop on each axis.
    scale = max(t / s for t, s in zip(target, now, strict=True))
    cover = tuple(max(t, round(s * scale)) for t, s in zip(target, now, strict=True))
    return cover, tuple((r - t) // 2 for r, t in zip(cover, target, strict=True))


def resize_masks(masks: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    """Resize uint8 ``[N, *spatial]`` label masks exactly as :func:`resize_images` resizes inputs.

    Same cover-and-centre-crop geometry, but nearest-neighbour sampling: a mask value is
    a class index, and interpolating between two indices would invent a third class.
    """
    dims = masks.ndim - 1
    target = spatial_size(size, dims)
    now = tuple(int(v) for v in masks.shape[1:])
    if now == target:
        return masks
    cover, start = _cover(now, target)
    crop = tuple(slice(o, o + t) for o, t in zip(start, target, strict=True))
    x = F.interpolate(masks[:, None].float(), size=cover, mode="nearest-exact")
    return x[(slice(None), 0, *crop)].to(masks.dtype)


def downscale(images: torch.Tensor, scale: int) -> torch.Tensor:
    """Bicubic downscaling by an integer ``scale``, antialiased: how low-resolution inputs are made.

    Float ``[B, C, H, W]`` in [0, 1] with ``H`` and ``W`` multiples of ``scale`` (crop
    them first), returned as ``[B, C, H / scale, W / scale]`` clamped to [0, 1]. This
    is the bicubic degradation of the super-resolution literature (MATLAB's
    ``imresize``, which also antialiases), so models trained here compare with
    published bicubic baselines.
    """
    if images.ndim != 4:
        raise ValueError(f"bicubic downscaling is defined for [B, C, H, W] images, got shape "
                         f"{tuple(images.shape)}; super-resolution takes 2D images")
    h, w = images.shape[-2:]
    if h % scale or w % scale:
        raise ValueError(f"image size {h}x{w} is not a multiple of scale {scale}; crop it to "
                         f"{h - h % scale}x{w - w % scale} first")
    out = F.interpolate(images, size=(h // scale, w // scale), mode="bicubic",
                        align_corners=False, antialias=True)
    return out.clamp_(0, 1)
