"""Explanation throughput: maps/s of cnnkit's explainers against a minimal hand-written
implementation and against pytorch-grad-cam, Captum and zennit (each when installed).

For each model (resnet18 at 224x224 and tinyvgg at 64x64, random weights from a fixed
seed, eval mode, batch 16, one fixed target class per image) and each method, every
implementation explains the same batch for the same targets:

* ``cnnkit``: ``cnnkit.explain.create(name, model, **options)(x, target)``;
* ``minimal``: hand-written PyTorch, the practical limit: for Grad-CAM and Grad-CAM++
  one forward with a hook on the layer and one ``torch.autograd.grad`` to it; for
  Integrated Gradients a plain loop over chunks of the interpolated images;
* ``pytorch-grad-cam`` (``GradCAM``/``GradCAMPlusPlus``/``FullGrad`` in a ``with``
  block per call, as its README does, ``ClassifierOutputTarget`` per image);
* ``captum`` (``LayerGradCam(relu_attributions=True)`` + ``LayerAttribution.interpolate``
  bilinear; ``IntegratedGradients`` with the same steps, quadrature and
  ``internal_batch_size`` as cnnkit);
* ``zennit`` (``Gradient`` attributor with the ``EpsilonPlus`` composite, the one
  cnnkit's ``lrp`` default follows, set to cnnkit's two conventions: the relevance
  starts from the target logit, ``attr_output = logits * one_hot`` (Bach et al. 2015:
  ``R = f_c(x)``; a bare one-hot starts from 1 and flips the sign of every map whose
  logit is negative), and z+ leaves the biases out, ``ZPlus(zero_params=["bias"])``
  (Deep Taylor Decomposition; zennit's default lets ``b+`` into the denominator, which
  cnnkit gives with ``zplus_bias=True``); for resnet18 on a torchvision ResNet-18 loaded
  with the very same weights, so that zennit's ``ResNetCanonizer`` applies; the
  attributor context is entered once, zennit's documented loop).

The first call of each implementation is the warm-up and its maps are checked against
cnnkit's (mean over images of the Pearson correlation of the flattened maps: it ignores
the per-image normalisation some libraries apply); then the implementations are timed
round-robin, ``--repeats`` calls each, and the median seconds per batch gives maps/s.
Only ratios from one run are compared. Peers that cannot be imported are skipped with a
note, as is ``lrp`` while it is not registered.

Usage::

    python bench/explain_throughput.py --quick        # tinyvgg only, seconds
    python bench/explain_throughput.py                # + resnet18 224x224, ~5 min on 2 cores
    python bench/explain_throughput.py --write-docs   # also update docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import importlib.util
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import cnnkit.explain
from cnnkit.models import create_model
from cnnkit.workflows.bench.report import load_average
from cnnkit.workflows.bench.report import machine as machine_info

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
SECTION = "## Explanation throughput"
GOALS = {  # (method, peer) -> minimum cnnkit speed-up over the peer
    ("gradcam", "pytorch-grad-cam"): 3.0,
    ("gradcam", "captum"): 1.5,
    ("fullgrad", "pytorch-grad-cam"): 10.0,
}
MINIMAL_SLACK = 1.15  # cnnkit's Grad-CAM time <= 1.15 x the minimal's

Maps = Callable[[], torch.Tensor]


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@dataclass
class Case:
    """One model and batch: the images, their targets and the layer CAM methods read."""

    name: str
    model: nn.Module
    x: torch.Tensor
    target: torch.Tensor  # [B] long
    layer: nn.Module
    twin: nn.Module | None = None  # torchvision copy with the same weights (zennit)


@dataclass
class Row:
    case: str
    method: str
    impl: str
    times: list[float] = field(default_factory=list)
    batch: int = 0
    corr: float | None = None
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def maps_per_s(self) -> float:
        return self.batch / self.median


def make_case(name: str, seed: int = 0) -> Case:
    torch.manual_seed(seed)
    if name == "resnet18":
        model, size, twin = create_model("resnet18").eval(), 224, None
        if has("torchvision"):
            import torchvision

            twin = torchvision.models.resnet18(weights=None).eval()
            twin.load_state_dict(model.state_dict(), strict=True)
    else:
        model, size, twin = create_model("tinyvgg", num_classes=10, img_size=64).eval(), 64, None
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(16, 3, size, size, generator=gen)
    num_classes = model.get_classifier().out_features
    target = torch.randint(num_classes, (16,), generator=gen)
    layer = model.get_submodule(model.cam_layer)
    return Case(f"{name} {size}x{size}", model, x, target, layer, twin)


# -- minimal hand-written implementations ----------------------------------------------

def minimal_cam(case: Case, plus: bool) -> torch.Tensor:
    """Grad-CAM (or ++): one forward with a hook on the layer, one backward to it."""
    store: dict[str, torch.Tensor] = {}
    handle = case.layer.register_forward_hook(lambda _m, _i, out: store.__setitem__("a", out))
    try:
        logits = case.model(case.x)
    finally:
        handle.remove()
    act = store["a"]
    (g,) = torch.autograd.grad(logits.gather(1, case.target[:, None]).sum(), act)
    act = act.detach()
    if plus:  # Chattopadhay et al. 2018, Eq. 19 with the exponential score
        g2 = g * g
        denom = 2 * g2 + act.sum((2, 3), keepdim=True) * g2 * g
        alpha = torch.where(denom != 0, g2 / torch.where(denom != 0, denom, 1.0), 0.0)
        w = (alpha * g.clamp_min(0)).sum((2, 3))
    else:
        w = g.mean((2, 3))
    cam = torch.einsum("bc,bchw->bhw", w, act).clamp_min(0)[:, None]
    return F.interpolate(cam, size=case.x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


def minimal_ig(case: Case, steps: int, chunk: int) -> torch.Tensor:
    """Integrated Gradients, zero baseline, Gauss-Legendre nodes, ``chunk`` images a pass."""
    import numpy as np

    nodes, weights = np.polynomial.legendre.leggauss(steps)
    alphas, weights = torch.tensor((nodes + 1) / 2), torch.tensor(weights / 2)
    x, t = case.x, case.target
    img = torch.arange(len(x)).repeat_interleave(steps)
    st = torch.arange(steps).repeat(len(x))
    total = torch.zeros_like(x)
    for i in range(0, len(img), chunk):
        im, s = img[i:i + chunk], st[i:i + chunk]
        xi = (alphas[s].view(-1, 1, 1, 1).float() * x[im]).requires_grad_(True)
        (g,) = torch.autograd.grad(case.model(xi).gather(1, t[im, None]).sum(), xi)
        total.index_add_(0, im, g * weights[s].view(-1, 1, 1, 1).float())
    return (total * x).sum(1)


# -- peers -----------------------------------------------------------------------------

def pgc_call(cls_name: str, case: Case, layers: list[nn.Module]) -> torch.Tensor:
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    targets = [ClassifierOutputTarget(int(c)) for c in case.target]
    with getattr(pytorch_grad_cam, cls_name)(model=case.model, target_layers=layers) as cam:
        return torch.from_numpy(cam(input_tensor=case.x, targets=targets))


def captum_gradcam(case: Case) -> torch.Tensor:
    from captum.attr import LayerAttribution, LayerGradCam

    attr = LayerGradCam(case.model, case.layer).attribute(case.x, target=case.target,
                                                          relu_attributions=True)
    return LayerAttribution.interpolate(attr, case.x.shape[-2:], "bilinear")[:, 0]


def captum_ig(case: Case, steps: int, chunk: int) -> torch.Tensor:
    from captum.attr import IntegratedGradients

    attr = IntegratedGradients(case.model).attribute(
        case.x, baselines=0.0, target=case.target, n_steps=steps, method="gausslegendre",
        internal_batch_size=chunk)
    return attr.sum(1)


def zennit_lrp(case: Case, stack: contextlib.ExitStack) -> Maps:
    """Enter zennit's attributor once (hooks and canonizers stay on its own model copy)."""
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonPlus
    from zennit.rules import ZPlus
    from zennit.types import Convolution

    if case.twin is not None:
        from zennit.torchvision import ResNetCanonizer

        model, canonizers = case.twin, [ResNetCanonizer()]
    else:
        model, canonizers = copy.deepcopy(case.model), []
        for m in model.modules():  # zennit's hooks reject in-place ops on hooked outputs
            if isinstance(m, nn.ReLU):
                m.inplace = False
    # cnnkit's conventions (see the module docstring): z+ without biases, R = logit
    composite = EpsilonPlus(canonizers=canonizers,
                            layer_map=[(Convolution, ZPlus(zero_params=["bias"]))])
    attributor = stack.enter_context(Gradient(model=model, composite=composite))
    n = case.model.get_classifier().out_features
    one_hot = F.one_hot(case.target, n).float()
    return lambda: attributor(case.x, lambda out: out * one_hot)[1].sum(1)


