"""User data as arrays: an ``.npz`` holding inputs (``x`` or ``images``), their targets
(``y`` or ``labels``: class ids or names, or numbers for regression) and optionally the
class names (``classes``). Read through :func:`cnnkit.data.load_data`; every array is
checked (shape, dtype, range, size, a damaged archive) before it is used.
"""

from __future__ import annotations

import lzma
import math
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from cnnkit._limits import require_memory

from ._types import ImageData, convert_channels, resize_images

__all__ = ["load_npz"]

# What a damaged zip raises while it is read: a bad archive, a corrupt deflate/bzip2/lzma
# stream, an unknown compression method, or the encryption flag set on a member.
_NPZ_DAMAGE = (zipfile.BadZipFile, zlib.error, lzma.LZMAError, OSError, EOFError, KeyError,
               NotImplementedError, RuntimeError, UnicodeDecodeError)
def load_npz(path: Path, *, name: str | None = None,
             image_size: int | tuple[int, int] | None = None, channels: int | None = None,
             strict: bool = False, values: bool = False) -> ImageData:
    """Read images and labels saved with ``np.savez``.

    Arrays: images as ``x`` or ``images`` (``[N, H, W]``, ``[N, H, W, C]`` or
    ``[N, C, H, W]`` with C in 1, 3, 4; integers 0..255 or floats 0..1; 4 channels
    are RGBA, composited on white), labels as ``y`` or ``labels`` (integers 0..K-1
    or strings), optional ``classes`` (strings). A 4-d array is channels-last when
    its last axis has size 1, 3 or 4, else channels-first. Integer images are kept uint8,
    float images float32. ``strict`` is accepted for a uniform signature. With
    ``values=True`` (regression) ``y`` holds real numbers, ``[N]`` or ``[N, K]``, and
    ``classes`` (optional) names the ``K`` values.

    Raises:
        ValueError: missing arrays (naming the keys found), bad shapes, dtypes or
            ranges, or a length mismatch between images and labels.
    """
    name = name or str(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic not in (b"PK\x03\x04", b"PK\x05\x06"):
        raise ValueError(f"'{name}' is not an .npz file (an npz is a zip archive of arrays; this "
                         "file does not start like one); save it with np.savez(path, x=images, "
                         "y=labels)")
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.files)
            xk = next((k for k in ("x", "images") if k in keys), None)
            yk = next((k for k in ("y", "labels") if k in keys), None)
            if xk is not None and yk is not None:
                x, y = _npz_member(z, xk, name), _npz_member(z, yk, name)
                names = _npz_member(z, "classes", name) if "classes" in keys else None
    except _NPZ_DAMAGE as err:
        raise _damaged(name, err) from err
    if xk is None or yk is None:
        raise ValueError(f"npz '{name}' has arrays {keys}; expected images as 'x' or "
                         "'images' and labels as 'y' or 'labels' (optional 'classes')")
    if names is not None and names.ndim != 1:
        raise ValueError(f"npz '{name}': 'classes' must be one name per class, [K], got shape "
                         f"{names.shape}; save np.array(class_names, dtype=str)")
    classes = None if names is None else [str(c) for c in names.tolist()]
    images = _npz_images(x, name)
    if values:
        targets, classes = _npz_values(y, classes, name)
        labels = torch.zeros(len(targets), dtype=torch.long)  # one stratum for the split
    else:
        targets = None
        labels, classes = _npz_labels(y, classes, name)
    if len(labels) != images.shape[0]:
        raise ValueError(f"npz '{name}': {images.shape[0]} images but {len(labels)} labels; "
                         "save exactly one label per image")
    if image_size is not None:
        images = resize_images(images, image_size)
    return ImageData(convert_channels(images, channels), labels, classes, name,
                     augment="flip_crop", values=targets)


def _npz_values(y: np.ndarray, names: list[str] | None,
                name: str) -> tuple[torch.Tensor, list[str]]:
    """Regression targets: ``[N]`` or ``[N, K]`` finite real numbers, and their names."""
    if y.dtype.kind not in "iuf" or y.ndim not in (1, 2) or len(y) == 0:
        raise ValueError(f"npz '{name}': regression values must be numbers, [N] or [N, K], got "
                         f"{y.dtype} of shape {y.shape}; save y as floats, one row per image")
    with np.errstate(over="ignore", invalid="ignore"):
        v = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32)).reshape(len(y), -1)
    if not torch.isfinite(v).all():
        raise ValueError(f"npz '{name}': regression values must be finite (no NaN or inf, and "
                         "within float32's range); fix or drop those samples")
    k = v.shape[1]
    names = names or (["value"] if k == 1 else [f"value{j}" for j in range(k)])
    if len(names) != k:
        raise ValueError(f"npz '{name}': {len(names)} names in 'classes' for {k} values per "
                         "sample; name each value once")
    return v, names


