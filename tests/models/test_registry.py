"""Every registered model speaks the contract; the registry's errors name the fix."""

import pytest
import torch
from torch import nn

from cnnkit.models import Classifier, create_model, list_models, model_info, register_model

ALL = list_models(task="classify")


@pytest.mark.parametrize("name", ALL)
def test_every_model_forward_backward_reset(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, in_chans=3, img_size=32)
    assert isinstance(model, Classifier) and model.model_name == name
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # forward == forward_head(forward_features), and pre_logits feeds the classifier
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x)
        assert torch.allclose(model(x), model.forward_head(feats), atol=1e-6)
        pre = model.forward_head(feats, pre_logits=True)
        if isinstance(model.get_classifier(), nn.Linear):
            assert torch.allclose(model.get_classifier()(pre), model(x), atol=1e-5)
    # reset_classifier: new width, the rest untouched
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.reset_classifier(4)
    assert model(x).shape == (2, 4) and model.num_classes == model.default_cfg["num_classes"] == 4
    head = {n for n, _ in model.get_classifier().named_parameters()}
    changed = {k for k, v in model.state_dict().items()
               if k not in before or v.shape != before[k].shape}
    assert changed and all(k.rsplit(".", 1)[-1] in head for k in changed)


@pytest.mark.parametrize("name", ALL)
def test_contract_names_real_modules(name):
    model = create_model(name, num_classes=3, in_chans=3, img_size=32)
    modules = dict(model.named_modules())
    assert model.cam_layer in modules, model.cam_layer
    assert model.feature_info and all(f["module"] in modules for f in model.feature_info)
    reductions = [f["reduction"] for f in model.feature_info]
    assert reductions == sorted(reductions)
    c, h, w = model.default_cfg["input_size"]
    assert (c, h, w) == (3, 32, 32) and len(model.default_cfg["mean"]) == c
    assert model.default_cfg["paper"]
    assert model_info(name).doc, "the builder's docstring is the one-line description"


def test_unknown_model_suggests_nearest():
    with pytest.raises(ValueError, match=r"unknown model 'resnet19'; did you mean: resnet18"):
        create_model("resnet19")


def test_unknown_option_lists_the_options():
    with pytest.raises(ValueError, match=r"model 'lenet5' has no option widht; its options: .*act"):
        create_model("lenet5", widht=3)


def test_registering_twice_raises():
    def lenet5():  # same name as the registered builder
        return nn.Identity()

    with pytest.raises(ValueError, match="registered twice"):
        register_model(lenet5)


def test_list_models_pattern():
    assert list_models("resnet*") == ["resnet101", "resnet152", "resnet18", "resnet34", "resnet50"]
    assert list_models("nothing*") == []
