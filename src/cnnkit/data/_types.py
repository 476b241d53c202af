"""The in-memory data set type and the tensor helpers every loader shares.

Everything cnnkit trains on fits in memory as one tensor: images are stored as
uint8 (4x smaller than float32) and converted to float batch by batch by
:class:`cnnkit.data.TensorLoader`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cnnkit._limits import require_memory

__all__ = ["ImageData", "IGNORE_INDEX", "to_size", "convert_channels", "resize_images",
           "resize_masks", "downscale"]

IGNORE_INDEX = 255  # mask value of unlabelled pixels (the Pascal VOC convention)

# ITU-R BT.601 luma weights, the ones Pillow's ``convert("L")`` uses.
_LUMA = (0.299, 0.587, 0.114)


@dataclass
class ImageData:
    """Images, labels and class names held in memory.

    Attributes:
        images: uint8 ``[N, C, H, W]`` in 0..255, or float32 ``[N, C, H, W]`` in [0, 1].
        labels: int64 ``[N]``, class indices into ``classes``.
        classes: class names; ``classes[k]`` is the name of label ``k``.
        name: ``"digits"``, ``"shapes"`` or the path the data was read from.
        masks: uint8 ``[N, H, W]`` segmentation masks whose values index
            ``mask_classes`` (255: ignored pixels), else None. ``shapes`` has 0 for the
            background and ``k + 1`` on pixels of class ``k``.
        mask_classes: names of the mask values (``["background", "circle", ...]``);
            None without masks.
        augment: name of the default augmentation policy for this data
            (see :func:`cnnkit.data.list_augment`).
        skipped: number of unreadable or corrupt files skipped while loading.
        sources: the file each sample was read from (user data), else None.
        values: float32 ``[N, K]`` real targets (regression), named by ``classes``, else
            None; ``labels`` are then all 0 (one stratum for the split).

    Example:
        >>> import torch
        >>> d = ImageData(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 0, 1]),
        ...               ["a", "b"], "toy")
        >>> d.input_size, d.num_classes, len(d)
        ((1, 8, 8), 2, 4)
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    name: str
    masks: torch.Tensor | None = None
    augment: str = "none"
    mask_classes: list[str] | None = None
    skipped: int = 0
    sources: list[str] | None = None
    values: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise ValueError(f"data {self.name!r}: images must be [N, C, H, W], got shape "
                             f"{tuple(self.images.shape)}; add a channel axis for grayscale")
        self.labels = torch.as_tensor(self.labels).long()
        n = self.images.shape[0]
        if self.labels.shape != (n,):
            raise ValueError(f"data {self.name!r}: {n} images but labels of shape "
                             f"{tuple(self.labels.shape)}; give exactly one label per image")
        if self.masks is not None and self.masks.shape != (n, *self.images.shape[2:]):
            raise ValueError(f"data {self.name!r}: masks of shape {tuple(self.masks.shape)} do "
                             f"not match images {tuple(self.images.shape)}; masks are [N, H, W]")
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
            raise ValueError(f"data {self.name!r}: {len(self.sources)} sources for {n} images; "
                             "give one source path per image")

    @property
    def input_size(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        c, h, w = self.images.shape[1:]
        return (int(c), int(h), int(w))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, indices: torch.Tensor | Sequence[int]) -> ImageData:
        """The samples at ``indices`` (masks and sources follow), same classes and policy."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return ImageData(
            self.images[idx], self.labels[idx], list(self.classes), self.name,
            masks=None if self.masks is None else self.masks[idx], augment=self.augment,
            mask_classes=self.mask_classes, skipped=self.skipped,
            sources=None if self.sources is None else [self.sources[i] for i in idx.tolist()],
            values=None if self.values is None else self.values[idx])


def to_size(size: int | Sequence[int]) -> tuple[int, int]:
    """``64 -> (64, 64)``; ``(h, w)`` -> ``(h, w)``; raises ValueError on non-positive sizes."""
    h, w = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
    if h < 1 or w < 1:
        raise ValueError(f"image_size {size} must be positive; give an int or (height, width)")
    return h, w


def convert_channels(images: torch.Tensor, channels: int | None) -> torch.Tensor:
    """Convert ``[N, C, H, W]`` images between 1 (luma) and 3 (RGB) channels; keeps the dtype.

    RGB -> gray uses the ITU-R BT.601 luma weights (as Pillow's ``convert("L")``);
    gray -> RGB repeats the channel. ``channels=None`` returns the images unchanged.
    """
    if channels is None or channels == images.shape[1]:
        return images
    if channels not in (1, 3):
        raise ValueError(f"channels={channels} is not supported; give 1 (grayscale) or 3 (RGB)")
    if images.shape[1] == 1:
        return images.expand(-1, 3, -1, -1).contiguous()
    w = torch.tensor(_LUMA, dtype=torch.float32).view(1, 3, 1, 1)
    chunks = []
    for chunk in images.split(1024):  # bounded memory: float copies one chunk at a time
        gray = (chunk.float() * w).sum(1, keepdim=True)
        chunks.append(gray.round().clamp(0, 255).to(torch.uint8)
                      if images.dtype == torch.uint8 else gray)
    return torch.cat(chunks)


def resize_images(images: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    """Resize ``[N, C, H, W]`` so the image covers ``size``, then centre crop; keeps the dtype.

    For a square ``size`` this is "shorter side to size, then centre crop". Uses
    bilinear interpolation with antialiasing (so downscaling does not alias).
    """
    th, tw = to_size(size)
    h, w = images.shape[-2:]
    if (h, w) == (th, tw):
        return images
    rh, rw, top, left = _cover(h, w, th, tw)
    n, c = images.shape[:2]
    # float working copies a chunk at a time, a chunk at most ~256 MB: the output is the
    # one allocation that grows with the data, and it is checked first
    per_image = c * rh * rw * 4
    require_memory(n * c * th * tw * images.element_size() + min(n, 64) * per_image,
                   f"resizing {n} images of {c}x{h}x{w} to {c}x{th}x{tw}",
                   f"give a smaller size (the images are {h}x{w})")
    out = []
    for chunk in images.split(max(1, min(512, 2**28 // per_image))):
        x = F.interpolate(chunk.float(), size=(rh, rw), mode="bilinear", align_corners=False,
                          antialias=True)[..., top:top + th, left:left + tw]
        out.append(x.round().clamp(0, 255).to(torch.uint8) if images.dtype == torch.uint8
                   else x.clamp(0, 1))
    return torch.cat(out)


def _cover(h: int, w: int, th: int, tw: int) -> tuple[int, int, int, int]:
    # The scaled size that covers (th, tw), and the top-left of the centre crop.
    scale = max(th / h, tw / w)
    rh, rw = max(th, round(h * scale)), max(tw, round(w * scale))
    return rh, rw, (rh - th) // 2, (rw - tw) // 2


def resize_masks(masks: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    """Resize uint8 ``[N, H, W]`` label masks exactly as :func:`resize_images` resizes images.

    Same cover-and-centre-crop geometry, but nearest-neighbour sampling: a mask value is
    a class index, and interpolating between two indices would invent a third class.
    """
    th, tw = to_size(size)
    h, w = masks.shape[-2:]
    if (h, w) == (th, tw):
        return masks
    rh, rw, top, left = _cover(h, w, th, tw)
    x = F.interpolate(masks[:, None].float(), size=(rh, rw), mode="nearest-exact")
    return x[:, 0, top:top + th, left:left + tw].to(masks.dtype)


def downscale(images: torch.Tensor, scale: int) -> torch.Tensor:
    """Bicubic downscaling by an integer ``scale``, antialiased: how low-resolution inputs are made.

    Float ``[B, C, H, W]`` in [0, 1] with ``H`` and ``W`` multiples of ``scale`` (crop
    them first), returned as ``[B, C, H / scale, W / scale]`` clamped to [0, 1]. This
    is the bicubic degradation of the super-resolution literature (MATLAB's
    ``imresize``, which also antialiases), so models trained here compare with
    published bicubic baselines.
    """
    h, w = images.shape[-2:]
    if h % scale or w % scale:
        raise ValueError(f"image size {h}x{w} is not a multiple of scale {scale}; crop it to "
                         f"{h - h % scale}x{w - w % scale} first")
    out = F.interpolate(images, size=(h // scale, w // scale), mode="bicubic",
                        align_corners=False, antialias=True)
    return out.clamp_(0, 1)
