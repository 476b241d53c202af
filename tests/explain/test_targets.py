"""Targets as functions of the model's output: a class logit, a region, a regression value.

``explainer(x, target=fn)`` explains ``fn(model(x))``, one scalar per sample; every method
must give exactly the map of the integer target when ``fn`` picks that logit.
"""

from __future__ import annotations

import pytest
import torch
from nd_nets import FAST, gap_net, inputs

import cnnkit
from cnnkit.explain import create, list_methods
from cnnkit.explain._base import TargetScores
from cnnkit.tasks import task_class

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("name", list_methods())
def test_a_function_picking_a_logit_is_that_class_exactly(name, dims):
    net, x = gap_net(dims), inputs(dims)
    explainer = create(name, net, **FAST.get(name, {}))
    by_class = explainer(x, 2)
    by_function = explainer(x, lambda y: y[:, 2])
    assert by_function.shape == (2, *x.shape[2:])
    assert torch.equal(by_function, by_class)
    assert not isinstance(explainer.model, TargetScores)  # the model is put back


LINEAR = {"cam": {}, "saliency": dict(abs=False, reduce="sum"), "gradient_x_input": {},
          "integrated_gradients": dict(steps=8)}


@pytest.mark.parametrize("dims", [1, 3])
@pytest.mark.parametrize("name", LINEAR)
def test_a_difference_of_logits_gives_the_difference_of_maps(name, dims):
    """CAM (whose head weights follow d fn / d logits), signed saliency, gradient x input and
    IG are linear in the explained score."""
    net, x = gap_net(dims), inputs(dims)
    explainer = create(name, net, **LINEAR[name])
    diff = explainer(x, lambda y: y[:, 1] - y[:, 0])
    assert diff.abs().max() > 0
    torch.testing.assert_close(diff, explainer(x, 1) - explainer(x, 0))


def test_a_function_must_return_one_score_per_sample():
    net, x = gap_net(1), inputs(1)
    explainer = create("saliency", net)
    for bad in (lambda y: y, lambda y: y.sum(), lambda y: 3.0):
        with pytest.raises(ValueError, match=r"one score per sample, shape \[2\]"):
            explainer(x, bad)
    assert not isinstance(explainer.model, TargetScores)
    assert all(not m._forward_hooks for m in net.modules())
    with pytest.raises(ValueError, match="one score per sample"):
        create("cam", net)(x, lambda y: y[:1, 0])


def test_regression_explains_its_first_output_by_default():
    """A regressor (any classifier with K real outputs): target=None is output 0, not the
    largest output; target=j is output j; a function can pick any value."""
    net, x = gap_net(1), inputs(1)
    with torch.no_grad():
        out = net(x)
    assert (out.argmax(1) != 0).any()  # classification's default would differ
    regress = task_class("regress")
    assert regress.predicted(net, x).tolist() == [0, 0]
    for name in ("saliency", "gradcam", "occlusion"):
        default = create(name, net, task="regress", **FAST.get(name, {}))(x)
        first = create(name, net, **FAST.get(name, {}))(x, lambda y: y[:, 0])
        assert torch.equal(default, first)
        third = create(name, net, task=regress, **FAST.get(name, {}))(x, 3)
        assert torch.equal(third, create(name, net, **FAST.get(name, {}))(x, lambda y: y[:, 3]))
        top = create(name, net, **FAST.get(name, {}))(x)  # classification: the top output
        assert not torch.equal(top, default)


def test_a_segmentation_region_function_is_the_region_score_of_its_class():
    """A function summing class c's logits over a fixed region (the one the model predicts
    as c) has the gradients of the task's region score for c (the region is not
    differentiated through in either); the region is that of this one input."""
    torch.manual_seed(0)
    model = cnnkit.create_model("unet_small", num_classes=3, input_size=(1, 32)).eval()
    x = torch.randn(1, 1, 32)
    with torch.no_grad():
        logits = model(x)
    scorer = task_class("segment").explainable(model)
    c = int(task_class("segment").predicted(scorer, x))
    region = (logits.argmax(1) == c).to(logits.dtype)  # [1, 32]
    assert 0 < region.sum() < 32

    def region_score(y: torch.Tensor) -> torch.Tensor:
        return (y[:, c] * region).sum(1)

    for name in ("saliency", "gradient_x_input", "gradcam"):
        explainer = create(name, model)
        got = explainer(x, region_score)
        assert got.shape == (1, 32)
        torch.testing.assert_close(got, explainer(x, c))
