"""Web test fixtures: one trained TinyVGG run, its int8 twin, and apps over them.

``pytest.importorskip`` keeps the suite collectable without the ``web`` extra; CI
installs it through the ``test`` extra, so there these tests run.
"""

from __future__ import annotations

import os
import shutil
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("httpx2")


@pytest.fixture(scope="session")
def run_path(tmp_path_factory):
    """A TinyVGG trained on digits for one epoch (8x8 inputs, padded convolutions)."""
    import cnnkit

    runs = tmp_path_factory.mktemp("web-runs")
    cnnkit.train(model="tinyvgg", data="digits", epochs=1, runs_dir=str(runs), name="tv",
                 progress=False)
    return runs / "tv"


@pytest.fixture(scope="session")
def int8_path(run_path, tmp_path_factory):
    """The same run with an int8 model beside its weights, as ``cnnkit compress`` writes it."""
    from cnnkit.compress.quantize import quantize
    from cnnkit.compress.quantized_file import save_quantized
    from cnnkit.run import run_test_split
    from cnnkit.training import load_run

    path = tmp_path_factory.mktemp("web-int8") / "tv-int8"
    shutil.copytree(run_path, path)
    run = load_run(path)
    images, _ = run_test_split(run)
    calib = torch.stack([run.preprocess(im) for im in images[:64]])
    save_quantized(quantize(run.model, calib), path / "model_int8.safetensors")
    return path


@pytest.fixture(scope="session")
def explorer(run_path):
    from cnnkit.web import load_explorer

    return load_explorer(run_path)


@pytest.fixture(scope="session")
def client(explorer):
    from starlette.testclient import TestClient

    from cnnkit.web import create_app

    with TestClient(create_app(explorer)) as c:
        yield c


@pytest.fixture(scope="session")
def reference(run_path):
    """What the tests compare with: the run's model and test split, loaded apart from the
    web code (its own model instance, its own split)."""
    from cnnkit.run import run_test_split
    from cnnkit.training import load_run

    run = load_run(run_path)
    images, labels = run_test_split(run)
    return SimpleNamespace(model=run.model, preprocess=run.preprocess, images=images,
                           labels=labels, x=lambda i: run.preprocess(images[i])[None])


@pytest.fixture(scope="session")
def replace_weights():
    """What a training does to a run's ``model.safetensors``: new weights (here the
    classifier's scaled), same metadata, written beside and renamed into place."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    def replace(path, scale: float = 2.0) -> None:
        with safe_open(path, "pt") as f:
            tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
        tensors["fc.weight"] = tensors["fc.weight"] * scale
        save_file(tensors, str(path) + ".tmp", metadata=meta)
        os.replace(str(path) + ".tmp", path)

    return replace


def _train(root, name: str, **options):
    import cnnkit

    cnnkit.train(runs_dir=str(root), name=name, epochs=1, batch_size=8, progress=False,
                 **options)
    return root / name


@pytest.fixture(scope="session")
def seg3d_path(tmp_path_factory):
    """A 3D U-Net segmenting shapes3d volumes (8x8x8, 24 of them; ~5 s on 2 cores). Plain
    cross-entropy in float32: with bf16 autocast and Dice, the first steps of this tiny net
    sometimes diverged."""
    return _train(tmp_path_factory.mktemp("web-seg3d"), "u3", model="unet3d", task="segment",
                  data="shapes3d", data_options={"n": 24, "size": 8},
                  model_kwargs={"width": 4, "depth": 2}, lr=0.01, loss="ce", amp="off")


@pytest.fixture(scope="session")
def cls3d_path(tmp_path_factory):
    """A MobileNet V1 built in 3D from the input size, classifying shapes3d volumes (a
    ResNet-18 in 3D is 33M parameters: its run folder alone is 0.5 GB)."""
    return _train(tmp_path_factory.mktemp("web-cls3d"), "m3", model="mobilenet_v1",
                  task="classify", data="shapes3d", data_options={"n": 24, "size": 8},
                  model_kwargs={"width_mult": 0.25})


@pytest.fixture(scope="session")
def seg2d_path(tmp_path_factory):
    """A 2D U-Net segmenting shapes (32x32, 48 images; a few seconds on 2 cores)."""
    return _train(tmp_path_factory.mktemp("web-seg2d"), "u2", model="unet_small",
                  task="segment", data="shapes", data_options={"n": 48, "size": 32},
                  loss="ce", amp="off")


@pytest.fixture(scope="session")
def resnet18_path(tmp_path_factory):
    """A ResNet-18 classifying shapes (32x32, 48 images): a wide network of 60 layers."""
    return _train(tmp_path_factory.mktemp("web-r18"), "r18", model="resnet18",
                  task="classify", data="shapes", data_options={"n": 48, "size": 32})
