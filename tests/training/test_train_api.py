"""`cnnkit.train(...)` (issue 14, point 6): data held in memory (arrays or a Dataset), the
result that is both the summary and the run folder, and a run whose data is not on disk.
(Named test_train_api: tests/web has a test_api.)"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import yaml

import cnnkit
from cnnkit._limits import MemoryLimitError
from cnnkit.data import load_data
from cnnkit.data.arrays import IN_MEMORY, samples_from
from cnnkit.training.api import TrainResult


def _digits() -> tuple[np.ndarray, np.ndarray]:
    d = load_data("digits")
    return d.images[:, 0].numpy(), d.labels.numpy()  # [N, H, W] uint8, as NumPy users hold them


OPTIONS = {"model": "tinyvgg", "epochs": 1, "batch_size": 64, "augment": "digits",
           "progress": False}


@pytest.fixture(scope="module")
def memory_run(tmp_path_factory):
    x, y = _digits()
    runs = tmp_path_factory.mktemp("memory")
    return cnnkit.train(data=(x, y), runs_dir=str(runs), loggers=("csv",), **OPTIONS)


def test_arrays_train_a_run_and_the_result_is_summary_and_path(memory_run):
    assert isinstance(memory_run, TrainResult) and isinstance(memory_run, dict)
    assert memory_run.path.name == "tinyvgg-memory" and memory_run.path.is_dir()
    assert memory_run["run_dir"] == os.fspath(memory_run) == str(memory_run.path)
    saved = json.loads((memory_run.path / "summary.json").read_text())
    assert dict(memory_run) == saved and "run_dir" not in saved
    assert memory_run["input_size"] == [1, 8, 8]
    run = cnnkit.load_run(memory_run)
    assert run.config.data == IN_MEMORY and run.config.model == "tinyvgg"


def test_arrays_give_the_run_their_data_set_gives(memory_run, tmp_path):
    """The digits as arrays train exactly as `data="digits"`: same split, same numbers."""
    reference = cnnkit.train(data="digits", runs_dir=str(tmp_path), **OPTIONS)
    for key in ("test_accuracy", "test_loss", "num_samples", "best_val_accuracy"):
        assert memory_run[key] == reference[key], key


def test_the_config_of_a_memory_run_stays_valid_and_eval_asks_for_data(memory_run, cli,
                                                                        one_line_error):
    config = yaml.safe_load((memory_run.path / "config.yaml").read_text())
    assert config["data"] == "<in-memory>" and config["loggers"] == ["csv"]
    line = one_line_error(*cli(["eval", str(memory_run.path)])[::2])
    assert "<in-memory>" in line and "--data PATH" in line


def test_the_csv_logger_gets_what_metrics_jsonl_gets(memory_run):
    jsonl = [json.loads(s) for s in (memory_run.path / "metrics.jsonl").read_text().splitlines()]
    rows = (memory_run.path / "metrics.csv").read_text().splitlines()
    assert rows[0].split(",") == list(jsonl[0])
    assert [float(r.split(",")[1]) for r in rows[1:]] == [m[rows[0].split(",")[1]]
                                                         for m in jsonl]


@pytest.mark.parametrize("layout", ["numpy [N,H,W]", "numpy [N,H,W,C]", "torch [N,C,H,W]",
                                    "torch float [N,C,L]"])
def test_array_layouts(layout):
    rng = np.random.default_rng(0)
    labels = np.arange(12) % 3
    x = {"numpy [N,H,W]": rng.integers(0, 256, (12, 5, 7), dtype=np.uint8),
         "numpy [N,H,W,C]": rng.integers(0, 256, (12, 5, 7, 3), dtype=np.uint8),
         "torch [N,C,H,W]": torch.randint(0, 256, (12, 3, 5, 7), dtype=torch.uint8),
         "torch float [N,C,L]": torch.rand(12, 2, 9)}[layout]
    d = samples_from((x, torch.as_tensor(labels)))
    size = {"numpy [N,H,W]": (1, 5, 7), "numpy [N,H,W,C]": (3, 5, 7),
            "torch [N,C,H,W]": (3, 5, 7), "torch float [N,C,L]": (2, 9)}[layout]
    assert d.input_size == size and d.classes == ["0", "1", "2"]
    assert torch.equal(d.labels, torch.as_tensor(labels))
    if layout == "numpy [N,H,W,C]":  # channels moved first, values kept
        assert torch.equal(d.inputs[4, 2], torch.from_numpy(x[4, :, :, 2]))


def test_a_dataset_is_read_once_into_samples():
    class Pairs(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return torch.full((1, 4, 4), i / 10), i % 2

    d = samples_from(Pairs())
    assert d.input_size == (1, 4, 4) and d.labels.tolist() == [0, 1] * 5
    assert d.inputs.dtype == torch.float32 and float(d.inputs[3, 0, 0, 0]) == pytest.approx(0.3)


def test_a_dataset_too_large_is_refused_before_reading_it(monkeypatch):
    reads = []

    class Huge(torch.utils.data.Dataset):
        def __len__(self):
            return 10**7

        def __getitem__(self, i):
            reads.append(i)
            return np.zeros((3, 64, 64), np.uint8), 0

    monkeypatch.setenv("CNNKIT_MEMORY_LIMIT", "1GB")
    with pytest.raises(MemoryLimitError, match="Dataset of 10000000 items"):
        samples_from(Huge())
    assert reads == [0]


def test_masks_and_values_by_task():
    x = torch.randint(0, 256, (6, 1, 4, 4), dtype=torch.uint8)
    masks = torch.zeros(6, 4, 4, dtype=torch.uint8)
    masks[:, :2] = 2
    d = samples_from((x, masks), "masks")
    assert torch.equal(d.masks, masks) and d.mask_classes == ["0", "1", "2"]
    assert d.labels.tolist() == [2] * 6
    v = samples_from((x, np.linspace(0, 1, 6)), "values")
    assert v.values.shape == (6, 1) and v.classes == ["value"]


@pytest.mark.parametrize("data, needle", [
    (([1, 2], [0, 1]), "give N >= 1 samples as [N, C, *spatial]"),
    ((np.full((4, 1, 3, 3), 2.0), [0, 1, 0, 1]), "scale them to [0, 1]"),
    ((np.zeros((4, 1, 3, 3), np.uint8), [0, 1, 0]), "4 samples in x but 3 targets"),
    ({"x": 1}, "arrays (x, y) or a torch.utils.data.Dataset"),
])
def test_bad_arrays_are_one_line_with_the_fix(data, needle):
    with pytest.raises(ValueError) as info:
        samples_from(data)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_summary_takes_a_model_name():
    by_name = cnnkit.summary("lenet5", (1, 32, 32))
    built = cnnkit.summary(cnnkit.create_model("lenet5", input_size=(1, 32, 32)), (1, 32, 32))
    assert (by_name.total_params, by_name.total_macs) == (built.total_params, built.total_macs)
    with pytest.raises(ValueError, match="unknown model 'lenet6'.*lenet5"):
        cnnkit.summary("lenet6", (1, 32, 32))
