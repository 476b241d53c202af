"""Built-in data sets (digits, shapes) and the data set registry."""

import math

import numpy as np
import pytest
import torch

from cnnkit.data import ImageData, dataset_info, list_datasets, load_data, register_dataset
from cnnkit.data.shapes import SHAPE_KINDS, rasterise


def _shoelace(p: np.ndarray) -> float:
    x, y = p[:, 0], p[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


# ---------------------------------------------------------------- registry and errors
def test_registry_lists_and_describes():
    assert list_datasets() == ["digits", "shapes", "shapes3d"]
    for name in list_datasets():
        info = dataset_info(name)
        assert info and "\n" not in info


def test_register_twice_raises():
    def digits(**kwargs):  # same name as the built-in
        raise AssertionError("never called")

    with pytest.raises(ValueError, match="registered twice"):
        register_dataset(digits)
    assert list_datasets() == ["digits", "shapes", "shapes3d"]


def test_unknown_name_suggests_nearest():
    with pytest.raises(ValueError, match=r"unknown data set 'digts'.*did you mean: digits.*"
                                         r"digits, shapes"):
        load_data("digts")


def test_missing_path_message(tmp_path):
    missing = str(tmp_path / "nope")
    msg = (f"data path '{missing}' does not exist; give a built-in data set (digits, shapes, "
           "shapes3d) or a folder/.csv/.npz path")
    with pytest.raises(FileNotFoundError) as err:
        load_data(missing)
    assert str(err.value) == msg
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_data("train.csv")  # a suffix means a path, not a misspelt name


def test_unknown_option_lists_options():
    with pytest.raises(ValueError, match=r"no option colour.*n, size, shapes, count"):
        load_data("shapes", colour=True)
    with pytest.raises(ValueError, match="channels=2"):
        load_data("digits", channels=2)


def test_image_data_checks_and_subset():
    x = torch.zeros(4, 1, 5, 6, dtype=torch.uint8)
    with pytest.raises(ValueError, match="4 samples but labels of shape"):
        ImageData(x, torch.tensor([0, 1, 0]), ["a", "b"], "toy")
    d = ImageData(x, [0, 1, 0, 1], ["a", "b"], "toy", masks=torch.zeros(4, 5, 6),
                  sources=["p0", "p1", "p2", "p3"])
    assert d.labels.dtype == torch.int64 and d.input_size == (1, 5, 6)
    s = d.subset(torch.tensor([3, 0]))
    assert len(s) == 2 and s.sources == ["p3", "p0"] and s.masks.shape == (2, 5, 6)
    assert s.labels.tolist() == [1, 0] and s.classes == ["a", "b"]


# ---------------------------------------------------------------- digits
def test_digits_matches_sklearn():
    from sklearn.datasets import load_digits

    ref = load_digits()
    d = load_data("digits")
    assert d.images.dtype == torch.uint8 and d.images.shape == (1797, 1, 8, 8)
    assert d.input_size == (1, 8, 8) and d.num_classes == 10 and len(d) == 1797
    assert d.classes == [str(i) for i in range(10)]
    assert d.augment == "digits" and d.masks is None and d.sources is None and d.name == "digits"
    expected = np.rint(ref.images * 255 / 16).astype(np.uint8)
    assert np.array_equal(d.images[:, 0].numpy(), expected)
    assert int(d.images.max()) == 255 and int(d.images.min()) == 0
    assert np.array_equal(d.labels.numpy(), ref.target) and d.labels.dtype == torch.int64


def test_digits_resize_and_channels():
    d = load_data("digits", image_size=16, channels=3)
    assert d.images.shape == (1797, 3, 16, 16) and d.images.dtype == torch.uint8
    assert torch.equal(d.images[:, 0], d.images[:, 2])
    # Bilinear upsampling keeps the image's mean brightness to within rounding.
    small = load_data("digits").images.float().mean((1, 2, 3))
    assert torch.allclose(d.images.float().mean((1, 2, 3)), small, atol=6)


# ---------------------------------------------------------------- shapes
def test_shapes_deterministic_by_seed():
    a = load_data("shapes", n=24, size=32, seed=1)
    b = load_data("shapes", n=24, size=32, seed=1)
    c = load_data("shapes", n=24, size=32, seed=2)
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
    assert torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)


def test_shapes_layout_and_balance():
    d = load_data("shapes", n=40, size=24)
    assert d.images.shape == (40, 3, 24, 24) and d.images.dtype == torch.uint8
    assert d.masks.shape == (40, 24, 24) and d.masks.dtype == torch.uint8
    assert d.classes == ["circle", "square", "triangle", "star"] and d.augment == "shapes"
    assert torch.bincount(d.labels).tolist() == [10, 10, 10, 10]
    d = load_data("shapes", n=6, size=64, image_size=(20, 28), shapes=("cross", "hexagon"))
    assert d.images.shape == (6, 3, 20, 28) and d.classes == ["cross", "hexagon"]


@pytest.mark.parametrize("background", ["mixed", "noise", "stripes", "checker", "plain"])
@pytest.mark.parametrize("channels", [3, 1])
def test_shapes_mask_is_exactly_the_shape_colour(background, channels):
    d = load_data("shapes", n=24, size=32, background=background, channels=channels, seed=3)
    for img, mask, label in zip(d.images, d.masks, d.labels, strict=True):
        on = mask > 0
        assert set(mask.unique().tolist()) == {0, int(label) + 1}  # label and mask agree
        colour = img[:, on][:, :1]  # [C, 1]: the shape's colour
        assert torch.equal(img[:, on], colour.expand(-1, int(on.sum())))
        same = (img == colour[:, :, None]).all(0)  # every pixel with the shape's colour ...
        assert torch.equal(same, on)  # ... is a mask pixel, and no other


def test_shapes_count_many_same_class():
    d = load_data("shapes", n=12, size=48, count=3, seed=0)
    for mask, label in zip(d.masks, d.labels, strict=True):
        assert set(mask.unique().tolist()) == {0, int(label) + 1}


def test_square_area_within_a_pixel_row():
    side = 20.0
    for angle, center in [(0.0, (32.0, 32.0)), (0.0, (31.3, 30.8)), (0.7, (30.2, 33.9))]:
        area = int(rasterise("square", 64, 64, center, side / math.sqrt(2), angle).sum())
        assert abs(area - side * side) <= side
    assert int(rasterise("square", 64, 64, (32.0, 32.0), side / math.sqrt(2)).sum()) == 400


@pytest.mark.parametrize("kind", list(SHAPE_KINDS))
def test_shape_area_analytic(kind):
    rng = np.random.default_rng(0)
    unit = SHAPE_KINDS[kind]
    for r in (5.0, 9.5, 17.3):
        cx, cy = rng.uniform(24, 40, 2)
        area = int(rasterise(kind, 64, 64, (cx, cy), r, float(rng.uniform(0, 6.3))).sum())
        ref = math.pi * r * r if unit is None else _shoelace(unit) * r * r
        assert abs(area - ref) <= 1.5 * r  # the boundary costs at most ~one pixel per unit length


def test_shapes_bad_options():
    with pytest.raises(ValueError, match="choose from|at least two"):
        load_data("shapes", n=4, shapes=("circle", "blob"))
    with pytest.raises(ValueError, match="unknown background"):
        load_data("shapes", n=4, background="marble")
