"""Segmentation losses: cross-entropy, soft Dice, focal, and their sums.

All take logits ``[B, K, *spatial]`` and integer targets ``[B, *spatial]`` whose
``ignore_index`` pixels (Pascal VOC's 255 object borders) contribute neither to the
loss nor to its gradient. Pixel losses (CE, focal) are averaged over the counted
pixels; Dice is one overlap score over the whole batch per class.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["dice_loss", "focal_loss", "SegmentationLoss", "LOSS_KINDS"]

LOSS_KINDS = ("ce", "dice", "focal", "ce+dice", "focal+dice")


def _flatten(logits: torch.Tensor, target: torch.Tensor, ignore_index: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the counted pixels ``[N, K]`` and their labels ``[N]``."""
    if logits.ndim < 2 or target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} do "
                         "not match; expected logits [B, K, H, W] and target [B, H, W]")
    k = logits.shape[1]
    flat = logits.movedim(1, -1).reshape(-1, k)
    target = target.reshape(-1).long()
    keep = target != ignore_index
    flat, target = flat[keep], target[keep]
    if bool(((target < 0) | (target >= k)).any()):
        raise ValueError(f"target has labels outside [0, {k}) other than ignore_index="
                         f"{ignore_index}; check num_classes or the masks")
    return flat, target


def dice_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255,
              smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice loss (Milletari, Navab and Ahmadi 2016, "V-Net: fully convolutional neural
    networks for volumetric medical image segmentation").

    With ``p`` the softmax probabilities and ``g`` the one-hot target over the counted
    pixels of the whole batch, class c scores ``D_c = (2 sum p_c g_c + smooth) /
    (sum p_c + sum g_c + smooth)`` and the loss is ``1 - mean(D_c)`` over the classes
    present in the target (a class absent from the batch would otherwise score a free 1,
    or a meaningless 0 without smoothing). ``smooth`` (Laplace smoothing) keeps it
    defined and its gradient tame on tiny regions. V-Net squares the denominators;
    this is the common linear form.

    Returns:
        A scalar; 0 (with a graph) when every pixel is ignored.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from cnnkit.tasks.losses import dice_loss
        >>> t = torch.tensor([[[0, 1]]])
        >>> logits = 20.0 * F.one_hot(t, 2).permute(0, 3, 1, 2).float()
        >>> round(float(dice_loss(logits, t)), 6)
        0.0
    """
    flat, target = _flatten(logits, target, ignore_index)
    if target.numel() == 0:
        return logits.sum() * 0.0
    prob = flat.softmax(1)
    onehot = F.one_hot(target, flat.shape[1]).to(prob.dtype)
    inter = (prob * onehot).sum(0)
    card = prob.sum(0) + onehot.sum(0)
    score = (2 * inter + smooth) / (card + smooth)
    present = onehot.sum(0) > 0
    return 1.0 - score[present].mean()


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0,
               alpha: float | Sequence[float] | None = None, ignore_index: int = 255
               ) -> torch.Tensor:
    """Focal loss (Lin, Goyal, Girshick, He and Dollár 2017, "Focal loss for dense object
    detection"), the mean over counted pixels of ``-alpha_t (1 - p_t)^gamma log p_t``.

    ``p_t`` is the softmax probability of the true class; ``gamma = 0`` and no ``alpha``
    give cross-entropy. ``alpha`` is None (no weighting), a per-class sequence of K
    weights, or a float: the paper's binary weight, ``alpha`` for foreground classes
    (label > 0) and ``1 - alpha`` for the background class 0.

    Example:
        >>> import torch
        >>> from cnnkit.tasks.losses import focal_loss
        >>> logits, t = torch.zeros(1, 2, 1, 1), torch.zeros(1, 1, 1, dtype=torch.long)
        >>> round(float(focal_loss(logits, t, gamma=2.0)), 6)  # 0.25 * ln 2
        0.173287
    """
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    flat, target = _flatten(logits, target, ignore_index)
    if target.numel() == 0:
        return logits.sum() * 0.0
    logpt = flat.log_softmax(1).gather(1, target[:, None])[:, 0]
    loss = -logpt
    if gamma:
        # 1 - p_t as -expm1(log p_t) stays accurate (and > 0) where p_t rounds to 1, and the
        # clamp to the smallest normal float zeroes the gradient where it underflows anyway:
        # (1 - p_t)^gamma for gamma < 1 has an infinite slope at 0 that would give 0 * inf.
        one_minus = (-torch.expm1(logpt)).clamp(min=torch.finfo(logpt.dtype).tiny)
        loss = loss * one_minus ** gamma
    if alpha is not None:
        if isinstance(alpha, int | float):
            weights = torch.where(target > 0, float(alpha), 1.0 - float(alpha)).to(loss.dtype)
        else:
            table = torch.as_tensor(list(alpha), dtype=loss.dtype, device=loss.device)
            if table.numel() != flat.shape[1]:
                raise ValueError(f"alpha has {table.numel()} weights but there are "
                                 f"{flat.shape[1]} classes; give one per class or a float")
            weights = table[target]
        loss = loss * weights
    return loss.mean()


class SegmentationLoss(nn.Module):
    """A segmentation loss picked by name: one of :data:`LOSS_KINDS`, a sum for ``"a+b"``.

    Args:
        kind: ``"ce"`` (cross-entropy), ``"dice"`` (:func:`dice_loss`), ``"focal"``
            (:func:`focal_loss`), ``"ce+dice"`` or ``"focal+dice"`` (unweighted sums).
        ignore_index: target value of pixels to skip.
        label_smoothing: cross-entropy's label smoothing (Szegedy et al. 2016,
            "Rethinking the Inception architecture for computer vision").
        gamma: focal loss focusing parameter.
        alpha: focal loss class weights (see :func:`focal_loss`).
        smooth: Dice smoothing.

    Example:
        >>> import torch
        >>> from cnnkit.tasks.losses import SegmentationLoss
        >>> crit = SegmentationLoss("ce+dice")
        >>> crit(torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4))).ndim
        0
    """

    def __init__(self, kind: str = "ce", ignore_index: int = 255, label_smoothing: float = 0.0,
                 gamma: float = 2.0, alpha: float | Sequence[float] | None = None,
                 smooth: float = 1.0) -> None:
        super().__init__()
        if kind not in LOSS_KINDS:
            raise ValueError(f"unknown segmentation loss {kind!r}; choose from "
                             f"{', '.join(LOSS_KINDS)}")
        self.kind, self.parts = kind, kind.split("+")
        self.ignore_index, self.label_smoothing = ignore_index, label_smoothing
        self.gamma, self.alpha, self.smooth = gamma, alpha, smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.long()
        total = logits.new_zeros(())
        for part in self.parts:
            if part == "ce":
                if bool((target != self.ignore_index).any()):
                    total = total + F.cross_entropy(logits, target, ignore_index=self.ignore_index,
                                                    label_smoothing=self.label_smoothing)
                else:  # cross_entropy's mean over zero pixels is NaN
                    total = total + logits.sum() * 0.0
            elif part == "dice":
                total = total + dice_loss(logits, target, self.ignore_index, self.smooth)
            else:
                total = total + focal_loss(logits, target, self.gamma, self.alpha,
                                           self.ignore_index)
        return total

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, ignore_index={self.ignore_index}"
