"""Export a model for deployment (ONNX or TorchScript), checked against PyTorch's output.

``export`` writes the file, reloads it with the runtime that will serve it (ONNX
Runtime for ONNX, ``torch.jit.load`` for TorchScript) and compares its outputs on a
fresh batch of a different size (the batch axis is exported as dynamic) with the
eager model's: a file that does not reproduce the model is an error, not a warning.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["export", "FORMATS"]

FORMATS = ("onnx", "torchscript")


def _onnx(model: nn.Module, x: torch.Tensor, path: Path) -> None:
    for dep in ("onnx", "onnxscript"):
        if importlib.util.find_spec(dep) is None:
            raise ValueError(f"ONNX export needs the {dep!r} package; install it with "
                             "`pip install 'cnnkit[export]'`")
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings(), open(os.devnull, "w") as null:
        warnings.simplefilter("ignore")  # the exporter's progress and deprecation chatter
        with contextlib.redirect_stdout(null):
            torch.onnx.export(model, (x,), str(path), dynamo=True,
                              dynamic_shapes=({0: batch},), input_names=["input"],
                              output_names=["output"])


def _run_onnx(path: Path, x: torch.Tensor) -> tuple[torch.Tensor, str] | None:
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    return torch.from_numpy(out), f"onnxruntime {ort.__version__}"


@torch.no_grad()
def export(model: nn.Module, example_input: torch.Tensor, path: str | os.PathLike,
           format: str = "onnx", atol: float = 1e-4) -> dict[str, Any]:
    """Export ``model`` (in eval mode, on CPU) and check the file against it.

    Args:
        model: any cnnkit model (classifier or dense).
        example_input: one input batch ``[B, C, H, W]`` of the size the model takes.
        path: the file to write (``.onnx`` or ``.pt``).
        format: ``"onnx"`` (dynamo exporter, dynamic batch) or ``"torchscript"`` (traced).
        atol: largest absolute output difference accepted, relative to the output's scale.

    Returns:
        ``{"path", "format", "max_abs_diff", "checked_with", "bytes"}``;
        ``checked_with`` is None when ONNX Runtime is not installed (nothing to run the
        ONNX file with).

    Raises:
        ValueError: an unknown format, a missing exporter package, or a file whose
            outputs differ from the model's.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose {' or '.join(FORMATS)}")
    model = model.eval().cpu()
    x = example_input.detach().cpu().float()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    check_x = torch.cat([x, x.flip(0)])[: x.shape[0] + 1]  # another batch size, other data
    ref = model(check_x)
    if format == "onnx":
        _onnx(model, x, path)
        ran = _run_onnx(path, check_x)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript is in maintenance; it still serves
            traced = torch.jit.trace(model, x, check_trace=False)
        traced.save(str(path))
        ran = torch.jit.load(str(path))(check_x), f"torch.jit {torch.__version__}"
    result: dict[str, Any] = {"path": str(path), "format": format, "max_abs_diff": None,
                              "checked_with": None, "bytes": path.stat().st_size}
    if ran is not None:
        out, runtime = ran
        diff = float((out.float() - ref.float()).abs().max())
        scale = max(1.0, float(ref.abs().max()))
        if diff > atol * scale:
            raise ValueError(f"the exported {format} file's outputs differ from the model's by "
                             f"{diff:.3g} (> {atol * scale:.3g}); the model uses an operation the "
                             "exporter does not reproduce; try the other format")
        result.update(max_abs_diff=diff, checked_with=runtime)
    return result
