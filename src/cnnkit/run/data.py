"""A run's own data, read back: the test split it was scored on (same data, same seed,
same split as training used), for evaluation, explanation and compression."""

from __future__ import annotations

import torch

from cnnkit.data import ImageData, load_data, split_indices
from cnnkit.tasks import task_class

from .load import Run

__all__ = ["run_test_data", "run_test_split"]


def run_test_data(run: Run) -> ImageData:
    """The run's own test split as :class:`cnnkit.data.ImageData` (masks included where the
    data has them): same data, same seed, same split as training used."""
    cfg = run.config
    data = load_data(cfg.data, image_size=cfg.image_size, channels=cfg.channels,
                     strict=cfg.strict, seed=cfg.seed,
                     targets=task_class(cfg.task).data_targets, **cfg.data_options)
    return data.subset(split_indices(data.labels, cfg.split, seed=cfg.seed)[2])


def run_test_split(run: Run) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's own test images and labels: same data, same seed, same split."""
    test = run_test_data(run)
    return test.images, test.labels
