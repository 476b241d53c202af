"""``cnnkit``: the entry point, the parser, and the error policy.

The options of ``train`` and ``bench`` are generated from their config dataclasses
(:mod:`.generate`). Nothing heavy is imported here (those dataclasses are PyTorch-free):
each subcommand imports PyTorch when it runs, so ``cnnkit --help`` answers at once. Every
expected failure (bad input, a missing file, a NaN loss) becomes one line on stderr and
exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence

from cnnkit import __version__
from cnnkit.plugins import entry_point_plugins, env_plugins, load_plugins, split_names
from cnnkit.run.config import RESUME_OPTIONS, TrainConfig
from cnnkit.run.config_file import read_options_file, to_yaml
from cnnkit.workflows.bench.config import BenchConfig

from . import commands, deploy
from .generate import add_options, config_from_args, option_flag
from .options import method_option, positive_int, size


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the problem and where to look for the fix."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cnnkit", description="Build, train, evaluate and analyse CNNs.")
    p.add_argument("--version", action="version", version=f"cnnkit {__version__}")
    p.add_argument("--plugin", action="append", metavar="MODULE", help=_PLUGIN_HELP)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    t = sub.add_parser("train", help="train a model (default: the small CNN on digits)",
                       description="Train a model on a built-in data set or your own folder.")
    may_change = [option_flag(TrainConfig, k) for k in RESUME_OPTIONS]
    t.add_argument("--resume", metavar="RUN", help="continue an interrupted run with its saved "
                   f"settings; {', '.join(may_change[:-1])} and {may_change[-1]} may change "
                   "(recorded in the run)")
    t.add_argument("--nproc", type=positive_int, metavar="N",
                   help="train data-parallel in N processes on this machine (runs torchrun; "
                   "--batch-size is the global batch)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--json", action="store_true", help="print summary.json at the end")
    t.add_argument("--config", metavar="FILE", help="training options from a YAML file (any "
                   "training option below; a run's config.yaml works); options given here win")
    t.add_argument("--print-config", action="store_true", help="print the resolved options "
                   "as YAML (a --config file) and exit without training")
    add_options(t.add_argument_group("training options", "saved in the run's config.yaml"),
                TrainConfig)
    t.set_defaults(func=commands.train, config_class=TrainConfig)

    e = sub.add_parser("eval", help="evaluate a run on its test split or on other data")
    e.add_argument("run", metavar="RUN")
    e.add_argument("--data", help="evaluate on this data instead (all of it; needed for a run "
                   "trained on in-memory arrays)")
    e.add_argument("--weights", choices=["best", "last", "int8"], default="best",
                   help="best (default), last, or the int8 model of a compressed run")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=commands.evaluate)

    pr = sub.add_parser("predict", help="classify, segment or upscale image files with a run")
    pr.add_argument("run", metavar="RUN")
    pr.add_argument("files", metavar="FILES", nargs="+",
                    help="image files, folders (every image inside, sorted) or quoted glob "
                    "patterns such as 'photos/*.jpg'")
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
    s.add_argument("target", metavar="MODEL_OR_RUN",
                   help="a model name (see `cnnkit models`) or a run folder")
    s.add_argument("--input", type=size, metavar="CxHxW",
                   help="input size (default: the model's or the run's)")
    s.add_argument("--num-classes", type=positive_int,
                   help="classes of a model's head (default: the model's own)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=commands.summary)

    x = sub.add_parser("explain", help="heat maps of why a run's model predicts what it does",
                       description="Explain a run's predictions on image files: an overlay "
                       "with a colour bar per image and method, a grid comparing methods, "
                       "and the raw maps as .npy.")
    x.add_argument("run", metavar="RUN")
    x.add_argument("images", metavar="IMAGES", nargs="*",
                   help="image files, folders (every image inside, sorted) or quoted glob "
                   "patterns such as 'photos/*.jpg' (required unless --benchmark)")
    x.add_argument("--method", action="append", metavar="M",
                   help="explanation method, repeatable (default gradcam); 'all': every "
                   "method that applies to the run, compared in grid.png; the methods are "
                   "listed by cnnkit.explain.list_methods()")
    x.add_argument("--opt", action="append", type=method_option, metavar="KEY=VALUE",
                   help="a method option, repeatable, e.g. --opt window=3 (occlusion), "
                   "--opt steps=64 (integrated_gradients), --opt window=2,3 for one size per "
                   "axis; each goes to the methods that take it")
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
    add_options(b, BenchConfig)
    b.add_argument("--write-docs", nargs="?", const="docs/benchmarks.md", metavar="PATH",
                   help="write or replace the 'cnnkit bench' section of PATH "
                   "(default docs/benchmarks.md), keeping the other sections")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument("--json", action="store_true", help="print the result as JSON")
    b.set_defaults(func=commands.bench, config_class=BenchConfig)

    m = sub.add_parser("models", help="list the registered models")
    m.add_argument("pattern", nargs="?", help="shell pattern such as 'resnet*'")
    m.add_argument("--task", help="only the models of this task (see `cnnkit tasks`)")
    m.set_defaults(func=commands.models)

    tk = sub.add_parser("tasks", help="list the registered tasks: what each predicts, its "
                        "metric and defaults")
    tk.set_defaults(func=commands.tasks)

    d = sub.add_parser("datasets", help="list the built-in data sets and the user formats")
    d.set_defaults(func=commands.datasets)
    for command in sub.choices.values():  # `cnnkit train --plugin M` works too
        command.add_argument("--plugin", action="append", dest="sub_plugins", metavar="MODULE",
                             help=_PLUGIN_HELP)
        for action in command._actions:  # options every command words alike
            if not action.help and action.dest in _COMMON_HELP:
                action.help = _COMMON_HELP[action.dest]
    return p


_PLUGIN_HELP = ("import this module first (repeatable; also CNNKIT_PLUGINS=mod1,mod2 and "
                "the `cnnkit.plugins` entry points), so the models, data sets and tasks it "
                "registers work; a run records it and later commands import it themselves")
# The help of options that several commands share, where a command gives none.
_COMMON_HELP = {
    "run": "a run folder (runs/NAME), or NAME under runs/",
    "files": "image or volume files",
    "json": "print the result as JSON",
    "no_progress": "no progress bar",
    "topk": "how many of the most likely classes to print (default %(default)s)",
    "format": "the file format: %(choices)s",
}


def _load_plugins(args: argparse.Namespace) -> tuple[str, ...]:
    """Import the plugins (entry points, CNNKIT_PLUGINS, --plugin) before the command runs;
    returns the ones named by the user, which a new run records."""
    entry_point_plugins()
    named = load_plugins(env_plugins(), "CNNKIT_PLUGINS")
    return (*named, *load_plugins(split_names([*(args.plugin or []),
                                                *(args.sub_plugins or [])])))


def _train_options(args: argparse.Namespace, plugins: tuple[str, ...]) -> int | None:
    """``train --config FILE`` (its options under the ones given) and ``--print-config``
    (the resolved options as YAML; exit code 0 without training). None: go on and train."""
    if args.resume is not None:
        given = [flag for flag, value in (("--config", args.config),
                                          ("--print-config", args.print_config)) if value]
        if given:
            raise ValueError(f"--resume continues RUN with its own config.yaml, so "
                             f"{' and '.join(given)} cannot be given with it; drop "
                             f"{'them' if len(given) > 1 else 'it'}, or start a new run")
        return None
    values = read_options_file(args.config) if args.config else {}
    file_plugins = load_plugins(values.get("plugins") or (), f"config file {args.config!r}")
    args.config_values = {**values, "plugins": [*file_plugins, *plugins]}
    try:
        config = config_from_args(TrainConfig, args)
    except (TypeError, ValueError) as e:
        if not args.config:
            raise
        raise ValueError(f"config file {args.config!r} (or an option given with it): "
                         f"{commands.one_line(e)}") from e
    if args.print_config:
        sys.stdout.write(to_yaml(config))
        return 0
    return None


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    # A warning is news for the user (skipped files, ignored folders), not for a developer:
    # one line without the source location that Python's default format adds.
    print(f"cnnkit: warning: {commands.one_line(message)}", file=file or sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code.

    Output into a pipe that closes early (``cnnkit summary resnet18 | head``) ends quietly
    with exit code 1, as Python's documentation advises (``signal`` module, "Note on
    SIGPIPE"): the rest of stdout goes to ``os.devnull``.
    """
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()  # a closed pipe shows here, not as a warning at exit
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


def _main(argv: Sequence[str] | None) -> int:
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
            plugins = _load_plugins(args)
            if args.command == "train":
                code = _train_options(args, plugins)
                if code is not None:
                    return code
            return args.func(args) or 0
    except KeyboardInterrupt:
        print("cnnkit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        raise  # main() ends it quietly
    except commands.EXPECTED_ERRORS as e:
        print(f"cnnkit {args.command}: error: {commands.one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
