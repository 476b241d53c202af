"""LRP: rules against an independent matrix-form reference, conservation, canonizers."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lrp_nets import PIXEL_HIGH, PIXEL_LOW, images
from torch import nn

from cnnkit.explain import create
from cnnkit.explain.lrp import AlphaBeta, Epsilon, Gamma, ZBox, ZPlus, canonize
from cnnkit.models import create_model

CONFIGS = [dict(composite="epsilon_plus"), dict(composite="epsilon_gamma_box"),
           dict(composite="epsilon_alpha2_beta1"), dict(rule="epsilon", epsilon=0.1),
           dict(rule="gamma"), dict(rule="alpha1beta0")]


def _no_hooks(model):
    return all(not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                    or m._backward_pre_hooks) for m in model.modules())


def _randomize_bn(model, seed=0, centred=False):
    """Non-trivial BatchNorm statistics; ``centred``: zero mean and shift, so that folding
    adds no bias."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=g, dtype=m.weight.dtype) + 0.5
            m.running_var = torch.rand(n, generator=g, dtype=m.weight.dtype) + 0.5
            if not centred:
                m.bias.data = torch.randn(n, generator=g, dtype=m.weight.dtype) * 0.1
                m.running_mean = torch.randn(n, generator=g, dtype=m.weight.dtype) * 0.1
    return model


@pytest.mark.parametrize("name", ["tinyvgg", "resnet18"])
@pytest.mark.parametrize("options", CONFIGS, ids=lambda o: str(list(o.values())[0]))
def test_shapes_multi_target_and_state_restored(name, options):
    torch.manual_seed(0)
    size = 16 if name == "tinyvgg" else 8
    model = _randomize_bn(create_model(name, num_classes=5, img_size=size).double())
    model.train()
    first = next(model.parameters())
    first.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    state = copy.deepcopy(model.state_dict())
    types = [type(m) for m in model.modules()]
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    explainer = create("lrp", model, **options)
    targets = torch.tensor([[1, 0, 3], [4, 4, 2]])
    many = explainer(x, target=targets)
    assert many.shape == (2, 3, size, size)
    assert torch.isfinite(many).all() and many.abs().sum() > 0
    for k in range(3):  # each of the K maps equals a single-target call
        one = explainer(x, target=targets[:, k])
        assert one.shape == (2, size, size)
        torch.testing.assert_close(many[:, k], one)
    assert _no_hooks(model)
    assert all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert [type(m) for m in model.modules()] == types  # no module replaced in place
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


# -- an independent reference: every layer as an explicit matrix, LRP in numpy ----------

def _as_matrix(layer, shape):
    """(W [out, in], b [out]) of a linear layer acting on a flattened input of ``shape``."""
    n = int(np.prod(shape))
    with torch.no_grad():
        zero = layer(torch.zeros(1, *shape, dtype=torch.float64))
        cols = layer(torch.eye(n, dtype=torch.float64).view(n, *shape)) - zero
    return cols.reshape(n, -1).T.numpy(), zero.reshape(-1).numpy()


def _stab(d, eps):
    return d + eps * np.where(d >= 0, 1.0, -1.0)


def _ref_gamma(a, w, b, r, gamma):
    """Generalised LRP-gamma (Andéol et al. 2021, as zennit): with ``z_ij = a_i w_ji``, an
    output ``z_j > 0`` favours the positive contributions, ``c_ij = z_ij + gamma (z_ij)+``
    and ``d_j = sum_i c_ij + b_j + gamma b_j+``, a negative one the negative ones (``-``
    throughout); ``z_j = 0`` passes nothing. For ``a >= 0``, ``z_j > 0`` it is the classic
    ``a_i (w_ji + gamma w_ji+)`` of Montavon et al. (2019)."""
    z = a[None, :] * w
    out = z.sum(1) + b
    part = np.where((out > 0)[:, None], np.maximum(z, 0), np.minimum(z, 0))
    c = z + gamma * part
    d = c.sum(1) + b + gamma * np.where(out > 0, np.maximum(b, 0), np.minimum(b, 0))
    return (c * (np.where(out != 0, r, 0.0) / _stab(d, 1e-6))[:, None]).sum(0)


