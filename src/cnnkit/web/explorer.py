"""The model side of ``cnnkit serve``: a run seen layer by layer, as JSON-ready answers.

After CNN Explainer (Wang et al. 2020, "CNN Explainer: Learning Convolutional Neural
Networks with Interactive Visualization", IEEE TVCG), for any cnnkit classifier run:
every layer's activation maps for an input, the arithmetic of any neuron (a softmax
over the logits is the last layer), a layer's filters, explanation heat maps of any
registered method for any class, and the model's facts.

Big layers are capped so a page stays light: at most ``max_channels`` channels of a
layer are sent, and maps are subsampled (every s-th row and column, so each value shown
is a real activation) until a whole network's answer holds at most ``max_values``
numbers; the layer list says what was capped. One lock serialises all use of the model
(hooks, explainers' gradient flags); finished traces are cached per input (a bounded
LRU) and are never mutated, so answers are built from them outside the lock.

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
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cnnkit.run import resolve_run
from cnnkit.tasks import create_task
from cnnkit.tasks.classify import Classify
from cnnkit.workflows.load import load_run

from .codec import pack
from .facts import compression_facts, layer_facts
from .freshness import FileStamp, iso_time, weights_files
from .inputs import InputStore, png_data_url
from .layers import Layer, Trace, discover, layer_modules, trace
from .neuron import filters, neuron, softmax_neuron

__all__ = ["Explorer", "LayerPlan"]


@dataclass(frozen=True)
class LayerPlan:
    """What of a layer's output is sent: ``channels`` of them (maps) or ``values`` of a
    vector, every ``stride``-th row and column; ``hidden`` for no-op layers."""

    channels: int
    stride: int
    hidden: bool

    def to_dict(self) -> dict[str, Any]:
        return {"channels": self.channels, "stride": self.stride, "hidden": self.hidden}


def plan_layers(shapes: list[tuple[int, ...]], hidden: list[bool], max_channels: int,
                max_side: int, max_values: int) -> list[LayerPlan]:
    """Channel caps and subsampling strides so that all sent values fit ``max_values``.

    Example:
        >>> [p.stride for p in plan_layers([(64, 224, 224), (10,)], [False, False], 8, 64,
        ...                                 100_000)]
        [4, 1]
    """
    side = max_side
    while True:
        plans = []
        for shape, skip in zip(shapes, hidden, strict=True):
            if len(shape) == 3:
                plans.append(LayerPlan(min(shape[0], max_channels),
                                       max(1, math.ceil(max(shape[1:]) / side)), skip))
            else:
                plans.append(LayerPlan(min(math.prod(shape), max_channels * max_side), 1, skip))
        total = sum(p.channels * math.ceil(s[1] / p.stride) * math.ceil(s[2] / p.stride)
                    if len(s) == 3 else p.channels
                    for p, s in zip(plans, shapes, strict=True) if not p.hidden)
        if total <= max_values or side <= 4:
            return plans
        side //= 2


class Explorer:
    """A classifier run for the web app; one instance is shared by all requests.

    Args:
        run: a loaded :class:`cnnkit.run.Run` (classification).
        weights: which weights ``run`` holds (``best``, ``last`` or ``int8``), for display.
        float_model: for an int8 run, the float model it was quantised from: explanations
            need gradients and the summary a float model, so both use it.
        max_channels: channels sent per layer.
        max_side: largest map side sent before subsampling.
        max_values: most values one activations answer holds.
        cache_size: traces kept (per input).
        max_uploads: uploads kept in memory.
        inputs: the inputs of an explorer this one replaces (:meth:`reloaded`): kept, uploads
            included, if the model takes the same size and classes.
        stamps: the weights files as they were before ``run`` was read from them (None:
            stamped now).

    Example:
        >>> from cnnkit.training import load_run
        >>> explorer = Explorer(load_run("runs/tinyvgg-digits"))  # doctest: +SKIP
        >>> explorer.neuron("test:0", 0, (3, 4, 4))["matches"]  # doctest: +SKIP
        True
    """

    def __init__(self, run: Any, weights: str = "best", float_model: nn.Module | None = None,
                 max_channels: int = 64, max_side: int = 64, max_values: int = 2_000_000,
                 cache_size: int = 4, max_uploads: int = 32, inputs: InputStore | None = None,
                 stamps: Sequence[FileStamp] | None = None) -> None:
        if not isinstance(create_task(run.config.task, run.config), Classify):
            raise ValueError(f"cnnkit serve explores classifiers; {run.path} is a "
                             f"{run.config.task} run")
        self.run, self.weights, self.model = run, weights, run.model
        self.float_model = float_model if float_model is not None else run.model
        self.input_size = tuple(run.preprocess.input_size)
        self.layers = discover(self.model, self.input_size)
        self.modules = dict(layer_modules(self.model))
        self.plans = plan_layers([la.shape for la in self.layers],
                                 [la.kind == "identity" for la in self.layers],
                                 max_channels, max_side, max_values)
        self.input_plan = plan_layers([self.input_size], [False], max_channels, max_side,
                                      max_values)[0]
        same = inputs is not None and inputs.input_size == self.input_size \
            and inputs.classes == list(run.preprocess.classes)
        self.inputs = inputs if same else self._test_inputs(run, max_uploads)
        self.options = {"max_channels": max_channels, "max_side": max_side,
                        "max_values": max_values, "cache_size": cache_size,
                        "max_uploads": max_uploads}
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
    def _test_inputs(run: Any, max_uploads: int) -> InputStore:
        """The run's test split, or (data moved or deleted) none, with the reason."""
        from cnnkit.run import run_test_data

        prep, error = run.preprocess, None
        try:
            test = run_test_data(run)
            images, labels = test.images, test.labels
            if tuple(images.shape[1:]) != tuple(prep.input_size):
                raise ValueError(f"its images are {list(images.shape[1:])}, the model takes "
                                 f"{list(prep.input_size)}")
        except (ValueError, OSError) as e:
            error = f"the run's test split cannot be loaded ({' '.join(str(e).split())}); " \
                    "upload images instead"
            images = torch.zeros(0, *prep.input_size, dtype=torch.uint8)
            labels = torch.zeros(0, dtype=torch.long)
        return InputStore(images, labels, prep.classes, prep.input_size, max_uploads,
                          error=error)

    def _float_facts(self) -> dict[str, Any]:
        """Facts of the float model behind an int8 one, matched to the int8 layers by name."""
        float_layers = discover(self.float_model, self.input_size)
        facts = layer_facts(self.float_model, self.input_size, float_layers)
        by_name = dict(zip((la.name for la in float_layers), facts["layers"], strict=True))
        return {**facts, "layers": [by_name.get(la.name) for la in self.layers],
                "from_float_model": True}

    # -- model use, under the lock --------------------------------------------------

    def trace(self, key: str) -> tuple[Trace, torch.Tensor, int | None]:
        """The (cached) trace of input ``key``, its uint8 image and label."""
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

    def explain(self, key: str, method: str, target: int | None) -> dict[str, Any]:
        """A heat map ``[H, W]`` of ``method`` for class ``target`` (None: the predicted)."""
        from cnnkit.explain import create, list_methods

        if method not in list_methods():
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(list_methods())}")
        t, image, _ = self.trace(key)
        classes = self.run.preprocess.classes
        if target is not None and not 0 <= target < len(classes):
            raise ValueError(f"target {target} is not a class index 0..{len(classes) - 1}")
        target = int(t.logits.argmax()) if target is None else target
        x = self.run.preprocess(image)[None]
        with self._lock, create(method, self.float_model) as explainer:
            heat = explainer(x, target=target)[0].detach().float()
        return {"input": key, "method": method, "target": target, "class": classes[target],
                "map": pack(heat), "min": heat.min().item(), "max": heat.max().item(),
                "float_model": self.float_model is not self.model}

    # -- answers built from traces ---------------------------------------------------

    def layer_list(self) -> list[dict[str, Any]]:
        """The layers (and the softmax as the last), with what is sent of each and facts."""
        rows = [{**la.to_dict(), **plan.to_dict(), "facts": fact,
                 "source_shape": list(self._source_shape(la))}
                for la, plan, fact in zip(self.layers, self.plans, self.facts["layers"],
                                          strict=True)]
        n = len(self.run.preprocess.classes)
        last = self.layers[-1] if self.layers else None
        rows.append({"index": len(self.layers), "name": "softmax", "module": "", "type": "Softmax",
                     "kind": "softmax", "shape": [n], "input_shape": [n],
                     "source": last.index if last is not None and last.shape == (n,) else None,
                     "channels": n, "stride": 1, "hidden": False, "facts": None,
                     "source_shape": [n]})
        return rows

    def info(self) -> dict[str, Any]:
        """Everything about the run that does not depend on an input."""
        from cnnkit.explain import list_methods

        run, prep = self.run, self.run.preprocess
        return {"run": run.path.name, "model": run.config.model, "data": run.config.data,
                "weights": self.weights, "classes": prep.classes,
                "input_size": list(self.input_size), "mean": list(prep.mean),
                "std": list(prep.std), "test_images": len(self.inputs),
                "test_error": self.test_error, "summary": run.summary,
                "input_plan": self.input_plan.to_dict(), "layers": self.layer_list(),
                "totals": {k: v for k, v in self.facts.items() if k != "layers"},
                "compression": self.compression, "methods": list_methods(),
                "cam_layer": getattr(self.float_model, "cam_layer", None),
                **self.freshness()}

    def activations(self, key: str) -> dict[str, Any]:
        """Every layer's output for input ``key`` (capped as planned), and the prediction."""
        t, image, label = self.trace(key)
        layers = []
        for la, plan, out in zip(self.layers, self.plans, t.outputs, strict=True):
            entry: dict[str, Any] = {"index": la.index, "min": out.min().item(),
                                     "max": out.max().item()}
            if not plan.hidden:
                sent = out[:plan.channels, ::plan.stride, ::plan.stride] if out.ndim == 3 \
                    else out.reshape(-1)[:plan.channels]
                entry["data"] = pack(sent)
            layers.append(entry)
        x = self.run.preprocess(image)
        s = self.input_plan.stride
        probs = torch.softmax(t.logits, 0)
        classes = self.run.preprocess.classes
        return {"input": key, "label": label, "class": None if label is None else classes[label],
                "image": png_data_url(image),
                "x": pack(x[:self.input_plan.channels, ::s, ::s]),
                "x_min": x.min().item(), "x_max": x.max().item(), "layers": layers,
                "logits": t.logits.tolist(), "probabilities": probs.tolist(),
                "predicted": int(probs.argmax())}

    def _layer(self, index: int) -> Layer | None:
        if not 0 <= index <= len(self.layers):
            raise LookupError(f"no layer {index}; the layers are 0..{len(self.layers)} "
                              f"({len(self.layers)} is the softmax)")
        return self.layers[index] if index < len(self.layers) else None

    def neuron(self, key: str, index: int, position: tuple[int, ...]) -> dict[str, Any]:
        """The arithmetic of neuron ``position`` (``(c, y, x)`` or ``(j,)``) of layer ``index``."""
        layer = self._layer(index)
        t, _, _ = self.trace(key)
        if layer is None:
            if len(position) != 1:
                raise ValueError("a softmax neuron is one class: give c only")
            view = softmax_neuron(t.logits, position[0])
            view["class"] = self.run.preprocess.classes[position[0]]
            name = "softmax"
        else:
            view = neuron(layer, self.modules[layer.module], t.inputs[index], t.outputs[index],
                          position)
            name = layer.name
        return {"input": key, "layer": index, "name": name, "position": list(position), **view}

    def filters(self, index: int, max_out: int = 64, max_in: int = 16) -> dict[str, Any]:
        """Layer ``index``'s kernels (convolution) or weights (linear), capped."""
        layer = self._layer(index)
        if layer is None:
            raise ValueError("the softmax has no filters")
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
