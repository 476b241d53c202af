"""The contract of dense-prediction models: segmentation and super-resolution.

A dense model maps ``[B, C, H, W]`` to one prediction per output pixel (``[B, C, L]`` or
``[B, C, D, H, W]`` for the models built in 1D or 3D, :mod:`cnnkit.layers.nd`):

* ``task = "segment"``: logits ``[B, num_classes, H, W]`` at the input resolution
  (class 0 is the background where the data has one);
* ``task = "superres"``: an image ``[B, in_chans, s*H, s*W]`` in the input's value
  range, ``s = scale``.

Besides ``forward`` every dense model sets ``num_classes``, ``in_chans``, ``scale``
(1 for segmentation), ``size_multiple`` (the input's height and width must be a
multiple of it; :func:`pad_to_multiple` pads other sizes and the trainer and
predictors do so, so users never see the constraint), ``feature_info`` and
``cam_layer`` (as classifiers: the explanation layer, normally the deepest encoder
stage or the decoder's last block) and ``default_cfg`` (``input_size``, ``mean``,
``std``, ``num_classes``, ``paper``, ``task``).

Encoders come from the classifier zoo through :class:`Encoder`: any registered
classifier's ``feature_info`` stages become the skip connections of a decoder, so a
U-Net or FCN runs on any backbone, and the backbone keeps torchvision's key names
(under ``encoder.model.``) so its ImageNet checkpoints load.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.layers import nd

from ._base import imagenet_stats
from ._registry import create_model

__all__ = ["DenseModel", "Encoder", "pad_to_multiple"]


def pad_to_multiple(x: torch.Tensor, multiple: int, mode: str = "reflect", dims: int = 2
                    ) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Pad the last ``dims`` axes of ``x`` at their ends up to a multiple of ``multiple``.

    Returns the padded tensor and the original sizes of those axes, to crop the
    prediction back with ``out[..., :H, :W]`` (times the scale for super-resolution).
    Reflection padding (replicate where the input is too small to reflect) keeps the
    padded border looking like content rather than a black frame. ``dims`` is 2 for
    images and their masks, 1 for series, 3 for volumes.

    Example:
        >>> import torch
        >>> from cnnkit.models._dense import pad_to_multiple
        >>> y, size = pad_to_multiple(torch.zeros(1, 1, 5, 6, 7), 4, dims=3)
        >>> tuple(y.shape), size
        ((1, 1, 8, 8, 8), (5, 6, 7))
    """
    if not 1 <= dims <= 3 or x.ndim < dims:
        raise ValueError(f"pad_to_multiple pads 1 to 3 trailing axes; got dims={dims} for a "
                         f"tensor of shape {tuple(x.shape)}")
    sizes = tuple(int(v) for v in x.shape[-dims:])
    pads = tuple((-v) % multiple for v in sizes)
    if not any(pads):
        return x, sizes
    if mode == "reflect" and any(p >= v for p, v in zip(pads, sizes, strict=True)):
        mode = "replicate"
    # F.pad pads the last axes of a [N, C, *spatial] tensor, the last axis first
    flat = x.reshape(-1, 1, *sizes)
    flat = flat.float() if not flat.is_floating_point() else flat
    widths = [w for p in reversed(pads) for w in (0, p)]
    out = F.pad(flat, widths, mode=mode)
    grown = tuple(v + p for v, p in zip(sizes, pads, strict=True))
    return out.reshape(*x.shape[:-dims], *grown).to(x.dtype), sizes


class DenseModel(nn.Module):
    """Base class of cnnkit's dense-prediction models (see the module docstring)."""

    task: str = "segment"
    num_classes: int
    in_chans: int
    scale: int = 1
    size_multiple: int = 1
    feature_info: list[dict]
    cam_layer: str
    default_cfg: dict

    def describe_backbone(self, backbone: Encoder, in_chans: int,
                          img_size: int | Sequence[int], paper: str) -> None:
        """Set the contract's attributes of a model whose features come from ``backbone``.

        The stages are the backbone's (qualified under ``backbone.model.``), the stride
        multiple its deepest reduction, the explanation layer its last stage and the
        normalisation ImageNet's, as the backbone's checkpoints expect. ``img_size`` is an
        int (2D) or the spatial sizes.
        """
        self.scale = 1
        self.size_multiple = max(f["reduction"] for f in backbone.model.feature_info)
        self.feature_info = [dict(f, module=f"backbone.model.{f['module']}")
                             for f in backbone.model.feature_info]
        self.cam_layer = self.feature_info[-1]["module"]
        mean, std = imagenet_stats(in_chans)
        _, spatial = nd.resolve_input_size(None, in_chans, img_size)
        self.default_cfg = dict(input_size=(in_chans, *spatial), mean=mean, std=std,
                                num_classes=self.num_classes, paper=paper, task=self.task)


