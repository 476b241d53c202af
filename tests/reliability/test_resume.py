"""The reliability catalogue, resuming after a failure (issue 12, point 6): the NaN message's
advice (a lower ``--lr``, ``--grad-clip``) can be applied with ``--resume``; the run goes on
from its last good epoch, and the change is recorded in the run."""

from __future__ import annotations

import contextlib
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
import yaml

import cnnkit.training.epoch as epoch_module
import cnnkit.training.optim as optim_module
from cnnkit.data import TensorLoader
from cnnkit.run.checkpoint import load_state, load_weights
from cnnkit.training import TrainConfig, Trainer, train
from cnnkit.training.resume import save_due

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
    (["--checkpoint-minutes", "-1"], "--checkpoint-minutes"),
], ids=["lr-zero", "clip-negative", "amp", "checkpoint-minutes-negative"])
def test_a_resume_with_an_invalid_override_is_one_line(cli, one_line_error, shared_run, argv,
                                                       needle):
    line = one_line_error(*cli(["train", "--resume", str(shared_run.path), *argv])[::2])
    assert needle in line


# -- a state saved within an epoch (issue 14): Ctrl-C loses at most checkpoint_minutes ---------

def _within_epoch_cfg(tmp_path, name, model):
    # digits augments (the loader's stream); allconv has dropout (the global RNG)
    return TrainConfig(model=model, data="digits", epochs=2, batch_size=128, ema=True,
                       runs_dir=str(tmp_path), name=name)


def _weights_equal(a_root, b_root):
    for f in ("model.safetensors", "model_last.safetensors"):
        a, _ = load_weights(a_root / f)
        b, _ = load_weights(b_root / f)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (f, k)


def _strip(history):
    return [{k: v for k, v in m.items() if "time" not in k and "per_s" not in k}
            for m in history]


@pytest.mark.parametrize("model, save_at, stop_at", [("lenet5", 3, 7),
                                                     ("allconv", STEPS + 4, STEPS + 9)],
                         ids=["first-epoch", "second-epoch-dropout"])
def test_a_run_interrupted_within_an_epoch_resumes_to_the_same_result(tmp_path, monkeypatch,
                                                                      model, save_at, stop_at):
    """The state is saved after step ``save_at`` (counted over the run), Ctrl-C comes at step
    ``stop_at``; the resumed run redoes the steps in between and ends bit for bit where the
    uninterrupted run ends: weights, EMA, history."""
    straight = Trainer(_within_epoch_cfg(tmp_path, "a", model), progress=False)
    straight.fit()
    calls = {"due": 0, "steps": 0}

    def due_once(due, bad, trainer):  # the clock says "due" after step save_at only
        calls["due"] += 1
        return calls["due"] == save_at - (save_at > STEPS)  # the last step of an epoch asks not

    real_step = epoch_module.forward_backward

    def ctrl_c(*args):
        calls["steps"] += 1
        if calls["steps"] == stop_at:
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(epoch_module, "save_due", due_once)
    monkeypatch.setattr(epoch_module, "forward_backward", ctrl_c)
    broken = Trainer(_within_epoch_cfg(tmp_path, "b", model), progress=False)
    with pytest.raises(KeyboardInterrupt):
        broken.fit()
    monkeypatch.undo()
    state = load_state(broken.paths.state)
    assert (state["epoch"], state["step"]) == divmod(save_at, STEPS)
    assert broken.paths.last.is_file() == (save_at > STEPS)
    resumed = Trainer(resume=broken.paths.root, progress=False)
    assert resumed.partial["step"] == save_at % STEPS and resumed.epoch == save_at // STEPS
    resumed.fit()
    _weights_equal(straight.paths.root, resumed.paths.root)
    assert _strip(straight.history) == _strip(resumed.history)
    assert "step" not in load_state(resumed.paths.state)  # the epoch-end state replaced it


def test_the_state_is_saved_within_the_epoch_as_the_clock_says(tmp_path, monkeypatch):
    """checkpoint_minutes on the real clock: a tiny interval saves after every step but an
    epoch's last (the epoch-end state follows), 0 never within an epoch."""
    saved = []
    real = epoch_module.save_within_epoch
    monkeypatch.setattr(epoch_module, "save_within_epoch",
                        lambda trainer, step, sums: (saved.append((trainer.epoch, step)),
                                                     real(trainer, step, sums)))
    cfg = dict(model="lenet5", data="digits", epochs=2, batch_size=128, runs_dir=str(tmp_path))
    Trainer(TrainConfig(**cfg, name="often", checkpoint_minutes=1e-9), progress=False).fit()
    assert saved == [(e, s) for e in range(2) for s in range(1, STEPS)]
    saved.clear()
    Trainer(TrainConfig(**cfg, name="never", checkpoint_minutes=0), progress=False).fit()
    assert saved == []


