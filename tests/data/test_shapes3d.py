"""shapes3d: exact voxel rasterisation, uniform rotations, determinism, and the masks."""

import math

import numpy as np
import pytest
import torch

from cnnkit.data import load_data
from cnnkit.data.shapes3d import SOLIDS, rasterise_solid, rotation, shapes3d


def test_a_large_sphere_has_its_analytic_volume():
    r = 20.0
    voxels = rasterise_solid("sphere", (48, 48, 48), (24, 24, 24), r).sum()
    assert abs(voxels / (4 / 3 * math.pi * r**3) - 1) < 0.01


def test_an_axis_aligned_cube_is_exact_and_a_rotated_one_keeps_its_volume():
    side = 12  # circumradius side * sqrt(3) / 2
    cube = rasterise_solid("cube", (32, 32, 32), (16, 16, 16), side * math.sqrt(3) / 2)
    assert cube.sum() == side**3 and cube[10:22, 10:22, 10:22].all()
    turned = rasterise_solid("cube", (40, 40, 40), (20, 20, 20), 20 * math.sqrt(3) / 2,
                             rotation(np.random.default_rng(3)))
    assert abs(turned.sum() / 20**3 - 1) < 0.03


def test_a_torus_has_a_hole_and_an_octahedron_its_volume():
    torus = rasterise_solid("torus", (33, 33, 33), (16.5, 16.5, 16.5), 15.0)
    assert not torus[16, 16, 16]  # the centre is the hole
    assert torus[16, 16, int(16.5 + 15 * (1 - 0.35))]  # on the tube's centre line
    r = 18.0
    octa = rasterise_solid("octahedron", (40, 40, 40), (20, 20, 20), r).sum()
    assert abs(octa / (4 / 3 * r**3) - 1) < 0.03


def test_random_rotations_are_rotations_and_average_to_zero():
    rng = np.random.default_rng(0)
    rots = np.stack([rotation(rng) for _ in range(4000)])
    assert np.allclose(rots @ rots.transpose(0, 2, 1), np.eye(3), atol=1e-12)
    assert np.allclose(np.linalg.det(rots), 1.0)
    # Haar measure: E[R] = 0 (a biased sampler, e.g. Euler angles drawn uniformly, fails)
    assert np.abs(rots.mean(0)).max() < 0.03


def test_shapes3d_is_a_pure_function_of_its_seed():
    a, b, c = shapes3d(n=12, size=16, seed=1), shapes3d(n=12, size=16, seed=1), \
        shapes3d(n=12, size=16, seed=2)
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
    assert not torch.equal(a.images, c.images)


def test_masks_mark_the_labelled_solid_and_its_voxels_stand_out():
    d = shapes3d(n=16, size=16, noise=0.0)
    assert d.input_size == (1, 16, 16, 16) and d.masks.shape == (16, 16, 16, 16)
    assert d.mask_classes == ["background", "sphere", "cube", "torus", "octahedron"]
    assert torch.bincount(d.labels).tolist() == [4, 4, 4, 4]
    for vol, mask, label in zip(d.images[:, 0], d.masks, d.labels, strict=True):
        assert set(mask.unique().tolist()) == {0, int(label) + 1}
        inside = vol[mask > 0].float()
        # without noise a solid is one grey level, at least 50 levels (minus rounding and
        # the clip at 0 or 255) from the background level under it
        assert inside.max() - inside.min() <= 1
        outside = vol[mask == 0].float()
        assert (inside.mean() - outside.mean()).abs() > 20


def test_load_data_reads_shapes3d_for_both_tasks():
    for targets in ("labels", "masks"):
        d = load_data("shapes3d", targets=targets, n=8, size=8, image_size=12)
        assert d.input_size == (1, 12, 12, 12) and d.augment == "flips"


def test_bad_options_are_refused():
    for kw, why in (({"shapes": ["sphere"]}, "shapes="), ({"size": 4}, "too small"),
                    ({"noise": -1}, "noise=")):
        with pytest.raises(ValueError, match=why):
            shapes3d(n=4, **kw)
    assert set(SOLIDS) >= {"sphere", "cube", "torus", "octahedron", "cylinder"}


def test_radius_range_sets_the_solids_size():
    from cnnkit.data.shapes3d import shapes3d

    small = shapes3d(n=16, size=24, radius=(0.2, 0.2), shapes=("sphere", "cube"))
    big = shapes3d(n=16, size=24, radius=(0.4, 0.4), shapes=("sphere", "cube"))
    # a sphere of circumradius r has about 4/3 pi r^3 voxels: 8x the volume at 2x the radius
    ratio = (big.masks == 1).sum() / (small.masks == 1).sum()
    assert 6.5 < float(ratio) < 9.5
    with pytest.raises(ValueError, match="radius"):
        shapes3d(n=4, size=16, radius=(0.3, 0.6))
