"""Training throughput: the cnnkit ``Trainer`` against a hand-written PyTorch loop.

Both sides train the same model (same builder, same initial weights) on the same
training split with the same batch size, optimiser, schedule, loss, augmentation
and normalisation, in one process, one epoch each in turn (ABAB...). After
``--warmup`` epochs, the median samples/s of each side is taken and their ratio
reported; the ratio is the claim, absolute numbers only describe this run.

The hand-written loop is ``cnnkit.workflows.bench.plain.PlainLoop`` (the one ``cnnkit
bench`` times too; its docstring lists what it does per batch), built from the Trainer's
training split, statistics, augmentation policy, hyper-parameters, optimiser
implementation and initial weights.

The Trainer is timed two ways in the same ``Trainer.fit()`` run:

* **loop**: the wall time of ``Trainer._train_epoch`` (the headline: the
  hand-written loop evaluates nothing either). Its extra work is the per-step
  accuracy and loss bookkeeping, the NaN check, the LR scheduler object, the
  GradScaler and autocast wrappers and a disabled progress bar.
* **fit**: the wall time of a whole epoch of ``fit()``: training, validation
  and checkpointing (best and last weights, the resumable train state, metrics).

The hand-written epoch runs inside a ``fit()`` callback, between two Trainer
epochs; its time is excluded from the Trainer's. The test evaluation and the
HTML report that end ``fit()`` happen once per run, not per epoch, and are
skipped.

Usage::

    python bench/train_throughput.py                 # three configurations, a few minutes
    python bench/train_throughput.py --quick         # smoke run, about 10 s
    python bench/train_throughput.py --write-docs    # also update docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cnnkit.training import TrainConfig, Trainer
from cnnkit.workflows.bench.plain import PlainLoop
from cnnkit.workflows.bench.report import load_average, machine_text, write_section

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
SECTION = "## Training throughput"


@dataclass
class Case:
    """One benchmark configuration: a model on a data set, at the Trainer's defaults."""

    name: str
    model: str
    data: str
    epochs: int  # measured epochs of a full run, after the warm-up
    image_size: int | None = None
    data_options: dict[str, Any] = field(default_factory=dict)
    quick: bool = False  # part of --quick


CASES = [
    # The smallest steps (about 3 ms): the Trainer's per-step overhead shows most here.
    Case("tinyvgg / digits 8x8", "tinyvgg", "digits", epochs=30, quick=True),
    # What `cnnkit train` runs with no options.
    Case("tinyvgg_wide / digits 8x8", "tinyvgg_wide", "digits", epochs=20),
    # A real network (small stem at 32x32): compute-bound, per-step overhead vanishes.
    Case("resnet18 / shapes 32x32", "resnet18", "shapes", epochs=6, image_size=32,
         data_options={"n": 320}),
]


class _Done(Exception):
    """Raised by the last epoch's callback: ends ``fit()`` before its test and report."""


@dataclass
class Result:
    case: Case
    samples: int  # per epoch, the same on both sides
    steps: int
    plain_s: list[float]
    loop_s: list[float]
    fit_s: list[float]
    plain_loss: float
    trainer_loss: float

    def median_sps(self, times: list[float]) -> float:
        return self.samples / statistics.median(times)

    def paired_ratios(self, times: list[float]) -> list[float]:
        # Adjacent epochs share the machine's momentary load: their ratio is less noisy
        # than a ratio of medians when the load drifts.
        return [p / t for p, t in zip(self.plain_s, times, strict=True)]


def run_case(case: Case, warmup: int, epochs: int, device: str) -> Result:
    """Train ``warmup + epochs`` epochs on each side, alternating; keep the last ``epochs``."""
    plain_s: list[float] = []
    loop_s: list[float] = []
    fit_s: list[float] = []
    total = warmup + epochs
    with tempfile.TemporaryDirectory() as runs:
        cfg = TrainConfig(model=case.model, data=case.data, data_options=case.data_options,
                          image_size=case.image_size, epochs=total, device=device, amp="off",
                          runs_dir=runs)
        trainer = Trainer(cfg, progress=False)
        plain = PlainLoop.from_trainer(trainer, total)
        if plain.steps != len(trainer.train_loader):
            raise RuntimeError(f"{case.name}: {plain.steps} plain steps per epoch but "
                               f"{len(trainer.train_loader)} Trainer steps")

        # Time the Trainer's hot loop from the outside, as the plain loop is timed.
        train_epoch = trainer._train_epoch

        def timed_train_epoch(bar):
            t0 = time.perf_counter()
            metrics = train_epoch(bar)
            loop_s.append(time.perf_counter() - t0)
            return metrics

        trainer._train_epoch = timed_train_epoch  # type: ignore[method-assign]
        mark = time.perf_counter()
        losses: dict[str, float] = {}
        log = sys.stderr  # fit()'s own output is silenced below; ours is not

        def after_epoch(tr: Trainer, epoch: int, metrics: dict) -> None:
            nonlocal mark
            fit_s.append(time.perf_counter() - mark)
            t0 = time.perf_counter()
            losses["plain"] = plain.epoch(epoch - 1)
            plain_s.append(time.perf_counter() - t0)
            losses["trainer"] = metrics["train_loss"]
            print(f"  epoch {epoch:3d}/{total}  plain {plain_s[-1]:7.3f} s  "
                  f"cnnkit loop {loop_s[-1]:7.3f} s  fit {fit_s[-1]:7.3f} s"
                  + ("  (warm-up)" if epoch <= warmup else ""), file=log)
            if epoch == total:
                raise _Done
            mark = time.perf_counter()

        trainer.callbacks.append(after_epoch)
        # fit() logs one line per epoch even without a progress bar; keep it off our output.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()),\
                contextlib.suppress(_Done):
            trainer.fit()
    return Result(case, plain.steps * plain.batch_size, plain.steps, plain_s[warmup:],
                  loop_s[warmup:], fit_s[warmup:], losses["plain"], losses["trainer"])