# -- the benchmark ---------------------------------------------------------------------

def implementations(method: str, case: Case, args: argparse.Namespace,
                    stack: contextlib.ExitStack, notes: list[str]) -> dict[str, Maps]:
    """Callables returning ``[B, H, W]`` maps, cnnkit first; missing peers are noted."""
    options = {"integrated_gradients": {"steps": args.ig_steps, "method": "gausslegendre",
                                        "internal_batch_size": args.ig_chunk}}.get(method, {})
    explainer = cnnkit.explain.create(method, case.model, **options)
    impls: dict[str, Maps] = {"cnnkit": lambda: explainer(case.x, case.target)}
    pgc, captum, zennit = has("pytorch_grad_cam"), has("captum"), has("zennit")
    if method in ("gradcam", "gradcam++"):
        impls["minimal"] = lambda: minimal_cam(case, plus=method == "gradcam++")
        if pgc:
            cls = "GradCAM" if method == "gradcam" else "GradCAMPlusPlus"
            impls["pytorch-grad-cam"] = lambda: pgc_call(cls, case, [case.layer])
        if captum and method == "gradcam":
            impls["captum"] = lambda: captum_gradcam(case)
    elif method == "fullgrad" and pgc:
        impls["pytorch-grad-cam"] = lambda: pgc_call("FullGrad", case, [])
    elif method == "integrated_gradients":
        impls["minimal"] = lambda: minimal_ig(case, args.ig_steps, args.ig_chunk)
        if captum:
            impls["captum"] = lambda: captum_ig(case, args.ig_steps, args.ig_chunk)
    elif method == "lrp" and zennit:
        if case.twin is None and case.name.startswith("resnet"):
            notes.append(f"{case.name} lrp: zennit skipped (needs torchvision for its "
                         "ResNet canonizer)")
        else:
            impls["zennit"] = zennit_lrp(case, stack)
    return impls


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over images of the Pearson correlation of the flattened maps; two constant maps
    (e.g. all zero after Grad-CAM's ReLU) count as agreeing, one constant map as r = 0."""
    a, b = a.detach().double().flatten(1), b.detach().double().flatten(1)
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    na, nb = a.norm(dim=1), b.norm(dim=1)
    flat_a = na <= 1e-12 * a.shape[1]
    flat_b = nb <= 1e-12 * b.shape[1]
    r = (a * b).sum(1) / (na * nb).clamp_min(1e-300)
    r = torch.where(flat_a | flat_b, (flat_a & flat_b).double(), r)
    return float(r.mean())


def run_method(method: str, case: Case, args: argparse.Namespace,
               notes: list[str]) -> list[Row]:
    with contextlib.ExitStack() as stack:
        impls = implementations(method, case, args, stack, notes)
        rows = {name: Row(case.name, method, name, batch=len(case.x)) for name in impls}
        ref = None
        for name, fn in impls.items():  # warm-up call; its maps are the agreement check
            maps = fn()
            if tuple(maps.shape) != (len(case.x), *case.x.shape[-2:]):
                raise RuntimeError(f"{name} {method} returned maps of shape {tuple(maps.shape)}")
            ref = maps if ref is None else ref
            rows[name].corr = correlation(ref, maps)
        for _ in range(args.repeats):  # round-robin: load drift hits every side alike
            for name, fn in impls.items():
                t0 = time.perf_counter()
                fn()
                rows[name].times.append(time.perf_counter() - t0)
        print(f"  {case.name} {method}: " + ", ".join(
            f"{r.impl} {r.maps_per_s:.1f} maps/s" for r in rows.values()), file=sys.stderr)
    return list(rows.values())


def table(rows: list[Row]) -> str:
    out = ["| model | method | implementation | s / batch | maps/s | cnnkit speed-up "
           "| agreement r |", "|---|---|---|---:|---:|---:|---:|"]
    cn = {(r.case, r.method): r for r in rows if r.impl == "cnnkit"}
    for r in rows:
        c = cn[(r.case, r.method)]
        up = "1 (ref)" if r is c else f"{r.median / c.median:.2f}x"
        corr = "" if r is c else f"{r.corr:.4f}"
        out.append(f"| {r.case} | {r.method} | {r.impl} | {r.median:.3f} | "
                   f"{r.maps_per_s:,.1f} | {up} | {corr} |")
    return "\n".join(out)


def goals(rows: list[Row]) -> list[str]:
    """Each goal of the issue, met or missed, per model."""
    lines = []
    cn = {(r.case, r.method): r for r in rows if r.impl == "cnnkit"}
    for r in rows:
        c = cn[(r.case, r.method)]
        key = (r.method, r.impl)
        if key in GOALS:
            up = r.median / c.median
            ok = "met" if up >= GOALS[key] else "**missed**"
            lines.append(f"{r.case}, {r.method}: {up:.2f}x {r.impl} (goal >= "
                         f"{GOALS[key]:g}x): {ok}")
        if r.method == "gradcam" and r.impl == "minimal":
            slow = c.median / r.median
            ok = "met" if slow <= MINIMAL_SLACK else "**missed**"
            lines.append(f"{r.case}, gradcam: cnnkit takes {slow:.2f}x the minimal's time "
                         f"(goal <= {MINIMAL_SLACK}x): {ok}")
    return lines


def machine() -> str:
    cpu = machine_info()["cpu"]
    from importlib.metadata import PackageNotFoundError, version

    versions = []
    for dist, module in (("grad-cam", "pytorch_grad_cam"), ("captum", "captum"),
                         ("zennit", "zennit")):
        with contextlib.suppress(PackageNotFoundError):
            if has(module):
                versions.append(f"{dist} {version(dist)}")
    return (f"{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__} with "
            f"{torch.get_num_threads()} intra-op thread(s), Python {platform.python_version()}"
            + (f"; peers: {', '.join(versions)}" if versions else "; no peer installed"))


def section(rows: list[Row], notes: list[str], command: str, args: argparse.Namespace,
            load_before: str, load_after: str, minutes: float) -> str:
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    goal_text = "\n".join(f"- {g}" for g in goals(rows)) or "- (no peer or minimal to compare)"
    note_text = "".join(f"- {n}\n" for n in notes)
    note_text = "\nNotes:\n\n" + note_text if note_text else ""
    return f"""{SECTION}

`bench/explain_throughput.py` explains one batch of 16 images (one fixed target class
per image) with each implementation of a method, in one process on one torch: cnnkit's
`cnnkit.explain.create(name, model)(x, target)`, a minimal hand-written PyTorch version
where one is given (Grad-CAM/Grad-CAM++: one forward, one backward to the layer, the
practical limit; Integrated Gradients: a plain loop over chunks), and pytorch-grad-cam,
Captum and zennit where installed, each on its documented default path (see the
script's docstring). Models have random weights from a fixed seed, in eval mode.
After one warm-up call each, whose maps are checked against cnnkit's (**agreement r**:
mean per-image Pearson correlation, blind to per-image normalisation), the
implementations run round-robin, {args.repeats} calls each; the median time per batch
gives maps/s. **cnnkit speed-up** is the peer's median time over cnnkit's (above 1:
cnnkit is faster). Integrated Gradients: {args.ig_steps} Gauss-Legendre steps, zero
baseline, {args.ig_chunk} images per pass on every side. LRP: cnnkit's default
composite (z+ on convolutions, epsilon on dense layers) against zennit's `EpsilonPlus`
with relevance started from the target logit and z+ without biases (cnnkit's
conventions; zennit's defaults, a bare one-hot start and `b+` in the z+ denominator,
are `zplus_bias=True` in cnnkit and a per-image scale), so the maps should agree.

Measured {date}, in {minutes:.1f} minutes, on:
{machine()}.
Load average (1/5/15 min): {load_before} before, {load_after} after.

```bash
{command}
```

{table(rows)}

Goals of the issue:

{goal_text}
{note_text}"""


def write_docs(text: str, path: Path = DOCS) -> None:
    """Replace the section (up to the next ``## `` heading) or append it; keep the rest."""
    old = path.read_text()
    start = old.find(SECTION + "\n")
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = old.find("\n## ", start + len(SECTION))
        rest = "" if end < 0 else old[end + 1:]
        new = old[:start] + text + ("\n" + rest if rest else "")
    path.write_text(new)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tinyvgg 64x64 only")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per implementation")
    parser.add_argument("--ig-steps", type=int, default=16, help="Integrated Gradients steps")
    parser.add_argument("--ig-chunk", type=int, default=16,
                        help="Integrated Gradients images per forward/backward")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's)")
    parser.add_argument("--write-docs", action="store_true",
                        help=f"write the table into {DOCS.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.ig_steps < 2 or args.ig_chunk < 1:
        parser.error("need --repeats >= 1, --ig-steps >= 2 and --ig-chunk >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    command = " ".join(["python bench/explain_throughput.py",
                        *(sys.argv[1:] if argv is None else argv)])

    methods = ["gradcam", "gradcam++", "fullgrad", "lrp", "integrated_gradients"]
    notes: list[str] = []
    if "lrp" not in cnnkit.explain.list_methods():
        methods.remove("lrp")
        notes.append("lrp skipped: no explainer registered under 'lrp' in this cnnkit")
    for peer, module in (("pytorch-grad-cam", "pytorch_grad_cam"), ("Captum", "captum"),
                         ("zennit", "zennit")):
        if not has(module):
            notes.append(f"{peer} skipped: not importable here")
    for n in notes:
        print("note:", n, file=sys.stderr)

    load_before, t0 = load_average(), time.perf_counter()
    rows: list[Row] = []
    for name in ["tinyvgg"] if args.quick else ["tinyvgg", "resnet18"]:
        case = make_case(name)
        for method in methods:
            rows += run_method(method, case, args, notes)
    minutes, load_after = (time.perf_counter() - t0) / 60, load_average()

    print(f"\n{machine()}\nload average {load_before} before, {load_after} after "
          f"({minutes:.1f} min)\n{command}\n\n{table(rows)}\n")
    notes += [f"{r.case} {r.method}: {r.impl}'s maps disagree with cnnkit's (r = {r.corr:.4f} "
              "< 0.99)" for r in rows
              if r.impl != "cnnkit" and r.corr is not None and r.corr < 0.99]
    for line in goals(rows) + [f"note: {n}" for n in notes]:
        print(line)
    if args.write_docs:
        write_docs(section(rows, notes, command, args, load_before, load_after, minutes))
        print(f"wrote {DOCS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
