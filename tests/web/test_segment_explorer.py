"""``cnnkit serve`` on a 2D segmentation run (issue 14, point 5): the API sends the
per-pixel class map (the argmax of the model's own logits), the true mask of a test input,
the class colours, and explanations of a class's region, each checked against the run's
model computed here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cnnkit.web.codec import unpack


@pytest.fixture(scope="module")
def seg(seg2d_path):
    from starlette.testclient import TestClient

    from cnnkit.run import run_test_data
    from cnnkit.training import load_run
    from cnnkit.web import create_app, load_explorer

    run = load_run(seg2d_path)
    test = run_test_data(run)
    with TestClient(create_app(load_explorer(seg2d_path))) as client:
        yield client, run, test


def _get(client, path, **params):
    r = client.get(path, params=params)
    assert r.status_code == 200, r.text
    return r.json()


def test_a_2d_segmentation_run_is_served_with_its_class_colours(seg):
    client, run, _ = seg
    info = _get(client, "/api/model")
    assert (info["task"], info["output_kind"]) == ("segment", "mask")
    assert info["classes"] == run.preprocess.classes
    assert len(info["palette"]) == len(info["classes"]) and info["palette"][0] == [0, 0, 0]
    assert len({tuple(c) for c in info["palette"]}) == len(info["classes"])
    head = info["layers"][-1]
    assert (head["kind"], head["shape"]) == ("mask", [1, 32, 32])


@pytest.mark.parametrize("i", [0, 3])
def test_the_class_map_is_the_argmax_of_the_models_logits(seg, i):
    client, run, test = seg
    acts = _get(client, "/api/activations", input=f"test:{i}")
    with torch.no_grad():
        logits = run.model(run.preprocess(test.images[i])[None])[0]
    pred = logits.argmax(0)
    np.testing.assert_array_equal(unpack(acts["head"]["data"])[0], pred.float().numpy())
    np.testing.assert_array_equal(unpack(acts["truth"]["mask"])[0], test.masks[i].float().numpy())
    shares = torch.bincount(pred.reshape(-1), minlength=len(run.preprocess.classes)) / pred.numel()
    assert acts["scores"] == pytest.approx(shares.tolist())
    assert acts["score_kind"] == "share"


def test_an_explanation_explains_the_region_of_the_class_asked_for(seg):
    from cnnkit.explain import create
    from cnnkit.tasks import task_class

    client, run, test = seg
    x = run.preprocess(test.images[1])[None]
    with torch.no_grad():
        pred = run.model(x)[0].argmax(0)
    task = task_class("segment")
    for k in range(len(run.preprocess.classes)):
        heat = _get(client, "/api/explain", input="test:1", method="gradcam", target=k)
        assert heat["class"] == run.preprocess.classes[k]
        assert heat["region"] == pytest.approx(float((pred == k).float().mean()))
        with create("gradcam", run.model, task=task) as explainer:
            want = explainer(x, target=k)[0]
        np.testing.assert_allclose(unpack(heat["map"]), want.numpy(), rtol=1e-5, atol=1e-6)
