"""Explaining a run's predictions (behind ``cnnkit explain``): :func:`explain_files` reads
image files, :func:`explain_inputs` explains tensors ``[B, C, *spatial]`` of any of the
three dims (signals, images, volumes) and writes the maps and their pictures."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnnkit._files import refuse_existing
from cnnkit.data.volumes import file_stem
from cnnkit.explain import create
from cnnkit.explain._base import check_input, explained_task
from cnnkit.explain.render import save_grid, save_overlay
from cnnkit.run import load_run
from cnnkit.tasks import Task, task_class

__all__ = ["explain_files", "explain_inputs", "resolve_class", "run_task"]


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


def run_task(run: Any) -> type[Task]:
    """The task a run's model serves: the run's own (``preprocess.task``), else the
    model's ``task`` attribute or classification."""
    name = getattr(run.preprocess, "task", None)
    return task_class(name) if name else explained_task(run.model)


def explain_files(run: Any, files: list[str], methods: list[str], out: str | os.PathLike,
                  target: str | int | None = None, layer: str | None = None,
                  overwrite: bool = False) -> list[Path]:
    """Explain each input file with each method; write overlays, a grid and raw maps.

    Writes ``<stem>_<method>.png`` (the map over the image, with a colour bar),
    ``<stem>_<method>.npy`` (the raw map at input resolution) and ``grid.png`` (images
    by methods) into ``out``. Files are decoded as in training by the run's
    :meth:`~cnnkit.run.Preprocess.load` (images, or NIfTI volumes for a 3D run); tensors of
    any dims go through :func:`explain_inputs`.

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
        raise FileNotFoundError(f"input file {missing[0]!r} does not exist; give image "
                                "files (NIfTI volumes for a 3D run)")
    stems = [file_stem(Path(f)) for f in files]
    _refuse(Path(out), stems, methods, overwrite)
    images = [run.preprocess.load(f) for f in files]
    x = torch.stack([run.preprocess(img) for img in images])
    titles = [Path(f).name for f in files]
    return explain_inputs(run, x, stems, methods, out, target=target, layer=layer,
                          overwrite=overwrite, images=images, titles=titles)


def _refuse(out: Path, stems: list[str], methods: list[str], overwrite: bool) -> None:
    refuse_existing([out / f"{stem}_{m}.{ext}" for stem in stems for m in methods
                     for ext in ("npy", "png")] + [out / "grid.png"], overwrite)


def explain_inputs(run: Any, x: torch.Tensor, stems: list[str], methods: list[str],
                   out: str | os.PathLike, target: str | int | None = None,
                   layer: str | None = None, overwrite: bool = False,
                   images: list[torch.Tensor] | None = None,
                   titles: list[str] | None = None) -> list[Path]:
    """Explain model inputs ``x`` ``[B, C, *spatial]`` (1, 2 or 3 spatial dims) with each
    method; write ``<stem>_<method>.npy`` (the raw map ``[*spatial]``),
    ``<stem>_<method>.png`` and ``grid.png`` into ``out``.

    Args:
        run: a loaded run (its model, preprocess and classes) or its folder.
        x: the model's inputs, already preprocessed.
        stems: one file-name stem per input.
        methods: explanation method names.
        out: the output folder (created).
        target: a class (name or index; for regression, an output); None explains the
            task's default (the predicted class, a regression's first output).
        layer: the layer of layer methods; the model's ``cam_layer`` when None.
        overwrite: replace files of those names in ``out``.
        images: what the pictures show for each input (``[C, *spatial]``, uint8 or float);
            ``x`` itself when None.
        titles: the grid's row titles; the stems when None.

    Returns:
        The paths written.

    Example:
        >>> import tempfile, torch, cnnkit
        >>> from cnnkit.run import Preprocess, Run
        >>> model = cnnkit.create_model("resnet18", num_classes=2, input_size=(1, 32)).eval()
        >>> run = Run(None, model, None, Preprocess((1, 32), [0.0], [1.0], ["a", "b"]), None)
        >>> paths = explain_inputs(run, torch.rand(2, 1, 32), ["s0", "s1"], ["gradcam"],
        ...                        tempfile.mkdtemp())
        >>> [p.name for p in paths]
        ['s0_gradcam.npy', 's0_gradcam.png', 's1_gradcam.npy', 's1_gradcam.png', 'grid.png']
    """
    run = run if hasattr(run, "preprocess") else load_run(run)
    check_input(x)
    if len(stems) != len(x):
        raise ValueError(f"{len(stems)} stems for {len(x)} inputs; give one name per input")
    out = Path(out)
    _refuse(out, stems, methods, overwrite)
    images = list(x) if images is None else images
    cls = resolve_class(target, run.classes)
    task = run_task(run)
    probs = task.confidence(run.model, x)
    targets = task.predicted(task.explainable(run.model), x) if cls is None else \
        torch.full((len(x),), cls)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    all_maps: dict[str, torch.Tensor] = {}
    for method in methods:
        with create(method, run.model, layer=layer, task=task) as explainer:
            maps = explainer(x, targets)
        all_maps[method] = maps
        for i, (stem, img, m) in enumerate(zip(stems, images, maps, strict=True)):
            t = int(targets[i])
            name = f"{stem}_{method}"
            np.save(out / f"{name}.npy", m.cpu().numpy())
            p = float(probs[i, t])
            title = f"{method}: {run.classes[t]} {task.confidence_text(p)}"
            save_overlay(out / f"{name}.png", img, m, title)
            written += [out / f"{name}.npy", out / f"{name}.png"]
    rows = [f"{name}: {run.classes[t]}" for name, t in zip(titles or stems, targets.tolist(),
                                                           strict=True)]
    save_grid(out / "grid.png", images, all_maps, rows)
    written.append(out / "grid.png")
    return written
