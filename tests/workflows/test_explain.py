"""``explain_inputs``: a run's maps, pictures and grid for signals and volumes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import cnnkit
from cnnkit.explain import create
from cnnkit.run import Preprocess, Run
from cnnkit.workflows.explain import explain_files, explain_inputs


def _run(input_size: tuple[int, ...], task: str = "classify", classes: int = 3) -> Run:
    torch.manual_seed(0)
    model = cnnkit.create_model("resnet18", num_classes=classes, input_size=input_size).eval()
    names = [f"c{i}" for i in range(classes)]
    return Run(path=None, model=model, config=None, summary=None,
               preprocess=Preprocess(input_size, [0.0], [1.0], names, task))


@pytest.mark.parametrize("input_size", [(1, 32), (1, 8, 16, 16)])
def test_maps_of_signals_and_volumes_are_written_as_the_api_gives_them(input_size, tmp_path):
    run = _run(input_size)
    x = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(1))
    paths = explain_inputs(run, x, ["a", "b"], ["gradcam", "saliency"], tmp_path, target="c1")
    assert sorted(p.name for p in paths) == sorted(
        [f"{s}_{m}.{e}" for s in "ab" for m in ("gradcam", "saliency") for e in ("npy", "png")]
        + ["grid.png"])
    expect = create("gradcam", run.model)(x, 1)
    got = np.load(tmp_path / "b_gradcam.npy")
    assert got.shape == input_size[1:]
    np.testing.assert_allclose(got, expect[1].numpy(), atol=1e-6)
    assert Image.open(tmp_path / "grid.png").size[0] > 200
    with pytest.raises(FileExistsError):
        explain_inputs(run, x, ["a", "b"], ["gradcam"], tmp_path)


def test_a_regression_run_explains_its_first_output_by_default(tmp_path):
    run = _run((2, 24), task="regress", classes=4)
    x = torch.randn(3, 2, 24, generator=torch.Generator().manual_seed(2))
    explain_inputs(run, x, ["s0", "s1", "s2"], ["saliency"], tmp_path)
    first = create("saliency", run.model)(x, lambda y: y[:, 0])
    np.testing.assert_allclose(np.load(tmp_path / "s2_saliency.npy"), first[2].numpy())
    with torch.no_grad():
        assert (run.model(x).argmax(1) != 0).any()  # a classification default would differ


def test_bad_inputs_are_refused_with_the_fix(tmp_path):
    run = _run((1, 32))
    with pytest.raises(ValueError, match="2 stems for 3 inputs"):
        explain_inputs(run, torch.randn(3, 1, 32), ["a", "b"], ["saliency"], tmp_path)
    with pytest.raises(ValueError, match=r"expected inputs \[B, C, L\]"):
        explain_inputs(run, torch.randn(32), ["a"], ["saliency"], tmp_path)
    png = tmp_path / "x.png"
    Image.new("L", (8, 8)).save(png)
    with pytest.raises(ValueError, match="1 spatial axes from a file is not supported"):
        explain_files(run, [str(png)], ["saliency"], tmp_path / "out")
