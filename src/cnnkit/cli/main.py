"""``cnnkit``: the entry point, the parser, and the error policy.

Nothing heavy is imported here: each subcommand imports PyTorch when it runs, so
``cnnkit --help`` answers at once. Every expected failure (bad input, a missing
file, a NaN loss) becomes one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from collections.abc import Sequence

from cnnkit import __version__

from . import commands, deploy


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the problem and where to look for the fix."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _kv(text: str) -> tuple[str, object]:
    """``key=value`` with the value parsed as YAML (numbers, booleans, lists)."""
    import yaml

    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError:
        return key, value


def _size(text: str) -> tuple[int, ...]:
    """``3x224x224`` -> (3, 224, 224); volumes ``CxDxHxW`` (3D models) give four values."""
    try:
        size = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        size = ()
    if len(size) not in (3, 4):
        msg = f"expected CxHxW such as 3x224x224 (CxDxHxW for volumes), got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if min(size) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return size


def _number(text: str, kind: type, low: float, low_ok: bool, high: float = math.inf):
    """Parse ``text`` as ``kind`` within ``low..high`` (``low`` itself allowed when ``low_ok``)."""
    what = "an integer" if kind is int else "a finite number"
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not (math.isfinite(value) and (value >= low if low_ok else value > low) and value < high):
        bound = f"{'at least' if low_ok else 'above'} {low:g}"
        bound += f" and below {high:g}" if math.isfinite(high) else ""
        raise argparse.ArgumentTypeError(f"must be {what} {bound}, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    return _number(text, int, 1, True)


def _positive_float(text: str) -> float:
    return _number(text, float, 0, False)


def _nonnegative_float(text: str) -> float:
    return _number(text, float, 0, True)


def _fraction(text: str) -> float:
    return _number(text, float, 0, True, 1)


def _lowrank(text: str) -> str | float:
    """``energy:F`` with F in (0, 1], or a parameter-reduction factor above 1."""
    if text.startswith("energy:"):
        _number(text[7:], float, 0, False, 1.000001)
        return text
    return _number(text, float, 1, False)


def _ratio_list(text: str) -> tuple[float, ...]:
    """Comma-separated fractions in (0, 1), such as ``0.25,0.5``."""
    return tuple(_number(part.strip(), float, 0, False, 1) for part in text.split(","))


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cnnkit", description="Build, train, evaluate and analyse CNNs.")
    p.add_argument("--version", action="version", version=f"cnnkit {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    t = sub.add_parser("train", help="train a model (default: the small CNN on digits)",
                       description="Train a model on a built-in data set or your own folder.")
    t.add_argument("--task", choices=["classify", "segment", "superres"],
                   help="classify (default), segment (a class per pixel) or superres")
    t.add_argument("--model", help="model name (see `cnnkit models`); default tinyvgg_wide, "
                   "unet_small for segment, espcn for superres")
    t.add_argument("--data", help="built-in data set (see `cnnkit datasets`) or a folder, "
                   ".csv or .npz path; default digits (shapes for segment and superres)")
    t.add_argument("--scale", type=_positive_int, help="superres: upscaling factor (default 3)")
    t.add_argument("--loss", help="segment: ce, dice, focal, ce+dice (default), focal+dice; "
                   "superres: mse (default) or l1")
    t.add_argument("--epochs", type=_positive_int)
    t.add_argument("--batch-size", type=_positive_int)
    t.add_argument("--lr", type=_positive_float,
                   help="peak learning rate (default: scaled to the batch)")
    t.add_argument("--optimizer", choices=["sgd", "adamw"])
    t.add_argument("--schedule", choices=["cosine", "onecycle", "constant"])
    t.add_argument("--weight-decay", type=_nonnegative_float)
    t.add_argument("--label-smoothing", type=_fraction)
    t.add_argument("--grad-clip", type=_positive_float,
                   help="clip the global gradient norm to this value")
    t.add_argument("--image-size", type=_positive_int, help="resize your images to this size")
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
    t.add_argument("--nproc", type=_positive_int, metavar="N",
                   help="train data-parallel in N processes on this machine (runs torchrun; "
                   "--batch-size is the global batch)")
    t.add_argument("--sync-bn", action="store_true", default=None,
                   help="with several processes: BatchNorm statistics over the global batch")
    t.add_argument("--ema", action="store_true", default=None, help="evaluate an EMA of weights")
    t.add_argument("--early-stopping", type=_positive_int, metavar="PATIENCE")
    t.add_argument("--device", help="auto (default), cpu, cuda, cuda:N or mps")
    t.add_argument("--strict", action="store_true", default=None,
                   help="fail on unreadable images instead of skipping them")
    t.add_argument("--model-opt", type=_kv, action="append", metavar="KEY=VALUE",
                   help="model option, e.g. --model-opt attn=eca (repeatable)")
    t.add_argument("--data-opt", type=_kv, action="append", metavar="KEY=VALUE",
                   help="data set option, e.g. --data-opt n=5000 (repeatable)")
    t.add_argument("--name", help="run name (default <model>-<data>)")
    t.add_argument("--runs-dir", help="where runs are written (default runs)")
    t.add_argument("--resume", metavar="RUN", help="continue an interrupted run with its saved "
                   "settings (only --epochs may change, to train longer)")
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
    pr.add_argument("--out", help="segment/superres: folder for masks, overlays or upscaled "
                    "images (default RUN/predictions)")
    pr.add_argument("--crf", action="store_true",
                    help="segment: refine the masks with a dense CRF (Krähenbühl and Koltun)")
    pr.add_argument("--topk", type=_positive_int, default=3)
    pr.add_argument("--json", action="store_true")
    pr.set_defaults(func=commands.predict)

    s = sub.add_parser("summary", help="per-layer shapes, parameters, MACs, memory and "
                       "receptive fields of a model or run")
    s.add_argument("target", metavar="MODEL_OR_RUN")
    s.add_argument("--input", type=_size, metavar="CxHxW",
                   help="input size (default: the model's or the run's)")
    s.add_argument("--num-classes", type=_positive_int)
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
    x.add_argument("--out", default=None, help="output folder (default RUN/explanations)")
    x.add_argument("--benchmark", action="store_true",
                   help="instead of explaining IMAGES, rank the methods (all, or the --method "
                   "ones) on the run's test split by deletion/insertion AUC, pointing game, "
                   "energy in mask and speed; writes RUN/benchmark.json, "
                   "RUN/explain_benchmark.png and a report.html section")
    x.add_argument("--n-images", type=_positive_int, default=32,
                   help="test images for --benchmark (default 32)")
    x.add_argument("--steps", type=_positive_int, default=32,
                   help="deletion/insertion curve steps for --benchmark (default 32)")
    x.add_argument("--sanity", action="store_true",
                   help="with --benchmark: also the model-randomisation check (slower)")
    x.set_defaults(func=commands.explain)

    cp = sub.add_parser("compress", help="prune, fine-tune and quantise a run; measure "
                        "accuracy, size and latency before and after")
    cp.add_argument("run", metavar="RUN")
    cp.add_argument("--prune", type=_fraction, metavar="RATIO",
                    help="fraction of channels to remove (structured filter pruning)")
    cp.add_argument("--criterion", default="l1",
                    help="l1 (default), l2, bn_scale, random, or from data: taylor, beta_rank")
    cp.add_argument("--lowrank", type=_lowrank, metavar="energy:F|FACTOR",
                    help="low-rank factorisation (Tucker-2 / SVD): keep the fraction F of each "
                         "layer's energy, or cut each layer's parameters by FACTOR (> 1)")
    cp.add_argument("--global-ranking", action="store_true",
                    help="one threshold over all layers instead of the same ratio per layer")
    cp.add_argument("--finetune", type=_positive_int, metavar="EPOCHS", default=0,
                    help="fine-tune the pruned model for this many epochs")
    cp.add_argument("--quantize", choices=["int8"], help="post-training static int8")
    cp.add_argument("--observer", choices=["minmax", "percentile", "entropy"],
                    default="minmax", help="int8 activation calibration (default minmax)")
    cp.add_argument("--qat", type=_positive_int, metavar="EPOCHS", default=0,
                    help="quantisation-aware fine-tuning epochs before int8 (with --quantize)")
    cp.add_argument("--out", metavar="RUN2", help="the new run folder (not with --sweep)")
    cp.add_argument("--sweep", action="store_true",
                    help="measure a grid of pruning ratios, float and int8; write a Pareto "
                         "table and plot into RUN's report")
    cp.add_argument("--ratios", type=_ratio_list, default=(0.25, 0.5, 0.75), metavar="R,R,..",
                    help="pruning ratios for --sweep (default 0.25,0.5,0.75)")
    cp.add_argument("--no-progress", action="store_true")
    cp.add_argument("--json", action="store_true")
    cp.set_defaults(func=deploy.compress)

    ex = sub.add_parser("export", help="export a run's model to ONNX or TorchScript, checked "
                        "against PyTorch's output")
    ex.add_argument("run", metavar="RUN")
    ex.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    ex.add_argument("--out", help="file to write (default RUN/model.onnx or RUN/model.pt)")
    ex.add_argument("--json", action="store_true")
    ex.set_defaults(func=deploy.export)

    sv = sub.add_parser("serve", help="explore a run's CNN in the browser: activations, the "
                        "arithmetic of every neuron, filters, explanations",
                        description="Serve an interactive explorer of a run's model (after CNN "
                        "Explainer, Wang et al. 2020) at http://HOST:PORT/ until Ctrl-C.")
    sv.add_argument("run", metavar="RUN")
    sv.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a "
                    "free one)")
    sv.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: "
                    "this machine only)")
    sv.add_argument("--weights", choices=["best", "last", "int8"], default="best",
                    help="best (default), last, or the int8 model of a compressed run")
    sv.set_defaults(func=deploy.serve)

    b = sub.add_parser("bench", help="measure this machine's peak FLOP/s and how fast the "
                       "Trainer trains and infers against it",
                       description="Peak matmul and convolution FLOP/s (fp32, bf16); training "
                       "samples/s, utilisation and peak memory of the Trainer (eager, fast) "
                       "against a hand-written loop, interleaved; inference latency.")
    b.add_argument("--models", metavar="M,M,..",
                   help="classifiers to train (default resnet18,tinyvgg,mobilenet_v2)")
    b.add_argument("--quick", action="store_true",
                   help="tiny sizes and few repeats: a smoke run (seconds with --no-compile)")
    b.add_argument("--steps", type=_positive_int,
                   help="training steps per timed round (default: about 3 s of eager steps)")
    b.add_argument("--rounds", type=_positive_int, help="timed rounds (default 7)")
    b.add_argument("--batch-size", type=_positive_int, help="training batch (default 64)")
    b.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    b.add_argument("--threads", type=_positive_int,
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
    m.add_argument("--task", choices=["classify", "segment", "superres"],
                   help="only the models of this task")
    m.set_defaults(func=commands.models)

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
