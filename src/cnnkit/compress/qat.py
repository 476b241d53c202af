"""Quantisation-aware fine-tuning: train through simulated int8, then convert to real int8.

Jacob, Kligys, Chen, Zhu, Tang, Howard, Adam and Kalenichenko (2018), "Quantization and
Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference", CVPR: the forward
pass rounds weights and activations to the int8 grid ("fake quantisation") and the backward
pass treats the rounding as the identity (straight-through estimator), so the weights learn to
sit well on the grid that :func:`~cnnkit.compress.quantize.quantize` would otherwise impose
after training. As in that paper, weight ranges follow the current weights (per output
channel by default) and activation ranges are exponential moving averages of the observed
min/max; BatchNorm is simulated folded into its convolution (torch's ``ConvBn`` QAT modules).
Krishnamoorthi (2018), "Quantizing deep convolutional networks for efficient inference: A
whitepaper", section 3.2: late in training, BatchNorm statistics are frozen (the folded weights
stop jittering with the batch) and so are the quantiser ranges (``freeze_bn_after``,
``freeze_observers_after``).

Execution is torch.ao's FX QAT path (``prepare_qat_fx`` / ``convert_fx``), with the engine, the
activation bit width (7 bits on x86/fbgemm) and the weight scheme of :func:`quantize`, so the
result runs and saves like a post-training one (:func:`save_quantized`, :func:`load_quantized`).
"""

from __future__ import annotations

import copy
import itertools
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from .quantize import PercentileObserver, _batches, _trace, choose_backend

try:  # deprecated in torch like the PTQ API (see cnnkit.compress.quantize)
    from torch.ao.nn.intrinsic.qat import freeze_bn_stats
    from torch.ao.quantization import (
        FakeQuantize,
        QConfig,
        QConfigMapping,
        disable_fake_quant,
        disable_observer,
        enable_fake_quant,
        get_default_qat_qconfig_mapping,
    )
    from torch.ao.quantization.observer import (
        MovingAverageMinMaxObserver,
        MovingAveragePerChannelMinMaxObserver,
    )
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_qat_fx
except ImportError as err:  # pragma: no cover - depends on the installed torch
    raise ImportError(f"cnnkit.compress.qat needs torch.ao.quantization's FX QAT API, which "
                      f"torch {torch.__version__} lacks ({err}); install torch<=2.13") from err

__all__ = ["QAT_OBSERVERS", "convert_qat", "prepare_qat", "quantize_aware_train"]

# "entropy" is left out: a fake quantiser recomputes its range on every training step, and the
# KL search is O(bins^2) per call (tens of ms per activation, per step).
QAT_OBSERVERS = ("minmax", "percentile")


def _qat_qconfig_mapping(backend: str, observer: str, per_channel: bool) -> QConfigMapping:
    if observer not in QAT_OBSERVERS:
        raise ValueError(f"unknown QAT observer {observer!r}; choose one of {QAT_OBSERVERS} "
                         "('entropy' is for post-training quantize only)")
    reduce = backend in ("x86", "fbgemm")  # 7-bit activations, as in quantize (int16 sums)
    # Jacob et al. 2018, 3.1: activation ranges are an EMA of the batch min/max
    act_obs = MovingAverageMinMaxObserver.with_args(averaging_constant=0.01) \
        if observer == "minmax" else PercentileObserver
    act = FakeQuantize.with_args(observer=act_obs, dtype=torch.quint8,
                                 qscheme=torch.per_tensor_affine, reduce_range=reduce)
    # averaging_constant=1: the weight range is the current weights' min/max (no lag), the
    # same symmetric int8 scheme as quantize's PTQ weights
    if per_channel:
        weight = FakeQuantize.with_args(observer=MovingAveragePerChannelMinMaxObserver,
                                        averaging_constant=1.0, dtype=torch.qint8,
                                        qscheme=torch.per_channel_symmetric)
    else:
        weight = FakeQuantize.with_args(observer=MovingAverageMinMaxObserver,
                                        averaging_constant=1.0, dtype=torch.qint8,
                                        qscheme=torch.per_tensor_symmetric)
    # torch's QAT mapping keeps fixed-range fake quantisers for sigmoid, softmax, ...
    return get_default_qat_qconfig_mapping(backend).set_global(QConfig(activation=act,
                                                                       weight=weight))