def _ref_rule(rule, a, w, b, r, eps=1e-6, gamma=0.25, bias=False, low=None, high=None):
    """``R_i = sum_j c_ij / d_j R_j`` for one layer, straight from the paper formulas
    (Montavon et al. 2019, Sec. 10.2); z+ is alpha=1, beta=0; ``bias``: b+ / b- join the z+
    / alpha-beta denominators (zennit's convention)."""
    z = a[None, :] * w  # z_ji = a_i w_ji
    if rule == "epsilon":  # Bach et al. 2015
        return (z * (r / _stab(z.sum(1) + b, eps))[:, None]).sum(0)
    if rule == "gamma":
        return _ref_gamma(a, w, b, r, gamma)
    if rule == "zbox":  # Montavon et al. 2017, no bias
        c = z - low[None, :] * np.maximum(w, 0) - high[None, :] * np.minimum(w, 0)
        return (c * (r / _stab(c.sum(1), 1e-6))[:, None]).sum(0)
    alpha, beta = {"zplus": (1, 0), "alpha1beta0": (1, 0), "alpha2beta1": (2, 1)}[rule]
    zp, zn = np.maximum(z, 0), np.minimum(z, 0)
    dp = zp.sum(1) + (np.maximum(b, 0) if bias else 0)
    dn = zn.sum(1) + (np.minimum(b, 0) if bias else 0)
    return (alpha * zp * (r / _stab(dp, 1e-6))[:, None]
            - beta * zn * (r / _stab(dn, 1e-6))[:, None]).sum(0)


def _reference(net, x, target, rules, **kw):
    """Relevance [C, H, W] of one image; ``rules``: one rule name per Conv/Linear/AvgPool."""
    steps, a = [], x[None]
    for m in net:
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.AvgPool2d)):
            w, b = _as_matrix(m, a.shape[1:])
            steps.append(("linear", w, b, a.reshape(-1).numpy()))
        elif isinstance(m, nn.MaxPool2d):
            _, idx = F.max_pool2d(a, m.kernel_size, return_indices=True)
            plane = a.shape[2] * a.shape[3]
            offset = (torch.arange(a.shape[1]) * plane).view(1, -1, 1, 1)
            steps.append(("max", (idx + offset).reshape(-1).numpy(), a.numel()))
        with torch.no_grad():
            a = m(a)
    r = np.zeros(a.shape[1])
    r[target] = a[0, target].item()
    rules = list(rules)
    for step in reversed(steps):  # ReLU and Flatten pass relevance unchanged
        if step[0] == "max":
            r_in = np.zeros(step[2])
            np.add.at(r_in, step[1], r)
            r = r_in
        else:
            _, w, b, a_in = step
            rule = rules.pop()
            extra = {}
            if rule == "zbox":
                extra = {k: np.broadcast_to(np.asarray(kw[k])[:, None, None], x.shape)
                         .reshape(-1) for k in ("low", "high")}
            r = _ref_rule(rule, a_in, w, b, r, eps=kw.get("epsilon", 1e-6),
                          gamma=kw.get("gamma", 0.25), **extra)
    return r.reshape(x.shape)


def _fc_net():
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 8),
                         nn.ReLU(), nn.Linear(8, 4)).double().eval()


def _conv_net(bias=True):
    torch.manual_seed(2)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=bias), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 5, 3, padding=1, bias=bias), nn.ReLU(), nn.AvgPool2d(2),
                         nn.Flatten(), nn.Linear(20, 6, bias=bias), nn.ReLU(),
                         nn.Linear(6, 4, bias=bias)).double().eval()


LOW, HIGH = [-1.0, -2.0, -0.5], [1.0, 2.0, 1.5]
CASES = [dict(rule="epsilon", epsilon=0.05), dict(rule="gamma", gamma=0.5, epsilon=1e-3),
         dict(rule="zplus"), dict(rule="alpha2beta1"),
         dict(composite="epsilon_plus", epsilon=0.01), dict(composite="epsilon_alpha2_beta1"),
         dict(composite="epsilon_gamma_box", low=LOW, high=HIGH, gamma=0.1)]
CONV_KINDS = ["conv", "conv", "pool", "dense", "dense"]  # _conv_net's Conv/AvgPool/Linear


