"""The subcommands that take a trained run beyond training: ``compress`` (smaller and
faster), ``export`` (ONNX / TorchScript) and ``serve`` (the browser explorer). Like
:mod:`cnnkit.cli.commands`, each imports what it needs when it runs."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from cnnkit._files import refuse_run_file

from .options import fraction, lowrank, positive_float, positive_int, ratio_list


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """The ``compress``, ``export`` and ``serve`` subcommands' parsers."""
    cp = sub.add_parser("compress", help="prune, fine-tune and quantise a run; measure "
                        "accuracy, size and latency before and after")
    cp.add_argument("run", metavar="RUN")
    cp.add_argument("--prune", type=fraction, metavar="RATIO",
                    help="fraction of channels to remove (structured filter pruning)")
    cp.add_argument("--criterion", default="l1",
                    help="l1 (default), l2, bn_scale, random, or from data: taylor, beta_rank")
    cp.add_argument("--lowrank", type=lowrank, metavar="energy:F|FACTOR",
                    help="low-rank factorisation (Tucker-2 / SVD): keep the fraction F of each "
                         "layer's energy, or cut each layer's parameters by FACTOR (> 1)")
    cp.add_argument("--global-ranking", action="store_true",
                    help="one threshold over all layers instead of the same ratio per layer")
    cp.add_argument("--finetune", type=positive_int, metavar="EPOCHS", default=0,
                    help="fine-tune the pruned model for this many epochs")
    cp.add_argument("--quantize", choices=["int8"], help="post-training static int8")
    cp.add_argument("--observer", choices=["minmax", "percentile", "entropy"],
                    default="minmax", help="int8 activation calibration (default minmax)")
    cp.add_argument("--qat", type=positive_int, metavar="EPOCHS", default=0,
                    help="quantisation-aware fine-tuning epochs before int8 (with --quantize)")
    cp.add_argument("--out", metavar="RUN2", help="the new run folder (not with --sweep)")
    cp.add_argument("--sweep", action="store_true",
                    help="measure a grid of pruning ratios, float and int8; write a Pareto "
                         "table and plot into RUN's report")
    cp.add_argument("--ratios", type=ratio_list, default=(0.25, 0.5, 0.75), metavar="R,R,..",
                    help="pruning ratios for --sweep (default 0.25,0.5,0.75)")
    cp.add_argument("--force", action="store_true",
                    help="with --sweep: replace the run's files of an earlier sweep")
    cp.add_argument("--no-progress", action="store_true")
    cp.add_argument("--json", action="store_true")
    cp.set_defaults(func=compress)

    ex = sub.add_parser("export", help="export a run's model to ONNX or TorchScript, checked "
                        "against PyTorch's output")
    ex.add_argument("run", metavar="RUN")
    ex.add_argument("--format", choices=["onnx", "torchscript"], default="onnx",
                    help="onnx (default): one file carrying the preprocessing and class names, "
                    "for `cnnkit predict FILE.onnx IMAGES...`; torchscript: a traced .pt")
    ex.add_argument("--out", help="file to write (default RUN/model.onnx or RUN/model.pt); "
                    "an existing file is kept unless --force")
    ex.add_argument("--force", action="store_true", help="replace an existing --out file")
    ex.add_argument("--json", action="store_true")
    ex.set_defaults(func=export)

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
    sv.add_argument("--header-timeout", type=positive_float, default=5.0, metavar="S",
                    help="close a connection whose request head takes longer (default 5)")
    sv.add_argument("--keep-alive", type=positive_float, default=5.0, metavar="S",
                    help="close an idle kept-alive connection after S seconds (default 5)")
    sv.add_argument("--max-connections", type=positive_int, default=512, metavar="N",
                    help="open connections at most; beyond, the longest idle one is closed "
                    "(default 512)")
    sv.set_defaults(func=serve)


