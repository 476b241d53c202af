"""The reliability catalogue, resuming after a failure (issue 12, point 6): the NaN message's
advice (a lower ``--lr``, ``--grad-clip``) can be applied with ``--resume``; the run goes on
from its last good epoch, and the change is recorded in the run."""

from __future__ import annotations

import json
import math
import re

import pytest
import yaml

import cnnkit.training.optim as optim_module
from cnnkit.training import TrainConfig, Trainer, train

ARGS = ["--model", "lenet5", "--epochs", "3", "--batch-size", "128", "--no-progress"]
STEPS = 1438 // 128  # digits' training split, drop_last


def _diverge_in_epoch_2(monkeypatch):
    """A schedule that multiplies the learning rate by 1e30 from epoch 2 on: a real
    divergence (the built-in schedules never jump)."""
    real = optim_module.lr_factor

    def explode(step, total, warmup, schedule):
        return real(step, total, warmup, schedule) * (1e30 if step >= total // 2 else 1)

    monkeypatch.setattr(optim_module, "lr_factor", explode)


def test_the_nan_advice_works_with_resume(cli, one_line_error, tmp_path, monkeypatch):
    _diverge_in_epoch_2(monkeypatch)
    code, _, err = cli(["train", *ARGS, "--name", "nan", "--runs-dir", str(tmp_path)])
    monkeypatch.undo()
    run = tmp_path / "nan"
    line = one_line_error(code, err)
    advice = re.search(r"cnnkit train (--resume \S+ --lr \S+ --grad-clip \S+)", line)
    assert advice, line
    code, out, err = cli(["train", *advice.group(1).split(), "--no-progress", "--json"])
    assert code == 0, err
    summary = json.loads(out)
    lr = float(advice.group(1).split()[3])
    assert summary["epochs_run"] == 3 and math.isfinite(summary["test_loss"])
    assert summary["resumes"] == [{"epoch": 1, "changed": {"lr": [None, lr],
                                                           "grad_clip": [None, 1.0]}}]
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["lr"] == lr and config["grad_clip"] == 1.0 and config["model"] == "lenet5"
    history = [json.loads(m) for m in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in history] == [1, 2, 3]
    # epoch 2 ran the unchanged schedule at the new peak: lr x factor(its last step)
    factor = optim_module.lr_factor(2 * STEPS, 3 * STEPS, STEPS, "onecycle")
    assert 0 < factor < 1 and history[1]["lr"] == pytest.approx(lr * factor, rel=1e-9)


def test_a_new_peak_learning_rate_rescales_the_rest_of_the_schedule(tmp_path):
    """Resuming with lr=x equals the schedule x * factor(step) from the resumed step on; with
    nothing changed the resumed run is the uninterrupted one (recorded as no change)."""
    cfg = TrainConfig(model="lenet5", data="digits", epochs=3, batch_size=128, lr=0.05,
                      runs_dir=str(tmp_path), name="r")

    def stop_after_one(trainer, epoch, metrics):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, progress=False, callbacks=[stop_after_one]).fit()
    seen = []
    resumed = Trainer(resume=tmp_path / "r", overrides={"lr": 0.02}, progress=False,
                      callbacks=[lambda t, e, m: seen.append(t.optimizer.param_groups[0]["lr"])])
    total, warmup = 3 * STEPS, STEPS
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(
        0.02 * optim_module.lr_factor(STEPS, total, warmup, "onecycle"))
    resumed.fit()
    assert seen == pytest.approx([0.02 * optim_module.lr_factor(e * STEPS, total, warmup,
                                                                "onecycle") for e in (2, 3)])
    assert resumed.resumes == [{"epoch": 1, "changed": {"lr": [0.05, 0.02]}}]


def test_train_resume_takes_the_safe_options_by_name(tmp_path):
    summary = train(model="lenet5", data="digits", epochs=1, batch_size=128,
                    runs_dir=str(tmp_path), name="p", progress=False)
    again = train(resume=tmp_path / "p", epochs=2, grad_clip=5.0, progress=False)
    assert again["epochs_run"] == 2 and summary["epochs_run"] == 1
    assert again["resumes"] == [{"epoch": 1, "changed": {"epochs": [1, 2],
                                                         "grad_clip": [None, 5.0]}}]
    with pytest.raises(ValueError, match="so data, seed cannot change"):
        train(resume=tmp_path / "p", data="shapes", seed=3)
    with pytest.raises(ValueError, match="has trained 2 epochs already; give --epochs 2"):
        train(resume=tmp_path / "p", epochs=1)


@pytest.mark.parametrize("argv, needle", [
    (["--lr", "0"], "--lr"),
    (["--grad-clip", "-1"], "--grad-clip"),
    (["--amp", "fp64"], "invalid choice"),
], ids=["lr-zero", "clip-negative", "amp"])
def test_a_resume_with_an_invalid_override_is_one_line(cli, one_line_error, shared_run, argv,
                                                       needle):
    line = one_line_error(*cli(["train", "--resume", str(shared_run.path), *argv])[::2])
    assert needle in line
