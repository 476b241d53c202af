"""The metric loggers (issue 14, point 6): csv for real, tensorboard where installed, and the
install hint of each missing package, before any data is loaded."""

from __future__ import annotations

import csv
import sys

import pytest

from cnnkit.training.loggers import check_loggers, list_loggers, open_loggers, register_logger

EPOCHS = [{"epoch": 1, "train_loss": 0.9, "val_accuracy": 0.5, "lr": 0.1},
          {"epoch": 2, "train_loss": 0.4, "val_accuracy": 0.75, "lr": 0.05}]


def test_the_registry_has_the_four_loggers_and_refuses_a_second_csv():
    assert list_loggers() == ["csv", "mlflow", "tensorboard", "wandb"]
    with pytest.raises(ValueError, match="registered twice"):
        register_logger("csv")(object)


def test_csv_writes_one_row_per_epoch_and_keeps_a_resumed_run_whole(tmp_path):
    with open_loggers(["csv"], tmp_path) as log:
        log(EPOCHS[0])
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert rows == [{k: str(v) for k, v in EPOCHS[0].items()}]
    # A resume opens the loggers again with the epochs already run, then logs the next.
    with open_loggers(["csv"], tmp_path, history=EPOCHS[:1]) as log:
        log({**EPOCHS[1], "extra": 7})
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [float(r["train_loss"]) for r in rows] == [0.9, 0.4]
    assert rows[0]["extra"] == "" and rows[1]["extra"] == "7"


def test_unknown_logger_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown logger 'csvv'; choose from csv, mlflow"):
        check_loggers(["csvv"])


@pytest.mark.parametrize("name, modules, hint", [
    ("tensorboard", ("tensorboard", "torch.utils.tensorboard"), 'pip install -e ".[loggers]"'),
    ("mlflow", ("mlflow",), "pip install mlflow"),
    ("wandb", ("wandb",), "pip install wandb")])
def test_a_missing_package_is_one_line_with_its_install_command(monkeypatch, name, modules,
                                                                 hint):
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails
    with pytest.raises(ValueError) as info:
        check_loggers(["csv", name])
    message = str(info.value)
    assert "\n" not in message and f"--logger {name}" in message and hint in message


def test_tensorboard_writes_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    with open_loggers(["tensorboard"], tmp_path) as log:
        for metrics in EPOCHS:
            log(metrics)
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    read = EventAccumulator(str(tmp_path / "tensorboard"))
    read.Reload()
    assert sorted(read.Tags()["scalars"]) == ["lr", "train_loss", "val_accuracy"]
    loss = read.Scalars("train_loss")
    assert [e.step for e in loss] == [1, 2]
    assert [e.value for e in loss] == pytest.approx([0.9, 0.4])
