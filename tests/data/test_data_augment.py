"""Batched augmentation: identities, exact geometric checks, determinism by generator."""

import pytest
import torch
import torch.nn.functional as F

from cnnkit.data import Augment, list_augment
from cnnkit.data.augment import (
    affine_transform,
    hflip,
    pad_crop,
    random_affine,
    random_zoom,
    register_augment,
    vflip,
)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _batch(b=6, c=3, h=12, w=10, seed=0):
    return torch.rand(b, c, h, w, generator=_gen(seed))


def _shifted(x, sy, sx):
    """``out[i, j] = x[i + sy, j + sx]`` inside the image, 0 outside (independent of pad_crop)."""
    h, w = x.shape[-2:]
    out = torch.roll(x, shifts=(-sy, -sx), dims=(-2, -1))
    rows = (torch.arange(h) + sy >= 0) & (torch.arange(h) + sy < h)
    cols = (torch.arange(w) + sx >= 0) & (torch.arange(w) + sx < w)
    return out * (rows[:, None] & cols[None, :])


def test_list_and_errors():
    assert list_augment() == ["affine", "digits", "flip_crop", "flips", "none", "shapes", "zoom"]
    with pytest.raises(ValueError, match="unknown augmentation 'jitter'; choose from affine"):
        Augment("jitter")
    with pytest.raises(ValueError, match="float"):
        Augment("none")(torch.zeros(2, 1, 4, 4, dtype=torch.uint8))

    def none(x, generator):
        return x

    with pytest.raises(ValueError, match="registered twice"):
        register_augment(none)


def test_none_is_identity():
    x = _batch()
    assert torch.equal(Augment("none", _gen(0))(x), x)


def test_flips_are_involutions():
    x = _batch()
    assert torch.equal(hflip(x, 1.0), x.flip(-1))
    assert torch.equal(hflip(hflip(x, 1.0), 1.0), x)
    assert torch.equal(vflip(x, 1.0), x.flip(-2))
    assert torch.equal(vflip(vflip(x, 1.0), 1.0), x)
    assert torch.equal(hflip(x, 0.0), x) and torch.equal(vflip(x, 0.0), x)
    # p = 0.5: every image is either itself or its mirror image.
    y = hflip(x, 0.5, _gen(1))
    assert all(torch.equal(a, b) or torch.equal(a, b.flip(-1)) for a, b in zip(y, x, strict=True))


def test_pad_crop_zeros_is_a_shifted_copy():
    x = _batch(b=16) + 0.1  # no zeros in the input, so the fill is recognisable
    y = pad_crop(x, 4, "zeros", _gen(2))
    assert y.shape == x.shape
    shifts = set()
    for a, b in zip(y, x, strict=True):
        match = [(sy, sx) for sy in range(-4, 5) for sx in range(-4, 5)
                 if torch.equal(a, _shifted(b, sy, sx))]
        assert len(match) == 1
        shifts.add(match[0])
    assert len(shifts) > 1  # random offsets, not one fixed shift


def test_pad_crop_reflect_interior_matches():
    x = _batch(b=8)
    y = pad_crop(x, 3, "reflect", _gen(3))
    for a, b in zip(y, x, strict=True):
        # Reflection fills the border with image values: only the overlap is checked.
        assert any(torch.equal(a[:, 3:-3, 3:-3], _shifted(b, sy, sx)[:, 3:-3, 3:-3])
                   for sy in range(-3, 4) for sx in range(-3, 4))
        assert set(a.unique().tolist()) <= set(b.unique().tolist())


def test_affine_transform_exact_cases():
    x = _batch(b=2, c=1, h=7, w=7)
    ones, zeros = torch.ones(2), torch.zeros(2)
    assert torch.allclose(affine_transform(x, zeros, ones, zeros, zeros), x, atol=1e-6)
    # 90 degrees on a square image is a clockwise rot90.
    assert torch.allclose(affine_transform(x, 90 * ones, ones, zeros, zeros),
                          torch.rot90(x, -1, (-2, -1)), atol=1e-5)
    # Integer shifts move pixels exactly: right by 2, up by 1.
    assert torch.allclose(affine_transform(x, zeros, ones, 2 * ones, -ones),
                          _shifted(x, 1, -2), atol=1e-6)
    # Non-square image: a dot above the centre goes to the right of it.
    dot = torch.zeros(1, 1, 5, 9)
    dot[0, 0, 0, 4] = 1
    out = affine_transform(dot, torch.tensor([90.0]), torch.ones(1), torch.zeros(1), torch.zeros(1))
    assert out[0, 0].argmax().item() == 2 * 9 + 6 and out.max().item() == pytest.approx(1, abs=1e-5)


