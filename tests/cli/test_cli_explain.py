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


# -- method options, --method all, degenerate maps ------------------------------------------

def test_opt_reaches_the_method(cli, shared_run, digit_files, tmp_path):
    out = tmp_path / "ex"
    code, _, err = cli(["explain", str(shared_run.path), *digit_files, "--method", "occlusion",
                        "--opt", "window=3", "--opt", "stride=1", "--target", "3",
                        "--out", str(out)])
    assert code == 0, err
    run = load_run(shared_run.path)
    x = torch.stack([run.preprocess(f) for f in digit_files])
    expect = create("occlusion", run.model, window=3, stride=1)(x, 3)
    assert np.allclose(np.load(out / "d0_occlusion.npy"), expect[0].numpy(), atol=1e-6)
    default = create("occlusion", run.model)(x, 3)
    assert not np.allclose(np.load(out / "d0_occlusion.npy"), default[0].numpy(), atol=1e-6)


def test_default_occlusion_of_a_digit_localises_without_warning(cli, shared_run, digit_files,
                                                                tmp_path):
    """The complaint: occlusion on the 8x8 digits run gave one colour everywhere, silently."""
    out = tmp_path / "ex"
    code, _, err = cli(["explain", str(shared_run.path), digit_files[0], "--method", "occlusion",
                        "--out", str(out)])
    assert code == 0, err
    m = np.load(out / "d0_occlusion.npy")
    assert m.shape == (8, 8) and m.max() > m.min()
    assert "warning" not in err


def test_a_window_covering_the_digit_warns_in_one_line(cli, shared_run, digit_files, tmp_path):
    code, _, err = cli(["explain", str(shared_run.path), digit_files[0], "--method", "occlusion",
                        "--opt", "window=8", "--out", str(tmp_path / "ex")])
    assert code == 0, err
    lines = [line for line in err.splitlines() if "warning" in line]
    assert len(lines) == 1
    assert lines[0].startswith("cnnkit: warning: occlusion: 1 of 1 maps are constant")
    assert "window 8x8 covers the whole 8x8 input" in lines[0]
    assert "--opt window=2" in lines[0]


def test_bad_opt_is_one_line_listing_the_valid_options(cli, shared_run, digit_files,
                                                       one_line_error, tmp_path):
    line = one_line_error(*cli(["explain", str(shared_run.path), digit_files[0], "--method",
                                "occlusion", "--opt", "windw=3",
                                "--out", str(tmp_path / "ex")])[::2])
    assert "unknown option 'windw'" in line
    assert "occlusion: window, stride, baseline, internal_batch_size, masking" in line
    assert not (tmp_path / "ex").exists()  # refused before any work
    line = one_line_error(*cli(["explain", str(shared_run.path), digit_files[0], "--method",
                                "gradcam", "--opt", "steps=3"])[::2])
    assert "unknown option 'steps'" in line and "gradcam: none" in line
    line = one_line_error(*cli(["explain", str(shared_run.path), digit_files[0], "--method",
                                "occlusion", "--opt", "window"])[::2])
    assert "KEY=VALUE" in line
    line = one_line_error(*cli(["explain", str(shared_run.path), digit_files[0], "--method",
                                "occlusion", "--opt", "window=0",
                                "--out", str(tmp_path / "ex2")])[::2])
    assert "window must be positive" in line


def test_method_all_writes_every_applicable_method_and_one_grid(cli, shared_run, digit_files,
                                                               tmp_path):
    from cnnkit.explain import list_methods

    out = tmp_path / "all"
    code, stdout, err = cli(["explain", str(shared_run.path), *digit_files, "--method", "all",
                             "--out", str(out)])
    assert code == 0, err
    skipped = {m for m in list_methods() if f"warning: {m} skipped" in err}
    ran = [m for m in list_methods() if m not in skipped]
    assert len(ran) >= len(list_methods()) - 2 and "occlusion" in ran and "gradcam" in ran
    names = {p.name for p in out.iterdir()}
    for m in ran:
        assert {f"d0_{m}.npy", f"d0_{m}.png", f"d1_{m}.npy", f"d1_{m}.png"} <= names
    for m in skipped:
        assert f"d0_{m}.npy" not in names
    assert "grid.png" in names
    # one column per method that ran, plus the inputs: the grid is wide
    grid = Image.open(out / "grid.png")
    assert grid.size[0] > 100 * (1 + len(ran)) and grid.size[1] > 200


# -- inputs: files, folders, globs ----------------------------------------------------------

def test_explain_takes_folders_and_globs(cli, shared_run, digit_files, tmp_path):
    from pathlib import Path

    folder = Path(digit_files[0]).parent
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "f"
    code, _, err = cli(["explain", str(shared_run.path), str(folder), "--method", "saliency",
                        "--out", str(out)])
    assert code == 0, err
    assert sorted(p.name for p in out.glob("*.npy")) == ["d0_saliency.npy", "d1_saliency.npy"]
    out = tmp_path / "g"
    code, _, err = cli(["explain", str(shared_run.path), str(folder / "d1.*"), "--method",
                        "saliency", "--out", str(out)])
    assert code == 0, err
    assert sorted(p.name for p in out.glob("*.npy")) == ["d1_saliency.npy"]


# -- segmentation keeps the input's size and aspect ----------------------------------------

SEG = ["--task", "segment", "--data", "shapes", "--data-opt", "n=60", "--data-opt", "size=24",
       "--model", "unet", "--model-opt", "width=4", "--model-opt", "depth=2", "--epochs", "1",
       "--batch-size", "16", "--no-progress"]


@pytest.fixture(scope="module")
def small_seg_run(tmp_path_factory):
    from cnnkit.cli.main import main

    runs = tmp_path_factory.mktemp("segruns")
    assert main(["train", *SEG, "--runs-dir", str(runs), "--name", "seg"]) == 0
    return runs / "seg"


def test_segment_explanations_keep_the_photos_size(cli, small_seg_run, tmp_path):
    """A 40x27 photo (not a multiple of the U-Net's stride, not the 24x24 training size) is
    explained at 40x27: maps of shape (27, 40), overlays of that aspect."""
    rng = np.random.default_rng(0)
    pic = rng.integers(0, 60, (27, 40, 3)).astype(np.uint8)
    pic[5:20, 8:30] = (230, 40, 40)
    img = tmp_path / "wide.png"
    Image.fromarray(pic).save(img)
    out = tmp_path / "ex"
    code, _, err = cli(["explain", str(small_seg_run), str(img), "--method", "gradcam",
                        "--method", "saliency", "--method", "occlusion", "--out", str(out)])
    assert code == 0, err
    for m in ("gradcam", "saliency", "occlusion"):
        assert np.load(out / f"wide_{m}.npy").shape == (27, 40)
    # the overlay keeps the aspect (the colour bar adds width, never height)
    w, h = Image.open(out / "wide_saliency.png").size
    assert w > h
    # the saliency map is the gradient of the score counted on the photo's own pixels
    run = load_run(small_seg_run)
    x = run.preprocess.normalize(torch.from_numpy(pic).permute(2, 0, 1).float() / 255)
    from cnnkit.models._dense import pad_to_multiple
    from cnnkit.workflows.explain import Cropped

    padded, sizes = pad_to_multiple(x[None], run.model.size_multiple)
    expect = create("saliency", Cropped(run.model, sizes), task="segment")(padded)
    assert np.allclose(np.load(out / "wide_saliency.npy"), expect[0, :27, :40].numpy(),
                       atol=1e-5)
