"""Evaluating and applying a finished run (behind ``cnnkit eval`` and ``cnnkit predict``)."""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnkit._files import refuse_existing

from .run import Run, load_run
from .trainer import evaluate

__all__ = ["evaluate_run", "predict_files", "predict_dense_files", "run_test_data",
           "run_test_split"]


def model_device(model: nn.Module) -> torch.device:
    """Where the model's tensors live (an int8 model keeps its weights in buffers)."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


def run_test_data(run: Run):
    """The run's own test split as :class:`cnnkit.data.ImageData` (masks included where the
    data has them): same data, same seed, same split as training used."""
    from cnnkit.data import load_data, split_indices

    cfg = run.config
    data = load_data(cfg.data, image_size=cfg.image_size, channels=cfg.channels,
                     strict=cfg.strict, seed=cfg.seed, task=cfg.task, **cfg.data_options)
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
        ``{"test_accuracy", "test_loss", "num_samples", "data", "run"}``; for dense runs
        the task's test metrics instead (``test_miou`` ..., ``test_psnr`` and
        ``test_psnr_bicubic`` ...).
    """
    from cnnkit.data import TensorLoader, load_data

    run = run if isinstance(run, Run) else load_run(run, weights=weights)
    if run.config.task != "classify":
        return _evaluate_dense(run, data, batch_size)
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
    device = model_device(run.model)
    loader = TensorLoader(images, labels, batch_size, mean=run.preprocess.mean,
                          std=run.preprocess.std, device=device)
    res = evaluate(run.model, loader, device)
    return {"test_accuracy": res["accuracy"], "test_loss": res["loss"],
            "num_samples": len(labels), "data": name, "run": str(run.path)}


def _evaluate_dense(run: Run, data: str | None, batch_size: int) -> dict[str, Any]:
    from cnnkit.data import TensorLoader, load_data

    from .tasks import get_task

    task = get_task(run.config)
    c, h, w = run.preprocess.input_size
    if data is None:
        loaded, name = run_test_data(run), f"{run.config.data} (test split)"
    else:
        loaded = load_data(data, image_size=(h, w), channels=c, seed=run.config.seed,
                           task=task.name)
        name = data
        if task.name == "segment" and len(loaded.mask_classes) > len(run.classes):
            raise ValueError(f"data {data!r} has {len(loaded.mask_classes)} mask classes but the "
                             f"run's model predicts {len(run.classes)}; evaluate on data labelled "
                             "with the run's classes")
    model = run.model
    device = model_device(model)
    shaped = task.prepare(loaded, getattr(model, "size_multiple", 1))
    loader = TensorLoader(shaped.images, task.targets(shaped), batch_size,
                          mean=run.preprocess.mean, std=run.preprocess.std, device=device,
                          **task.loader_kwargs())
    res = task.summary(task.evaluate(model, loader, device))
    return {**res, "num_samples": len(loaded), "data": name, "run": str(run.path)}


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
        probs = run.model(x.to(model_device(run.model))).float().softmax(1).cpu()
    k = min(topk, probs.shape[1])
    top = probs.topk(k, dim=1)
    return [{"file": f, "predictions": [
        {"class": run.classes[i], "index": int(i), "probability": float(p)}
        for p, i in zip(top.values[n].tolist(), top.indices[n].tolist(), strict=True)]}
        for n, f in enumerate(files)]


# Colours of classes 0..19 in overlays and palette masks (Pascal VOC's palette order is
# arbitrary; these are matplotlib's tab20, easier to tell apart).
def _palette(k: int) -> list[int]:
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    cols = [[0, 0, 0]] + [[round(255 * v) for v in cmap(i % 20)[:3]] for i in range(k - 1)]
    return [v for c in cols for v in c] + [0] * (3 * (256 - len(cols)))


def predict_dense_files(run: str | os.PathLike | Run, files: list[str], out_dir: str | Path,
                        tile_overlap: float = 0.25, crf: bool = False,
                        overwrite: bool = False) -> list[dict[str, Any]]:
    """Segment or upscale image files at their own size; write the results to ``out_dir``.

    Segmentation writes ``<stem>_mask.png`` (a palette PNG whose pixel values are the
    class indices) and ``<stem>_overlay.png`` (the image with the classes coloured);
    super-resolution writes ``<stem>_x<scale>.png``. Images larger than the training
    size are predicted in overlapping windows (:func:`cnnkit.train.dense.dense_forward`).
    ``crf=True`` refines segmentations with the dense CRF of DeepLab
    (:class:`cnnkit.layers.DenseCRF`, its defaults) before taking the labels.

    Returns:
        One dict per file: the written paths and, for segmentation, the fraction of
        pixels of each class.

    Raises:
        FileExistsError: an output file exists and ``overwrite`` is False (checked before
            anything is computed).
    """
    import numpy as np
    from PIL import Image

    from cnnkit.data import load_image

    from .dense import dense_forward

    run = run if isinstance(run, Run) else load_run(run)
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"image file {missing[0]!r} does not exist")
    out = Path(out_dir)
    prep, model = run.preprocess, run.model
    scale = int(getattr(model, "scale", 1))
    names = [f"_x{scale}.png"] if prep.task == "superres" else ["_mask.png", "_overlay.png"]
    refuse_existing([out / f"{Path(f).stem}{n}" for f in files for n in names], overwrite)
    out.mkdir(parents=True, exist_ok=True)
    device = model_device(model)
    c, h, w = prep.input_size
    tile = (h // scale, w // scale)
    results = []
    for f in files:
        img = load_image(f, None, c)
        x = prep.normalize(img.float() / 255)[None].to(device)
        pred = dense_forward(model, x, tile=tile, overlap=tile_overlap)[0].cpu()
        stem = Path(f).stem
        if prep.task == "superres":
            path = out / f"{stem}_x{scale}.png"
            arr = (pred.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(path)
            results.append({"file": f, "output": str(path), "size": list(arr.shape[:2])})
            continue
        if crf:
            from cnnkit.layers import crf_refine

            mask = crf_refine(pred[None], img[None].float())[0].to(torch.uint8).numpy()
        else:
            mask = pred.argmax(0).to(torch.uint8).numpy()
        pal = _palette(len(prep.classes))
        m = Image.fromarray(mask, mode="P")
        m.putpalette(pal)
        m.save(out / f"{stem}_mask.png")
        colours = np.array(pal, dtype=np.float32).reshape(256, 3)[mask]
        base = img.permute(1, 2, 0).numpy().astype(np.float32)
        base = np.repeat(base, 3, 2) if base.shape[-1] == 1 else base
        alpha = np.where(mask[..., None] > 0, 0.5, 0.0)  # background stays as it was
        blend = (base * (1 - alpha) + colours * alpha).round().clip(0, 255).astype(np.uint8)
        Image.fromarray(blend).save(out / f"{stem}_overlay.png")
        counts = np.bincount(mask.ravel(), minlength=len(prep.classes)) / mask.size
        results.append({"file": f, "mask": str(out / f"{stem}_mask.png"),
                        "overlay": str(out / f"{stem}_overlay.png"),
                        "class_fractions": {prep.classes[k]: round(float(v), 6)
                                            for k, v in enumerate(counts) if v > 0}})
    return results
