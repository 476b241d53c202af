"""`cnnkit compress RUN`: a pruned and int8 run that reloads and reproduces its numbers."""

import json

import pytest
import torch


def test_compress_prune_quantize_reloads(cli, shared_run, tmp_path):
    from cnnkit.workflows.load import load_run

    out = tmp_path / "small"
    code, stdout, err = cli(["compress", str(shared_run.path), "--prune", "0.5", "--quantize",
                             "int8", "--out", str(out), "--no-progress", "--json"])
    assert code == 0, err
    res = json.loads(stdout)
    rows = res["models"]
    assert set(rows) == {"original", "pruned", "int8"}
    # Half the channels of every layer: roughly a quarter of the conv weights remain.
    assert rows["pruned"]["params"] < rows["original"]["params"] / 2
    assert rows["int8"]["bytes"] == (out / "model_int8.safetensors").stat().st_size
    # The pruned run reloads from base architecture + history, with the measured params
    # and accuracy; the int8 model reloads from its safetensors file.
    pruned = load_run(out)
    assert sum(p.numel() for p in pruned.model.parameters()) == rows["pruned"]["params"]
    assert pruned.model.pruning_history
    for weights, row in (("best", "pruned"), ("int8", "int8")):
        code, stdout, err = cli(["eval", str(out), "--weights", weights, "--json"])
        assert code == 0, err
        assert json.loads(stdout)["test_accuracy"] == pytest.approx(rows[row]["accuracy"],
                                                                    abs=1e-9)
    q = load_run(out, weights="int8").model
    x = torch.rand(4, *pruned.preprocess.input_size)
    with torch.no_grad():  # int8 tracks the float model it was made from
        assert torch.corrcoef(torch.stack([q(x).flatten(),
                                           pruned.model(x).flatten()]))[0, 1] > 0.99


def test_compress_table_reports_spread_interval_and_load(cli, shared_run, tmp_path):
    code, stdout, err = cli(["compress", str(shared_run.path), "--prune", "0.5", "--out",
                             str(tmp_path / "p"), "--no-progress"])
    assert code == 0, err
    lines = stdout.splitlines()
    assert "spread" in lines[0] and "speed-up b32 (95%)" in lines[0]
    res = json.loads((tmp_path / "p" / "compress.json").read_text())
    for line, (name, r) in zip(lines[1:3], res["models"].items(), strict=True):
        lo, hi = r["speedup_b32_interval"]
        assert line.startswith(name) and f"{r['speedup_b32']:.2f}x ({lo:.2f}-{hi:.2f})" in line
        assert line.endswith("  noisy") == bool(r["noisy_b32"])  # else "*" or "noisy at b1"
    load = res["load_average"]
    assert "load average" in lines[3] and (load is None or f"{load:.2f}" in lines[3])
    assert res["models"]["original"]["speedup_b32_interval"] == [1.0, 1.0]


def test_compress_bad_input(cli, one_line_error, shared_run, tmp_path):
    code, _, err = cli(["compress", str(shared_run.path), "--out", str(tmp_path / "o")])
    assert "nothing to do" in one_line_error(code, err)
    code, _, err = cli(["compress", str(shared_run.path), "--prune", "0.5", "--out",
                        str(shared_run.path)])
    assert "already exists" in one_line_error(code, err)
    code, _, err = cli(["eval", str(shared_run.path), "--weights", "int8"])
    assert "no int8 model" in one_line_error(code, err)


