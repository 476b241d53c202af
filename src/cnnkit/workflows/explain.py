"""Explaining a run's predictions on image files (behind ``cnnkit explain``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnnkit._files import refuse_existing
from cnnkit.data import load_image
from cnnkit.explain import create
from cnnkit.explain._base import explained_task
from cnnkit.explain.render import save_grid, save_overlay
from cnnkit.run import load_run

__all__ = ["explain_files", "resolve_class"]


def resolve_class(target: str | int | None, classes: list[str]) -> int | None:
    """A class given by name or index; None stays None (the predicted class)."""
    if target is None:
        return None
    if str(target) in classes:
        return classes.index(str(target))
    try:
        idx = int(target)
    except ValueError:
        raise ValueError(f"unknown class {target!r}; the run's classes are "
                         f"{', '.join(classes)} (or give an index)") from None
    if not 0 <= idx < len(classes):
        raise ValueError(f"class index {idx} is out of range 0..{len(classes) - 1}")
    return idx


def explain_files(run: Any, files: list[str], methods: list[str], out: str | os.PathLike,
                  target: str | int | None = None, layer: str | None = None,
                  overwrite: bool = False) -> list[Path]:
    """Explain each image file with each method; write overlays, a grid and raw maps.

    Writes ``<stem>_<method>.png`` (the map over the image, with a colour bar),
    ``<stem>_<method>.npy`` (the raw map at input resolution) and ``grid.png`` (images
    by methods) into ``out``.

    Args:
        overwrite: replace files of those names already in ``out``; without it, any such
            file stops the call before anything is computed.

    Returns:
        The paths written.

    Raises:
        FileExistsError: an output file exists and ``overwrite`` is False.
    """

    run = run if hasattr(run, "preprocess") else load_run(run)
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"image file {missing[0]!r} does not exist; give image files")
    out = Path(out)
    refuse_existing([out / f"{Path(f).stem}_{m}.{ext}" for f in files for m in methods
                     for ext in ("npy", "png")] + [out / "grid.png"], overwrite)
    c, h, w = run.preprocess.input_size
    images = [load_image(f, size=(h, w), channels=c) for f in files]
    x = torch.stack([run.preprocess(img) for img in images])
    cls = resolve_class(target, run.classes)
    task = explained_task(run.model)
    probs = task.confidence(run.model, x)
    targets = task.predicted(task.explainable(run.model), x) if cls is None else \
        torch.full((len(files),), cls)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    all_maps: dict[str, torch.Tensor] = {}
    for method in methods:
        with create(method, run.model, layer=layer) as explainer:
            maps = explainer(x, targets)
        all_maps[method] = maps
        for i, (f, img, m) in enumerate(zip(files, images, maps, strict=True)):
            t = int(targets[i])
            stem = f"{Path(f).stem}_{method}"
            np.save(out / f"{stem}.npy", m.cpu().numpy())
            p = float(probs[i, t])
            title = f"{method}: {run.classes[t]} {task.confidence_text(p)}"
            save_overlay(out / f"{stem}.png", img, m, title)
            written += [out / f"{stem}.npy", out / f"{stem}.png"]
    titles = [f"{Path(f).name}: {run.classes[t]}" for f, t in zip(files, targets.tolist(),
                                                                     strict=True)]
    save_grid(out / "grid.png", images, all_maps, titles)
    written.append(out / "grid.png")
    return written
