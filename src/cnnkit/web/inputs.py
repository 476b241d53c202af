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
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import io
import re
import secrets
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from PIL import Image

from cnnkit.data import load_image

__all__ = ["InputStore", "UploadTooLarge", "DecodeBudget", "decode_upload", "png_data_url",
           "release_memory", "MAX_UPLOAD_PIXELS"]

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


def png_data_url(image: torch.Tensor) -> str:
    """A uint8 ``[C, H, W]`` image as a ``data:image/png`` URL."""
    a = image.permute(1, 2, 0).numpy()
    im = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class InputStore:
    """The test split by index and the most recent uploads, by id; safe between threads.

    Args:
        images: the test split, uint8 ``[N, C, H, W]`` (may be empty).
        labels: its labels ``[N]``.
        classes: class names.
        input_size: ``(C, H, W)`` the model takes.
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

    def get(self, key: str) -> tuple[torch.Tensor, int | None]:
        """The uint8 image ``[C, H, W]`` and its label (None for uploads).

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
            return self.images[int(ident)], int(self.labels[int(ident)])
        with self._lock:
            if ident not in self._uploads:
                raise LookupError(f"upload {ident} is not held (only the last "
                                  f"{self.max_uploads} are kept); upload the image again")
            self._uploads.move_to_end(ident)
            return self._uploads[ident][0], None

    def add_upload(self, data: bytes, filename: str) -> str:
        """Decode and keep an upload; returns its id ``upload:<token>``."""
        c, h, w = self.input_size
        image = decode_upload(data, (h, w), c, self.max_pixels, self._budget)
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
        items = [{"input": f"test:{i}", "label": int(self.labels[i]),
                  "class": self.classes[int(self.labels[i])], "image": png_data_url(self.images[i])}
                 for i in range(offset, stop)]
        return {"total": len(self.images), "offset": offset, "items": items}
