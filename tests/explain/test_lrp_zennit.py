"""LRP against zennit (Anders et al. 2021), rule by rule and composite by composite, on
residual nets whose BatchNorm holds calibrated statistics: the small ResNetlet and
cnnkit's ResNet-18.

cnnkit's conventions, given to zennit: the relevance starts at the logit
(``attr_output=out * one_hot``); zennit's z+ and alpha-beta let the biases in, which is
``zplus_bias=True`` (``zero_params=["bias"]`` on the convolutions for False); cnnkit
splits a residual sum by the plain gradient, so zennit's ``Sum`` gets a negligible
stabiliser; cnnkit's average pool uses the composite's epsilon.
"""

import copy
import sys

import pytest
import torch
import torch.nn.functional as F
from lrp_nets import PIXEL_HIGH, PIXEL_LOW, Add, images
from torch import nn

from cnnkit.explain import create
from cnnkit.models.resnet import BasicBlock

EPS = 0.01  # dense layers and pools (and convolutions under rule="epsilon")
CASES = [dict(rule="epsilon"), dict(rule="gamma", gamma=0.5),
         dict(rule="zplus"), dict(rule="zplus", zplus_bias=True),
         dict(rule="alpha1beta0"), dict(rule="alpha1beta0", zplus_bias=True),
         dict(rule="alpha2beta1"), dict(rule="alpha2beta1", zplus_bias=True),
         dict(composite="epsilon_plus"), dict(composite="epsilon_plus", zplus_bias=True),
         dict(composite="epsilon_gamma_box"),
         dict(composite="epsilon_alpha2_beta1"),
         dict(composite="epsilon_alpha2_beta1", zplus_bias=True)]


class _StackSum(nn.Module):
    """``a + b`` through zennit's ``Sum`` layer, which zennit's composites split by the
    terms' shares (rule ``Norm``)."""

    def __init__(self, sum_layer):
        super().__init__()
        self.sum = sum_layer

    def forward(self, a, b):
        return self.sum(torch.stack([a, b], dim=-1))


class _SumBasicBlock(nn.Module):
    """cnnkit's ``BasicBlock.forward`` (src/cnnkit/models/resnet.py) written out, with
    the residual addition through zennit's ``Sum`` and its own final ReLU module."""

    def __init__(self, block, sum_layer):
        super().__init__()
        self.block, self.add, self.out_relu = block, _StackSum(sum_layer), nn.ReLU()

    def forward(self, x):
        b = self.block
        shortcut = x if b.downsample is None else b.downsample(x)
        out = b.relu(b.bn1(b.conv1(x)))
        out = b.attn(b.bn2(b.conv2(out)))
        return self.out_relu(self.add(out, shortcut))


def _without_bn_eps(net):
    """A copy computing the same function with BatchNorm ``eps = 0`` (moved into the
    running variance): zennit's merged BatchNorm keeps dividing by ``sqrt(1 + eps)``."""
    net = copy.deepcopy(net)
    for bn in net.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_var += bn.eps
            bn.eps = 0.0
    return net


def _zennit_twin(net, sum_type):
    """A copy of ``net`` zennit can explain: residual additions through its ``Sum`` layer,
    no in-place ReLU (zennit's hooks wrap each ReLU's output)."""
    twin = copy.deepcopy(net)
    for parent in list(twin.modules()):
        for name, child in parent.named_children():
            if isinstance(child, BasicBlock):
                setattr(parent, name, _SumBasicBlock(child, sum_type()))
            elif isinstance(child, Add):
                setattr(parent, name, _StackSum(sum_type()))
            elif isinstance(child, nn.ReLU):
                child.inplace = False
    return twin


def _conv_bn_names(net):
    """zennit's ``NamedMergeBatchNorm`` map, by the nets' naming: ``bn1`` follows ``conv1``,
    ``bn_a`` follows ``conv_a``, ``downsample.1`` follows ``downsample.0``."""
    modules = dict(net.named_modules())
    pairs = []
    for name, module in modules.items():
        if isinstance(module, nn.BatchNorm2d):
            head, _, leaf = name.rpartition(".")
            conv = "0" if leaf == "1" else leaf.replace("bn", "conv")
            conv = f"{head}.{conv}" if head else conv
            assert isinstance(modules[conv], nn.Conv2d), (conv, name)
            pairs.append(([conv], name))
    return pairs


