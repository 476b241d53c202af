"""Segmentation explanations keep each input's own size and aspect (as `cnnkit predict`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cnnkit.explain import create
from cnnkit.models import create_model
from cnnkit.models._dense import pad_to_multiple
from cnnkit.run import Preprocess, Run
from cnnkit.workflows.explain import Cropped, explain_files


@pytest.fixture(scope="module")
def seg_run():
    torch.manual_seed(0)
    model = create_model("unet_small", num_classes=3, in_chans=3, img_size=32).eval()
    prep = Preprocess((3, 32, 32), [0.5] * 3, [0.25] * 3, ["bg", "disc", "bar"], task="segment")
    return Run(None, model, None, prep, None)


def _photo(path, h, w):
    rng = np.random.default_rng(0)
    pic = rng.integers(0, 60, (h, w, 3)).astype(np.uint8)
    pic[h // 4:3 * h // 4, w // 5:4 * w // 5] = (230, 40, 40)
    Image.fromarray(pic).save(path)
    return path


def test_non_square_inputs_keep_their_size(seg_run, tmp_path, one_thread):
    """A 40x27 and a 19x33 image, neither a multiple of the U-Net's 16 nor the training
    size 32x32, get maps of their own shapes from every kind of method."""
    files = [str(_photo(tmp_path / "wide.png", 27, 40)), str(_photo(tmp_path / "tall.png", 33, 19))]
    methods = ["gradcam", "saliency", "occlusion", "integrated_gradients"]
    out = tmp_path / "ex"
    written = explain_files(seg_run, files, methods, out, options={"steps": 8})
    for m in methods:
        assert np.load(out / f"wide_{m}.npy").shape == (27, 40)
        assert np.load(out / f"tall_{m}.npy").shape == (33, 19)
    assert out / "grid.png" in written
    w, h = Image.open(out / "wide_saliency.png").size
    assert w > h  # the picture keeps the aspect


def test_maps_are_those_of_the_padded_input_cropped(seg_run, tmp_path):
    """The map of a 27x40 input is the map of the input padded to 32x48 (reflection, as
    `predict` pads), cropped, with the region score counted on the real pixels only."""
    f = str(_photo(tmp_path / "wide.png", 27, 40))
    explain_files(seg_run, [f], ["saliency", "gradcam"], tmp_path / "ex", target="disc")
    x = seg_run.preprocess.normalize(seg_run.preprocess.load(f, keep_size=True).float() / 255)
    padded, sizes = pad_to_multiple(x[None], 16)
    assert sizes == (27, 40) and padded.shape[2:] == (32, 48)
    net = Cropped(seg_run.model, sizes)
    assert net(padded).shape == (1, 3, 27, 40)
    for m in ("saliency", "gradcam"):
        expect = create(m, net, task="segment")(padded, 1)[0, :27, :40]
        np.testing.assert_allclose(np.load(tmp_path / "ex" / f"wide_{m}.npy"), expect.numpy(),
                                   atol=1e-6)
    # the padded rows and columns take no part in the score: their logits are cut away
    sal = create("saliency", net, task="segment")(padded, 1)[0]
    whole = create("saliency", seg_run.model, task="segment")(padded, 1)[0]
    assert not torch.allclose(sal, whole)


def test_a_named_layer_is_found_in_the_runs_model(seg_run, tmp_path):
    f = str(_photo(tmp_path / "wide.png", 27, 40))
    layer = seg_run.model.cam_layer
    explain_files(seg_run, [f], ["gradcam"], tmp_path / "ex", layer=layer)
    assert np.load(tmp_path / "ex" / "wide_gradcam.npy").shape == (27, 40)
    with pytest.raises(ValueError, match="has no layer 'nope'"):
        explain_files(seg_run, [f], ["gradcam"], tmp_path / "ex2", layer="nope")
