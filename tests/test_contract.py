"""The contract of every registered task in 1, 2 and 3 spatial dims (issue 13, point 9).

Parametrised over the registries, so that the next task, model family or modality is
tested here by being registered: every task of :func:`cnnkit.tasks.list_tasks`, times 1,
2 and 3 spatial dims, times a representative model picked from the model registry (of
the models the task trains, the one with the fewest parameters that builds at the case's
size, made tiny through the builder's own width options). A (task, dims) pair without a
model fails :func:`test_every_task_has_a_model_in_every_dims` unless :data:`NO_MODEL`
accepts it with its reason; its cases are then skipped with that reason.

Each case trains on synthetic :class:`~cnnkit.data.Samples` made here, with a signal a
network learns in a few steps (what the task's ``data_targets`` says the data must hold):
a class is whether a bright box is present, a mask is the thresholded input, a value is
the mean intensity, and super-resolution's targets are the smooth inputs themselves. The
invariants:

1. the model maps ``[B, C, *spatial]`` to what its task's ``output_kind`` says;
2. a short :class:`~cnnkit.training.Trainer` run on a data set registered for the test
   writes a run folder and moves the headline metric (or at least the loss) in the
   task's direction on the training data;
3. :func:`cnnkit.load_run` gives back the same outputs;
4. explanations of the task's default target are maps ``[B, *spatial]``, and saliency is
   the autograd gradient of that target (a task that explains nothing refuses in one line);
5. the summary counts positive MACs (each convolution's by its formula) and receptive
   fields with one entry per spatial axis;
6. structured pruning keeps the output shape, ONNX matches PyTorch, and int8 runs or
   refuses in one line naming an operator the registry says the engine cannot run.

5 and 6 are facts of a network, so they run once per distinct (model, dims) of the matrix
(:data:`NETWORKS`): regression trains the classifiers and adds no network of its own.
The whole module takes about 100 s on a 2-core CPU (most of it the ten short runs).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import itertools
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cnnkit
from cnnkit.analysis import summary
from cnnkit.compress import export, prune, quantize
from cnnkit.data import Samples, TensorLoader, register_dataset
from cnnkit.data import _registry as data_registry
from cnnkit.layers.nd import interp_mode
from cnnkit.layers.ops import find_function, find_module, registered_ops
from cnnkit.models import create_model, list_models, model_info
from cnnkit.run import RunPaths, TrainConfig
from cnnkit.tasks import Task, create_task, list_tasks
from cnnkit.training import Trainer

DIMS = (1, 2, 3)
SIZES = {1: (16,), 2: (16, 16), 3: (8, 8, 8)}
CHANNELS = 1
SAMPLES = 32
SCALE = 2  # super-resolution: 16 and 8 are multiples of it
EPOCHS = 2
BATCH = 4  # 6 steps an epoch
# The learning rate of a task without one of its own (classification's scales with the
# batch, too small for a dozen steps of SGD); the task's optimizer and lr otherwise.
SGD_LR = 0.05
# The builders' own options that make a network narrow and shallow: of those a builder
# has, the first value of each that it accepts (a Wide ResNet's depth is 6n + 4).
TINY = {"width": (4,), "width_mult": (0.25,), "widen_factor": (1,), "depth": (2, 10)}
# (task, dims) pairs the issue accepts without a model, with the reason.
NO_MODEL = {
    ("superres", 1): "super-resolution is 2D only: ESPCN's sub-pixel shuffle and the bicubic "
                     "degradation (cnnkit.data.downscale) are defined for images",
    ("superres", 3): "super-resolution is 2D only: ESPCN's sub-pixel shuffle and the bicubic "
                     "degradation (cnnkit.data.downscale) are defined for images",
}
EXPLAINERS = ("saliency", "gradcam", "occlusion")

# SegNet's max-unpooling under the Trainer's deterministic mode (warn_only): not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:max_unpooling.*deterministic:UserWarning")


# --- synthetic data: a learnable signal per kind of target ----------------------------------

def smooth(n: int, dims: int, g: torch.Generator) -> torch.Tensor:
    """``[n, C, *spatial]`` in [0, 1] with structures a few pixels wide."""
    size = SIZES[dims]
    coarse = torch.rand(n, CHANNELS, *(max(2, s // 4) for s in size), generator=g)
    return F.interpolate(coarse, size=size, mode=interp_mode(dims), align_corners=False)


def with_labels(dims: int, g: torch.Generator) -> Samples:
    """Class 1 holds a bright box of half the size somewhere; class 0 is noise only."""
    labels = torch.arange(SAMPLES) % 2
    x = 0.3 * torch.rand(SAMPLES, CHANNELS, *SIZES[dims], generator=g)
    for i in labels.nonzero()[:, 0].tolist():
        box = tuple(slice(o, o + s // 2) for s, o in
                    zip(SIZES[dims], torch.randint(0, 5, (dims,), generator=g).tolist(),
                        strict=True))
        x[(i, slice(None), *box)] += 0.6
    return Samples(x.clamp(0, 1), labels, ["noise", "box"], "contract")


def with_masks(dims: int, g: torch.Generator) -> Samples:
    """The mask is the thresholded input."""
    x = smooth(SAMPLES, dims, g)
    masks = (x[:, 0] > 0.5).to(torch.uint8)
    return Samples(x, torch.zeros(SAMPLES), [], "contract", masks=masks,
                   mask_classes=["background", "bright"])


def with_images(dims: int, g: torch.Generator) -> Samples:
    """Smooth inputs, which are their own targets (super-resolution)."""
    return Samples(smooth(SAMPLES, dims, g), torch.zeros(SAMPLES), ["image"], "contract")


def with_values(dims: int, g: torch.Generator) -> Samples:
    """The value is the mean intensity."""
    x = smooth(SAMPLES, dims, g) * torch.empty(SAMPLES, 1, *[1] * dims).uniform_(0.2, 1,
                                                                               generator=g)
    return Samples(x, torch.zeros(SAMPLES), ["mean"], "contract",
                   values=x.flatten(1).mean(1, keepdim=True))


DATA: dict[str, Callable[[int, torch.Generator], Samples]] = {
    "labels": with_labels, "masks": with_masks, "images": with_images, "values": with_values}


def make_data(task: str, dims: int) -> Samples:
    targets = create_task(task).data_targets
    if targets not in DATA:
        pytest.fail(f"task {task!r} reads data_targets={targets!r}, for which this module "
                    f"makes no synthetic data; add a generator to DATA ({', '.join(DATA)})")
    return DATA[targets](dims, torch.Generator().manual_seed(dims))


# --- the matrix: task x dims x a representative model from the registry ---------------------

def task_of(name: str) -> Task:
    return create_task(name, TrainConfig(task=name, data="contract", scale=SCALE))


@contextlib.contextmanager
def shapes_only() -> Iterator[None]:
    """Build on the meta device without running initialisers (5x faster: the values are
    never read, only the parameters' shapes)."""
    with torch.device("meta"), pytest.MonkeyPatch.context() as mp:
        for name in dir(nn.init):
            if name.endswith("_") and not name.startswith("_"):
                mp.setattr(nn.init, name, lambda t, *args, **kwargs: t)
        yield


@functools.cache
def smallest_build(model: str, kwargs: tuple[tuple[str, Any], ...],
                   ) -> tuple[int, dict[str, Any]] | None:
    """``(parameters, tiny options)`` of ``model`` built with ``kwargs`` and the first
    :data:`TINY` options it accepts; None where it refuses these dims or sizes (its
    builder raises a ValueError)."""
    params = inspect.signature(model_info(model).builder).parameters
    keys = [k for k in TINY if k in params]
    for values in itertools.product(*(TINY[k] for k in keys)):
        options = dict(zip(keys, values, strict=True))
        try:
            with shapes_only():
                net = create_model(model, **dict(kwargs), **options)
        except ValueError:
            continue
        return sum(p.numel() for p in net.parameters()), options
    return None


@dataclass(frozen=True)
class Case:
    task: str
    dims: int
    model: str | None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.task}-{self.dims}d-{self.model or 'none'}"


