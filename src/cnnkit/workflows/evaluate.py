"""Evaluating and applying a finished run (behind ``cnnkit eval`` and ``cnnkit predict``)."""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnkit._files import refuse_existing
from cnnkit.data import TensorLoader, load_data
from cnnkit.run import Run, run_test_data
from cnnkit.tasks import create_task
from cnnkit.tasks.dense import dense_forward

from .load import load_run

__all__ = ["evaluate_run", "predict_files", "predict_dense_files", "model_device"]


def model_device(model: nn.Module) -> torch.device:
    """Where the model's tensors live (an int8 model keeps its weights in buffers)."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


def evaluate_run(run: str | os.PathLike | Run, data: str | None = None,
                 weights: str = "best", batch_size: int = 256) -> dict[str, Any]:
    """The task's test metrics of a run's model on its test split, or on all of ``data``.

    Returns:
        The task's ``test_*`` metrics (``test_accuracy`` and ``test_loss`` for a
        classifier; ``test_miou`` ..., ``test_psnr`` and ``test_psnr_bicubic`` ...,
        ``test_mse`` ...), plus ``num_samples``, ``data`` and ``run``.
    """
    run = run if isinstance(run, Run) else load_run(run, weights=weights)
    task = create_task(run.config.task, run.config)
    c, *spatial = run.preprocess.input_size
    if data is None:
        loaded, name = run_test_data(run), f"{run.config.data} (test split)"
    else:
        loaded = load_data(data, image_size=tuple(spatial), channels=c, seed=run.config.seed,
                           targets=task.data_targets)
        loaded, name = task.align(loaded, run.classes, data), data
    if tuple(loaded.images.shape[1:]) != tuple(run.preprocess.input_size):
        raise ValueError(f"data has inputs of size {list(loaded.images.shape[1:])} but the "
                         f"model takes {list(run.preprocess.input_size)}; pass a data set with "
                         "that size")
    model = run.model
    device = model_device(model)
    shaped = task.prepare(loaded, getattr(model, "size_multiple", 1))
    loader = TensorLoader(shaped.images, task.targets(shaped), batch_size,
                          mean=run.preprocess.mean, std=run.preprocess.std, device=device,
                          **task.loader_kwargs())
    res = task.summary(task.evaluate(model, loader, device))
    return {**res, "task": task.name, "num_samples": len(loaded), "data": name,
            "run": str(run.path)}


def check_prediction_inputs(files: list[str], topk: int) -> None:
    """Raise before anything is read: a file that does not exist, or ``topk`` below 1."""
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"image file {missing[0]!r} does not exist"
                                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if topk < 1:
        raise ValueError(f"--topk must be at least 1, got {topk}")


def predict_files(run: str | os.PathLike | Run, files: list[str],
                  topk: int = 3) -> list[dict[str, Any]]:
    """What the run's model says of each input file: the top-k classes and probabilities
    of a classifier, the values of a regression (:meth:`cnnkit.tasks.Task.predict_row`)."""
    run = run if isinstance(run, Run) else load_run(run)
    task = create_task(run.config.task, run.config)
    if task.writes_predictions:
        raise ValueError(f"a {task.name} run's predictions are files; use predict_dense_files")
    check_prediction_inputs(files, topk)
    x = torch.stack([run.preprocess(f) for f in files])
    with torch.no_grad():
        out = run.model(x.to(model_device(run.model))).float().cpu()
    return [{"file": f, **task.predict_row(o, run.classes, topk)}
            for f, o in zip(files, out, strict=True)]


def predict_dense_files(run: str | os.PathLike | Run, files: list[str], out_dir: str | Path,
                        tile_overlap: float = 0.25, crf: bool = False,
                        overwrite: bool = False) -> list[dict[str, Any]]:
    """Segment or upscale image files at their own size; write the results to ``out_dir``.

    Segmentation writes ``<stem>_mask.png`` (a palette PNG whose pixel values are the
    class indices) and ``<stem>_overlay.png`` (the image with the classes coloured);
    super-resolution writes ``<stem>_x<scale>.png``. Images larger than the training
    size are predicted in overlapping windows (:func:`cnnkit.tasks.dense.dense_forward`).
    ``crf=True`` refines segmentations with the dense CRF of DeepLab
    (:class:`cnnkit.layers.DenseCRF`, its defaults) before taking the labels.

    Returns:
        One dict per file: the written paths and, for segmentation, the fraction of
        pixels of each class.

    Raises:
        FileExistsError: an output file exists and ``overwrite`` is False (checked before
            anything is computed).
    """
    run = run if isinstance(run, Run) else load_run(run)
    task = create_task(run.config.task, run.config)
    if not task.writes_predictions:
        raise ValueError(f"a {task.name} run's predictions are printed, not written as files; "
                         "use predict_files")
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"image file {missing[0]!r} does not exist")
    out = Path(out_dir)
    refuse_existing([out / n for f in files for n in task.prediction_names(Path(f))], overwrite)
    out.mkdir(parents=True, exist_ok=True)
    prep, model = run.preprocess, run.model
    device = model_device(model)
    _, *spatial = prep.input_size
    scale = int(getattr(model, "scale", 1))
    tile = tuple(v // scale for v in spatial)
    results = []
    for f in files:
        img = prep.load(f, keep_size=True)
        x = prep.normalize(img.float() / 255 if img.dtype == torch.uint8 else img.float())
        pred = dense_forward(model, x[None].to(device), tile=tile, overlap=tile_overlap)[0].cpu()
        written = task.write_prediction(pred, img, out, Path(f), prep.classes, crf=crf)
        results.append({"file": f, **written})
    return results