def test_random_affine_zero_range_is_identity():
    x = _batch()
    assert torch.allclose(random_affine(x, 0.0, (1.0, 1.0), 0.0, generator=_gen(0)), x, atol=1e-6)


@pytest.mark.parametrize("policy", ["flip_crop", "digits", "shapes", "affine"])
def test_policy_is_pure_function_of_generator(policy):
    x = _batch(b=8, c=1, h=8, w=8)
    a = Augment(policy, _gen(7))(x)
    b = Augment(policy, _gen(7))(x)
    c = Augment(policy, _gen(8))(x)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and a.dtype == x.dtype and torch.isfinite(a).all()
    assert not torch.equal(a, x)


# ---------------------------------------------------------------- any spatial dims
def _shift_reference(x, starts, pad, mode):
    """pad_crop by a loop over samples: sample b is the padded sample's window at starts[b]."""
    sizes = x.shape[2:]
    xp = F.pad(x, (pad, pad) * len(sizes), mode="reflect" if mode == "reflect" else "constant")
    out = torch.empty_like(x)
    for b in range(len(x)):
        window = tuple(slice(int(s[b]), int(s[b]) + n) for s, n in zip(starts, sizes, strict=True))
        out[b] = xp[(b, slice(None), *window)]
    return out


@pytest.mark.parametrize("spatial", [(9,), (6, 7), (4, 5, 6)])
@pytest.mark.parametrize("mode", ["zeros", "reflect"])
def test_pad_crop_is_a_window_of_the_padded_sample_on_every_axis(spatial, mode):
    x = torch.rand(5, 2, *spatial)
    pad = 2
    out = pad_crop(x, pad, mode, _gen(7))
    g = _gen(7)  # the same draws, axis by axis, first spatial axis first
    starts = [torch.randint(0, 2 * pad + 1, (5,), generator=g) for _ in spatial]
    assert torch.equal(out, _shift_reference(x, starts, pad, mode))


@pytest.mark.parametrize("spatial", [(9,), (6, 7), (4, 5, 6)])
def test_flips_flip_each_axis_as_drawn(spatial):
    x = torch.rand(6, 1, *spatial)
    out = Augment("flips", _gen(3))(x)
    g = _gen(3)
    want = x
    for axis in range(x.ndim - 1, 1, -1):  # last axis first
        coin = torch.rand(6, generator=g) < 0.5
        want = torch.stack([w.flip(axis - 1) if c else w for w, c in zip(want, coin, strict=True)])
    assert torch.equal(out, want)


def test_2d_policies_keep_their_draws():
    # flips on images is hflip then vflip, as it always was
    x = torch.rand(8, 3, 6, 6)
    assert torch.equal(Augment("flips", _gen(5))(x), vflip(hflip(x, 0.5, _gen(5)), 0.5,
                                                            _gen_after(5, 8)))


def _gen_after(seed, n):
    g = _gen(seed)
    torch.rand(n, generator=g)
    return g


@pytest.mark.parametrize("spatial", [(16,), (8, 8), (8, 8, 8)])
def test_zoom_of_one_is_identity_and_zoom_moves_mass_about_the_centre(spatial):
    x = torch.rand(3, 2, *spatial)
    assert torch.allclose(random_zoom(x, (1.0, 1.0), generator=_gen(0)), x, atol=1e-5)
    # a centred bump keeps its centre under any zoom
    grid = torch.meshgrid(*[torch.arange(n) - (n - 1) / 2 for n in spatial], indexing="ij")
    bump = torch.exp(-sum(g**2 for g in grid) / 4)[None, None].repeat(2, 1, *[1] * len(spatial))
    z = random_zoom(bump, (1.3, 1.3), generator=_gen(0))
    weights = [(z * g).sum() / z.sum() for g in grid]
    assert all(abs(float(w)) < 1e-4 for w in weights)
    assert z.sum() > bump.sum()  # enlarged content covers more of the window


@pytest.mark.parametrize("policy", ["digits", "affine"])
def test_rotating_policies_refuse_volumes_in_one_line(policy):
    with pytest.raises(ValueError, match=r"defined for \[B, C, H, W\] images"):
        Augment(policy, _gen(0))(torch.rand(2, 1, 4, 4, 4))


@pytest.mark.parametrize("policy", ["none", "flips", "shapes", "flip_crop", "zoom"])
@pytest.mark.parametrize("spatial", [(12,), (6, 6, 6)])
def test_spatial_policies_run_on_series_and_volumes(policy, spatial):
    x = torch.rand(4, 1, *spatial)
    out = Augment(policy, _gen(1))(x)
    assert out.shape == x.shape
    assert torch.equal(out, Augment(policy, _gen(1))(x))  # a pure function of the generator
