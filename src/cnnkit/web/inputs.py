"""The explorer's inputs: the run's test split by index and uploads held in memory.

Inputs are named by id, never by path, so no request can make the server read a file:
``test:<index>`` is an image of the run's own test split (same data, seed and split as
training) and ``upload:<token>`` an image a user uploaded. Uploads are limited in bytes
and pixels, checked by Pillow (``verify`` and then a full decode, in memory), decoded
exactly as in training (mode, resize and crop by :func:`cnnkit.data.load_image`), and
only the most recent ones are kept, so memory stays bounded.
"""

from __future__ import annotations

import base64
import io
import re
import secrets
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

__all__ = ["InputStore", "UploadTooLarge", "decode_upload", "png_data_url"]

# What Pillow raises on a file it cannot read (an UnidentifiedImageError is an OSError).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
_ID = re.compile(r"(test|upload):([0-9a-f]{1,32})\Z")


class UploadTooLarge(ValueError):
    """An upload over the byte or pixel limit (HTTP 413)."""


def decode_upload(data: bytes, size: tuple[int, int], channels: int,
                  max_pixels: int = 40_000_000) -> torch.Tensor:
    """An uploaded file's bytes as the uint8 ``[C, H, W]`` image the model takes.

    Raises:
        UploadTooLarge: more than ``max_pixels`` pixels.
        ValueError: empty, or not an image Pillow can read.

    Example:
        >>> buf = io.BytesIO(); Image.new("RGB", (20, 10), "red").save(buf, "PNG")
        >>> tuple(decode_upload(buf.getvalue(), (8, 8), 1).shape)
        (1, 8, 8)
    """
    from cnnkit.data import load_image

    if not data:
        raise ValueError("the upload is empty; choose an image file (PNG, JPEG, ...)")
    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            if im.width * im.height > max_pixels:
                raise UploadTooLarge(f"the image has {im.width}x{im.height} pixels, over the "
                                     f"limit of {max_pixels:,}; upload a smaller image")
            im.verify()
        with Image.open(io.BytesIO(data)) as im:  # verify() leaves the image unusable
            im.load()
            return load_image(im, size=size, channels=channels)
    except UploadTooLarge:
        raise
    except _DECODE_ERRORS as e:
        reason = " ".join(re.sub(r"<[^>]*>", "", str(e)).split())  # no object reprs
        raise ValueError(f"the upload is not an image Pillow can read ({reason}); upload a "
                         "PNG, JPEG, BMP, GIF or TIFF file") from e


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
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str],
                 input_size: Sequence[int], max_uploads: int = 32) -> None:
        self.images, self.labels, self.classes = images, labels, list(classes)
        self.input_size = tuple(input_size)
        self.max_uploads = max_uploads
        self._uploads: OrderedDict[str, tuple[torch.Tensor, str]] = OrderedDict()
        self._lock = threading.Lock()

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
        image = decode_upload(data, (h, w), c)
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
