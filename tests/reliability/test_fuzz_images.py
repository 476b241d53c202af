"""The reliability catalogue, a property-based fuzzer over the image loaders (issue 12, point
11): hostile but small image files (random bytes, truncated files, every Pillow mode, odd and
declared sizes), class folders and segmentation folders (masks of any mode and values,
missing partners, classes.txt) either load into an :class:`ImageData` whose invariants hold,
or are refused with a ValueError/FileNotFoundError of one line naming the file. Anything
else is a bug; those found are kept as explicit examples (helpers: ``fuzzing.py``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from fuzzing import (
    A_PAIR,
    DECLARED,
    MAGICS,
    SAVES,
    SIDES,
    SUFFIX,
    TRANSPARENCY,
    check_data,
    declared_png,
    encode,
    fuzz,
    hostile,
    load_files,
    outcome,
)
from hypothesis import example, given
from hypothesis import strategies as st
from PIL import Image

from cnnkit.data import load_data, load_image


@st.composite
def pil_images(draw) -> Image.Image:
    """A small image of any mode: random or constant pixels (NaN/inf floats, negative ints,
    palette indices past a short palette), palette and transparency quirks."""
    mode, (w, h) = draw(st.sampled_from(sorted(SAVES))), draw(SIDES)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n = len(Image.new(mode, (w, h)).tobytes())
    raw = rng.bytes(n) if draw(st.booleans()) else bytes([draw(st.integers(0, 255))]) * n
    im = Image.frombytes(mode, (w, h), raw)
    if mode in ("P", "PA") and draw(st.booleans()):
        im.putpalette(rng.bytes(3 * draw(st.integers(1, 256))))
    if mode in TRANSPARENCY and draw(st.booleans()):
        im.info["transparency"] = draw(TRANSPARENCY[mode])
    return im


@st.composite
def image_files(draw, damaged: int = 2) -> tuple[str, bytes]:
    """``(suffix, bytes)``: a real image, or (one time in ``damaged``) one truncated or with
    bytes overwritten, a PNG header declaring a huge size, or random bytes behind a magic."""
    kind = draw(st.sampled_from(["cut", "overwritten", "random", "declared"])) \
        if hostile(draw, damaged) else "real"
    if kind == "random":
        return (draw(st.sampled_from(sorted(SUFFIX.values()))),
                draw(st.sampled_from(MAGICS)) + draw(st.binary(max_size=48)))
    if kind == "declared":
        return ".png", declared_png(*draw(st.sampled_from(DECLARED)))
    im = draw(pil_images())
    fmt = draw(st.sampled_from(SAVES[im.mode]))
    data = bytearray(encode(im, fmt))
    if kind == "cut":
        data = data[:draw(st.integers(0, len(data) - 1))]
    for pos, byte in draw(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)),
                                   min_size=1, max_size=4)) if kind == "overwritten" else []:
        data[pos] = byte
    return SUFFIX[fmt], bytes(data)


SIZES = st.none() | st.tuples(st.integers(1, 9), st.integers(1, 9))
SNAN = np.array([[0x7FA00000, 0x7FC00000, 0x7F800000]], np.uint32).view(np.float32)


@fuzz(600)
@example(blob=(".tif", encode(SNAN, "TIFF")), size=None, channels=1)  # NaN cast RuntimeWarning
@given(blob=image_files(), size=SIZES, channels=st.sampled_from([1, 3]))
def test_load_image_file(blob, size, channels):
    t = load_files([("image" + blob[0], blob[1])],
                   lambda root: load_image(root / ("image" + blob[0]), size, channels))
    if t is not None:
        assert t.dtype == torch.uint8 and t.ndim == 3 and t.shape[0] == channels
        assert size is None or tuple(t.shape[1:]) == size


@fuzz(300)
@example(im=Image.fromarray(SNAN), size=None, channels=3)  # NaN cast RuntimeWarning
@given(im=pil_images(), size=SIZES, channels=st.sampled_from([1, 3]))
def test_load_image_of_every_mode(im, size, channels):
    """A PIL image of any mode (no file to be wrong about) always converts."""
    t = outcome(lambda: load_image(im, size, channels), Path("/no-file"))
    assert t.dtype == torch.uint8 and t.shape[0] == channels
    assert tuple(t.shape[1:]) == (size or (im.height, im.width))


@st.composite
def class_trees(draw) -> list[tuple[str, bytes]]:
    """Files of 0-3 class folders (some nested, some not images) and maybe loose files."""
    names = draw(st.lists(st.sampled_from(["a", "b", "cät", "with space", "'q", ".hid", "0"]),
                          min_size=0 if hostile(draw, 5) else 2, max_size=3, unique=True))
    files = [("data/", b"")]
    for c in names:
        blobs = draw(st.lists(image_files(damaged=4), min_size=0 if hostile(draw, 5) else 1,
                              max_size=3))
        files += [(f"data/{c}/{draw(st.sampled_from(['', '', 'deep/', '.dot/']))}{i}{suffix}",
                   data) for i, (suffix, data) in enumerate(blobs)]
    if hostile(draw, 5):
        files.append(("data/loose.png", encode(np.zeros((2, 2), np.uint8))))
    if hostile(draw, 5):
        files.append((f"data/{names[0] if names else 'c'}/notes.txt", b"not an image"))
    return files


@fuzz(400)
@given(tree=class_trees(), strict=st.booleans(), image_size=st.none() | st.integers(1, 9),
       channels=st.sampled_from([None, 1, 3]), targets=st.sampled_from(["labels", "images"]))
def test_class_folders(tree, strict, image_size, channels, targets):
    data = load_files(tree, lambda root: load_data(
        str(root / "data"), image_size=image_size, channels=channels, strict=strict,
        targets=targets))
    check_data(data, size=image_size, channels=channels, min_classes=1 + (targets == "labels"))


# -- masks ------------------------------------------------------------------------------------

MASK_VALUES = [0, 1, 2, 3, 7, 200, 254, 255, 256, 1000, 65535, -1]


@st.composite
def mask_files(draw, hw: tuple[int, int]) -> tuple[str, bytes]:
    """A mask of mode L, P, 1, I;16, I or RGB whose pixels take a few values (class indices,
    or one value, 0/255, sparse, past 255, negative), or a damaged file."""
    if hostile(draw, 10):
        return draw(image_files(damaged=1))
    mode = draw(st.sampled_from(["L", "P", "1", "I;16", "I", "RGB"]))
    values = st.sampled_from(MASK_VALUES) if hostile(draw, 3) else st.integers(0, 3)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    a = rng.choice(draw(st.lists(values, min_size=1, max_size=4, unique=True)), size=hw)
    if mode == "I":  # 32-bit: TIFF, not PNG
        return ".tif", encode(a.astype(np.int32), "TIFF")
    if mode in ("1", "I;16"):
        return ".png", encode(a > 0 if mode == "1" else (a % 65536).astype(np.uint16))
    im = Image.fromarray((a % 256).astype(np.uint8)).convert("RGB" if mode == "RGB" else "L")
    if mode == "P":
        im = Image.frombytes("P", im.size, im.tobytes())
        im.putpalette(rng.bytes(3 * draw(st.integers(1, 256))))
    return ".png", encode(im)


@st.composite
def pair_folders(draw) -> list[tuple[str, bytes]]:
    """``images/`` and ``masks/`` with 1-3 stems: sizes that match or not, missing partners,
    two files of one stem, and a ``classes.txt`` of random text or bytes."""
    files = [("seg/images/", b""), ("seg/masks/", b"")]
    for stem in draw(st.lists(st.sampled_from(["a", "b", "sub/c"]), max_size=3, unique=True,
                              min_size=0 if hostile(draw, 10) else 1)):
        h, w = draw(SIDES)
        if not hostile(draw, 15):
            shape = (h, w, 3) if draw(st.booleans()) else (h, w)
            pixels = np.random.default_rng(h * w).integers(0, 256, shape, np.uint8)
            files.append((f"seg/images/{stem}.png", encode(pixels)))
        if hostile(draw, 20):
            suffix, data = draw(image_files(damaged=1))
            files.append((f"seg/images/{stem}{suffix}", data))
        if not hostile(draw, 15):
            suffix, data = draw(mask_files(draw(SIDES) if hostile(draw, 10) else (h, w)))
            files.append((f"seg/masks/{stem}{suffix}", data))
    text = draw(st.binary(max_size=24) | st.text(max_size=24).map(
        lambda s: s.encode("utf-8", "surrogatepass"))) if hostile(draw, 4) else \
        draw(st.sampled_from([None, b"background\nobject\nother\nmore\n"]))
    return files + ([("seg/classes.txt", text)] if text is not None else [])



@fuzz(400)
@example(files=A_PAIR + [("seg/masks/a.png", b"\x89PNG\r\n\x1a\n")], strict=False,
         image_size=None)  # the mask replaced by a bare PNG signature: UnidentifiedImageError
@example(files=A_PAIR + [("seg/classes.txt", b"\xff\n")], strict=False,
         image_size=None)  # a bare UnicodeDecodeError that names no file
@given(files=pair_folders(), strict=st.booleans(), image_size=st.none() | st.integers(1, 7))
def test_segmentation_pairs(files, strict, image_size):
    check_data(load_files(files, lambda root: load_data(
        str(root / "seg"), targets="masks", strict=strict, image_size=image_size)),
        size=image_size)