def _npz_member(z: np.lib.npyio.NpzFile, key: str, name: str) -> np.ndarray:
    """One array of the archive. Its header (shape and dtype, no data) is read first, and
    the array refused before it is decompressed if it would not fit in memory: a small npz
    can hold a huge array."""
    try:
        with z.zip.open(f"{key}.npy") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_2_0 if version >= (2, 0) else \
                np.lib.format.read_array_header_1_0
            shape, _, dtype = read(f)
    except ValueError as err:  # not an .npy member
        raise _damaged(name, err) from err
    nbytes = math.prod(shape) * dtype.itemsize
    require_memory(nbytes, f"array {key!r} of npz '{name}' ({'x'.join(map(str, shape))} "
                   f"{dtype})", "save a smaller array (fewer or smaller images)")
    try:
        return z[key]
    except ValueError as err:
        if "allow_pickle" in str(err):
            raise ValueError(f"npz '{name}' holds Python objects; save class names as strings "
                             "(np.array(names, dtype=str)) and numeric arrays only") from err
        raise _damaged(name, err) from err  # data shorter than its header says


def _damaged(name: str, err: BaseException) -> ValueError:
    return ValueError(f"npz '{name}' is damaged ({' '.join(str(err).split())}); save it again "
                      "with np.savez")


def _npz_images(x: np.ndarray, name: str) -> torch.Tensor:
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        # Channels-last (the NumPy/Pillow convention) when the last axis can be channels.
        if x.shape[-1] in (1, 3, 4):
            x = x.transpose(0, 3, 1, 2)
        elif x.shape[1] not in (1, 3, 4):
            raise ValueError(f"npz '{name}': images of shape {x.shape} have no channel axis of "
                             "size 1, 3 or 4; save [N, H, W], [N, H, W, C] or [N, C, H, W]")
    else:
        raise ValueError(f"npz '{name}': images must be [N, H, W], [N, H, W, C] or "
                         f"[N, C, H, W], got shape {x.shape}")
    if 0 in x.shape[2:]:
        raise ValueError(f"npz '{name}': images of shape {x.shape} have no pixels (a side of "
                         "0); save images of at least 1x1 pixels")
    if x.dtype == np.bool_:
        x = x.astype(np.uint8) * 255
    if x.dtype.kind in "iu":
        lo, hi = (int(x.min()), int(x.max())) if x.size else (0, 0)
        if lo < 0 or hi > 255:
            raise ValueError(f"npz '{name}': integer images span {lo}..{hi}; save uint8 0..255 "
                             "(or floats in 0..1)")
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.uint8))
    elif x.dtype.kind == "f":
        lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -1e-6 or hi > 1 + 1e-6:
            raise ValueError(f"npz '{name}': float images span {lo:g}..{hi:g}; scale them to "
                             "[0, 1] (divide 0..255 data by 255) or save uint8")
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).clamp_(0, 1)
    else:
        raise ValueError(f"npz '{name}': images of dtype {x.dtype} are not supported; save "
                         "uint8 0..255 or floats in [0, 1]")
    if t.shape[1] == 4:  # RGBA: composite on white, as the folder reader does
        scale = 255.0 if t.dtype == torch.uint8 else 1.0
        rgb, a = t[:, :3].float(), t[:, 3:].float() / scale
        out = rgb * a + scale * (1 - a)
        t = out.round().to(torch.uint8) if t.dtype == torch.uint8 else out
    return t


def _npz_labels(y: np.ndarray, classes: list[str] | None,
                name: str) -> tuple[torch.Tensor, list[str]]:
    if y.ndim == 2 and y.shape[1] == 1:  # a column vector from some exporters
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(f"npz '{name}': labels must be one-dimensional [N], got shape {y.shape}")
    if len(y) == 0:
        raise ValueError(f"npz '{name}' holds no samples (0 labels); save the images and labels "
                         "to train on")
    if y.dtype.kind in "US":
        names = [str(s) for s in y.tolist()]
        classes = classes or sorted(set(names))
        index = {c: k for k, c in enumerate(classes)}
        unknown = sorted(set(names) - set(index))
        if unknown:
            raise ValueError(f"npz '{name}': labels {unknown[:5]} are not in 'classes'; add "
                             "them to 'classes' or fix the labels")
        labels = torch.tensor([index[s] for s in names], dtype=torch.long)
    elif y.dtype.kind in "iub" or (y.dtype.kind == "f" and np.isfinite(y).all()
                                   and np.all(np.mod(y, 1) == 0)):
        lo, hi = int(y.min()), int(y.max())  # before the int64 cast, which would wrap them
        if lo < 0:
            raise ValueError(f"npz '{name}': labels must be class indices 0..K-1, found "
                             f"{lo}; remap them to 0..K-1")
        if classes is None:
            used = len(np.unique(y))
            if hi + 1 > max(2 * used, 16):  # 590000 in a file of 10 classes: a label column?
                raise ValueError(
                    f"npz '{name}': labels reach {hi} but only {used} values occur; labels are "
                    f"class indices 0..K-1, so this would make {hi + 1:,} classes: remap them "
                    "(y = np.unique(y, return_inverse=True)[1]), save them as strings, or give "
                    "'classes' naming every class")
            classes = [str(k) for k in range(hi + 1)]
        elif hi >= len(classes):
            raise ValueError(f"npz '{name}': label {hi} but only {len(classes)} classes; give "
                             "one class name per label value")
        labels = torch.from_numpy(y.astype(np.int64))
    else:
        raise ValueError(f"npz '{name}': labels of dtype {y.dtype} are not supported; save "
                         "integers 0..K-1 or strings")
    if len(classes) < 2:
        raise ValueError(f"npz '{name}' has one class; a classifier needs at least two classes "
                         "(give 'classes' when a split holds one class only)")
    return labels, classes
