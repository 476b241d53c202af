"""The model side of ``cnnkit serve``: a run seen layer by layer, as JSON-ready answers.

After CNN Explainer (Wang et al. 2020, "CNN Explainer: Learning Convolutional Neural
Networks with Interactive Visualization", IEEE TVCG), for any cnnkit run of any task and
any number of spatial dims: every layer's activation maps for an input, the arithmetic of
any neuron, a layer's filters, explanation heat maps of any registered method for any
output, and the model's facts. What follows the last layer (a softmax, a segmentation
mask) is the run's task's to say (:mod:`cnnkit.web.outputs`); what is sent of each map
(a plane, a volume's depth slice, capped and subsampled) is :mod:`cnnkit.web.views`'.

One lock serialises all use of the model (hooks, explainers' gradient flags); finished
traces are cached per input (a bounded LRU) and are never mutated, so answers, and every
depth slice of a volume's answer, are built from them outside the lock.

The weights files are stamped when loaded (:mod:`cnnkit.web.freshness`): every answer about
the model says which files it serves, from when, and whether they changed on disk since
(a training still running replaces them); :meth:`Explorer.reloaded` reads them again.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from cnnkit.explain import create, list_methods
from cnnkit.run import resolve_run, run_test_data
from cnnkit.workflows.explain import run_task
from cnnkit.workflows.load import load_run

from .codec import pack
from .facts import compression_facts, layer_facts
from .freshness import FileStamp, iso_time, weights_files
from .inputs import InputStore, png_data_url
from .layers import Layer, Trace, discover, layer_modules, trace
from .neuron import filters, neuron
from .outputs import create_head
from .views import LayerPlan, plan_layers, sent_values

__all__ = ["Explorer", "LayerPlan", "plan_layers"]

_UPLOADS = {2: "images", 3: "volumes (.nii, .nii.gz)"}  # what an upload is, by spatial dims


class Explorer:
    """A run for the web app, of any task and 1, 2 or 3 spatial dims; one instance is
    shared by all requests.

    Args:
        run: a loaded :class:`cnnkit.run.Run`.
        weights: which weights ``run`` holds (``best``, ``last`` or ``int8``), for display.
        float_model: for an int8 run, the float model it was quantised from: explanations
            need gradients and the summary a float model, so both use it.
        max_channels: channels sent per layer.
        max_side: largest plane side sent before subsampling.
        max_values: most values one activations answer holds.
        cache_size: traces kept (per input).
        max_uploads: uploads kept in memory.
        inputs: the inputs of an explorer this one replaces (:meth:`reloaded`): kept, uploads
            included, if the model takes the same size and classes.
        stamps: the weights files as they were before ``run`` was read from them (None:
            stamped now).

    Example:
        >>> import cnnkit
        >>> from cnnkit.web import Explorer
        >>> trained = cnnkit.train(data="digits", model="tinyvgg", epochs=1, progress=False)
        >>> explorer = Explorer(cnnkit.load_run(trained.path))
        >>> n = explorer.neuron("test:0", 0, (3, 4, 4))  # layer 0, channel 3, at (4, 4)
        >>> n["name"], n["kind"], n["stride"], n["padding"]
        ('features.conv_1_1', 'conv', [1, 1], [1, 1, 1, 1])
        >>> n["matches"]  # the arithmetic shown gives the activation the model computed
        True
    """

    def __init__(self, run: Any, weights: str = "best", float_model: nn.Module | None = None,
                 max_channels: int = 64, max_side: int = 64, max_values: int = 2_000_000,
                 cache_size: int = 4, max_uploads: int = 32, inputs: InputStore | None = None,
                 stamps: Sequence[FileStamp] | None = None) -> None:
        self.run, self.weights, self.model = run, weights, run.model
        self.task = run_task(run)
        self.float_model = float_model if float_model is not None else run.model
        self.input_size = tuple(run.preprocess.input_size)
        self.input_depth = self.input_size[1] if len(self.input_size) == 4 else 1
        self.layers = discover(self.model, self.input_size)
        self.modules = dict(layer_modules(self.model))
        self.options = {"max_channels": max_channels, "max_side": max_side,
                        "max_values": max_values, "cache_size": cache_size,
                        "max_uploads": max_uploads}
        self.plans = plan_layers([la.shape for la in self.layers],
                                 [la.kind == "identity" for la in self.layers],
                                 max_channels, max_side, max_values)
        self.input_plan = plan_layers([self.input_size], [False], max_channels, max_side,
                                      max_values)[0]
        zeros = trace(self.model, self.layers, torch.zeros(1, *self.input_size))
        self.head = create_head(self.task.output_kind, list(run.preprocess.classes),
                                tuple(zeros.logits.shape), self.options)
        same = inputs is not None and inputs.input_size == self.input_size \
            and inputs.classes == list(run.preprocess.classes)
        self.inputs = inputs if same else self._test_inputs(run, self.task, max_uploads)
        self.stamps = tuple(stamps) if stamps is not None else tuple(
            FileStamp.of(p) for p in weights_files(run.path, weights) if p.is_file())
        self.loaded_ns = time.time_ns()
        self.cache_size = cache_size
        self._traces: OrderedDict[str, Trace] = OrderedDict()
        self._lock = threading.Lock()
        self.facts = layer_facts(self.float_model, self.input_size, self.layers) \
            if self.float_model is self.model else self._float_facts()
        int8 = self.model if weights == "int8" else None
        self.compression = compression_facts(run.path, self.float_model, int8)
        try:  # a task whose outputs are not scores (super-resolution) is not explained
            self.task.explainable(self.float_model)
            self.explain_error = None
        except ValueError as e:
            self.explain_error = str(e)

    @classmethod
    def load(cls, run: str | os.PathLike, weights: str = "best", **options: Any) -> Explorer:
        """An explorer for the run folder ``run`` (``weights``: best, last or int8)."""
        root = resolve_run(run)
        files = weights_files(root, weights) if weights in ("best", "last", "int8") else []
        stamps = [FileStamp.of(p) for p in files if p.is_file()]  # before reading: a file
        loaded = load_run(root, weights=weights)  # replaced meanwhile reads as stale
        float_model = load_run(root).model if weights == "int8" else None
        return cls(loaded, weights=weights, float_model=float_model, stamps=stamps, **options)

    def reloaded(self) -> Explorer:
        """A fresh explorer of the same run and weights, read from disk now, with fresh
        caches and the same inputs (uploads included) if the model still takes them.

        Raises:
            ValueError, FileNotFoundError: the files cannot be loaded (this one stays valid).
        """
        return Explorer.load(self.run.path, self.weights, inputs=self.inputs, **self.options)

    def freshness(self) -> dict[str, Any]:
        """The weights files served (name, size, time, SHA-256), when they were loaded, and
        whether any changed on disk since (``stale``)."""
        files = [s.to_dict() for s in self.stamps]
        return {"weights": self.weights, "weights_files": files,
                "loaded": iso_time(self.loaded_ns), "stale": any(f["stale"] for f in files)}

    @property
    def test_error(self) -> str | None:
        """Why the run's test split is missing, if it is."""
        return self.inputs.error

    @staticmethod
    def _test_inputs(run: Any, task: Any, max_uploads: int) -> InputStore:
        """The run's test split with its targets as the task reads them, or (data moved
        or deleted) none, with the reason."""
        prep, error = run.preprocess, None
        try:
            test = run_test_data(run)
            images, targets = test.images, task(run.config).targets(test)
            if tuple(images.shape[1:]) != tuple(prep.input_size):
                raise ValueError(f"its inputs are {list(images.shape[1:])}, the model takes "
                                 f"{list(prep.input_size)}")
        except (ValueError, OSError) as e:
            kind = _UPLOADS.get(len(prep.input_size) - 1)
            error = f"the run's test split cannot be loaded ({' '.join(str(e).split())}); " \
                + (f"upload {kind} instead" if kind else "and its inputs cannot be uploaded")
            images = torch.zeros(0, *prep.input_size, dtype=torch.uint8)
            targets = torch.zeros(0, dtype=torch.long)
        return InputStore(images, targets, prep.classes, prep.input_size, max_uploads,
                          error=error)

    def _float_facts(self) -> dict[str, Any]:
        """Facts of the float model behind an int8 one, matched to the int8 layers by name."""
        float_layers = discover(self.float_model, self.input_size)
        facts = layer_facts(self.float_model, self.input_size, float_layers)
        by_name = dict(zip((la.name for la in float_layers), facts["layers"], strict=True))
        return {**facts, "layers": [by_name.get(la.name) for la in self.layers],
                "from_float_model": True}

    def _depth(self, depth: int | None) -> int:
        """The slider position: ``depth`` checked, or the middle slice by default."""
        if depth is None:
            return self.input_depth // 2
        if not 0 <= depth < self.input_depth:
            raise ValueError(f"depth {depth} is outside the input's slices 0.."
                             f"{self.input_depth - 1}")
        return depth

    # -- model use, under the lock --------------------------------------------------

    def trace(self, key: str) -> tuple[Trace, torch.Tensor, int | None]:
        """The (cached) trace of input ``key``, its raw input and class label."""
        image, label = self.inputs.get(key)
        with self._lock:
            cached = self._traces.get(key)
            if cached is None:
                x = self.run.preprocess(image)[None]
                cached = self._traces[key] = trace(self.model, self.layers, x)
                while len(self._traces) > self.cache_size:
                    self._traces.popitem(last=False)
            self._traces.move_to_end(key)
        return cached, image, label

    def explain(self, key: str, method: str, target: int | None,
                depth: int | None = None) -> dict[str, Any]:
        """A heat map of ``method`` for output ``target`` (None: the task's default, the
        predicted class), as a plane: a volume's slice ``depth``, a signal's strip."""
        if self.explain_error is not None:
            raise ValueError(self.explain_error)
        if method not in list_methods():
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(list_methods())}")
        k = self._depth(depth)
        t, image, _ = self.trace(key)
        classes = self.run.preprocess.classes
        if target is not None and not 0 <= target < len(classes):
            raise ValueError(f"target {target} is not a class index 0..{len(classes) - 1}")
        x = self.run.preprocess(image)[None]
        if target is None:
            target = self.head.predicted(t.logits)
        with self._lock:
            if target is None:  # the task's own default (a region's class, output 0)
                target = int(self.task.predicted(self.task.explainable(self.float_model), x)[0])
            with create(method, self.float_model, task=self.task) as explainer:
                heat = explainer(x, target=target)[0].detach().float()
        plane, index = sent_values(heat[None], LayerPlan(1, 1, False), k, self.input_depth)
        return {"input": key, "method": method, "target": target, "class": classes[target],
                "map": pack(plane[0]), "min": heat.min().item(), "max": heat.max().item(),
                "slice": index, "float_model": self.float_model is not self.model,
                **self.head.explained(t.logits, target)}

    # -- answers built from traces ---------------------------------------------------

    def layer_list(self) -> list[dict[str, Any]]:
        """The layers (and the output's own column, if any, as the last), with what is sent
        of each and facts."""
        rows = [{**la.to_dict(), **plan.to_dict(), "facts": fact,
                 "source_shape": list(self._source_shape(la))}
                for la, plan, fact in zip(self.layers, self.plans, self.facts["layers"],
                                          strict=True)]
        head = self.head.row(len(self.layers), self.layers[-1] if self.layers else None)
        return rows if head is None else [*rows, head]

    def info(self) -> dict[str, Any]:
        """Everything about the run that does not depend on an input."""
        run, prep = self.run, self.run.preprocess
        return {"run": run.path.name, "model": run.config.model, "data": run.config.data,
                "task": self.task.name, "output_kind": self.task.output_kind,
                "weights": self.weights, "classes": prep.classes,
                "input_size": list(self.input_size), "input_depth": self.input_depth,
                "mean": list(prep.mean), "std": list(prep.std),
                "test_images": len(self.inputs), "test_error": self.test_error,
                "summary": run.summary, "input_plan": self.input_plan.to_dict(),
                "layers": self.layer_list(), **self.head.info(),
                "totals": {k: v for k, v in self.facts.items() if k != "layers"},
                "compression": self.compression,
                "methods": [] if self.explain_error else list_methods(),
                "explain_error": self.explain_error,
                "cam_layer": getattr(self.float_model, "cam_layer", None),
                **self.freshness()}

    def activations(self, key: str, depth: int | None = None) -> dict[str, Any]:
        """Every layer's output for input ``key`` (capped as planned; a volume's slice at
        slider position ``depth``), and the prediction."""
        k = self._depth(depth)
        t, image, label = self.trace(key)
        layers = []
        for la, plan, out in zip(self.layers, self.plans, t.outputs, strict=True):
            entry: dict[str, Any] = {"index": la.index, "min": out.min().item(),
                                     "max": out.max().item(), "slice": None}
            if not plan.hidden:
                sent, entry["slice"] = sent_values(out, plan, k, self.input_depth)
                entry["data"] = pack(sent)
            layers.append(entry)
        x = self.run.preprocess(image)
        sent_x, x_slice = sent_values(x, self.input_plan, k, self.input_depth)
        answer = self.head.answer(t.logits, k, self.input_depth)
        if answer["head"] is not None:
            answer["head"]["index"] = len(self.layers)
        classes = self.run.preprocess.classes
        return {"input": key, "label": label, "class": None if label is None else classes[label],
                "depth": k if len(self.input_size) == 4 else None, "x_slice": x_slice,
                "image": png_data_url(image, x_slice), "x": pack(sent_x),
                "x_min": x.min().item(), "x_max": x.max().item(), "layers": layers,
                "truth": self._truth(key, k), **answer}

    def _truth(self, key: str, k: int) -> dict[str, Any] | None:
        """A test input's target when it is not a class: a mask's plane at slider position
        ``k`` (``[1, h, w]``, the mask column's sampling) or values."""
        target = self.inputs.target(key)
        if target is None or target.ndim == 0:
            return None
        if target.ndim == len(self.input_size) - 1 and self.head.plan is not None:
            sent, _ = sent_values(target[None].float(), self.head.plan, k, self.input_depth)
            return {"mask": pack(sent)}
        return {"values": target.reshape(-1).tolist()}

    def _layer(self, index: int) -> Layer | None:
        last = len(self.layers) if self.head.name else len(self.layers) - 1
        if not 0 <= index <= last:
            extra = f" ({last} is the {self.head.name})" if self.head.name else ""
            raise LookupError(f"no layer {index}; the layers are 0..{last}{extra}")
        return self.layers[index] if index < len(self.layers) else None

    def neuron(self, key: str, index: int, position: tuple[int, ...]) -> dict[str, Any]:
        """The arithmetic of neuron ``position`` (``(c, *where)`` in a map, ``(j,)`` in a
        vector) of layer ``index`` (past the last: the output's own column)."""
        layer = self._layer(index)
        t, _, _ = self.trace(key)
        if layer is None:
            view = self.head.neuron(t.logits, position)
            name = self.head.name
        else:
            view = neuron(layer, self.modules[layer.module], t.inputs[index], t.outputs[index],
                          position)
            name = layer.name
        return {"input": key, "layer": index, "name": name, "position": list(position), **view}

    def filters(self, index: int, max_out: int = 64, max_in: int = 16) -> dict[str, Any]:
        """Layer ``index``'s kernels (convolution) or weights (linear), capped."""
        layer = self._layer(index)
        if layer is None:
            raise ValueError(f"the {self.head.name} has no filters")
        return filters(layer, self.modules[layer.module], self._source_shape(layer), max_out,
                       max_in)

    def _source_shape(self, layer: Layer) -> tuple[int, ...]:
        """The shape of what feeds ``layer``: its source's output, or (a functional op in
        between, such as an int8 flatten) the previous layer's if it has as many values."""
        if layer.source == -1:
            return self.input_size
        if layer.source is not None:
            return self.layers[layer.source].shape
        before = self.layers[layer.index - 1].shape if layer.index else self.input_size
        return before if math.prod(before) == math.prod(layer.input_shape) else layer.input_shape
