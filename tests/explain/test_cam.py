"""CAM family: Grad-CAM, Grad-CAM++, Smooth Grad-CAM++, Layer-CAM, CAM, Score-CAM."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.explain import create
from cnnkit.models import create_model

TARGETS = [[0, 4], [3, 1]]


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=5, img_size=16).double().eval()
    # Non-trivial BatchNorm statistics, so the network is not just its conv weights.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def x():
    torch.manual_seed(1)
    return torch.randn(2, 3, 16, 16, dtype=torch.float64)


def reference_layer_grads(model, layer, x, targets):
    """From scratch: own hook, own per-target autograd.grad calls (no explain internals)."""
    store = {}
    handle = layer.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    try:
        xi = x.clone().requires_grad_(True)
        logits = model(xi)
    finally:
        handle.remove()
    a = store["a"]
    t = torch.as_tensor(targets)
    grads = [torch.autograd.grad(logits[torch.arange(len(x)), t[:, k]].sum(), a,
                                 retain_graph=True)[0] for k in range(t.shape[1])]
    return a.detach(), torch.stack(grads, 1)  # [B, C, h, w], [B, K, C, h, w]


def up(maps, size=16):
    return F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)


def close(out, ref):
    """``out`` (the public call's upsampled map) equals ``ref`` at the layer's resolution.

    The base class upsamples in float32, so the float64 reference is compared at float32
    precision.
    """
    ref = up(ref)
    return torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))


def check_contract(name, model, x, layer=None, atol=1e-6, **opts):
    """Shapes, K targets == K single calls, no hooks left, caller's flags restored."""
    model.train()
    frozen = list(model.parameters())[:2]
    for p in frozen:
        p.requires_grad_(False)
    try:
        ex = create(name, model, layer=layer, **opts)
        b, k = x.shape[0], 2
        targets = torch.tensor([[0, 2], [1, 0]])[:b]
        multi = ex(x, targets)
        assert multi.shape == (b, k, *x.shape[-2:])
        for j in range(k):
            single = ex(x, targets[:, j])
            assert single.shape == (b, *x.shape[-2:])
            assert torch.allclose(multi[:, j], single, atol=atol)
        assert torch.isfinite(multi).all()
        assert all(m.training for m in model.modules())
        assert all(not p.requires_grad for p in frozen)
        assert all(p.requires_grad for p in list(model.parameters())[2:])
        assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.eval()
    return multi


@pytest.mark.parametrize("name,opts", [
    ("gradcam", {}), ("gradcam++", {}), ("layercam", {}), ("cam", {}),
    ("smoothgradcam++", {"n_samples": 3}), ("scorecam", {"batch_size": 7}),
])
def test_contract(name, opts):
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=3, img_size=16) if name == "cam" else \
        create_model("tinyvgg", num_classes=3, img_size=16)
    check_contract(name, model, torch.rand(2, 3, 16, 16), atol=1e-5, **opts)


@pytest.mark.parametrize("layer", ["layer4", "layer3"])
def test_gradcam_matches_autograd(resnet, x, layer):
    a, g = reference_layer_grads(resnet, resnet.get_submodule(layer), x, TARGETS)
    ref = torch.relu((g.mean((3, 4), keepdim=True) * a[:, None]).sum(2))
    out = create("gradcam", resnet, layer=layer)(x, TARGETS)
    assert close(out, ref)
    assert out.amax() > 0  # a non-trivial map


def test_gradcampp_and_layercam_match_formulas(resnet, x):
    layer = resnet.layer3  # inside the network: gradients vary over space and have zeros
    a, g = reference_layer_grads(resnet, layer, x, TARGETS)
    a5 = a[:, None]
    alpha = g**2 / (2 * g**2 + a5.sum((3, 4), keepdim=True) * g**3)
    alpha = torch.nan_to_num(alpha, nan=0.0)  # 0/0 where the gradient vanishes
    w = (alpha * torch.relu(g)).sum((3, 4), keepdim=True)
    ref_pp = torch.relu((w * a5).sum(2))
    assert close(create("gradcam++", resnet, layer="layer3")(x, TARGETS), ref_pp)
    ref_lc = torch.relu((torch.relu(g) * a5).sum(2))
    assert close(create("layercam", resnet, layer=layer)(x, TARGETS), ref_lc)
    assert g.std((3, 4)).amin() > 0  # gradients vary over space: alpha is not constant
    assert ref_pp.amax() > 0 and ref_lc.amax() > 0