@pytest.mark.parametrize("with_state", [True, False], ids=["state", "replayed"])
def test_a_pass_started_within_the_epoch_hands_out_the_same_batches(with_state):
    """set_epoch(epoch, start) continues the uninterrupted pass: the same order and the same
    augmentation draws, from the saved stream or by making the skipped batches' draws."""
    images = torch.randint(0, 256, (50, 1, 8, 8), dtype=torch.uint8)
    loader = TensorLoader(images, torch.arange(50) % 3, 8, shuffle=True, augment="flip_crop",
                          seed=5)
    loader.set_epoch(2)
    whole, state = [], None
    for i, (x, _) in enumerate(loader):
        whole.append(x)
        if i == 2:
            state = loader.augment_state()
    loader.set_epoch(2, 3, state if with_state else None)
    rest = [x for x, _ in loader]
    assert len(rest) == len(whole) - 3
    assert all(torch.equal(a, b) for a, b in zip(whole[3:], rest, strict=True))
    assert not torch.equal(whole[0], rest[0])  # the test could tell batches apart


def test_no_state_is_saved_after_a_non_finite_loss():
    """A GPU checks the loss every 32 steps: a save in between must not replace the last good
    state by a NaN one; the loss is only read when a save is due."""
    trainer = SimpleNamespace(dist=SimpleNamespace(enabled=False))
    asked = []

    def bad():
        asked.append(1)
        return True

    assert not save_due(True, bad, trainer) and asked == [1]
    assert not save_due(False, bad, trainer) and asked == [1]
    assert save_due(True, lambda: False, trainer)


def test_checkpoint_minutes_is_a_non_negative_number_a_resume_may_change(tmp_path):
    with pytest.raises(ValueError, match="checkpoint_minutes must be a number of minutes >= 0"):
        TrainConfig(checkpoint_minutes=-0.5)
    cfg = TrainConfig(model="lenet5", epochs=1, runs_dir=str(tmp_path))
    assert cfg.checkpoint_minutes == 10.0
    new, changed = cfg.with_overrides({"checkpoint_minutes": 0})
    assert new.checkpoint_minutes == 0 and changed == {"checkpoint_minutes": [10.0, 0.0]}


def _ddp_worker(rank: int, tmp: str) -> None:
    """One of 2 gloo processes: an uninterrupted run, then a run whose state is saved within
    the epoch (every 64 steps: the ranks agree on rank 0's clock) and stopped by Ctrl-C on
    both ranks 6 steps later, then its resume."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=2)
    cfg = dict(model="lenet5", data="digits", epochs=2, batch_size=16, runs_dir=f"{tmp}/runs")
    try:
        Trainer(TrainConfig(**cfg, name="straight"), progress=False).fit()
        real, calls = epoch_module.forward_backward, [0]

        def ctrl_c(*args):
            calls[0] += 1
            if calls[0] == DDP_STEPS + 70:  # epoch 2, step 70: saved after step 64
                raise KeyboardInterrupt
            return real(*args)

        epoch_module.forward_backward = ctrl_c
        broken = Trainer(TrainConfig(**cfg, name="broken", checkpoint_minutes=1e-9),
                         progress=False)
        with contextlib.suppress(KeyboardInterrupt):
            broken.fit()
        epoch_module.forward_backward = real
        dist.barrier()
        resumed = Trainer(resume=broken.paths.root, progress=False)
        where = [resumed.epoch, resumed.partial["step"]]
        resumed.fit()
        (Path(tmp) / f"rank{rank}.json").write_text(json.dumps(
            {"where": where, "history": _strip(resumed.history)}))
    finally:
        dist.destroy_process_group()


DDP_STEPS = 1438 // 16  # digits' training split in global batches of 16


@pytest.mark.skipif(not (torch.distributed.is_available()
                         and torch.distributed.is_gloo_available()),
                    reason="this PyTorch build has no gloo backend")
def test_a_distributed_run_interrupted_within_an_epoch_resumes_to_the_same_result(
        tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    mp.start_processes(_ddp_worker, args=(str(tmp_path),), nprocs=2, start_method="spawn")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["where"] == ranks[1]["where"] == [1, 64]
    assert ranks[0]["history"] == ranks[1]["history"]
    straight = [json.loads(m) for m in
                (tmp_path / "runs" / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert _strip(straight) == ranks[0]["history"]
    _weights_equal(tmp_path / "runs" / "straight", tmp_path / "runs" / "broken")