class Encoder(nn.Module):
    """A zoo classifier as a feature pyramid: the outputs of its ``feature_info`` stages.

    ``forward`` runs ``forward_features`` once and collects the chosen stages' outputs
    with forward hooks that exist only during the call (so explainers and pruners see
    a hook-free model between calls). The classifier's head, which an encoder never
    runs (VGG-16's three dense layers are 124 M parameters), is dropped: one traced
    ``forward_features`` on a small zero input finds the parameterised layers it
    calls, and every other one becomes ``nn.Identity``, so parameter counts and
    checkpoints hold only what the dense model uses (torchvision's segmentation
    models drop the head likewise). The kept layers keep torchvision's key names.

    Args:
        name: a registered classifier (``"resnet18"``, ``"vgg16_bn"``, ``"mobilenet_v2"`` ...).
        in_chans: input channels.
        out_indices: which ``feature_info`` stages to return, shallow to deep; all when None.
        **kwargs: builder options (``img_size``, ``stem``, ``attn``, ``output_stride`` ...);
            an ``img_size`` of 1 or 3 sizes builds the backbone in 1D or 3D.

    Attributes:
        channels: channels of each returned stage.
        reductions: stride of each returned stage relative to the input.

    Example:
        >>> import torch
        >>> from cnnkit.models._dense import Encoder
        >>> enc = Encoder("resnet18", in_chans=3, img_size=64)
        >>> [tuple(f.shape[1:]) for f in enc(torch.randn(1, 3, 64, 64))]
        [(64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2)]
    """

    def __init__(self, name: str, in_chans: int = 3, out_indices: Sequence[int] | None = None,
                 **kwargs) -> None:
        super().__init__()
        self.model = create_model(name, in_chans=in_chans, **kwargs)
        info = getattr(self.model, "feature_info", None)
        if not info:
            raise ValueError(f"model {name!r} declares no feature_info stages, so it cannot be "
                             "an encoder; choose a classifier from `cnnkit models`")
        idx = list(range(len(info))) if out_indices is None else list(out_indices)
        bad = [i for i in idx if not -len(info) <= i < len(info)]
        if bad:
            raise ValueError(f"out_indices {bad} out of range: {name} has {len(info)} stages")
        self.stages = [info[i] for i in idx]
        self.channels = [s["num_chs"] for s in self.stages]
        self.reductions = [s["reduction"] for s in self.stages]
        self.name = name
        self._drop_unused(in_chans)

    def _drop_unused(self, in_chans: int) -> None:
        model = self.model
        leaves = [(n, m) for n, m in model.named_modules()
                  if next(m.children(), None) is None and next(m.parameters(), None) is not None]
        called: set[str] = set()
        handles = [m.register_forward_hook(lambda _m, _i, _o, key=n: called.add(key))
                   for n, m in leaves]
        side = max(f["reduction"] for f in model.feature_info)
        dims = len(getattr(model, "default_cfg", {}).get("input_size", (in_chans, 1, 1))) - 1
        ref = next(model.parameters())
        was_training = model.training
        try:
            with torch.no_grad():
                model.eval().forward_features(torch.zeros(1, in_chans, *(side,) * dims,
                                                          device=ref.device, dtype=ref.dtype))
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
        for n, _ in leaves:
            if n not in called:
                parent, _, attr = n.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, attr, nn.Identity())

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats: dict[str, torch.Tensor] = {}
        handles = []
        for s in self.stages:
            mod = self.model.get_submodule(s["module"])

            def hook(_m: nn.Module, _i: object, out: torch.Tensor, key: str = s["module"]) -> None:
                feats[key] = out

            handles.append(mod.register_forward_hook(hook))
        try:
            self.model.forward_features(x)
        finally:
            for h in handles:
                h.remove()
        return [feats[s["module"]] for s in self.stages]
