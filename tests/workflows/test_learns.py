"""Every small model learns the built-in data sets on defaults (cnnkit.workflows.learns).

CI runs each pair whose training fits :data:`BUDGET` (multiply-accumulates of one run:
MACs per sample x 3 for forward and backward x training samples x epochs) with the data
set's defaults at :data:`EPOCHS` epochs instead of the default 30; the bar is halfway
from chance (the best constant prediction) to a perfect score. The pairs above the budget
are skipped here, naming ``bench/learns.py``, which runs every pair at full size
(results in docs/benchmarks.md, "It learns").
"""

import pytest
import torch

import cnnkit
from cnnkit.data import load_data, split_indices
from cnnkit.models import create_model
from cnnkit.tasks import create_task
from cnnkit.workflows.learns import MAX_MACS, MAX_PARAMS, learned, learning_pairs, small_models

EPOCHS = {"digits": 10}
BUDGET = 2.5e12  # about a minute of training on two CPU cores


def _macs(model: str, input_size) -> int:
    with torch.device("meta"):
        net = create_model(model, num_classes=10, input_size=tuple(input_size))
    return cnnkit.summary(net, tuple(input_size), device="meta").total_macs


def test_small_means_within_both_limits():
    size = (3, 64, 64)
    small = small_models("classify", size)
    assert {"tinyvgg", "lenet5", "resnet18"} <= set(small)
    for name in cnnkit.list_models(task="classify"):
        try:
            with torch.device("meta"):
                net = create_model(name, num_classes=10, input_size=size)
        except (ValueError, TypeError):
            assert name not in small
            continue
        params = sum(p.numel() for p in net.parameters())
        fits = params <= MAX_PARAMS and _macs(name, size) <= MAX_MACS
        assert (name in small) == fits, name


def test_chance_is_the_best_constant_prediction():
    classify, segment = create_task("classify"), create_task("segment")
    labels = torch.tensor([0, 1, 1, 1, 2, 2, 2, 2])
    assert classify.chance(labels, 3) == 0.5
    masks = torch.tensor([[[0, 0], [1, 255]]])  # 2 of 3 labelled pixels are background
    assert segment.chance(masks, 2) == pytest.approx((2 / 3) / 2)
    assert create_task("regress").chance(labels, 3) is None
    assert learned(0.55, 0.1) and not learned(0.54, 0.1)


def _pairs():
    for data, task, model in learning_pairs(data="digits"):
        yield pytest.param(data, task, model, id=f"{data}-{task}-{model}")


@pytest.mark.parametrize("data, task, model", list(_pairs()))
def test_every_small_model_learns_the_digits(data, task, model, tmp_path):
    samples = load_data(data)
    train_idx, _, test_idx = split_indices(samples.labels, (0.8, 0.1, 0.1), seed=0)
    epochs = EPOCHS[data]
    cost = _macs(model, samples.input_size) * 3 * len(train_idx) * epochs
    if cost > BUDGET:
        pytest.skip(f"{cost / 1e12:.1f} T MACs to train; bench/learns.py runs it")
    s = cnnkit.train(model=model, data=data, task=task, epochs=epochs, runs_dir=tmp_path,
                     progress=False)
    t = create_task(task)
    chance = t.chance(samples.labels[test_idx], len(samples.classes))
    score = s[f"test_{t.metric}"]
    assert learned(score, chance), f"{model} on {data}: {score:.3f} (chance {chance:.3f})"
