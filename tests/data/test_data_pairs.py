"""Dense-prediction data: image/mask folder pairs, image folders, masks through the loader."""

import numpy as np
import pytest
import torch
from PIL import Image

from cnnkit.data import TensorLoader, load_data
from cnnkit.data._types import downscale, resize_masks


def _pair(root, stem, mask, colour=(200, 30, 60), palette=False, suffix=".jpg"):
    """An image of ``mask``'s size whose red channel encodes the mask, and the mask PNG."""
    mask = np.asarray(mask, dtype=np.uint8)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    img = np.zeros((*mask.shape, 3), np.uint8)
    img[..., 0] = np.where(mask == 255, 0, mask * 40)
    img[..., 1:] = colour[1:]
    Image.fromarray(img).save(root / "images" / f"{stem}{suffix}", quality=100)
    m = Image.fromarray(mask, mode="L")
    if palette:
        m = m.convert("P")
        m.putpalette([v for k in range(256) for v in (k, 255 - k, (7 * k) % 256)])
    m.save(root / "masks" / f"{stem}.png")


def _mask(h, w, k, box):
    m = np.zeros((h, w), np.uint8)
    y0, y1, x0, x1 = box
    m[y0:y1, x0:x1] = k
    return m


def test_pairs_matched_by_stem_with_palette_and_classes(tmp_path):
    root = tmp_path / "seg"
    _pair(root, "a", _mask(16, 16, 1, (2, 8, 2, 8)), suffix=".png")
    _pair(root, "b", _mask(16, 16, 2, (4, 12, 4, 12)), palette=True, suffix=".png")
    m = _mask(16, 16, 1, (0, 4, 0, 4))
    m[10:, 10:] = 255  # unlabelled
    _pair(root, "c", m, suffix=".png")
    (root / "classes.txt").write_text("background\ncat\ndog\n")
    d = load_data(str(root), targets="masks")
    assert d.mask_classes == ["background", "cat", "dog"] and d.classes == d.mask_classes
    assert d.masks.shape == (3, 16, 16) and d.masks.dtype == torch.uint8
    assert d.masks[1].unique().tolist() == [0, 2]  # the palette's indices, not its colours
    assert int(d.masks[2, 12, 12]) == 255
    assert d.labels.tolist() == [1, 2, 1]  # each mask's dominant foreground class
    # The red channel encodes the mask: image and mask are paired pixel for pixel.
    lab = d.masks != 255
    assert torch.equal(d.images[:, 0][lab], d.masks[lab] * 40)


def test_pairs_resized_together_nearest(tmp_path):
    root = tmp_path / "seg"
    for i in range(3):
        _pair(root, f"s{i}", _mask(40, 60, i % 2 + 1, (5, 30, 10, 50)), suffix=".png")
    d = load_data(str(root), targets="masks", image_size=20)
    assert d.images.shape == (3, 3, 20, 20) and d.masks.shape == (3, 20, 20)
    assert set(d.masks.unique().tolist()) <= {0, 1, 2}  # nearest: no invented classes
    ref = resize_masks(torch.from_numpy(_mask(40, 60, 1, (5, 30, 10, 50)))[None], 20)[0]
    agree = (d.masks[0] == ref).float().mean()
    assert agree > 0.97  # Pillow's fit and our cover-crop agree up to boundary rounding


@pytest.mark.parametrize("case, match", [
    ("lonely", "has no partner in masks/"),
    ("size", "a mask must have its image's size"),
    ("rgb", "save masks as 8-bit grayscale"),
    ("classes", "classes.txt names only 2"),
    ("nosub", "has no images/ and masks/ subfolders"),
])
def test_pair_errors(tmp_path, case, match):
    root = tmp_path / "seg"
    _pair(root, "a", _mask(8, 8, 1, (0, 4, 0, 4)), suffix=".png")
    if case == "lonely":
        Image.new("RGB", (8, 8)).save(root / "images" / "b.png")
    elif case == "size":
        Image.new("L", (9, 8)).save(root / "masks" / "a.png")
    elif case == "rgb":
        Image.new("RGB", (8, 8)).save(root / "masks" / "a.png")
    elif case == "classes":
        _pair(root, "b", _mask(8, 8, 2, (0, 4, 0, 4)), suffix=".png")
        (root / "classes.txt").write_text("bg\nthing\n")
    elif case == "nosub":
        root = tmp_path / "flat"
        root.mkdir()
    with pytest.raises(ValueError, match=match):
        load_data(str(root), targets="masks")


def test_builtin_without_masks_refused_for_segment():
    with pytest.raises(ValueError, match="has no masks"):
        load_data("digits", targets="masks")


def test_superres_folder_reads_all_images(tmp_path):
    for i, sub in enumerate(["", "x", "x/y"]):
        (tmp_path / "pics" / sub).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (24, 24), (i * 50, 10, 10)).save(tmp_path / "pics" / sub / f"{i}.png")
    d = load_data(str(tmp_path / "pics"), targets="images")
    assert d.images.shape == (3, 3, 24, 24) and d.classes == ["image"]


def test_loader_moves_mask_with_image():
    # The image's single channel equals mask * 10, so after any joint augmentation the
    # relation must still hold pixel for pixel (flips and shifts moved both alike).
    g = torch.Generator().manual_seed(0)
    masks = torch.randint(0, 5, (16, 12, 12), generator=g, dtype=torch.uint8)
    images = (masks * 10)[:, None]
    for policy in ("flip_crop", "shapes"):
        loader = TensorLoader(images, masks, 8, shuffle=True, augment=policy, seed=3)
        moved = 0
        for x, y in loader:
            assert y.dtype == torch.long and y.shape == (len(x), 12, 12)
            assert torch.allclose(x[:, 0] * 255, y.float() * 10, atol=1e-3)
            moved += int((y != masks[:len(y)].long()).any())
        assert moved  # the augmentation did move something


def test_loader_refuses_interpolating_policy_with_masks():
    with pytest.raises(ValueError, match="would blend mask classes"):
        TensorLoader(torch.zeros(2, 1, 8, 8), torch.zeros(2, 8, 8), 2, augment="affine")


def test_loader_superres_pairs():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (5, 3, 12, 12), generator=g, dtype=torch.uint8)
    x, y = next(iter(TensorLoader(images, torch.zeros(5), 5, scale=3)))
    assert x.shape == (5, 3, 4, 4) and y.shape == (5, 3, 12, 12)
    assert torch.allclose(y, images.float() / 255)
    assert torch.allclose(x, downscale(images.float() / 255, 3))


def test_downscale_constant_image_and_size_check():
    # Bicubic weights sum to one, so a constant image stays that constant.
    assert torch.allclose(downscale(torch.full((1, 1, 9, 9), 0.3), 3), torch.tensor(0.3))
    with pytest.raises(ValueError, match="not a multiple of scale 3"):
        downscale(torch.zeros(1, 1, 10, 9), 3)
