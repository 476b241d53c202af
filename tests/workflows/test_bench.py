"""Tests of cnnkit.workflows.bench (`cnnkit bench`): FLOP counts against analytic cases, the
hand-written loop against the Trainer's eager step (same math, so their speed ratio is
fair), the quick command's JSON contract and MFU bound, and the docs section writer."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from torch import nn

from cnnkit.analysis import summary
from cnnkit.cli.main import main
from cnnkit.workflows.bench import BenchConfig, run_bench
from cnnkit.workflows.bench.peak import ConvShape, conv2d_flops, matmul_flops
from cnnkit.workflows.bench.report import DOCS_INTRO, write_section
from cnnkit.workflows.bench.training import build_runners, timed_round, training_flops

CPU = torch.device("cpu")


# -- FLOP counting ---------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 7, 64])
def test_matmul_flops_is_two_per_multiply_add(n):
    # [n, n] @ [n, n]: n^2 outputs, each a sum of n products. The same product as a 1x1
    # convolution of n samples with n channels, counted by cnnkit.analysis.summary.
    assert matmul_flops(n) == 2 * n ** 3
    macs = summary(nn.Conv2d(n, n, 1, bias=False), (n, 1, 1), batch_size=n).total_macs
    assert matmul_flops(n) == 2 * macs


@pytest.mark.parametrize("shape", [ConvShape(1, 8, 4), ConvShape(2, 16, 8),
                                   ConvShape(3, 4, 5, kernel=5)])
def test_conv_flops_match_analytic_count_and_summary(shape):
    b, c, s, k = shape.batch, shape.channels, shape.size, shape.kernel
    assert conv2d_flops(shape) == 2 * (b * c * s * s) * (c * k * k)
    conv = nn.Conv2d(c, c, k, padding=k // 2, bias=False)
    assert conv2d_flops(shape) == 2 * summary(conv, (c, s, s), batch_size=b).total_macs


def test_training_flops_are_three_forward_passes():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.Flatten(),
                        nn.Linear(8 * 4 * 4, 10, bias=False))
    forward_macs = 8 * 4 * 4 * 3 * 9 + 8 * 4 * 4 * 10
    assert training_flops(net, (3, 4, 4)) == 3 * 2 * forward_macs


# -- the plain loop does the Trainer's math ----------------------------------------------------

def test_plain_loop_and_trainer_eager_take_the_same_steps(tmp_path):
    # One full batch per round: the two loops shuffle differently, but a full batch has
    # the same samples either way, so (without augmentation) each round must give the
    # same loss: the same initial weights, normalisation, loss, optimiser and schedule.
    cfg = BenchConfig(models=("tinyvgg",), batch_size=64, steps=1, rounds=5, num_classes=2,
                      image_size=16, augment="none", memory=False)
    runners = build_runners("tinyvgg", cfg, CPU, 1, str(tmp_path),
                            modes=("trainer_eager", "plain"))
    assert {r.steps for r in runners.values()} == {1}
    losses = {mode: np.array([timed_round(r, CPU)[1] for _ in range(6)])
              for mode, r in runners.items()}
    assert losses["plain"] == pytest.approx(losses["trainer_eager"], rel=1e-6)
    # The loss moves slowly on random labels, so compare what each step changed: a
    # different learning rate, schedule, momentum or decay would change these by far
    # more than 1%.
    steps_plain, steps_trainer = np.diff(losses["plain"]), np.diff(losses["trainer_eager"])
    assert np.all(steps_trainer < -1e-5)
    assert steps_plain == pytest.approx(steps_trainer, rel=1e-2)


# -- the command -------------------------------------------------------------------------------

TRAINING_KEYS = {"model", "mode", "dtype", "steps", "batch_size", "samples_per_s",
                 "ratio_to_plain", "paired_iqr", "achieved_tflops", "mfu", "flops_per_sample",
                 "compile", "warmup_s", "round_s", "loss", "memory_kind", "peak_memory_bytes",
                 "memory_base_bytes", "memory_error"}


def test_bench_quick_json_has_the_documented_keys_and_mfu_at_most_one(capsys):
    # One thread: on a shared 2-core machine a second thread waiting for a busy core
    # stalls every parallel region, and this test should take seconds, not minutes.
    code = main(["bench", "--quick", "--no-compile", "--json", "--threads", "1",
                 "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, err
    r = json.loads(out)
    assert {"date", "seconds", "machine", "load_before", "load_after", "config", "peak",
            "training", "inference", "goals", "command"} <= set(r)
    assert r["machine"]["device"] == "cpu" and r["machine"]["threads"] == 1
    for table in ("matmul_tflops", "conv_tflops", "peak_tflops"):
        assert set(r["peak"][table]) == {"float32", "bfloat16"}
        assert all(v > 0 for v in r["peak"][table].values())
    models = ["resnet18", "tinyvgg", "mobilenet_v2"]
    assert [(t["model"], t["mode"]) for t in r["training"]] == [
        (m, mode) for m in models for mode in ("trainer_eager", "trainer_fast", "plain")]
    for t in r["training"]:
        assert set(t) == TRAINING_KEYS
        assert t["samples_per_s"] > 0 and t["achieved_tflops"] > 0 and t["ratio_to_plain"] > 0
        assert t["peak_memory_bytes"] >= t["memory_base_bytes"] > 0
        assert t["memory_kind"] == "rss" and t["memory_error"] is None
        assert t["compile"] == "off" and math.isfinite(t["loss"])
        # MFU is measured against the measured peak of the dtype the configuration runs in.
        assert t["mfu"] == pytest.approx(t["achieved_tflops"] / r["peak"]["peak_tflops"][
            t["dtype"]])
        assert 0 < t["mfu"] <= 1
    assert {(i["model"], i["mode"], i["batch"]) for i in r["inference"]} == {
        (m, mode, b) for m in models for mode in ("eager", "fast") for b in (1, 4)}
    assert all(i["latency_ms"] > 0 for i in r["inference"])
    assert [(g["mode"], g["goal"]) for g in r["goals"]] == [("trainer_eager", 0.97),
                                                            ("trainer_fast", 1.5)]


def test_bench_reports_a_compile_fallback(monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", refuse)
    r = run_bench(BenchConfig(models=("tinyvgg",), quick=True, threads=1, memory=False,
                              compile=True), progress=False)
    fast = [t for t in r["training"] if t["mode"] == "trainer_fast"]
    assert [t["compile"][:11] for t in fast] == ["fell back: "]
    assert "no compiler here" in fast[0]["compile"]
    assert {i["compile"][:11] for i in r["inference"] if i["mode"] == "fast"} == {"fell back: "}
    assert all(t["samples_per_s"] > 0 for t in r["training"])


@pytest.mark.parametrize("argv, needle", [
    (["--models", "resnet18,nonet"], "unknown model(s) nonet"),
    (["--models", "tinyvgg,tinyvgg"], "name one model twice"),
    (["--device", "mps"], "device"),
])
def test_bench_bad_input_is_one_line_with_exit_code_2(capsys, argv, needle):
    code = main(["bench", "--quick", "--no-compile", *argv])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert needle in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("options, needle", [
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"rounds": 1.5}, "rounds must be a positive integer"),
    ({"latency_batches": ()}, "latency_batches"),
    ({"augment": "nope"}, "unknown augmentation"),
    ({"models": ""}, "(none given)"),
])
def test_bench_config_refuses_bad_values_with_the_fix(options, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        BenchConfig(**options)


def test_bench_rejects_a_non_positive_batch(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--batch-size", "0"])
    assert exit_.value.code == 2 and "--batch-size" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_quick_on_cuda_reports_allocated_memory(capsys):
    code = main(["bench", "--quick", "--no-compile", "--json", "--device", "cuda",
                 "--models", "tinyvgg", "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, err
    r = json.loads(out)
    assert r["machine"]["gpu"]
    for t in r["training"]:
        assert t["memory_kind"] == "cuda_max_allocated" and t["peak_memory_bytes"] > 0
        assert 0 < t["mfu"] <= 1
    assert {t["dtype"] for t in r["training"] if t["mode"] == "trainer_fast"} <= {
        "bfloat16", "float16"}


# -- the docs section --------------------------------------------------------------------------

def test_write_section_replaces_its_markers_and_keeps_other_sections(tmp_path):
    path = tmp_path / "benchmarks.md"
    path.write_text("# Benchmarks\n\n## Other one\n\nkeep me\n")
    write_section(path, "cnnkit bench cpu", "## cnnkit bench on CPU\n\nfirst run\n")
    with path.open("a") as f:  # someone appends a section after ours
        f.write("\n## Appended later\n\nkeep me too\n")
    write_section(path, "cnnkit bench cpu", "## cnnkit bench on CPU\n\nsecond run\n")
    text = path.read_text()
    assert "first run" not in text and text.count("second run") == 1
    assert text.count("<!-- cnnkit bench cpu: begin -->") == 1
    assert text.index("## Other one") < text.index("second run") < text.index("## Appended")
    assert "keep me\n" in text and "keep me too\n" in text
    # Another key is another section: a CUDA run does not replace the CPU one.
    write_section(path, "cnnkit bench cuda", "## cnnkit bench on CUDA\n\ngpu\n")
    assert "second run" in path.read_text() and "gpu" in path.read_text()


def test_write_section_replaces_a_legacy_section_and_creates_a_missing_file(tmp_path):
    path = tmp_path / "benchmarks.md"
    path.write_text("# B\n\n## Old\n\nold table\n\n## Next\n\nnext\n")
    write_section(path, "old", "## Old\n\nnew table", legacy_heading="## Old")
    text = path.read_text()
    assert "old table" not in text and "new table" in text
    assert text.endswith("<!-- old: end -->\n\n## Next\n\nnext\n")
    fresh = tmp_path / "sub" / "new.md"
    write_section(fresh, "k", "## K\n\nbody")
    assert fresh.read_text().startswith(DOCS_INTRO) and "body" in fresh.read_text()
