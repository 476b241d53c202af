"""Training throughput and model FLOP utilisation of three configurations, side by side.

For one model, in one process, on one in-memory synthetic CIFAR-sized set (uint8 images,
balanced labels, by default the ``flip_crop`` augmentation of CIFAR training):

* ``trainer_eager``: :class:`cnnkit.training.Trainer` in fp32, NCHW, eager;
* ``trainer_fast``: the Trainer with the fast preset (``TrainConfig(fast=True)``:
  channels_last, bf16 autocast where the CPU or GPU has native bf16, ``torch.compile``;
  without ``compile`` when it is turned off);
* ``plain``: :class:`~cnnkit.workflows.bench.plain.PlainLoop`, hand-written PyTorch from the
  eager Trainer's initial weights, data split, statistics and optimiser implementation.

A round is one pass of ``steps`` batches. Every configuration first runs one untimed
warm-up round (kernel selection, allocation, and for the fast mode the compilation),
then the configurations alternate round by round (ABCABC...), so a change of machine
load hits all three; each one's samples/s is its median round. The ratios of these
medians to the plain loop are the result; the absolute numbers describe this run only.

Training FLOPs per sample are 3 x 2 x the forward MACs that
:func:`cnnkit.analysis.summary` counts (the backward pass costs about twice the forward:
gradients of inputs and of weights), the usual convention of MFU.
"""

from __future__ import annotations

import itertools
import math
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from cnnkit.analysis import summary
from cnnkit.data import channel_stats, load_data, split_indices
from cnnkit.models import create_model
from cnnkit.training import TrainConfig, Trainer
from cnnkit.training.optim import fused_supported

from .config import MODES, BenchConfig
from .peak import synchronize
from .plain import PlainLoop

__all__ = ["TrainResult", "measure_training", "train_config", "synthetic_npz", "auto_steps",
           "training_flops", "build_runners", "timed_round"]

ROUND_SECONDS = 3.0  # auto steps: an eager round of about this long


@dataclass
class TrainResult:
    """One training configuration of one model.

    Attributes:
        samples_per_s: median over the timed rounds.
        round_s: the timed rounds' wall times.
        dtype: what the step computes in (``float32``, or the autocast dtype).
        flops_per_sample: training FLOPs per sample (3 x 2 x forward MACs).
        mfu: achieved training FLOP/s over the measured peak FLOP/s of ``dtype``.
        compile: ``"off"``, ``"compiled"``, or ``"fell back: <reason>"``.
        warmup_s: the untimed first round (includes compilation).
        loss: the mean training loss of the last round.
    """

    model: str
    mode: str
    steps: int
    batch_size: int
    round_s: list[float]
    dtype: str
    flops_per_sample: float
    peak_flops: float
    compile: str
    warmup_s: float
    loss: float
    samples_per_s: float = field(init=False)
    mfu: float = field(init=False)

    def __post_init__(self) -> None:
        self.samples_per_s = self.steps * self.batch_size / statistics.median(self.round_s)
        self.mfu = self.samples_per_s * self.flops_per_sample / self.peak_flops


def training_flops(model: torch.nn.Module, input_size: tuple[int, int, int]) -> float:
    """Training FLOPs per sample: forward MACs x 2 FLOPs x 3 (forward + twice for backward)."""
    return 6.0 * summary(model, input_size).total_macs


def synthetic_npz(path: Path, samples: int, cfg: BenchConfig) -> tuple[Path, tuple]:
    """Write a seeded random CIFAR-sized set whose training split holds at least ``samples``
    images; returns the file and the ``TrainConfig.split`` that gives that split.

    Every class gets ``k`` training images and one validation and one test image (the
    Trainer evaluates nothing here, but it splits its data).
    """
    k = math.ceil(samples / cfg.num_classes)
    per_class = k + 2
    rng = np.random.default_rng(cfg.seed)
    n = per_class * cfg.num_classes
    s = cfg.image_size
    images = rng.integers(0, 256, size=(n, 3, s, s), dtype=np.uint8)
    labels = np.arange(n) % cfg.num_classes
    np.savez(path, x=images, y=labels)
    return path, (k / per_class, 1 / per_class, 1 / per_class)


def train_config(mode: str, model: str, cfg: BenchConfig, data: Path, split: tuple,
                 device: torch.device, epochs: int, runs_dir: str):
    """The :class:`TrainConfig` of a Trainer mode (``plain`` copies ``trainer_eager``'s)."""
    common = dict(model=model, data=str(data), split=split, batch_size=cfg.batch_size,
                  epochs=epochs, augment=cfg.augment, device=str(device), seed=cfg.seed,
                  deterministic=False, runs_dir=runs_dir, optimizer="sgd")  # the plain loop's
    if mode == "trainer_fast":  # the fast preset, compiled or not as the bench was told
        return TrainConfig(**common, fast=True, compile=bool(cfg.compile), amp="auto")
    return TrainConfig(**common, amp="off")


