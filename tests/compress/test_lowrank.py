"""Low-rank factorisation: exactness at full rank, Eckart-Young errors, CP on exact-rank kernels,
analytic parameter counts, whole-model decomposition and trainable a-priori factorisation."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.compress.lowrank import (
    cp_als,
    cp_conv,
    cp_params,
    decompose,
    factorize_model,
    select_rank,
    svd_conv1x1,
    svd_linear,
    svd_params,
    tucker2_conv,
    tucker2_params,
)
from cnnkit.layers.ops import UnknownOperator
from cnnkit.models import create_model

CONV_CASES = [  # (stride, padding, dilation)
    (1, 0, 1),
    (2, 1, 1),
    (1, 1, 2),
    (2, 2, 2),
    ((2, 1), (1, 0), (1, 2)),  # per-axis values must land on the right depthwise factor
]


def _n(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _matrix_with_singular_values(s: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    u = torch.linalg.qr(torch.randn(rows, len(s), generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(cols, len(s), generator=g, dtype=torch.float64))[0]
    return (u * s) @ v.T


@pytest.mark.parametrize("stride,padding,dilation", CONV_CASES)
@pytest.mark.parametrize("hooi_iters", [0, 2])
def test_full_rank_tucker2_reproduces_conv(stride, padding, dilation, hooi_iters):
    conv = nn.Conv2d(6, 8, 3, stride=stride, padding=padding, dilation=dilation)
    seq = tucker2_conv(conv, rank=100, hooi_iters=hooi_iters)  # clipped to (8, 6): full rank
    assert (seq[1].out_channels, seq[1].in_channels) == (8, 6)
    x = torch.randn(2, 6, 11, 13)
    torch.testing.assert_close(seq(x), conv(x), atol=1e-4, rtol=0)


def test_full_rank_svd_reproduces_linear():
    lin = nn.Linear(20, 12)
    seq = svd_linear(lin, rank=12)
    x = torch.randn(5, 20)
    torch.testing.assert_close(seq(x), lin(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("stride,padding,dilation", CONV_CASES)
@pytest.mark.parametrize("rank", [2, 5])
def test_cp_recovers_exact_rank_kernel(stride, padding, dilation, rank):
    g = torch.Generator().manual_seed(rank)
    factors = [torch.randn(n, rank, generator=g) for n in (8, 6, 3, 3)]
    conv = nn.Conv2d(6, 8, 3, stride=stride, padding=padding, dilation=dilation)
    with torch.no_grad():
        conv.weight.copy_(torch.einsum("ar,br,cr,dr->abcd", *factors))
    seq = cp_conv(conv, rank=rank, iters=500)
    a, b, c, d = (seq[3].weight[:, :, 0, 0], seq[0].weight[:, :, 0, 0].T,
                  seq[1].weight[:, 0, :, 0].T, seq[2].weight[:, 0, 0, :].T)
    w_hat = torch.einsum("ar,br,cr,dr->abcd", a, b, c, d)
    assert ((w_hat - conv.weight).norm() / conv.weight.norm()).item() < 1e-3
    x = torch.randn(2, 6, 12, 11)
    y = conv(x)
    assert ((seq(x) - y).norm() / y.norm()).item() < 1e-3


def test_truncated_svd_error_is_eckart_young():
    s = torch.tensor([5.0, 4.0, 2.5, 1.0, 0.5, 0.25], dtype=torch.float64)
    lin = nn.Linear(10, 8)
    with torch.no_grad():
        lin.weight.copy_(_matrix_with_singular_values(s, 8, 10))
    _, records = decompose(nn.Sequential(lin), method="svd", rank=3, keep_if_larger=True)
    expected = math.sqrt((s[3:] ** 2).sum() / (s**2).sum())
    assert records[0].rank == 3
    assert records[0].rel_error == pytest.approx(expected, rel=1e-4)
    # the same error, measured on the layer's outputs for an orthonormal basis of inputs
    seq = svd_linear(lin, rank=3)
    eye = torch.eye(10)
    err = (seq(eye) - lin(eye)).norm() / (lin(eye) - lin.bias).norm()
    assert err.item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("frac,expected", [(0.5, 1), (0.8, 2), (0.9, 3), (0.97, 4), (1.0, 4)])
def test_energy_rank_is_analytic(frac, expected):
    # squared energies 16, 9, 4, 1 of 30: cumulative fractions 0.533, 0.833, 0.967, 1
    s = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    assert select_rank(s, f"energy:{frac}") == expected
    lin = nn.Linear(9, 6, bias=False)
    with torch.no_grad():
        lin.weight.copy_(_matrix_with_singular_values(s, 6, 9))
    assert svd_linear(lin, rank=f"energy:{frac}")[0].out_features == expected


@pytest.mark.parametrize("bad", ["energy:0", "energy:1.5", "energy", "top:3", 0, 2.5])
def test_bad_rank_raises(bad):
    with pytest.raises(ValueError, match="rank"):
        select_rank(torch.ones(4), bad)


def test_parameter_counts_match_formulas():
    conv = nn.Conv2d(6, 8, 3)
    tucker = tucker2_conv(conv, rank=(3, 2))
    # 6*2 + 2*3*9 + 3*8 + 8 (bias)
    assert _n(tucker) == tucker2_params(6, 8, 9, 2, 3, bias=True) == 98
    cp = cp_conv(conv, rank=4, iters=5)
    # 4 * (6 + 3 + 3 + 8) + 8
    assert _n(cp) == cp_params(6, 8, (3, 3), 4, bias=True) == 88
    svd = svd_linear(nn.Linear(20, 10), rank=3)
    assert _n(svd) == svd_params(20, 10, 3, bias=True) == 100


@pytest.mark.parametrize("method", ["tucker", "cp"])
def test_compression_target_is_met(method):
    conv = nn.Conv2d(32, 48, 3, bias=False)
    build = tucker2_conv if method == "tucker" else cp_conv
    kwargs = {} if method == "tucker" else {"iters": 3}
    before = _n(conv)
    after = _n(build(conv, compression=4.0, **kwargs))
    # ranks are floored, so the target is met from below, and within one rank step of it
    assert before / 4.0 * 0.8 < after <= before / 4.0


def test_grouped_and_first_convs_are_skipped():
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3, groups=16),
                          nn.Conv2d(16, 16, 3))
    new, records = decompose(model, method="tucker", rank=2)
    assert [r.layer for r in records] == ["2"]
    assert isinstance(new[0], nn.Conv2d) and isinstance(new[1], nn.Conv2d)
    assert isinstance(model[2], nn.Conv2d), "the caller's model must not change"
    with pytest.raises(ValueError, match="not modules"):
        decompose(model, rank=2, layers=["nope"])


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return create_model("resnet18", num_classes=10, img_size=32, stem="small").eval()


@pytest.mark.parametrize("method", ["auto", "cp"])
def test_decompose_resnet18_compresses(resnet, method):
    layers = None if method == "auto" else ["layer1.0.conv1", "layer2.0.downsample.0"]
    new, records = decompose(resnet, method=method, compression=4.0, layers=layers, cp_iters=10)
    x = torch.randn(2, 3, 32, 32)
    y = new.eval()(x)
    assert y.shape == (2, 10) and torch.isfinite(y).all()
    assert _n(new) < _n(resnet)
    assert _n(resnet) - _n(new) == sum(r.params_before - r.params_after for r in records)
    assert all(r.params_after <= r.params_before / 4.0 + 512 for r in records)  # + bias
    # auto: every 3x3/1x1 conv but the stem, and the classifier; cp: the named 3x3 conv only
    assert len(records) == (20 if method == "auto" else 1)


def test_decompose_resnet18_energy_close(resnet):
    new, records = decompose(resnet, method="tucker", rank="energy:0.999", keep_if_larger=True)
    assert len(records) == 16  # all 3x3 convolutions but the stem
    # HOSVD bound: ||W - W_hat||^2 <= dropped energy of mode 0 + mode 1 <= 2 * 0.001 ||W||^2
    assert max(r.rel_error for r in records) <= math.sqrt(2 * 0.001) + 1e-9
    x = torch.randn(4, 3, 32, 32)
    y0, y1 = resnet(x), new.eval()(x)
    rel = ((y1 - y0).norm() / y0.norm()).item()
    # BN and residual paths keep each layer's gain near 1 and the 16 kernel errors are
    # uncorrelated, so they add in quadrature: sqrt(sum err^2) = 0.076; measured 0.03-0.04. A
    # mis-wired factor (e.g. a transposed U) gives an error of order 1.
    assert rel < math.sqrt(sum(r.rel_error**2 for r in records))


@pytest.mark.parametrize("kind", ["cp", "tucker"])
def test_factorize_model_matches_he_variance(kind):
    # The CP product of four random factors is heavy-tailed (one seed's ratio has a standard
    # deviation of ~0.3): 64 seeds bring the mean's to ~0.04, well inside the bounds.
    conv = nn.Conv2d(64, 64, 3, padding=1)
    ratios = []
    for seed in range(64):
        torch.manual_seed(seed)
        seq = factorize_model(nn.Sequential(conv), kind=kind, skip_first=False)[0]
        w = seq[0].weight[:, :, 0, 0]
        if kind == "cp":
            eff = torch.einsum("or,rh,rw,ri->oihw", seq[3].weight[:, :, 0, 0],
                               seq[1].weight[:, 0, :, 0], seq[2].weight[:, 0, 0, :], w)
        else:
            eff = torch.einsum("os,srhw,ri->oihw", seq[2].weight[:, :, 0, 0], seq[1].weight, w)
        ratios.append(eff.var().item() / (2 / (64 * 9)))
    assert 0.85 < sum(ratios) / len(ratios) < 1.15
    x = torch.randn(1, 64, 8, 8)
    assert seq(x).shape == conv(x).shape


@pytest.mark.parametrize("kind", ["cp", "tucker"])
def test_factorize_model_trains(kind):
    model = factorize_model(create_model("tinyvgg", num_classes=4, img_size=16), kind=kind)
    assert any(isinstance(m, nn.Sequential) and len(m) in (3, 4)
               and all(isinstance(c, nn.Conv2d) for c in m) for m in model.modules())
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 4, (16,))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_hooi_never_worse_than_hosvd():
    # HOOI starts from HOSVD and each step is a least-squares improvement of one mode's factor
    conv = nn.Conv2d(16, 24, 3, bias=False)

    def error(seq):
        w_hat = torch.einsum("os,srhw,ri->oihw", seq[2].weight[:, :, 0, 0], seq[1].weight,
                             seq[0].weight[:, :, 0, 0])
        return ((w_hat - conv.weight).norm() / conv.weight.norm()).item()

    hosvd, hooi = error(tucker2_conv(conv, rank=(6, 4))), error(tucker2_conv(conv, rank=(6, 4),
                                                                             hooi_iters=5))
    assert hooi <= hosvd + 1e-6
    assert 0.0 < hooi < 1.0


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_string_padding(padding):
    conv = nn.Conv2d(6, 8, (3, 5), padding=padding)
    x = torch.randn(2, 6, 9, 10)
    torch.testing.assert_close(tucker2_conv(conv, rank=100)(x), conv(x), atol=1e-4, rtol=0)
    assert cp_conv(conv, rank=3, iters=2)(x).shape == conv(x).shape


def test_cp_record_error_is_the_kernel_error():
    conv = nn.Conv2d(8, 8, 3)
    _, records = decompose(nn.Sequential(nn.Conv2d(3, 8, 1), conv), method="cp", rank=4,
                           cp_iters=20)
    seq = cp_conv(conv, rank=4, iters=20)  # deterministic: seeded initialisation
    w_hat = torch.einsum("or,rh,rw,ri->oihw", seq[3].weight[:, :, 0, 0], seq[1].weight[:, 0, :, 0],
                         seq[2].weight[:, 0, 0, :], seq[0].weight[:, :, 0, 0])
    expected = ((w_hat - conv.weight).norm() / conv.weight.norm()).item()
    assert [r.layer for r in records] == ["1"] and records[0].rank == 4
    assert records[0].rel_error == pytest.approx(expected, rel=1e-4)


def test_create_model_conv_cp_trains_and_reloads(tmp_path):
    # A-priori compression: the factorised network is what the trainer builds and saves,
    # and load_run rebuilds the same structure from the saved options.
    from cnnkit.training import load_run, train

    std = create_model("tinyvgg", num_classes=10, in_chans=1, img_size=8, width=16)
    cp = create_model("tinyvgg", num_classes=10, in_chans=1, img_size=8, width=16, conv="cp")
    n_std, n_cp = (sum(p.numel() for p in m.parameters()) for m in (std, cp))
    assert n_cp < n_std
    # rank r = 0.25 * 16 = 4 for each 16->16 3x3 conv: 16*4 + 4*3 + 4*3 + 4*16 (+16 bias)
    assert cp.features.conv_1_2[1].out_channels == 4
    result = train(model="tinyvgg", data="digits", epochs=5, batch_size=32,
                   model_kwargs={"width": 16, "conv": "cp"}, runs_dir=str(tmp_path),
                   name="cp", progress=False)
    run = load_run(tmp_path / "cp")
    assert sum(p.numel() for p in run.model.parameters()) == n_cp
    assert result["test_accuracy"] > 0.3  # it learns (10 classes: chance is 0.1)
    with pytest.raises(ValueError, match="unknown conv"):
        create_model("tinyvgg", conv="svd")


def test_decomposed_model_finetunes_and_reloads(tmp_path):
    # Optional fine-tuning of a decomposed network through the normal trainer: the run
    # records the low-rank history and load_run rebuilds the factor structure from it.
    from cnnkit.training import TrainConfig, Trainer, load_run

    base = create_model("tinyvgg", num_classes=10, in_chans=1, img_size=8, width=16)
    small, records = decompose(base, method="auto", rank="energy:0.9")
    assert records and small.lowrank_history[0]["layer"] == records[0].layer
    cfg = TrainConfig(model="tinyvgg", model_kwargs={"width": 16}, data="digits", epochs=1,
                      runs_dir=str(tmp_path), name="lr")
    Trainer(cfg, model=small, progress=False).fit()
    run = load_run(tmp_path / "lr")
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():  # the trainer fine-tuned `small` itself and ends on its best weights
        assert torch.allclose(run.model(x), small.eval()(x), atol=1e-6)
    with pytest.raises(ValueError, match="could not be reloaded"):
        Trainer(TrainConfig(model="lenet5", data="digits", epochs=1, runs_dir=str(tmp_path)),
                model=small, progress=False)


def test_factorize_model_gives_1d_and_3d_networks_the_2d_structure():
    counts = []
    for size in ((1, 32), (1, 16, 16), (1, 8, 8, 8)):
        model = factorize_model(create_model("resnet18", num_classes=3, input_size=size))
        counts.append(sum(isinstance(m, nn.Sequential) and len(m) == len(size) + 1
                          for m in model.modules()))
        assert model(torch.randn(2, *size)).shape == (2, 3)
    assert counts[0] == counts[1] == counts[2] > 0


# -- any number of spatial dims: the same factorisations of Conv1d and Conv3d kernels -----
ND_CASES = [  # (dims, stride, padding, dilation), per axis where it matters
    (1, 1, 0, 1),
    (1, 2, 1, 2),
    (2, (2, 1), (1, 0), (1, 2)),
    (3, 1, 1, 1),
    (3, (2, 1, 1), (1, 0, 2), (1, 2, 1)),
]


def _nd_conv(dims, stride, padding, dilation, kernel=3):
    torch.manual_seed(dims)
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
    return conv(4, 5, kernel, stride=stride, padding=padding, dilation=dilation)


@pytest.mark.parametrize("dims,stride,padding,dilation", ND_CASES)
@pytest.mark.parametrize("method", ["tucker", "tucker_hooi", "cp"])
def test_full_rank_factorisations_reproduce_nd_conv(dims, stride, padding, dilation, method):
    conv = _nd_conv(dims, stride, padding, dilation)
    if method == "cp":  # rank C_in * prod(k): the out-mode unfolding's rank, an exact CP exists
        seq = cp_conv(conv, rank=4 * 3**dims, iters=500)
        assert len(seq) == dims + 2  # one depthwise factor per kernel axis
    else:
        seq = tucker2_conv(conv, rank=100, hooi_iters=2 if method == "tucker_hooi" else 0)
        assert seq[1].kernel_size == conv.kernel_size
    x = torch.randn(2, 4, *(9, 8, 7)[:dims])
    torch.testing.assert_close(seq(x), conv(x), atol=1e-4, rtol=0)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_full_rank_svd_reproduces_one_tap_nd_conv(dims):
    conv = _nd_conv(dims, 2, 0, 1, kernel=1)
    seq = svd_conv1x1(conv, rank=100)
    x = torch.randn(2, 4, *(9, 8, 7)[:dims])
    torch.testing.assert_close(seq(x), conv(x), atol=1e-4, rtol=0)


@pytest.mark.parametrize("dims", [1, 3])
def test_cp_als_recovers_exact_rank_nway_tensor(dims):
    g = torch.Generator().manual_seed(dims)
    shape = (6, 5, *(3, 4, 2)[:dims])
    factors = [torch.randn(n, 3, generator=g, dtype=torch.float64) for n in shape]
    letters = "abcde"[:len(shape)]
    w = torch.einsum(",".join(f"{c}r" for c in letters) + "->" + letters, *factors)
    fit = cp_als(w, 3, iters=500)
    assert len(fit) == len(shape) and [f.shape for f in fit] == [(n, 3) for n in shape]
    w_hat = torch.einsum(",".join(f"{c}r" for c in letters) + "->" + letters, *fit)
    assert ((w_hat - w).norm() / w.norm()).item() < 1e-3  # as the 4-way test above


def test_parameter_counts_match_formulas_3d():
    conv = nn.Conv3d(6, 8, (3, 3, 5))
    assert _n(tucker2_conv(conv, rank=(3, 2))) == tucker2_params(6, 8, 45, 2, 3, bias=True)
    # 4 * (6 + 3 + 3 + 5 + 8) + 8
    assert _n(cp_conv(conv, rank=4, iters=3)) == cp_params(6, 8, (3, 3, 5), 4, bias=True) == 108


@pytest.mark.parametrize("input_size", [(1, 32), (1, 12, 12, 12)])
def test_decompose_resnet18_nd(input_size):
    model = create_model("resnet18", num_classes=3, input_size=input_size).eval()
    new, records = decompose(model, method="tucker", rank="energy:1.0", keep_if_larger=True)
    assert len(records) == 16  # all k>1 convolutions but the stem, as in 2D
    assert max(r.rel_error for r in records) < 1e-5
    x = torch.randn(2, *input_size)
    torch.testing.assert_close(new.eval()(x), model(x), atol=1e-3, rtol=1e-3)


def test_grouped_conv_refused_by_the_factorisation_itself():
    with pytest.raises(ValueError, match="groups=4"):
        tucker2_conv(nn.Conv3d(4, 4, 3, groups=4), rank=2)


def test_unknown_operator_refused_by_decompose(unknown_layer):
    Scale = unknown_layer
    with pytest.raises(UnknownOperator) as err:
        decompose(nn.Sequential(nn.Conv2d(3, 8, 3), Scale(), nn.Conv2d(8, 8, 3)), rank=2)
    assert "Scale" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UnknownOperator, match="Scale"):
        tucker2_conv(Scale(), rank=2)
