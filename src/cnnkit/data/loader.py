"""An in-memory batch loader: index a device-resident tensor, no per-sample work.

Small-image data sets fit on the device whole (60000 MNIST images are 47 MB as
uint8), so a batch is one gather plus one fused convert/augment/normalise, as in
Keller Jordan's airbench (2024, "94% on CIFAR-10 in 3.29 seconds on a single GPU").
A ``torch.utils.data.DataLoader`` with per-sample ``__getitem__`` would cost
more than the model's forward pass at this scale.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from ._types import downscale
from .augment import EXACT_POLICIES, Augment

__all__ = ["TensorLoader"]


def _generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    # SeedSequence mixes (seed, epoch, stream) into well-separated states, so nearby
    # seeds and epochs do not give correlated streams.
    state = np.random.SeedSequence([seed, epoch, stream]).generate_state(2, np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


class TensorLoader:
    """Batches ``(x, y)`` from in-memory tensors, moved to ``device`` once.

    Each batch is gathered on the device, converted to float in [0, 1] (uint8 is
    divided by 255), augmented, then normalised with ``(x - mean) / std``. The
    shuffle order and the augmentation of epoch ``e`` are a pure function of
    ``(seed, e)``: call :meth:`set_epoch` before iterating (as with a
    ``DistributedSampler``) and a run resumed at epoch ``e`` sees the same batches.
    Iterating without ``set_epoch`` advances the epoch by one after each pass.

    Three kinds of target, one per task:

    * classification: ``labels`` is ``[N]``; batches are ``(x, labels)``;
    * segmentation: ``labels`` is a uint8 mask ``[N, H, W]``; the augmentation moves
      image and mask together (only :data:`~cnnkit.data.augment.EXACT_POLICIES`,
      which never interpolate a class index); batches are ``(x, long mask)``;
    * super-resolution (``scale`` given): the image is the target; batches are
      ``(downscale(augmented image), augmented image)``, the low-resolution input
      made afresh from each augmented crop and normalised, the target in [0, 1].

    Args:
        images: uint8 ``[N, C, H, W]`` (kept uint8 on the device: 4x less memory) or
            float ``[N, C, H, W]`` in [0, 1].
        labels: int ``[N]`` class indices or uint8 ``[N, H, W]`` masks.
        batch_size: samples per batch.
        shuffle: a new random order every epoch.
        drop_last: leave out the last batch if it is smaller than ``batch_size``.
        mean, std: per-channel normalisation on the [0, 1] scale (see
            :func:`cnnkit.data.channel_stats`); none when None.
        augment: augmentation policy (:func:`cnnkit.data.list_augment`).
        seed: seed of shuffling and augmentation.
        device: where the data lives and batches are made.
        channels_last: return batches in ``torch.channels_last`` memory format.
        scale: super-resolution factor; the loader then yields (low-res, high-res) pairs.

    Example:
        >>> loader = TensorLoader(torch.zeros(10, 1, 8, 8, dtype=torch.uint8), torch.arange(10), 4)
        >>> len(loader), [tuple(x.shape) for x, _ in loader]
        (3, [(4, 1, 8, 8), (4, 1, 8, 8), (2, 1, 8, 8)])
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *,
                 shuffle: bool = False, drop_last: bool = False,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 augment: str = "none", seed: int = 0, device: str | torch.device = "cpu",
                 channels_last: bool = False, scale: int | None = None) -> None:
        if images.ndim != 4:
            raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
        labels = torch.as_tensor(labels)
        self.masks = labels.ndim == 3
        if self.masks:
            if labels.shape != (images.shape[0], *images.shape[2:]):
                raise ValueError(f"masks of shape {tuple(labels.shape)} do not match images "
                                 f"{tuple(images.shape)}; give one [H, W] mask per image")
            if augment not in EXACT_POLICIES:
                raise ValueError(f"augmentation {augment!r} interpolates pixels and would blend "
                                 "mask classes; with masks use "
                                 f"{', '.join(sorted(EXACT_POLICIES))}")
            labels = labels.to(torch.uint8)
        else:
            labels = labels.long().reshape(-1)
        if len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels; give one label "
                             "per image")
        if scale is not None:
            downscale(images[:1].float(), scale)  # validates the size now
        self.scale = scale
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        c = images.shape[1]
        for what, v in (("mean", mean), ("std", std)):
            if v is not None and len(v) != c:
                raise ValueError(f"{what} has {len(v)} values for {c}-channel images; give one "
                                 "per channel")
        if std is not None and min(std) <= 0:
            raise ValueError(f"std={list(std)} must be positive; a constant channel has std 0, "
                             "give std=1 for it")
        Augment(augment)  # validates the policy name now, not at the first batch
        self.device = torch.device(device)
        self.images = images.to(self.device)
        if self.images.dtype not in (torch.uint8, torch.float32):
            self.images = self.images.float()
        self.labels = labels.to(self.device)
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.augment, self.seed, self.channels_last = augment, seed, channels_last
        self.mean = None if mean is None else torch.tensor(
            list(mean), dtype=torch.float32, device=self.device).view(1, c, 1, 1)
        self.std = None if std is None else torch.tensor(
            list(std), dtype=torch.float32, device=self.device).view(1, c, 1, 1)
        self.num_samples = len(labels)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the shuffle order and augmentation of ``epoch`` for the next pass."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=_generator(self.seed, epoch, 0))
            order = order.to(self.device)
        else:
            order = torch.arange(self.num_samples, device=self.device)
        aug = Augment(self.augment, _generator(self.seed, epoch, 1))
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.images[idx]
            x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
            y = self.labels[idx]
            if self.masks:  # one augmentation for both: the mask rides as an extra channel
                if aug.policy != "none":
                    z = aug(torch.cat([x, y[:, None].float()], 1))
                    x, y = z[:, :-1], z[:, -1].round()
                y = y.long()
            else:
                x = aug(x)
            if self.scale is not None:
                x, y = downscale(x, self.scale), x
            if self.mean is not None:
                x = x - self.mean
            if self.std is not None:
                x = x / self.std
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y
