"""An in-memory batch loader: index a device-resident tensor, no per-sample work.

This is the GPU-resident pipeline of Keller Jordan's airbench (2024, "94% on CIFAR-10
in 3.29 seconds on a single GPU"): small-image data sets fit on the device whole
(60000 MNIST images are 47 MB as uint8), so the split is copied to the device once
(from pinned host memory on CUDA) and a batch is one gather plus batched
convert/augment/normalise ops there. A ``torch.utils.data.DataLoader`` with
per-sample ``__getitem__`` would cost more than the model's forward pass at this scale.

User folders take the same path: ``load_data`` decodes every image once into one
uint8 tensor in memory, so there is no per-sample decoding for DataLoader workers
(``num_workers``, ``persistent_workers``, ``pin_memory``) to overlap, and none is used.
The cost is memory: the decoded split must fit on the device (and, under several
processes, once per process).

Under data parallelism (``rank``/``world_size``) every process holds the whole split and
takes its share of each global batch: the ``DistributedSampler`` idea (same shuffled
order on every rank, rank r takes every W-th sample) applied per batch, so the union of
the ranks' batches at step i is the one-process batch i.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from ._types import downscale
from .augment import EXACT_POLICIES, Augment

__all__ = ["Batches", "TensorLoader"]


@runtime_checkable
class Batches(Protocol):
    """What the trainer and the tasks ask of a loader: ``(inputs, targets)`` batches.

    :class:`TensorLoader` is the one implementation for stacked ``[N, C, *spatial]``
    inputs. A container that is not one stacked tensor (graphs: node features, edge
    index and a batch vector) plugs in behind the same interface: its ``inputs`` are any
    object the model's ``forward`` takes, already on the device.

    Example:
        >>> import torch
        >>> from cnnkit.data import Batches, TensorLoader
        >>> loader = TensorLoader(torch.arange(10.0).view(10, 1, 1), torch.arange(10), 4)
        >>> isinstance(loader, Batches), len(loader), [y.tolist() for _, y in loader]
        (True, 3, [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]])
    """

    def __iter__(self) -> Iterator[tuple[Any, torch.Tensor]]: ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...


def _generator(seed: int, epoch: int, stream: int, rank: int = 0) -> torch.Generator:
    # SeedSequence mixes (seed, epoch, stream) into well-separated states, so nearby
    # seeds and epochs do not give correlated streams. Ranks > 0 of a distributed run
    # get their own augmentation streams; rank 0 keeps the single process's.
    entropy = [seed, epoch, stream] + ([rank] if rank else [])
    state = np.random.SeedSequence(entropy).generate_state(2, np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


class TensorLoader:
    """Batches ``(x, y)`` from in-memory tensors, moved to ``device`` once.

    Each batch is gathered on the device, converted to float in [0, 1] (uint8 is
    divided by 255), augmented, then normalised with ``(x - mean) / std``. The
    shuffle order and the augmentation of epoch ``e`` are a pure function of
    ``(seed, e)``: call :meth:`set_epoch` before iterating (as with a
    ``DistributedSampler``) and a run resumed at epoch ``e`` sees the same batches.
    Iterating without ``set_epoch`` advances the epoch by one after each pass.

    Inputs are ``[N, C, *spatial]`` with 0 to 3 spatial axes (features, series, images,
    volumes); augmentation and normalisation act on every spatial axis. The kinds of
    target, one per task:

    * classification: ``labels`` is ``[N]``; batches are ``(x, labels)``;
    * dense labels (segmentation): ``labels`` is an integer mask ``[N, *spatial]``; the
      augmentation moves input and mask together (only
      :data:`~cnnkit.data.augment.EXACT_POLICIES`, which never interpolate a class
      index); batches are ``(x, long mask)``;
    * regression: ``labels`` is float ``[N, K]``; batches are ``(x, values)``;
    * super-resolution (``scale`` given): the image is the target; batches are
      ``(downscale(augmented image), augmented image)``, the low-resolution input
      made afresh from each augmented crop and normalised, the target in [0, 1].

    Args:
        images: the inputs, uint8 ``[N, C, *spatial]`` (kept uint8 on the device: 4x less
            memory) or float ``[N, C, *spatial]`` in [0, 1].
        labels: int ``[N]`` class indices, integer ``[N, *spatial]`` masks, or float
            ``[N, K]`` values (regression).
        batch_size: samples per batch.
        shuffle: a new random order every epoch.
        drop_last: leave out the last batch if it is smaller than ``batch_size``.
        mean, std: per-channel normalisation on the [0, 1] scale (see
            :func:`cnnkit.data.channel_stats`); none when None.
        augment: augmentation policy (:func:`cnnkit.data.list_augment`).
        seed: seed of shuffling and augmentation.
        device: where the data lives and batches are made.
        channels_last: return batches channels-last (``channels_last`` for images,
            ``channels_last_3d`` for volumes; series and features have no such format).
        scale: super-resolution factor; the loader then yields (low-res, high-res) pairs.
        rank, world_size: this process's share under data parallelism. ``batch_size`` is
            then the global batch (a multiple of ``world_size``); every rank has the same
            shuffled order and takes positions ``rank, rank + W, ...`` of each global
            batch, ``batch_size / W`` samples. With ``shuffle`` (training) and without
            ``drop_last``, the order is topped up with its first samples to a multiple of
            W, so every rank takes the same number of steps and samples (as
            ``DistributedSampler`` pads); without ``shuffle`` (evaluation) nothing is
            repeated: each sample is in exactly one rank's batches. Augmentation draws
            from a per-rank stream of ``(seed, epoch, rank)``.

    Example:
        >>> import torch
        >>> from cnnkit.data import TensorLoader
        >>> loader = TensorLoader(torch.zeros(10, 1, 8, 8, dtype=torch.uint8), torch.arange(10), 4)
        >>> len(loader), [tuple(x.shape) for x, _ in loader]
        (3, [(4, 1, 8, 8), (4, 1, 8, 8), (2, 1, 8, 8)])
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *,
                 shuffle: bool = False, drop_last: bool = False,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 augment: str = "none", seed: int = 0, device: str | torch.device = "cpu",
                 channels_last: bool = False, scale: int | None = None, rank: int = 0,
                 world_size: int = 1) -> None:
        if not 2 <= images.ndim <= 5:
            raise ValueError(f"inputs must be [N, C, *spatial] with 0 to 3 spatial axes, got "
                             f"shape {tuple(images.shape)}")
        labels = torch.as_tensor(labels)
        spatial = tuple(images.shape[2:])
        # dense labels: a class per pixel (voxel, time step). Float [N, K] targets are
        # values; a float [N, *spatial] of 2+ axes cannot be values, so it is a mask too.
        self.masks = bool(spatial) and labels.ndim > 1 and (
            not labels.is_floating_point() or labels.ndim > 2)
        if self.masks:
            if labels.shape != (images.shape[0], *spatial):
                raise ValueError(f"masks of shape {tuple(labels.shape)} do not match inputs "
                                 f"{tuple(images.shape)}; give one {list(spatial)} mask per "
                                 "sample")
            if augment not in EXACT_POLICIES:
                raise ValueError(f"augmentation {augment!r} interpolates pixels and would blend "
                                 "mask classes; with masks use "
                                 f"{', '.join(sorted(EXACT_POLICIES))}")
            labels = labels.to(torch.uint8)
        elif labels.is_floating_point():  # real values per sample (regression): [N, K]
            labels = labels.float().reshape(len(labels), -1)
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
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} of world_size {world_size}: need 0 <= rank < "
                             "world_size")
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} is the global batch, split evenly over "
                             f"{world_size} processes; give a multiple of {world_size}")
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
        self.images = _to_device(images, self.device)
        if self.images.dtype not in (torch.uint8, torch.float32):
            self.images = self.images.float()
        self.labels = _to_device(labels, self.device)
        self.rank, self.world_size = rank, world_size
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.augment, self.seed, self.channels_last = augment, seed, channels_last
        view = (1, c, *[1] * len(spatial))
        self.mean = None if mean is None else torch.tensor(
            list(mean), dtype=torch.float32, device=self.device).view(view)
        self.std = None if std is None else torch.tensor(
            list(std), dtype=torch.float32, device=self.device).view(view)
        self.memory_format = {4: torch.channels_last, 5: torch.channels_last_3d}.get(
            images.ndim) if channels_last else None
        self.num_samples = len(labels)
        self.epoch = 0
        self._start: tuple[int, torch.Tensor | None] = (0, None)
        self._augment: Augment | None = None

    def set_epoch(self, epoch: int, start: int = 0,
                  augment_state: torch.Tensor | None = None) -> None:
        """Use the shuffle order and augmentation of ``epoch`` for the next pass.

        Args:
            epoch: the epoch whose order and augmentation the next pass has.
            start: begin that pass at batch ``start`` (a run resumed within an epoch),
                with the augmentation's random stream where the uninterrupted pass has it:
                set to ``augment_state`` (:meth:`augment_state` read after batch
                ``start - 1``), or else by making the skipped batches' draws again.
        """
        if not 0 <= start < max(1, len(self)):
            raise ValueError(f"start batch {start} is outside the {len(self)} batches of an "
                             "epoch")
        self.epoch = int(epoch)
        self._start = (int(start), augment_state)

    def augment_state(self) -> torch.Tensor:
        """The state of the current pass's augmentation stream after the batches handed out
        so far: with ``set_epoch(epoch, start, state)`` a later pass continues exactly."""
        if self._augment is None:
            raise ValueError("the loader has not started a pass; iterate it first")
        return self._augment.generator.get_state()

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        (start, state), self._start = self._start, (0, None)
        world = self.world_size
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=_generator(self.seed, epoch, 0))
            short = (-self.num_samples) % world
            if short and not self.drop_last:  # equal shares: top up with the first samples
                order = torch.cat([order, order[torch.arange(short) % self.num_samples]])
            order = order.to(self.device)
        else:
            order = torch.arange(self.num_samples, device=self.device)
        aug = self._augment = Augment(self.augment, _generator(self.seed, epoch, 1, self.rank))
        if state is not None:
            aug.generator.set_state(state)
        for i in range(len(self)):
            if i < start and (state is not None or aug.policy == "none"):
                continue  # skipped, its draws already made (or none to make)
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            if world > 1:
                idx = idx[self.rank::world]
                if len(idx) == 0:  # evaluation: a last global batch smaller than W
                    continue
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
            if i < start:  # skipped: only its augmentation draws were needed
                continue
            if self.scale is not None:
                x, y = downscale(x, self.scale), x
            if self.mean is not None:
                x = x - self.mean
            if self.std is not None:
                x = x / self.std
            if self.memory_format is not None:
                x = x.contiguous(memory_format=self.memory_format)
            yield x, y


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """One host-to-device copy of a whole split; on CUDA from pinned memory, so the copy
    is a single DMA transfer that does not hold up the host."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
