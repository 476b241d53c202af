"""The contract every cnnkit classifier speaks.

Explain, compress, analysis and the trainer see models only through this contract,
never through per-architecture ``if``s (the timm convention):

* ``forward_features(x)``: the last feature map ``[B, C, h, w]`` before pooling.
* ``forward_head(x, pre_logits=False)``: pooling and classifier; with
  ``pre_logits=True`` the pooled features before the last linear layer.
* ``reset_classifier(num_classes)``: a fresh classifier for another number of classes.
* ``get_classifier()``: the final linear layer.
* ``feature_info``: one dict per stage, ``{"num_chs", "reduction", "module"}``, where
  ``module`` is the qualified name of the stage's output module.
* ``cam_layer``: qualified name of the module whose output explanations (Grad-CAM)
  use by default, normally the last convolutional stage.
* ``default_cfg``: ``{"input_size": (C, H, W), "mean": (...), "std": (...),
  "num_classes": int, "paper": str}``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Classifier", "to_2tuple", "resolve_stem"]


def to_2tuple(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """``32 -> (32, 32)``; ``(h, w)`` is returned as a tuple."""
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


def resolve_stem(stem: str, img_size: int | tuple[int, int]) -> str:
    """Resolve ``stem="auto"`` to ``"small"`` for inputs under 64 pixels, else ``"imagenet"``.

    The ``"imagenet"`` stem downsamples by 4 (a 7x7 stride-2 convolution and a
    max-pool, or two pools in VGG); the ``"small"`` stem keeps the resolution, so
    a network's total stride is 8 and 32x32 and 8x8 inputs keep spatial maps.
    """
    if stem not in ("auto", "imagenet", "small"):
        raise ValueError(f"unknown stem {stem!r}; choose 'auto', 'imagenet' or 'small'")
    if stem == "auto":
        return "small" if min(to_2tuple(img_size)) < 64 else "imagenet"
    return stem


class Classifier(nn.Module):
    """Base class of cnnkit classifiers: ``forward = forward_head(forward_features(x))``.

    Subclasses set ``num_classes``, ``in_chans``, ``feature_info``, ``cam_layer`` and
    ``default_cfg`` in ``__init__`` and implement the three abstract methods.
    """

    num_classes: int
    in_chans: int
    feature_info: list[dict]
    cam_layer: str
    default_cfg: dict

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def get_classifier(self) -> nn.Module:
        raise NotImplementedError

    def reset_classifier(self, num_classes: int) -> None:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
