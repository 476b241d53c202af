"""Export a model for deployment (ONNX or TorchScript), checked against PyTorch's output.

``export`` writes the file, reloads it with the runtime that will serve it (ONNX
Runtime for ONNX, ``torch.jit.load`` for TorchScript) and compares its outputs on a
fresh batch of a different size (the batch axis is exported as dynamic) with the
eager model's: a file that does not reproduce the model is an error, not a warning.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnkit._files import exists, move_new

__all__ = ["export", "FORMATS", "SUFFIXES"]

FORMATS = ("onnx", "torchscript")
SUFFIXES = {"onnx": (".onnx",), "torchscript": (".pt", ".pth")}


def _onnx(model: nn.Module, x: torch.Tensor, path: Path) -> None:
    for dep in ("onnx", "onnxscript"):
        if importlib.util.find_spec(dep) is None:
            raise ValueError(f"ONNX export needs the {dep!r} package; install it with "
                             "`pip install 'cnnkit[export]'`")
    batch = torch.export.Dim("batch", min=1)
    chatter = logging.getLogger("torch.onnx")  # e.g. "torchvision is not installed" x 4
    level = chatter.level
    chatter.setLevel(logging.ERROR)
    with warnings.catch_warnings(), open(os.devnull, "w") as null:
        warnings.simplefilter("ignore")  # the exporter's progress and deprecation chatter
        with contextlib.redirect_stdout(null), contextlib.ExitStack() as restore:
            restore.callback(chatter.setLevel, level)
            # external_data=False: one self-contained file (weights inside, up to ONNX's
            # 2 GB limit), so copying the .onnx alone copies the model
            torch.onnx.export(model, (x,), str(path), dynamo=True, external_data=False,
                              dynamic_shapes=({0: batch},), input_names=["input"],
                              output_names=["output"])


def _run_onnx(path: Path, x: torch.Tensor) -> tuple[torch.Tensor, str] | None:
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    import onnxruntime as ort  # lazy: optional dependency

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    return torch.from_numpy(out), f"onnxruntime {ort.__version__}"


@torch.no_grad()
def export(model: nn.Module, example_input: torch.Tensor, path: str | os.PathLike,
           format: str = "onnx", atol: float = 1e-4, overwrite: bool = False) -> dict[str, Any]:
    """Export ``model`` (in eval mode, on CPU) and check the file against it.

    The file is written and checked under a temporary name in the target folder and
    only then published under ``path``: a failed export or check leaves nothing, and an
    existing file is never replaced unless ``overwrite`` (the publication is atomic: no
    concurrent writer of the same name can be overwritten either).

    Args:
        model: any cnnkit model (classifier or dense).
        example_input: one input batch ``[B, C, H, W]`` of the size the model takes.
        path: the file to write (``.onnx``, or ``.pt`` / ``.pth`` for TorchScript).
        format: ``"onnx"`` (dynamo exporter, dynamic batch, weights inside the file) or
            ``"torchscript"`` (traced).
        atol: largest absolute output difference accepted, relative to the output's scale.
        overwrite: replace an existing file at ``path``.

    Returns:
        ``{"path", "format", "max_abs_diff", "checked_with", "bytes"}``;
        ``checked_with`` is None when ONNX Runtime is not installed (nothing to run the
        ONNX file with).

    Raises:
        ValueError: an unknown format, a file name that does not fit it, a missing
            exporter package, or a file whose outputs differ from the model's.
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose {' or '.join(FORMATS)}")
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES[format]:
        raise ValueError(f"{path} does not end in {' or '.join(SUFFIXES[format])}, the file "
                         f"type of --format {format}; name the file accordingly")
    if path.exists() and not overwrite:
        raise exists(path)
    model = model.eval().cpu()
    x = example_input.detach().cpu().float()
    path.parent.mkdir(parents=True, exist_ok=True)
    check_x = torch.cat([x, x.flip(0)])[: x.shape[0] + 1]  # another batch size, other data
    ref = model(check_x)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
        draft = Path(tmp) / path.name
        if format == "onnx":
            _onnx(model, x, draft)
            ran = _run_onnx(draft, check_x)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TorchScript is in maintenance; it still serves
                traced = torch.jit.trace(model, x, check_trace=False)
            traced.save(str(draft))
            ran = torch.jit.load(str(draft))(check_x), f"torch.jit {torch.__version__}"
        result: dict[str, Any] = {"path": str(path), "format": format, "max_abs_diff": None,
                                  "checked_with": None, "bytes": draft.stat().st_size}
        if ran is not None:
            out, runtime = ran
            diff = float((out.float() - ref.float()).abs().max())
            scale = max(1.0, float(ref.abs().max()))
            if diff > atol * scale:
                raise ValueError(f"the exported {format} file's outputs differ from the model's "
                                 f"by {diff:.3g} (> {atol * scale:.3g}); the model uses an "
                                 "operation the exporter does not reproduce; try the other "
                                 "format")
            result.update(max_abs_diff=diff, checked_with=runtime)
        move_new(draft, path, overwrite=overwrite)
    return result