def compress(args: argparse.Namespace) -> int:
    from cnnkit.compress.prune import criteria  # lazy: cli start-up
    from cnnkit.workflows.compress import compress_run  # lazy: cli start-up
    from cnnkit.workflows.sweep import sweep_run  # lazy: cli start-up

    if args.criterion not in criteria():
        raise ValueError(f"unknown --criterion {args.criterion!r}; choose from "
                         f"{', '.join(criteria())}")
    progress = False if args.no_progress else None
    if args.sweep:
        if args.out or args.prune is not None or args.quantize or args.qat or args.lowrank:
            raise ValueError("--sweep measures its own grid into RUN's report; drop --out, "
                             "--prune, --lowrank, --quantize and --qat (choose --ratios)")
        with contextlib.redirect_stdout(sys.stderr):
            try:
                result = sweep_run(args.run, ratios=args.ratios, criterion=args.criterion,
                                   finetune=args.finetune, observer=args.observer,
                                   progress=progress, overwrite=args.force)
            except FileExistsError as e:
                raise ValueError(f"{e.filename} exists from an earlier --sweep; add --force to "
                                 "replace it") from None
        rows, where = result["rows"], f"{result['run']} (compress_sweep.json, report.html)"
    else:
        if not args.out:
            raise ValueError("give the new run folder with --out RUN2 (or use --sweep)")
        if args.force:
            raise ValueError("--force replaces an earlier --sweep's files; --out RUN2 is always "
                             "a new folder, so drop --force")
        with contextlib.redirect_stdout(sys.stderr):
            result = compress_run(args.run, args.out, prune=args.prune,
                                  criterion=args.criterion, global_ranking=args.global_ranking,
                                  lowrank=args.lowrank,
                                  finetune=args.finetune, quantize=args.quantize,
                                  observer=args.observer, qat=args.qat, progress=progress)
        rows, where = result["models"], f"{result['out']} (compress.json)"
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    width, metric = max(9, *(len(n) for n in rows)), result["metric"]
    print(f"{'model':<{width}} {metric:>8} {'params':>10} {'MACs':>12} {'MB':>7} "
          f"{'b1 ms':>7} {'b32 ms':>8} {'spread':>6} {'speed-up b32 (95%)':>22}"
          + ("  Pareto" if args.sweep else ""))
    for name, r in rows.items():
        macs = f"{r['macs']:,}" if r["macs"] is not None else "-"
        lo, hi = r["speedup_b32_interval"]
        speed = f"{r['speedup_b32']:.2f}x ({lo:.2f}-{hi:.2f})"
        flag = ("noisy" if r["noisy_b32"] else "*" if args.sweep and r["pareto"] else
                "noisy at b1" if r["noisy_b1"] else "")
        print(f"{name:<{width}} {r[metric]:>8.4f} {r['params']:>10,} {macs:>12} "
              f"{r['bytes'] / 1e6:>7.2f} {r['latency_b1'] * 1e3:>7.2f} "
              f"{r['latency_b32'] * 1e3:>8.2f} {r['spread_b32']:>6.0%} {speed:>22}"
              + (f"  {flag}" if flag else ""))
    print(_latency_note(result, args.sweep))
    print(f"wrote {where}")
    return 0


def _latency_note(result: dict, sweep: bool) -> str:
    """How the latencies were measured, the load they were measured under, what noisy means."""
    load, cpus = result["load_average"], result["cpus"]
    busy = (f"load average {load:.2f} on {cpus} CPUs" if load is not None
            else "load average unknown") + (": busy" if load is not None and cpus
                                            and load > cpus else "")
    return ("latency: medians of interleaved rounds; spread: interquartile range / median; "
            f"noisy: spread over {result['noise_spread']:.0%} or a speed-up interval holding "
            f"1x, too busy to tell ({busy})"
            + ("; noisy points stay off the Pareto front" if sweep else "")
            + ("; no point was measured cleanly: rerun on a quieter machine"
               if sweep and not result["pareto"] else ""))


def export(args: argparse.Namespace) -> int:
    import torch  # lazy: cli start-up

    from cnnkit.compress.export import export as export_model  # lazy: cli start-up
    from cnnkit.workflows.load import load_run  # lazy: cli start-up
    from cnnkit.workflows.onnx_predict import export_metadata  # lazy: cli start-up

    run = load_run(args.run)
    c, *spatial = run.preprocess.input_size
    scale = int(getattr(run.model, "scale", 1))
    x = torch.rand(2, c, *(v // scale for v in spatial))
    out = Path(args.out) if args.out else run.path / ("model.onnx" if args.format == "onnx"
                                                      else "model.pt")
    refuse_run_file(out)
    try:
        result = export_model(run.model, x, out, format=args.format, overwrite=args.force,
                              metadata=export_metadata(run))
    except FileExistsError:
        raise ValueError(f"{out} exists; give another --out, or add --force to replace it"
                         ) from None
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        check = (f"outputs match {result['checked_with']} within {result['max_abs_diff']:.2g}"
                 if result["checked_with"] else "not run: install onnxruntime to check it")
        inside = (", one file: weights, preprocessing and class names inside"
                  if args.format == "onnx" else "")
        print(f"wrote {result['path']} ({result['bytes'] / 1e6:.2f} MB{inside}); {check}")
    return 0


def serve(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be 0..65535, got {args.port} (0 picks a free port)")
    try:
        from cnnkit.web import ServerLimits  # lazy: optional dependency (the web extra)
        from cnnkit.web import serve as serve_explorer  # lazy: optional dependency (the web extra)
    except ImportError as e:
        raise ValueError(f"cnnkit serve needs the web extra ({e}); install it with "
                         'pip install -e ".[web]"') from e

    def announce(url: str) -> None:
        exposed = "" if args.host in ("127.0.0.1", "localhost", "::1") else \
            f" (listening on {args.host}: other machines can reach it)"
        print(f"cnnkit serve: {url}{exposed}; press Ctrl-C to stop", flush=True)

    limits = ServerLimits(header_timeout=args.header_timeout, keep_alive=args.keep_alive,
                          max_connections=args.max_connections)
    serve_explorer(args.run, host=args.host, port=args.port, weights=args.weights,
                   announce=announce, limits=limits)
    return 0
