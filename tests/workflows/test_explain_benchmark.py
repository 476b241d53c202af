"""`cnnkit explain RUN --benchmark`: rows, ranking, report section and the CLI."""

import contextlib
import io
import json

import pytest
import torch
from torch import nn

from cnnkit.cli.main import main
from cnnkit.data import ImageData
from cnnkit.explain import _base
from cnnkit.run import Preprocess, Run
from cnnkit.training import load_run, train
from cnnkit.workflows.explain_benchmark import ROW_KEYS, benchmark_methods, write_benchmark


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    """A tiny finished run on ``shapes`` (which has object masks)."""
    runs = tmp_path_factory.mktemp("bench")
    train(model="tinyvgg", data="shapes", data_options={"n": 200, "size": 16}, epochs=2,
          batch_size=32, seed=0, name="t", runs_dir=str(runs), progress=False, device="cpu")
    return runs / "t"


def _cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse usage errors
            code = e.code
    return code, out.getvalue(), err.getvalue()


def test_rows_have_every_key_and_failures_are_noted(shapes_run):
    rows = benchmark_methods(shapes_run, methods=["saliency", "cam", "gradcam"], n_images=4,
                             steps=4)
    assert [set(r) for r in rows] == [set(ROW_KEYS)] * 3
    ok, failed = rows[:2], rows[2]
    # tinyvgg has no GAP + linear head: cam fails with its reason, ranked last, no scores
    assert failed["method"] == "cam" and failed["rank"] is None
    assert failed["note"].startswith("failed: ValueError") and failed["maps_per_s"] is None
    assert {r["method"] for r in ok} == {"saliency", "gradcam"}
    assert [r["rank"] for r in ok] == [1, 2] and ok[0]["mean_rank"] <= ok[1]["mean_rank"]
    for r in ok:
        assert r["n_images"] == 4 and r["maps_per_s"] > 0 and r["note"] == ""
        # shapes has masks, so localisation is scored; probabilities and shares lie in [0, 1]
        for key in ("deletion_auc", "insertion_auc", "pointing_game", "energy_in_mask"):
            assert 0 <= r[key] <= 1, (r["method"], key, r[key])
        assert r["sanity_correlation"] is None  # only with sanity=True


def _oracle_setup(monkeypatch):
    """A linear model whose class-0 score is the mean of the region R, images bright on R,
    and two methods registered for this test only: the exact map (R) and a random map."""
    h = w = 12
    region = torch.zeros(h, w)
    region[2:8, 3:9] = 1

    class Net(nn.Module):
        def forward(self, x):
            s = 8 * ((x[:, 0] * region).sum((1, 2)) / region.sum()) - 4
            return torch.stack([s, torch.zeros_like(s)], 1)

    class Oracle(_base.Explainer):
        def attribute(self, x, targets):
            return region.expand(x.shape[0], targets.shape[1], h, w).clone()

    class Random(_base.Explainer):
        def attribute(self, x, targets):
            g = torch.Generator().manual_seed(0)
            return torch.rand(x.shape[0], targets.shape[1], h, w, generator=g)

    monkeypatch.setitem(_base._METHODS, "oracle", Oracle)
    monkeypatch.setitem(_base._METHODS, "random", Random)
    g = torch.Generator().manual_seed(1)
    images = 0.2 * torch.rand(6, 1, h, w, generator=g)
    images[:, 0, 2:8, 3:9] = 1
    data = ImageData(images, torch.zeros(6, dtype=torch.long), ["in", "out"], "toy",
                     masks=region.expand(6, h, w).to(torch.uint8))
    run = Run(path=None, model=Net(), config=None, summary=None,
              preprocess=Preprocess((1, h, w), [0.0], [1.0], ["in", "out"]))
    return run, data


def test_a_perfect_map_beats_a_random_map(monkeypatch):
    run, data = _oracle_setup(monkeypatch)
    rows = benchmark_methods(run, methods=["random", "oracle"], n_images=6, steps=16,
                             baseline=0.0, data=data)
    by = {r["method"]: r for r in rows}
    oracle, rand = by["oracle"], by["random"]
    # deleting R first kills the class score at once; inserting R first restores it at once
    assert oracle["deletion_auc"] < rand["deletion_auc"] - 0.2
    assert oracle["insertion_auc"] > rand["insertion_auc"] + 0.2
    assert oracle["pointing_game"] == 1.0 and oracle["energy_in_mask"] == 1.0
    assert rand["energy_in_mask"] < 0.5  # R is 36 of 144 pixels
    assert [r["method"] for r in rows] == ["oracle", "random"] and oracle["mean_rank"] == 1.0


