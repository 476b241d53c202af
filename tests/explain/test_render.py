"""Pictures of explanations for signals, images and volumes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cnnkit.explain.render import (
    montage,
    normalize_map,
    save_grid,
    save_overlay,
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
    """The map is hot in one depth slice only: the picture's colours differ between the
    tiles of the hot slice and of the others."""
    vol = torch.full((1, 4, 16, 16), 0.5)
    heat = torch.zeros(4, 16, 16)
    heat[2] = 1.0
    save_overlay(tmp_path / "v.png", vol, heat, "hot slice 2", alpha=0.9)
    pic = np.asarray(Image.open(tmp_path / "v.png").convert("RGB")).astype(int)
    red = pic[..., 0] > pic[..., 2] + 50  # jet's top (1.0) is dark red
    blue = pic[..., 2] > pic[..., 0] + 50  # jet's bottom (0.0) is dark blue
    assert blue.sum() > 2.5 * red.sum() > 0  # 3 cold tiles, 1 hot one (and the colour bar)
