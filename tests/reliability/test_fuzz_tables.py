"""The reliability catalogue, a property-based fuzzer over the table loaders (issue 12, point
11): hostile csv files (any bytes, headers, paths, labels) and npz archives (any arrays,
dtypes and shapes, damaged zips) either load into an :class:`ImageData` whose invariants
hold, or are refused with a ValueError/FileNotFoundError of one line naming the file.
Anything else is a bug; those found are kept as explicit examples (helpers: ``fuzzing.py``)."""

from __future__ import annotations

import csv
import io
import re
import struct
import zipfile

import numpy as np
import pytest
from fuzzing import (
    A_PAIR,
    SIDES,
    check_data,
    encode,
    fuzz,
    hostile,
    load_files,
)
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cnnkit.data import load_data

# -- csv --------------------------------------------------------------------------------------

GOOD_PATHS = ["a.png", "b.png", "sub/c.png", "./b.png", "{ROOT}/a.png", "broken.png"]
BAD_PATHS = st.sampled_from(
    ["folder.png", "missing.png", "{ROOT}/missing.png", "~nosuchuser/a.png", "~/no/such/a.png",
     "n" * 300, "a\x00.png", "", " a.png ", "data.csv", "sub/../a.png", "a.png\nb.png",
     "a.png\u2028", "sub"]) | st.text(max_size=8)
GOOD_LABELS = ["0", "1", "2", "cat", "dog", " 1 "]
BAD_LABELS = (st.integers(-2, 12).map(str) | st.floats().map(str) | st.text(max_size=6)
              | st.sampled_from(["1e3", "0x10", "1_0", "\u0663", "9" * 5000, "", "x\ny", "'",
                                 '"', "q" * 140_000]))
HEADER = st.lists(st.sampled_from(["path", "label", "file", "class", "y", "Image ", "junk", ""]),
                  min_size=1, max_size=4)
CSV_FOLDER = [("a.png", encode(np.zeros((3, 3), np.uint8))), ("broken.png", b"\x89PNG"),
              ("b.png", encode(np.full((4, 2, 3), (9, 99, 199), np.uint8))),
              ("sub/c.png", encode(np.ones((3, 3), np.uint8))), ("folder.png/", b"")]


@st.composite
def csv_bytes(draw) -> bytes:
    """Rows naming real, broken, missing, absolute, home-relative and odd paths with integer,
    float and text labels, quoted or not, in UTF-8 (with a BOM), UTF-16 or Latin-1; or junk."""
    if hostile(draw, 8):
        return draw(st.binary(max_size=120) | st.text(max_size=120).map(
            lambda t: t.encode("utf-8", "surrogatepass")))
    rows = [draw(HEADER)] if hostile(draw, 3) else []
    for _ in range(draw(st.integers(0, 5) if hostile(draw, 4) else st.integers(2, 5))):
        path = draw(BAD_PATHS) if hostile(draw, 6) else draw(st.sampled_from(GOOD_PATHS))
        label = draw(BAD_LABELS) if hostile(draw, 6) else draw(st.sampled_from(GOOD_LABELS))
        row = [label, path] if hostile(draw, 10) else [path, label]
        rows.append(row + draw(st.lists(st.text(max_size=3), max_size=1)) if hostile(draw, 5)
                    else row)
    buf = io.StringIO()
    if hostile(draw, 4):  # no quoting at all: stray quotes and separators stay as they are
        buf.write("\n".join(",".join(r) for r in rows) + draw(st.sampled_from(["", "\n\n"])))
    else:
        csv.writer(buf, quoting=draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL])),
                   lineterminator=draw(st.sampled_from(["\n", "\r\n", "\r"]))).writerows(rows)
    encoding = draw(st.sampled_from(["utf-16", "latin-1"])) if hostile(draw, 8) else \
        draw(st.sampled_from(["utf-8", "utf-8-sig"]))
    return buf.getvalue().encode(encoding, "replace")


