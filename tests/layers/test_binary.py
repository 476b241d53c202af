"""Binary-weight and XNOR convolutions: optimal scales, straight-through gradients, explicit
references and short training runs on digits."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.data import load_data
from cnnkit.layers.binary import (
    BinaryWeightConv2d,
    XNORConv2d,
    binarize,
    binarize_weight,
    sign_ste,
)
from cnnkit.models import create_model


def test_binary_weights_and_optimal_alpha():
    w = torch.tensor([[[[0.5, -1.5], [2.0, -0.2]]], [[[-0.1, 0.3], [0.0, -0.4]]]])
    b = binarize_weight(w)
    alphas = torch.tensor([4.2 / 4, 0.8 / 4])
    signs = torch.where(w >= 0, 1.0, -1.0)  # sign(0) = +1: B is binary
    torch.testing.assert_close(b, signs * alphas.view(2, 1, 1, 1))
    # alpha = mean|W| minimises ||W - alpha sign(W)||^2: a brute-force scan agrees
    scan = torch.linspace(0, 2, 20001)
    for i in range(2):
        err = (w[i].flatten()[None] - scan[:, None] * signs[i].flatten()[None]) ** 2
        best = scan[err.sum(1).argmin()]
        assert abs(best.item() - alphas[i].item()) <= 1e-4


def test_sign_ste_gradient():
    x = torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.2, 1.0, 1.01, 4.0], requires_grad=True)
    y = sign_ste(x)
    assert y.tolist() == [-1, -1, -1, 0, 1, 1, 1, 1]
    assert sign_ste(x, 1.0).tolist() == [-1, -1, -1, 1, 1, 1, 1, 1]
    g = torch.arange(1.0, 9.0)
    y.backward(g)
    torch.testing.assert_close(x.grad, g * torch.tensor([0, 1, 1, 1, 1, 1, 0, 0.0]))


def test_binary_weight_conv_matches_explicit_reference():
    conv = BinaryWeightConv2d(3, 5, 3, padding=1, stride=2)
    x = torch.randn(2, 3, 9, 9)
    conv.weight.data[0, 0, 0, 0] = 0.0  # sign(0) = +1 for weights
    signs = torch.where(conv.weight >= 0, 1.0, -1.0)
    wb = signs * conv.weight.abs().mean(dim=(1, 2, 3)).view(5, 1, 1, 1)
    ref = F.conv2d(x, wb, conv.bias, stride=2, padding=1)
    torch.testing.assert_close(conv(x), ref)


@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 0, 1), (1, 2, 2)])
def test_xnor_conv_matches_explicit_reference(stride, padding, dilation):
    conv = XNORConv2d(4, 6, 3, stride=stride, padding=padding, dilation=dilation)
    x = torch.randn(2, 4, 10, 10)
    out = conv(x)
    wb = torch.sign(conv.weight) * conv.weight.abs().mean(dim=(1, 2, 3)).view(6, 1, 1, 1)
    core = F.conv2d(torch.sign(x), wb, None, stride, padding, dilation)
    # K by a loop over output positions: the mean of |x| over channels and over the
    # (dilated, zero-padded) receptive field of that output position
    a = F.pad(x.abs().mean(1), (padding,) * 4)
    k = torch.empty(2, 1, *core.shape[2:])
    for i in range(core.shape[2]):
        for j in range(core.shape[3]):
            r = a[:, i * stride:i * stride + 2 * dilation + 1:dilation,
                  j * stride:j * stride + 2 * dilation + 1:dilation]
            k[:, 0, i, j] = r.mean(dim=(1, 2))
    torch.testing.assert_close(out, core * k + conv.bias.view(1, -1, 1, 1))
    mean_conv = XNORConv2d(4, 6, 3, stride=stride, padding=padding, dilation=dilation,
                           input_scale="mean")
    mean_conv.load_state_dict(conv.state_dict())
    torch.testing.assert_close(mean_conv(x), core * x.abs().mean(dim=(1, 2, 3)).view(2, 1, 1, 1)
                               + conv.bias.view(1, -1, 1, 1))


def test_binarize_keeps_first_conv_classifier_and_names():
    model = create_model("tinyvgg", in_chans=1, img_size=8)
    net = binarize(model, mode="xnor")
    kinds = {n: type(m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d)}
    assert kinds == {"features.conv_1_1": nn.Conv2d, "features.conv_1_2": XNORConv2d,
                     "features.conv_2_1": XNORConv2d, "features.conv_2_2": XNORConv2d}
    assert all(type(m) is nn.Conv2d for m in model.modules() if isinstance(m, nn.Conv2d))
    net.load_state_dict(model.state_dict())  # strict: same keys and shapes
    assert net(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    all_bin = binarize(model, mode="bwn", skip_first_last=False)
    assert type(all_bin.features.conv_1_1) is BinaryWeightConv2d
    # a 1x1-conv classifier is kept real-valued
    head = _ConvHead(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 2, 1))
    assert [type(m) for m in binarize(head)] == [nn.Conv2d, BinaryWeightConv2d, nn.Conv2d]


class _ConvHead(nn.Sequential):
    def get_classifier(self) -> nn.Module:
        return self[2]


def test_binarize_errors():
    with pytest.raises(ValueError, match="choose one of"):
        binarize(nn.Conv2d(1, 1, 1), mode="ternary")
    with pytest.raises(ValueError, match="input_scale"):
        XNORConv2d(1, 1, 1, input_scale="median")


def _bn_first_net() -> nn.Module:
    """XNOR-Net's block order: BN -> binary activation (in the conv) -> binary conv -> pool."""
    return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.BatchNorm2d(32), nn.Conv2d(32, 64, 3, padding=1), nn.MaxPool2d(2),
                         nn.BatchNorm2d(64), nn.Conv2d(64, 64, 3, padding=1), nn.MaxPool2d(2),
                         nn.Flatten(), nn.BatchNorm1d(256), nn.Linear(256, 10))


