"""Evaluating and applying a finished run (behind ``cnnkit eval`` and ``cnnkit predict``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .run import Run, load_run
from .trainer import evaluate

__all__ = ["evaluate_run", "predict_files", "run_test_data", "run_test_split"]


def run_test_data(run: Run):
    """The run's own test split as :class:`cnnkit.data.ImageData` (masks included where the
    data has them): same data, same seed, same split as training used."""
    from cnnkit.data import load_data, split_indices

    cfg = run.config
    data = load_data(cfg.data, image_size=cfg.image_size, channels=cfg.channels,
                     strict=cfg.strict, seed=cfg.seed, **cfg.data_options)
    return data.subset(split_indices(data.labels, cfg.split, seed=cfg.seed)[2])


def run_test_split(run: Run) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's own test images and labels: same data, same seed, same split."""
    test = run_test_data(run)
    return test.images, test.labels


def _relabel(labels: torch.Tensor, classes: list[str], run_classes: list[str]) -> torch.Tensor:
    """Map another data set's labels onto the run's classes, by class name."""
    if classes == run_classes:
        return labels
    unknown = sorted(set(classes) - set(run_classes))
    if unknown:
        raise ValueError(f"classes {', '.join(unknown)} are not among the run's classes "
                         f"({', '.join(run_classes)}); evaluate on data with the same class names")
    lookup = torch.tensor([run_classes.index(c) for c in classes])
    return lookup[labels]


def evaluate_run(run: str | os.PathLike | Run, data: str | None = None,
                 weights: str = "best", batch_size: int = 256) -> dict[str, Any]:
    """Accuracy and loss of a run's model on its test split, or on all of ``data``.

    Returns:
        ``{"test_accuracy", "test_loss", "num_samples", "data", "run"}``.
    """
    from cnnkit.data import TensorLoader, load_data

    run = run if isinstance(run, Run) else load_run(run, weights=weights)
    c, h, w = run.preprocess.input_size
    if data is None:
        images, labels = run_test_split(run)
        name = f"{run.config.data} (test split)"
    else:
        loaded = load_data(data, image_size=(h, w), channels=c, seed=run.config.seed)
        images, labels = loaded.images, _relabel(loaded.labels, loaded.classes, run.classes)
        name = data
    if images.shape[1:] != (c, h, w):
        raise ValueError(f"data has images of size {list(images.shape[1:])} but the model takes "
                         f"{[c, h, w]}; pass a data set with that size")
    device = next(run.model.parameters()).device
    loader = TensorLoader(images, labels, batch_size, mean=run.preprocess.mean,
                          std=run.preprocess.std, device=device)
    res = evaluate(run.model, loader, device)
    return {"test_accuracy": res["accuracy"], "test_loss": res["loss"],
            "num_samples": len(labels), "data": name, "run": str(run.path)}


def predict_files(run: str | os.PathLike | Run, files: list[str],
                  topk: int = 3) -> list[dict[str, Any]]:
    """Top-k classes and probabilities for each image file."""
    run = run if isinstance(run, Run) else load_run(run)
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"image file {missing[0]!r} does not exist"
                                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if topk < 1:
        raise ValueError(f"--topk must be at least 1, got {topk}")
    x = torch.stack([run.preprocess(f) for f in files])
    with torch.no_grad():
        probs = run.model(x.to(next(run.model.parameters()).device)).float().softmax(1).cpu()
    k = min(topk, probs.shape[1])
    top = probs.topk(k, dim=1)
    return [{"file": f, "predictions": [
        {"class": run.classes[i], "index": int(i), "probability": float(p)}
        for p, i in zip(top.values[n].tolist(), top.indices[n].tolist(), strict=True)]}
        for n, f in enumerate(files)]
