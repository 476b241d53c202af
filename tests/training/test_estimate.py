"""A long run says so up front (issue 14): the estimate from measured steps, the MACs from
the operator registry, and the one line a run prints when it is over the threshold."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from cnnkit.analysis.summary import summary
from cnnkit.models import create_model
from cnnkit.training import TrainConfig, Trainer
from cnnkit.training.estimate import (
    FORWARD_SHARE,
    LONG_RUN_ENV,
    RunEstimate,
    count_macs,
    estimate_seconds,
    long_run_message,
    long_run_minutes,
)

LINE = "this run will take about"


def test_the_estimate_is_the_training_steps_plus_the_forward_share_of_evaluation():
    assert estimate_seconds(2.0, train_steps=100, eval_batches=30) == pytest.approx(
        2.0 * (100 + 30 * FORWARD_SHARE))
    assert estimate_seconds(0.5, 10, 0, forward_share=0.5) == 5.0
    assert FORWARD_SHARE == pytest.approx(1 / 3)


class _Batches:
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


def _fake_run(epochs=3, steps=50, val=10, test=10, epoch=0, partial=None):
    """What RunEstimate reads of a trainer, with 50 steps and 10 + 10 evaluation batches."""
    return SimpleNamespace(device=torch.device("cpu"), config=SimpleNamespace(epochs=epochs),
                           train_loader=_Batches(steps), val_loader=_Batches(val),
                           test_loader=_Batches(test), epoch=epoch, partial=partial)


@pytest.mark.parametrize("epoch, partial, done", [(0, None, 0), (1, {"step": 20}, 70)],
                         ids=["new", "resumed-within-epoch-2"])
def test_run_estimate_times_the_steps_after_the_first(epoch, partial, done):
    """Injected clock readings: the first step (warm-up) is not timed, the next 3 are; the
    estimate covers what is left of the run, a resumed one's saved steps excluded."""
    said = []
    run = _fake_run(epoch=epoch, partial=partial)
    est = RunEstimate(run, said.append, minutes=1e9)
    for now in (100.0, 101.0, 103.0, 106.0):  # steps of 1, 2 and 3 s after the first
        est.step(now)
    left = 3 * 50 - done - 1
    assert est.seconds == pytest.approx(estimate_seconds(2.0, left, (3 - epoch) * 10 + 10))
    est.step(1000.0)  # made once
    assert est.seconds == pytest.approx(estimate_seconds(2.0, left, (3 - epoch) * 10 + 10))
    assert said == []  # under the threshold


def test_the_threshold_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(LONG_RUN_ENV, raising=False)
    assert long_run_minutes() == 10.0
    monkeypatch.setenv(LONG_RUN_ENV, "2.5")
    assert long_run_minutes() == 2.5
    for bad in ("soon", "-1", "inf"):
        monkeypatch.setenv(LONG_RUN_ENV, bad)
        with pytest.raises(ValueError, match=LONG_RUN_ENV):
            long_run_minutes()


@pytest.mark.parametrize("name, input_size, kwargs", [
    ("unet_small", (3, 32, 32), {"num_classes": 3}),
    ("resnet18", (1, 8, 8), {"num_classes": 10}),
    ("lenet5", (1, 8, 8), {"num_classes": 10}),
])
def test_count_macs_equals_the_model_summary(name, input_size, kwargs):
    """The same operator facts as `cnnkit summary`, counted on the meta device."""
    build = lambda: create_model(name, in_chans=input_size[0], img_size=input_size[1:],  # noqa: E731
                                 **kwargs)
    assert count_macs(build, input_size) == summary(build(), input_size).total_macs > 0


def test_count_macs_of_a_given_model_leaves_it_alone():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 5 * 5, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert count_macs(model, (2, 5, 5)) == 4 * 25 * 2 * 9 + 100 * 3  # analytic
    assert all(torch.equal(before[k], v) and v.device.type == "cpu"
               for k, v in model.state_dict().items())


def test_the_line_says_how_long_why_and_what_is_faster():
    line = long_run_message(2820, "cpu", "unet", 31_030_000, 3_013_000_000, 2.1, 64,
                            ("unet_small", 190_000_000))
    assert line == ("this run will take about 47 min on this cpu (unet: 31.0 M parameters, "
                    "3.01 GMACs per sample, 2.1 s per step of 64); faster: --model unet_small "
                    "(0.19 GMACs), fewer --epochs, a smaller --image-size, or a GPU")
    gpu = long_run_message(3 * 3600, "cuda", "resnet50", 25_600_000, None, 0.25, 256, None)
    assert "about 3.0 h on this cuda" in gpu and "GMACs" not in gpu and "GPU" not in gpu
    assert gpu.endswith("faster: fewer --epochs, or a smaller --image-size")


def _digits(tmp_path, **kw) -> TrainConfig:
    return TrainConfig(data="digits", epochs=1, batch_size=128, device="cpu",
                       runs_dir=str(tmp_path), **kw)


def test_a_long_run_says_so_once_with_the_cheaper_default_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(LONG_RUN_ENV, "0.0001")  # every run is long
    trainer = Trainer(_digits(tmp_path, model="resnet18", name="long"), progress=False)
    trainer.fit()
    lines = [x for x in capsys.readouterr().err.splitlines() if LINE in x]
    assert len(lines) == 1, lines
    default = trainer.task.defaults.model
    assert default == "tinyvgg_wide"
    assert "on this cpu (resnet18: 11.2 M parameters, 0.0347 GMACs per sample" in lines[0]
    assert f"faster: --model {default} (0.0036 GMACs), fewer --epochs" in lines[0]
    assert trainer.estimate.seconds > 0


def test_a_short_run_says_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(LONG_RUN_ENV, raising=False)
    trainer = Trainer(_digits(tmp_path, model="lenet5", name="short"), progress=False)
    trainer.fit()
    assert LINE not in capsys.readouterr().err
    assert 0 < trainer.estimate.seconds < 600