def test_smooth_gradcampp(resnet, x):
    pp = create("gradcam++", resnet, layer="layer3")(x, TARGETS)
    # no noise: the average of identical copies is Grad-CAM++ itself
    quiet = create("smoothgradcam++", resnet, layer="layer3", n_samples=3, noise=0.0,
                   internal_batch_size=4)(x, TARGETS)
    assert torch.allclose(quiet, pp, atol=1e-10)
    # with noise: the averaged derivatives and activations of the same noisy copies
    n, noise = 2, 0.2
    eps = torch.randn((2, n, 3, 16, 16), generator=torch.Generator().manual_seed(5),
                      dtype=x.dtype)
    rng = x.flatten(1).amax(1) - x.flatten(1).amin(1)
    noisy = x[:, None] + eps * noise * rng.view(2, 1, 1, 1, 1)
    parts = [reference_layer_grads(resnet, resnet.layer3, noisy[:, i], TARGETS)
             for i in range(n)]
    a = torch.stack([p[0] for p in parts]).mean(0)[:, None]
    d1, d2, d3 = (torch.stack([p[1] ** e for p in parts]).mean(0) for e in (1, 2, 3))
    keep = [3, 17, 40, 41, 200]
    a, d1, d2, d3 = (t[:, :, keep] for t in (a, d1, d2, d3))
    alpha = torch.nan_to_num(d2 / (2 * d2 + a.sum((3, 4), keepdim=True) * d3), nan=0.0)
    ref = torch.relu(((alpha * torch.relu(d1)).sum((3, 4), keepdim=True) * a).sum(2))
    out = create("smoothgradcam++", resnet, layer="layer3", n_samples=n, noise=noise, seed=5,
                 channels=keep, internal_batch_size=4)(x, TARGETS)
    assert close(out, ref) and ref.amax() > 0
    with pytest.raises(ValueError, match="out of range"):
        create("smoothgradcam++", resnet, n_samples=1, channels=[512])(x)


def test_cam_is_gradcam_times_hw_for_gap_nets(resnet, x):
    cam, gc = create("cam", resnet), create("gradcam", resnet)
    t = torch.tensor(TARGETS)
    with torch.no_grad():
        m_cam = cam.attribute(x, t)  # at layer resolution: the ReLU does not commute
    m_gc = gc.attribute(x, t)
    h, w = m_cam.shape[-2:]
    assert (h, w) == (2, 2) and (m_cam < 0).any() and (m_cam > 0).any()
    # Grad-CAM's weights are w_c / (h w) under global average pooling
    assert torch.allclose(m_gc * (h * w), m_cam.clamp_min(0), atol=1e-10)
    # and CAM itself: fc weights on the features, computed by hand
    feats = resnet.forward_features(x).detach()
    ref = torch.einsum("bkc,bchw->bkhw", resnet.fc.weight[t].detach(), feats)
    assert close(create("cam", resnet)(x, TARGETS), ref)


def test_cam_rejects_other_heads(x):
    with pytest.raises(ValueError, match="global average pooling"):
        create("cam", create_model("tinyvgg", num_classes=3, img_size=16))(torch.rand(1, 3, 16, 16))
    model = create_model("resnet18", num_classes=3, img_size=16)
    model.avgpool = nn.AdaptiveMaxPool2d(1)  # a GMP head: linear, but not of the mean
    with pytest.raises(ValueError, match="not global average pooling"):
        create("cam", model)(x.float())
    with pytest.raises(ValueError, match="forward_features"):
        create("cam", nn.Sequential(nn.Conv2d(3, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                   nn.Linear(2, 2)))(x.float())


class Quadrants(nn.Module):
    """Channel k = the image's first channel inside quadrant k, zero elsewhere."""

    def forward(self, x):
        masks = torch.zeros(4, *x.shape[-2:], dtype=x.dtype)
        h, w = x.shape[-2] // 2, x.shape[-1] // 2
        masks[0, :h, :w] = masks[1, :h, w:] = masks[2, h:, :w] = masks[3, h:, w:] = 1
        return x[:, :1] * masks


class RegionScore(nn.Module):
    """Logit 0 = 10 x the mean of the top-left quadrant, logit 1 = bottom-right's."""

    def __init__(self):
        super().__init__()
        self.quadrants = Quadrants()
        self.cam_layer = "quadrants"

    def forward(self, x):
        self.quadrants(x)  # the explained layer; the score reads the input directly
        return 10 * torch.stack([x[:, 0, :8, :8].mean((1, 2)), x[:, 0, 8:, 8:].mean((1, 2))], 1)


def test_scorecam_weights_and_localisation():
    torch.manual_seed(0)
    model = RegionScore()
    x = torch.rand(2, 1, 16, 16, dtype=torch.float64) + 0.1
    ex = create("scorecam", model, batch_size=3)
    targets = torch.tensor([[0, 1], [1, 0]])
    _, weights = ex.channel_weights(x, targets)
    assert weights.shape == (2, 2, 4)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 2, dtype=torch.float64))
    # analytic: mask k = A_k / max(A_k); only the target's own quadrant raises its score
    q0, q3 = x[:, 0, :8, :8].flatten(1), x[:, 0, 8:, 8:].flatten(1)
    s0 = 10 * (q0**2).mean(1) / q0.amax(1)
    s3 = 10 * (q3**2).mean(1) / q3.amax(1)
    zeros = torch.zeros_like(s0)
    assert torch.allclose(weights[0, 0], torch.stack([s0[0], zeros[0], zeros[0], zeros[0]])
                          .softmax(0))
    assert torch.allclose(weights[0, 1], torch.stack([zeros[0], zeros[0], zeros[0], s3[0]])
                          .softmax(0))
    maps = ex(x, targets)
    for b in range(2):
        for k in range(2):
            quad = 0 if targets[b, k] == 0 else 3
            peak = int(maps[b, k].argmax())
            i, j = divmod(peak, 16)
            assert (i >= 8) * 2 + (j >= 8) == quad
