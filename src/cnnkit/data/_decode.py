"""Decoding image files with Pillow into one uint8 tensor: modes, sizes, corrupt files.

Each file is decoded on its own by :func:`decode` (a pure function of the path and
the size), so a thread pool decodes in parallel: Pillow releases the GIL while it
decodes and resizes.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from cnnkit._limits import max_image_pixels, require_memory

from ._types import convert_channels

__all__ = ["image_extensions", "image_files", "default_size", "decode", "read_images",
           "load_image", "open_image", "quiet_bomb_warnings", "ImageTooLarge",
           "DEFAULT_MAX_SIZE"]

DEFAULT_MAX_SIZE = 64  # default side when a folder's most common image size is larger

# What a broken file raises in Pillow: UnidentifiedImageError and truncation are OSErrors,
# some plugins raise SyntaxError/ValueError/EOFError on garbage, and huge files a bomb error.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def image_extensions() -> frozenset[str]:
    """Lower-case file suffixes Pillow can open (``".png"``, ``".jpg"`` ...)."""
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def image_files(folder: Path) -> list[Path]:
    """Image files under ``folder``, recursively, sorted; hidden files and folders are left out."""
    exts = image_extensions()
    found = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root, n) for n in names
                  if not n.startswith(".") and Path(n).suffix.lower() in exts]
    return sorted(found)


def default_size(paths: Sequence[Path]) -> tuple[int, int]:
    """The most common ``(H, W)`` among the files, or 64x64 when its longer side is over 64.

    Small data (an MNIST or CIFAR export) keeps its native resolution; photos are
    brought down to a size whose tensor fits in memory. Only headers are read.
    """
    sizes: Counter[tuple[int, int]] = Counter()
    for p in paths:
        try:
            with Image.open(p) as im:
                sizes[(im.height, im.width)] += 1
        except _DECODE_ERRORS:
            continue  # reported (skipped or raised) by the decoding pass that follows
    if not sizes:
        return (DEFAULT_MAX_SIZE, DEFAULT_MAX_SIZE)
    (h, w), _ = sizes.most_common(1)[0]
    return (h, w) if max(h, w) <= DEFAULT_MAX_SIZE else (DEFAULT_MAX_SIZE, DEFAULT_MAX_SIZE)


def _to_l_or_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to ``"L"`` or ``"RGB"``; transparency is composited on white."""
    if im.mode.startswith("I;16"):  # 16-bit grayscale PNG/TIFF
        return Image.fromarray(np.rint(np.asarray(im, dtype=np.float64) / 257).astype(np.uint8))
    if im.mode in ("I", "F"):  # 32-bit int/float: 0..1 floats, 0..255 or 16-bit integers
        with np.errstate(invalid="ignore"):  # a float TIFF's signalling NaNs
            a = np.asarray(im, dtype=np.float64)
        top = a[np.isfinite(a)].max(initial=0)  # NaN/inf pixels: black/white
        scale = 255.0 if im.mode == "F" and top <= 1 else (1 / 257 if top > 255 else 1.0)
        a = np.nan_to_num(np.rint(a * scale), nan=0, posinf=255, neginf=0)
        return Image.fromarray(a.clip(0, 255).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im.convert("RGBA")).convert("RGB")
    if im.mode in ("1", "L"):
        return im.convert("L")
    return im.convert("RGB")


class ImageTooLarge(ValueError):
    """An image whose header declares more pixels than :func:`cnnkit._limits.max_image_pixels`
    (refused before it is decoded)."""


@contextlib.contextmanager
def open_image(path: Path | str | io.BytesIO, name: str | None = None) -> Iterator[Image.Image]:
    """``Image.open`` with the pixel count checked from the header, before any decoding: a
    38 KB PNG can declare 6300x6300 pixels, a 144-megapixel photo costs half a gigabyte.

    Raises:
        ImageTooLarge: more pixels than :func:`cnnkit._limits.max_image_pixels`.
        OSError, ValueError, SyntaxError, EOFError: Pillow cannot read the header.
    """
    limit = max_image_pixels()
    with Image.open(path) as im:
        if im.width * im.height > limit:
            raise ImageTooLarge(
                f"image '{name or path}' is {im.width}x{im.height} "
                f"({im.width * im.height / 1e6:.0f} megapixels), over the limit of "
                f"{limit / 1e6:g} megapixels per image (a guard against decompression "
                "bombs); downscale it, or raise the limit with the environment variable "
                f"CNNKIT_MAX_IMAGE_PIXELS={im.width * im.height}")
        yield im


