"""Post-training static int8 quantisation that runs faster on a CPU.

Scheme: Jacob, Kligys, Chen, Zhu, Tang, Howard, Adam and Kalenichenko (2018), "Quantization
and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference", CVPR:
BatchNorm is folded into the preceding convolution, conv(-BN)-ReLU runs as one integer kernel,
weights are symmetric int8 (one scale per output channel by default, as in Krishnamoorthi
2018, "Quantizing deep convolutional networks for efficient inference: A whitepaper") and
activations are affine uint8 with a range chosen on calibration batches by one of three
observers: ``"minmax"`` (the observed range), ``"percentile"`` (a percentile of ``|x|``;
McKinstry et al. 2019 / Wu, Judd, Zhang, Isaev and Micikevicius 2020, "Integer Quantization for
Deep Learning Inference: Principles and Empirical Evaluation") or ``"entropy"`` (the clipping
threshold minimising the KL divergence between the clipped and the quantised histogram:
Migacz 2017, "8-bit Inference with TensorRT", GTC).

Execution: torch.ao.quantization's FX graph mode (``prepare_fx`` / ``convert_fx``), by default
with the ``x86`` engine (fbgemm + oneDNN kernels). Measured on this 2-core CPU
(bench/quantize_latency.py) it was the fastest working path; torch marks torch.ao.quantization
deprecated in favour of torchao's PT2E, which is not installed here, so its DeprecationWarnings
are silenced locally.

Quantisation-aware fine-tuning, which trains through this int8 scheme before converting, is
:func:`cnnkit.compress.qat.quantize_aware_train`; an int8 model of either kind is saved and
loaded, without pickle, by :mod:`cnnkit.compress.quantized_file`.

Whether the engine runs an operator is its ``int8`` fact in the operator registry
(:mod:`cnnkit.layers.ops`): before converting, one float pass reads the fact of every
call on the input's data and refuses, in one line, an operator the engine cannot run or
computes wrongly (e.g. transposed convolutions with in != out channels on x86, 2D U-Net
up-convolutions on fbgemm, 1D/3D linear interpolation), a module with parameters or a
function the registry does not know. ``backend="auto"`` takes the first engine, in the order
x86, fbgemm, onednn, qnnpack, that runs every call (x86 for the classifiers and the 3D U-Net,
qnnpack for the 2D U-Nets).

The engine is process-wide torch state (``torch.backends.quantized.engine``): :func:`quantize`
sets it, and a quantised model must run under the engine it was built with.
"""

from __future__ import annotations

import collections
import copy
import itertools
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import fx, nn
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

try:  # the eager/FX quantisation API is deprecated; fail clearly the day it is removed
    from torch.ao.quantization import QConfig, QConfigMapping, get_default_qconfig_mapping
    from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
except ImportError as err:  # pragma: no cover - depends on the installed torch
    raise ImportError(f"cnnkit.compress.quantize needs torch.ao.quantization's FX API, "
                      f"which torch {torch.__version__} lacks ({err}); install torch<=2.13"
                      ) from err

from cnnkit.layers.ops import Unsupported, function_facts, operator_modules, tensors

from .observers import OBSERVERS, EntropyObserver, PercentileObserver

__all__ = ["EntropyObserver", "PercentileObserver", "fold_batchnorm", "freeze_quantized",
           "quantize", "search_calibration"]

_BACKENDS = ("x86", "fbgemm", "onednn", "qnnpack")


class _Tracer(fx.Tracer):
    """torch.fx's tracer, tracing through modules built on the fly in ``forward``.

    A slice such as ``self.classifier[:-1]`` (MobileNet's head) is a new ``Sequential`` that
    is not a registered submodule; its children are, so tracing inside it records them.
    """

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        try:
            self.path_of_module(m)
        except NameError:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.GraphModule(model, _Tracer().trace(model), type(model).__name__)
    except Exception as err:  # torch.fx raises TraceError, TypeError, ... on dynamic code
        raise ValueError(f"{type(model).__name__} cannot be traced by torch.fx ({err}); "
                         "quantize models without data-dependent control flow") from err


_CONSUMER = "int8 quantisation"


class _Refused(ValueError):
    """An engine's ``int8`` fact says no (another engine may run the call)."""