def prepare_qat(model: nn.Module, example_inputs: torch.Tensor, *, backend: str = "auto",
                observer: str = "minmax", per_channel: bool = True) -> fx.GraphModule:
    """A fake-quantised training copy of ``model`` (Jacob et al. 2018), in train mode.

    ``model`` is traced in eval mode (so ``if self.training`` branches inside non-leaf modules
    take their eval path; dropout and BatchNorm layers still follow the copy's mode) and is
    not modified. Conv-BN(-ReLU) become torch's ``ConvBn`` QAT modules, which fake-quantise
    the BN-folded weights. Note that calling the result also in eval mode updates its ranges
    unless observers are disabled (``torch.ao.quantization.disable_observer``).

    Args:
        model: a float model torch.fx can trace.
        example_inputs: one input batch (for tracing).
        backend: int8 engine, as for :func:`~cnnkit.compress.quantize.quantize` (``"auto"``
            picks one that runs every operator, by the registry's ``int8`` facts, and an
            operator the chosen engine cannot run is refused in one line); it is made the
            current engine.
        observer: activation range, ``"minmax"`` (EMA of min/max) or ``"percentile"``.
        per_channel: one weight scale per output channel (else one per tensor).

    Example:
        >>> import torch
        >>> from cnnkit.compress.qat import prepare_qat
        >>> from cnnkit.models import create_model
        >>> m = create_model("tinyvgg", num_classes=3, in_chans=1, img_size=8, width=4)
        >>> fq = prepare_qat(m, torch.randn(1, 1, 8, 8))
        >>> fq(torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 3])
    """
    gm = _trace(copy.deepcopy(model).eval())
    backend = choose_backend(model, example_inputs, backend, traced=gm)
    mapping = _qat_qconfig_mapping(backend, observer, per_channel)
    torch.backends.quantized.engine = backend
    gm.train()
    with warnings.catch_warnings():  # torch.ao.quantization deprecation notices
        warnings.simplefilter("ignore")
        return prepare_qat_fx(gm, mapping, (example_inputs,))


def _convert(prepared: fx.GraphModule) -> fx.GraphModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert_fx(prepared.eval()).eval()  # BN folded with its running statistics


def convert_qat(prepared: fx.GraphModule) -> fx.GraphModule:
    """The int8 model of a :func:`prepare_qat` model (which is left as it is)."""
    return _convert(copy.deepcopy(prepared))


_BATCH = 64


def _is_tensor_pair(data: object) -> bool:
    return isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], torch.Tensor)