# measured test accuracy (50 Adam steps, 297 held-out digits, seeds 0-2; chance is 0.10):
# lenet5 bwn 0.86-0.91, xnor 0.76-0.77; tinyvgg_wide(width 32) bwn 0.88-0.95 (real-valued
# 0.95-0.97; as XNOR it stays at 0.09-0.12, see XNORConv2d); BN-first xnor 0.96-0.98 (real 0.98)
@pytest.mark.parametrize("build,mode", [
    (lambda: create_model("lenet5", in_chans=1, img_size=8), "bwn"),
    (lambda: create_model("lenet5", in_chans=1, img_size=8), "xnor"),
    (lambda: create_model("tinyvgg_wide", in_chans=1, img_size=8, width=32), "bwn"),
    (_bn_first_net, "xnor"),
], ids=["lenet5-bwn", "lenet5-xnor", "tinyvgg_wide-bwn", "bn_first-xnor"])
def test_binarized_network_trains_on_digits(build, mode):
    data = load_data("digits")
    x = (data.images.float() / 255 - 0.5) / 0.5
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    train, test = perm[:1500], perm[1500:]
    model = binarize(build(), mode=mode)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    losses = []
    for _ in range(50):
        idx = train[torch.randint(0, len(train), (64,), generator=g)]
        loss = F.cross_entropy(model(x[idx]), data.labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        acc = (model(x[test]).argmax(1) == data.labels[test]).float().mean().item()
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert acc > 0.6


def test_xnor_conv_gradients_match_clamp_reference():
    """Backward through the whole layer equals an independent straight-through formulation:
    ``sign(x).detach() + hardtanh(x) - hardtanh(x).detach()`` (Hubara et al.'s htanh STE)."""
    conv = XNORConv2d(3, 4, 3, padding=1)
    x = (2 * torch.randn(2, 3, 6, 6)).requires_grad_()
    g = torch.randn(2, 4, 6, 6)
    (conv(x) * g).sum().backward()

    def ste(t, zero):
        hard = F.hardtanh(t)
        return torch.where(t == 0, zero, torch.sign(t)).detach() + hard - hard.detach()

    w = conv.weight.detach().clone().requires_grad_()
    xr = x.detach().clone().requires_grad_()
    wb = ste(w, 1.0) * w.abs().mean(dim=(1, 2, 3), keepdim=True)
    k = F.avg_pool2d(xr.abs().mean(1, keepdim=True), 3, 1, 1, count_include_pad=True)
    ((F.conv2d(ste(xr, 0.0), wb, padding=1) * k + conv.bias.view(1, -1, 1, 1)) * g).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(conv.weight.grad, w.grad)
    assert (x.grad[x.abs() > 1] != 0).any()  # |x| > 1 still gets gradient through K


def test_binary_model_trains_through_the_trainer(tmp_path):
    # `cnnkit train --model-opt binary=bwn`: the trainer builds, trains, saves and reloads
    # the binary network like any other model.
    from cnnkit.training import load_run, train

    result = train(model="lenet5", data="digits", epochs=3, batch_size=32, optimizer="adamw",
                   lr=1e-2, model_kwargs={"binary": "bwn"}, runs_dir=str(tmp_path),
                   name="bwn", progress=False)
    run = load_run(tmp_path / "bwn")
    assert sum(isinstance(m, BinaryWeightConv2d) for m in run.model.modules()) == 1
    assert result["test_accuracy"] > 0.6  # chance is 0.1


@pytest.mark.parametrize("mode", ["bwn", "xnor"])
def test_1d_and_3d_networks_binarize_the_layers_2d_does(mode):
    from cnnkit.layers.binary import BinaryWeightConv1d, BinaryWeightConv3d, XNORConv1d, XNORConv3d

    kinds = {"bwn": (BinaryWeightConv1d, BinaryWeightConv2d, BinaryWeightConv3d),
             "xnor": (XNORConv1d, XNORConv2d, XNORConv3d)}[mode]
    names = []
    for size, kind in zip(((1, 32), (1, 16, 16), (1, 8, 8, 8)), kinds, strict=True):
        model = binarize(create_model("resnet18", num_classes=3, input_size=size), mode=mode)
        names.append(sorted(n for n, m in model.named_modules() if isinstance(m, kind)))
        assert model(torch.randn(2, *size)).shape == (2, 3)
    assert names[0] == names[1] == names[2] and len(names[1]) == 19  # the stem stays real


def test_binary_conv3d_equals_a_conv_with_binarised_weights():
    from cnnkit.layers.binary import BinaryWeightConv3d

    torch.manual_seed(0)
    layer = BinaryWeightConv3d(2, 3, 3, padding=1)
    x = torch.randn(1, 2, 5, 5, 5)
    w = layer.weight.detach()
    alpha = w.abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    ref = F.conv3d(x, torch.where(w >= 0, 1.0, -1.0) * alpha, layer.bias, padding=1)
    torch.testing.assert_close(layer(x), ref)


def test_an_operator_the_registry_does_not_know_is_refused(unknown_layer):
    Scale = unknown_layer
    with pytest.raises(ValueError, match="Scale"):
        binarize(nn.Sequential(nn.Conv2d(1, 2, 3), Scale(), nn.Conv2d(2, 2, 3)))
