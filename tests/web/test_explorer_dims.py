"""``cnnkit serve`` on runs of other tasks and dims (issue 13, points 5 and 8): a 3D U-Net
segmenting volumes, a classifier built in 3D, a 1D regression; every number checked
against the run's model computed here directly, with its own hooks."""

from __future__ import annotations

import base64
import gzip
import io
import math
import struct
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from cnnkit.web.codec import unpack

nibabel = pytest.importorskip("nibabel")


def _reference(path):
    from cnnkit.run import run_test_split
    from cnnkit.training import load_run

    run = load_run(path)
    images, _ = run_test_split(run)
    return SimpleNamespace(model=run.model, preprocess=run.preprocess, images=images,
                           x=lambda i: run.preprocess(images[i])[None])


def _outputs(model, x):
    """Every module's outputs for ``x`` by qualified name (one per call), with the
    model's own hooks: the web code's tracer is not used."""
    found, handles = {}, []
    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_hook(
                lambda m, args, out, name=name: found.setdefault(name, []).append(
                    out.detach().clone() if isinstance(out, torch.Tensor) else None)))
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        for h in handles:
            h.remove()
    return found, logits[0]


def _client(path):
    from starlette.testclient import TestClient

    from cnnkit.web import create_app, load_explorer

    return TestClient(create_app(load_explorer(path)))


@pytest.fixture(scope="module")
def seg3d(seg3d_path):
    return SimpleNamespace(client=_client(seg3d_path), ref=_reference(seg3d_path))


@pytest.fixture(scope="module")
def cls3d(cls3d_path):
    return SimpleNamespace(client=_client(cls3d_path), ref=_reference(cls3d_path))


def _get(client, path, **params):
    r = client.get(path, params=params)
    assert r.status_code == 200, r.text
    return r.json()


def _nifti(volume: np.ndarray, gz: bool = False) -> bytes:
    """A ``[D, H, W]`` volume as NIfTI bytes (NIfTI axes are x, y, z: the reverse)."""
    image = nibabel.Nifti1Image(np.ascontiguousarray(volume.transpose(2, 1, 0)), np.eye(4))
    data = image.to_bytes()
    return gzip.compress(data) if gz else data


# -- 3D: slices ---------------------------------------------------------------------------------

def test_a_3d_layer_is_sent_as_one_slice_of_the_right_shape(seg3d):
    info = _get(seg3d.client, "/api/model")
    assert info["input_depth"] == 8 and info["input_size"] == [1, 8, 8, 8]
    acts = _get(seg3d.client, "/api/activations", input="test:1", depth=5)
    assert acts["depth"] == 5 and unpack(acts["x"]).shape == (1, 8, 8)
    volumes = [la for la in info["layers"] if len(la["shape"]) == 4 and not la["hidden"]]
    assert len(volumes) > 10 and any(la["depth"] < 8 for la in volumes)  # pooled ones too
    for la in volumes:
        entry = acts["layers"][la["index"]] if la["kind"] != "mask" else acts["head"]
        c, d, h, w = la["shape"]
        assert la["depth"] == d and entry["slice"] == 5 * d // 8
        assert unpack(entry["data"]).shape == (min(c, la["channels"]), math.ceil(h / la["stride"]),
                                               math.ceil(w / la["stride"]))


