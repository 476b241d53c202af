"""`cnnkit train --nproc N` (torchrun underneath) and the fast-path flags."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from cnnkit.cli.commands import _without_nproc

ARGS = ["--model", "lenet5", "--data", "digits", "--epochs", "2", "--batch-size", "64",
        "--optimizer", "adamw", "--lr", "3e-3", "--augment", "none", "--amp", "off",
        "--seed", "0", "--no-progress"]


@pytest.mark.skipif(not (torch.distributed.is_available()
                          and torch.distributed.is_gloo_available()),
                    reason="this PyTorch build has no gloo backend")
def test_nproc_launches_torchrun_and_equals_one_process(tmp_path, cli, cnnkit_subprocess):
    res = cnnkit_subprocess("train", *ARGS, "--nproc", "2", "--runs-dir", str(tmp_path / "d"),
                            "--name", "r", timeout=180)
    assert res.returncode == 0, res.stderr
    # rank 0 alone reports: one result line on stdout, one run line, one line per epoch
    assert res.stdout.count("test_accuracy") == 1, res.stdout
    lines = res.stderr.splitlines()
    assert sum(line.startswith("run ") for line in lines) == 1, res.stderr
    assert sum(line.startswith("epoch   1/2") for line in lines) == 1, res.stderr
    assert "torchrun --standalone --nproc_per_node 2 -m cnnkit train" in res.stderr
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["r"]
    code, _, err = cli(["train", *ARGS, "--runs-dir", str(tmp_path / "s"), "--name", "r"])
    assert code == 0, err
    two, one = tmp_path / "d" / "r", tmp_path / "s" / "r"
    assert json.loads((two / "summary.json").read_text())["processes"] == 2
    rows2, rows1 = ([json.loads(row) for row in (run / "metrics.jsonl").read_text().splitlines()]
                    for run in (two, one))
    for a, b in zip(rows2, rows1, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["val_accuracy"] == b["val_accuracy"]
    # the saved config is the run's, with no trace of --nproc: it resumes with any count
    cfg2, cfg1 = (yaml.safe_load((run / "config.yaml").read_text()) for run in (two, one))
    assert cfg2.pop("runs_dir") != cfg1.pop("runs_dir") and cfg2 == cfg1


@pytest.mark.parametrize("argv", [
    ["train", "--nproc", "2", "--epochs", "1"],
    ["train", "--nproc=2", "--epochs", "1"],
    ["train", "--np", "2", "--epochs", "1"],
    ["train", "--epochs", "1", "--nproc", "2"],
])
def test_without_nproc_drops_every_spelling(argv):
    assert _without_nproc(argv) == ["train", "--epochs", "1"]


def test_nproc_under_torchrun_is_an_error(monkeypatch, cli, one_line_error):
    monkeypatch.setenv("LOCAL_RANK", "0")
    line = one_line_error(*cli(["train", "--nproc", "2"])[::2])
    assert "under torchrun leave it out" in line


def test_nproc_needs_a_batch_that_splits_evenly(cli, one_line_error, shared_run):
    line = one_line_error(*cli(["train", "--nproc", "3", "--batch-size", "64"])[::2])
    assert "multiple of 3" in line
    # --resume takes --nproc (the count is not part of the run), and checks the saved batch
    line = one_line_error(*cli(["train", "--resume", str(shared_run.path), "--nproc", "3"])[::2])
    assert "batch size 32" in line and "multiple of 3" in line


def test_fast_flags_reach_the_config_and_a_failed_compile_falls_back(tmp_path, cli,
                                                                      monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler\nsecond line")

    monkeypatch.setattr(torch, "compile", broken)
    # --fast compiles on CUDA only; --compile asks for it on the CPU too
    code, out, err = cli(["train", "--model", "lenet5", "--epochs", "1", "--fast", "--compile",
                          "--sync-bn", "--no-progress", "--runs-dir", str(tmp_path), "--name",
                          "f"])
    assert code == 0, err
    warning = [line for line in err.splitlines() if "torch.compile" in line]
    assert warning == ["cnnkit: warning: torch.compile is not available (RuntimeError: no C++ "
                       "compiler second line); training eagerly"]
    cfg = yaml.safe_load((tmp_path / "f" / "config.yaml").read_text())
    assert cfg["fast"] and cfg["compile"] and cfg["channels_last"] and cfg["sync_bn"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_nproc_on_two_gpus_with_nccl_and_sync_bn(tmp_path, cnnkit_subprocess):
    res = cnnkit_subprocess("train", "--model", "wide_resnet", "--model-opt", "depth=10",
                            "--model-opt", "widen_factor=1", "--epochs", "2", "--sync-bn",
                            "--device", "cuda", "--nproc", "2", "--no-progress", "--json",
                            "--runs-dir", str(tmp_path), "--name", "g", timeout=300)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["processes"] == 2 and summary["device"] == "cuda:0"
    assert summary["test_accuracy"] > 0.5