def _num_batches(data: tuple[torch.Tensor, torch.Tensor] | Iterable) -> int | None:
    if _is_tensor_pair(data):
        return -(-len(data[0]) // _BATCH)
    return len(data) if hasattr(data, "__len__") else None


def _epoch_batches(data: tuple[torch.Tensor, torch.Tensor] | Iterable, shuffle: bool = True
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    if _is_tensor_pair(data):
        x, y = data
        # reshuffled every epoch with torch's global RNG
        order = torch.randperm(len(x)) if shuffle else torch.arange(len(x))
        for idx in order.split(_BATCH):
            yield x[idx], y[idx]
        return
    for item in data:
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise ValueError("train_data batches must be (images, labels) pairs")
        yield item[0], item[1]


def _set_frozen(prepared: fx.GraphModule, bn: bool, observers: bool) -> None:
    if bn:
        prepared.apply(freeze_bn_stats)  # ConvBn QAT modules: use (and keep) running stats
        for m in prepared.modules():  # BatchNorm not fused into a convolution
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    if observers:
        prepared.apply(disable_observer)


def quantize_aware_train(model: nn.Module, train_data: tuple[torch.Tensor, torch.Tensor] | Iterable,
                         *, epochs: int = 1, lr: float = 1e-3,
                         calibration_data: torch.Tensor | Iterable | None = None,
                         backend: str = "auto", observer: str = "minmax", per_channel: bool = True,
                         example_inputs: torch.Tensor | None = None,
                         freeze_bn_after: int | None = None,
                         freeze_observers_after: int | None = None,
                         loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                         progress: bool | None = None) -> fx.GraphModule:
    """Quantisation-aware fine-tuning (Jacob et al. 2018), then conversion to int8.

    The model is fine-tuned through fake quantisation (:func:`prepare_qat`) with SGD
    (momentum 0.9) on ``loss`` (cross-entropy by default; a task's own loss for dense
    outputs), then converted with ``convert_fx``. BN and observer
    freezing follow Krishnamoorthi (2018), "Quantizing deep convolutional networks for
    efficient inference: A whitepaper".

    Args:
        model: a trained float model torch.fx can trace. It is not modified.
        train_data: ``(images, targets)`` tensors (shuffled and split in batches of 64 each
            epoch) or a re-iterable of ``(images, labels)`` batches, images normalised.
        epochs: passes over ``train_data`` (0: only calibrate and convert).
        lr: SGD learning rate (small: this is fine-tuning a trained model).
        calibration_data: optional input batches (a tensor or an iterable of tensors or
            ``(images, labels)`` pairs) that set the ranges before training, with fake
            quantisation off and BatchNorm in eval mode; else the first training batch does.
        backend: int8 engine, as for :func:`~cnnkit.compress.quantize.quantize`.
        observer: activation range: ``"minmax"`` (EMA) or ``"percentile"``.
        per_channel: one weight scale per output channel (else one per tensor).
        example_inputs: an input for tracing; defaults to one training image.
        freeze_bn_after: after this many epochs (0: from the start) BatchNorm stops
            updating and uses its running statistics; None: never.
        freeze_observers_after: after this many epochs the weight and activation ranges
            stop moving (0 needs ``calibration_data``); None: never.
        loss: ``loss(outputs, targets)`` to fine-tune on; None: cross-entropy.
        progress: a progress bar (None: only on a terminal).

    Returns:
        The int8 ``GraphModule`` (float in, float out) with ``num_classes``, ``default_cfg``
        and ``quant_config`` (with ``qat=True`` and the training settings) like
        :func:`~cnnkit.compress.quantize.quantize`.

    Example:
        >>> import torch
        >>> from cnnkit.compress import quantize_aware_train
        >>> from cnnkit.models import create_model
        >>> m = create_model("tinyvgg", num_classes=3, in_chans=1, img_size=8, width=4)
        >>> x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 3, (32,))
        >>> q = quantize_aware_train(m, (x, y), epochs=1, progress=False)
        >>> q(x).shape, q.quant_config["qat"]
        (torch.Size([32, 3]), True)
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if freeze_observers_after == 0 and calibration_data is None:
        raise ValueError("freeze_observers_after=0 fixes the ranges before any data is seen; "
                         "pass calibration_data or freeze after at least one epoch")
    if isinstance(train_data, Iterator):
        if epochs > 1:
            raise ValueError("train_data is a one-shot iterator; pass tensors or a "
                             "re-iterable loader for several epochs")
        head = list(itertools.islice(train_data, 1))  # read for tracing, then trained on
        train_data = itertools.chain(head, train_data)
        first = next(_epoch_batches(head), None)
    else:
        first = next(_epoch_batches(train_data, shuffle=False), None)
    if first is None:
        raise ValueError("train_data is empty; pass (images, labels) batches")
    prepared = prepare_qat(model, first[0][:1] if example_inputs is None else example_inputs,
                           backend=backend, observer=observer, per_channel=per_channel)
    backend = torch.backends.quantized.engine  # the engine prepare_qat chose for "auto"
    if calibration_data is not None:
        prepared.eval().apply(disable_fake_quant)
        with torch.no_grad():
            for x in _batches(calibration_data):
                prepared(x)
        prepared.apply(enable_fake_quant)
    elif epochs == 0:  # ranges need at least one batch
        with torch.no_grad():
            prepared.eval()(first[0])
    opt = torch.optim.SGD(prepared.parameters(), lr=lr, momentum=0.9)
    steps = _num_batches(train_data)
    with tqdm(total=None if steps is None else epochs * steps, desc="QAT", unit="step",
              disable=None if progress is None else not progress, leave=False) as bar:
        for epoch in range(epochs):
            prepared.train()
            _set_frozen(prepared, bn=freeze_bn_after is not None and epoch >= freeze_bn_after,
                        observers=freeze_observers_after is not None
                        and epoch >= freeze_observers_after)
            for x, y in _epoch_batches(train_data):
                opt.zero_grad(set_to_none=True)
                value = (loss or nn.functional.cross_entropy)(prepared(x), y)
                value.backward()
                opt.step()
                bar.set_postfix(epoch=epoch, loss=f"{value.item():.4f}", refresh=False)
                bar.update(1)
    qmodel = _convert(prepared)
    for attr in ("num_classes", "default_cfg"):
        if hasattr(model, attr):
            setattr(qmodel, attr, copy.deepcopy(getattr(model, attr)))
    qmodel.quant_config = dict(backend=backend, observer=observer,
                               per_channel=per_channel, qat=True, epochs=epochs, lr=lr,
                               freeze_bn_after=freeze_bn_after,
                               freeze_observers_after=freeze_observers_after)
    return qmodel


def _rebuild(model: nn.Module, example_inputs: torch.Tensor, cfg: dict[str, Any]
             ) -> fx.GraphModule:
    """The untrained int8 graph of a QAT model, for :func:`load_quantized` to fill."""
    prepared = prepare_qat(model, example_inputs, backend=cfg.get("backend", "auto"),
                           per_channel=cfg.get("per_channel", True))
    with torch.no_grad():
        prepared.eval()(example_inputs)
    return _convert(prepared)