def representative(task: str, dims: int) -> Case:
    kwargs = task_of(task).model_kwargs(make_data(task, dims))
    if "num_classes" in kwargs:  # ranked with two outputs: tasks that share models share it
        kwargs["num_classes"] = 2
    key = tuple(sorted(kwargs.items()))
    built = [(found, m) for m in list_models(task=task_of(task).models)
             if (found := smallest_build(m, key)) is not None]
    if not built:
        return Case(task, dims, None)
    (_, options), model = min(built, key=lambda b: (b[0][0], b[1]))
    return Case(task, dims, model, options)


CASES = [representative(task, dims) for task in list_tasks() for dims in DIMS]
# The model-level checks (summary, compression) once per network in its dims: a task
# that trains another task's models (regression, the classifiers) adds no new network.
NETWORKS = list({(c.model, c.dims): c for c in CASES[::-1] if c.model is not None}.values())[::-1]


def test_every_task_has_a_model_in_every_dims():
    gaps = {(c.task, c.dims) for c in CASES if c.model is None}
    assert gaps - set(NO_MODEL) == set(), (
        f"no registered model builds for {sorted(gaps - set(NO_MODEL))}; register one, or "
        "accept the gap in NO_MODEL with the issue's reason")
    assert set(NO_MODEL) - gaps == set(), (
        f"{sorted(set(NO_MODEL) - gaps)} have a model now: drop them from NO_MODEL")