def _expected_rules(options, kinds):
    """Which rule the composite should put on each layer, written out by hand."""
    if "rule" in options:
        return [options["rule"] if k != "pool" else "epsilon" for k in kinds]
    conv = {"epsilon_plus": "zplus", "epsilon_alpha2_beta1": "alpha2beta1",
            "epsilon_gamma_box": "gamma"}[options["composite"]]
    rules = [conv if k == "conv" else "epsilon" for k in kinds]
    return ["zbox", *rules[1:]] if options["composite"] == "epsilon_gamma_box" else rules


# z^B with per-channel bounds needs an image-shaped input layer: not on the MLP
@pytest.mark.parametrize("options,net", [(o, n) for o in CASES for n in ("conv", "fc")
                                         if n == "conv" or "low" not in o],
                         ids=lambda v: str(list(v.values())[0]) if isinstance(v, dict) else v)
def test_matches_matrix_form_reference(options, net):
    g = torch.Generator().manual_seed(3)
    low, high = torch.tensor(LOW).view(1, 3, 1, 1), torch.tensor(HIGH).view(1, 3, 1, 1)
    x = low + torch.rand(2, 3, 8, 8, generator=g, dtype=torch.float64) * (high - low)
    model, kinds = (_conv_net(), CONV_KINDS) if net == "conv" else (_fc_net(), ["dense"] * 3)
    x = x if net == "conv" else x[..., :2, :2]
    targets = [[0, 3], [2, 1]]
    maps = create("lrp", model, **options)(x, target=targets)
    kw = {k: v for k, v in options.items() if k not in ("rule", "composite")}
    for b in range(2):
        for k in range(2):
            ref = _reference(model, x[b], targets[b][k], _expected_rules(options, kinds), **kw)
            np.testing.assert_allclose(maps[b, k].numpy(), ref.sum(0), rtol=1e-6, atol=1e-10)


def test_epsilon_conserves_relevance_in_a_bias_free_relu_net():
    model = _conv_net(bias=False)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    logits = model(x).detach()
    targets = torch.tensor([[0, 1, 2, 3]] * 3)
    maps = create("lrp", model, rule="epsilon", epsilon=1e-12)(x, target=targets)
    torch.testing.assert_close(maps.sum((2, 3)), logits.gather(1, targets), rtol=1e-5, atol=1e-9)
    # with biases, relevance is absorbed: the same check must fail
    biased = create("lrp", _conv_net(), rule="epsilon", epsilon=1e-12)(x, target=targets)
    assert not torch.allclose(biased.sum((2, 3)), _conv_net()(x).detach().gather(1, targets),
                              rtol=1e-5)


def test_batchnorm_folding_keeps_logits_and_leaves_the_model_alone():
    model = _randomize_bn(create_model("resnet18", num_classes=5, img_size=8).double()).eval()
    state = copy.deepcopy(model.state_dict())
    modules = list(model.modules())
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    folded, order = canonize(model, x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert order[0] is folded.conv1 and order[-1] is folded.fc
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    assert list(model.modules()) == modules and model.conv1.bias is None
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 20
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    unfolded, _ = canonize(model, x, fold=False)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in unfolded.modules()) == 20


@pytest.mark.parametrize("name", ["resnet18", "densenet121"])
def test_residual_and_concatenation_nets_conserve_relevance(name):
    """Bias-free after folding (zero BN shift and mean, zero fc bias): the relevance of
    the sum ``out + identity`` is split a / (a + b), b / (a + b) by the gradient alone,
    and DenseNet's concatenations and unfolded BatchNorms (BN-ReLU-conv) pass it on, so
    the input relevance adds up to the logit."""
    torch.manual_seed(0)
    model = _randomize_bn(create_model(name, num_classes=4, img_size=8).double(), centred=True)
    nn.init.zeros_(model.get_classifier().bias)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    targets = torch.tensor([[0, 3], [1, 2]])
    logits = model.eval()(x).detach().gather(1, targets)
    maps = create("lrp", model, rule="epsilon", epsilon=1e-12)(x, target=targets)
    torch.testing.assert_close(maps.sum((2, 3)), logits, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("input_size", [(2, 16), (2, 8, 8), (2, 6, 6, 6)],
                         ids=["1d", "2d", "3d"])
def test_relevance_is_conserved_in_every_dims(input_size):
    """The residual-net conservation above, with the network built in 1, 2 and 3 dims:
    the composites read each layer's slot from the operator registry, whatever its dims."""
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=4, input_size=input_size).double()
    model = _randomize_bn(model, centred=True).eval()
    nn.init.zeros_(model.get_classifier().bias)
    x = torch.randn(2, *input_size, dtype=torch.float64)
    targets = torch.tensor([[0, 3], [1, 2]])
    logits = model(x).detach().gather(1, targets)
    maps = create("lrp", model, rule="epsilon", epsilon=1e-12)(x, target=targets)
    assert maps.shape == (2, 2, *input_size[1:])
    spatial = tuple(range(2, maps.ndim))
    torch.testing.assert_close(maps.sum(spatial), logits, rtol=1e-5, atol=1e-9)


