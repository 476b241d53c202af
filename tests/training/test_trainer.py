"""The Trainer end to end: run folder, resume equality, NaN handling, load_run."""

import json

import pytest
import torch
import yaml

from cnnkit.run.checkpoint import load_weights
from cnnkit.training import NonFiniteLossError, TrainConfig, Trainer, load_run, train
from cnnkit.workflows.evaluate import evaluate_run


def small(tmp_path, **kw) -> TrainConfig:
    opts = dict(model="tinyvgg", data="digits", epochs=2, batch_size=128, runs_dir=str(tmp_path))
    opts.update(kw)
    return TrainConfig(**opts)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    trainer = Trainer(small(tmp, name="done", epochs=3), progress=False)
    summary = trainer.fit()
    return trainer, summary


def test_run_folder_has_every_file(finished):
    trainer, summary = finished
    p = trainer.paths
    for f in (p.config, p.weights, p.last, p.state, p.metrics, p.summary, p.report):
        assert f.is_file(), f
    assert json.loads(p.summary.read_text()) == summary
    assert 0.0 <= summary["test_accuracy"] <= 1.0 and summary["input_size"] == [1, 8, 8]
    n = summary["num_samples"]
    assert sum(n.values()) == 1797 and abs(n["test"] - 180) <= 1 and abs(n["val"] - 180) <= 1
    lines = [json.loads(line) for line in p.metrics.read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2, 3]
    assert {"train_loss", "train_accuracy", "val_accuracy", "lr", "samples_per_s"} <= set(lines[0])
    assert TrainConfig.from_dict(yaml.safe_load(p.config.read_text())) == trainer.config
    html = p.report.read_text()
    assert html.count("data:image/png;base64,") == 3 and "Test accuracy" in html
    _, meta = load_weights(p.weights)
    assert meta["model"] == "tinyvgg" and meta["classes"] == [str(i) for i in range(10)]


def test_best_checkpoint_is_the_best_validation_epoch(finished):
    trainer, summary = finished
    accs = [m["val_accuracy"] for m in trainer.history]
    assert summary["best_epoch"] == 1 + accs.index(max(accs))
    assert summary["best_val_accuracy"] == max(accs)


def test_load_run_reproduces_the_test_accuracy(finished):
    trainer, summary = finished
    run = load_run(trainer.paths.root)
    assert not run.model.training and run.classes == [str(i) for i in range(10)]
    assert run.preprocess.input_size == (1, 8, 8)
    assert evaluate_run(run)["test_accuracy"] == pytest.approx(summary["test_accuracy"])
    # preprocess(uint8 image) == the loader's normalisation
    img = trainer.data.images[0]
    x = run.preprocess(img)
    mean, std = torch.tensor(run.preprocess.mean), torch.tensor(run.preprocess.std)
    assert torch.allclose(x, (img.float() / 255 - mean.view(-1, 1, 1)) / std.view(-1, 1, 1))


def _stop_after(epoch):
    def cb(trainer, e, metrics):
        if e == epoch:
            raise KeyboardInterrupt
    return cb


