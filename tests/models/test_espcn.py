"""ESPCN (Shi et al. 2016): shapes, parameter count, receptive field, sub-pixel shuffle, overfit."""

import math

import pytest
import torch
import torch.nn.functional as F

import cnnkit.models.espcn  # noqa: F401  (registers the builder)
from cnnkit.analysis import summary
from cnnkit.models import create_model, list_models
from cnnkit.tasks.metrics import bicubic_downscale, bicubic_upscale, psnr


def test_registered_as_superres():
    assert "espcn" in list_models(task="superres")


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("in_chans", [1, 3])
def test_output_shape(scale, in_chans):
    m = create_model("espcn", scale=scale, in_chans=in_chans)
    for h, w in [(17, 17), (8, 13)]:
        out = m(torch.rand(2, in_chans, h, w))
        assert out.shape == (2, in_chans, scale * h, scale * w)
    assert (m.task, m.scale, m.size_multiple, m.num_classes) == ("superres", scale, 1, in_chans)
    assert m.default_cfg["input_size"] == (in_chans, 17, 17)
    assert m.default_cfg["task"] == "superres"
    for info in m.feature_info:
        m.get_submodule(info["module"])
    m.get_submodule(m.cam_layer)


def analytic_params(c: int, r: int) -> int:
    # (f1, n1) = (5, 64), (f2, n2) = (3, 32), f3 = 3 with c * r^2 outputs; weights + biases.
    return (c * 64 * 25 + 64) + (64 * 32 * 9 + 32) + (32 * c * r * r * 9 + c * r * r)


@pytest.mark.parametrize("c,r", [(1, 2), (1, 3), (3, 4)])
def test_parameter_count_analytic(c, r):
    m = create_model("espcn", scale=r, in_chans=c)
    assert sum(p.numel() for p in m.parameters()) == analytic_params(c, r)
    assert analytic_params(1, 3) == 22_729  # the paper's Y-channel x3 network


def test_receptive_field_is_9_lr_pixels():
    # 5x5 then two 3x3 "same" convolutions: 5 + 2 + 2 = 9 LR pixels per axis.
    s = summary(create_model("espcn", scale=3), (1, 17, 17))
    assert s.receptive_field == 9
    assert s.jump == pytest.approx(1 / 3, abs=1e-3)  # r HR pixels per LR pixel
    assert s.total_macs > 0
    # Independent check by autograd: one HR output pixel depends on exactly a 9x9 LR patch.
    m = create_model("espcn", scale=3).double()
    x = torch.rand(1, 1, 21, 21, dtype=torch.float64, requires_grad=True)
    m(x)[0, 0, 31, 31].backward()  # HR (31, 31) lies in LR pixel (10, 10)
    rows, cols = (x.grad[0, 0] != 0).nonzero(as_tuple=True)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (6, 14, 6, 14)


def shuffle_reference(t: torch.Tensor, r: int) -> torch.Tensor:
    """PyTorch's convention by reshape/permute.

    out[c, r*h + i, r*w + j] = t[c*r*r + i*r + j, h, w].
    """
    b, crr, h, w = t.shape
    c = crr // (r * r)
    return t.view(b, c, r, r, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c, h * r, w * r)


def paper_ps(t: torch.Tensor, r: int, x_is_column: bool) -> torch.Tensor:
    """The paper's periodic shuffle, literally.

    PS(T)[x, y, c] = T[x // r, y // r, C*r*(y mod r) + C*(x mod r) + c].
    """
    b, crr, h, w = t.shape
    c = crr // (r * r)
    rows = torch.arange(h * r)[:, None, None]
    cols = torch.arange(w * r)[None, :, None]
    ch = torch.arange(c)[None, None, :]
    x, y = (cols, rows) if x_is_column else (rows, cols)
    src_ch = c * r * (y % r) + c * (x % r) + ch  # [H*r, W*r, C] after broadcasting
    src_ch = src_ch.expand(h * r, w * r, c)
    hh, ww = (rows // r).expand_as(src_ch), (cols // r).expand_as(src_ch)
    return t[:, src_ch, hh, ww].permute(0, 3, 1, 2)  # -> [B, C, H*r, W*r]


@pytest.mark.parametrize("c,r", [(1, 2), (3, 3)])
def test_pixel_shuffle_conventions(c, r):
    t = torch.randn(2, c * r * r, 4, 5)
    ps = torch.nn.PixelShuffle(r)(t)
    assert torch.equal(ps, shuffle_reference(t, r))
    # PyTorch's channel index is c*r^2 + (phase); the paper's is C*(phase) + c: the same
    # layout once the channels are permuted, reading x as the column and y as the row.
    phase = torch.arange(r * r)
    to_paper = torch.empty(c * r * r, dtype=torch.long)  # paper channel -> PyTorch channel
    for k in range(c):
        to_paper[c * phase + k] = k * r * r + phase
    assert torch.equal(paper_ps(t[:, to_paper], r, x_is_column=True), ps)
    # Reading x as the row transposes the r x r phase pattern: a different convention.
    assert not torch.equal(paper_ps(t[:, to_paper], r, x_is_column=False), ps)
    if c > 1:  # without the permutation the channels interleave differently
        assert not torch.equal(paper_ps(t, r, x_is_column=True), ps)


def test_model_uses_the_sub_pixel_shuffle():
    m = create_model("espcn", scale=2, in_chans=3)
    x = torch.rand(1, 3, 6, 7)
    feats = m.conv3(m.act2(m.conv2(m.act1(m.conv1(x)))))
    assert torch.equal(m(x), shuffle_reference(feats, 2))


def test_options_validated():
    with pytest.raises(ValueError, match="scale"):
        create_model("espcn", scale=1)
    with pytest.raises(ValueError, match="activation"):
        create_model("espcn", act="gelu")
    with pytest.raises(ValueError, match="num_classes"):
        create_model("espcn", in_chans=3, num_classes=21)
    assert create_model("espcn", in_chans=3, num_classes=3).num_classes == 3
    relu = create_model("espcn", act="relu")
    assert isinstance(relu.act1, torch.nn.ReLU)


def smooth_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Sums of four random plane waves (1-7 cycles per image) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size),
                            indexing="ij")
    img = torch.zeros(n, size, size)
    for _ in range(4):
        f = torch.rand(n, 2, 1, 1, generator=g) * 6 + 1
        phase = torch.rand(n, 1, 1, generator=g) * 2 * math.pi
        img += torch.sin(2 * math.pi * (f[:, 0] * xx + f[:, 1] * yy) + phase)
    return (0.5 + img / 8).clamp(0, 1)[:, None]


def test_overfit_beats_bicubic():
    hr = smooth_images(8, 32)
    lr = bicubic_downscale(hr, 2)
    baseline = psnr(bicubic_upscale(lr, 2), hr, border=2).mean()
    m = create_model("espcn", scale=2)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    for _ in range(100):
        loss = F.mse_loss(m(lr), hr)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        ours = psnr(m(lr).clamp(0, 1), hr, border=2).mean()
    assert ours > baseline + 1.0, (float(ours), float(baseline))