def table(results: list[Result]) -> str:
    """A Markdown table: medians per side and the ratios (1.00 = as fast as plain PyTorch)."""
    rows = ["| configuration | epochs x steps x batch | plain samples/s | cnnkit loop samples/s "
            "| **loop ratio** (paired IQR) | cnnkit fit samples/s | fit ratio "
            "| last train loss plain / cnnkit |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        plain, loop, fit = (r.median_sps(t) for t in (r.plain_s, r.loop_s, r.fit_s))
        q1, _, q3 = statistics.quantiles(r.paired_ratios(r.loop_s), n=4)
        rows.append(f"| {r.case.name} | {len(r.plain_s)} x {r.steps} x {r.samples // r.steps} "
                    f"| {plain:,.0f} | {loop:,.0f} | **{loop / plain:.3f}** ({q1:.2f}-{q3:.2f}) "
                    f"| {fit:,.0f} | {fit / plain:.3f} "
                    f"| {r.plain_loss:.3f} / {r.trainer_loss:.3f} |")
    return "\n".join(rows)


def section(results: list[Result], command: str, load_before: str, load_after: str,
            minutes: float) -> str:
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""{SECTION}

`bench/train_throughput.py` trains each configuration twice in one process, with
`cnnkit.training.Trainer` and with a hand-written PyTorch loop, one epoch of each in
turn; after the warm-up epochs it takes each side's median samples/s. **Loop
ratio** (the headline) is the Trainer's training loop (`Trainer._train_epoch`)
against the hand-written loop: 1.00 means no overhead, the goal is >= 0.97. The
paired IQR is the spread (25th-75th percentile) of the ratios of adjacent epochs.
**Fit ratio** counts the Trainer's whole epoch: training, validation and
checkpointing (best and last weights, resumable state, metrics), work the
hand-written loop does not do.

Both sides use the same model and initial weights, training split, batch size 64,
SGD (Nesterov momentum 0.9, weight decay 5e-4 on weights only, fused where PyTorch has
it, else foreach), one-cycle
learning rate, cross-entropy with label smoothing 0.1, the data set's augmentation
(`cnnkit.data.Augment`), normalisation by the training split's mean and std, and
deterministic algorithms (the Trainer's default, process-wide). The hand-written
loop per batch: index the uint8 tensors, `float() / 255`, augment, normalise,
forward, loss, `zero_grad`, backward, set the learning rate, `step`; it reads
its loss once per epoch. See the script's docstring for the details. The thread
count and the load belong to the result: on a machine that other processes keep
busy, more threads than free cores make epoch times swing several-fold.

Measured {date}, in {minutes:.1f} minutes, on:
{machine_text()}.
Load average (1/5/15 min): {load_before} before, {load_after} after.

```bash
{command}
```

{table(results)}
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: tinyvgg on digits only, 1 + 4 epochs")
    parser.add_argument("--threads", type=int, default=cores,
                        help=f"torch intra-op threads (default: all {cores} usable cores)")
    parser.add_argument("--warmup", type=int, default=2, help="epochs left out of the medians")
    parser.add_argument("--epochs", type=int, default=None,
                        help="measured epochs per configuration (default: per configuration)")
    parser.add_argument("--device", default="cpu", help="torch device of both loops (fp32)")
    parser.add_argument("--write-docs", action="store_true",
                        help=f"write the table into {DOCS.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.warmup < 0 or (args.epochs is not None and args.epochs < 4):
        parser.error("--threads must be >= 1, --warmup >= 0 and --epochs >= 4")
    torch.set_num_threads(args.threads)
    warmup = min(args.warmup, 1) if args.quick else args.warmup

    command = "python bench/train_throughput.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    load_before, t0 = load_average(), time.perf_counter()
    if hasattr(os, "getloadavg") and os.getloadavg()[0] > cores - args.threads + 0.5:
        # A thread that waits for a core stalls every parallel region of the others: both
        # sides share the load, so ratios stay fair, but epochs swing by several times.
        print(f"warning: load average {load_before} on {cores} cores; other processes "
              f"compete for the cores and the numbers will be noisy"
              + (" (fewer --threads helps)" if args.threads > 1 else ""), file=sys.stderr)
    results = []
    for case in (c for c in CASES if c.quick or not args.quick):
        epochs = args.epochs or (4 if args.quick else case.epochs)
        print(f"{case.name}: {warmup} warm-up + {epochs} measured epochs", file=sys.stderr)
        results.append(run_case(case, warmup, epochs, args.device))
    minutes, load_after = (time.perf_counter() - t0) / 60, load_average()

    print(f"\n{machine_text()}\nload average {load_before} before, {load_after} after "
          f"({minutes:.1f} min)\n{command.strip()}\n\n{table(results)}")
    worst = min(r.median_sps(r.loop_s) / r.median_sps(r.plain_s) for r in results)
    print(f"\nworst loop ratio {worst:.3f} (goal >= 0.97)"
          + ("" if worst >= 0.97 else ": profile the Trainer"))
    if args.write_docs:
        write_section(DOCS, "train_throughput",
                      section(results, command.strip(), load_before, load_after, minutes),
                      legacy_heading=SECTION)
        print(f"wrote {DOCS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
