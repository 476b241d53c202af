"""The reliability catalogue, inputs that ended in tracebacks, obscure messages or huge
allocations (issue 12, point 5). Each now gets one line naming the file and the fix (exit
code 2), and absurd sizes are refused before anything is allocated: the tests cap what
cnnkit may use with ``CNNKIT_MEMORY_LIMIT`` and watch the process's peak memory."""

from __future__ import annotations

import io
import resource
import struct
import zipfile
import zlib

import numpy as np
import pytest
from PIL import Image

from cnnkit._limits import MemoryLimitError, available_memory, parse_bytes, require_memory
from cnnkit.data import load_data

TRAIN = ["train", "--model", "lenet5", "--epochs", "1", "--no-progress"]


def _train(cli, data, tmp_path, *extra):
    return cli([*TRAIN, "--data", str(data), "--runs-dir", str(tmp_path / "runs"), *extra])


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _declared_png(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header declares ``width`` x ``height``: only a header is needed to be
    refused, so the test costs nothing."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_an_npz_that_is_not_a_zip(cli, one_line_error, tmp_path):
    (tmp_path / "data.npz").write_bytes(b"these are not arrays")
    line = one_line_error(*_train(cli, tmp_path / "data.npz", tmp_path)[::2])
    assert "'" + str(tmp_path / "data.npz") + "' is not an .npz file" in line
    assert "np.savez" in line


def test_a_truncated_npz(cli, one_line_error, tmp_path):
    np.savez(tmp_path / "full.npz", x=np.zeros((20, 8, 8), np.uint8), y=np.arange(20) % 2)
    data = (tmp_path / "full.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    line = one_line_error(*_train(cli, tmp_path / "cut.npz", tmp_path)[::2])
    assert "cut.npz" in line and "damaged" in line


def test_a_binary_file_given_as_csv_names_the_file(cli, one_line_error, tmp_path):
    (tmp_path / "data.csv").write_bytes(bytes(range(128, 256)) * 8)
    line = one_line_error(*_train(cli, tmp_path / "data.csv", tmp_path)[::2])
    assert f"csv '{tmp_path / 'data.csv'}' is not a text file" in line and "UTF-8" in line


@pytest.mark.parametrize("n, needle", [(0, "holds no samples"), (2, "has 2 samples, too few")])
def test_an_npz_with_too_few_samples(cli, one_line_error, tmp_path, n, needle):
    np.savez(tmp_path / "few.npz", x=np.zeros((n, 8, 8), np.uint8), y=np.arange(n) % 2)
    line = one_line_error(*_train(cli, tmp_path / "few.npz", tmp_path)[::2])
    assert needle in line and "few.npz" in line
    assert not (tmp_path / "runs").exists()


def test_a_label_column_of_ids_is_not_590001_classes(cli, one_line_error, tmp_path):
    """Issue 12: labels up to 590,000 tried to allocate 19.8 GB (a 590001 x 590001 confusion
    matrix); refused from the labels, before any model or matrix exists."""
    y = np.arange(40) % 10
    y[0] = 590_000
    np.savez(tmp_path / "ids.npz", x=np.zeros((40, 8, 8), np.uint8), y=y)
    before = _peak_mb()
    line = one_line_error(*_train(cli, tmp_path / "ids.npz", tmp_path)[::2])
    assert "labels reach 590000 but only 11 values occur" in line
    assert "np.unique(y, return_inverse=True)" in line
    assert _peak_mb() - before < 200


def test_an_image_size_that_cannot_fit_is_refused_before_loading(cli, one_line_error, tmp_path,
                                                                 monkeypatch):
    """Issue 12: --image-size 2048 on 8x8 digits allocated 8.6 GB. The training memory is
    estimated on the meta device first; the run is refused before the data is resized."""
    monkeypatch.setenv("CNNKIT_MEMORY_LIMIT", "4GB")
    before = _peak_mb()
    code, _, err = cli([*TRAIN, "--data", "digits", "--image-size", "2048", "--runs-dir",
                        str(tmp_path / "runs")])
    line = one_line_error(code, err)
    assert "training lenet5 on 1x2048x2048 inputs in batches of 64 needs" in line
    assert "more than the 4.0 GB available" in line and "smaller --image-size" in line
    assert _peak_mb() - before < 200
    assert not (tmp_path / "runs").exists()


def test_resizing_is_refused_when_the_images_cannot_fit(monkeypatch):
    monkeypatch.setenv("CNNKIT_MEMORY_LIMIT", "100MB")
    with pytest.raises(MemoryLimitError, match=r"resizing 1797 samples of 1x8x8 to 1x512x512 "
                       r"needs .* more than the 100.0 MB available"):
        load_data("digits", image_size=512)


def test_a_model_too_large_for_memory_is_refused_before_it_is_built(cli, one_line_error,
                                                                    tmp_path, monkeypatch):
    monkeypatch.setenv("CNNKIT_MEMORY_LIMIT", "1GB")
    line = one_line_error(*cli(["train", "--model", "tinyvgg", "--epochs", "1", "--model-opt",
                                "width=20000", "--runs-dir", str(tmp_path / "runs")])[::2])
    assert "training tinyvgg on 1x8x8 inputs" in line and "1.0 GB available" in line


def test_a_small_npz_cannot_declare_a_huge_array(cli, one_line_error, tmp_path, monkeypatch):
    """A zip member's .npy header is read (shape, dtype) before it is decompressed."""
    monkeypatch.setenv("CNNKIT_MEMORY_LIMIT", "1GB")
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False,
                                                  "shape": (10**6, 100, 100)})
    with zipfile.ZipFile(tmp_path / "bomb.npz", "w") as z:
        z.writestr("x.npy", header.getvalue())
        y = io.BytesIO()
        np.save(y, np.arange(10) % 2)
        z.writestr("y.npy", y.getvalue())
    line = one_line_error(*_train(cli, tmp_path / "bomb.npz", tmp_path)[::2])
    assert "array 'x' of npz" in line and "1000000x100x100 uint8" in line