@contextlib.contextmanager
def quiet_bomb_warnings() -> Iterator[None]:
    """Silence Pillow's decompression-bomb warning, which :func:`open_image`'s check (with
    its own limit and a message that says what to do) replaces. ``catch_warnings`` changes
    process-wide state, so it is entered once, by the thread that starts a loading job,
    never by each decoding worker thread (concurrent entries and exits would leave the
    filter on)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def decode(path: Path | str, size: tuple[int, int] | None) -> np.ndarray:
    """Decode one file to uint8 ``[H, W]`` (grayscale) or ``[H, W, 3]`` (colour) at ``size``.

    The image is scaled so it covers ``size`` and centre cropped ("shorter side to
    size, then centre crop" for a square size). An RGB file whose three channels are
    equal everywhere is returned as grayscale.

    Raises:
        ImageTooLarge: the header declares too many pixels (see :func:`open_image`).
        OSError, ValueError, SyntaxError, EOFError: Pillow cannot read the file.
    """
    with open_image(path) as im:
        im = _to_l_or_rgb(im)
    if size is not None and im.size != (size[1], size[0]):
        im = ImageOps.fit(im, (size[1], size[0]), method=Image.Resampling.BILINEAR)
    a = np.array(im)  # a writable copy: torch.from_numpy rejects read-only buffers
    if a.ndim == 3 and (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all():
        return np.ascontiguousarray(a[..., 0])
    return a


def read_images(paths: Sequence[Path], size: tuple[int, int], *, name: str, strict: bool,
                num_workers: int | None = None, progress: bool | None = None
                ) -> tuple[torch.Tensor, list[int]]:
    """Decode ``paths`` into uint8 ``[N, C, H, W]``; returns it and the indices that were read.

    ``C`` is 3 if any image has colour, else 1. Unreadable files are skipped with a
    warning naming how many and the first few, or with ``strict=True`` raise.

    Raises:
        ValueError: ``strict=True`` and a file cannot be read, or no file can be read.
    """
    workers = num_workers or min(4, os.cpu_count() or 1)
    # decoded arrays (at most RGB) and the tensor they are copied into
    require_memory(2 * len(paths) * 3 * size[0] * size[1],
                   f"{len(paths)} images of {size[0]}x{size[1]} from '{name}'",
                   "give a smaller --image-size, or fewer images")

    def safe(p: Path) -> np.ndarray | Exception:
        try:
            return decode(p, size)
        except _DECODE_ERRORS as err:
            return err

    arrays, kept, bad = [], [], []
    with ThreadPoolExecutor(workers) as pool:
        # progress=None: a bar on a terminal, none in logs and tests (tqdm's disable=None).
        bar = tqdm(pool.map(safe, paths), total=len(paths), desc=f"reading {name}", unit="img",
                   disable=None if progress is None else not progress, leave=False)
        for i, res in enumerate(bar):
            if isinstance(res, ImageTooLarge) and strict:
                raise ValueError(f"{res}; or drop --strict (strict=False) to skip it") from res
            if isinstance(res, Exception):
                if strict:
                    raise ValueError(f"cannot read image '{paths[i]}' ({res}); fix or delete the "
                                     "file, or drop --strict (strict=False) to skip unreadable "
                                     "images") from res
                bad.append((str(paths[i]), res))
            else:
                arrays.append(res)
                kept.append(i)
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        big = [p for p, e in bad if isinstance(e, ImageTooLarge)]
        why = f" ({len(big)} over the {max_image_pixels() / 1e6:g}-megapixel limit)" if big else ""
        warnings.warn(f"skipped {len(bad)} unreadable image(s){why} of {len(paths)} in '{name}': "
                      f"{', '.join(p for p, _ in bad[:3])}{more}; load with strict=True to stop "
                      "at the first", stacklevel=5)  # read_images < _from_files < load_*
    if not arrays:
        raise ValueError(f"none of the {len(paths)} image files in '{name}' can be read; "
                         "check that they are images Pillow can open")
    colour = any(a.ndim == 3 for a in arrays)
    images = torch.empty(len(arrays), 3 if colour else 1, *size, dtype=torch.uint8)
    for i, a in enumerate(arrays):
        t = torch.from_numpy(a)
        images[i] = t.permute(2, 0, 1) if t.ndim == 3 else t  # gray broadcasts over RGB
    return images, kept


def load_image(image: str | os.PathLike | Image.Image, size: tuple[int, int] | None,
               channels: int) -> torch.Tensor:
    """One image (a file or a PIL image) as uint8 ``[channels, H, W]``, decoded as in training.

    Used at inference time (``cnnkit predict``, :class:`cnnkit.training.Preprocess`), so
    a file goes through exactly the same mode conversion, resize and crop as the
    images the model was trained on. ``size=None`` keeps the image's own size (dense
    prediction runs on it whole, in sliding windows).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: Pillow cannot read it.
    """
    if isinstance(image, Image.Image):
        im = _to_l_or_rgb(image)
        if size is not None and im.size != (size[1], size[0]):
            im = ImageOps.fit(im, (size[1], size[0]), method=Image.Resampling.BILINEAR)
        a = np.array(im)
    else:
        if not Path(image).is_file():
            raise FileNotFoundError(f"image file '{image}' does not exist")
        try:
            with quiet_bomb_warnings():
                a = decode(image, size)
        except ImageTooLarge:
            raise
        except _DECODE_ERRORS as e:
            raise ValueError(f"cannot read image '{image}' ({e}); is it an image file?") from e
    t = torch.from_numpy(a)
    t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
    return convert_channels(t[None], channels)[0]
