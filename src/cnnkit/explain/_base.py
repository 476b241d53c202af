"""The explainer base class: model state, hooks, targets, batched backward, upsampling.

Each method is a small subclass that overrides one method, :meth:`Explainer.attribute`
(the pytorch-grad-cam design). The base class owns everything around it:

* inputs are ``[B, C, *spatial]`` with 1, 2 or 3 spatial dimensions (signals
  ``[B, C, L]``, images ``[B, C, H, W]``, volumes ``[B, C, D, H, W]``); methods reduce
  over ``range(2, x.ndim)`` and never assume 2D;
* the model's train/eval mode and ``requires_grad`` flags are saved, the model is put
  in eval mode for the call, and both are restored afterwards, even on error;
* hooks exist only inside :meth:`Explainer.capture` (a context manager) and are
  removed on exit; stored tensors are detached;
* targets are resolved once: ``None`` (the task's default: the predicted class), an
  int (that class for every input), ``[B]`` (one class per input), ``[B, K]`` (K
  classes per input), or a callable ``fn(output) -> [B]`` (any scalar per sample of the
  model's output: a class logit, a region's summed logits, a regression output), which
  the base turns into a one-output model (:class:`TargetScores`) so that every method
  explains it unchanged;
* :meth:`Explainer.grads` computes the gradients of all ``B x K`` target scores in one
  batched backward pass (``torch.autograd.grad(..., is_grads_batched=True)``), not K;
* maps are returned at input resolution: ``[B, *spatial]``, or ``[B, K, *spatial]``
  when the target was given as ``[B, K]``, upsampled by linear, bilinear or trilinear
  interpolation as the number of spatial dimensions says.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.layers.nd import interp_mode
from cnnkit.models._registry import suggest
from cnnkit.tasks import Task, task_class

from .checks import check_input, degenerate

__all__ = ["Explainer", "TargetScores", "register_method", "create", "list_methods",
           "method_class", "resolve_layer", "resolve_targets"]

# Filled by the package's __init__, which imports every built-in module and which Python
# runs to its end before code outside the package can call this module's functions.
_METHODS: dict[str, type[Explainer]] = {}


def register_method(name: str) -> Callable[[type[Explainer]], type[Explainer]]:
    """Class decorator registering an :class:`Explainer` subclass under ``name``.

    Raises:
        ValueError: if a method of that name is already registered.

    Example:
        >>> import torch
        >>> from cnnkit.explain import Explainer, create, register_method
        >>> from cnnkit.models import create_model
        >>> @register_method("input_energy")
        ... class InputEnergy(Explainer):
        ...     "The input's squared magnitude, the same for every target: a baseline."
        ...     def attribute(self, x, targets):  # maps [B, K, *spatial] for targets [B, K]
        ...         return (x ** 2).sum(1, keepdim=True).expand(-1, targets.shape[1], -1, -1)
        >>> model = create_model("tinyvgg", num_classes=3, img_size=8)
        >>> x = torch.rand(2, 3, 8, 8)
        >>> maps = create("input_energy", model)(x)
        >>> maps.shape, torch.allclose(maps, (x ** 2).sum(1))
        (torch.Size([2, 8, 8]), True)
    """

    def deco(cls: type[Explainer]) -> type[Explainer]:
        if name in _METHODS:
            raise ValueError(f"explanation method {name!r} is registered twice")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return deco


def list_methods() -> list[str]:
    """Names of the registered explanation methods, sorted.

    Example:
        >>> from cnnkit.explain import list_methods
        >>> list_methods()
        ['cam', 'deconvnet', 'fullgrad', 'gradcam', 'gradcam++', 'gradient_x_input',
         'guided_backprop', 'integrated_gradients', 'layercam', 'lrp', 'occlusion',
         'saliency', 'scorecam', 'smoothgrad', 'smoothgradcam++']
    """
    return sorted(_METHODS)


def method_class(name: str) -> type[Explainer]:
    """The registered :class:`Explainer` subclass of method ``name``.

    Raises:
        ValueError: unknown method (the nearest names are suggested).
    """
    if name not in _METHODS:
        raise ValueError(f"unknown explanation method {name!r}{suggest(name, list(_METHODS))} "
                         f"(choose from {', '.join(sorted(_METHODS))})")
    return _METHODS[name]


def create(name: str, model: nn.Module, layer: str | nn.Module | None = None, *,
           task: str | type[Task] | None = None, **options: Any) -> Explainer:
    """Create an explainer: ``cnnkit.explain.create("gradcam", model)(x, target)``.

    Args:
        name: a registered method (:func:`list_methods`).
        model: the model to explain.
        layer: the layer of layer methods (CAMs); the model's ``cam_layer`` when None.
        task: the task the model serves (a registry name or a task class), which says what
            ``target=None`` explains (a regression's first output rather than the top
            one); the model's own ``task`` attribute, or classification, when None.
        **options: the method's options.

    Raises:
        ValueError: unknown method (the nearest names are suggested).

    Example:
        >>> import torch
        >>> import cnnkit
        >>> _ = torch.manual_seed(0)  # the same untrained weights every time
        >>> model = cnnkit.create_model("tinyvgg", num_classes=10, in_chans=1, img_size=8)
        >>> x = torch.rand(2, 1, 8, 8)
        >>> gradcam = cnnkit.explain.create("gradcam", model)  # reads model.cam_layer
        >>> maps = gradcam(x, target=[3, 7])  # one map per input, for class 3 and class 7
        >>> maps.shape, bool(maps.min() >= 0), (maps.flatten(1).amax(1) > 0).tolist()
        (torch.Size([2, 8, 8]), True, [True, True])
        >>> cnnkit.explain.create("saliency", model)(x).shape  # target None: the top class
        torch.Size([2, 8, 8])
        >>> signals = cnnkit.create_model("resnet18", num_classes=2, input_size=(1, 32))
        >>> cnnkit.explain.create("saliency", signals)(torch.rand(4, 1, 32)).shape  # 1D
        torch.Size([4, 32])
    """
    explainer = method_class(name)(model, layer=layer, **options)
    if task is not None:
        explainer.set_task(task)
    return explainer


def resolve_layer(model: nn.Module, layer: str | nn.Module | None) -> nn.Module:
    """A module of ``model``: given, named, or the model's declared ``cam_layer``."""
    if isinstance(layer, nn.Module):
        return layer
    if layer is None:
        layer = getattr(model, "cam_layer", None)
        if layer is None:
            raise ValueError(f"{type(model).__name__} declares no cam_layer; pass layer= with "
                             "a module or its name (see model.named_modules())")
    try:
        return model.get_submodule(layer)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        raise ValueError(f"the model has no layer {layer!r}{suggest(layer, names)}") from None