@pytest.mark.parametrize("values, needle", [
    ((0, 200), "would make 201 classes with 199 never seen"),
    ((0, 255), "hold only the value(s) 0, 255"),
], ids=["0-200", "0-255"])
def test_masks_whose_values_are_not_class_indices(cli, one_line_error, tmp_path, values, needle):
    """Issue 12: masks of 0/200 silently became 201 classes."""
    root = tmp_path / "seg"
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(
            root / "images" / f"{i}.png")
        mask = np.full((16, 16), values[0], np.uint8)
        mask[4:12, 4:12] = values[1]
        Image.fromarray(mask).save(root / "masks" / f"{i}.png")
    line = one_line_error(*cli(["train", "--task", "segment", "--data", str(root), "--epochs",
                                "1", "--runs-dir", str(tmp_path / "runs"), "--no-progress"])[::2])
    assert needle in line and str(root) in line


def _folder_with_a_huge_image(root):
    rng = np.random.default_rng(0)
    for k in range(2):
        (root / f"c{k}").mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(
                root / f"c{k}" / f"{i}.png")
    (root / "c0" / "huge.png").write_bytes(_declared_png(12_000, 12_000))  # 144 megapixels
    return root / "c0" / "huge.png"


def test_a_144_megapixel_image_is_refused_from_its_header(cli, one_line_error, tmp_path):
    """Issue 12: 144-megapixel images were decoded in train and predict with only Pillow's
    warning. The header is checked before decoding: strict stops, otherwise it is skipped
    with the reason, and predict refuses it."""
    huge = _folder_with_a_huge_image(tmp_path / "data")
    before = _peak_mb()
    line = one_line_error(*_train(cli, tmp_path / "data", tmp_path, "--strict")[::2])
    assert f"image '{huge}' is 12000x12000 (144 megapixels), over the limit of 64" in line
    assert "CNNKIT_MAX_IMAGE_PIXELS=144000000" in line
    code, _, err = _train(cli, tmp_path / "data", tmp_path)
    assert code == 0, err
    assert "skipped 1 unreadable image(s) (1 over the 64-megapixel limit)" in err
    assert "huge.png" in err and "DecompressionBomb" not in err
    assert _peak_mb() - before < 300


def test_predict_refuses_a_huge_image(cli, one_line_error, tmp_path, shared_run):
    huge = tmp_path / "huge.png"
    huge.write_bytes(_declared_png(12_000, 12_000))
    line = one_line_error(*cli(["predict", str(shared_run.path), str(huge)])[::2])
    assert f"image '{huge}' is 12000x12000" in line and "megapixels" in line


def test_the_pixel_limit_can_be_raised(tmp_path, monkeypatch):
    huge = _folder_with_a_huge_image(tmp_path / "data")
    monkeypatch.setenv("CNNKIT_MAX_IMAGE_PIXELS", "1")
    with pytest.raises(ValueError, match="over the limit of 1e-06 megapixels"):
        load_data(str(tmp_path / "data"), strict=True)
    monkeypatch.setenv("CNNKIT_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(ValueError, match="CNNKIT_MAX_IMAGE_PIXELS must be a positive integer"):
        load_data(str(tmp_path / "data"), strict=True)
    assert huge.exists()


def test_memory_limits_parse_and_compare(monkeypatch):
    assert parse_bytes("4GB") == 4 * 10**9 and parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes("1000") == 1000
    with pytest.raises(ValueError, match="is not a size"):
        parse_bytes("a lot")
    monkeypatch.setenv("CNNKIT_MEMORY_LIMIT", "1MB")
    assert available_memory() == 10**6
    require_memory(10**6, "exactly the limit", "nothing")
    with pytest.raises(MemoryLimitError, match="x needs 1.0 MB of memory, more than the 1.0 MB "
                       "available; do y"):
        require_memory(10**6 + 1, "x", "do y")
    monkeypatch.delenv("CNNKIT_MEMORY_LIMIT")
    assert available_memory() > 10**8  # this machine's own
