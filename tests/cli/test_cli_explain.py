"""`cnnkit explain`: overlays, grid and raw maps that equal the Python API's maps."""

import numpy as np
import pytest
import torch
from PIL import Image

from cnnkit.data import load_data
from cnnkit.explain import create
from cnnkit.training import load_run


@pytest.fixture(scope="module")
def digit_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    data = load_data("digits")
    paths = []
    for i in range(2):
        p = root / f"d{i}.png"
        Image.fromarray(data.images[i, 0].numpy()).save(p)
        paths.append(str(p))
    return paths


def test_explain_writes_overlays_grid_and_raw_maps(cli, shared_run, digit_files, tmp_path):
    out = tmp_path / "ex"
    code, stdout, err = cli(["explain", str(shared_run.path), *digit_files,
                             "--method", "saliency", "--method", "gradient_x_input",
                             "--target", "3", "--out", str(out)])
    assert code == 0, err
    names = sorted(p.name for p in out.iterdir())
    assert names == ["d0_gradient_x_input.npy", "d0_gradient_x_input.png", "d0_saliency.npy",
                     "d0_saliency.png", "d1_gradient_x_input.npy", "d1_gradient_x_input.png",
                     "d1_saliency.npy", "d1_saliency.png", "grid.png"]
    assert Image.open(out / "grid.png").size[0] > 200
    # the raw map equals the Python API's map for the same input and target
    run = load_run(shared_run.path)
    x = torch.stack([run.preprocess(f) for f in digit_files])
    expect = create("saliency", run.model)(x, 3)
    got = np.load(out / "d1_saliency.npy")
    assert got.shape == (8, 8)
    assert np.allclose(got, expect[1].numpy(), atol=1e-6)


def test_explain_bad_input_is_one_line(cli, shared_run, digit_files, one_line_error):
    code, _, err = cli(["explain", str(shared_run.path), digit_files[0], "--method", "gradkam"])
    assert "unknown explanation method 'gradkam'" in one_line_error(code, err)
    code, _, err = cli(["explain", str(shared_run.path), digit_files[0], "--target", "eleven",
                         "--method", "saliency"])
    assert "unknown class 'eleven'" in one_line_error(code, err)
    code, _, err = cli(["explain", str(shared_run.path), "missing.png"])
    assert "does not exist" in one_line_error(code, err)
