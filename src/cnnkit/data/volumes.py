"""User volumes: NIfTI files (``.nii``, ``.nii.gz``) read with nibabel.

Two layouts, as for images:

* classification (``--data FOLDER``): ``FOLDER/<class>/**/<volume>.nii.gz``, one
  subfolder per class;
* segmentation (``--task segment``): ``FOLDER/images/<name>.nii.gz`` with
  ``FOLDER/masks/<name>.nii.gz`` of the same name, the mask's voxels class indices
  (0..254; 255 ignored), as the medical segmentation decathlon ships them.

A NIfTI array is indexed ``(x, y, z[, channel])``; cnnkit stores it as
``[C, D, H, W] = [channel, z, y, x]``, so a slice along ``D`` is an axial slice.
Intensities: uint8 volumes stay uint8; any other type (CT's int16 Hounsfield units,
MRI's floats) is clipped per volume to its 0.5 and 99.5 percentiles and scaled to
[0, 1], the robust per-volume normalisation of MRI pipelines (e.g. nnU-Net's
non-CT scheme). Every header's size is checked before its voxels are read.

Default ``image_size``: the most common volume shape when its longest side is at most
64 voxels, else 64 on every axis; other shapes are scaled to cover it and centre
cropped (inputs trilinearly or by area, masks by nearest neighbour).
"""

from __future__ import annotations

import gzip
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnnkit._files import atomic_write
from cnnkit._limits import max_image_pixels

from ._types import (
    IGNORE_INDEX,
    Samples,
    convert_channels,
    resize_images,
    resize_masks,
    spatial_size,
)

__all__ = ["VOLUME_SUFFIXES", "is_volume_file", "file_stem", "volume_files", "has_volumes",
           "read_volume",
           "load_volume", "load_volume_folder", "load_volume_pairs", "save_volume"]

VOLUME_SUFFIXES = (".nii", ".nii.gz")
DEFAULT_MAX_SIDE = 64
_PERCENTILES = (0.5, 99.5)


def is_volume_file(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(VOLUME_SUFFIXES)


def file_stem(path: str | os.PathLike) -> str:
    """A file's name without its suffix, ``.nii.gz`` counted as one suffix."""
    path = Path(path)
    name = path.name
    for suffix in sorted(VOLUME_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[:-len(suffix)]
    return path.stem


def volume_files(folder: Path) -> list[Path]:
    """NIfTI files under ``folder``, recursively, sorted; hidden files and folders left out."""
    found = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root, n) for n in names if not n.startswith(".") and is_volume_file(n)]
    return sorted(found)


def has_volumes(folder: Path) -> bool:
    """True when a NIfTI file lies anywhere under ``folder``."""
    return any(True for _ in _walk_volumes(folder))


def _walk_volumes(folder: Path):
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for n in names:
            if not n.startswith(".") and is_volume_file(n):
                yield Path(root, n)


def _nibabel() -> Any:
    try:
        import nibabel  # lazy: optional dependency
    except ImportError as e:
        raise ValueError("reading NIfTI volumes needs nibabel; install it with "
                         "pip install -e \".[volumes]\" in your cnnkit clone (or pip install "
                         "nibabel)") from e
    return nibabel


def _open(path: Path) -> Any:
    nib = _nibabel()
    if not path.is_file():
        raise FileNotFoundError(f"volume file '{path}' does not exist")
    try:
        img = nib.load(str(path))
    except Exception as e:  # nibabel raises many types for damaged headers
        raise ValueError(f"cannot read volume '{path}' ({' '.join(str(e).split())}); is it a "
                         "NIfTI file?") from e
    shape = tuple(int(v) for v in img.shape)
    if len(shape) not in (3, 4) or 0 in shape:
        raise ValueError(f"volume '{path}' has shape {shape}; give 3D (x, y, z) or 4D "
                         "(x, y, z, channel) NIfTI volumes")
    voxels = int(np.prod(shape[:3]))
    if voxels > max_image_pixels():
        raise ValueError(f"volume '{path}' has {voxels:,} voxels per channel, over the limit "
                         f"of {max_image_pixels():,}; crop or downsample it, or raise "
                         "CNNKIT_MAX_IMAGE_PIXELS")
    return img


def read_volume(path: str | os.PathLike) -> np.ndarray:
    """One NIfTI file's voxels as ``[C, D, H, W]`` in the file's own dtype (header checked first).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: not a NIfTI file, damaged, not 3D/4D, or over the voxel limit.
    """
    path = Path(path)
    img = _open(path)
    try:
        a = np.asanyarray(img.dataobj)
    except Exception as e:
        raise ValueError(f"cannot read the voxels of '{path}' ({' '.join(str(e).split())}); "
                         "the file is damaged or truncated") from e
    a = a[..., None] if a.ndim == 3 else a
    return np.ascontiguousarray(a.transpose(3, 2, 1, 0))  # (x, y, z, c) -> (c, z, y, x)