def test_report_gets_one_section_that_a_rerun_replaces(shapes_run, tmp_path):
    before = (shapes_run / "report.html").read_text()
    rows = benchmark_methods(shapes_run, methods=["saliency"], n_images=2, steps=2)
    root = tmp_path / "copy"
    root.mkdir()
    (root / "report.html").write_text(before)
    write_benchmark(root, rows)
    with pytest.raises(FileExistsError, match="benchmark.json exists"):
        write_benchmark(root, rows)  # an earlier benchmark's files are kept ...
    write_benchmark(root, rows, overwrite=True)  # ... unless asked
    page = (root / "report.html").read_text()
    assert page.count("<h2>Explanation benchmark</h2>") == 1
    head, tail = page.split("<!-- cnnkit:explain-benchmark:start -->")
    assert head == before[:before.rindex("</body>")]  # the training report is kept as it was
    assert tail.rstrip().endswith("</body></html>")
    assert json.loads((root / "benchmark.json").read_text()) == rows
    assert (root / "explain_benchmark.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_benchmark_writes_the_files(shapes_run):
    code, out, err = _cli(["explain", str(shapes_run), "--benchmark", "--method", "saliency",
                           "--method", "gradcam", "--n-images", "3", "--steps", "3"])
    assert code == 0, err
    assert "insertion AUC" in out and "gradcam" in out
    rows = json.loads((shapes_run / "benchmark.json").read_text())
    assert sorted(r["method"] for r in rows) == ["gradcam", "saliency"]
    assert (shapes_run / "explain_benchmark.png").is_file()
    assert "Explanation benchmark" in (shapes_run / "report.html").read_text()
    assert load_run(shapes_run).summary is not None  # the run still loads


@pytest.mark.parametrize("extra, message", [
    ([], "give IMAGES to explain, or --benchmark"),
    (["--benchmark", "x.png"], "IMAGES cannot be given with it"),
])
def test_cli_images_xor_benchmark_is_one_line_error(shapes_run, extra, message):
    code, out, err = _cli(["explain", str(shapes_run), *extra])
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith("cnnkit explain: error:") and message in lines[0]


class _Split:
    """A test split of signals or volumes: what ``benchmark_methods`` reads of a data set."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor) -> None:
        self.images, self.labels, self.masks = images, labels, masks

    def __len__(self) -> int:
        return len(self.images)


@pytest.mark.parametrize("spatial", [(24,), (4, 6, 6)])
def test_signals_and_volumes_are_ranked_like_images(monkeypatch, spatial):
    """The oracle setup of the images above in 1D and 3D: every score runs over all the
    spatial elements, so the exact map still wins on each."""
    region = torch.zeros(spatial)
    region[(slice(1, 3),) * len(spatial)] = 1

    class Net(nn.Module):
        def forward(self, x):
            s = 8 * ((x[:, 0] * region).flatten(1).sum(1) / region.sum()) - 4
            return torch.stack([s, torch.zeros_like(s)], 1)

    class Oracle(_base.Explainer):
        def attribute(self, x, targets):
            return region.expand(x.shape[0], targets.shape[1], *spatial).clone()

    class Random(_base.Explainer):
        def attribute(self, x, targets):
            g = torch.Generator().manual_seed(0)
            return torch.rand(x.shape[0], targets.shape[1], *spatial, generator=g)

    monkeypatch.setitem(_base._METHODS, "oracle", Oracle)
    monkeypatch.setitem(_base._METHODS, "random", Random)
    images = 0.2 * torch.rand(6, 1, *spatial, generator=torch.Generator().manual_seed(1))
    images[:, 0][:, region.bool()] = 1
    split = _Split(images, torch.zeros(6, dtype=torch.long),
                   region.expand(6, *spatial).to(torch.uint8))
    run = Run(path=None, model=Net(), config=None, summary=None, preprocess=lambda t: t)
    rows = benchmark_methods(run, methods=["random", "oracle"], n_images=6, steps=16,
                             baseline=0.0, data=split)
    by = {r["method"]: r for r in rows}
    oracle, rand = by["oracle"], by["random"]
    assert oracle["deletion_auc"] < rand["deletion_auc"] - 0.2
    assert oracle["insertion_auc"] > rand["insertion_auc"] + 0.2
    assert oracle["pointing_game"] == 1.0 and oracle["energy_in_mask"] == 1.0
    assert rand["energy_in_mask"] < 0.5
    assert [r["method"] for r in rows] == ["oracle", "random"]
