"""Guided backpropagation, DeconvNet and occlusion."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.explain import create
from cnnkit.explain.gradient import input_gradients
from cnnkit.explain.guided import modified_gradients, modified_relus
from cnnkit.models import create_model

METHODS = {
    "guided_backprop": {},
    "deconvnet": {},
    "occlusion": dict(window=5, stride=3, internal_batch_size=7),
}


def _no_hooks(model):
    return all(not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                    or m._backward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("name", list(METHODS))
def test_shapes_multi_target_and_state_restored(name):
    model = create_model("tinyvgg", num_classes=5, img_size=16).double()
    model.train()
    model.fc.weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    modules = list(model.named_modules())
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    explainer = create(name, model, **METHODS[name])
    targets = torch.tensor([[1, 0, 3], [4, 4, 2]])
    many = explainer(x, target=targets)
    assert many.shape == (2, 3, 16, 16)
    assert torch.isfinite(many).all() and many.abs().sum() > 0
    for k in range(3):  # each of the K maps equals a single-target call
        one = explainer(x, target=targets[:, k])
        assert one.shape == (2, 16, 16)
        torch.testing.assert_close(many[:, k], one)
    assert _no_hooks(model)
    assert all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags
    after = list(model.named_modules())
    assert [n for n, _ in after] == [n for n, _ in modules]
    assert all(a is b for (_, a), (_, b) in zip(after, modules, strict=True))


# -- guided backprop and DeconvNet against a hand-written chain rule -------------------

def _tiny_net():
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(inplace=True), nn.Flatten(),
        nn.Linear(3 * 4 * 4, 6), nn.ReLU(), nn.Linear(6, 4),
    ).double().eval()


def _manual_gradient(net, x, target, rule):
    """d logit / d x by the chain rule written out, with a ReLU backward rule:
    plain ``(z > 0) g``, guided ``(z > 0) (g > 0) g``, deconvnet ``(g > 0) g``."""

    def relu_back(z, g):
        if rule == "plain":
            return (z > 0) * g
        if rule == "guided":
            return (z > 0) * (g > 0) * g
        return (g > 0) * g

    conv, lin1, lin2 = net[0], net[3], net[5]
    z1 = conv(x)
    z2 = lin1(z1.clamp(min=0).flatten(1))
    g = lin2.weight[target].expand(x.shape[0], -1)  # d logit / d relu2-output
    g = relu_back(z2, g) @ lin1.weight  # through relu2 and lin1
    g = relu_back(z1, g.view_as(z1))  # through relu1
    return F.conv_transpose2d(g, conv.weight, padding=1)  # through the convolution


@pytest.mark.parametrize("rule", ["guided", "deconvnet"])
def test_modified_backward_matches_manual_chain_rule(rule):
    net = _tiny_net()
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        ref = {k: torch.stack([_manual_gradient(net, x, t, k) for t in (0, 2)], 1)
               for k in ("plain", rule)}
    targets = torch.tensor([[0, 2]] * 3)
    # the reference's plain rule is autograd's, so the reference itself is right
    torch.testing.assert_close(input_gradients(net, x, targets), ref["plain"])
    got = modified_gradients(net, x, targets, rule)
    torch.testing.assert_close(got, ref[rule])
    assert not torch.allclose(got, ref["plain"])  # the test tells the rules apart
    name = "guided_backprop" if rule == "guided" else "deconvnet"
    maps = create(name, net, abs=False, reduce="sum")(x, targets)
    torch.testing.assert_close(maps, ref[rule].sum(2))
    torch.testing.assert_close(create(name, net)(x, targets), ref[rule].abs().amax(2))


def test_relus_are_restored_with_plain_gradients():
    net = _tiny_net()
    relus = [net[1], net[4]]
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    targets = torch.tensor([[1], [3]])
    before = input_gradients(net, x, targets)
    create("guided_backprop", net)(x, targets)
    assert net[1] is relus[0] and net[4] is relus[1]
    torch.testing.assert_close(input_gradients(net, x, targets), before, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="boom"), modified_relus(net, "guided") as n:
        assert n == 2 and not isinstance(net[1], nn.ReLU)
        raise RuntimeError("boom")
    assert net[1] is relus[0] and net[4] is relus[1]


def test_relu6_and_shared_relus_are_replaced():
    shared = nn.ReLU()
    net = nn.Sequential(nn.Linear(3, 3), shared, nn.Linear(3, 3), shared, nn.ReLU6())
    with modified_relus(net, "deconvnet") as n:
        assert n == 3
        assert not any(isinstance(m, (nn.ReLU, nn.ReLU6)) for m in net)
    assert net[1] is shared and net[3] is shared and isinstance(net[4], nn.ReLU6)
    # guided ReLU6 passes gradient only where 0 < z < 6, and only positive gradient
    z = torch.tensor([[-1.0, 3.0, 7.0, 2.0]], requires_grad=True)
    seq = nn.Sequential(nn.ReLU6())
    with modified_relus(seq, "guided"):
        out = seq(z)
        (g,) = torch.autograd.grad(out, z, torch.tensor([[1.0, 1.0, 1.0, -1.0]]))
    assert out.tolist() == [[0.0, 3.0, 6.0, 2.0]]
    assert g.tolist() == [[0.0, 1.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="choose from"):
        with modified_relus(net, "lrp"):
            pass


# -- occlusion -------------------------------------------------------------------------

class _RegionSum(nn.Module):
    """Class k's score is the sum of the pixels (all channels) inside box k."""

    boxes = ((2, 5, 3, 7), (8, 10, 0, 2))  # (row0, row1, col0, col1), exclusive ends

    def forward(self, x):
        return torch.stack([x[:, :, r0:r1, c0:c1].sum((1, 2, 3))
                            for r0, r1, c0, c1 in self.boxes], 1)