def _intensities(a: np.ndarray, path: Path) -> torch.Tensor:
    """uint8 voxels as they are; anything else clipped to its percentiles and scaled to [0, 1]."""
    if a.dtype == np.uint8:
        return torch.from_numpy(a)
    if a.dtype.kind not in "iuf" and a.dtype != np.bool_:
        raise ValueError(f"volume '{path}' holds {a.dtype} voxels; save numbers (integers or "
                         "floats)")
    x = a.astype(np.float32)
    finite = np.isfinite(x)
    if not finite.any():
        raise ValueError(f"volume '{path}' has no finite voxel; fix the file")
    lo, hi = np.percentile(x[finite], _PERCENTILES)
    x = np.where(finite, x, lo)
    x = (np.clip(x, lo, hi) - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    return torch.from_numpy(x.astype(np.float32))


def _labels(a: np.ndarray, path: Path) -> np.ndarray:
    if a.shape[0] != 1:
        raise ValueError(f"mask '{path}' has {a.shape[0]} channels; a mask is one 3D volume of "
                         "class indices")
    if a.dtype.kind == "f":
        if not np.isfinite(a).all() or np.any(np.mod(a, 1)):
            raise ValueError(f"mask '{path}' holds fractional values; mask voxels are class "
                             "indices 0..254 (255: ignored)")
    elif a.dtype.kind not in "iub":
        raise ValueError(f"mask '{path}' holds {a.dtype} voxels; save integer class indices")
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if lo < 0 or hi > IGNORE_INDEX:
        raise ValueError(f"mask '{path}' has class index {int(lo if lo < 0 else hi)}; mask values "
                         "are class indices 0..254 (255 marks ignored voxels): remap them")
    return a[0].astype(np.uint8)


def _shape(path: Path) -> tuple[int, int, int] | None:
    try:
        img = _open(path)
    except ValueError:
        return None
    x, y, z = (int(v) for v in img.shape[:3])
    return (z, y, x)


def default_volume_size(paths: Sequence[Path]) -> tuple[int, int, int]:
    """The most common ``(D, H, W)`` among the files (headers only), or 64 on every axis when
    its longest side is over 64."""
    shapes = Counter(s for s in (_shape(p) for p in paths) if s is not None)
    if not shapes:
        return (DEFAULT_MAX_SIDE,) * 3
    best, _ = shapes.most_common(1)[0]
    return best if max(best) <= DEFAULT_MAX_SIDE else (DEFAULT_MAX_SIDE,) * 3


def load_volume(path: str | os.PathLike, size: Sequence[int] | None, channels: int
                ) -> torch.Tensor:
    """One NIfTI volume as ``[channels, D, H, W]``, prepared exactly as training prepared its
    volumes (intensities, then cover-and-crop to ``size``); ``size=None`` keeps its own."""
    path = Path(path)
    x = _intensities(read_volume(path), path)[None]
    if size is not None:
        x = resize_images(x, spatial_size(tuple(size), 3))
    if x.shape[1] != channels:
        if x.shape[1] == 1 or channels == 1:
            x = convert_channels(x, channels)
        else:
            raise ValueError(f"volume '{path}' has {x.shape[1]} channels but the model takes "
                             f"{channels}")
    return x[0]


def _stack(paths: Sequence[Path], size: tuple[int, int, int], strict: bool, name: str
           ) -> tuple[torch.Tensor, list[int]]:
    """The volumes at ``paths`` resized to ``size``, stacked; unreadable ones skipped (or
    raised when ``strict``), their indices left out of the kept list."""
    out, kept, dtype = [], [], None
    for i, p in enumerate(paths):
        try:
            x = resize_images(_intensities(read_volume(p), p)[None], size)[0]
        except ValueError:
            if strict:
                raise
            continue
        if out and x.shape[0] != out[0].shape[0]:
            raise ValueError(f"volume '{p}' has {x.shape[0]} channels but '{paths[kept[0]]}' has "
                             f"{out[0].shape[0]}; every volume of '{name}' needs the same channels")
        dtype = x.dtype if dtype in (None, x.dtype) else torch.float32
        out.append(x)
        kept.append(i)
    if not out:
        raise ValueError(f"no volume of '{name}' could be read; check that they are NIfTI files")
    if dtype == torch.float32:  # a mix of uint8 and scaled volumes: all on the [0, 1] scale
        out = [x.float() / 255 if x.dtype == torch.uint8 else x for x in out]
    return torch.stack(out), kept


def load_volume_folder(path: Path, *, name: str | None = None,
                       image_size: int | Sequence[int] | None = None,
                       channels: int | None = None, strict: bool = False) -> Samples:
    """Read ``path/<class>/**/<volume>.nii.gz``: one subfolder per class, classes sorted.

    Raises:
        ValueError: no volumes, fewer than two classes, or (strict) an unreadable file.
    """
    root, name = Path(path), name or str(path)
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    per_class = {d.name: volume_files(d) for d in subdirs}
    classes = [c for c, f in per_class.items() if f]
    if len(classes) < 2:
        raise ValueError(f"folder '{name}' has {len(classes)} class subfolder(s) with volumes; "
                         f"a classifier needs at least two ({name}/<class>/*.nii.gz)")
    paths = [p for c in classes for p in per_class[c]]
    labels = torch.tensor([k for k, c in enumerate(classes) for _ in per_class[c]])
    size = (spatial_size(image_size, 3) if image_size is not None
            else default_volume_size(paths))
    volumes, kept = _stack(paths, size, strict, name)
    return Samples(convert_channels(volumes, channels), labels[kept], classes, name,
                   augment="shapes", skipped=len(paths) - len(kept),
                   sources=[str(paths[i]) for i in kept])


def load_volume_pairs(path: Path, *, name: str | None = None,
                      image_size: int | Sequence[int] | None = None,
                      channels: int | None = None, strict: bool = False) -> Samples:
    """Read a segmentation folder ``path/images/*.nii.gz`` + ``path/masks/*.nii.gz``.

    An optional ``path/classes.txt`` names the mask values, line ``k`` naming value ``k``.
    ``labels`` holds each mask's most frequent non-background class (for the split).

    Raises:
        ValueError: a volume without a mask (or the reverse), a volume and its mask of
            different shapes, fractional or out-of-range mask values.
    """
    root, name = Path(path), name or str(path)
    images = {file_stem(p): p for p in volume_files(root / "images")}
    masks = {file_stem(p): p for p in volume_files(root / "masks")}
    if not images:
        raise ValueError(f"'{root / 'images'}' contains no NIfTI volumes; put the volumes there "
                         "and their masks, with the same file names, in masks/")
    for what, keys, where in (("volume", sorted(set(images) - set(masks)), "masks"),
                              ("mask", sorted(set(masks) - set(images)), "images")):
        if keys:
            raise ValueError(f"{what} '{keys[0]}' in '{name}' has no partner in {where}/; every "
                             "volume needs a mask with the same file name")
    keys = sorted(images)
    for k in keys:
        a, b = _shape(images[k]), _shape(masks[k])
        if a is not None and b is not None and a != b:
            raise ValueError(f"volume '{images[k]}' is {'x'.join(map(str, a))} but its mask "
                             f"'{masks[k]}' is {'x'.join(map(str, b))}; a mask must have its "
                             "volume's shape")
    paths = [images[k] for k in keys]
    size = (spatial_size(image_size, 3) if image_size is not None
            else default_volume_size(paths))
    volumes, kept = _stack(paths, size, strict, name)
    labels_ = [torch.from_numpy(_labels(read_volume(masks[keys[i]]), masks[keys[i]]))
               for i in kept]
    stacked = resize_masks(torch.stack(labels_), size)
    mask_classes = _mask_names(root, stacked, name)
    valid = stacked != IGNORE_INDEX
    counts = torch.stack([((stacked == k) & valid).flatten(1).sum(1)
                          for k in range(1, len(mask_classes))], 1) if len(mask_classes) > 1 \
        else torch.zeros(len(stacked), 1, dtype=torch.long)
    dominant = torch.where(counts.sum(1) > 0, counts.argmax(1) + 1, 0)
    return Samples(convert_channels(volumes, channels), dominant, list(mask_classes), name,
                   masks=stacked, augment="shapes", skipped=len(paths) - len(kept),
                   sources=[str(paths[i]) for i in kept], mask_classes=mask_classes)


def _mask_names(root: Path, masks: torch.Tensor, name: str) -> list[str]:
    top = int(masks[masks != IGNORE_INDEX].max()) if (masks != IGNORE_INDEX).any() else 0
    listing = root / "classes.txt"
    if not listing.is_file():
        return [str(k) for k in range(max(top, 1) + 1)]
    try:
        names = [line.strip() for line in listing.read_text(encoding="utf-8").splitlines()
                 if line.strip()]
    except UnicodeDecodeError as e:
        raise ValueError(f"'{listing}' is not UTF-8 text; save it as UTF-8, one class per "
                         "line") from e
    if top >= len(names):
        raise ValueError(f"masks of '{name}' use class {top} but '{listing}' names "
                         f"{len(names)} classes; name every class, line k naming value k")
    return names


def save_volume(path: str | os.PathLike, labels: np.ndarray,
                like: str | os.PathLike | None = None, overwrite: bool = False) -> None:
    """Write ``[D, H, W]`` class indices as a uint8 NIfTI file (gzipped for ``.nii.gz``), in
    the voxel grid (affine) of the volume ``like`` when given, so the mask overlays its
    volume in any viewer. Written atomically; an existing file is kept unless ``overwrite``.
    """
    nib = _nibabel()
    affine = np.eye(4)
    if like is not None and is_volume_file(like):
        affine = _open(Path(like)).affine
    image = nib.Nifti1Image(np.ascontiguousarray(labels.astype(np.uint8).transpose(2, 1, 0)),
                            affine)
    payload = image.to_bytes()
    if str(path).lower().endswith(".gz"):
        payload = gzip.compress(payload, mtime=0)
    atomic_write(path, payload, overwrite=overwrite)
