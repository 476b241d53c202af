"""Helpers of the loader fuzzers (``test_fuzz_images.py``, ``test_fuzz_tables.py``): the
property every loader must keep, temporary file trees, the invariants of :class:`ImageData`
and encoders of hostile files. ``CNNKIT_FUZZ_SCALE=10`` runs ten times the examples."""

from __future__ import annotations

import io
import os
import re
import struct
import tempfile
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from PIL import Image

from cnnkit.data import ImageData

SCALE = int(os.environ.get("CNNKIT_FUZZ_SCALE", "1"))


def fuzz(max_examples: int) -> settings:
    """Hypothesis settings: a fixed set of examples at the default scale (CI must not fail
    at random; a failure is reproducible as it is), fresh random ones when scaled up."""
    return settings(database=None, deadline=None, max_examples=max_examples * SCALE,
                    derandomize=SCALE == 1, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- the property ----------------------------------------------------------------------------

def outcome(load: Callable[[], object], root: Path) -> object | None:
    """``load()``'s result, or None when it raised one of the project's errors: ValueError or
    FileNotFoundError, one non-empty line naming something under ``root``. Any other exception
    propagates (a bug), and a RuntimeWarning from numpy (casting garbage) fails."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = load()
            event("loaded")
        except (ValueError, FileNotFoundError) as err:
            msg = str(err)
            assert msg.strip() and msg.splitlines() == [msg], f"not one line: {msg!r}"
            assert str(root) in msg, f"names no file: {msg!r}"
            event("refused: " + re.sub(r"'[^']*'|\d+", "_", msg.split(";")[0])[:70])
            result = None
    numeric = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)
               and not issubclass(w.category, Image.DecompressionBombWarning)]
    assert not numeric, numeric
    return result


def load_files(files: list[tuple[str, bytes]], load: Callable[[Path], object]) -> object | None:
    """Write ``files`` (``"dir/"`` makes a folder, ``{ROOT}`` is the folder's path) to a new
    temporary folder, then :func:`outcome` of ``load(folder)``. A folder per example: pytest's
    ``tmp_path`` is shared by all the examples of a test."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for rel, data in files:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            if rel.endswith("/"):
                (root / rel).mkdir(exist_ok=True)
            else:
                (root / rel).write_bytes(data.replace(b"{ROOT}", str(root).encode()))
        return outcome(lambda: load(root), root)


def check_data(data: ImageData | None, *, size: int | None = None, channels: int | None = None,
               min_classes: int = 2) -> None:
    """The invariants every loader promises (see :class:`ImageData`), if it loaded."""
    if data is None:
        return
    x, y = data.images, data.labels
    assert x.dtype in (torch.uint8, torch.float32) and x.ndim == 4
    n, c, h, w = x.shape
    assert n >= 1 and c in (1, 3) and h >= 1 and w >= 1, x.shape
    assert channels in (None, c) and size in (None, h) and size in (None, w)
    assert x.dtype == torch.uint8 or (torch.isfinite(x).all() and 0 <= x.min() <= x.max() <= 1)
    assert y.dtype == torch.int64 and y.shape == (n,)
    assert 0 <= y.min() <= y.max() < len(data.classes)
    assert len(data.classes) >= min_classes and all(isinstance(k, str) for k in data.classes)
    if data.masks is not None:
        m = data.masks
        assert m.dtype == torch.uint8 and m.shape == (n, h, w) and len(data.mask_classes) >= 2
        assert m[m != 255].numel() == 0 or m[m != 255].max() < len(data.mask_classes)
    assert data.sources is None or len(data.sources) == n


def hostile(draw, n: int) -> bool:
    """True one time in ``n``; shrinks to False (the benign input is the simpler one)."""
    return draw(st.integers(0, n - 1)) == n - 1


# -- image files ------------------------------------------------------------------------------

SUFFIX = {"PNG": ".png", "TIFF": ".tif", "GIF": ".gif", "BMP": ".bmp", "JPEG": ".jpg",
          "WEBP": ".webp"}
SAVES = {"1": ("PNG", "TIFF", "GIF", "BMP", "JPEG"), "L": tuple(SUFFIX), "RGB": tuple(SUFFIX),
         "P": ("PNG", "TIFF", "GIF", "BMP"), "RGBA": ("PNG", "TIFF", "GIF", "WEBP"),
         "LA": ("PNG", "TIFF", "GIF", "WEBP"), "PA": ("TIFF", "WEBP"), "I": ("TIFF", "GIF"),
         "I;16": ("PNG", "TIFF", "GIF"), "F": ("TIFF", "GIF"), "CMYK": ("TIFF", "JPEG"),
         "YCbCr": ("TIFF", "JPEG")}  # the formats that can save each mode
SIDES = st.tuples(st.integers(1, 6), st.integers(1, 6)) | st.sampled_from(
    [(1, 1), (1, 97), (97, 1), (2, 150)])
MAGICS = (b"", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"BM", b"\xff\xd8\xff\xe0", b"II*\x00",
          b"MM\x00*", b"RIFF\x10\x00\x00\x00WEBPVP8 ", b"P5\n", b"\x00\x00\x01\x00", b"8BPS",
          b"icns", b"DDS ", b"qoif", b"\x00\x00\x00\x0cjP  ")
TRANSPARENCY = {"P": st.integers(0, 255) | st.binary(max_size=8), "L": st.integers(0, 255),
                "I;16": st.integers(0, 65535), "RGB": st.tuples(*[st.integers(0, 255)] * 3)}
# What a 1x1 PNG's patched header declares: over the pixel limit, or under it with far too
# little data to decode.
DECLARED = [(10**5, 1), (1, 10**5), (9000, 9000), (2**31 - 1, 2), (0, 5), (3000, 2000)]


def encode(im: Image.Image | np.ndarray, fmt: str = "PNG") -> bytes:
    im, buf = Image.fromarray(im) if isinstance(im, np.ndarray) else im, io.BytesIO()
    with warnings.catch_warnings():  # Pillow's advice on palettes with transparency
        warnings.simplefilter("ignore")
        try:
            im.save(buf, fmt)
        except (OSError, ValueError, TypeError):  # a transparency this format cannot store
            im.info.pop("transparency", None)
            im.save(buf := io.BytesIO(), fmt)
    return buf.getvalue()


def declared_png(width: int, height: int) -> bytes:
    data = bytearray(encode(np.zeros((1, 1), np.uint8)))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)

# An image with its mask partner still to come (segmentation examples).
A_PAIR = [("seg/images/a.png", encode(np.zeros((2, 2), np.uint8))),
          ("seg/masks/a.png", encode(np.eye(2, dtype=np.uint8)))]
