"""An exported ONNX file as a self-describing model: ``cnnkit predict MODEL.onnx FILES...``.

``cnnkit export RUN --format onnx`` stores with the graph what a user of the file needs
to feed it (:func:`export_metadata`: the task, input size, mean and std, class names, the
model's name and cnnkit's version; the exporter adds the opset), so the ``.onnx`` file,
copied alone, predicts as the run did: :func:`predict_onnx` reads that metadata, applies
the run's own preprocessing (:class:`cnnkit.run.Preprocess`) and runs the graph in ONNX
Runtime, the ``export`` extra (``pip install -e ".[export]"``). Tasks whose predictions
are printed (classification, regression) are supported; segmentation and
super-resolution write files from sliding windows and predict from their run folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnnkit import __version__
from cnnkit.run import Preprocess, Run
from cnnkit.tasks import create_task

from .evaluate import check_prediction_inputs

__all__ = ["OnnxModel", "export_metadata", "load_onnx", "predict_onnx", "METADATA_KEYS"]

# The metadata_props cnnkit writes (all strings; lists as JSON); "opset" is added by the
# exporter itself.
METADATA_KEYS = ("cnnkit_version", "task", "model", "input_size", "mean", "std", "classes")
INSTALL_HINT = 'pip install -e ".[export]"'


def export_metadata(run: Run) -> dict[str, str]:
    """What an exported file of ``run`` carries so that it predicts on its own.

    Example:
        >>> import json
        >>> import cnnkit
        >>> from cnnkit.workflows.onnx_predict import export_metadata
        >>> trained = cnnkit.train(data="digits", model="lenet5", epochs=1, progress=False)
        >>> meta = export_metadata(cnnkit.load_run(trained.path))
        >>> meta["task"], meta["model"], meta["input_size"], json.loads(meta["classes"])[:3]
        ('classify', 'lenet5', '[1, 8, 8]', ['0', '1', '2'])
    """
    prep = run.preprocess
    return {"cnnkit_version": __version__, "task": run.config.task, "model": run.config.model,
            "input_size": json.dumps(list(prep.input_size)), "mean": json.dumps(list(prep.mean)),
            "std": json.dumps(list(prep.std)), "classes": json.dumps(list(prep.classes))}


@dataclass
class OnnxModel:
    """An exported file loaded in ONNX Runtime with the preprocessing it carries.

    Calling it on a normalised batch ``[B, C, *spatial]`` returns the model's output.
    """

    path: Path
    session: Any
    preprocess: Preprocess
    metadata: dict[str, str]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        feed = {self.session.get_inputs()[0].name: np.ascontiguousarray(x.float().numpy())}
        return torch.from_numpy(self.session.run(None, feed)[0])


def _read_metadata(path: Path, meta: dict[str, str]) -> Preprocess:
    missing = [k for k in METADATA_KEYS if k not in meta]
    if missing:
        raise ValueError(f"{path} has no cnnkit metadata ({', '.join(missing)} missing): it was "
                         "not written by `cnnkit export`; export the run again with `cnnkit "
                         "export RUN --format onnx`, or predict with the run folder")
    try:
        sizes = {k: json.loads(meta[k]) for k in ("input_size", "mean", "std", "classes")}
    except ValueError as e:
        raise ValueError(f"{path}'s cnnkit metadata is damaged ({e}); export the run "
                         "again") from None
    size, mean, std, classes = (sizes[k] for k in ("input_size", "mean", "std", "classes"))
    ok = (isinstance(size, list) and len(size) >= 1 and all(type(v) is int and v > 0 for v in size)
          and all(isinstance(v, list) and len(v) == size[0]
                  and all(isinstance(s, (int, float)) for s in v) for v in (mean, std))
          and all(s > 0 for s in std)
          and isinstance(classes, list) and all(isinstance(c, str) for c in classes))
    if not ok:
        raise ValueError(f"{path}'s cnnkit metadata is inconsistent (input_size {size}, mean "
                         f"{mean}, std {std}); export the run again")
    return Preprocess(tuple(size), [float(v) for v in mean], [float(v) for v in std], classes,
                      meta["task"])


def load_onnx(path: str | os.PathLike) -> OnnxModel:
    """Open an ONNX file written by ``cnnkit export`` in ONNX Runtime (CPU).

    Raises:
        FileNotFoundError: no such file.
        ValueError: ONNX Runtime is not installed (with the install command), the file
            is not an ONNX model, or it lacks cnnkit's metadata.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file {str(path)!r} does not exist; write one with "
                                "`cnnkit export RUN --format onnx`")
    try:
        import onnxruntime as ort  # lazy: optional dependency (the export extra)
    except ImportError:
        raise ValueError(f"predicting with an .onnx file needs onnxruntime; install it with "
                         f"{INSTALL_HINT}") from None
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT's notes on the graph are not the user's
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ORT raises its own unrelated classes for bad files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is not a readable ONNX model ({first[:200]}); export the run "
                         "again with `cnnkit export RUN --format onnx`") from None
    meta = dict(session.get_modelmeta().custom_metadata_map)
    return OnnxModel(path, session, _read_metadata(path, meta), meta)


def predict_onnx(model: str | os.PathLike | OnnxModel, files: list[str],
                 topk: int = 3) -> list[dict[str, Any]]:
    """What an exported ONNX model says of each input file, as
    :func:`cnnkit.workflows.evaluate.predict_files` says it for the run: the top-k classes
    and probabilities of a classifier, the values of a regression.

    Example:
        >>> import torch
        >>> from PIL import Image
        >>> import cnnkit
        >>> from cnnkit.compress import export
        >>> from cnnkit.workflows.onnx_predict import export_metadata, predict_onnx
        >>> trained = cnnkit.train(data="digits", epochs=2, lr=0.01, progress=False)
        >>> run = cnnkit.load_run(trained.path)
        >>> _ = export(run.model, torch.zeros(1, 1, 8, 8), "digits.onnx",
        ...            metadata=export_metadata(run))  # what `cnnkit export RUN` writes
        >>> zero = cnnkit.load_data("digits").images[0, 0]  # a handwritten 0, uint8 8x8
        >>> Image.fromarray(zero.numpy()).save("zero.png")
        >>> [answer] = predict_onnx("digits.onnx", ["zero.png"], topk=2)  # no run folder
        >>> top = answer["predictions"][0]
        >>> answer["file"], len(answer["predictions"]), top["class"], top["probability"] > 0.9
        ('zero.png', 2, '0', True)
    """
    model = model if isinstance(model, OnnxModel) else load_onnx(model)
    task = create_task(model.preprocess.task)
    if task.writes_predictions:
        raise ValueError(f"{model.path} holds a {task.name} model, whose predictions are files "
                         "made from sliding windows; predict with its run folder: `cnnkit "
                         "predict RUN FILES... --out DIR`")
    check_prediction_inputs(files, topk)
    x = torch.stack([model.preprocess(f) for f in files])
    out = model(x).float()
    classes = model.preprocess.classes
    if out.ndim != 2 or out.shape[1] != len(classes):
        raise ValueError(f"{model.path} gives outputs of shape {list(out.shape)} but its "
                         f"metadata names {len(classes)} classes; export the run again")
    return [{"file": f, **task.predict_row(o, classes, topk)}
            for f, o in zip(files, out, strict=True)]