class _Int8Check(TorchFunctionMode):
    """Reads the ``int8`` fact of every call on data that depends on the input."""

    def __init__(self, backend: str) -> None:
        super().__init__()
        self.backend = backend
        self.data = WeakIdKeyDictionary()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        outs = list(tensors(out))  # calls returning no tensor (.dim(), .shape) are no operators
        if outs and any(t in self.data for t in tensors((args, kwargs))):
            facts = function_facts(getattr(func, "__name__", repr(func)), _CONSUMER)
            verdict = facts.int8(args, kwargs, self.backend) if callable(facts.int8) \
                else facts.int8
            if isinstance(verdict, Unsupported):
                raise _Refused(f"int8 quantisation cannot run {facts.name} on the "
                               f"{self.backend} engine: {verdict.reason}")
            for t in outs:
                self.data[t] = True
        return out


def check_int8(model: nn.Module, example: torch.Tensor, backend: str,
               traced: nn.Module | None = None) -> None:
    """Refuse (one line) a model with an operator the ``backend`` int8 engine cannot run,
    by its operators' ``int8`` facts, or one the registry does not know; its functions are
    read on one pass of ``traced`` (default: ``model``, which must be in eval mode)."""
    _check_modules(model)
    _check_calls(example, backend, model if traced is None else traced)


def _check_modules(model: nn.Module) -> None:
    for _, module, facts in operator_modules(model, _CONSUMER, functional_leaves=True):
        if isinstance(facts.int8, Unsupported):
            raise ValueError(f"int8 quantisation cannot run {type(module).__name__}: "
                             f"{facts.int8.reason}")


def _check_calls(example: torch.Tensor, backend: str, model: nn.Module) -> None:
    check = _Int8Check(backend)
    x = example.detach().clone()
    check.data[x] = True
    with torch.no_grad(), check:
        model(x)


def choose_backend(model: nn.Module, example: torch.Tensor, backend: str = "auto",
                   traced: nn.Module | None = None) -> str:
    """The int8 engine for ``model``: ``backend`` once :func:`check_int8` passes, or for
    ``"auto"`` the first engine (x86, fbgemm, onednn, qnnpack) whose ``int8`` facts accept
    every call; a model no engine runs is refused in one line with each engine's reason."""
    if backend != "auto":
        backend = _resolve_backend(backend)
        try:
            check_int8(model, example, backend, traced)
        except _Refused as err:
            raise ValueError(f"{err}; backend='auto' tries every engine") from err
        return backend
    _check_modules(model)  # the same for every engine
    refusals = []
    for name in (b for b in _BACKENDS if b in torch.backends.quantized.supported_engines):
        try:
            _check_calls(example, name, model if traced is None else traced)
        except _Refused as err:
            refusals.append(str(err).removeprefix("int8 quantisation cannot run "))
            continue
        return name
    raise ValueError(f"int8 quantisation: no engine of this torch runs {type(model).__name__} "
                     f"({'; '.join(refusals)}); keep it in float")


def fold_batchnorm(model: nn.Module) -> fx.GraphModule:
    """A float copy of ``model`` (eval mode) with each BatchNorm folded into its convolution.

    ``W' = W * g / sqrt(var + eps)`` per output channel and
    ``b' = (b - mean) * g / sqrt(var + eps) + beta`` (Jacob et al. 2018, section 3.2, eval
    form): only a BatchNorm directly fed by a convolution whose output nothing else reads,
    neither module being called elsewhere, is folded; others are left in place.
    """
    gm = _trace(copy.deepcopy(model).eval())
    modules = dict(gm.named_modules())
    # a module called at several places (shared weights) must not be changed for one of them
    calls = collections.Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    for node in list(gm.graph.nodes):
        bn = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.running_var is None:
            continue
        prev = node.args[0]
        conv = modules.get(prev.target) if isinstance(prev, fx.Node) and \
            prev.op == "call_module" else None
        if not isinstance(conv, nn.modules.conv._ConvNd) or len(prev.users) != 1 \
                or isinstance(conv, nn.modules.conv._ConvTransposeNd) \
                or calls[prev.target] != 1 or calls[node.target] != 1:
            continue
        with torch.no_grad():
            scale = torch.rsqrt(bn.running_var + bn.eps)
            shift = -bn.running_mean * scale
            if bn.affine:
                scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
            bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
            conv.weight.mul_(scale.reshape(-1, *[1] * (conv.weight.dim() - 1)))
            conv.bias = nn.Parameter(bias * scale + shift)
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _resolve_backend(backend: str) -> str:
    engines = torch.backends.quantized.supported_engines
    if backend == "auto":
        for name in _BACKENDS:
            if name in engines:
                return name
        raise ValueError(f"no int8 engine in this torch build (supported: {engines}); "
                         "use a torch build with fbgemm/x86 or qnnpack")
    if backend not in _BACKENDS or backend not in engines:
        valid = [b for b in _BACKENDS if b in engines]
        raise ValueError(f"unsupported backend {backend!r}; choose 'auto' or one of {valid}")
    return backend


