"""Export a model for deployment (ONNX or TorchScript), checked against PyTorch's output.

``export`` writes the file, reloads it with the runtime that will serve it (ONNX
Runtime for ONNX, ``torch.jit.load`` for TorchScript) and compares its outputs on a
fresh batch of a different size (the batch axis is exported as dynamic) with the
eager model's: a file that does not reproduce the model is an error, not a warning.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnkit._files import exists, move_new

__all__ = ["export", "FORMATS", "SUFFIXES"]

FORMATS = ("onnx", "torchscript")
SUFFIXES = {"onnx": (".onnx",), "torchscript": (".pt", ".pth")}


# ONNX keeps a model in one protobuf message, which cannot exceed 2 GiB; a larger model
# would need its weights in a second file beside the .onnx (external data)
ONNX_FILE_LIMIT = 2**31 - 1
_TORCHVISION_NOTE = "torchvision is not installed"  # its detection ops: nothing cnnkit uses


class _DropMessage(logging.Filter):
    """Drops the log records whose message starts with ``prefix`` (nothing else)."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence, for one export, the exporter's messages a user cannot act on: "torchvision
    is not installed" (four log lines, about detection ops) and PyTorch's own deprecation
    of ``LeafSpec`` inside ``torch.export``; every other warning still reaches the user."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    drop = _DropMessage(_TORCHVISION_NOTE)
    registration.addFilter(drop)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)`",
                                    category=FutureWarning)
            yield
    finally:
        registration.removeFilter(drop)


def _state_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values()
               if isinstance(t, torch.Tensor))


def _too_large(nbytes: int) -> ValueError:
    return ValueError(f"the model's weights take {nbytes / 1e9:.2f} GB, over ONNX's 2 GB limit "
                      "for one file; export it with --format torchscript (one file of any "
                      "size)")


def _onnx(model: nn.Module, x: torch.Tensor, path: Path, metadata: dict[str, str]) -> None:
    for dep in ("onnx", "onnxscript"):
        if importlib.util.find_spec(dep) is None:
            raise ValueError(f"ONNX export needs the {dep!r} package; install it with "
                             '`pip install -e ".[export]"`')
    if _state_bytes(model) > ONNX_FILE_LIMIT:  # before minutes of exporting
        raise _too_large(_state_bytes(model))
    batch = torch.export.Dim("batch", min=1)
    with _quiet_exporter():
        program = torch.onnx.export(model, (x,), dynamo=True, verbose=False,
                                    dynamic_shapes=({0: batch},), input_names=["input"],
                                    output_names=["output"])
    graph = program.model.graph
    weights = sum(v.const_value.nbytes for v in graph.initializers.values()
                  if v.const_value is not None)
    if weights > ONNX_FILE_LIMIT:  # constants the exporter folded in
        raise _too_large(weights)
    opset = program.model.opset_imports.get("", None)
    program.model.metadata_props.update({**metadata, "opset": str(opset)})
    # external_data=False: one self-contained file (the weights inside), so copying the
    # .onnx alone copies the model
    program.save(str(path), external_data=False)
    stray = [p.name for p in path.parent.iterdir() if p != path]
    if stray:  # the exporter decided on external data after all: never publish half a model
        raise ValueError(f"the ONNX exporter wrote {', '.join(stray)} beside {path.name}; "
                         "export with --format torchscript")


def _run_onnx(path: Path, x: torch.Tensor) -> tuple[torch.Tensor, str] | None:
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    import onnxruntime as ort  # lazy: optional dependency

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    return torch.from_numpy(out), f"onnxruntime {ort.__version__}"


@torch.no_grad()
def export(model: nn.Module, example_input: torch.Tensor, path: str | os.PathLike,
           format: str = "onnx", atol: float = 1e-4, overwrite: bool = False,
           metadata: Mapping[str, str] | None = None) -> dict[str, Any]:
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
        metadata: strings stored with the model (ONNX: ``metadata_props``, with
            ``opset`` added; TorchScript: the extra file ``metadata.json``), e.g. the
            preprocessing and class names that
            :func:`cnnkit.workflows.onnx_predict.export_metadata` gives.

    Returns:
        ``{"path", "format", "max_abs_diff", "checked_with", "bytes"}``;
        ``checked_with`` is None when ONNX Runtime is not installed (nothing to run the
        ONNX file with).

    Raises:
        ValueError: an unknown format, a file name that does not fit it, a missing
            exporter package, an ONNX model over 2 GB (one file cannot hold it; TorchScript
            can), or a file whose outputs differ from the model's.
        FileExistsError: ``path`` exists and ``overwrite`` is False.

    Example:
        >>> import torch
        >>> from cnnkit.compress import export
        >>> from cnnkit.models import create_model
        >>> model = create_model("tinyvgg", num_classes=10, in_chans=1, img_size=8)
        >>> info = export(model, torch.rand(1, 1, 8, 8), "tinyvgg.pt", format="torchscript")
        >>> info["format"], info["max_abs_diff"], info["checked_with"].split()[0]
        ('torchscript', 0.0, 'torch.jit')
        >>> torch.jit.load("tinyvgg.pt")(torch.rand(2, 1, 8, 8)).shape  # no cnnkit needed
        torch.Size([2, 10])
    """
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose {' or '.join(FORMATS)}")
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES[format]:
        raise ValueError(f"{path} does not end in {' or '.join(SUFFIXES[format])}, the file "
                         f"type of --format {format}; name the file accordingly")
    if path.exists() and not overwrite:
        raise exists(path)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    model = model.eval().cpu()
    x = example_input.detach().cpu().float()
    path.parent.mkdir(parents=True, exist_ok=True)
    check_x = torch.cat([x, x.flip(0)])[: x.shape[0] + 1]  # another batch size, other data
    ref = model(check_x)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
        draft = Path(tmp) / path.name
        if format == "onnx":
            _onnx(model, x, draft, meta)
            ran = _run_onnx(draft, check_x)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TorchScript is in maintenance; it still serves
                traced = torch.jit.trace(model, x, check_trace=False)
            traced.save(str(draft), _extra_files={"metadata.json": json.dumps(meta)})
            with warnings.catch_warnings():  # the reader of the file just written
                warnings.filterwarnings("ignore", message="`torch.jit.load` is deprecated",
                                        category=DeprecationWarning)
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