def _zennit_composite(zennit, options, canonizers):
    """The zennit composite matching cnnkit's ``options``."""
    zc, zr, zt = zennit.composites, zennit.rules, zennit.types
    zero = None if options.get("zplus_bias") else ["bias"]
    gamma = options.get("gamma", 0.25)
    # prepended to zennit's own layer map, so matched first
    prefix = [(zennit.layer.Sum, zr.Norm(1e-12)), (zt.AvgPool, zr.Norm(EPS))]
    if "composite" in options:
        name = options["composite"]
        if name == "epsilon_gamma_box":
            bound = lambda v: torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1)  # noqa: E731
            return zc.EpsilonGammaBox(bound(PIXEL_LOW), bound(PIXEL_HIGH), epsilon=EPS,
                                      gamma=gamma, layer_map=prefix, canonizers=canonizers)
        # zero_params of the named composite would reach the dense Epsilon too
        conv = {"epsilon_plus": lambda: zr.ZPlus(zero_params=zero),
                "epsilon_alpha2_beta1": lambda: zr.AlphaBeta(2.0, 1.0, zero_params=zero)}
        named = {"epsilon_plus": zc.EpsilonPlus, "epsilon_alpha2_beta1": zc.EpsilonAlpha2Beta1}
        return named[name](epsilon=EPS, layer_map=[*prefix, (zt.Convolution, conv[name]())],
                           canonizers=canonizers)
    rule = {"epsilon": lambda: zr.Epsilon(EPS), "gamma": lambda: zr.Gamma(gamma),
            "zplus": lambda: zr.ZPlus(zero_params=zero),
            "alpha1beta0": lambda: zr.AlphaBeta(1.0, 0.0, zero_params=zero),
            "alpha2beta1": lambda: zr.AlphaBeta(2.0, 1.0, zero_params=zero)}[options["rule"]]
    return zc.LayerMapComposite(
        [(zt.Activation, zr.Pass()), *prefix, (zt.BatchNorm, zr.Pass()),
         (zt.Convolution, rule()), (nn.Linear, rule())], canonizers=canonizers)


def _zennit_relevance(zennit, net, x, target, options):
    """zennit's input relevance [B, C, ...] of ``net`` (already without BatchNorm eps)."""
    twin = _zennit_twin(net, zennit.layer.Sum)
    merge = zennit.canonizers.NamedMergeBatchNorm(_conv_bn_names(twin))
    composite = _zennit_composite(zennit, options, [merge])
    one_hot = F.one_hot(target, net(x).shape[1]).to(x.dtype)
    with zennit.attribution.Gradient(model=twin, composite=composite) as attributor:
        out, rel = attributor(x, lambda logits: logits * one_hot)
    torch.testing.assert_close(out, net(x), rtol=1e-9, atol=1e-9)  # the twin is the net
    return rel


def _case_id(options):
    return "-".join(str(v) for v in options.values())


@pytest.mark.parametrize("name,size", [("resnetlet", 8), ("resnet18", 32)])
@pytest.mark.parametrize("options", CASES, ids=_case_id)
def test_matches_zennit_on_calibrated_residual_nets(zennit, name, size, options, request):
    """cnnkit's LRP equals zennit's to float64 precision."""
    net = _without_bn_eps(request.getfixturevalue(f"calibrated_{name}"))
    x = images(2, size, seed=12)
    logits = net(x).detach()
    target = logits.argmax(1)
    rel = _zennit_relevance(zennit, net, x, target, options)
    box = options.get("composite") == "epsilon_gamma_box"
    kw = dict(low=PIXEL_LOW, high=PIXEL_HIGH) if box else {}
    maps = create("lrp", net, epsilon=EPS, **options, **kw)(x, target=target)
    assert rel.abs().sum() > 0
    torch.testing.assert_close(maps, rel.sum(1), rtol=1e-6, atol=1e-6 * rel.abs().max().item())
    if box:  # issue 12: 10^2 to 10^5 before
        ratio = maps.sum((1, 2)) / logits.gather(1, target[:, None])[:, 0]
        assert ratio.abs().max() < 5, ratio


def test_the_torchvision_stand_in_does_not_outlive_the_zennit_import(zennit):
    """The placeholder torchvision (conftest) is only seen by zennit's import: no other
    test may take it for the real package."""
    torchvision = sys.modules.get("torchvision")
    assert torchvision is None or hasattr(torchvision, "__version__")
    assert zennit.torchvision.ResNetBasicBlock.__module__ == "torchvision.models.resnet"