@pytest.mark.parametrize("k", [0, 3, 7])
def test_slider_position_k_shows_the_kth_slice_of_every_activation(seg3d, k):
    acts = _get(seg3d.client, "/api/activations", input="test:2", depth=k)
    info = _get(seg3d.client, "/api/model")
    outputs, _ = _outputs(seg3d.ref.model, seg3d.ref.x(2))
    checked = 0
    for la in info["layers"][:-1]:
        name, _, call = la["name"].partition("#")
        want = outputs[name][int(call or 1) - 1][0]
        if want.ndim != 4 or la["hidden"]:
            continue
        d = want.shape[1]
        got = unpack(acts["layers"][la["index"]]["data"])
        np.testing.assert_array_equal(got, want[:, k * d // 8].numpy())  # bit for bit
        checked += 1
    assert checked > 10
    np.testing.assert_array_equal(unpack(acts["x"])[0], seg3d.ref.x(2)[0, 0, k].numpy())


def test_a_segmentation_shows_the_argmax_mask_and_its_class_shares(seg3d):
    info = _get(seg3d.client, "/api/model")
    assert info["output_kind"] == "mask" and info["layers"][-1]["kind"] == "mask"
    assert len(info["palette"]) == len(info["classes"]) == 5
    with torch.no_grad():
        logits = seg3d.ref.model(seg3d.ref.x(3))[0]
    mask = logits.argmax(0)
    for k in (1, 6):
        acts = _get(seg3d.client, "/api/activations", input="test:3", depth=k)
        np.testing.assert_array_equal(unpack(acts["head"]["data"])[0], mask[k].numpy())
        assert acts["head"]["index"] == len(info["layers"]) - 1
        shares = np.bincount(mask.flatten().numpy(), minlength=5) / mask.numel()
        np.testing.assert_allclose(acts["scores"], shares)
        assert acts["score_kind"] == "share" and acts["predicted"] is None
    truth = acts["truth"]["mask"]  # the test volume's own mask, same slice
    assert unpack(truth).shape == (1, 8, 8)
    view = _get(seg3d.client, "/api/neuron", input="test:3", layer=len(info["layers"]) - 1,
                c=0, z=4, y=2, x=5)
    assert view["kind"] == "argmax" and view["matches"] is True
    assert view["result"] == int(mask[4, 2, 5]) and view["class"] == info["classes"][view["result"]]
    np.testing.assert_allclose(view["scores"], logits[:, 4, 2, 5].numpy(), rtol=1e-6)


def test_a_segmentation_is_explained_by_its_tasks_own_target(seg3d):
    from cnnkit.explain import create
    from cnnkit.tasks import task_class

    task = task_class("segment")
    x = seg3d.ref.x(0)
    heat = _get(seg3d.client, "/api/explain", input="test:0", method="gradcam", depth=6)
    target = int(task.predicted(task.explainable(seg3d.ref.model), x)[0])
    assert heat["target"] == target and heat["slice"] == 6
    with create("gradcam", seg3d.ref.model, task=task) as explainer:
        want = explainer(x, target=target)[0]
    np.testing.assert_allclose(unpack(heat["map"]), want[6].numpy(), rtol=1e-5, atol=1e-7)


def test_a_depth_outside_the_volume_is_refused(seg3d):
    r = seg3d.client.get("/api/activations", params={"input": "test:0", "depth": 8})
    assert r.status_code == 400 and "outside the input's slices 0..7" in r.json()["error"]


def test_a_3d_classifier_shows_its_softmax_and_explanations(cls3d):
    info = _get(cls3d.client, "/api/model")
    assert info["layers"][-1]["kind"] == "softmax" and info["input_depth"] == 8
    acts = _get(cls3d.client, "/api/activations", input="test:2", depth=2)
    with torch.no_grad():
        logits = cls3d.ref.model(cls3d.ref.x(2))[0]
    np.testing.assert_allclose(acts["probabilities"], torch.softmax(logits, 0).numpy(), rtol=1e-6)
    assert acts["predicted"] == int(logits.argmax()) and acts["class"] in info["classes"]
    view = _get(cls3d.client, "/api/neuron", input="test:2", layer=len(info["layers"]) - 1, c=1)
    assert view["kind"] == "softmax" and view["matches"] is True
    heat = _get(cls3d.client, "/api/explain", input="test:2", method="gradcam", depth=2)
    assert unpack(heat["map"]).shape == (8, 8) and heat["target"] == acts["predicted"]
    listing = _get(cls3d.client, "/api/inputs", offset=0, limit=2)
    png = Image.open(io.BytesIO(base64.b64decode(listing["items"][0]["image"].split(",", 1)[1])))
    np.testing.assert_array_equal(np.array(png), cls3d.ref.images[0, 0, 4].numpy())  # middle


# -- 3D: uploads ---------------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [False, True])
def test_a_nifti_upload_gives_the_same_numbers_as_the_test_volume(seg3d, gz):
    volume = seg3d.ref.images[1, 0].numpy()
    r = seg3d.client.post("/api/upload", files={"file": ("v.nii.gz" if gz else "v.nii",
                                                         _nifti(volume, gz))})
    assert r.status_code == 201, r.text
    key = r.json()["input"]
    got = _get(seg3d.client, "/api/activations", input=key, depth=3)
    want = _get(seg3d.client, "/api/activations", input="test:1", depth=3)
    assert got["head"]["data"] == want["head"]["data"] and got["x"] == want["x"]
    assert got["truth"] is None and got["label"] is None


def test_an_image_uploaded_to_a_volume_run_is_refused(seg3d):
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, "PNG")
    r = seg3d.client.post("/api/upload", files={"file": ("a.png", buf.getvalue())})
    assert r.status_code == 400 and "not a NIfTI volume" in r.json()["error"]


def test_a_volume_over_the_voxel_limit_is_refused_from_its_header(seg3d):
    """A 1 KB gzip stream declaring 512^3 voxels: refused before it is inflated."""
    header = nibabel.Nifti1Header()
    header.set_data_shape((512, 512, 512))
    header.set_data_dtype(np.uint8)
    head = header.binaryblock + b"\0" * 4
    bomb = gzip.compress(head + b"\0" * (1 << 20))  # the rest would inflate to 128 MB
    r = seg3d.client.post("/api/upload", files={"file": ("bomb.nii.gz", bomb)})
    assert r.status_code == 413 and "over the limit of 16,000,000" in r.json()["error"]


def test_a_truncated_volume_is_refused(seg3d):
    data = _nifti(np.zeros((8, 8, 8), np.uint8))
    r = seg3d.client.post("/api/upload", files={"file": ("t.nii", data[:400])})
    assert r.status_code == 400 and "truncated" in r.json()["error"]


def test_an_upload_over_the_byte_limit_is_refused_unread(seg3d):
    from cnnkit.web.app import MAX_UPLOAD_BYTES

    big = b"\0" * (MAX_UPLOAD_BYTES + 1)
    r = seg3d.client.post("/api/upload", files={"file": ("big.nii", big)})
    assert r.status_code == 413 and "over the limit" in r.json()["error"]


def test_damaged_nifti_headers_are_refused_with_a_message():
    from cnnkit.web.inputs import decode_volume_upload

    for data in (b"", b"\x1f\x8b garbage", struct.pack("<i", 348) + b"\0" * 400):
        with pytest.raises(ValueError, match="NIfTI|empty|gzip"):
            decode_volume_upload(data, (1, 8, 8, 8))


# -- 1D -------------------------------------------------------------------------------------------

def test_a_1d_regression_is_shown_as_strips_with_its_values(tmp_path):
    from cnnkit.models import create_model
    from cnnkit.run import Preprocess, Run, TrainConfig
    from cnnkit.web import Explorer
    from cnnkit.web.inputs import InputStore

    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=2, input_size=(1, 64)).eval()
    prep = Preprocess((1, 64), [0.5], [0.25], ["level", "slope"], "regress")
    run = Run(tmp_path, model, TrainConfig(task="regress", model="resnet18", data="signals"),
              prep, None)
    signals = torch.rand(3, 1, 64)
    store = InputStore(signals, torch.rand(3, 2), prep.classes, prep.input_size)
    explorer = Explorer(run, inputs=store)
    info = explorer.info()
    assert info["output_kind"] == "values" and info["layers"][-1]["name"] == "fc"
    acts = explorer.activations("test:1")
    outputs, logits = _outputs(model, prep(signals[1])[None])
    checked = 0
    for la in info["layers"]:
        name, _, call = la["name"].partition("#")
        want = outputs[name][int(call or 1) - 1][0]
        if want.ndim == 2 and not la["hidden"]:  # a map (C, L): one row per channel
            got = unpack(acts["layers"][la["index"]]["data"])
            np.testing.assert_array_equal(got, want[:la["channels"], None, ::la["stride"]].numpy())
            checked += 1
    assert checked > 20
    np.testing.assert_allclose(acts["scores"], logits.numpy(), rtol=1e-6)
    assert acts["truth"]["values"] == pytest.approx(store.labels[1].tolist())
    relu = next(la for la in info["layers"] if la["kind"] == "activation")
    view = explorer.neuron("test:1", relu["index"], (3, 10))  # channel 3, position 10
    assert view["kind"] == "activation" and view["matches"] is True
    assert view["value"] == outputs[relu["name"]][0][0, 3, 10].item()
    with pytest.raises(ValueError, match="cannot be uploaded"):
        store.add_upload(b"x", "a.csv")
    assert acts["image"].startswith("data:image/png;base64,")
