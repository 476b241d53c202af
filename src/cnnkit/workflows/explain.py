"""Explaining a run's predictions (behind ``cnnkit explain``): :func:`explain_files` reads
image files, :func:`explain_inputs` explains tensors ``[B, C, *spatial]`` of any of the
three dims (signals, images, volumes) and writes the maps and their pictures.

A run whose task predicts densely (segmentation: ``Task.writes_predictions``, the runs
whose ``cnnkit predict`` keeps each image's size) is explained as ``predict`` runs it: each
input at its own size and aspect, padded by reflection to the model's ``size_multiple``
(:func:`cnnkit.models._dense.pad_to_multiple`), the scores counting only the input's own
pixels (:class:`Cropped`), and every map cropped back, so a 640x427 photo gets 640x427
maps. (``predict`` covers an image larger than the training tile by overlapping windows;
an explanation runs the fully convolutional model on the whole padded image instead, the
same network on more context.)"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cnnkit._files import refuse_existing
from cnnkit.data.volumes import file_stem
from cnnkit.explain import create, list_methods
from cnnkit.explain._base import explained_task, resolve_layer
from cnnkit.explain.checks import check_input
from cnnkit.explain.options import split_options
from cnnkit.explain.render import save_grid, save_overlay
from cnnkit.models._dense import pad_to_multiple
from cnnkit.run import load_run
from cnnkit.tasks import Task, task_class

__all__ = ["explain_files", "explain_inputs", "resolve_class", "run_task", "resolve_methods",
           "Cropped"]


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


def resolve_methods(methods: Sequence[str]) -> tuple[list[str], bool]:
    """The methods to run and whether any may be skipped: ``"all"`` is every registered
    method (those that do not apply to the run are then skipped with a warning)."""
    if "all" in methods:
        return list_methods(), True
    return list(dict.fromkeys(methods)), False


class Cropped(nn.Module):
    """A dense model seen on an input padded to its ``size_multiple``: its output cropped
    to the input's own ``sizes``, so that a region score counts the real pixels only.

    ``cam_layer`` follows the wrapped model's (under ``model.``), so layer methods read the
    same layer, on the padded input, and their maps stay aligned with it.

    Example:
        >>> import torch
        >>> from cnnkit.workflows.explain import Cropped
        >>> net = Cropped(torch.nn.Conv2d(1, 2, 1), (3, 5))
        >>> net(torch.rand(1, 1, 8, 8)).shape
        torch.Size([1, 2, 3, 5])
    """

    def __init__(self, model: nn.Module, sizes: Sequence[int]) -> None:
        super().__init__()
        self.model, self.sizes = model, tuple(int(v) for v in sizes)
        self.num_classes = getattr(model, "num_classes", None)
        cam = getattr(model, "cam_layer", None)
        self.cam_layer = None if cam is None else f"model.{cam}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[(..., *(slice(0, v) for v in self.sizes))]


def explain_files(run: Any, files: list[str], methods: list[str], out: str | os.PathLike,
                  target: str | int | None = None, layer: str | None = None,
                  overwrite: bool = False, options: dict[str, Any] | None = None,
                  ) -> list[Path]:
    """Explain each input file with each method; write overlays, a grid and raw maps.

    Writes ``<stem>_<method>.png`` (the map over the image, with a colour bar),
    ``<stem>_<method>.npy`` (the raw map at input resolution) and ``grid.png`` (images
    by methods) into ``out``. Files are decoded as in training by the run's
    :meth:`~cnnkit.run.Preprocess.load` (images, or NIfTI volumes for a 3D run); tensors of
    any dims go through :func:`explain_inputs`.

    A dense run (segmentation) reads each file at its own size and aspect, as
    ``cnnkit predict`` does (module docstring), so its maps have the file's size.

    Args:
        methods: method names; ``"all"`` runs every registered method that applies to the
            run (a method that does not, such as ``cam`` without global average pooling, is
            skipped with a warning) and ``grid.png`` compares them all.
        overwrite: replace files of those names already in ``out``; without it, any such
            file stops the call before anything is computed.
        options: method options (``{"window": 3}``), each handed to the methods that take
            it (:func:`cnnkit.explain.options.split_options`).

    Returns:
        The paths written.

    Raises:
        FileExistsError: an output file exists and ``overwrite`` is False.
        ValueError: an option no method takes, or two inputs of one name (their outputs
            would collide).
    """
    run = run if hasattr(run, "preprocess") else load_run(run)
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"input file {missing[0]!r} does not exist; give image "
                                "files (NIfTI volumes for a 3D run)")
    stems = [file_stem(Path(f)) for f in files]
    names, _ = resolve_methods(methods)
    split_options(names, options or {})  # a bad option stops the call before any work
    _refuse(Path(out), stems, names, overwrite)
    dense = run_task(run).writes_predictions
    images = [run.preprocess.load(f, keep_size=dense) for f in files]
    x: torch.Tensor | list[torch.Tensor]
    if dense:
        x = [run.preprocess.normalize(img.float() / 255 if img.dtype == torch.uint8
                                      else img.float()) for img in images]
    else:
        x = torch.stack([run.preprocess(img) for img in images])
    titles = [Path(f).name for f in files]
    return explain_inputs(run, x, stems, methods, out, target=target, layer=layer,
                          overwrite=overwrite, images=images, titles=titles, options=options)


def _refuse(out: Path, stems: list[str], methods: list[str], overwrite: bool) -> None:
    refuse_existing([out / f"{stem}_{m}.{ext}" for stem in stems for m in methods
                     for ext in ("npy", "png")] + [out / "grid.png"], overwrite)


def _groups(run: Any, task: type[Task], x: torch.Tensor | list[torch.Tensor]
            ) -> list[tuple[nn.Module, torch.Tensor, tuple[int, ...]]]:
    """What each explainer call sees: (model, inputs, the spatial size to crop maps to).
    A batch of equal inputs is one call; a dense run's inputs are one call each, padded to
    the model's ``size_multiple`` and seen through :class:`Cropped`."""
    if not task.writes_predictions:
        batch = x if isinstance(x, torch.Tensor) else torch.stack(list(x))
        return [(run.model, batch, tuple(batch.shape[2:]))]
    multiple = int(getattr(run.model, "size_multiple", 1))
    groups = []
    for one in x:
        padded, sizes = pad_to_multiple(one[None], multiple, dims=one.ndim - 1)
        groups.append((Cropped(run.model, sizes), padded, sizes))
    return groups


