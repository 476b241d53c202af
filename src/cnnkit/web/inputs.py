"""The explorer's inputs: the run's test split by index and uploads held in memory.

Inputs are named by id, never by path, so no request can make the server read a file:
``test:<index>`` is an image of the run's own test split (same data, seed and split as
training) and ``upload:<token>`` an image a user uploaded. Only the most recent uploads
are kept, so memory stays bounded.

An upload is a file from anyone, so decoding it is bounded before it starts. A 38 KB PNG
can declare 6300x6300 pixels (a "decompression bomb": 40 MB decoded, 2.5 s); the model
takes 8x8 to 224x224. So :func:`decode_upload` reads the header, lets a JPEG decode at
1/2, 1/4 or 1/8 scale (``draft``: libjpeg skips the detail, never builds the full image),
refuses more than ``max_pixels`` pixels before decoding anything, shrinks what it decoded
to a few times the model's input side at once (``Image.reduce``, strip by strip, so no
mode conversion ever copies the full image), and only then preprocesses exactly as in
training (:func:`cnnkit.data.load_image`). A :class:`DecodeBudget` bounds the pixels being
decoded at once (one full-size image, or many small ones), and large decodes hand their
freed memory back to the operating system.

A run on volumes takes NIfTI uploads (``.nii``, ``.nii.gz``; :func:`decode_volume_upload`),
bounded the same way: the header is read first (from the first bytes of a gzip stream,
never the whole stream), more than ``max_pixels`` voxels are refused before anything
else is decompressed, decompression stops at the size the header declares (a gzip bomb
inflates no further), and the volume is then read exactly as in training
(:func:`cnnkit.data.load_input`). A run on 1D signals takes no uploads (cnnkit reads no
single-signal files yet): its test split is explored.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import io
import math
import re
import secrets
import sys
import tempfile
import threading
import zlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cnnkit.data import load_image, load_input

__all__ = ["InputStore", "UploadTooLarge", "DecodeBudget", "decode_upload",
           "decode_volume_upload", "png_data_url", "release_memory", "MAX_UPLOAD_PIXELS"]

# What Pillow raises on a file it cannot read (an UnidentifiedImageError is an OSError).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError)
_ID = re.compile(r"(test|upload):([0-9a-f]{1,32})\Z")
# 16 MP: a 4K or 5K screenshot passes; decoded, at most 64 MB (Pillow keeps 4 bytes a pixel
# for any mode of more than one band). Photos are JPEGs, decoded reduced by draft().
MAX_UPLOAD_PIXELS = 16_000_000
OVERSAMPLE = 4  # what is kept before the final resize: this many times the model's side
_TRIM_PIXELS = 1_000_000  # after a decode this large, give freed memory back
_STRIP_PIXELS = 1 << 20  # pixels of the full image converted and reduced at a time


class UploadTooLarge(ValueError):
    """An upload over the byte or pixel limit (HTTP 413)."""


class DecodeBudget:
    """At most ``pixels`` pixels being decoded at once, across threads; a decode waits for
    its share (its pixel count, from the header). Decoded pixels cost at most 4 bytes each
    (Pillow's storage of any mode), so this bounds the memory of decodes in flight.

    Example:
        >>> from cnnkit.web.inputs import DecodeBudget
        >>> budget = DecodeBudget(16_000_000)
        >>> with budget.held(1_000_000):
        ...     budget.used
        1000000
    """

    def __init__(self, pixels: int) -> None:
        if pixels < 1:
            raise ValueError(f"a decode budget must be at least 1 pixel, got {pixels}")
        self.pixels, self.used = pixels, 0
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def held(self, pixels: int) -> Iterator[None]:
        share = min(pixels, self.pixels)  # a decode larger than the budget runs alone
        with self._changed:
            self._changed.wait_for(lambda: self.used + share <= self.pixels)
            self.used += share
        try:
            yield
        finally:
            with self._changed:
                self.used -= share
                self._changed.notify_all()


def release_memory() -> None:
    """Hand freed heap memory back to the operating system (glibc's ``malloc_trim``).

    glibc keeps what a thread frees in that thread's arena for reuse, and big decodes run
    in worker threads: without this, 40 concurrent large uploads left the server 2.3 GB
    larger for good. A no-op where there is no glibc (macOS, Windows, musl).
    """
    if sys.platform.startswith("linux"):
        trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
        if trim is not None:
            trim(0)


@contextlib.contextmanager
def _opened(data: bytes, cover: tuple[int, int], max_pixels: int) -> Iterator[Image.Image]:
    """The image, header read and checked, nothing decoded; a JPEG set to decode reduced,
    still covering ``cover`` (width, height)."""
    with Image.open(io.BytesIO(data)) as im:
        width, height = im.size
        im.draft(im.mode, cover)  # JPEG: scale 1/2, 1/4 or 1/8 at decode; others: no-op
        if im.width * im.height > max_pixels:
            raise UploadTooLarge(f"the image has {width}x{height} pixels, over the limit of "
                                 f"{max_pixels:,}; upload a smaller image")
        try:
            yield im
        finally:
            im.close()  # frees the pixels now (leaving ``with`` closes only the file)


def _reduce(im: Image.Image, factor: int) -> Image.Image:
    """``im`` reduced ``factor`` times (box average), in a mode that averages."""
    if im.mode in ("P", "PA") or "transparency" in im.info:
        # Palette indices and colour keys do not average; as load_image would convert them.
        transparent = im.mode == "PA" or "transparency" in im.info
        im = im.convert("RGBA" if transparent else "RGB")
    elif im.mode == "1":
        im = im.convert("L")
    elif im.mode.startswith("I;16"):  # reduce() lacks 16-bit modes; keep load_image's scaling
        return im.convert("I").reduce(factor).convert("I;16")
    return im.reduce(factor)  # RGBA and LA: premultiplied by Pillow, so alpha averages right


def _shrink(im: Image.Image, cover: tuple[int, int]) -> Image.Image:
    """``im`` reduced by a whole factor while it still covers ``cover``, strip by strip:
    strips a multiple of the factor high reduce exactly as the whole image would, and any
    conversion (a palette, Pillow's premultiplied alpha) copies only a strip."""
    factor = min(im.width // cover[0], im.height // cover[1])
    if factor < 2:
        return im
    rows = factor * max(1, _STRIP_PIXELS // (factor * im.width))
    strips = [_reduce(im.crop((0, top, im.width, min(top + rows, im.height))), factor)
              for top in range(0, im.height, rows)]
    out = Image.new(strips[0].mode, (strips[0].width, sum(s.height for s in strips)))
    top = 0
    for strip in strips:
        out.paste(strip, (0, top))
        top += strip.height
    return out


def decode_upload(data: bytes, size: tuple[int, int], channels: int,
                  max_pixels: int = MAX_UPLOAD_PIXELS,
                  budget: DecodeBudget | None = None) -> torch.Tensor:
    """An uploaded file's bytes as the uint8 ``[C, H, W]`` image the model takes.

    Args:
        data: the file.
        size: ``(H, W)`` the model takes.
        channels: the channels it takes.
        max_pixels: most pixels decoded (after a JPEG's reduction); checked from the header.
        budget: shared by the decodes of a server; this one waits for its pixels there.

    Raises:
        UploadTooLarge: more than ``max_pixels`` pixels.
        ValueError: empty, or not an image Pillow can read.

    Example:
        >>> import io
        >>> from PIL import Image
        >>> from cnnkit.web.inputs import decode_upload
        >>> buf = io.BytesIO(); Image.new("RGB", (20, 10), "red").save(buf, "PNG")
        >>> tuple(decode_upload(buf.getvalue(), (8, 8), 1).shape)
        (1, 8, 8)
    """
    if not data:
        raise ValueError("the upload is empty; choose an image file (PNG, JPEG, ...)")
    cover = (OVERSAMPLE * size[1], OVERSAMPLE * size[0])
    decoded = 0
    try:
        with _opened(data, cover, max_pixels) as im:
            pixels = im.width * im.height
            im.verify()
        with budget.held(pixels) if budget is not None else contextlib.nullcontext(), \
                _opened(data, cover, max_pixels) as im:  # verify() leaves it unusable
            decoded = pixels  # a decode that fails half-way has allocated them too
            im.load()
            return load_image(_shrink(im, cover), size=size, channels=channels)
    except Image.DecompressionBombError as e:  # Pillow's own limit, from the header
        raise UploadTooLarge(f"the image has too many pixels ({e}); upload a smaller "
                             "image") from e
    except UploadTooLarge:
        raise
    except _DECODE_ERRORS as e:
        reason = " ".join(re.sub(r"<[^>]*>", "", str(e)).split())  # no object reprs
        raise ValueError(f"the upload is not an image Pillow can read ({reason}); upload a "
                         "PNG, JPEG, BMP, GIF or TIFF file") from e
    finally:
        if decoded >= _TRIM_PIXELS:
            release_memory()


# NIfTI-1 and NIfTI-2 header sizes and nibabel's classes for them.
_NIFTI_HEADERS = ((348, "Nifti1Header"), (540, "Nifti2Header"))
_GZIP = b"\x1f\x8b"


def _inflate(data: bytes, limit: int) -> bytes:
    """At most ``limit`` bytes of ``data``, decompressed if it is gzip: never more, so a
    small stream that would inflate to gigabytes costs ``limit`` bytes."""
    if data[:2] != _GZIP:
        return data[:limit]
    try:
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data, limit)
    except zlib.error as e:
        raise ValueError(f"the upload is a damaged gzip file ({e}); upload a .nii or .nii.gz "
                         "volume") from e


def _nifti_header(data: bytes) -> Any:
    try:
        import nibabel as nib  # lazy: optional dependency (the volumes extra)
    except ImportError as e:
        raise ValueError("reading NIfTI uploads needs nibabel; install it with pip install "
                         '-e ".[volumes]"') from e
    for size, name in _NIFTI_HEADERS:
        head = _inflate(data, size)
        if len(head) < size:
            continue
        try:
            return getattr(nib, name).from_fileobj(io.BytesIO(head), check=True)
        except Exception:  # noqa: BLE001, S112 - nibabel raises many types; try the next
            continue
    raise ValueError("the upload is not a NIfTI volume; the model takes volumes: upload a "
                     ".nii or .nii.gz file")


def decode_volume_upload(data: bytes, input_size: Sequence[int],
                         max_pixels: int = MAX_UPLOAD_PIXELS,
                         budget: DecodeBudget | None = None) -> torch.Tensor:
    """An uploaded NIfTI file's bytes (``.nii`` or ``.nii.gz``) as the ``[C, D, H, W]``
    volume the model takes (``input_size``), read as in training.

    Raises:
        UploadTooLarge: more than ``max_pixels`` voxels (all channels), from the header.
        ValueError: empty, not NIfTI, damaged or truncated.
    """
    if not data:
        raise ValueError("the upload is empty; choose a NIfTI volume (.nii, .nii.gz)")
    header = _nifti_header(data)
    shape = tuple(int(v) for v in header.get_data_shape())
    if len(shape) not in (3, 4) or 0 in shape:
        raise ValueError(f"the volume has shape {list(shape)}; upload a 3D (x, y, z) or 4D "
                         "(x, y, z, channel) NIfTI volume")
    voxels = math.prod(shape)
    if voxels > max_pixels:
        raise UploadTooLarge(f"the volume has {'x'.join(map(str, shape))} voxels, over the "
                             f"limit of {max_pixels:,}; upload a smaller volume")
    size = int(header.get_data_offset()) + voxels * header.get_data_dtype().itemsize
    with budget.held(voxels) if budget is not None else contextlib.nullcontext():
        raw = _inflate(data, size)
        if len(raw) < size:
            raise ValueError(f"the volume is truncated: its header declares {size:,} bytes, "
                             f"the file holds {len(raw):,}; upload the whole file")
        with tempfile.TemporaryDirectory(prefix="cnnkit-upload-") as folder:
            path = Path(folder) / "upload.nii"
            path.write_bytes(raw)
            del raw
            return load_input(path, input_size)


def _uint8(image: torch.Tensor) -> torch.Tensor:
    if image.dtype == torch.uint8:
        return image
    return (image.float().clamp(0, 1) * 255).round().to(torch.uint8)


def png_data_url(image: torch.Tensor, depth: int | None = None) -> str:
    """An input ``[C, *spatial]`` (uint8, or float in [0, 1]) as a ``data:image/png`` URL:
    an image as it is, a volume's slice ``depth`` (the middle one by default), a 1D
    signal as a strip (its one row repeated, so it reads at thumbnail size)."""
    image = _uint8(image)
    if image.ndim == 4:
        image = image[:, image.shape[1] // 2 if depth is None else depth]
    elif image.ndim == 2:
        image = image[:, None].expand(-1, max(1, image.shape[1] // 8), -1)
    a = np.ascontiguousarray(image[:3].permute(1, 2, 0).numpy())
    im = Image.fromarray(a[..., 0] if a.shape[-1] in (1, 2) else a)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class InputStore:
    """The test split by index and the most recent uploads, by id; safe between threads.

    Args:
        images: the test split ``[N, C, *spatial]``, uint8 or float in [0, 1] (may be
            empty).
        labels: its targets, as the run's task reads them: class labels ``[N]``, masks
            ``[N, *spatial]`` or values ``[N, K]``.
        classes: the names of the model's outputs.
        input_size: ``(C, *spatial)`` the model takes.
        max_uploads: uploads kept; the oldest is dropped beyond it.
        max_pixels: most pixels an upload may decode to (:func:`decode_upload`).
        decode_pixels: pixels decoded at the same time (:class:`DecodeBudget`); more wait.
        error: why the test split is missing, if it is.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str],
                 input_size: Sequence[int], max_uploads: int = 32,
                 max_pixels: int = MAX_UPLOAD_PIXELS, decode_pixels: int = MAX_UPLOAD_PIXELS,
                 error: str | None = None) -> None:
        self.images, self.labels, self.classes = images, labels, list(classes)
        self.input_size = tuple(input_size)
        self.max_uploads, self.max_pixels, self.error = max_uploads, max_pixels, error
        self._uploads: OrderedDict[str, tuple[torch.Tensor, str]] = OrderedDict()
        self._lock = threading.Lock()
        self._budget = DecodeBudget(decode_pixels)

    def __len__(self) -> int:
        return len(self.images)

    def _label(self, i: int) -> int | None:
        """Test input ``i``'s class, when its target is one of the model's outputs (not a
        mask, values, or a label the model does not predict, as super-resolution's)."""
        t = self.labels[i]
        is_class = t.ndim == 0 and not t.is_floating_point() and 0 <= int(t) < len(self.classes)
        return int(t) if is_class else None

    def target(self, key: str) -> torch.Tensor | None:
        """The target of a test input (a label, mask or values); None for an upload."""
        self.get(key)  # checks the id
        kind, ident = key.split(":")
        return self.labels[int(ident)] if kind == "test" else None

    def get(self, key: str) -> tuple[torch.Tensor, int | None]:
        """The input ``[C, *spatial]`` and its class label (None for uploads and for
        targets that are not classes).

        Raises:
            ValueError: ``key`` is not ``test:<index>`` or ``upload:<token>``.
            LookupError: no such test image, or the upload is unknown or was dropped.
        """
        m = _ID.match(key or "")
        if m is None:
            raise ValueError(f"input {key!r} is not an input id; use test:<index> or the "
                             "upload:<token> that /api/upload returned")
        kind, ident = m.groups()
        if kind == "test":
            if not ident.isdigit() or int(ident) >= len(self.images):
                raise LookupError(f"no test image {ident}; the test split has "
                                  f"{len(self.images)} images (test:0 .. test:{len(self) - 1})")
            return self.images[int(ident)], self._label(int(ident))
        with self._lock:
            if ident not in self._uploads:
                raise LookupError(f"upload {ident} is not held (only the last "
                                  f"{self.max_uploads} are kept); upload the image again")
            self._uploads.move_to_end(ident)
            return self._uploads[ident][0], None

    def add_upload(self, data: bytes, filename: str) -> str:
        """Decode and keep an upload (an image, or a NIfTI volume for a model of volumes);
        returns its id ``upload:<token>``.

        Raises:
            UploadTooLarge: over the pixel (voxel) limit.
            ValueError: not a file of the model's kind of input, or damaged.
        """
        c, *spatial = self.input_size
        if len(spatial) == 3:
            image = decode_volume_upload(data, self.input_size, self.max_pixels, self._budget)
        elif len(spatial) == 2:
            image = decode_upload(data, tuple(spatial), c, self.max_pixels, self._budget)
        else:
            raise ValueError(f"the model takes {len(spatial)}D inputs, which cannot be "
                             "uploaded (cnnkit reads images and NIfTI volumes); explore the "
                             "test split")
        token = secrets.token_hex(8)
        with self._lock:
            self._uploads[token] = (image, filename)
            while len(self._uploads) > self.max_uploads:
                self._uploads.popitem(last=False)
        return f"upload:{token}"

    def listing(self, offset: int, limit: int) -> dict[str, Any]:
        """Test images ``offset .. offset + limit`` with labels and thumbnails."""
        if offset < 0 or limit < 1:
            raise ValueError("offset must be >= 0 and limit >= 1")
        stop = min(offset + min(limit, 500), len(self.images))
        items = []
        for i in range(offset, stop):
            label = self._label(i)
            items.append({"input": f"test:{i}", "label": label,
                          "class": None if label is None else self.classes[label],
                          "image": png_data_url(self.images[i])})
        return {"total": len(self.images), "offset": offset, "items": items}