@fuzz(600)
@example(content=b"~nosuchuser/a.png,0\nb.png,1\n", strict=False)  # RuntimeError (expanduser)
@example(content=b"n" * 300 + b",0\nb.png,1\n", strict=False)  # OSError: file name too long
@example(content=b'a.png,"x\ny"\nb.png,"x\ny"\n', strict=False)  # a message of two lines
@example(content=b'"a.png\nb.png",0\nb.png,1\n', strict=True)  # a message of two lines
@given(content=csv_bytes(), strict=st.booleans())
def test_csv_files(content, strict):
    check_data(load_files(CSV_FOLDER + [("data.csv", content)],
                          lambda root: load_data(str(root / "data.csv"), strict=strict)))


# -- npz --------------------------------------------------------------------------------------

DTYPES = [np.bool_, np.uint8, np.int8, np.int64, np.uint64, np.float16, np.float32, np.float64,
          np.complex64, np.dtype("<U3"), np.dtype("S3"), np.dtype("m8[s]")]
OBJECTS = st.lists(st.integers() | st.text(max_size=3) | st.none() | st.just(b"\x00"),
                   min_size=1, max_size=4).map(lambda v: np.array(v + [[0]], dtype=object))
ANY_ARRAY = OBJECTS | st.sampled_from(DTYPES).flatmap(lambda dtype: hnp.arrays(
    dtype, hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=3)))


@st.composite
def npz_arrays(draw) -> dict[str, np.ndarray]:
    """Plausible images and labels (any layout, dtype and range, lengths that may differ),
    then, one time in three, arrays of any dtype and shape under any key."""
    arrays = {}
    if not hostile(draw, 6):
        n, (h, w) = draw(st.integers(0, 5) if hostile(draw, 4) else st.integers(2, 6)), draw(SIDES)
        shape = draw(st.sampled_from([(n, h, w), (n, h, w, 1), (n, h, w, 3), (n, h, w, 4),
                                      (n, 3, h, w), (n, 2, h, w), (n, h, w, 2)]))
        dtype = np.dtype(draw(st.sampled_from(["u1", "f4", "f8", "i8", "?", "f2"])))
        elements = None if hostile(draw, 4) or dtype.kind == "b" else \
            st.floats(0, 1, width=16) if dtype.kind == "f" else st.integers(0, 255)
        arrays[draw(st.sampled_from(["x", "images"]))] = draw(hnp.arrays(dtype, shape,
                                                                         elements=elements))
        m = max(0, n + (draw(st.sampled_from([1, -1])) if hostile(draw, 6) else 0))
        labels = np.array(draw(st.lists(st.integers(0, 3), min_size=m, max_size=m)), np.int64)
        arrays[draw(st.sampled_from(["y", "labels"]))] = np.char.add("c", labels.astype(str)) \
            if draw(st.booleans()) else labels
        if hostile(draw, 4):
            arrays["classes"] = np.array([f"c{k}" for k in range(draw(st.integers(0, 5)))])
    if hostile(draw, 3):
        keys = st.sampled_from(["x", "images", "y", "labels", "classes", "junk", "x.npy"])
        arrays.update(draw(st.dictionaries(keys, ANY_ARRAY, min_size=1, max_size=2)))
    return arrays


# Damage to the zip, up to two steps: cut, bytes overwritten, other bytes, the first byte of
# each member's data, or a field of each central directory entry (flags, compression method,
# first byte of the name).
CENTRAL = {"flags": (8, "<H"), "method": (10, "<H"), "name": (46, "B")}
DAMAGE = st.lists(st.one_of(
    st.tuples(st.just("cut"), st.floats(0, 1)),
    st.tuples(st.just("overwrite"), st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)),
                                             min_size=1, max_size=6)),
    st.tuples(st.just("junk"), st.sampled_from([b"", b"PK\x03\x04", b"PK\x05\x06"]).flatmap(
        lambda magic: st.binary(max_size=60).map(lambda b: magic + b))),
    st.tuples(st.just("flags"), st.integers(0, 0xFFFF)), st.tuples(st.just("name"), st.just(255)),
    st.tuples(st.just("data"), st.integers(0, 255)),
    st.tuples(st.just("method"), st.sampled_from([1, 6, 8, 9, 12, 14, 93, 99]))), max_size=2)


