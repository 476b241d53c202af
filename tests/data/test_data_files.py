"""User data from a folder, a csv or an npz, written to tmp_path in the tests."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from cnnkit.data import load_data


def _png(path, mode="RGB", size=(6, 4), colour=(200, 30, 60)):
    """Write a solid image of ``size`` (w, h) and ``mode``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "P":
        im = Image.new("RGB", size, colour).convert("P", palette=Image.Palette.ADAPTIVE)
    else:
        im = Image.new(mode, size, colour)
    im.save(path)
    return path


def _corrupt(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes())
    return path


@pytest.fixture
def mixed_folder(tmp_path):
    root = tmp_path / "pets"
    _png(root / "dog" / "a.png", "RGB", colour=(200, 30, 60))
    _png(root / "dog" / "deep" / "b.png", "L", colour=90)  # recursive within a class
    _png(root / "cat" / "c.png", "P", colour=(10, 220, 40))
    rgba = Image.new("RGBA", (6, 4), (0, 0, 255, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent -> white
    rgba.save(root / "cat" / "d.png")
    (root / "cat" / "notes.txt").write_text("not an image, not counted")
    (root / "empty").mkdir()
    return root


def test_folder_classes_labels_modes(mixed_folder):
    with pytest.warns(UserWarning, match="ignored 1 class folder"):
        d = load_data(str(mixed_folder))
    assert d.classes == ["cat", "dog"] and d.name == str(mixed_folder)
    assert d.images.shape == (4, 3, 4, 6) and d.images.dtype == torch.uint8  # colour -> RGB
    assert d.input_size == (3, 4, 6) and d.skipped == 0 and d.augment == "flip_crop"
    names = [os.path.relpath(s, mixed_folder) for s in d.sources]
    assert names == ["cat/c.png", "cat/d.png", "dog/a.png", "dog/deep/b.png"]
    assert d.labels.tolist() == [0, 0, 1, 1]
    px = {n: d.images[i, :, 1, 1].tolist() for i, n in enumerate(names)}
    assert px["cat/c.png"] == [10, 220, 40]  # palette converted
    assert px["cat/d.png"] == [0, 0, 255]
    assert d.images[1, :, 0, 0].tolist() == [255, 255, 255]  # alpha composited on white
    assert px["dog/a.png"] == [200, 30, 60]
    assert px["dog/deep/b.png"] == [90, 90, 90]  # L replicated


def test_folder_gray_stays_gray_and_channels_forced(tmp_path):
    root = tmp_path / "g"
    _png(root / "a" / "1.png", "L", colour=10)
    _png(root / "b" / "2.png", "RGB", colour=(77, 77, 77))  # RGB without colour is gray
    d = load_data(str(root))
    assert d.images.shape == (2, 1, 4, 6) and d.images[:, 0, 0, 0].tolist() == [10, 77]
    assert load_data(str(root), channels=3).images.shape == (2, 3, 4, 6)
    _png(root / "b" / "3.png", "RGB", colour=(255, 0, 0))
    gray = load_data(str(root), channels=1).images
    assert gray.shape == (3, 1, 4, 6) and gray[2, 0, 0, 0].item() == 76  # 0.299 * 255


def test_folder_image_size(tmp_path):
    root = tmp_path / "s"
    for i in range(3):
        _png(root / "a" / f"{i}.png", size=(10, 12))  # (w, h): most common size
    _png(root / "b" / "big.png", size=(30, 20), colour=(1, 2, 3))
    d = load_data(str(root))
    assert d.images.shape == (4, 3, 12, 10)
    assert d.images[3, :, 5, 5].tolist() == [1, 2, 3]  # resized solid colour stays solid
    assert load_data(str(root), image_size=8).images.shape == (4, 3, 8, 8)
    assert load_data(str(root), image_size=(6, 9)).images.shape == (4, 3, 6, 9)
    photos = tmp_path / "photos"
    _png(photos / "a" / "x.jpg", size=(120, 90))
    _png(photos / "b" / "y.jpg", size=(90, 120))
    assert load_data(str(photos)).images.shape == (2, 3, 64, 64)  # large -> 64x64


def test_folder_corrupt_skipped_or_strict(tmp_path):
    root = tmp_path / "c"
    _png(root / "a" / "ok.png")
    _png(root / "b" / "ok.png")
    bad = _corrupt(root / "b" / "broken.png")
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image\(s\) of 3.*broken\.png"):
        d = load_data(str(root))
    assert d.skipped == 1 and len(d) == 2 and str(bad) not in d.sources
    assert d.labels.tolist() == [0, 1]
    with pytest.raises(ValueError, match=r"cannot read image '.*broken\.png'.*strict=False"):
        load_data(str(root), strict=True)


def test_folder_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="contains no images; put each class's images"):
        load_data(str(empty))
    one = tmp_path / "one"
    _png(one / "only" / "x.png")
    with pytest.raises(ValueError, match="needs at least two class subfolders"):
        load_data(str(one))
    loose = tmp_path / "loose"
    _png(loose / "x.png")
    with pytest.raises(ValueError, match="1 images but no class subfolders"):
        load_data(str(loose))
    with pytest.raises(ValueError, match=r"no option foo; its options: num_workers, progress"):
        load_data(str(one), foo=1)
    other = tmp_path / "data.txt"
    other.write_text("x")
    with pytest.raises(ValueError, match=r"cannot read data from .*give a folder"):
        load_data(str(other))


def test_csv_with_and_without_header(tmp_path):
    _png(tmp_path / "img" / "a.png", colour=(1, 1, 200))
    _png(tmp_path / "img" / "b.png", colour=(2, 2, 200))
    absolute = _png(tmp_path / "elsewhere" / "c.png", colour=(3, 3, 200))
    sub = tmp_path / "lists"
    sub.mkdir()
    _png(sub / "d.png", colour=(4, 4, 200))
    rows = f"../img/a.png,zebra\n../img/b.png,ant\n\n{absolute},zebra\nd.png,ant\n"
    (sub / "plain.csv").write_text(rows)
    (sub / "header.csv").write_text("label,file\n" + "\n".join(
        ",".join(reversed(r.split(","))) for r in rows.split("\n") if r) + "\n")
    for f in ("plain.csv", "header.csv"):
        d = load_data(str(sub / f))
        assert d.classes == ["ant", "zebra"] and d.labels.tolist() == [1, 0, 1, 0]
        assert d.images[:, 0, 0, 0].tolist() == [1, 2, 3, 4]
        assert d.sources[2] == str(absolute)


def test_csv_header_naming_only_the_path_takes_the_first_other_column(tmp_path):
    """A header naming the path column (third here) and no label column: the labels are the
    first column that is not the path, not a column counted from the end."""
    for i in range(2):
        _png(tmp_path / f"{i}.png")
    (tmp_path / "l.csv").write_text("kind,notes,image\ncat,x,0.png\ndog,y,1.png\n")
    d = load_data(str(tmp_path / "l.csv"))
    assert d.classes == ["cat", "dog"] and d.labels.tolist() == [0, 1]


def test_csv_integer_labels_numeric_order(tmp_path):
    for i in range(3):
        _png(tmp_path / f"{i}.png")
    (tmp_path / "l.csv").write_text("0.png,10\n1.png,2\n2.png,10\n")
    d = load_data(str(tmp_path / "l.csv"))
    assert d.classes == ["2", "10"] and d.labels.tolist() == [1, 0, 1]


def test_csv_errors_name_the_line(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "missing.csv").write_text("path,label\na.png,x\nnope.png,y\n")
    with pytest.raises(ValueError, match=r"line 3: image 'nope.png' not found"):
        load_data(str(tmp_path / "missing.csv"))
    (tmp_path / "bad.csv").write_text("a.png,x\na.png\n")
    with pytest.raises(ValueError, match=r"line 2: expected 'path,label'"):
        load_data(str(tmp_path / "bad.csv"))
    (tmp_path / "one.csv").write_text("a.png,x\na.png,x\n")
    with pytest.raises(ValueError, match="one class"):
        load_data(str(tmp_path / "one.csv"))


def test_npz_layouts_and_dtypes(tmp_path):
    rng = np.random.default_rng(0)
    nhwc = rng.integers(0, 256, (5, 6, 7, 3), dtype=np.uint8)
    y = np.array([0, 1, 2, 1, 0])
    np.savez(tmp_path / "nhwc.npz", x=nhwc, y=y, classes=np.array(["a", "b", "c"]))
    d = load_data(str(tmp_path / "nhwc.npz"))
    assert d.images.shape == (5, 3, 6, 7) and d.classes == ["a", "b", "c"]
    assert torch.equal(d.images, torch.from_numpy(nhwc).permute(0, 3, 1, 2))
    assert d.labels.tolist() == y.tolist() and d.augment == "flip_crop"

    np.savez(tmp_path / "nchw.npz", images=nhwc.transpose(0, 3, 1, 2).astype(np.int64), labels=y)
    d = load_data(str(tmp_path / "nchw.npz"))
    assert d.images.dtype == torch.uint8 and d.classes == ["0", "1", "2"]
    assert torch.equal(d.images, torch.from_numpy(nhwc).permute(0, 3, 1, 2))

    gray = rng.random((5, 6, 7)).astype(np.float32)
    np.savez(tmp_path / "gray.npz", x=gray, y=np.array(["cat", "dog", "cat", "cat", "dog"]))
    d = load_data(str(tmp_path / "gray.npz"), image_size=4, channels=3)
    assert d.images.dtype == torch.float32 and d.images.shape == (5, 3, 4, 4)
    assert d.classes == ["cat", "dog"] and d.labels.tolist() == [0, 1, 0, 0, 1]
    assert 0 <= d.images.min() and d.images.max() <= 1


def test_npz_errors(tmp_path):
    x = np.zeros((4, 5, 5), np.uint8)
    np.savez(tmp_path / "keys.npz", data=x, target=np.arange(4))
    with pytest.raises(ValueError, match=r"arrays \['data', 'target'\]; expected images as 'x'"):
        load_data(str(tmp_path / "keys.npz"))
    np.savez(tmp_path / "len.npz", x=x, y=np.arange(3))
    with pytest.raises(ValueError, match="4 images but 3 labels"):
        load_data(str(tmp_path / "len.npz"))
    np.savez(tmp_path / "range.npz", x=x.astype(np.float32) + 3, y=np.arange(4))
    with pytest.raises(ValueError, match=r"float images span 3\.\.3; scale them to \[0, 1\]"):
        load_data(str(tmp_path / "range.npz"))
    np.savez(tmp_path / "int.npz", x=x.astype(np.int32) + 300, y=np.arange(4))
    with pytest.raises(ValueError, match="integer images span 300..300"):
        load_data(str(tmp_path / "int.npz"))
    np.savez(tmp_path / "cls.npz", x=x, y=np.arange(4), classes=np.array(["a", "b"]))
    with pytest.raises(ValueError, match="label 3 but only 2 classes"):
        load_data(str(tmp_path / "cls.npz"))
