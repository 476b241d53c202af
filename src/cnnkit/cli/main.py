"""``cnnkit``: the entry point, the parser, and the error policy.

Nothing heavy is imported here: each subcommand imports PyTorch when it runs, so
``cnnkit --help`` answers at once. Every expected failure (bad input, a missing
file, a NaN loss) becomes one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

from cnnkit import __version__

from . import commands, deploy
from .options import fraction, kv, nonnegative_float, positive_float, positive_int, size


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the problem and where to look for the fix."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cnnkit", description="Build, train, evaluate and analyse CNNs.")
    p.add_argument("--version", action="version", version=f"cnnkit {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    t = sub.add_parser("train", help="train a model (default: the small CNN on digits)",
                       description="Train a model on a built-in data set or your own folder.")
    t.add_argument("--task", help="what the model predicts (see `cnnkit tasks`): classify "
                   "(default), segment (a class per pixel), superres, regress (values)")
    t.add_argument("--model", help="model name (see `cnnkit models`); default: the task's "
                   "(tinyvgg_wide for classify)")
    t.add_argument("--data", help="built-in data set (see `cnnkit datasets`) or a folder, "
                   ".csv or .npz path; default digits (shapes for segment and superres)")
    t.add_argument("--scale", type=positive_int, help="superres: upscaling factor (default 3)")
    t.add_argument("--loss", help="segment: ce, dice, focal, ce+dice (default), focal+dice; "
                   "superres: mse (default) or l1")
    t.add_argument("--epochs", type=positive_int)
    t.add_argument("--batch-size", type=positive_int)
    t.add_argument("--lr", type=positive_float,
                   help="peak learning rate (default: scaled to the batch)")
    t.add_argument("--optimizer", choices=["sgd", "adamw"])
    t.add_argument("--schedule", choices=["cosine", "onecycle", "constant"])
    t.add_argument("--weight-decay", type=nonnegative_float)
    t.add_argument("--label-smoothing", type=fraction)
    t.add_argument("--grad-clip", type=positive_float,
                   help="clip the global gradient norm to this value")
    t.add_argument("--image-size", type=positive_int, help="resize your images to this size")
    t.add_argument("--channels", type=int, choices=[1, 3], help="force grey or colour input")
    t.add_argument("--augment", help="augmentation policy (default: the data set's own)")
    t.add_argument("--amp", choices=["auto", "off", "bf16", "fp16"])
    t.add_argument("--channels-last", action="store_true", default=None)
    t.add_argument("--compile", action="store_true", default=None,
                   help="compile the training step with torch.compile (falls back to eager "
                   "with a warning if compilation fails)")
    t.add_argument("--fast", action="store_true", default=None,
                   help="every fast path: channels_last, torch.compile and (with --amp auto) "
                   "bf16 autocast where the CPU or GPU supports it")
    t.add_argument("--nproc", type=positive_int, metavar="N",
                   help="train data-parallel in N processes on this machine (runs torchrun; "
                   "--batch-size is the global batch)")
    t.add_argument("--sync-bn", action="store_true", default=None,
                   help="with several processes: BatchNorm statistics over the global batch")
    t.add_argument("--ema", action="store_true", default=None, help="evaluate an EMA of weights")
    t.add_argument("--early-stopping", type=positive_int, metavar="PATIENCE")
    t.add_argument("--device", help="auto (default), cpu, cuda, cuda:N or mps")
    t.add_argument("--strict", action="store_true", default=None,
                   help="fail on unreadable images instead of skipping them")
    t.add_argument("--model-opt", type=kv, action="append", metavar="KEY=VALUE",
                   help="model option, e.g. --model-opt attn=eca (repeatable)")
    t.add_argument("--data-opt", type=kv, action="append", metavar="KEY=VALUE",
                   help="data set option, e.g. --data-opt n=5000 (repeatable)")
    t.add_argument("--name", help="run name (default <model>-<data>)")
    t.add_argument("--runs-dir", help="where runs are written (default runs)")
    t.add_argument("--resume", metavar="RUN", help="continue an interrupted run with its saved "
                   "settings; --epochs, --lr, --grad-clip, --early-stopping, --amp, --device, "
                   "--compile, --channels-last and --fast may change (recorded in the run)")
    t.add_argument("--seed", type=int)
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--json", action="store_true", help="print summary.json at the end")
    t.set_defaults(func=commands.train)

    e = sub.add_parser("eval", help="evaluate a run on its test split or on other data")
    e.add_argument("run", metavar="RUN")
    e.add_argument("--data", help="evaluate on this data instead (all of it)")
    e.add_argument("--weights", choices=["best", "last", "int8"], default="best",
                   help="best (default), last, or the int8 model of a compressed run")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=commands.evaluate)

    pr = sub.add_parser("predict", help="classify, segment or upscale image files with a run")
    pr.add_argument("run", metavar="RUN")
    pr.add_argument("files", metavar="FILES", nargs="+")
    pr.add_argument("--out", help="segment/superres: a new folder for masks, overlays or "
                    "upscaled images (default RUN/predictions, or RUN/predictions-2 ... if taken)")
    pr.add_argument("--force", action="store_true",
                    help="write into an existing --out folder, replacing files of the same names")
    pr.add_argument("--crf", action="store_true",
                    help="segment: refine the masks with a dense CRF (Krähenbühl and Koltun)")
    pr.add_argument("--topk", type=positive_int, default=3)
    pr.add_argument("--json", action="store_true")
    pr.set_defaults(func=commands.predict)

    s = sub.add_parser("summary", help="per-layer shapes, parameters, MACs, memory and "
                       "receptive fields of a model or run")
    s.add_argument("target", metavar="MODEL_OR_RUN")
    s.add_argument("--input", type=size, metavar="CxHxW",
                   help="input size (default: the model's or the run's)")
    s.add_argument("--num-classes", type=positive_int)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=commands.summary)

    x = sub.add_parser("explain", help="heat maps of why a run's model predicts what it does",
                       description="Explain a run's predictions on image files: an overlay "
                       "with a colour bar per image and method, a grid comparing methods, "
                       "and the raw maps as .npy.")
    x.add_argument("run", metavar="RUN")
    x.add_argument("images", metavar="IMAGES", nargs="*",
                   help="image files (required unless --benchmark)")
    x.add_argument("--method", action="append", metavar="M",
                   help="explanation method, repeatable (default gradcam); the methods are "
                   "listed by cnnkit.explain.list_methods()")
    x.add_argument("--target", help="class name or index to explain (default: the predicted)")
    x.add_argument("--layer", help="layer name for layer methods (default: the model's)")
    x.add_argument("--out", default=None, help="a new output folder (default "
                   "RUN/explanations, or RUN/explanations-2 ... if taken)")
    x.add_argument("--force", action="store_true",
                   help="write into an existing --out folder (or, with --benchmark, replace the "
                   "run's earlier benchmark files)")
    x.add_argument("--benchmark", action="store_true",
                   help="instead of explaining IMAGES, rank the methods (all, or the --method "
                   "ones) on the run's test split by deletion/insertion AUC, pointing game, "
                   "energy in mask and speed; writes RUN/benchmark.json, "
                   "RUN/explain_benchmark.png and a report.html section")
    x.add_argument("--n-images", type=positive_int, default=32,
                   help="test images for --benchmark (default 32)")
    x.add_argument("--steps", type=positive_int, default=32,
                   help="deletion/insertion curve steps for --benchmark (default 32)")
    x.add_argument("--sanity", action="store_true",
                   help="with --benchmark: also the model-randomisation check (slower)")
    x.set_defaults(func=commands.explain)

    deploy.add_parsers(sub)

    b = sub.add_parser("bench", help="measure this machine's peak FLOP/s and how fast the "
                       "Trainer trains and infers against it",
                       description="Peak matmul and convolution FLOP/s (fp32, bf16); training "
                       "samples/s, utilisation and peak memory of the Trainer (eager, fast) "
                       "against a hand-written loop, interleaved; inference latency.")
    b.add_argument("--models", metavar="M,M,..",
                   help="classifiers to train (default resnet18,tinyvgg,mobilenet_v2)")
    b.add_argument("--quick", action="store_true",
                   help="tiny sizes and few repeats: a smoke run (seconds with --no-compile)")
    b.add_argument("--steps", type=positive_int,
                   help="training steps per timed round (default: about 3 s of eager steps)")
    b.add_argument("--rounds", type=positive_int, help="timed rounds (default 7)")
    b.add_argument("--batch-size", type=positive_int, help="training batch (default 64)")
    b.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    b.add_argument("--threads", type=positive_int,
                   help="torch intra-op threads (default: PyTorch's, all cores)")
    b.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="fast mode with / without torch.compile (default: as --fast trains "
                        "on the device: compiled on CUDA, not on the CPU)")
    b.add_argument("--no-memory", action="store_true",
                   help="skip the peak-memory measurement (one fresh process per configuration)")
    b.add_argument("--write-docs", nargs="?", const="docs/benchmarks.md", metavar="PATH",
                   help="write or replace the 'cnnkit bench' section of PATH "
                   "(default docs/benchmarks.md), keeping the other sections")
    b.add_argument("--no-progress", action="store_true")
    b.add_argument("--json", action="store_true", help="print the result as JSON")
    b.set_defaults(func=commands.bench)

    m = sub.add_parser("models", help="list the registered models")
    m.add_argument("pattern", nargs="?", help="shell pattern such as 'resnet*'")
    m.add_argument("--task", help="only the models of this task (see `cnnkit tasks`)")
    m.set_defaults(func=commands.models)

    tk = sub.add_parser("tasks", help="list the registered tasks: what each predicts, its "
                        "metric and defaults")
    tk.set_defaults(func=commands.tasks)

    d = sub.add_parser("datasets", help="list the built-in data sets and the user formats")
    d.set_defaults(func=commands.datasets)
    return p


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    # A warning is news for the user (skipped files, ignored folders), not for a developer:
    # one line without the source location that Python's default format adds.
    print(f"cnnkit: warning: {commands.one_line(message)}", file=file or sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # `train --nproc` relaunches it
    # `cnnkit explain RUN --method m a.png`: IMAGES is nargs="*" (optional with --benchmark),
    # which argparse binds, empty, before the options; files after them come back here.
    if args.command == "explain" and extras and not any(e.startswith("-") for e in extras):
        args.images, extras = [*args.images, *extras], []
    if extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    if args.command is None:
        parser.print_help()
        return 0
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            return args.func(args) or 0
    except KeyboardInterrupt:
        print("cnnkit: interrupted", file=sys.stderr)
        return 130
    except commands.EXPECTED_ERRORS as e:
        print(f"cnnkit {args.command}: error: {commands.one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