def explain_inputs(run: Any, x: torch.Tensor | list[torch.Tensor], stems: list[str],
                   methods: list[str], out: str | os.PathLike, target: str | int | None = None,
                   layer: str | None = None, overwrite: bool = False,
                   images: list[torch.Tensor] | None = None,
                   titles: list[str] | None = None,
                   options: dict[str, Any] | None = None) -> list[Path]:
    """Explain model inputs ``x`` ``[B, C, *spatial]`` (1, 2 or 3 spatial dims) with each
    method; write ``<stem>_<method>.npy`` (the raw map ``[*spatial]``),
    ``<stem>_<method>.png`` and ``grid.png`` into ``out``.

    Args:
        run: a loaded run (its model, preprocess and classes) or its folder.
        x: the model's inputs, already preprocessed; for a dense run (segmentation) also a
            list of ``[C, *spatial]`` inputs of different sizes, each explained at its own
            size (module docstring).
        stems: one file-name stem per input.
        methods: explanation method names; ``"all"``: every method that applies.
        out: the output folder (created).
        target: a class (name or index; for regression, an output); None explains the
            task's default (the predicted class, a regression's first output).
        layer: the layer of layer methods; the model's ``cam_layer`` when None.
        overwrite: replace files of those names in ``out``.
        images: what the pictures show for each input (``[C, *spatial]``, uint8 or float);
            ``x`` itself when None.
        titles: the grid's row titles; the stems when None.
        options: method options, each handed to the methods that take it.

    Returns:
        The paths written.

    Example:
        >>> from cnnkit.workflows.explain import explain_inputs
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
    inputs = list(x)
    for one in inputs:
        check_input(one[None])
    if len(stems) != len(inputs):
        raise ValueError(f"{len(stems)} stems for {len(inputs)} inputs; give one name per input")
    names, skippable = resolve_methods(methods)
    per_method = split_options(names, options or {})
    out = Path(out)
    _refuse(out, stems, names, overwrite)
    images = inputs if images is None else images
    cls = resolve_class(target, run.classes)
    task = run_task(run)
    groups = _groups(run, task, x)
    # a named layer is found in the run's model, whatever wraps it for the call
    layer_arg = None if layer is None else resolve_layer(run.model, layer)
    targets_l, probs_l = [], []
    for model, batch, _ in groups:
        probs_l.append(task.confidence(model, batch))
        targets_l.append(task.predicted(task.explainable(model), batch) if cls is None
                         else torch.full((len(batch),), cls))
    targets, probs = torch.cat(targets_l), torch.cat(probs_l)
    all_maps: dict[str, list[torch.Tensor]] = {}
    for method in names:
        try:
            all_maps[method] = _explain(method, groups, targets_l, task, layer_arg,
                                        per_method[method])
        except (ValueError, RuntimeError, NotImplementedError) as e:
            if not skippable or per_method[method]:  # a method given options must run
                raise
            warnings.warn(f"{method} skipped: it does not apply to this run "
                          f"({str(e).splitlines()[0] if str(e) else type(e).__name__})",
                          UserWarning, stacklevel=2)
    if not all_maps:
        raise ValueError("no explanation method applies to this run; see the warnings above")
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for method, maps in all_maps.items():
        for i, (stem, img, m) in enumerate(zip(stems, images, maps, strict=True)):
            t = int(targets[i])
            name = f"{stem}_{method}"
            np.save(out / f"{name}.npy", m.cpu().numpy())
            title = f"{method}: {run.classes[t]} {task.confidence_text(float(probs[i, t]))}"
            save_overlay(out / f"{name}.png", img, m, title)
            written += [out / f"{name}.npy", out / f"{name}.png"]
    rows = [f"{name}: {run.classes[t]}" for name, t in zip(titles or stems, targets.tolist(),
                                                           strict=True)]
    save_grid(out / "grid.png", images, all_maps, rows)
    written.append(out / "grid.png")
    return written


def _explain(method: str, groups: list[tuple[nn.Module, torch.Tensor, tuple[int, ...]]],
             targets: list[torch.Tensor], task: type[Task], layer: nn.Module | None,
             options: dict[str, Any]) -> list[torch.Tensor]:
    """One method's maps ``[*spatial]`` of every input, cropped to each input's size."""
    maps: list[torch.Tensor] = []
    for (model, batch, sizes), t in zip(groups, targets, strict=True):
        try:
            explainer = create(method, model, layer=layer, task=task, **options)
        except TypeError as e:  # a value of the wrong kind, such as window=abc
            given = ", ".join(f"{k}={v!r}" for k, v in options.items())
            raise ValueError(f"{method}: bad option value in {given} ({e}); give each option "
                             "a value of the kind the method's docstring names (a number, "
                             "true/false, a word, or 2,3 for one size per axis)") from None
        with explainer:
            got = explainer(batch, t)
        maps += [m[tuple(slice(0, v) for v in sizes)] for m in got]
    return maps
