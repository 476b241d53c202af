"""Stale weights: the server says which weights file it serves and from when, notices
when a training replaced it, and reloads it on request (keeping uploads)."""

from __future__ import annotations

import hashlib
import io
import shutil
from datetime import datetime, timezone

import numpy as np
import pytest
import torch
from PIL import Image
from starlette.testclient import TestClient

from cnnkit.training import load_run
from cnnkit.web import create_app, load_explorer


@pytest.fixture
def own_run(run_path, tmp_path):
    """A copy of the session run that a test may change."""
    path = tmp_path / "run"
    shutil.copytree(run_path, path)
    return path


def test_the_model_says_which_weights_file_it_serves_and_from_when(client, run_path):
    info = client.get("/api/model").json()
    [file] = info["weights_files"]
    weights = run_path / "model.safetensors"
    assert file["name"] == "model.safetensors" and file["size"] == weights.stat().st_size
    assert file["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    modified = datetime.fromtimestamp(weights.stat().st_mtime, timezone.utc)
    assert file["modified"] == modified.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert info["stale"] is False and file["stale"] is False and info["loaded"]
    assert client.get("/api/weights").json()["weights_files"] == info["weights_files"]


def test_replaced_weights_are_stale_until_reloaded(own_run, reference, replace_weights):
    client = TestClient(create_app(load_explorer(own_run)))
    image = io.BytesIO()
    Image.fromarray(reference.images[3, 0].numpy()).save(image, "PNG")
    upload = client.post("/api/upload", files={"file": ("a.png", image.getvalue())})
    key = upload.json()["input"]
    before = client.get("/api/activations", params={"input": "test:3"}).json()["logits"]

    replace_weights(own_run / "model.safetensors")
    fresh = client.get("/api/weights").json()
    assert fresh["stale"] is True and fresh["weights_files"][0]["stale"] is True
    assert client.get("/api/model").json()["stale"] is True
    served = client.get("/api/activations", params={"input": "test:3"}).json()["logits"]
    assert served == before  # still the weights it loaded, and it says so

    r = client.post("/api/reload")
    assert r.status_code == 200 and r.json()["stale"] is False
    with torch.no_grad():
        want = load_run(own_run).model(reference.x(3))[0]
    after = client.get("/api/activations", params={"input": "test:3"}).json()["logits"]
    np.testing.assert_allclose(after, want.numpy(), rtol=1e-5, atol=1e-6)
    assert after != before
    uploaded = client.get("/api/activations", params={"input": key}).json()["logits"]
    assert uploaded == after  # the upload survived the reload and uses the new weights


def test_a_weights_file_that_is_gone_or_broken_is_stale_and_reload_says_why(own_run):
    client = TestClient(create_app(load_explorer(own_run)))
    (own_run / "model.safetensors").write_bytes(b"not safetensors")
    assert client.get("/api/weights").json()["stale"] is True
    r = client.post("/api/reload")
    assert 400 <= r.status_code < 500 and r.json()["error"]
    assert client.get("/api/activations", params={"input": "test:0"}).status_code == 200
    (own_run / "model.safetensors").unlink()
    assert client.get("/api/weights").json()["stale"] is True


def test_reload_must_be_posted(client):
    assert client.get("/api/reload").status_code == 405
