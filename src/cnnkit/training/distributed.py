"""Data-parallel training over processes: ``torch.distributed`` as ``torchrun`` starts it.

Distributed data parallelism (Li et al. 2020, "PyTorch Distributed: Experiences on
Accelerating Data Parallel Training", VLDB): one process and one model replica per
device; each process computes the gradient of its share of every batch and
``DistributedDataParallel`` averages the gradients (all-reduce, in buckets that overlap
the backward pass), so every replica takes the same optimiser step.

How cnnkit uses it (``torchrun --nproc_per_node=N -m cnnkit train ...``, or the
shortcut ``cnnkit train --nproc N``, which runs that command):

* the process group comes from torchrun's environment (``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``); backend ``nccl`` on CUDA, ``gloo``
  on the CPU; each process uses ``cuda:LOCAL_RANK`` (or the CPU);
* ``batch_size`` is the **global** batch: each of the W ranks takes every W-th sample of
  each global batch of the epoch's shuffled order (the same order on every rank, a pure
  function of seed and epoch), ``batch_size / W`` samples per rank and step. A W-process
  run therefore takes the optimisation steps of a one-process run with the same batch:
  the learning rate, schedule and step counts do not change with W. (To grow the batch
  with W instead, raise ``--batch-size``; the default learning rate follows the linear
  scaling rule of Goyal et al. 2017, "Accurate, Large Minibatch SGD".)
* evaluation is sharded the same way (rank r takes samples r, r + W, ...; nothing is
  repeated) and reduced as sums (loss, correct, confusion matrix), never as a mean of
  means; predictions are gathered back in the split's order;
* rank 0 alone creates and writes the run folder and logs; every rank reads the run
  folder on ``--resume``, so a multi-node resume needs a file system all nodes see.

What is exact and what is not: without augmentation and dropout, W processes follow the
one-process run up to float rounding (tested), since each rank's mean loss over equal
shares averages to the batch mean. Augmentation and dropout draw from per-rank streams
(pure functions of seed, epoch and rank), so with them a W-process run is a different,
equally valid sample. A loss over a whole batch rather than a mean over samples (Dice)
depends on how the batch is split; metrics that are sums over samples or pixels
(accuracy, the confusion matrix behind IoU, PSNR, SSIM) are reduced exactly.

Nothing here keeps state of its own: the process group is ``torch.distributed``'s.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from cnnkit.data.shards import active, all_reduce, all_reduce_sum, comm_device, gather_shards

from .device import resolve_device

__all__ = ["DistInfo", "current", "setup", "shutdown", "is_main", "barrier", "all_reduce_sum",
           "all_reduce_min", "gather_shards", "broadcast_", "broadcast_text", "wrap_ddp",
           "rank_seed", "launch", "under_torchrun"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank, the number of processes, its rank on the node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """More than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes the run folder and logs."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer; torchrun "
                         "sets it, so start the processes with torchrun") from None


def under_torchrun() -> bool:
    """This process was started by torchrun (or another launcher that sets its variables)."""
    return "LOCAL_RANK" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ


def current() -> DistInfo:
    """The process group this process is in (an initialised one, else torchrun's environment)."""
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        return DistInfo(rank, dist.get_world_size(), _env_int("LOCAL_RANK", rank))
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    return DistInfo(rank, world, _env_int("LOCAL_RANK", rank))


def setup(device: str = "auto") -> tuple[DistInfo, torch.device]:
    """Join the process group if this is a multi-process run, and pick this rank's device.

    A group that the caller already initialised is used as it is; otherwise, when
    ``WORLD_SIZE`` > 1, the default group is initialised from torchrun's environment
    (``nccl`` for CUDA devices, ``gloo`` otherwise). A single process is left alone.

    Args:
        device: the configured device (``auto``, ``cpu``, ``cuda`` ...).

    Returns:
        ``(DistInfo, device)``; under several processes on CUDA the device is
        ``cuda:LOCAL_RANK``.
    """
    info = current()
    if not info.enabled:
        return info, resolve_device(device)
    if not dist.is_available():
        raise ValueError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed; "
                         "install a build with distributed support or run one process")
    dev = resolve_device(device)
    if dev.type == "cuda":
        if device not in ("auto", "cuda"):
            raise ValueError(f"under torchrun each process uses cuda:LOCAL_RANK; give --device "
                             f"cuda or auto, not {device!r}")
        if info.local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {info.local_rank} but {torch.cuda.device_count()} "
                             "GPU(s) visible; start at most one process per GPU")
        dev = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(dev)
    elif dev.type != "cpu":
        raise ValueError(f"distributed training runs on CUDA or the CPU, not {dev.type}; "
                         "use --device cpu or cuda")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return info, dev


def shutdown() -> None:
    """Leave the process group (a no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main() -> bool:
    """Rank 0, or not distributed at all."""
    return current().is_main


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    if active():
        dist.barrier()


def all_reduce_min(t: torch.Tensor) -> torch.Tensor:
    """The elementwise minimum of ``t`` over all ranks."""
    return all_reduce(t, dist.ReduceOp.MIN)


def broadcast_(tensors: Iterable[torch.Tensor]) -> None:
    """Overwrite ``tensors`` in place with rank 0's values (parameters, buffers, EMA state)."""
    if not active():
        return
    dev = comm_device()
    for t in tensors:
        buf = t.detach()
        if buf.device != dev or not buf.is_contiguous():
            buf = buf.to(dev).contiguous()
        dist.broadcast(buf, src=0)
        if buf.data_ptr() != t.data_ptr():
            with torch.no_grad():
                t.copy_(buf)


def broadcast_text(text: str) -> str:
    """Rank 0's ``text`` on every rank (run folder names: rank 0 picks, the others follow)."""
    if not active():
        return text
    dev = comm_device()
    data = torch.tensor(list(text.encode()), dtype=torch.uint8, device=dev)
    size = torch.tensor([len(data)], device=dev)
    dist.broadcast(size, src=0)
    if dist.get_rank() != 0:
        data = torch.empty(int(size), dtype=torch.uint8, device=dev)
    dist.broadcast(data, src=0)
    return bytes(data.cpu().tolist()).decode()


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel`` around ``model`` (a no-op in a single process).

    Buffers (BatchNorm statistics) are broadcast from rank 0 before each forward, as
    DDP does by default, so every rank normalises alike. The wrapper is only for the
    training step; checkpoints are written from ``model`` itself, so their keys are the
    model's own (torchvision-compatible) names without a ``module.`` prefix.
    """
    if not active():
        return model
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)


def rank_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of rank ``rank``'s global RNG (dropout ...) in ``epoch``: a pure function, so a
    resumed distributed run needs no per-rank RNG state and equals an uninterrupted one."""
    state = np.random.SeedSequence([seed, epoch, 2, rank]).generate_state(2, np.uint64)
    return int(state[0] >> np.uint64(1))


def launch(nproc: int, cnnkit_args: list[str]) -> int:
    """Run ``python -m torch.distributed.run --standalone --nproc_per_node NPROC -m cnnkit
    ARGS`` on this machine and return its exit code.

    ``--standalone`` lets torchrun pick a free port. Each process gets
    ``OMP_NUM_THREADS`` = cores / ``nproc`` unless it is set already (torchrun's own
    default is 1).
    """
    if nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {nproc}")
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
            (os.cpu_count() or 1)
        env["OMP_NUM_THREADS"] = str(max(1, cores // nproc))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", str(nproc), "-m", "cnnkit", *cnnkit_args]
    return subprocess.run(cmd, env=env).returncode
