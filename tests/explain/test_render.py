"""Pictures of explanations for signals, images and volumes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cnnkit.explain.render import (
    blend,
    montage,
    normalize_map,
    save_grid,
    save_overlay,
    scale_map,
    slice_indices,
    to_display,
)

INPUTS = {1: (2, 40), 2: (3, 12, 12), 3: (1, 11, 8, 8)}


def test_slice_indices_are_evenly_spaced_and_capped():
    assert slice_indices(11, 4) == [0, 3, 7, 10]
    assert slice_indices(3, 8) == [0, 1, 2]
    assert slice_indices(1) == [0]
    with pytest.raises(ValueError, match="slices must be a positive int"):
        slice_indices(5, 0)


def test_montage_places_each_slice_in_its_tile():
    vol = np.stack([np.full((2, 3), d, dtype=float) for d in range(5)])  # slice d holds d
    out = montage(vol, [0, 2, 4], cols=2, fill=-1.0)
    assert out.shape == (2 * 3 - 1, 2 * 4 - 1)
    assert (out[0:2, 0:3] == 0).all() and (out[0:2, 4:7] == 2).all()
    assert (out[3:5, 0:3] == 4).all()
    assert (out[2] == -1).all() and (out[:, 3] == -1).all() and (out[3:5, 4:7] == -1).all()
    rgb = montage(np.zeros((4, 2, 2, 3)), [0, 1, 2, 3])  # square by default, colours kept
    assert rgb.shape == (5, 5, 3) and np.isnan(rgb[2]).all()


def test_normalised_inputs_are_scaled_not_clipped():
    img = torch.tensor([[[-2.0, 0.0], [1.0, 2.0]]])
    assert to_display(img).tolist() == [[0.0, 0.5], [0.75, 1.0]]
    unit = torch.tensor([[[0.2, 0.4]]])
    assert np.allclose(to_display(unit), [[0.2, 0.4]])  # [0, 1] inputs unchanged
    assert to_display(torch.full((3, 2, 2), 255, dtype=torch.uint8)).shape == (2, 2, 3)
    vol = torch.rand(3, 4, 5, 6)
    assert to_display(vol).shape == (4, 5, 6, 3)
    m = torch.zeros(3, 4, 5)
    m[1, 2, 3] = 2.0
    assert normalize_map(m).max() == 1.0 and normalize_map(m)[1, 2, 3] == 1.0


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_overlay_and_grid_are_written_for_every_dimension(dims, tmp_path):
    torch.manual_seed(0)
    images = [torch.rand(INPUTS[dims]) for _ in range(2)]
    maps = {"a": torch.rand(2, *INPUTS[dims][1:]), "b": torch.randn(2, *INPUTS[dims][1:])}
    save_overlay(tmp_path / "one.png", images[0], maps["a"][0], "a: class 1")
    save_grid(tmp_path / "grid.png", images, maps, ["x0", "x1"])
    one, grid = Image.open(tmp_path / "one.png"), Image.open(tmp_path / "grid.png")
    assert one.size[0] > 200 and grid.size[0] > one.size[0] // 2 and grid.size[1] > 200
    with pytest.raises(ValueError, match="does not fit an input"):
        save_overlay(tmp_path / "bad.png", images[0], maps["a"][0][..., :-1], "bad")


def test_a_volume_overlay_shows_the_hot_slice(tmp_path):
    """The map is hot in one depth slice only: that slice's tile is coloured, the other
    tiles keep the input's grey (zero attribution is transparent)."""
    vol = torch.full((1, 4, 16, 16), 0.5)
    heat = torch.zeros(4, 16, 16)
    heat[2] = 1.0
    save_overlay(tmp_path / "v.png", vol, heat, "hot slice 2", alpha=0.9)
    pic = np.asarray(Image.open(tmp_path / "v.png").convert("RGB")).astype(int)
    grey = (np.abs(pic - 127).max(-1) <= 3)  # the input's 0.5, untouched
    hot = pic[..., 0] > pic[..., 2] + 50  # inferno's top (1.0) is pale yellow
    assert grey.sum() > 2.5 * hot.sum() > 0  # 3 cold tiles, 1 hot one (and the colour bar)


@pytest.mark.parametrize("signed", [False, True])
def test_zero_attribution_keeps_the_input_colour_exactly(signed):
    rng = np.random.default_rng(0)
    image = rng.random((6, 5, 3))
    heat = rng.random((6, 5)) * (2 if signed else 1) - (1 if signed else 0)
    heat[2, 3] = heat[0, 0] = 0.0
    out = blend(image, heat, alpha=0.8, signed=signed)
    assert out.shape == (6, 5, 3)
    assert np.array_equal(out[2, 3], image[2, 3]) and np.array_equal(out[0, 0], image[0, 0])
    assert np.array_equal(blend(image[..., 0], np.zeros((6, 5)))[..., 1], image[..., 0])
    # opacity grows with the attribution: the strongest element moves furthest
    moved = np.abs(out - image).sum(-1)
    strongest = np.unravel_index(np.abs(heat).argmax(), heat.shape)
    assert moved[strongest] > np.median(moved) > 0
    # no map anywhere (NaN: a gap between volume tiles) leaves the input as it is
    assert np.array_equal(blend(image, np.full((6, 5), np.nan)), image)


def test_maps_are_scaled_by_magnitude_and_sign():
    a, signed = scale_map(torch.tensor([[0.0, 2.0], [1.0, 4.0]]))
    assert not signed and a.tolist() == [[0.0, 0.5], [0.25, 1.0]]
    a, signed = scale_map(torch.tensor([-4.0, 0.0, 2.0]))
    assert signed and a.tolist() == [-1.0, 0.0, 0.5]
    for bad in (torch.zeros(3), torch.tensor([1.0, float("nan")])):
        a, signed = scale_map(bad)
        assert not signed and (a == 0).all()


def test_the_overlay_uses_a_perceptual_map_not_jet(tmp_path):
    """A uniform input under a map rising left to right: the right end is inferno's top
    (pale yellow), nothing is jet's saturated blue, and the left end is the input."""
    img = torch.full((3, 16, 64), 0.5)
    heat = torch.linspace(0, 1, 64).expand(16, 64)
    out = blend(to_display(img), scale_map(heat)[0], alpha=1.0)
    assert np.allclose(out[:, 0], 0.5)
    assert (out[:, -1, 0] > 0.9).all() and (out[:, -1, 2] < 0.75).all()
    assert not ((out[..., 2] > 0.5) & (out[..., 0] < 0.2) & (out[..., 1] < 0.2)).any()
