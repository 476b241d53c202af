"""The contract every cnnkit classifier speaks.

Explain, compress, analysis and the trainer see models only through this contract,
never through per-architecture ``if``s (the timm convention):

* ``forward_features(x)``: the last feature map ``[B, C, *spatial]`` before pooling.
* ``forward_head(x, pre_logits=False)``: pooling and classifier; with
  ``pre_logits=True`` the pooled features before the last linear layer.
* ``reset_classifier(num_classes)``: a fresh classifier for another number of classes.
* ``get_classifier()``: the final linear layer.
* ``feature_info``: one dict per stage, ``{"num_chs", "reduction", "module"}``, where
  ``module`` is the qualified name of the stage's output module.
* ``cam_layer``: qualified name of the module whose output explanations (Grad-CAM)
  use by default, normally the last convolutional stage.
* ``default_cfg``: ``{"input_size": (C, *spatial), "mean": (...), "std": (...),
  "num_classes": int, "paper": str}``; ``len(spatial)`` (1, 2 or 3) is the number of
  dimensions the model was built in (:mod:`cnnkit.layers.nd`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cnnkit.layers import nd

__all__ = ["Classifier", "to_2tuple", "resolve_stem", "check_img_size", "imagenet_stats",
           "init_weights"]


def to_2tuple(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """``32 -> (32, 32)``; ``(h, w)`` is returned as a tuple."""
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


def _smallest_side(img_size: int | Sequence[int]) -> int:
    return img_size if isinstance(img_size, int) else min(int(s) for s in img_size)


def resolve_stem(stem: str, img_size: int | Sequence[int]) -> str:
    """Resolve ``stem="auto"``: ``"small"`` if the smallest side is under 64, else ``"imagenet"``.

    ``img_size`` is an int or the spatial sizes in any number of dimensions. The
    ``"imagenet"`` stem downsamples by 4 (a 7x7 stride-2 convolution and a max-pool,
    or two pools in VGG); the ``"small"`` stem keeps the resolution, so a network's
    total stride is 8 and 32x32 and 8x8 inputs keep spatial maps.
    """
    if stem not in ("auto", "imagenet", "small"):
        raise ValueError(f"unknown stem {stem!r}; choose 'auto', 'imagenet' or 'small'")
    if stem == "auto":
        return "small" if _smallest_side(img_size) < 64 else "imagenet"
    return stem


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_stats(in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ImageNet mean/std for 3 channels; for other counts the channel-averaged values."""
    if in_chans == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    mean, std = sum(IMAGENET_MEAN) / 3, sum(IMAGENET_STD) / 3
    return (round(mean, 4),) * in_chans, (round(std, 4),) * in_chans


def init_weights(model: nn.Module, dims: int = 2) -> None:
    """torchvision's initialisation of VGG and MobileNet, so fresh models match its statistics.

    Convolutions: He normal, fan-out, ReLU gain (He et al. 2015, "Delving Deep into
    Rectifiers"); norms: weight 1, bias 0; linear layers: N(0, 0.01); biases 0. The
    convolutions and norms are those of the network's ``dims`` and the 2D ones, which
    include the 1x1 gates of recalibration blocks in every number of dimensions (their
    layout does not depend on it), so a gate starts alike in 1D, 2D and 3D networks (a 1D
    network's ``Conv1d`` type also covers the channel convolutions of ECA and ELA).
    """
    convs = (nn.Conv2d, nd.conv(dims))
    norms = (nn.BatchNorm2d, nd.batch_norm(dims))
    for m in model.modules():
        if isinstance(m, convs):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, norms):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


def check_img_size(family: str, img_size: int | Sequence[int], stem: str,
                   reduction: int) -> None:
    """Raise a ValueError with the fix if a side of ``img_size`` is below the total stride."""
    if _smallest_side(img_size) >= reduction:
        return
    fix = (f"use --image-size {reduction} or more (img_size={reduction})"
           + (" or --model-opt stem=small (stem='small')" if stem != "small" else ""))
    raise ValueError(f"img_size {img_size} is too small for {family} with the {stem!r} stem "
                     f"(total stride {reduction}); {fix}")


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
        """Replace the final layer (:meth:`get_classifier`) by a fresh one for ``num_classes``.

        The new layer has the old one's kind (a Linear, or a 1x1 convolution as in the
        All-Conv net), input width, device and dtype; PyTorch's default initialisation
        and a zero bias. Only the final layer is replaced: hidden dense layers (VGG's
        fc6/fc7, LeNet's F6) are kept, as in timm.
        """
        old = self.get_classifier()
        name = next(n for n, m in self.named_modules() if m is old)
        if isinstance(old, nn.Linear):
            new: nn.Module = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
        elif isinstance(old, nd.CONVS) and set(old.kernel_size) == {1}:
            new = type(old)(old.in_channels, num_classes, 1, bias=old.bias is not None)
        else:
            raise TypeError(f"{type(self).__name__}: cannot reset a {type(old).__name__} "
                            "classifier; override reset_classifier")
        if new.bias is not None:
            nn.init.zeros_(new.bias)
        new.to(device=old.weight.device, dtype=old.weight.dtype)
        parent, _, attr = name.rpartition(".")
        setattr(self.get_submodule(parent) if parent else self, attr, new)
        self.num_classes = self.default_cfg["num_classes"] = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