def test_compress_sweep_pareto(cli, shared_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(shared_run.path, run)
    code, stdout, err = cli(["compress", str(run), "--sweep", "--ratios", "0.5",
                             "--no-progress", "--json"])
    assert code == 0, err
    res = json.loads(stdout)
    rows = res["rows"]
    assert set(rows) == {"original", "original int8", "prune 0.5", "prune 0.5 int8"}
    assert rows["prune 0.5"]["params"] < rows["original"]["params"]
    assert rows["prune 0.5 int8"]["macs"] == rows["prune 0.5"]["macs"]
    # The front: sorted by latency, accuracy rising along it, and nobody off it beats a
    # member on both axes; the fastest point whose latency is not noisy is always on it,
    # and no noisy point is (on a busy machine the front may be empty).
    front = res["pareto"]
    clean = [n for n, r in rows.items() if not r["noisy_b32"]]
    assert bool(front) == bool(clean)
    if clean:
        assert front[0] == min(clean, key=lambda n: rows[n]["latency_b32"])
    accs = [rows[n]["accuracy"] for n in front]
    assert accs == sorted(accs) and len(set(accs)) == len(accs)
    for n, r in rows.items():
        assert r["pareto"] == (n in front) and not (r["pareto"] and r["noisy_b32"])
        lo, hi = r["speedup_b32_interval"]
        assert lo <= r["speedup_b32"] <= hi and r["spread_b32"] >= 0
    assert res["cpus"] >= 1 and res["noise_spread"] > 0 and "load_average" in res
    assert (run / "compress_sweep.png").is_file()
    assert "Compression sweep" in (run / "report.html").read_text()


def test_compress_data_criterion_gets_training_data(cli, shared_run, tmp_path):
    # taylor needs (images, labels): the pipeline hands it training images of the run's split
    code, stdout, err = cli(["compress", str(shared_run.path), "--prune", "0.5", "--criterion",
                             "taylor", "--out", str(tmp_path / "t"), "--json"])
    assert code == 0, err
    rows = json.loads(stdout)["models"]
    assert rows["pruned"]["params"] < rows["original"]["params"] / 2


def test_compress_qat_int8_reloads(cli, shared_run, tmp_path):
    # --qat fine-tunes through fake quantisation; the int8 file records it and reloads the
    # QAT graph, reproducing the measured accuracy.
    from cnnkit.workflows.load import load_run

    out = tmp_path / "qat"
    code, stdout, err = cli(["compress", str(shared_run.path), "--quantize", "int8", "--qat", "1",
                             "--out", str(out), "--no-progress", "--json"])
    assert code == 0, err
    rows = json.loads(stdout)["models"]
    q = load_run(out, weights="int8").model
    assert q.quant_config["qat"] is True
    code, stdout, err = cli(["eval", str(out), "--weights", "int8", "--json"])
    assert json.loads(stdout)["test_accuracy"] == pytest.approx(rows["int8"]["accuracy"],
                                                                abs=1e-9)
    code, _, err = cli(["compress", str(shared_run.path), "--qat", "1", "--out",
                        str(tmp_path / "x")])
    assert code == 2 and "--quantize int8" in err


def test_compress_prune_then_lowrank_reloads(cli, shared_run, tmp_path):
    # Both histories are recorded and replayed in order (prune, then factorise).
    from cnnkit.workflows.load import load_run

    out = tmp_path / "plr"
    code, stdout, err = cli(["compress", str(shared_run.path), "--prune", "0.25", "--lowrank",
                             "energy:0.8", "--out", str(out), "--json"])
    assert code == 0, err
    rows = json.loads(stdout)["models"]
    run = load_run(out)
    assert run.model.pruning_history and run.model.lowrank_history
    assert sum(p.numel() for p in run.model.parameters()) == rows["pruned+lowrank"]["params"]
    code, stdout, err = cli(["eval", str(out), "--json"])
    assert json.loads(stdout)["test_accuracy"] == pytest.approx(
        rows["pruned+lowrank"]["accuracy"], abs=1e-9)
    code, _, err = cli(["compress", str(shared_run.path), "--lowrank", "0.5", "--out",
                        str(tmp_path / "x")])
    assert code == 2 and "--lowrank" in err


def test_compress_a_3d_segmentation_run_prunes_and_fine_tunes_int8_on_its_masks(cli, tmp_path):
    """Any task: a 3D U-Net run is pruned and quantisation-aware fine-tuned on its own masks
    and loss, and scored by its own metric (mIoU), which `eval` reproduces."""
    code, _, err = cli(["train", "--task", "segment", "--data", "shapes3d", "--model", "unet3d",
                        "--epochs", "1", "--data-opt", "n=24", "--data-opt", "size=8",
                        "--model-opt", "width=4", "--model-opt", "depth=2", "--amp", "off",
                        "--runs-dir", str(tmp_path), "--name", "seg3d", "--no-progress"])
    assert code == 0, err
    out = tmp_path / "seg3d-small"
    code, stdout, err = cli(["compress", str(tmp_path / "seg3d"), "--prune", "0.5",
                             "--quantize", "int8", "--qat", "1", "--out", str(out),
                             "--no-progress", "--json"])
    assert code == 0, err
    res = json.loads(stdout)
    assert res["metric"] == "miou" and res["task"] == "segment"
    rows = res["models"]
    assert set(rows) == {"original", "pruned", "int8"}
    assert rows["pruned"]["params"] < rows["original"]["params"] / 2
    assert all(0.0 <= r["miou"] <= 1.0 for r in rows.values())
    code, stdout, err = cli(["eval", str(out), "--json"])
    assert code == 0, err
    assert json.loads(stdout)["test_miou"] == pytest.approx(rows["pruned"]["miou"], abs=1e-9)