@pytest.mark.parametrize("ema", [False, True])
def test_resume_equals_uninterrupted(tmp_path, ema):
    cfg = dict(epochs=3, ema=ema, schedule="cosine", warmup_epochs=0.5)
    straight = Trainer(small(tmp_path, name="a", **cfg), progress=False)
    straight.fit()
    broken = Trainer(small(tmp_path, name="b", **cfg), progress=False,
                     callbacks=[_stop_after(1)])
    with pytest.raises(KeyboardInterrupt):
        broken.fit()
    assert [m["epoch"] for m in broken.history] == [1]
    resumed = Trainer(resume=broken.paths.root, progress=False)
    assert resumed.epoch == 1
    resumed.fit()
    for f in ("weights", "last"):
        a, _ = load_weights(getattr(straight.paths, f))
        b, _ = load_weights(getattr(resumed.paths, f))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (f, k)
    strip = lambda h: [{k: v for k, v in m.items() if "time" not in k and "per_s" not in k}  # noqa: E731
                       for m in h]
    assert strip(straight.history) == strip(resumed.history)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    snapshot = {}

    def poison(trainer, epoch, metrics):
        if epoch == 1:
            snapshot.update({k: v.clone() for k, v in trainer.model.state_dict().items()})
            with torch.no_grad():
                trainer.model.fc.weight.fill_(float("nan"))

    trainer = Trainer(small(tmp_path, name="nan", epochs=3), progress=False, callbacks=[poison])
    global_step = len(trainer.train_loader) + 1  # the first step of epoch 2
    with pytest.raises(NonFiniteLossError, match=rf"epoch 2, step 1 \(global step {global_step}\)"):
        trainer.fit()
    last, _ = load_weights(trainer.paths.last)
    assert all(torch.equal(last[k], snapshot[k]) for k in snapshot)
    assert len(trainer.paths.metrics.read_text().splitlines()) == 1


def test_early_stopping(tmp_path):
    summary = train(small(tmp_path, name="es", epochs=6, lr=1e-9, early_stopping=1),
                    progress=False)
    assert summary["stopped_early"] and summary["epochs_run"] == 2


def test_train_rejects_mixed_arguments(tmp_path):
    with pytest.raises(ValueError, match="either a TrainConfig or options"):
        train(small(tmp_path), epochs=1)


def test_default_run_reaches_98_percent_on_digits(tmp_path):
    """The README's first command: the default model on digits, >= 98% test accuracy."""
    summary = train(runs_dir=str(tmp_path), progress=False)
    assert summary["data"] == "digits" and summary["test_accuracy"] >= 0.98


def test_cnnkit_train_is_a_plain_function_whatever_was_imported_first(tmp_path):
    import types

    import cnnkit
    import cnnkit.training as package

    assert cnnkit.training is package and not callable(cnnkit.training)
    assert isinstance(cnnkit.train, types.FunctionType) and cnnkit.train is package.train
    assert cnnkit.training.Trainer is Trainer
    with pytest.raises(ValueError, match="unknown training option"):
        cnnkit.train(epoch=1)


def test_resume_through_train_keeps_the_saved_epochs(tmp_path):
    broken = Trainer(small(tmp_path, name="r", epochs=2), progress=False,
                     callbacks=[_stop_after(1)])
    with pytest.raises(KeyboardInterrupt):
        broken.fit()
    with pytest.raises(ValueError, match="so model cannot change"):
        train(resume=broken.paths.root, model="lenet5")
    summary = train(resume=broken.paths.root, progress=False)
    assert summary["epochs_run"] == 2 and "resumes" not in summary  # nothing changed


def test_resume_refuses_changed_data(tmp_path):
    from cnnkit.run.checkpoint import save_weights

    broken = Trainer(small(tmp_path, name="c", epochs=2), progress=False,
                     callbacks=[_stop_after(1)])
    with pytest.raises(KeyboardInterrupt):
        broken.fit()
    state, meta = load_weights(broken.paths.last)
    save_weights(broken.paths.last, state, {**meta, "classes": meta["classes"][:-1]})
    with pytest.raises(ValueError, match="changed since it started"):
        Trainer(resume=broken.paths.root, progress=False)


def test_config_rejects_values_that_would_silently_misbehave():
    for bad in ({"label_smoothing": 1.0}, {"grad_clip": -1.0}, {"weight_decay": -1e-4},
                {"early_stopping": 0}, {"lr": float("inf")}, {"ema_decay": 1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TrainConfig(**bad)


def test_broken_config_yaml_is_a_clear_error(finished, tmp_path):
    import shutil

    trainer, _ = finished
    copy = tmp_path / "copy"
    shutil.copytree(trainer.paths.root, copy)
    (copy / "config.yaml").write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="configuration is a mapping of options, got list"):
        load_run(copy)