def test_unknown_operator_and_ruleless_operator_refused(unknown_layer):
    model = nn.Sequential(nn.Conv1d(2, 4, 3), unknown_layer(), nn.Flatten(), nn.Linear(24, 3))
    with pytest.raises(ValueError, match="Scale") as err:
        create("lrp", model)(torch.randn(1, 2, 8))
    assert "\n" not in str(err.value) and "register_op" in str(err.value)
    bilinear = nn.Sequential(nn.Flatten(), nn.Bilinear(16, 16, 3))

    class Twice(nn.Module):  # the registry knows nn.Bilinear, and that LRP has no rule for it
        def __init__(self):
            super().__init__()
            self.net = bilinear

        def forward(self, x):
            flat = self.net[0](x)
            return self.net[1](flat, flat)

    with pytest.raises(ValueError, match="LRP has no rule for Bilinear"):
        create("lrp", Twice())(torch.randn(1, 1, 16))


def test_zplus_has_the_sign_of_the_score_and_alpha1beta0_is_zplus():
    model = create_model("tinyvgg", num_classes=5, img_size=16).double()
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)  # non-negative
    targets = torch.tensor([[0, 1, 2, 3, 4]] * 2)
    logits = model.eval()(x).detach().gather(1, targets)
    maps = create("lrp", model, rule="zplus")(x, target=targets)
    assert (maps * logits.sign()[..., None, None] >= 0).all()
    assert (maps.abs().sum((2, 3)) > 0).all()
    signed = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    torch.testing.assert_close(create("lrp", model, rule="alpha1beta0")(signed, targets),
                               create("lrp", model, rule="zplus")(signed, targets),
                               rtol=0, atol=1e-12)
    # alpha2beta1 is a different rule: the check above can tell rules apart
    assert not torch.allclose(create("lrp", model, rule="alpha2beta1")(signed, targets),
                              create("lrp", model, rule="zplus")(signed, targets))


def test_bad_options_raise():
    model = _conv_net()
    with pytest.raises(ValueError, match="epsilon_plus"):
        create("lrp", model, composite="epsilon_pluss")
    with pytest.raises(ValueError, match="first layer only"):
        create("lrp", model, rule="zbox")
    with pytest.raises(ValueError, match="low= and high="):
        create("lrp", model, composite="epsilon_gamma_box")  # no default_cfg to read
    with pytest.raises(ValueError, match="alpha - beta = 1"):
        AlphaBeta(2.0, 0.5)


# -- an independent from-scratch LRP of a net with BatchNorm and a residual block --------