def npz_bytes(arrays: dict[str, np.ndarray], compression: int, damage: list) -> bytes:
    """``np.savez`` with any zip compression, then damaged step by step."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as z:
        for key, a in arrays.items():
            np.lib.format.write_array(member := io.BytesIO(), a, allow_pickle=True)
            z.writestr(f"{key}.npy", member.getvalue())
    data = bytearray(buf.getvalue())
    for kind, arg in damage:
        if kind in ("cut", "junk"):
            data = data[:int(arg * len(data))] if kind == "cut" else bytearray(arg)
        for where, byte in arg if kind == "overwrite" and data else []:
            data[min(int(where * len(data)), len(data) - 1)] = byte
        for at in [m.start() for m in re.finditer(b"PK\x03\x04", data[:-30])] \
                if kind == "data" else []:
            name, extra = struct.unpack("<HH", data[at + 26:at + 30])  # a local file header
            data[min(at + 30 + name + extra, len(data) - 1)] = arg
        offset, fmt = CENTRAL.get(kind, (0, ""))
        for at in [m.start() + offset for m in re.finditer(b"PK\x01\x02", data)] if fmt else []:
            data[at:at + struct.calcsize(fmt)] = struct.pack(fmt, arg)
    return bytes(data)


TWO = {"x": np.zeros((2, 3, 3), np.uint8), "y": np.array([0, 1])}
NOISE = {"x": np.random.default_rng(0).random((4, 8, 8)), "y": np.arange(4) % 2}
STORED, DEFLATED, BZIP2, LZMA = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2,
                                 zipfile.ZIP_LZMA)


@fuzz(800)
@example({**TWO, "classes": np.array(5)}, STORED, [], None)  # TypeError: 'int' not iterable
@example({**TWO, "x": np.zeros((2, 0, 3), np.uint8)}, STORED, [], None)  # loaded, height 0
@example({**TWO, "y": np.array([1e300, 0])}, STORED, [], None)  # RuntimeWarning: int64 cast
@example(TWO, STORED, [("flags", 1)], None)  # RuntimeError: member flagged as encrypted
@example(TWO, STORED, [("method", 99)], None)  # NotImplementedError: unknown compression
@example(TWO, STORED, [("flags", 0x800), ("name", 255)], None)  # bare UnicodeDecodeError
@example({**TWO, "x": np.zeros((2, 64, 64), np.uint8)}, STORED, [("data", 0)],
         None)  # numpy's bare ValueError (not an .npy member) from a member over 4 KB
@example(NOISE, DEFLATED, [("overwrite", [(0.3, 0)])], None)  # zlib.error
@example(NOISE, LZMA, [("overwrite", [(0.5, 0)])], None)  # lzma.LZMAError
@given(arrays=npz_arrays(), compression=st.sampled_from([STORED, DEFLATED, BZIP2, LZMA]),
       damage=DAMAGE, image_size=st.none() | st.integers(1, 5))
def test_npz_files(arrays, compression, damage, image_size):
    blob = npz_bytes(arrays, compression, damage)
    check_data(load_files([("data.npz", blob)], lambda root: load_data(
        str(root / "data.npz"), image_size=image_size)), size=image_size)


@pytest.mark.parametrize("files, spec, match", [
    ([A_PAIR[0], ("seg/masks/a.tif", encode(np.array([[-1, 0], [1, 1]], np.int32), "TIFF"))],
     "seg", r"mask '.*a\.tif' has class index -1; "),
    ([("d.npz", npz_bytes({**TWO, "y": np.array([0, 2**64 - 1], np.uint64)}, STORED, []))],
     "d.npz", "labels reach 18446744073709551615 but only 2 values occur; "),
], ids=["mask-of-minus-one", "uint64-label"])
def test_wrong_data_the_property_cannot_see(tmp_path, files, spec, match):
    """Found while fixing the loaders: a 32-bit mask's -1 was cast to 255 ("ignore") and its
    pixels silently left out; a uint64 label past 2**63 was cast to a negative int64 first
    and reported as "found -1". Loaded or refused alike, they pass the property."""
    for rel, data in files:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    with pytest.raises(ValueError, match=match):
        load_data(str(tmp_path / spec), targets="masks" if spec == "seg" else "labels")
