"""The regression task: values per sample, MSE/MAE/R^2 (checked against scikit-learn), a
headline metric that improves downwards, and a run through train, eval and predict."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

from cnnkit.tasks import create_task
from cnnkit.tasks.regress import regression_scores


def test_scores_equal_scikit_learn():
    rng = np.random.default_rng(0)
    t = rng.normal(size=(50, 3))
    p = t + rng.normal(scale=0.5, size=(50, 3))
    s = regression_scores(torch.from_numpy(p), torch.from_numpy(t))
    assert s["mse"] == pytest.approx(mean_squared_error(t, p), rel=1e-12)
    assert s["mae"] == pytest.approx(mean_absolute_error(t, p), rel=1e-12)
    assert s["r2"] == pytest.approx(r2_score(t, p), rel=1e-12)
    assert s["r2_per_output"] == pytest.approx(r2_score(t, p, multioutput="raw_values"))
    const = torch.ones(4, 1)
    assert regression_scores(const, const)["r2"] == 1.0  # exact on a constant: 1
    assert regression_scores(const * 2, const)["r2"] == 0.0  # wrong on a constant: 0


def test_lower_is_better_picks_the_smallest_error():
    task = create_task("regress")
    assert task.improved(0.5, None) and task.improved(0.4, 0.5) and not task.improved(0.6, 0.5)
    classify = create_task("classify")
    assert classify.improved(0.6, 0.5) and not classify.improved(0.4, 0.5)


@pytest.fixture(scope="module")
def brightness(tmp_path_factory):
    """Noisy 8x8 images whose mean brightness is the target value (in [0, 1])."""
    root = tmp_path_factory.mktemp("regress")
    rng = np.random.default_rng(0)
    y = rng.uniform(0.1, 0.9, size=300).astype(np.float32)
    x = np.clip(y[:, None, None] + rng.normal(scale=0.05, size=(300, 8, 8)), 0, 1)
    np.savez(root / "bright.npz", x=x.astype(np.float32), y=y, classes=np.array(["brightness"]))
    return root


def test_a_regression_run_learns_and_is_evaluated_and_predicted(cli, brightness, tmp_path):
    data = brightness / "bright.npz"
    code, out, err = cli(["train", "--task", "regress", "--data", str(data), "--model",
                          "lenet5", "--epochs", "15", "--batch-size", "32", "--runs-dir",
                          str(tmp_path), "--name", "r", "--json", "--no-progress"])
    assert code == 0, err
    summary = json.loads(out)
    assert summary["task"] == "regress" and summary["classes"] == ["brightness"]
    assert summary["test_r2"] > 0.9 and summary["test_mse"] < 0.01
    history = [json.loads(m) for m in (tmp_path / "r" / "metrics.jsonl").read_text().split("\n")
               if m]
    best = min(range(len(history)), key=lambda i: history[i]["val_mse"])
    assert summary["best_epoch"] == best + 1  # the lowest validation MSE, not the highest
    code, out, err = cli(["eval", str(tmp_path / "r"), "--json"])
    assert code == 0, err
    assert json.loads(out)["test_mse"] == pytest.approx(summary["test_mse"], rel=1e-5)
    img = tmp_path / "grey.png"
    Image.fromarray(np.full((8, 8), 200, np.uint8)).save(img)
    code, out, err = cli(["predict", str(tmp_path / "r"), str(img), "--json"])
    assert code == 0, err
    value = json.loads(out)[0]["values"]["brightness"]
    assert value == pytest.approx(200 / 255, abs=0.1)
    assert "Predicted against true values" in (tmp_path / "r" / "report.html").read_text()


def test_regression_needs_values(cli, one_line_error, tmp_path):
    np.savez(tmp_path / "words.npz", x=np.zeros((6, 8, 8), np.uint8), y=np.array(["a"] * 6))
    line = one_line_error(*cli(["train", "--task", "regress", "--data",
                                str(tmp_path / "words.npz"), "--runs-dir", str(tmp_path)])[::2])
    assert "regression values must be numbers" in line
    line = one_line_error(*cli(["train", "--task", "regress", "--runs-dir",
                                str(tmp_path)])[::2])
    assert "task regress has no built-in data set" in line and "--data" in line
