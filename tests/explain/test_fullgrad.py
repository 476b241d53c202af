"""FullGrad: completeness of the full-gradient decomposition, the map, the contract."""

import pytest
import torch
from torch import nn

from cnnkit.explain import create
from cnnkit.explain.fullgrad import full_gradients, layer_bias
from cnnkit.models import create_model


def randomise_bn(model):
    # Non-trivial running statistics and affine parameters: BN's implicit bias is non-zero.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    return model


def small_cnn():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(6 * 4 * 4, 8), nn.ReLU(), nn.Linear(8, 5))


def check_completeness(model, x, targets):
    gx, terms = full_gradients(model, x, targets)
    total = (gx * x[:, None]).flatten(2).sum(2) + sum(t.flatten(2).sum(2) for t in terms)
    with torch.no_grad():
        logits = model(x).gather(1, targets)
    assert torch.allclose(total, logits, atol=1e-5, rtol=0)
    # the bias terms matter: the input-gradient term alone is not the logit
    assert (total - (gx * x[:, None]).flatten(2).sum(2)).abs().max() > 1e-2
    return terms


def test_completeness_small_cnn_with_batchnorm():
    torch.manual_seed(0)
    model = randomise_bn(small_cnn()).double().eval()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    terms = check_completeness(model, x, torch.tensor([[0, 4], [2, 2], [1, 3]]))
    assert len(terms) == 6  # 2 conv + 2 BN + 2 linear


def test_completeness_resnet18():
    torch.manual_seed(0)
    model = randomise_bn(create_model("resnet18", num_classes=5, img_size=16)).double().eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    terms = check_completeness(model, x, torch.tensor([[1, 3], [0, 4]]))
    assert len(terms) == 20 + 1  # every BatchNorm (bias-free convs) and fc


def test_bn_implicit_bias_and_train_mode():
    bn = randomise_bn(nn.Sequential(nn.BatchNorm2d(3))).eval()[0]
    z = torch.randn(2, 3, 4, 4)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    # BN(z) = scale * z + implicit bias
    assert torch.allclose(bn(z), scale.view(1, 3, 1, 1) * z + layer_bias(bn).view(1, 3, 1, 1),
                          atol=1e-6)
    bn.train()
    with pytest.raises(ValueError, match="eval mode"):
        layer_bias(bn)


def test_map_of_bias_free_net_is_normalised_gradient_x_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3, bias=False))
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    model.double()
    xi = x.clone().requires_grad_(True)
    model(xi)[:, 1].sum().backward()
    gxi = (xi.grad * x).abs()
    lo = gxi.flatten(1).amin(1).view(2, 1, 1, 1)
    hi = (gxi - lo).flatten(1).amax(1).view(2, 1, 1, 1)
    ref = ((gxi - lo) / (hi + 1e-6)).sum(1)
    out = create("fullgrad", model)(x, 1)
    assert torch.allclose(out, ref, atol=1e-12)


def psi(t):
    """The authors' post-processing: |t|, min-max rescaled per image over [C, h, w]."""
    t = t.abs()
    t = t - t.flatten(1).amin(1).view(-1, 1, 1, 1)
    return t / (t.flatten(1).amax(1).view(-1, 1, 1, 1) + 1e-6)


def test_map_matches_per_layer_reference():
    torch.manual_seed(0)
    model = randomise_bn(small_cnn()).double().eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    spatial = [model[0], model[1], model[4], model[5]]
    outs = []
    # own hooks; the clone keeps BN's output from being overwritten by the in-place ReLU
    handles = [m.register_forward_hook(lambda m, i, o: outs.append(o) or o.clone())
               for m in spatial]
    try:
        xi = x.clone().requires_grad_(True)
        score = model(xi)[:, 2].sum()
    finally:
        for h in handles:
            h.remove()
    grads = torch.autograd.grad(score, [xi, *outs])
    ref = psi(grads[0] * x).sum(1)
    for m, g in zip(spatial, grads[1:], strict=True):
        if isinstance(m, nn.Conv2d):
            b = m.bias
        else:
            b = m.bias - m.weight * m.running_mean / torch.sqrt(m.running_var + m.eps)
        term = psi(g * b.detach().view(1, -1, 1, 1)).sum(1, keepdim=True)
        ref = ref + torch.nn.functional.interpolate(term, size=(16, 16), mode="bilinear",
                                                    align_corners=True)[:, 0]
    out = create("fullgrad", model)(x, 2)
    assert torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-5)
    # the bias-gradient maps contribute: the map is not psi(grad x input) alone
    assert (ref - psi(grads[0] * x).sum(1)).amin() > 0.1


def test_contract_one_forward_one_backward():
    torch.manual_seed(0)
    model = randomise_bn(small_cnn())
    calls = []
    model.register_forward_pre_hook(lambda m, i: calls.append(1))
    hooks_before = dict(model._forward_pre_hooks)
    model.train()
    model[0].weight.requires_grad_(False)
    x = torch.randn(2, 3, 16, 16)
    multi = create("fullgrad", model)(x, [[0, 3], [4, 1]])
    assert len(calls) == 1  # given targets: one forward for all K targets, no extra one
    assert multi.shape == (2, 2, 16, 16)
    single = create("fullgrad", model)(x, [3, 1])
    assert single.shape == (2, 16, 16) and torch.allclose(single, multi[:, 1], atol=1e-5)
    assert all(m.training for m in model.modules())
    assert not model[0].weight.requires_grad and model[0].bias.requires_grad
    assert dict(model._forward_pre_hooks) == hooks_before
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
