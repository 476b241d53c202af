"""Loading any run, compressed ones included: the public :func:`cnnkit.load_run`.

:func:`cnnkit.run.load_run` reads a run's float weights (best or last); the int8 model that
``cnnkit compress --quantize int8`` writes beside them is rebuilt by the compress package
(its quantised graph, then the int8 codes, scales and zero points, never a pickle), which
sits above the run layer, so the one loader that knows both lives here.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from cnnkit.compress.quantized_file import load_quantized
from cnnkit.run import Run, RunPaths, resolve_run
from cnnkit.run import load_run as load_float_run

__all__ = ["load_run"]


def load_run(path: str | os.PathLike, weights: str = "best", device: str = "cpu") -> Run:
    """Load a run folder: its model (in eval mode), config and preprocessing.

    Only YAML, JSON and safetensors are read, so loading never executes code.

    Args:
        path: the run folder (or its name inside ``runs/``).
        weights: ``"best"`` (by validation accuracy), ``"last"``, or ``"int8"``: the
            int8 model ``cnnkit compress --quantize int8`` wrote (CPU only).
        device: where to put the model.

    Example:
        >>> import torch
        >>> import cnnkit
        >>> trained = cnnkit.train(data="digits", epochs=2, lr=0.01, progress=False)
        >>> run = cnnkit.load_run(trained.path)  # or "runs/tinyvgg_wide-digits"
        >>> run.preprocess.input_size, run.classes[:3], run.model.training
        ((1, 8, 8), ['0', '1', '2'], False)
        >>> digits = cnnkit.load_data("digits")
        >>> images = digits.images[:5]  # uint8 [5, 1, 8, 8]; preprocess also takes files
        >>> batch = torch.stack([run.preprocess(image) for image in images])
        >>> run.model(batch).argmax(1).tolist(), digits.labels[:5].tolist()
        ([0, 1, 2, 3, 4], [0, 1, 2, 3, 4])
    """
    if weights != "int8":
        return load_float_run(path, weights=weights, device=device)
    root = resolve_run(path)
    paths = RunPaths(root)
    if not paths.int8.is_file():
        raise ValueError(f"{root} has no int8 model; make one with `cnnkit compress {root} "
                         "--quantize int8 --out NEW_RUN`")
    if torch.device(device).type != "cpu":
        raise ValueError("int8 models run on the CPU only; use --device cpu")
    run = load_float_run(root)
    model = load_quantized(paths.int8, run.model, torch.zeros(1, *run.preprocess.input_size))
    return dataclasses.replace(run, model=model)
