"""The JSON API of ``cnnkit serve``, endpoint by endpoint, with the numbers checked against
the run's model computed here directly (a TinyVGG: ``features`` is a Sequential, so the
output of layer k is ``features[:k + 1](x)``)."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cnnkit.analysis import summary
from cnnkit.explain import create
from cnnkit.web.codec import unpack

# TinyVGG's layers in call order: 0 conv_1_1, 1 relu_1_1, 2 conv_1_2, 3 relu_1_2, 4 max_pool_1,
# 5 conv_2_1, 6 relu_2_1, 7 conv_2_2, 8 relu_2_2, 9 max_pool_2, 10 fc, 11 the softmax.
CONV, RELU, POOL, FC, SOFTMAX = 5, 6, 9, 10, 11


def _activations(client, key: str) -> dict:
    r = client.get("/api/activations", params={"input": key})
    assert r.status_code == 200, r.text
    return r.json()


def _layer(acts: dict, i: int) -> np.ndarray:
    return unpack(acts["layers"][i]["data"])


def _expected_layers(reference, i: int) -> list[torch.Tensor]:
    x, features = reference.x(i), reference.model.features
    with torch.no_grad():
        return [*(features[:k + 1](x)[0] for k in range(len(features))), reference.model(x)[0]]


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


# -- the page and its assets --------------------------------------------------------------------

def test_page_and_assets_are_served_with_a_strict_policy(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="/static/js/main.js">' in r.text
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["x-content-type-options"] == "nosniff"
    for asset in ("style.css", "js/main.js", "js/api.js", "js/colors.js", "js/dom.js",
                  "js/overview.js", "js/detail.js", "js/panels.js"):
        r = client.get(f"/static/{asset}")
        assert r.status_code == 200, asset
        assert "http://" not in r.text and "https://" not in r.text, f"{asset} loads from the web"


# -- model, inputs, activations -----------------------------------------------------------------

def test_model_lists_layers_facts_and_methods(client, reference, explorer):
    info = client.get("/api/model").json()
    names = [la["name"] for la in info["layers"]]
    assert names == [f"features.{n}" for n, _ in reference.model.features.named_children()] \
        + ["fc", "softmax"]
    assert [la["source"] for la in info["layers"]] == [-1, *range(11)]
    rows = summary(reference.model, reference.preprocess.input_size).rows
    assert [la["facts"]["params"] for la in info["layers"][:-1]] == [r.params for r in rows]
    assert [la["facts"]["receptive_field"] for la in info["layers"][:-1]] == \
        [r.receptive_field for r in rows]
    assert info["classes"] == reference.preprocess.classes and info["weights"] == "best"
    assert "gradcam" in info["methods"] and info["compression"] is None
    assert info["test_images"] == len(reference.labels) and info["test_error"] is None


def test_inputs_list_the_test_split_with_thumbnails(client, reference):
    listing = client.get("/api/inputs", params={"offset": 3, "limit": 4}).json()
    assert listing["total"] == len(reference.labels)
    assert [it["input"] for it in listing["items"]] == ["test:3", "test:4", "test:5", "test:6"]
    for k, item in enumerate(listing["items"]):
        assert item["label"] == int(reference.labels[3 + k])
        png = base64.b64decode(item["image"].split(",", 1)[1])
        pixels = np.array(Image.open(io.BytesIO(png)))
        np.testing.assert_array_equal(pixels, reference.images[3 + k, 0].numpy())
    assert client.get("/api/inputs", params={"offset": -1}).status_code == 400


def test_activations_are_the_models_outputs(client, reference):
    acts = _activations(client, "test:2")
    expected = _expected_layers(reference, 2)
    for i, want in enumerate(expected):
        got = _layer(acts, i)
        np.testing.assert_array_equal(got, want.numpy())  # bit for bit: float32 on the wire
        assert acts["layers"][i]["max"] == pytest.approx(want.max().item())
    probs = torch.softmax(expected[-1], 0)
    np.testing.assert_allclose(acts["probabilities"], probs.numpy(), rtol=1e-6)
    assert acts["predicted"] == int(probs.argmax()) and acts["label"] == int(reference.labels[2])
    np.testing.assert_array_equal(unpack(acts["x"]), reference.x(2)[0].numpy())


# -- the neuron arithmetic ----------------------------------------------------------------------

def _neuron(client, key, layer, *position):
    names = ("c", "y", "x")[:len(position)]
    r = client.get("/api/neuron", params={"input": key, "layer": layer,
                                          **dict(zip(names, position, strict=True))})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("position", [(0, 0, 0), (3, 2, 1), (9, 3, 3)])
def test_conv_neuron_sum_plus_bias_is_the_activation_and_conv2d(client, reference, position):
    acts = _activations(client, "test:1")
    view = _neuron(client, "test:1", CONV, *position)
    shown = _layer(acts, CONV)[position].item()
    conv = reference.model.features.conv_2_1
    direct = F.conv2d(torch.from_numpy(_layer(acts, CONV - 1).copy())[None], conv.weight,
                      conv.bias, conv.stride, conv.padding)[0][position].item()
    products = np.array(view["products"])
    np.testing.assert_allclose(products, np.array(view["patch"]) * np.array(view["kernel"]))
    total = products.sum() + view["bias"]
    assert total == pytest.approx(shown, abs=1e-5) and total == pytest.approx(direct, abs=1e-5)
    assert view["value"] == shown and view["matches"]
    np.testing.assert_array_equal(np.array(view["kernel"], dtype=np.float32),
                                  conv.weight[position[0]].detach().numpy())
    assert view["bias"] == pytest.approx(conv.bias[position[0]].item())
    # The patch is the previous layer's activation under the kernel (zeros where padded).
    prev = np.pad(_layer(acts, CONV - 1), ((0, 0), (1, 1), (1, 1)))
    _, y, x = position
    np.testing.assert_allclose(view["patch"], prev[:, y:y + 3, x:x + 3])


def test_relu_pool_linear_and_softmax_views_agree_with_the_activations(client):
    acts = _activations(client, "test:4")
    relu = _neuron(client, "test:4", RELU, 2, 1, 3)
    assert relu["input"] == _layer(acts, CONV)[2, 1, 3]
    assert relu["result"] == max(0.0, relu["input"]) == relu["value"] == _layer(acts, RELU)[2, 1, 3]
    pool = _neuron(client, "test:4", POOL, 7, 1, 0)
    window = _layer(acts, POOL - 1)[7, 2:4, 0:2]
    np.testing.assert_array_equal(np.array(pool["window"], dtype=np.float32), window)
    assert pool["op"] == "max" and pool["value"] == pool["result"] == window.max()
    fc = _neuron(client, "test:4", FC, 3)
    assert fc["sum"] + fc["bias"] == pytest.approx(acts["logits"][3], abs=1e-5)
    assert fc["terms_count"] == _layer(acts, POOL).size and fc["matches"]
    top = fc["terms"][0]
    assert top["input"] == _layer(acts, POOL).reshape(-1)[top["index"]]
    soft = _neuron(client, "test:4", SOFTMAX, 3)
    assert soft["logits"] == pytest.approx(acts["logits"])
    assert soft["result"] == pytest.approx(acts["probabilities"][3], rel=1e-6)
    assert soft["exps"][3] / soft["sum"] == pytest.approx(soft["value"], rel=1e-6)


def test_filters_are_the_layers_weights(client, reference):
    data = client.get("/api/filters", params={"layer": 2}).json()
    np.testing.assert_array_equal(unpack(data["weights"]),
                                  reference.model.features.conv_1_2.weight.detach().numpy())
    fc = client.get("/api/filters", params={"layer": FC}).json()
    assert fc["shape"] == [10, 10, 2, 2]  # the dense weights laid out as the flattened maps
    np.testing.assert_array_equal(unpack(fc["weights"]).reshape(10, -1),
                                  reference.model.fc.weight.detach().numpy())
    assert client.get("/api/filters", params={"layer": RELU}).status_code == 400


@pytest.mark.parametrize("method", ["gradcam", "saliency"])
def test_explanations_equal_the_explain_package(client, reference, method):
    r = client.get("/api/explain", params={"input": "test:5", "method": method, "target": 2})
    assert r.status_code == 200, r.text
    with create(method, reference.model) as explainer:
        want = explainer(reference.x(5), target=2)[0]
    np.testing.assert_allclose(unpack(r.json()["map"]), want.numpy(), rtol=1e-5, atol=1e-7)
    default = client.get("/api/explain", params={"input": "test:5", "method": method}).json()
    assert default["target"] == _activations(client, "test:5")["predicted"]


# -- uploads ------------------------------------------------------------------------------------

def test_an_uploaded_image_gives_the_same_numbers_as_the_test_image(client, reference):
    image = _png(reference.images[7, 0].numpy())
    r = client.post("/api/upload", files={"file": ("digit.png", image, "image/png")})
    assert r.status_code == 201, r.text
    key = r.json()["input"]
    assert key.startswith("upload:")
    up, test = _activations(client, key), _activations(client, "test:7")
    assert up["label"] is None and up["logits"] == test["logits"]
    np.testing.assert_array_equal(_layer(up, CONV), _layer(test, CONV))


BAD_UPLOADS = {
    "not an image": (b"GIF89a but not really", 400),
    "empty": (b"", 400),
    "truncated png": (_png(np.zeros((8, 8), np.uint8))[:40], 400),
    "too many pixels": (_png(np.zeros((3000, 14000), np.uint8)), 413),
}


@pytest.mark.parametrize("name", list(BAD_UPLOADS))
def test_a_bad_upload_gets_a_4xx_with_a_message_and_the_server_keeps_serving(client, name):
    data, status = BAD_UPLOADS[name]
    r = client.post("/api/upload", files={"file": ("x.png", data, "image/png")})
    assert r.status_code == status and r.json()["error"]
    assert "object at 0x" not in r.json()["error"]
    assert _activations(client, "test:0")["layers"]


def test_uploads_over_the_size_limit_or_malformed_are_refused(client):
    from cnnkit.web.app import MAX_UPLOAD_BYTES

    big = b"\x00" * (MAX_UPLOAD_BYTES + 100_000)
    assert client.post("/api/upload", files={"file": ("big.png", big)}).status_code == 413
    r = client.post("/api/upload", data={"other": "field"})
    assert r.status_code == 400 and "'file'" in r.json()["error"]
    r = client.post("/api/upload", content=b"--x\r\nbroken", headers={
        "content-type": "multipart/form-data; boundary=x"})
    assert 400 <= r.status_code < 500
    r = client.post("/api/upload", content=iter([b"--x\r\n"]), headers={  # chunked: no length
        "content-type": "multipart/form-data; boundary=x"})
    assert r.status_code == 411 and "Content-Length" in r.json()["error"]
    assert client.get("/api/model").status_code == 200


def test_only_the_latest_uploads_are_held():
    from cnnkit.web.inputs import InputStore

    store = InputStore(torch.zeros(0, 1, 8, 8, dtype=torch.uint8), torch.zeros(0), ["a"],
                       (1, 8, 8), max_uploads=2)
    keys = [store.add_upload(_png(np.full((8, 8), v, np.uint8)), "x.png") for v in (1, 2, 3)]
    with pytest.raises(LookupError, match="upload the image again"):
        store.get(keys[0])
    assert store.get(keys[2])[0].max().item() == 3


def test_a_run_whose_data_is_gone_serves_uploads_and_says_why(run_path, tmp_path, reference):
    import shutil

    import yaml
    from starlette.testclient import TestClient

    from cnnkit.web import create_app, load_explorer

    moved = tmp_path / "moved"
    shutil.copytree(run_path, moved)
    config = yaml.safe_load((moved / "config.yaml").read_text())
    (moved / "config.yaml").write_text(yaml.safe_dump({**config, "data": str(tmp_path / "gone")}))
    client = TestClient(create_app(load_explorer(moved)))
    info = client.get("/api/model").json()
    assert info["test_images"] == 0 and "upload images instead" in info["test_error"]
    image = _png(reference.images[0, 0].numpy())
    key = client.post("/api/upload", files={"file": ("a.png", image)}).json()["input"]
    with torch.no_grad():
        want = reference.model(reference.x(0))[0]
    np.testing.assert_allclose(_activations(client, key)["logits"], want.numpy(), rtol=1e-6)
    assert client.get("/api/activations", params={"input": "test:0"}).status_code == 404


# -- no paths, bad requests ---------------------------------------------------------------------

@pytest.mark.parametrize("url", [
    "/static/../pyproject.toml", "/static/%2e%2e/%2e%2e/%2e%2e/pyproject.toml",
    "/static/..%2f..%2fapp.py", "/static/%2e%2e%2fapp.py", "/static//etc/passwd",
    "/api/activations?input=../../../etc/passwd", "/api/activations?input=/etc/passwd",
    "/api/activations?input=test:..%2f..%2fconfig.yaml", "/api/neuron?input=file:///etc/passwd&layer=0&c=0",
])
def test_no_endpoint_reads_a_path(client, url):
    r = client.get(url)
    assert r.status_code in (400, 404), (url, r.status_code)
    assert "root:" not in r.text and "[project]" not in r.text


@pytest.mark.parametrize(("params", "status"), [
    ({"input": "test:99999"}, 404), ({"input": "upload:abcdef"}, 404), ({}, 400),
])
def test_unknown_inputs_are_404_and_missing_ones_400(client, params, status):
    r = client.get("/api/activations", params=params)
    assert r.status_code == status and r.json()["error"]


@pytest.mark.parametrize(("params", "status"), [
    ({"layer": 99, "c": 0}, 404), ({"layer": CONV, "c": 10, "y": 0, "x": 0}, 400),
    ({"layer": CONV, "c": "one", "y": 0, "x": 0}, 400), ({"layer": CONV, "c": 0, "y": 1}, 400),
    ({"layer": SOFTMAX, "c": 0, "y": 0, "x": 0}, 400), ({"c": 0}, 400),
])
def test_bad_neuron_requests_get_a_message(client, params, status):
    r = client.get("/api/neuron", params={"input": "test:0", **params})
    assert r.status_code == status and r.json()["error"]


def test_bad_explanations_get_a_message(client):
    r = client.get("/api/explain", params={"input": "test:0", "method": "magic"})
    assert r.status_code == 400 and "gradcam" in r.json()["error"]
    r = client.get("/api/explain", params={"input": "test:0", "target": 10})
    assert r.status_code == 400


def test_host_header_is_checked_when_bound_to_loopback(explorer):
    from starlette.testclient import TestClient

    from cnnkit.web import create_app

    app = create_app(explorer, allowed_hosts=["127.0.0.1", "localhost"])
    assert TestClient(app, base_url="http://127.0.0.1:8000").get("/api/model").status_code == 200
    assert TestClient(app, base_url="http://evil.example").get("/api/model").status_code == 400


# -- concurrency --------------------------------------------------------------------------------

def test_concurrent_requests_give_the_sequential_answers(explorer, client):
    import json
    import urllib.request

    from cnnkit.web import create_app, running

    keys = [f"test:{i}" for i in range(10, 18)]  # more inputs than the trace cache holds
    paths = [f"/api/activations?input={k}" for k in keys] * 2
    paths += [f"/api/neuron?input={k}&layer={CONV}&c=1&y=2&x=2" for k in keys]
    paths += [f"/api/explain?input={k}&method=gradcam" for k in keys[:4]]
    sequential = [client.get(path).json() for path in paths]
    with running(create_app(explorer)) as url:  # a real server: requests in parallel threads
        def get(path: str) -> dict:
            with urllib.request.urlopen(url + path.lstrip("/"), timeout=60) as r:
                return json.loads(r.read())

        with ThreadPoolExecutor(8) as pool:
            parallel = list(pool.map(get, paths[::-1]))
    assert parallel[::-1] == sequential


# -- an int8 run --------------------------------------------------------------------------------

def test_an_int8_run_is_explained_in_real_numbers_plus_requantisation(int8_path):
    from starlette.testclient import TestClient

    from cnnkit.web import create_app, load_explorer

    client = TestClient(create_app(load_explorer(int8_path, weights="int8")))
    info = client.get("/api/model").json()
    assert info["weights"] == "int8" and info["compression"]["int8"]["layers"]
    assert info["layers"][0]["type"] == "ConvReLU2d" and info["totals"]["from_float_model"]
    acts = _activations(client, "test:3")
    conv = [la["index"] for la in info["layers"] if la["kind"] == "conv"][1]
    view = _neuron(client, "test:3", conv, 2, 3, 4)
    q = view["requantize"]
    assert view["matches"] and view["value"] == _layer(acts, conv)[2, 3, 4]
    assert q["real"] == pytest.approx(view["sum"] + view["bias"])
    requantized = (q["q"] - q["zero_point"]) * q["scale"]
    assert view["value"] == pytest.approx(requantized, abs=1.01 * q["scale"])
    heat = client.get("/api/explain", params={"input": "test:3", "method": "gradcam"}).json()
    assert heat["float_model"] is True