def _qconfig_mapping(backend: str, observer: str, per_channel: bool) -> QConfigMapping:
    if observer not in OBSERVERS:
        raise ValueError(f"unknown observer {observer!r}; choose one of {OBSERVERS}")
    # fbgemm/x86 int8 kernels accumulate pairs of u8*s8 products in int16: activations keep
    # 7 bits so the sum cannot saturate (torch's own default for these engines).
    reduce = backend in ("x86", "fbgemm")
    act_cls = {"minmax": MinMaxObserver, "percentile": PercentileObserver,
               "entropy": EntropyObserver}[observer]
    act = act_cls.with_args(dtype=torch.quint8, qscheme=torch.per_tensor_affine,
                            reduce_range=reduce)
    if per_channel:
        weight = PerChannelMinMaxObserver.with_args(dtype=torch.qint8,
                                                    qscheme=torch.per_channel_symmetric)
    else:
        weight = MinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
    # torch's default mapping keeps its fixed-range settings for sigmoid, softmax, ...
    mapping = get_default_qconfig_mapping(backend).set_global(QConfig(activation=act,
                                                                      weight=weight))
    # Transposed convolutions: the engines have no per-channel kernel, so one weight scale,
    # and this call's activation observer (torch's default here is a histogram observer, and
    # onednn's a per-channel weight observer its own prepare refuses).
    transposed = QConfig(activation=act, weight=MinMaxObserver.with_args(
        dtype=torch.qint8, qscheme=torch.per_tensor_symmetric))
    for conv_t in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
        mapping.set_object_type(conv_t, transposed)
    return mapping


def _batches(data: torch.Tensor | Iterable, batch_size: int = 64) -> Iterator[torch.Tensor]:
    if isinstance(data, torch.Tensor):
        yield from data.split(batch_size)
        return
    for item in data:
        yield item[0] if isinstance(item, list | tuple) else item


def quantize(model: nn.Module, calibration_data: torch.Tensor | Iterable, *,
             backend: str = "auto", observer: str = "minmax", per_channel: bool = True,
             example_inputs: torch.Tensor | None = None) -> fx.GraphModule:
    """Post-training static int8 quantisation of a float CNN (Jacob et al. 2018).

    Args:
        model: a float model torch.fx can trace (all cnnkit classifiers without
            data-dependent control flow). It is not modified.
        calibration_data: normalised input batches: a tensor ``[N, C, H, W]`` (split in
            batches of 64) or an iterable of tensors or ``(images, labels)`` pairs.
        backend: int8 engine, ``"auto"`` (the first of x86, fbgemm, onednn, qnnpack that runs
            every operator of the model, by the registry's ``int8`` facts) or one of
            ``torch.backends.quantized.supported_engines``; it is made the current engine
            and recorded in ``quant_config["backend"]``.
        observer: activation range: ``"minmax"``, ``"percentile"`` (99.99th of ``|x|``) or
            ``"entropy"`` (KL divergence, Migacz 2017).
        per_channel: one weight scale per output channel (else one per tensor).
        example_inputs: an input for tracing; defaults to the first calibration batch.

    Returns:
        The int8 ``GraphModule`` (float in, float out), with ``num_classes`` and
        ``default_cfg`` copied from ``model`` when it has them.

    Example:
        >>> import torch
        >>> from cnnkit.compress import quantize
        >>> from cnnkit.models import create_model
        >>> model = create_model("tinyvgg", num_classes=10, in_chans=1, img_size=8).eval()
        >>> x = torch.randn(32, 1, 8, 8)  # calibration inputs, normalised as in training
        >>> q = quantize(model, x)
        >>> q.features.conv_1_1.weight().dtype, q.quant_config["observer"]
        (torch.qint8, 'minmax')
        >>> with torch.no_grad():
        ...     y, y_int8 = model(x), q(x)
        >>> y_int8.shape, bool((y_int8 - y).abs().max() < 0.05 * y.abs().max())
        (torch.Size([32, 10]), True)
    """
    if backend != "auto":
        _resolve_backend(backend)
    if observer not in OBSERVERS:
        raise ValueError(f"unknown observer {observer!r}; choose one of {OBSERVERS}")
    batches = _batches(calibration_data)
    first = next(batches, None)
    if first is None:
        raise ValueError("calibration_data is empty; pass at least one batch of inputs")
    example = first[:1] if example_inputs is None else example_inputs
    folded = fold_batchnorm(model)
    backend = choose_backend(model, example, backend, traced=folded)
    mapping = _qconfig_mapping(backend, observer, per_channel)
    torch.backends.quantized.engine = backend
    with warnings.catch_warnings():  # torch.ao.quantization deprecation notices (see module doc)
        warnings.simplefilter("ignore")
        prepared = prepare_fx(folded, mapping, (example,))
        with torch.no_grad():
            for x in itertools.chain([first], batches):
                prepared(x)
        qmodel = convert_fx(prepared)
    for attr in ("num_classes", "default_cfg"):
        if hasattr(model, attr):
            setattr(qmodel, attr, copy.deepcopy(getattr(model, attr)))
    qmodel.quant_config = dict(backend=backend, observer=observer, per_channel=per_channel)
    return qmodel