def resolve_targets(target: Any, logits: torch.Tensor | None = None, *, batch: int | None = None,
                    num_classes: int | None = None, device: Any = None,
                    ) -> tuple[torch.Tensor, bool]:
    """Targets as ``[B, K]`` long, and whether the caller asked for K maps per image.

    ``logits`` are needed only for ``target=None`` (the predicted class); given targets
    are checked against ``batch`` and ``num_classes`` (taken from ``logits`` if given).
    """
    if logits is not None:
        batch, num_classes = logits.shape
        device = logits.device
    if target is None:
        if logits is None:
            raise ValueError("target=None needs the logits to pick the predicted class")
        t, multi = logits.argmax(1, keepdim=True), False
    else:
        b = batch
        t = torch.as_tensor(target, device=device).long()
        multi = t.ndim == 2
        if t.ndim == 0:
            t = t.expand(b)
        if t.ndim == 1:
            if len(t) != b:
                raise ValueError(f"target has {len(t)} entries for {b} images; give one class "
                                 "per image, an int, or [B, K] classes")
            t = t[:, None]
        if t.ndim != 2 or t.shape[0] != b:
            raise ValueError(f"target of shape {tuple(t.shape)} does not fit a batch of {b}")
    if num_classes is not None and t.numel() and (t.min() < 0 or t.max() >= num_classes):
        raise ValueError(f"target classes must be in 0..{num_classes - 1}, got {t.tolist()}")
    return t, multi