def _reference_resnetlet(net, x, target, rule, dense, first=None, eps=1e-6, gamma=0.25,
                         bias=False):
    """Input relevance [C, H, W] of one image, every step written out: each conv-BN pair
    as one affine matrix (BN in eval mode is affine: this *is* the folding), ReLU passing
    relevance on, max pool to the winner, the residual sum split in proportion to its two
    terms, the average pool by LRP-epsilon, ``rule`` on the convolutions (``first``, if
    given, on the first one; z^B with the pixel bounds), ``dense`` on the dense layer,
    starting from ``R = logit`` at the target."""
    relu = lambda v: np.maximum(v, 0)  # noqa: E731
    w1, b1 = _as_matrix(nn.Sequential(net.conv1, net.bn1), x.shape)
    wa, ba = _as_matrix(nn.Sequential(net.conv_a, net.bn_a), (4, 4, 4))
    wb, bb = _as_matrix(nn.Sequential(net.conv_b, net.bn_b), (4, 4, 4))
    wp, bp = _as_matrix(net.gap, (4, 4, 4))
    wf, bf = net.fc.weight.detach().numpy(), net.fc.bias.detach().numpy()
    a0 = x.reshape(-1).numpy()
    a1 = relu(w1 @ a0 + b1)
    pooled, idx = F.max_pool2d(torch.from_numpy(a1).view(1, 4, 8, 8), 2, return_indices=True)
    idx = (idx + (torch.arange(4) * 64).view(1, -1, 1, 1)).reshape(-1).numpy()
    a2 = pooled.reshape(-1).numpy()
    aa = relu(wa @ a2 + ba)
    zb = wb @ aa + bb
    y = zb + a2
    a3 = relu(y)
    a4 = wp @ a3 + bp
    out = wf @ a4 + bf
    r = np.zeros(3)
    r[target] = out[target]
    kw = dict(eps=eps, gamma=gamma, bias=bias)
    r4 = _ref_rule(dense, a4, wf, bf, r, **kw)
    r3 = _ref_rule("epsilon", a3, wp, bp, r4, **kw)
    share = np.divide(r3, y, out=np.zeros_like(y), where=y != 0)  # ReLU passes r3 to y
    r_aa = _ref_rule(rule, aa, wb, bb, zb * share, **kw)
    r2 = _ref_rule(rule, a2, wa, ba, r_aa, **kw) + a2 * share
    r1 = np.zeros_like(a1)
    np.add.at(r1, idx, r2)
    bounds = {k: np.broadcast_to(np.asarray(v)[:, None, None], x.shape).reshape(-1)
              for k, v in (("low", PIXEL_LOW), ("high", PIXEL_HIGH))}
    first = first or rule
    return _ref_rule(first, a0, w1, b1, r1, **kw, **(bounds if first == "zbox" else {})
                     ).reshape(x.shape)


RESNETLET_CASES = [dict(rule="epsilon", epsilon=0.01), dict(rule="gamma", gamma=0.5),
                   dict(rule="zplus"), dict(rule="zplus", zplus_bias=True),
                   dict(rule="alpha2beta1"), dict(rule="alpha2beta1", zplus_bias=True),
                   dict(composite="epsilon_plus"), dict(composite="epsilon_plus", zplus_bias=True),
                   dict(composite="epsilon_alpha2_beta1", epsilon=0.01),
                   dict(composite="epsilon_gamma_box", low=PIXEL_LOW, high=PIXEL_HIGH,
                        gamma=0.5)]


def _case_id(options):
    return "-".join(str(v) for k, v in options.items() if k not in ("low", "high"))


def _rules_of(options):
    """(first conv rule, conv rule, dense rule) the options ask for, written out by hand."""
    if "rule" in options:
        return (options["rule"],) * 3
    conv = {"epsilon_plus": "zplus", "epsilon_alpha2_beta1": "alpha2beta1",
            "epsilon_gamma_box": "gamma"}[options["composite"]]
    first = "zbox" if options["composite"] == "epsilon_gamma_box" else conv
    return first, conv, "epsilon"


@pytest.mark.parametrize("options", RESNETLET_CASES, ids=_case_id)
def test_residual_batchnorm_net_matches_from_scratch_lrp(options, calibrated_resnetlet):
    net = calibrated_resnetlet
    assert net.conv1.bias is not None and net.bn1.running_mean.abs().sum() > 0
    x = images(2, 8, seed=9)
    targets = [[0, 2], [1, 0]]
    maps = create("lrp", net, **options)(x, target=targets)
    first, conv, dense = _rules_of(options)
    kw = dict(eps=options.get("epsilon", 1e-6), gamma=options.get("gamma", 0.25),
              bias=options.get("zplus_bias", False))
    for b in range(2):
        for k in range(2):
            ref = _reference_resnetlet(net, x[b], targets[b][k], conv, dense, first, **kw)
            np.testing.assert_allclose(maps[b, k].numpy(), ref.sum(0), rtol=1e-6,
                                       atol=1e-6 * np.abs(ref).max())


def test_zplus_bias_option_changes_the_map_only_where_biases_are_positive(calibrated_resnetlet):
    """The option must matter (positive folded biases here) and, on a bias-free net, not."""
    net = calibrated_resnetlet
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    plain = create("lrp", net)(x, target=[0, 1])
    biased = create("lrp", net, zplus_bias=True)(x, target=[0, 1])
    assert not torch.allclose(plain, biased, rtol=1e-3)
    model = _conv_net(bias=False)
    torch.testing.assert_close(create("lrp", model, zplus_bias=True)(x, target=[0, 1]),
                               create("lrp", model)(x, target=[0, 1]), rtol=0, atol=1e-12)