def freeze_quantized(qmodel: fx.GraphModule, example_inputs: torch.Tensor
                     ) -> torch.jit.ScriptModule:
    """Trace and freeze an int8 model with TorchScript for lower per-call overhead.

    The FX ``GraphModule`` dispatches every quantised op from Python; on small inputs
    (tinyvgg_wide at 8x8, batch 1) that overhead makes int8 no faster than fp32, while the
    frozen TorchScript graph is about 2.5x faster (bench/quantize_latency.py). TorchScript is
    deprecated in torch but works in 2.13; the result is for inference in this process (save
    the model with :func:`save_quantized`, not ``torch.jit.save``, to stay pickle-free).
    """
    with warnings.catch_warnings(), torch.no_grad():  # TorchScript deprecation notices
        warnings.simplefilter("ignore")
        return torch.jit.freeze(torch.jit.trace(qmodel.eval(), example_inputs))


def _accuracy(model: nn.Module, val: tuple[torch.Tensor, torch.Tensor] | Iterable) -> float:
    if isinstance(val, tuple) and len(val) == 2 and isinstance(val[0], torch.Tensor):
        val = zip(val[0].split(256), val[1].split(256), strict=True)
    correct = total = 0
    with torch.no_grad():
        for x, y in val:
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    if total == 0:
        raise ValueError("the validation data is empty; pass (images, labels) batches")
    return correct / total


def search_calibration(model: nn.Module, calibration_data: torch.Tensor | Iterable,
                       val: tuple[torch.Tensor, torch.Tensor] | Iterable, *,
                       backend: str = "auto", observers: Iterable[str] = OBSERVERS,
                       per_channel: Iterable[bool] = (True, False),
                       example_inputs: torch.Tensor | None = None,
                       ) -> tuple[fx.GraphModule, list[dict]]:
    """Quantise with every (observer, per-channel) setting and keep the most accurate.

    Quantune (Lee, Kim, Lee, Park and Kim 2023, "Quantune: Post-training quantization of
    convolutional neural networks using extreme gradient boosting for fast deployment")
    searches the calibration configuration per model with a learned cost model; our grid is
    small (3 observers x 2 weight granularities), so this is a plain exhaustive search.

    Args:
        model: float model, as for :func:`quantize`.
        calibration_data: calibration batches, as for :func:`quantize` (a tensor or a
            re-iterable, since it is read once per setting).
        val: ``(images, labels)`` tensors or an iterable of ``(images, labels)`` batches
            (re-iterable), images normalised like the calibration data.
        backend: int8 engine, as for :func:`quantize`.
        observers: activation observers to try.
        per_channel: weight granularities to try.
        example_inputs: as for :func:`quantize`.

    Returns:
        The most accurate int8 model (first in grid order on ties) and one row per setting:
        ``{"observer", "per_channel", "accuracy"}`` plus a first row ``observer="float"``
        with the float model's accuracy.
    """
    if isinstance(val, Iterator):
        raise ValueError("val is a one-shot iterator; pass tensors or a re-iterable loader")
    table = [dict(observer="float", per_channel=None, accuracy=_accuracy(model.eval(), val))]
    best, best_acc = None, -1.0
    for obs, pc in itertools.product(list(observers), list(per_channel)):
        qmodel = quantize(model, calibration_data, backend=backend, observer=obs,
                          per_channel=pc, example_inputs=example_inputs)
        acc = _accuracy(qmodel, val)
        table.append(dict(observer=obs, per_channel=pc, accuracy=acc))
        if acc > best_acc:
            best, best_acc = qmodel, acc
    if best is None:
        raise ValueError("empty search grid; pass at least one observer and per_channel value")
    return best, table