class TargetScores(nn.Module):
    """A model seen through a target function: ``fn(model(x))[:, None]``, one score per
    sample, so that an explainer given ``target=fn`` explains output 0 of this module.

    ``fn`` receives the model's own output (class logits ``[B, K]``, a segmentation's
    logits ``[B, K, *spatial]``, regression values ``[B, K]``) and must return ``[B]``,
    treating each sample on its own: methods also call it on batches of perturbed copies
    of one input (SmoothGrad's noisy, Integrated Gradients' interpolated, occluded or
    masked inputs). A region fixed for the batch is fine; for a region per input, explain
    one input at a time.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from cnnkit.explain._base import TargetScores
        >>> scores = TargetScores(nn.Linear(3, 2), lambda y: y[:, 1] - y[:, 0])
        >>> scores(torch.rand(5, 3)).shape
        torch.Size([5, 1])
    """

    def __init__(self, model: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.score(self.model(x))[:, None]

    def score(self, output: torch.Tensor) -> torch.Tensor:
        """``fn(output)``, checked to be ``[B]``."""
        score = self.fn(output)
        n = output.shape[0]
        if not isinstance(score, torch.Tensor) or score.shape != (n,):
            got = tuple(score.shape) if isinstance(score, torch.Tensor) else type(score).__name__
            raise ValueError(f"a target function must return one score per sample, shape "
                             f"[{n}], got {got}; e.g. target=lambda y: y[:, 0]")
        return score


def explained_task(model: nn.Module) -> type[Task]:
    """The task of a model (its ``task`` attribute; classification by default), which says
    what of the model an explanation explains (:meth:`cnnkit.tasks.Task.explainable`)."""
    return task_class(getattr(model, "task", "classify"))


class Explainer:
    """Base of every explanation method; subclasses override :meth:`attribute`.

    Args:
        model: any classifier ``[B, C, *spatial] -> [B, num_classes]`` (1, 2 or 3
            spatial dimensions), or a model of another task, seen as scores per class
            by its task
            (:meth:`cnnkit.tasks.Task.explainable`: a segmentation's class ``c`` summed
            over the pixels predicted as ``c``, ``target=None`` the class covering most
            pixels, background last).
        layer: the layer CAM-style methods read (a module or its name); the model's
            ``cam_layer`` when None. Input-gradient methods ignore it.
    """

    name: str = ""
    uses_layer: bool = False

    def __init__(self, model: nn.Module, layer: str | nn.Module | None = None) -> None:
        self.layer = resolve_layer(model, layer) if self.uses_layer else None
        self.network = model
        self.set_task(explained_task(model))

    def set_task(self, task: str | type[Task]) -> None:
        """Explain the model as a model of ``task`` (a registry name or a task class):
        ``self.model`` becomes the task's scores (:meth:`cnnkit.tasks.Task.explainable`)."""
        self.task = task_class(task) if isinstance(task, str) else task
        self.model = self.task.explainable(self.network)

    # -- the one method a subclass overrides ------------------------------------------

    def attribute(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Maps ``[B, K, *s]`` (any resolution ``s`` of x's spatial dims) for ``targets``
        ``[B, K]`` of ``self.model``'s scores."""
        raise NotImplementedError

    # -- the public call ------------------------------------------------------------

    def __call__(self, x: torch.Tensor, target: Any = None) -> torch.Tensor:
        """Maps ``[B, *spatial]`` of inputs ``x`` ``[B, C, *spatial]`` (``[B, K, *spatial]``
        for ``[B, K]`` targets); ``target`` as in the module docstring."""
        check_input(x)
        with self.scoring(target) as scored, self.model_state():
            if scored:  # a target function: output 0 of TargetScores
                targets = torch.zeros((x.shape[0], 1), dtype=torch.long, device=x.device)
                multi = False
            elif target is None:  # the task's default costs one extra forward pass
                targets, multi = self.task.predicted(self.model, x)[:, None], False
            else:  # given targets cost nothing: checked against the model's class count
                targets, multi = resolve_targets(
                    target, batch=x.shape[0], device=x.device,
                    num_classes=getattr(self.model, "num_classes", None))
            maps = self.attribute(x.detach(), targets)
        maps = self.upsample(maps.detach(), x.shape[2:])
        self.warn_degenerate(maps, x)
        return maps if multi else maps[:, 0]

    def warn_degenerate(self, maps: torch.Tensor, x: torch.Tensor) -> None:
        """One warning line when a map of ``maps`` ``[B, K, *spatial]`` is constant, all
        zero or not finite: it shows nothing, and :meth:`hint` says what to change."""
        kind = degenerate(maps.flatten(0, 1))
        if kind is None:
            return
        n = int(sum(degenerate(m[None]) is not None for m in maps.flatten(0, 1)))
        warnings.warn(f"{self.name}: {n} of {maps.shape[0] * maps.shape[1]} maps are {kind}, "
                      f"so they show nothing; {self.hint(x, kind)}", UserWarning, stacklevel=3)

    def hint(self, x: torch.Tensor, kind: str) -> str:
        """The likely fix of a degenerate map of input ``x`` (a method knowing its cause
        overrides this)."""
        if kind == "NaN or inf":
            return ("the model's output or gradients overflow on this input; check the input's "
                    "scale, or try another method")
        where = " or another --layer" if self.uses_layer else ""
        return (f"the target score does not vary with the input here (saturated or dead units); "
                f"try another method, --target{where}")

    def __enter__(self) -> Explainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release what the explainer holds (hooks are never left registered)."""

    # -- tools for subclasses -------------------------------------------------------

    @contextlib.contextmanager
    def scoring(self, target: Any) -> Iterator[bool]:
        """For a callable ``target``, ``self.model`` is :class:`TargetScores` of the
        model inside the block (yields True); otherwise the block runs as it is."""
        if not callable(target):
            yield False
            return
        scores = self.model
        self.model = TargetScores(self.network, target)
        try:
            yield True
        finally:
            self.model = scores

    @contextlib.contextmanager
    def model_state(self) -> Iterator[None]:
        """Eval mode and gradients on for the call; the caller's flags restored after."""
        model = self.model
        modes = {m: m.training for m in model.modules()}
        flags = {p: p.requires_grad for p in model.parameters()}
        try:
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)  # gradients w.r.t. inputs/activations only
            yield
        finally:
            for m, mode in modes.items():
                m.train(mode)
            for p, flag in flags.items():
                p.requires_grad_(flag)

    @contextlib.contextmanager
    def capture(self, layer: nn.Module | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Record ``layer``'s output during forwards inside the block (not detached: the
        graph is needed for gradients); the hook is removed on exit."""
        layer = layer or self.layer
        store: dict[str, torch.Tensor] = {}

        def hook(_m: nn.Module, _i: Any, out: torch.Tensor) -> None:
            store["activation"] = out[0] if isinstance(out, tuple) else out

        handle = layer.register_forward_hook(hook)
        try:
            yield store
        finally:
            handle.remove()

    @staticmethod
    def select(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Scores ``[B, K]``: ``logits[b, targets[b, k]]``."""
        return logits.gather(1, targets)

    @staticmethod
    def grads(scores: torch.Tensor, inputs: Sequence[torch.Tensor] | torch.Tensor,
              ) -> list[torch.Tensor]:
        """Gradients of each of the ``K`` score columns w.r.t. ``inputs``, in one pass.

        ``scores`` is ``[B, K]``; image b's column-k score depends only on image b (the
        model is in eval mode), so one backward of ``sum_b scores[b, k]`` per k gives all
        per-image gradients, and ``is_grads_batched`` runs the K backwards as one
        vectorised pass. Returns, per input ``[B, ...]``, a tensor ``[B, K, ...]``.
        """
        inputs = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
        k = scores.shape[1]
        if k == 1:
            out = torch.autograd.grad(scores.sum(), inputs)
            return [g[:, None] for g in out]
        eye = torch.eye(k, dtype=scores.dtype, device=scores.device)
        grad_outputs = eye[:, None, :].expand(k, *scores.shape)  # [K, B, K]
        out = torch.autograd.grad(scores, inputs, grad_outputs, is_grads_batched=True)
        return [g.transpose(0, 1) for g in out]

    @staticmethod
    def upsample(maps: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """``[B, K, *s]`` -> ``[B, K, *size]`` by linear, bilinear or trilinear interpolation
        (as ``len(size)`` says; same size: as is)."""
        if tuple(maps.shape[2:]) == tuple(size):
            return maps
        maps = maps if maps.is_floating_point() else maps.float()  # float64 stays float64
        return F.interpolate(maps, size=tuple(size), mode=interp_mode(len(size)),
                             align_corners=False)