# -- LRP-gamma: the generalised rule, and the failure of the classic one ----------------

def _one_layer(rule, layer, x, r):
    """(rule's output, layer's output z, input relevance) of ``layer`` under ``rule`` for
    output relevance ``r``, in the ``g = R / a`` convention: the output gradient is ``r / z``."""
    x = x.clone().requires_grad_(True)
    z = layer(x)
    out = rule(layer, x, z, [])
    (g,) = torch.autograd.grad(out, x, r / z.detach())
    return out.detach(), z.detach(), (x * g).detach()


def test_gamma_is_the_classic_rule_where_inputs_and_outputs_are_positive():
    """Montavon et al. (2019) for ``x >= 0`` and ``z > 0``; on signed inputs and outputs
    the generalised rule (``_ref_gamma``) instead, which the classic one is not."""
    torch.manual_seed(10)
    conv = nn.Conv2d(3, 4, 3).double()
    shape, gamma = (3, 5, 5), 0.5
    with torch.no_grad():  # every output positive for x in [0, 1]
        conv.bias.copy_(conv.weight.abs().sum((1, 2, 3)) + 0.1 * torch.randn(4).abs())
    w, b = _as_matrix(conv, shape)
    for x, positive in ((torch.rand(1, *shape, dtype=torch.float64), True),
                        (torch.randn(1, *shape, dtype=torch.float64), False)):
        if not positive:
            conv.bias.data.normal_()
            w, b = _as_matrix(conv, shape)
        r = torch.randn(1, 4, 3, 3, dtype=torch.float64)
        out, z, rel = _one_layer(Gamma(gamma), conv, x, r)
        assert torch.equal(out, z) and bool((z > 0).all()) == positive
        a, rr = x.reshape(-1).numpy(), r.reshape(-1).numpy()
        c = a[None, :] * (w + gamma * np.maximum(w, 0))  # the overview's Sec. 10.2.2
        classic = (c * (rr / _stab(c.sum(1) + b + gamma * np.maximum(b, 0), 1e-6))[:, None]
                   ).sum(0)
        generalised = _ref_gamma(a, w, b, rr, gamma)
        np.testing.assert_allclose(rel.reshape(-1).numpy(), generalised, rtol=1e-9, atol=1e-12)
        assert np.allclose(generalised, classic, rtol=1e-9, atol=1e-12) == positive


@pytest.mark.parametrize("rule", [Epsilon(0.1), Gamma(0.25), ZPlus(),
                                  AlphaBeta(2.0, 1.0, bias=True), ZBox(-3.0, 3.0)], ids=repr)
def test_rules_keep_the_forward_value_bit_for_bit(rule):
    """A rule changes the backward pass only: its output *is* the layer's output."""
    conv = nn.Conv2d(3, 8, 3)
    x = torch.randn(4, 3, 9, 9)
    out, z, rel = _one_layer(rule, conv, x, torch.randn(4, 8, 7, 7))
    assert torch.equal(out, z) and rel.abs().sum() > 0


@pytest.mark.parametrize("name,size,n", [("resnetlet", 8, 4), ("resnet18", 32, 2)])
def test_gamma_box_relevance_is_on_the_scale_of_the_logit(name, size, n, request):
    """Issue 12: with calibrated BatchNorm the conv-BN output closing a residual branch is
    negative about half the time, the classic gamma rule's denominator crosses zero there,
    and the map summed to 10 to 10^5 times the logit here, with a random sign. The
    generalised rule keeps every ``|d_j| >= |z_j|``: for every image and class the total
    stays within a small factor of the logit (below 3 here; biases absorb or add the rest)."""
    net = request.getfixturevalue(f"calibrated_{name}")
    x = images(n, size, seed=11)
    logits = net(x).detach()
    targets = torch.arange(logits.shape[1]).repeat(n, 1)
    explainer = create("lrp", net, composite="epsilon_gamma_box", low=PIXEL_LOW,
                       high=PIXEL_HIGH)
    ratio = explainer(x, target=targets).sum((2, 3)) / logits
    assert torch.isfinite(ratio).all() and ratio.abs().max() < 5, ratio
