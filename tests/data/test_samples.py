"""The data container for any number of spatial axes: ``[N, C, *spatial]`` samples."""

import pytest
import torch
import torch.nn.functional as F

from cnnkit.data import ImageData, Samples, convert_channels, resize_images, resize_masks


@pytest.mark.parametrize("spatial", [(), (12,), (5, 6), (3, 4, 5)])
def test_samples_of_any_shape_keep_their_size_and_subset(spatial):
    n = 4
    x = torch.arange(n * 2 * int(torch.tensor(spatial).prod()), dtype=torch.float32)
    x = (x / x.max()).reshape(n, 2, *spatial)
    masks = None if not spatial else torch.randint(0, 3, (n, *spatial), dtype=torch.uint8)
    d = Samples(x, [0] * n, ["y"], "toy", masks=masks, values=torch.arange(n, dtype=torch.float32))
    assert d.input_size == (2, *spatial) and d.spatial_dims == len(spatial)
    s = d.subset([3, 1])
    assert torch.equal(s.inputs, x[[3, 1]]) and s.values.tolist() == [[3.0], [1.0]]
    if masks is not None:
        assert torch.equal(s.masks, masks[[3, 1]])
    assert s.images is s.inputs  # the 2D name reads the same tensor


def test_the_2d_name_is_the_same_container():
    assert ImageData is Samples
    d = ImageData(torch.zeros(2, 1, 4, 4), [0, 1], ["a", "b"], "toy")
    d.images = torch.ones(2, 1, 4, 4)
    assert d.inputs.sum() == 32


@pytest.mark.parametrize("shape", [(4,), (4, 1, 2, 2, 2, 2)])
def test_inputs_of_no_or_too_many_axes_are_refused(shape):
    with pytest.raises(ValueError, match="inputs must be"):
        Samples(torch.zeros(shape), torch.zeros(4), ["a"], "toy")


def test_masks_must_match_every_spatial_axis():
    with pytest.raises(ValueError, match=r"masks are \[N, \*spatial\]"):
        Samples(torch.zeros(2, 1, 4, 4, 4), [0, 1], ["a", "b"], "vol",
                masks=torch.zeros(2, 4, 4, dtype=torch.uint8))


def test_lengths_of_variable_length_series():
    x = torch.zeros(3, 1, 10)
    d = Samples(x, [0, 1, 0], ["a", "b"], "series", lengths=[10, 4, 1])
    assert d.subset([1]).lengths.tolist() == [4]
    for bad in ([10, 11, 1], [0, 2, 3], [1, 2]):
        with pytest.raises(ValueError, match="lengths must be"):
            Samples(x, [0, 1, 0], ["a", "b"], "series", lengths=bad)
    with pytest.raises(ValueError, match="lengths need a spatial axis"):
        Samples(torch.zeros(3, 4), [0, 1, 0], ["a", "b"], "feat", lengths=[1, 1, 1])


def test_resizing_a_volume_covers_then_crops_the_centre():
    # A 2x upscale of a volume is trilinear; its centre crop equals the same crop of the
    # full trilinear resize, on every axis.
    v = torch.rand(2, 1, 4, 6, 8)
    out = resize_images(v, (8, 12, 14))
    full = F.interpolate(v, size=(8, 12, 16), mode="trilinear", align_corners=False)
    assert out.shape == (2, 1, 8, 12, 14) and torch.allclose(out, full[..., 1:15].clamp(0, 1))
    # Shrinking averages whole cells (area): a 2x2x2 block mean, so no aliasing.
    small = resize_images(v, (2, 3, 4))
    assert torch.allclose(small, F.avg_pool3d(v, 2))


def test_resizing_a_series_and_its_masks_share_the_geometry():
    x = torch.arange(8, dtype=torch.uint8).view(1, 1, 8).repeat(2, 3, 1)
    m = torch.arange(8, dtype=torch.uint8).view(1, 8).repeat(2, 1)
    up_x, up_m = resize_images(x, 16), resize_masks(m, 16)
    assert up_x.shape == (2, 3, 16) and up_m.shape == (2, 16)
    # nearest-exact on masks: each value repeated twice, never an invented one
    assert up_m[0].tolist() == [v for v in range(8) for _ in range(2)]


def test_resizing_images_is_unchanged_in_2d():
    x = torch.randint(0, 256, (3, 3, 20, 30), dtype=torch.uint8)
    ref = F.interpolate(x.float(), size=(16, 24), mode="bilinear", align_corners=False,
                        antialias=True).round().clamp(0, 255).to(torch.uint8)
    assert torch.equal(resize_images(x, (16, 24)), ref)
    m = torch.randint(0, 4, (3, 20, 30), dtype=torch.uint8)
    assert resize_masks(m, 10).shape == (3, 10, 10)


def test_gray_to_rgb_and_back_on_volumes():
    v = torch.randint(0, 256, (2, 1, 3, 4, 5), dtype=torch.uint8)
    rgb = convert_channels(v, 3)
    assert rgb.shape == (2, 3, 3, 4, 5) and torch.equal(convert_channels(rgb, 1), v)
