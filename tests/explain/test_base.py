"""The explainer base: targets, layers, state restoration, batched gradients."""

import pytest
import torch
from torch import nn

from cnnkit.explain import create
from cnnkit.explain._base import Explainer, resolve_layer, resolve_targets
from cnnkit.models import create_model


def test_targets_resolution():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]])
    t, multi = resolve_targets(None, logits)
    assert t.tolist() == [[1], [0]] and not multi
    assert resolve_targets(2, logits)[0].tolist() == [[2], [2]]
    assert resolve_targets([2, 1], logits)[0].tolist() == [[2], [1]]
    t, multi = resolve_targets([[0, 2], [1, 1]], logits)
    assert t.tolist() == [[0, 2], [1, 1]] and multi
    with pytest.raises(ValueError, match="3 entries for 2 images"):
        resolve_targets([0, 1, 2], logits)
    with pytest.raises(ValueError, match=r"classes must be in 0\.\.2"):
        resolve_targets(3, logits)


def test_layer_resolution_and_unknown_names():
    model = create_model("tinyvgg", num_classes=3, img_size=16)
    assert resolve_layer(model, None) is model.get_submodule(model.cam_layer)
    assert resolve_layer(model, "features.conv_1_1") is model.features.conv_1_1
    with pytest.raises(ValueError, match="has no layer 'features.conv_1_3'; did you mean"):
        resolve_layer(model, "features.conv_1_3")
    with pytest.raises(ValueError, match="declares no cam_layer"):
        resolve_layer(nn.Sequential(nn.Conv2d(1, 1, 1)), None)
    with pytest.raises(ValueError, match="unknown explanation method 'gradkam'"):
        create("gradkam", model)


class _InputGrad(Explainer):
    """A minimal explainer for testing the base: the input gradient, channel-summed."""

    def attribute(self, x, targets):
        x = x.clone().requires_grad_(True)
        (g,) = self.grads(self.select(self.model(x), targets), [x])
        return g.sum(2)


def test_base_restores_state_and_batches_targets():
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=5, img_size=16)
    model.train()
    model.layer1.eval()
    model.fc.weight.requires_grad_(False)
    x = torch.randn(3, 3, 16, 16)
    maps = _InputGrad(model)(x, [[0, 4], [1, 1], [2, 3]])
    assert maps.shape == (3, 2, 16, 16)
    assert model.training and not model.layer1.training and model.layer2.training
    assert not model.fc.weight.requires_grad and model.conv1.weight.requires_grad
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    # each of the K maps equals a separate single-target call
    single = _InputGrad(model)(x, [4, 1, 3])
    assert single.shape == (3, 16, 16)
    assert torch.allclose(maps[:, 1], single, atol=1e-6)
    # and equals autograd on the model in eval mode, from scratch
    model.eval()
    xi = x.clone().requires_grad_(True)
    model(xi)[torch.arange(3), torch.tensor([4, 1, 3])].sum().backward()
    assert torch.allclose(single, xi.grad.sum(1), atol=1e-6)


def test_given_targets_cost_no_extra_forward():
    """Grad-CAM with given targets: one forward and one backward, as a minimal Grad-CAM."""
    model = create_model("tinyvgg", num_classes=3, img_size=16)
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        x = torch.randn(2, 3, 16, 16)
        create("gradcam", model)(x, [0, 2])
        assert len(calls) == 1
        create("gradcam", model)(x)  # the predicted class needs one more
        assert len(calls) == 3
    finally:
        handle.remove()
    with pytest.raises(ValueError, match=r"classes must be in 0\.\.2"):
        create("gradcam", model)(x, 3)
    assert resolve_targets(1, batch=2, num_classes=3)[0].tolist() == [[1], [1]]