def test_occlusion_equals_hand_computation_on_a_region_sum_model():
    torch.manual_seed(0)
    x = torch.rand(2, 2, 10, 11, dtype=torch.float64) + 0.5
    baseline = 0.25
    maps = create("occlusion", _RegionSum(), window=3, stride=2, baseline=baseline,
                  internal_batch_size=4)(x, [[0, 1], [1, 0]])
    rows, cols = [0, 2, 4, 6, 7], [0, 2, 4, 6, 8]  # stride 2, plus the flush last window
    for b, classes in enumerate([[0, 1], [1, 0]]):
        for k, cls in enumerate(classes):
            r0, r1, c0, c1 = _RegionSum.boxes[cls]
            inside = torch.zeros(10, 11, dtype=torch.bool)
            inside[r0:r1, c0:c1] = True
            total = torch.zeros(10, 11, dtype=torch.float64)
            count = torch.zeros(10, 11, dtype=torch.float64)
            touched = torch.zeros(10, 11, dtype=torch.bool)
            for i in rows:
                for j in cols:
                    win = torch.zeros(10, 11, dtype=torch.bool)
                    win[i:i + 3, j:j + 3] = True
                    drop = float(((x[b] - baseline) * (win & inside)).sum())
                    total[win] += drop
                    count[win] += 1
                    if (win & inside).any():
                        touched |= win
            assert (count > 0).all()
            torch.testing.assert_close(maps[b, k], total / count)
            assert ((maps[b, k] != 0) == touched).all()
            assert 0 < touched.sum() < 110


def test_occlusion_window_and_chunking():
    model = create_model("tinyvgg", num_classes=4, img_size=8).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    a = create("occlusion", model, window=(2, 3), stride=(2, 1), internal_batch_size=5)(x, 1)
    b = create("occlusion", model, window=(2, 3), stride=(2, 1), internal_batch_size=999)(x, 1)
    torch.testing.assert_close(a, b)
    # one window covering the whole image: every pixel gets S(x) - S(baseline image)
    whole = create("occlusion", model, window=50, baseline=0.5)(x, 2)
    with torch.no_grad():
        drop = model(x)[:, 2] - model(torch.full_like(x, 0.5))[:, 2]
    torch.testing.assert_close(whole, drop.view(2, 1, 1).expand(2, 8, 8))
    with pytest.raises(ValueError, match="window must be positive"):
        create("occlusion", model, window=0)
