"""Task plumbing: per-task defaults, padding and cropping to what the model takes."""

import pytest
import torch

from cnnkit.data import load_data
from cnnkit.data._types import IGNORE_INDEX
from cnnkit.tasks import create_task, list_tasks, task_class
from cnnkit.tasks.segment import Segment
from cnnkit.tasks.superres import SuperRes
from cnnkit.training import TrainConfig


def test_per_task_defaults_and_overrides():
    c = TrainConfig()
    assert (c.model, c.data, c.epochs, c.batch_size, c.optimizer) == (
        "tinyvgg_wide", "digits", 30, 64, "adamw")
    assert c.resolved_lr == 2e-3 and c.resolved_weight_decay == 0.05
    sgd = TrainConfig(optimizer="sgd")  # the generic rule where the task's optimizer is not used
    assert sgd.resolved_lr == pytest.approx(0.1 * 64 / 256)
    s = TrainConfig(task="segment")
    assert (s.model, s.data, s.loss, s.epochs, s.batch_size) == (
        "unet_small", "shapes", "ce+dice", 10, 16)
    assert s.resolved_lr == 0.05 and s.resolved_weight_decay == 5e-4
    r = TrainConfig(task="superres")
    assert (r.model, r.optimizer, r.loss, r.resolved_lr, r.resolved_weight_decay) == (
        "espcn", "adamw", "mse", 3e-3, 0.0)
    # Another optimizer than the task's own gets the generic formulas.
    assert TrainConfig(task="superres", optimizer="sgd").resolved_lr == pytest.approx(
        0.1 * 16 / 256)
    assert TrainConfig(task="segment", epochs=3, lr=0.01).resolved_lr == 0.01
    # The resolved config round-trips through config.yaml.
    assert TrainConfig.from_dict(s.to_dict()) == s


def test_segment_prepare_pads_with_ignored_pixels():
    data = load_data("shapes", n=6, size=20, targets="masks")
    task = Segment(TrainConfig(task="segment"))
    padded = task.prepare(data, 16)
    assert padded.images.shape[-2:] == (32, 32) and padded.masks.shape[-2:] == (32, 32)
    assert torch.equal(padded.masks[:, :20, :20], data.masks)
    assert (padded.masks[:, 20:, :] == IGNORE_INDEX).all()
    assert (padded.masks[:, :, 20:] == IGNORE_INDEX).all()
    assert torch.equal(padded.images[..., :20, :20], data.images)
    assert task.prepare(data, 4) is data  # 20 is a multiple of 4: nothing to do


def test_superres_prepare_crops_to_scale():
    data = load_data("shapes", n=6, size=25)
    task = SuperRes(TrainConfig(task="superres", scale=3))
    cropped = task.prepare(data, 1)
    assert cropped.images.shape[-2:] == (24, 24)
    assert torch.equal(cropped.images, data.images[..., :24, :24])
    assert task.model_kwargs(cropped) == {"in_chans": 3, "img_size": (8, 8), "scale": 3}
    with pytest.raises(ValueError, match="too small for scale"):
        SuperRes(TrainConfig(task="superres", scale=4)).prepare(load_data("shapes", n=4, size=8),
                                                                 4)


def test_task_registry():
    assert list_tasks() == ["classify", "regress", "segment", "superres"]
    assert [create_task(t, TrainConfig(task=t, data="x.npz")).metric for t in list_tasks()] \
        == ["accuracy", "mse", "miou", "psnr"]
    assert [task_class(t).higher_is_better for t in list_tasks()] == [True, False, True, True]
    with pytest.raises(ValueError, match="task must be one of classify, regress, segment"):
        TrainConfig(task="detect")
    with pytest.raises(ValueError, match="unknown task 'detect'; choose from"):
        task_class("detect")


def test_every_models_task_is_registered():
    from cnnkit.models import list_models, model_info

    assert {model_info(n).task for n in list_models()} <= set(list_tasks())
    assert {task_class(t).models for t in list_tasks()} <= {model_info(n).task
                                                           for n in list_models()}


def test_no_task_is_named_outside_the_tasks_package():
    """Tasks are seen through the registry only: no code above it compares a task's name
    with a literal (models declare theirs, the tasks package defines them)."""
    import re
    from pathlib import Path

    import cnnkit

    root = Path(cnnkit.__file__).parent
    literal = re.compile(r"task\w*\s*[!=]=\s*[\"']|[!=]=\s*[\"'](classify|segment|superres|"
                         r"regress)[\"']")
    offenders = [f"{p.relative_to(root)}:{i}" for p in root.rglob("*.py")
                 if p.parts[len(root.parts)] not in ("tasks", "models")
                 for i, line in enumerate(p.read_text().splitlines(), 1) if literal.search(line)]
    assert not offenders