@pytest.fixture(scope="module", params=CASES, ids=[c.id for c in CASES])
def case(request) -> Case:
    c = request.param
    if c.model is None:
        if (c.task, c.dims) in NO_MODEL:
            pytest.skip(NO_MODEL[c.task, c.dims])
        pytest.fail(f"no registered {task_of(c.task).models} model builds in {c.dims}D")
    return c


@pytest.fixture(params=NETWORKS, ids=[f"{c.model}-{c.dims}d" for c in NETWORKS])
def network(request) -> Case:
    return request.param


# --- helpers ------------------------------------------------------------------------------

def build(c: Case, data: Samples) -> nn.Module:
    torch.manual_seed(0)
    return create_model(c.model, **task_of(c.task).model_kwargs(data), **c.options).eval()


def model_size(model: nn.Module, dims: int) -> tuple[int, ...]:
    """The case's spatial size rounded up to what the model takes (a dense model's stride)."""
    m = getattr(model, "size_multiple", 1)
    return tuple(-(-s // m) * m for s in SIZES[dims])


def expected_shape(task: Task, data: Samples, batch: int, spatial: tuple[int, ...]) -> tuple:
    outputs = len(task.classes(data))
    kind = task.output_kind
    if kind in ("probabilities", "values"):
        return (batch, outputs)
    if kind == "mask":
        return (batch, outputs, *spatial)
    if kind == "image":
        return (batch, CHANNELS, *(s * SCALE for s in spatial))
    pytest.fail(f"task {task.name!r} has output_kind {kind!r}, which this module does not "
                "know; say here what shape it means")


@contextlib.contextmanager
def registered(name: str, data: Samples, holds: tuple[str, ...]) -> Iterator[str]:
    """``data`` as the built-in data set ``name`` inside the block; the registry is as it
    was after it (cnnkit.data has no public way to unregister a data set)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data_registry, "_DATASETS", dict(data_registry._DATASETS))
        mp.setattr(data_registry, "_HOLDS", dict(data_registry._HOLDS))

        def builtin(image_size=None, channels=None, seed=0) -> Samples:
            return data

        builtin.__name__ = name
        register_dataset(builtin, targets=holds)
        yield name
    assert name not in cnnkit.list_datasets()


# --- 1. output shapes -----------------------------------------------------------------------

def test_output_shape(case):
    task, data = task_of(case.task), make_data(case.task, case.dims)
    model = build(case, data)
    spatial = model_size(model, case.dims)
    with torch.no_grad():
        out = model(torch.rand(3, CHANNELS, *spatial))
    assert out.shape == expected_shape(task, data, 3, spatial)
    assert torch.isfinite(out).all()


# --- 2. training ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(case, tmp_path_factory) -> SimpleNamespace:
    """A short run on the case's data: the trainer, the run folder and the metrics of the
    untrained and trained model on the training split."""
    task, data = task_of(case.task), make_data(case.task, case.dims)
    name = f"contract_{case.task}_{case.dims}d"
    holds = tuple(dict.fromkeys(("labels", task.data_targets)))
    with registered(name, data, holds):
        cfg = TrainConfig(task=case.task, model=case.model, model_kwargs=dict(case.options),
                          data=name, epochs=EPOCHS, batch_size=BATCH,
                          optimizer=task.defaults.optimizer, lr=task.defaults.lr or SGD_LR,
                          schedule="constant", warmup_epochs=0, augment="none", amp="off",
                          device="cpu", scale=SCALE, name="run",
                          runs_dir=str(tmp_path_factory.mktemp(case.id)))
        trainer = Trainer(cfg, progress=False)
        shaped = trainer.task.prepare(trainer.data, getattr(trainer.model, "size_multiple", 1))
        idx = trainer.split[0]
        loader = TensorLoader(shaped.images[idx], trainer.task.targets(shaped)[idx], 16,
                              mean=trainer.preprocess.mean, std=trainer.preprocess.std,
                              **trainer.task.loader_kwargs())
        before = trainer.task.evaluate(trainer.model, loader, trainer.device)
        result = trainer.fit()
        after = trainer.task.evaluate(trainer.model, loader, trainer.device)
    x = next(iter(loader))[0][:4]
    return SimpleNamespace(trainer=trainer, task=trainer.task, summary=result, before=before,
                           after=after, path=trainer.paths.root, x=x, data=data)


def test_training_writes_a_run_and_learns(case, trained):
    paths, task = RunPaths(trained.path), trained.task
    for f in (paths.config, paths.weights, paths.last, paths.metrics, paths.summary):
        assert f.is_file(), f
    history = [json.loads(line) for line in paths.metrics.read_text().splitlines()]
    assert [m["epoch"] for m in history] == list(range(1, EPOCHS + 1))
    assert all(math.isfinite(m["train_loss"]) and math.isfinite(m[f"val_{task.metric}"])
               for m in history)
    written = json.loads(paths.summary.read_text())
    assert written["task"] == case.task and written["model"] == case.model
    assert written["input_size"] == [CHANNELS, *SIZES[case.dims]]
    first, last = trained.before[task.metric], trained.after[task.metric]
    moved = last > first if task.higher_is_better else last < first
    assert moved or trained.after["loss"] < trained.before["loss"], (
        f"{task.metric}: {first:.4g} -> {last:.4g}, loss {trained.before['loss']:.4g} -> "
        f"{trained.after['loss']:.4g}")


# --- 3. reloading ---------------------------------------------------------------------------

def test_load_run_gives_identical_outputs(case, trained):
    run = cnnkit.load_run(trained.path)
    assert run.config.model == case.model and run.config.task == case.task
    assert run.preprocess.task == case.task
    assert tuple(run.preprocess.input_size) == (CHANNELS, *SIZES[case.dims])
    model = trained.trainer.model.eval()
    with torch.no_grad():
        assert torch.equal(run.model(trained.x), model(trained.x))


# --- 4. explanations ------------------------------------------------------------------------

def test_explanations_of_the_default_target(case, trained):
    task, model, x = type(trained.task), trained.trainer.model.eval(), trained.x
    try:
        scorer = task.explainable(model)
    except ValueError as refusal:  # a task whose outputs are not scores explains nothing
        for method in EXPLAINERS:
            with pytest.raises(ValueError) as err:
                cnnkit.explain.create(method, model, task=case.task)
            assert str(err.value) == str(refusal) and "\n" not in str(err.value)
        return
    maps = {}
    for method in EXPLAINERS:
        half = [max(1, s // 2) for s in x.shape[2:]]  # 2 ** dims windows
        options = {"window": half, "stride": half} if method == "occlusion" else {}
        maps[method] = cnnkit.explain.create(method, model, task=case.task, **options)(x)
        assert maps[method].shape == (len(x), *x.shape[2:]), method
        assert torch.isfinite(maps[method]).all(), method
    # saliency is max_c |d score / d x| of the task's default target, by autograd
    target = task.predicted(scorer, x)
    xg = x.clone().requires_grad_(True)
    score = scorer(xg).gather(1, target[:, None]).sum()
    (grad,) = torch.autograd.grad(score, xg)
    torch.testing.assert_close(maps["saliency"], grad.abs().amax(1), rtol=1e-4, atol=1e-6)
    assert maps["saliency"].flatten(1).amax(1).gt(0).all()


# --- 5. summary -----------------------------------------------------------------------------

def per_axis(value: Any, dims: int) -> tuple:
    return value if isinstance(value, tuple) else (value,) * dims


def test_summary_macs_and_receptive_fields(network):
    data = make_data(network.task, network.dims)
    model = build(network, data)
    spatial = model_size(model, network.dims)
    s = summary(model, (CHANNELS, *spatial))
    assert s.total_macs > 0
    convs = dict((n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)
                 and not isinstance(m, nn.modules.conv._ConvTransposeNd))
    rows = [r for r in s.rows if r.name in convs]
    assert rows, "no convolution was called"
    for r in rows:  # MACs of a convolution: output elements x C_in / groups x prod(kernel)
        conv = convs[r.name]
        assert r.macs == math.prod(r.output_shape) * conv.in_channels // conv.groups * \
            math.prod(conv.kernel_size), r
    assert s.total_macs >= sum(r.macs for r in rows)
    for r in s.rows:
        if r.receptive_field is not None:
            assert len(per_axis(r.receptive_field, network.dims)) == network.dims, r
            assert len(per_axis(r.jump, network.dims)) == network.dims, r
    first = convs[rows[0].name]  # the first convolution sees its kernel, dilated
    assert per_axis(rows[0].receptive_field, network.dims) == tuple(
        (k - 1) * d + 1 for k, d in zip(first.kernel_size, first.dilation, strict=True))
    assert per_axis(rows[0].jump, network.dims) == first.stride
    assert len(per_axis(s.receptive_field, network.dims)) == network.dims


# --- 6. compression -------------------------------------------------------------------------

def test_structured_pruning_keeps_the_output_shape(network):
    data = make_data(network.task, network.dims)
    model = build(network, data)
    x = torch.rand(2, CHANNELS, *model_size(model, network.dims))
    small = prune(model, 0.5, example_inputs=x).eval()
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        out, ref = small(x), model(x)
    assert out.shape == ref.shape and torch.isfinite(out).all()


def test_onnx_export_matches_pytorch(network, tmp_path):
    missing = [m for m in ("onnx", "onnxscript", "onnxruntime")
               if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"ONNX export and its check need {', '.join(missing)} (cnnkit[export])")
    import onnxruntime as ort

    data = make_data(network.task, network.dims)
    model = build(network, data)
    x = torch.rand(2, CHANNELS, *model_size(model, network.dims))
    export(model, x, tmp_path / "model.onnx")
    session = ort.InferenceSession(str(tmp_path / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    check = torch.rand(3, *x.shape[1:])  # another batch size: the batch axis is dynamic
    (out,) = session.run(None, {session.get_inputs()[0].name: check.numpy()})
    with torch.no_grad():
        ref = model(check)
    torch.testing.assert_close(torch.from_numpy(out), ref, rtol=0, atol=1e-4)


def refused_operator(message: str) -> str:
    prefix = "int8 quantisation cannot run "
    assert message.startswith(prefix) and "\n" not in message, message
    return message[len(prefix):].split(" ")[0].rstrip(":")


def test_int8_runs_or_refuses_by_the_registry(network):
    data = make_data(network.task, network.dims)
    model = build(network, data)
    x = torch.rand(8, CHANNELS, *model_size(model, network.dims))
    try:
        qmodel = quantize(model, x, backend="x86")
    except ValueError as err:
        name = refused_operator(str(err))
        # the operator it names is one the model calls, and the registry says no to it
        modules = {type(m).__name__: find_module(m) for m in model.modules()}
        facts = modules.get(name) or registered_ops().get(name) or find_function(name)
        assert facts is not None, f"{name!r} is not an operator of the registry: {err}"
        assert facts.int8 is not True, f"the registry says the engine runs {name}: {err}"
        return
    with torch.no_grad():
        out, ref = qmodel(x), model(x)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    # int8 approximates the float model: a few percent here (an engine computing a layer
    # wrongly is off by ~100%)
    assert (out - ref).norm() <= 0.15 * ref.norm()