def auto_steps(model: str, cfg: BenchConfig, device: torch.device) -> int:
    """Steps for an eager fp32 round of about :data:`ROUND_SECONDS`, from one timed step
    (after one warm-up step), between 2 and 64."""
    net = create_model(model, num_classes=cfg.num_classes, in_chans=3,
                       img_size=cfg.image_size).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size, device=device)
    y = torch.randint(0, cfg.num_classes, (cfg.batch_size,), device=device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        opt.step()

    step()
    synchronize(device)
    t0 = time.perf_counter()
    step()
    synchronize(device)
    return max(2, min(64, math.ceil(ROUND_SECONDS / (time.perf_counter() - t0))))


@dataclass
class _Runner:
    run: Callable[[], float]  # one round; returns its mean training loss
    steps: int
    dtype: torch.dtype
    compiled: Callable[[], bool] = lambda: False


def _trainer_runner(trainer) -> _Runner:
    bar = tqdm(disable=True)  # the Trainer's loop updates a bar; ours is the outer one

    def run() -> float:
        # The Trainer's own training epoch: its hot loop, without validation and
        # checkpoints, which the hand-written loop does not do either.
        metrics = trainer._train_epoch(bar)
        trainer.epoch += 1  # the next round shuffles anew, as the next epoch would
        return metrics["train_loss"]

    return _Runner(run, len(trainer.train_loader), trainer.amp or torch.float32,
                   lambda: trainer.train_model is not trainer.model)


def _plain_runner(model: str, cfg: BenchConfig, data: Path, split: tuple,
                  device: torch.device, epochs: int) -> _Runner:
    """The hand-written loop, built from what a user has at hand: the data file, the seed,
    the hyper-parameters. Its initial weights are the Trainer's (the same seed before the
    same builder), its images the Trainer's training split."""
    tcfg = train_config("plain", model, cfg, data, split, device, epochs, "")
    d = load_data(data)
    train = split_indices(d.labels, split, seed=cfg.seed)[0]
    images, labels = d.images[train], d.labels[train]
    mean, std = channel_stats(images)
    torch.manual_seed(cfg.seed)
    net = create_model(model, num_classes=cfg.num_classes, in_chans=3,
                       img_size=cfg.image_size).to(device)
    fused = fused_supported(torch.optim.SGD, list(net.parameters()), momentum=tcfg.momentum,
                            nesterov=True)
    loop = PlainLoop(tcfg, net, images, labels, mean, std, cfg.augment, epochs,
                     fused=fused)
    counter = itertools.count()
    return _Runner(lambda: loop.epoch(next(counter)), loop.steps, torch.float32)


def build_runners(model: str, cfg: BenchConfig, device: torch.device, steps: int,
                  runs_dir: str, modes: tuple[str, ...] = MODES) -> dict[str, _Runner]:
    """The runners of ``modes`` for ``model``, on a synthetic set of ``steps`` batches;
    ``runs_dir`` holds the data file and is where the Trainers would write (they do not)."""
    epochs = 1 + cfg.rounds  # the schedule's length: warm-up round + timed rounds
    data, split = synthetic_npz(Path(runs_dir) / "synthetic.npz", steps * cfg.batch_size, cfg)
    runners = {}
    for mode in modes:
        if mode == "plain":
            runners[mode] = _plain_runner(model, cfg, data, split, device, epochs)
        else:
            tcfg = train_config(mode, model, cfg, data, split, device, epochs, runs_dir)
            runners[mode] = _trainer_runner(Trainer(tcfg, progress=False))
    return runners


def timed_round(runner: _Runner, device: torch.device) -> tuple[float, float]:
    """(seconds, loss) of one round, from idle device to idle device."""
    synchronize(device)
    t0 = time.perf_counter()
    loss = runner.run()
    synchronize(device)
    return time.perf_counter() - t0, loss


def _compile_status(mode: str, cfg: BenchConfig, runner: _Runner,
                    caught: list[warnings.WarningMessage]) -> str:
    if mode != "trainer_fast" or not cfg.compile:
        return "off"
    if runner.compiled():
        return "compiled"
    reasons = [str(w.message) for w in caught if "torch.compile" in str(w.message)]
    return "fell back: " + (reasons[0] if reasons else "eager after the first step")


def measure_training(model: str, cfg: BenchConfig, device: torch.device,
                     peaks: dict[str, float], progress: bool = False) -> list[TrainResult]:
    """Time the three configurations of ``model`` interleaved; see the module docstring.

    Args:
        peaks: measured peak FLOP/s per dtype name (``float32``, ``bfloat16`` ...), the
            denominators of MFU.
    """
    steps = cfg.steps or auto_steps(model, cfg, device)
    flops = training_flops(create_model(model, num_classes=cfg.num_classes, in_chans=3,
                                        img_size=cfg.image_size),
                           (3, cfg.image_size, cfg.image_size))
    times: dict[str, list[float]] = {m: [] for m in MODES}
    warmup: dict[str, float] = {}
    losses: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="cnnkit-bench-") as runs_dir, \
            tqdm(total=len(MODES) * (1 + cfg.rounds), desc=f"train {model}", unit="round",
                 disable=not progress, leave=False) as bar:
        # torch.compile's refusals come as warnings, at the Trainer's construction or at
        # its first step: kept, and reported as the fast mode's compile status.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            runners = build_runners(model, cfg, device, steps, runs_dir)
            for mode, runner in runners.items():
                warmup[mode], losses[mode] = timed_round(runner, device)
                bar.update(1)
        status = {mode: _compile_status(mode, cfg, runner, caught)
                  for mode, runner in runners.items()}
        others = {(str(w.message), w.category): w for w in caught
                  if "torch.compile" not in str(w.message)}
        for w in others.values():  # news for the user: passed on, once each
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        for _ in range(cfg.rounds):
            for mode, runner in runners.items():
                seconds, losses[mode] = timed_round(runner, device)
                times[mode].append(seconds)
                bar.update(1)
    results = []
    for mode, runner in runners.items():
        dtype = str(runner.dtype).removeprefix("torch.")
        results.append(TrainResult(model, mode, runner.steps, cfg.batch_size, times[mode],
                                   dtype, flops, peaks[dtype], status[mode], warmup[mode],
                                   losses[mode]))
    return results
