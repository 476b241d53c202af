"""cnnkit: build, train, explain, compress and analyse convolutional neural networks.

The top-level names are imported lazily, so ``import cnnkit`` (and ``cnnkit --help``)
does not pay for importing PyTorch until a model or a run is touched.

Example:
    >>> import cnnkit
    >>> cnnkit.list_models("resnet*")
    ['resnet101', 'resnet152', 'resnet18', 'resnet34', 'resnet50']
    >>> model = cnnkit.create_model("resnet18", num_classes=10, img_size=32)
    >>> print(cnnkit.summary(model, (3, 32, 32)))  # a row per layer, then the totals
    ---...
    Layer    Type    Output shape    Params    MACs    Activations    RF    Jump
    ---...
    fc       Linear  [1, 10]         5.13 K    5.12 K  40 B           133   32
    ---...
    Input: [1, 3, 32, 32]   Output: [1, 10]
    Params: 11.17 M (11,173,962), trainable 11.17 M (11,173,962), 44.70 MB
    MACs: 556.04 M (556,037,120) (convolutions, linear layers, norms; activations, pools,
    additions: 0)
    Activations: 8.39 MB in all layer outputs, peak 1.32 MB live
    Output receptive field: 133, jump 32
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "create_model": "cnnkit.models",
    "list_models": "cnnkit.models",
    "register_model": "cnnkit.models",
    "list_datasets": "cnnkit.data",
    "load_data": "cnnkit.data",
    "train": "cnnkit.training",
    "Trainer": "cnnkit.training",
    "TrainConfig": "cnnkit.training",
    "load_run": "cnnkit.workflows.load",
    "summary": "cnnkit.analysis",
}

__all__ = ["Trainer", "TrainConfig", "create_model", "list_datasets", "list_models",
           "load_data", "load_run", "register_model", "summary", "train"]

if TYPE_CHECKING:
    from cnnkit.analysis import summary
    from cnnkit.data import list_datasets, load_data
    from cnnkit.models import create_model, list_models, register_model
    from cnnkit.training import TrainConfig, Trainer, train
    from cnnkit.workflows.load import load_run


# The subpackages, imported on first use: `import cnnkit; cnnkit.explain.create(...)` works
# without importing each one up front (and PyTorch with them).
_SUBPACKAGES = ("layers", "models", "data", "tasks", "run", "training", "explain", "compress",
                "analysis", "workflows", "cli", "web")


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:  # cnnkit.training is callable: cnnkit.train(...) trains
        return importlib.import_module(f"cnnkit.{name}")  # lazy: PEP 562
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)  # lazy: PEP 562
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cnnkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, *_SUBPACKAGES})
